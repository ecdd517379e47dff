"""The one home of a run's directory: its files, its lock, its checkpoints.

A workdir holds JSON metadata (`run.json`, `prior.json`), JSON-lines metrics
(`metrics.jsonl`), results (`eval.json`) and `checkpoints/`. This module writes
them so that neither a killed process nor a second one can corrupt them:

* JSON files are replaced atomically (`write_json`); non-finite floats are
  written as null and listed under "nonfinite", so every file is valid JSON.
* Metrics rows are appended one whole line per write (`RunDir.append_row`);
  a torn line is skipped when read (`RunDir.read_rows`) and dropped, with the
  rows after the checkpoint, on resume (`RunDir.truncate_rows`).
* One process at a time writes a workdir (`RunDir.lock`).
* `Checkpoints` (the writer's, under the lock) restores the newest complete
  checkpoint on disk whatever state `tf.train.CheckpointManager`'s index file
  is in, and one that cannot be read is an error that changes nothing, never
  a fresh start over it. Readers restore with `restore_newest`, which picks
  the same checkpoint and writes nothing (no repair, no move, no lock).

Paths may be local or any `tf.io.gfile` path (gs://...). Local only: the lock
(fcntl.flock), the atomic replace (os.replace) and O_APPEND appends. Elsewhere
the lock is skipped with a warning, JSON files are written whole (object
stores publish an object when it is closed) and rows are appended through
tf.io.gfile.

Usage::

  with rundir.RunDir(workdir) as run:
    run.check_fingerprint("run.json", fingerprint)
    checkpoints = rundir.Checkpoints(checkpoint, run.path("checkpoints"),
                                     max_to_keep=5)
    step = checkpoints.restore()
    run.write_metadata("run.json", fingerprint, data_variance=variance)
    run.truncate_rows("metrics.jsonl", step)
    ...
    run.append_row("metrics.jsonl", {"step": step, "loss": loss})
    checkpoints.save(step)
"""

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import shlex
import socket
import sys
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple
import uuid

from absl import logging
import numpy as np
import tensorflow as tf

LOCK_FILE = ".lock"
# Key of the list of the non-finite values' dotted keys in a written dict.
NONFINITE_KEY = "nonfinite"
# What tf.train.CheckpointManager calls its index file and its checkpoints.
INDEX_FILE = "checkpoint"
CHECKPOINT_NAME = "ckpt"
# Where `Checkpoints.restore` moves what a killed save left behind.
INCOMPLETE_DIR = "incomplete"

_CHECKPOINT_FILE = re.compile(
    rf"^{CHECKPOINT_NAME}-(\d+)(?:\.index|\.data-(\d{{5}})-of-(\d{{5}}))$")
# The directory a sharded save writes into before merging its shards.
_CHECKPOINT_TEMP = re.compile(rf"^{CHECKPOINT_NAME}-(\d+)_temp")
# tf.io.gfile's atomic write of the index file goes through these.
_INDEX_TEMP = re.compile(rf"^{INDEX_FILE}\.tmp[0-9a-f]+$")
_INDEX_ENTRY = re.compile(rf"^{CHECKPOINT_NAME}-(\d+)$")


class RunDirError(RuntimeError):
  """A workdir problem; the message says what to do."""


class FingerprintMismatch(RunDirError):
  """The workdir holds a different run.

  Attributes:
    differences: [(dotted key, stored value, current value)]; `ABSENT` stands
      for a key that only the other side has.
  """

  def __init__(self, message: str,
               differences: Sequence[Tuple[str, Any, Any]] = ()):
    super().__init__(message)
    self.differences = list(differences)


class _Absent:

  def __repr__(self) -> str:
    return "absent"


ABSENT = _Absent()


def _is_local(path: str) -> bool:
  return "://" not in path


def _join_key(prefix: str, key: Any) -> str:
  return f"{prefix}.{key}" if prefix else str(key)


def flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  """Nested mappings as one dict with dotted keys.

  Args:
    d: e.g. {"model": {"num_embeddings": 512}, "seed": 1}.
    prefix: prepended to every key, joined with a dot.

  Returns:
    e.g. {"model.num_embeddings": 512, "seed": 1}. An empty mapping stays a
    value ({}), so that it still shows in a comparison.
  """
  flat = {}
  for key, value in d.items():
    name = _join_key(prefix, key)
    if isinstance(value, Mapping) and value:
      flat.update(flatten(value, name))
    else:
      flat[name] = value
  return flat


def _json_compatible(value: Any, key: str, nonfinite: List[str]) -> Any:
  """`value` with JSON types only; appends the keys of non-finite floats."""
  if isinstance(value, np.ndarray):
    value = value.tolist()  # A 0-d array becomes a Python scalar.
  elif isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float):
    if math.isfinite(value):
      return value
    nonfinite.append(key)
    return None
  if value is None or isinstance(value, (bool, int, str)):
    return value
  if isinstance(value, Mapping):
    return {(k if isinstance(k, str) else str(k)):
                _json_compatible(v, _join_key(key, k), nonfinite)
            for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_compatible(v, _join_key(key, i), nonfinite)
            for i, v in enumerate(value)]
  raise TypeError(
      f"{key or 'The value'} is a {type(value).__name__}, which JSON cannot "
      "hold; convert it to a number, string, list or dict first.")


def _encode(obj: Any, indent: Optional[int] = None) -> Tuple[str, List[str]]:
  """JSON text of `obj` with non-finite floats as null, and their keys."""
  nonfinite = []
  clean = _json_compatible(obj, "", nonfinite)
  if nonfinite and isinstance(clean, dict):
    clean[NONFINITE_KEY] = nonfinite
  return json.dumps(clean, indent=indent, allow_nan=False), nonfinite


def _write_all(fd: int, data: bytes) -> None:
  view = memoryview(data)
  while view:
    view = view[os.write(fd, view):]


def _atomic_write(path: str, data: bytes) -> None:
  """Replaces `path` by `data` at once: readers see the old or the new file."""
  directory = os.path.dirname(path)
  if not _is_local(path):
    # Object stores publish a whole object when it is closed.
    if directory:
      tf.io.gfile.makedirs(directory)
    with tf.io.gfile.GFile(path, "wb") as f:
      f.write(data)
    return
  if directory:
    os.makedirs(directory, exist_ok=True)
  temp = os.path.join(
      directory, f".{os.path.basename(path)}.{os.getpid()}-"
      f"{uuid.uuid4().hex[:8]}.tmp")
  # os.open applies the umask, unlike tempfile's private 0600 files.
  fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    try:
      _write_all(fd, data)
      os.fsync(fd)
    finally:
      os.close(fd)
    os.replace(temp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(temp)
    raise
  _fsync_directory(directory or ".")


def _fsync_directory(directory: str) -> None:
  # Makes the rename itself durable; some file systems cannot, which is fine.
  with contextlib.suppress(OSError):
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def _read_bytes(path: str) -> bytes:
  """The file's bytes; FileNotFoundError when it is absent."""
  if _is_local(path):
    with open(path, "rb") as f:
      return f.read()
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  except tf.errors.NotFoundError as e:
    raise FileNotFoundError(f"No such file: {path!r}") from e


def write_json(path: str, obj: Any) -> List[str]:
  """Atomically writes `obj` as indented JSON to `path`.

  The text goes to a temporary file in the same directory, is flushed and
  fsynced, then replaces `path` (os.replace): a reader or a process killed at
  any moment sees the old file or the new one, never part of one. On non-local
  paths the file is written whole through tf.io.gfile.

  Non-finite floats (also numpy floats and 0-d arrays) become null; if there
  are any and `obj` is a dict, the key "nonfinite" lists them.

  Args:
    path: file to write; its directory is created if missing.
    obj: dicts (string keys), lists, tuples, strings, bools, None, Python or
      numpy numbers and numpy arrays.

  Returns:
    The dotted keys of the non-finite values (list indices count as keys,
    e.g. "losses.3"), [] when there are none.

  Raises:
    TypeError: naming the key of a value JSON cannot hold (nothing is written).
  """
  text, nonfinite = _encode(obj, indent=2)
  _atomic_write(path, (text + "\n").encode("utf-8"))
  return nonfinite


def read_json(path: str) -> Any:
  """The parsed JSON file at `path`.

  NaN and Infinity (written by other programs) are accepted.

  Raises:
    FileNotFoundError: when the file is absent.
    RunDirError: naming the file and what to do, when it is not valid JSON.
  """
  data = _read_bytes(path)
  try:
    return json.loads(data.decode("utf-8"))
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError.
    raise RunDirError(
        f"{path} is not valid JSON ({e}). A killed process or an editor may "
        "have cut it short: fix it by hand, restore it from a copy, or move "
        "it away (to start afresh, use another --workdir).") from e


def _is_row(obj: Any) -> bool:
  step = obj.get("step") if isinstance(obj, dict) else None
  return isinstance(step, int) and not isinstance(step, bool)


def _encode_row(row: Mapping[str, Any]) -> bytes:
  return (_encode(row)[0] + "\n").encode("utf-8")


def _parse_rows(path: str, data: bytes) -> List[dict]:
  """The valid rows of a JSON-lines file, warning about every other line."""
  lines = data.decode("utf-8", errors="replace").split("\n")
  # Every write ends its line: text after the last newline was cut short.
  torn = lines.pop()
  rows = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError:
      row = None
    if _is_row(row):
      rows.append(row)
    else:
      logging.warning(
          "%s:%d is not a JSON row with an int \"step\" (garbled by a killed "
          "process or an edit?); ignoring it: %.80r", path, number, line)
  if torn.strip():
    logging.warning(
        "The last line of %s has no newline (a write cut short by a killed "
        "process); ignoring it: %.80r", path, torn)
  return rows


# Locks this process holds: real workdir path -> [fd, number of holders].
_HELD_LOCKS: Dict[str, List[int]] = {}
_HELD_LOCKS_GUARD = threading.Lock()


def _describe_holder(fd: int, path: str) -> str:
  try:
    holder = json.loads(os.pread(fd, 1 << 16, 0).decode("utf-8"))
    command = shlex.join(str(a) for a in holder["argv"])
    return (f"pid {holder['pid']} on {holder['host']} since "
            f"{holder['since']}: {command}")
  except (OSError, ValueError, KeyError, TypeError):
    # The holder has just taken the lock and not written its details yet.
    return f"its details in {path} are not written yet"


class RunDir:
  """A run's workdir: its lock, metadata, metrics rows and paths.

  Write methods take the lock first (see `lock`). A `RunDir(writer=False)`,
  e.g. for a non-chief worker of a multi-worker run, never writes nor locks:
  its write methods do nothing, its read methods work.

  Attributes:
    workdir: the directory, as given.
    writer: whether this object writes.
  """

  def __init__(self, workdir: str, *, writer: bool = True):
    """Constructs the object; touches no file.

    Args:
      workdir: local directory or tf.io.gfile path; created by the first
        write.
      writer: False for a process that must not write the workdir.
    """
    self.workdir = os.fspath(workdir)
    self.writer = writer
    self._locked = False
    self._lock_key = None

  def path(self, *names: str) -> str:
    """`workdir` joined with `names`."""
    return os.path.join(self.workdir, *names)

  def lock(self) -> None:
    """Makes this process the workdir's only writer until `close` or exit.

    Creates the workdir if needed and takes an exclusive, non-blocking
    `fcntl.flock` on WORKDIR/.lock, which the kernel releases when the process
    ends, also by kill -9. The lock file records this process's pid, host,
    start time and command line for the message another process gets. Taking
    it again in the same process (this object or another on the same workdir)
    is a no-op; the lock is released when every holder has closed.

    Local file systems only (and NFS where it supports flock); other paths are
    not locked, with a warning.

    Raises:
      RunDirError: at once, when another process holds the lock.
    """
    if not self.writer or self._locked:
      return
    if not _is_local(self.workdir):
      logging.warning(
          "%s is not a local path, so it cannot be locked: make sure that no "
          "other process writes it.", self.workdir)
      self._locked = True
      return
    os.makedirs(self.workdir, exist_ok=True)
    key = os.path.realpath(self.workdir)
    path = os.path.join(key, LOCK_FILE)
    with _HELD_LOCKS_GUARD:
      if key in _HELD_LOCKS:
        _HELD_LOCKS[key][1] += 1
      else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
          holder = _describe_holder(fd, path)
          os.close(fd)
          raise RunDirError(
              f"{self.workdir} is in use by another process ({holder}). Wait "
              "for it to finish or use another --workdir.") from None
        except OSError as e:
          os.close(fd)
          raise RunDirError(
              f"Cannot lock {path}: {e}. The file system may not support "
              "locks; use a --workdir on a local disk.") from e
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "argv": list(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode("utf-8"), 0)
        _HELD_LOCKS[key] = [fd, 1]
    self._lock_key = key
    self._locked = True

  def close(self) -> None:
    """Releases this object's hold on the lock (if it has one)."""
    key, self._lock_key, self._locked = self._lock_key, None, False
    if key is None:
      return
    with _HELD_LOCKS_GUARD:
      held = _HELD_LOCKS[key]
      held[1] -= 1
      if held[1] == 0:
        del _HELD_LOCKS[key]
        # So that the next process's message never names a finished one.
        os.ftruncate(held[0], 0)
        fcntl.flock(held[0], fcntl.LOCK_UN)
        os.close(held[0])

  def __enter__(self) -> "RunDir":
    self.lock()
    return self

  def __exit__(self, *unused_exc_info) -> None:
    self.close()

  def read_metadata(self, name: str) -> Optional[Any]:
    """The JSON file `name` (e.g. "run.json"); None if it is absent.

    Raises:
      RunDirError: when it is not valid JSON.
    """
    try:
      return read_json(self.path(name))
    except FileNotFoundError:
      return None

  def check_fingerprint(self, name: str,
                        fingerprint: Mapping[str, Any]) -> Optional[dict]:
    """Checks that the workdir's run is the one `fingerprint` describes.

    Values are compared after a JSON round trip, so tuples equal lists and
    1 equals 1.0 (but not True).

    Args:
      name: the metadata file, e.g. "run.json".
      fingerprint: what makes a run this run (config, data, ...), as passed to
        `write_metadata`.

    Returns:
      None when the file is absent (a new run); else its content,
      {"fingerprint": ..., **extra}.

    Raises:
      FingerprintMismatch: listing every differing dotted key with both values
        and saying what to do.
      RunDirError: when the file is not valid JSON.
    """
    path = self.path(name)
    stored = self.read_metadata(name)
    if stored is None:
      return None
    if not (isinstance(stored, dict) and
            isinstance(stored.get("fingerprint"), dict)):
      raise FingerprintMismatch(
          f"{path} holds no run fingerprint: another program or an older "
          "version wrote it. Use another --workdir.")
    # Non-finite values were stored as null; compare them as such.
    now = _json_compatible(dict(fingerprint), "", [])
    differences = _differences(stored["fingerprint"], now)
    if not differences:
      return stored

    def show(value):
      return "absent" if value is ABSENT else json.dumps(value)

    lines = [f"  {key}: {show(old)} in {path}, {show(new)} now"
             for key, old, new in differences]
    raise FingerprintMismatch(
        f"{self.workdir} holds a different run than the one asked for:\n" +
        "\n".join(lines) + "\nUse another --workdir, or rerun with the "
        "settings of the run in it.", differences)

  def write_metadata(self, name: str, fingerprint: Mapping[str, Any],
                     **extra: Any) -> None:
    """Atomically writes {"fingerprint": fingerprint, **extra} to `name`."""
    if not self.writer:
      return
    self.lock()
    write_json(self.path(name), {"fingerprint": fingerprint, **extra})

  def append_row(self, name: str, row: Mapping[str, Any]) -> None:
    """Appends `row` as one JSON line to the file `name`.

    The line goes in one os.write on an O_APPEND file, so a killed process
    leaves whole lines, or at worst a torn last line that `read_rows` skips.
    Non-finite floats are written as null and listed under "nonfinite".

    Args:
      name: e.g. "metrics.jsonl".
      row: JSON values with an int "step".

    Raises:
      ValueError: when row has no int "step".
    """
    if not _is_row(_json_compatible(dict(row), "", [])):
      raise ValueError(f"A row needs an int \"step\", got {dict(row)!r}.")
    if not self.writer:
      return
    self.lock()
    line = _encode_row(row)
    path = self.path(name)
    if not _is_local(path):
      with tf.io.gfile.GFile(path, "ab") as f:
        f.write(line)
      return
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
      size = os.fstat(fd).st_size
      if size and os.pread(fd, 1, size - 1) != b"\n":
        # A torn line stays a line of its own instead of garbling this one.
        line = b"\n" + line
      _write_all(fd, line)
    finally:
      os.close(fd)

  def read_rows(self, name: str) -> List[dict]:
    """The rows of the JSON-lines file `name`, in file order.

    A torn last line and garbled lines are skipped with a warning naming the
    file (and line number); never an error.

    Returns:
      [] when the file is absent.
    """
    path = self.path(name)
    try:
      data = _read_bytes(path)
    except FileNotFoundError:
      return []
    return _parse_rows(path, data)

  def truncate_rows(self, name: str, last_step: int) -> None:
    """Keeps the rows of a run resumed from a checkpoint at `last_step`.

    Atomically rewrites the file with the valid rows of step <= last_step,
    sorted by step, one per step (the last one written); torn and garbled lines
    are dropped. Nothing is written when the file is absent or already so.
    """
    if not self.writer:
      return
    self.lock()
    path = self.path(name)
    try:
      data = _read_bytes(path)
    except FileNotFoundError:
      return
    kept = {}
    for row in _parse_rows(path, data):
      if row["step"] <= last_step:
        kept[row["step"]] = row
    clean = b"".join(_encode_row(kept[s]) for s in sorted(kept))
    if clean != data:
      logging.info("Keeping the %d rows of %s up to step %d.", len(kept), path,
                   last_step)
      _atomic_write(path, clean)


def _same(a: Any, b: Any) -> bool:
  """Equality of JSON values, where True is not 1."""
  if isinstance(a, bool) or isinstance(b, bool):
    return type(a) is type(b) and a == b
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    return a == b
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(map(_same, a, b))
  if isinstance(a, dict) and isinstance(b, dict):
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
  return type(a) is type(b) and a == b


def _differences(stored: Mapping[str, Any],
                 now: Mapping[str, Any]) -> List[Tuple[str, Any, Any]]:
  old, new = flatten(stored), flatten(now)
  keys = list(old) + [k for k in new if k not in old]
  return [(k, old.get(k, ABSENT), new.get(k, ABSENT)) for k in keys
          if not _same(old.get(k, ABSENT), new.get(k, ABSENT))]


@dataclasses.dataclass
class _Plan:
  """What `Checkpoints` found in a directory and would do about it."""
  # "missing", "garbled" or "valid": the state of the index file.
  index: str = "missing"
  # Checkpoint numbers the index lists, and its latest.
  registered: List[int] = dataclasses.field(default_factory=list)
  latest: Optional[int] = None
  # Whether the index names files in another directory (a moved workdir).
  foreign: bool = False
  # The newest complete checkpoint: the one to restore.
  target: Optional[int] = None
  # Numbers with any checkpoint file, and those whose files are complete.
  present: Set[int] = dataclasses.field(default_factory=set)
  complete: Set[int] = dataclasses.field(default_factory=set)
  # Names in the directory left by killed saves, with why.
  debris: List[Tuple[str, str]] = dataclasses.field(default_factory=list)


class Checkpoints:
  """Checkpoint save/restore that never starts afresh over unreadable ones.

  Checkpoints are `tf.train.CheckpointManager`'s: DIR/ckpt-N.index,
  DIR/ckpt-N.data-*-of-* and the index file DIR/checkpoint. `restore` trusts
  the files, not the index: it restores the newest complete checkpoint, repairs
  a missing, garbled or stale index, and moves what killed saves left into
  DIR/incomplete/. It deletes nothing. It is the writer's: use it under the
  workdir's lock (`RunDir.lock`). Readers (export, evaluation, sampling)
  restore with `restore_newest` or `restore_step`, which write nothing.
  """

  def __init__(self, checkpoint: tf.train.Checkpoint, directory: str, *,
               max_to_keep: int, save_directory: Optional[str] = None):
    """Constructs the object; touches no file.

    Args:
      checkpoint: what to save and restore.
      directory: the checkpoint directory to restore from.
      max_to_keep: checkpoints the manager keeps (it deletes older ones).
      save_directory: where saves go when not `directory` (a multi-worker
        non-chief saves into a scratch directory of its own but restores from
        the chief's). `directory` is then only read: its debris is not moved,
        its index not repaired, and a save may overwrite in the scratch one.

    Raises:
      ValueError: when max_to_keep is not a positive int.
    """
    if isinstance(max_to_keep, bool) or not (
        isinstance(max_to_keep, int) and max_to_keep > 0):
      raise ValueError(
          f"max_to_keep must be a positive int, got {max_to_keep!r}.")
    self._checkpoint = checkpoint
    self.directory = os.fspath(directory)
    self.save_directory = os.fspath(save_directory or directory)
    self.max_to_keep = max_to_keep
    self._writable = (os.path.normpath(self.save_directory) ==
                      os.path.normpath(self.directory))
    self._restored = False
    self._manager = None

  def _prefix(self, step: int, directory: Optional[str] = None) -> str:
    return os.path.join(directory or self.directory,
                        f"{CHECKPOINT_NAME}-{step}")

  def restore(self) -> int:
    """Restores the newest checkpoint; returns its number (N of ckpt-N).

    The newest checkpoint whose files are complete (its .index and every data
    shard) and whose index reads is restored with
    `assert_existing_objects_matched`. A missing or garbled index file (a
    garbled one is kept as checkpoint.garbled-<time>) is rebuilt from the
    complete checkpoints, and a complete checkpoint newer than the index's
    latest (a kill between writing it and updating the index) is registered.
    What a killed save left (ckpt-N_temp/, a ckpt-N without all its files,
    an unreadable ckpt-N.index the index does not list) is moved into
    DIR/incomplete/, so that a later save of N cannot collide with it.
    Repairs and moves happen after a successful restore, and only when
    saves go to `directory`.

    Returns:
      The checkpoint's number; 0 when the directory holds no checkpoint.

    Raises:
      RunDirError: naming the checkpoint, when it cannot be read or does not
        match `checkpoint`, or when the index lists it but its files are
        damaged. Nothing is changed on disk (the variables may be partly
        restored).
    """
    plan = _scan(self.directory)
    step = 0
    if plan.target is not None:
      _restore(self._checkpoint, self.directory, plan.target)
      step = plan.target
      logging.info("Restored %s.", self._prefix(step))
    if self._writable:
      _repair(self.directory, plan)
    self._restored = True
    return step

  def restore_step(self, step: int) -> None:
    """Restores exactly ckpt-<step>; moves and repairs nothing (`restore_step`)."""
    restore_step(self._checkpoint, self.directory, step)

  def latest_step(self) -> Optional[int]:
    """The number `restore` would restore, None if none; reads only.

    Raises:
      RunDirError: as `restore`, for a damaged checkpoint the index lists.
    """
    return latest_step(self.directory)

  def save(self, step: int) -> str:
    """Saves `checkpoint` as ckpt-<step> in the save directory.

    Through a `tf.train.CheckpointManager(max_to_keep)`, created at the first
    save (after `restore`, which repairs the index it reads; without a
    `restore`, the first save repairs it).

    Returns:
      The checkpoint's path prefix.

    Raises:
      ValueError: when step is not an int >= 0.
      RunDirError: when ckpt-<step> exists in `directory` (never overwritten).
    """
    if isinstance(step, bool) or not (isinstance(step, int) and step >= 0):
      raise ValueError(f"step must be an int >= 0, got {step!r}.")
    step_variable = getattr(self._checkpoint, "step", None)
    if isinstance(step_variable, tf.Variable):
      # The step in the checkpoint itself, not only in its file name.
      step_variable.assign(step)
    if self._manager is None:
      if self._writable and not self._restored:
        _repair(self.directory, _scan(self.directory))
      self._manager = tf.train.CheckpointManager(
          self._checkpoint, self.save_directory, max_to_keep=self.max_to_keep,
          checkpoint_name=CHECKPOINT_NAME)
    prefix = self._prefix(step, self.save_directory)
    if self._writable:
      existing = tf.io.gfile.glob(prefix + ".*") + tf.io.gfile.glob(
          prefix + "_temp*")
      if existing:
        raise RunDirError(
            f"Checkpoint {prefix} exists already ({sorted(existing)}); "
            "refusing to overwrite it. Call restore() before saving (it "
            "resumes from the newest checkpoint), or move it away.")
    return self._manager.save(checkpoint_number=step)



def latest_step(directory: str) -> Optional[int]:
  """The N of the newest complete ckpt-N in `directory`, None if none.

  Reads only: as `restore_newest`, it trusts the files, not the index.

  Raises:
    RunDirError: when the newest checkpoint the index lists is damaged.
  """
  return _scan(os.fspath(directory)).target


def restore_newest(checkpoint: tf.train.Checkpoint, directory: str) -> int:
  """Restores the newest complete checkpoint of `directory`, for a reader.

  What export, evaluation, sampling and a prior use: it writes nothing, takes
  no lock and works on a read-only workdir. The checkpoint is chosen from the
  files alone, as `Checkpoints.restore` chooses it, so a missing, garbled or
  stale index and what a killed or running save left (ckpt-N_temp/, a ckpt-N
  without all its files) are skipped, never repaired nor moved: that is the
  writer's job, under its lock, and a trainer saving at this moment keeps
  its files.

  Returns:
    The checkpoint's number N (of ckpt-N); 0 when there is none.

  Raises:
    RunDirError: as `Checkpoints.restore`.
  """
  directory = os.fspath(directory)
  step = latest_step(directory)
  if step is None:
    return 0
  _restore(checkpoint, directory, step)
  logging.info("Restored %s (read only).",
               os.path.join(directory, f"{CHECKPOINT_NAME}-{step}"))
  return step


def restore_step(checkpoint: tf.train.Checkpoint, directory: str,
                 step: int) -> None:
  """Restores exactly ckpt-<step> of `directory`; writes nothing.

  Raises:
    RunDirError: when it is absent, incomplete, unreadable or does not match
      `checkpoint`.
  """
  directory = os.fspath(directory)
  names = _listdir(directory)
  problem = _files_problem(step, *_checkpoint_files(names))
  if problem:
    raise RunDirError(
        f"Cannot restore checkpoint "
        f"{os.path.join(directory, f'{CHECKPOINT_NAME}-{step}')}: {problem}. "
        f"Pass the N of a complete ckpt-N in {directory}, or restore the "
        "newest.")
  _restore(checkpoint, directory, step)


def _restore(checkpoint: tf.train.Checkpoint, directory: str,
             step: int) -> None:
  prefix = os.path.join(directory, f"{CHECKPOINT_NAME}-{step}")
  try:
    checkpoint.restore(prefix).assert_existing_objects_matched()
  # The reader raises IndexError for truncated files, OpError for damaged
  # ones; a model mismatch is a ValueError or AssertionError.
  except (tf.errors.OpError, ValueError, AssertionError, IndexError,
          TypeError, KeyError) as e:
    raise RunDirError(
        f"Cannot restore checkpoint {prefix}: {type(e).__name__}: {e}\nIt "
        "is corrupt or was written by a different model or config. Nothing "
        f"was changed; move it away ({prefix}.*) or use another --workdir "
        "to start afresh.") from e


def _listdir(directory: str) -> List[str]:
  if not tf.io.gfile.isdir(directory):
    return []
  # Object stores list subdirectories with a trailing slash.
  return [name.rstrip("/") for name in tf.io.gfile.listdir(directory)]


def _checkpoint_files(
    names: Sequence[str]) -> Tuple[Set[int], Dict[int, Set[Tuple[int, int]]]]:
  """(numbers with an .index file, {number: {(shard, num_shards)}})."""
  indexed, shards = set(), {}
  for name in names:
    match = _CHECKPOINT_FILE.match(name)
    if match and match[2] is None:
      indexed.add(int(match[1]))
    elif match:
      shards.setdefault(int(match[1]), set()).add(
          (int(match[2]), int(match[3])))
  return indexed, shards


def _files_problem(step: int, indexed: Set[int],
                   shards: Dict[int, Set[Tuple[int, int]]]) -> Optional[str]:
  """Why ckpt-<step>'s files are incomplete; None when they are complete."""
  if step not in indexed and step not in shards:
    return "it does not exist"
  if step not in indexed:
    return "its .index file is missing"
  if step not in shards:
    return "its data file is missing"
  totals = {total for _, total in shards[step]}
  if len(totals) > 1:
    return f"its data files disagree on their number ({sorted(totals)})"
  total = totals.pop()
  missing = sorted(set(range(total)) - {i for i, _ in shards[step]})
  if missing:
    return f"data shard(s) {missing} of {total} are missing"
  return None


def _read_index(directory: str, plan: _Plan) -> None:
  """Fills plan.index, registered, latest and foreign from the index file."""
  if not tf.io.gfile.exists(os.path.join(directory, INDEX_FILE)):
    return
  plan.index = "garbled"
  try:
    state = tf.train.get_checkpoint_state(directory)
  # A readable index without a latest checkpoint is a ValueError, undecodable
  # bytes a UnicodeDecodeError (also a ValueError).
  except (ValueError, tf.errors.OpError):
    state = None
  if state is None:
    return
  paths = [state.model_checkpoint_path, *state.all_model_checkpoint_paths]
  matches = [_INDEX_ENTRY.match(os.path.basename(p)) for p in paths]
  if not all(matches):
    return  # Not written by a manager with our checkpoint name.
  numbers = [int(m[1]) for m in matches]
  plan.index = "valid"
  plan.latest = numbers[0]
  plan.registered = sorted(set(numbers))
  plan.foreign = any(
      os.path.normpath(os.path.dirname(p)) != os.path.normpath(directory)
      for p in paths)


def _scan(directory: str) -> _Plan:
  """Finds the checkpoint to restore and the debris; changes nothing.

  Raises:
    RunDirError: when the newest checkpoint the index lists is damaged.
  """
  plan = _Plan()
  names = _listdir(directory)
  _read_index(directory, plan)
  indexed, shards = _checkpoint_files(names)
  plan.present = indexed | set(shards)
  plan.complete = {n for n in plan.present
                   if _files_problem(n, indexed, shards) is None}
  plan.debris = [(name, "the temporary files of a killed save")
                 for name in names
                 if _CHECKPOINT_TEMP.match(name) or _INDEX_TEMP.match(name)]
  for step in sorted(plan.present, reverse=True):
    prefix = os.path.join(directory, f"{CHECKPOINT_NAME}-{step}")
    problem = _files_problem(step, indexed, shards)
    if problem is None:
      try:
        tf.train.load_checkpoint(prefix)
      # The reader raises OpError subclasses (DataLoss, ...) for bad indexes.
      except (tf.errors.OpError, ValueError) as e:
        problem = f"its .index file cannot be read ({str(e).splitlines()[0]})"
    if problem is None:
      plan.target = step
      break
    if plan.index == "valid" and step in plan.registered:
      # The index lists a checkpoint only once it is complete.
      raise RunDirError(
          f"Checkpoint {prefix} cannot be restored: {problem}. "
          f"{os.path.join(directory, INDEX_FILE)} lists it as saved, so it "
          "was damaged after its save. Nothing was changed; move its files "
          f"({prefix}.*) away to resume from the checkpoint before it, or use "
          "another --workdir to start afresh.")
    # Unlisted: a save killed before it could be listed.
    plan.debris.extend((name, problem) for name in names
                       if name.startswith(f"{CHECKPOINT_NAME}-{step}.") and
                       _CHECKPOINT_FILE.match(name))
  return plan


def _free_path(path: str) -> str:
  """`path`, or `path.1`, `path.2`, ... if it exists."""
  candidate, count = path, 0
  while tf.io.gfile.exists(candidate):
    count += 1
    candidate = f"{path}.{count}"
  return candidate


def _mtime(directory: str, step: int) -> float:
  times = [tf.io.gfile.stat(path).mtime_nsec / 1e9
           for path in tf.io.gfile.glob(
               os.path.join(directory, f"{CHECKPOINT_NAME}-{step}.*"))]
  return max(times, default=time.time())


def _repair(directory: str, plan: _Plan) -> None:
  """Moves plan.debris into incomplete/ and makes the index match the files."""
  if plan.debris:
    destination = os.path.join(directory, INCOMPLETE_DIR)
    tf.io.gfile.makedirs(destination)
    for name, why in plan.debris:
      moved = _free_path(os.path.join(destination, name))
      tf.io.gfile.rename(os.path.join(directory, name), moved)
      logging.warning("Moved %s to %s: %s.", os.path.join(directory, name),
                      moved, why)
  index_path = os.path.join(directory, INDEX_FILE)
  if plan.index == "garbled":
    kept = _free_path(f"{index_path}.garbled-{time.strftime('%Y%m%d-%H%M%S')}")
    tf.io.gfile.rename(index_path, kept)
    logging.warning("%s was garbled; kept it as %s.", index_path, kept)
  if plan.target is None:
    return
  if plan.index == "valid":
    # Listed checkpoints with files left stay, for the manager to delete.
    steps = {n for n in plan.registered if n in plan.present}
    steps.add(plan.target)
    steps = sorted(n for n in steps if n <= plan.target)
    if (steps == plan.registered and plan.latest == plan.target and
        not plan.foreign):
      return
    logging.warning(
        "%s listed %s (latest %s), the directory holds %s complete: listing "
        "%s.", index_path, plan.registered, plan.latest,
        sorted(plan.complete), steps)
  else:
    steps = sorted(n for n in plan.complete if n <= plan.target)
    logging.warning("Rebuilt the missing or garbled %s from the checkpoints "
                    "found: %s.", index_path, steps)
  _write_index(directory, steps, plan.target)


def _write_index(directory: str, steps: Sequence[int], latest: int) -> None:
  """Writes tf.train.CheckpointManager's index (a CheckpointState text proto).

  Relative names, as the manager writes them, keep a moved workdir working.
  The checkpoints' file times stand for their save times; all are newer than
  the last preserved time, so that the manager keeps only `max_to_keep`.
  """
  times = [_mtime(directory, n) for n in steps]
  lines = [f'model_checkpoint_path: "{CHECKPOINT_NAME}-{latest}"']
  lines += [f'all_model_checkpoint_paths: "{CHECKPOINT_NAME}-{n}"'
            for n in steps]
  lines += [f"all_model_checkpoint_timestamps: {t!r}" for t in times]
  lines.append(f"last_preserved_timestamp: {min(times) - 1.0!r}")
  _atomic_write(os.path.join(directory, INDEX_FILE),
                ("\n".join(lines) + "\n").encode("utf-8"))
