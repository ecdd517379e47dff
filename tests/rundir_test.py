"""Tests for sonnet_vqvae.rundir: atomic files, lock, checkpoint recovery."""

import contextlib
import fcntl
import glob
import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf
# The op a save renames its temporary shards with: a test pauses it there.
from tensorflow.python.ops import gen_io_ops

from sonnet_vqvae import rundir
import warm_cli

# Holds a workdir's lock with RunDir until killed.
_HOLDER = """
import sys, time
from sonnet_vqvae import rundir
rundir.RunDir(sys.argv[1]).lock()
print("locked", flush=True)
time.sleep(600)
"""

# Holds the lock file the way RunDir does, without importing TensorFlow.
_RAW_HOLDER = """
import fcntl, json, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, json.dumps({"pid": os.getpid(), "host": "hostx",
                         "since": "2024-01-02 03:04:05", "argv": sys.argv}
                        ).encode())
print("locked", flush=True)
time.sleep(600)
"""

# Saves checkpoints of ever larger steps (values = step) until killed.
_SAVER = """
import sys
import tensorflow as tf
from sonnet_vqvae import rundir
v = tf.Variable(tf.zeros([1 << 18]))
w = tf.Variable(0, dtype=tf.int64)
checkpoints = rundir.Checkpoints(tf.train.Checkpoint(v=v, w=w), sys.argv[1],
                                 max_to_keep=1000)
step = checkpoints.restore()
print("restored", step, flush=True)
while True:
  step += 1
  v.assign(tf.fill([1 << 18], float(step)))
  w.assign(step)
  checkpoints.save(step)
  print("saved", step, flush=True)
"""


def _env():
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  env["PYTHONPATH"] = os.pathsep.join(
      [os.getcwd(), env.get("PYTHONPATH", "")])
  return env


def _contents(directory):
  """{relative path: bytes} of every file under directory."""
  contents = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        contents[os.path.relpath(path, directory)] = f.read()
  return contents


def _state(directory):
  """{relative path: (mode bits, mtime_ns, sha256 or None)} of the whole tree.

  Tests may run as root, where a read-only mode does not stop writes: this
  listing before and after a reader shows that it changed nothing.
  """
  state = {}
  for root, dirs, names in os.walk(directory):
    for name in dirs + names:
      path = os.path.join(root, name)
      info = os.stat(path)
      content = None
      if name in names:
        with open(path, "rb") as f:
          content = hashlib.sha256(f.read()).hexdigest()
      state[os.path.relpath(path, directory)] = (info.st_mode, info.st_mtime_ns,
                                                 content)
  return state


def read_only(test, directory):
  """chmod -R a-w `directory` until the test ends."""
  modes = {}
  for root, dirs, names in os.walk(directory):
    for path in [root] + [os.path.join(root, n) for n in names]:
      modes[path] = os.stat(path).st_mode
      os.chmod(path, modes[path] & ~0o222)

  def restore():
    for path, mode in modes.items():
      with contextlib.suppress(FileNotFoundError):  # Moved by a failed test.
        os.chmod(path, mode)

  test.addCleanup(restore)


def _reject_constant(name):
  raise ValueError(f"invalid JSON constant {name}")


def _strict_loads(text):
  return json.loads(text, parse_constant=_reject_constant)


def _is_locked(workdir):
  """Whether some open file holds the workdir's flock (also this process)."""
  fd = os.open(os.path.join(workdir, rundir.LOCK_FILE), os.O_RDWR)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    return True
  finally:
    os.close(fd)  # Also releases a lock taken here.
  return False


class JsonTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()
    self.path = os.path.join(self.dir, "sub", "run.json")

  def test_writes_indented_json_of_numpy_values(self):
    obj = {"a": np.float32(0.5), "b": (1, np.int64(2)), "c": np.array(3.0),
           "d": np.arange(2), "e": {"f": None, "g": True, "h": "x"}}
    self.assertEqual(rundir.write_json(self.path, obj), [])
    with open(self.path) as f:
      text = f.read()
    self.assertTrue(text.endswith("}\n"))
    self.assertIn('\n  "a": 0.5', text)
    self.assertEqual(_strict_loads(text),
                     {"a": 0.5, "b": [1, 2], "c": 3.0, "d": [0, 1],
                      "e": {"f": None, "g": True, "h": "x"}})
    self.assertEqual(rundir.read_json(self.path), _strict_loads(text))

  def test_nonfinite_values_become_null_and_are_listed(self):
    obj = {"a": math.nan, "b": {"c": np.float32(np.inf), "d": [1.0, -np.inf]},
           "e": np.array(np.nan), "f": 2.0}
    keys = rundir.write_json(self.path, obj)
    self.assertEqual(keys, ["a", "b.c", "b.d.1", "e"])
    with open(self.path) as f:
      loaded = _strict_loads(f.read())
    self.assertEqual(loaded, {"a": None, "b": {"c": None, "d": [1.0, None]},
                              "e": None, "f": 2.0, "nonfinite": keys})

  def test_nonfinite_list_is_not_a_dict_key(self):
    self.assertEqual(rundir.write_json(self.path, [1.0, math.nan]), ["1"])
    self.assertEqual(rundir.read_json(self.path), [1.0, None])

  def test_crash_before_the_replace_leaves_the_old_file_and_no_temp(self):
    rundir.write_json(self.path, {"version": 1})
    with open(self.path, "rb") as f:
      old = f.read()
    with mock.patch.object(os, "replace", side_effect=OSError("disk full")):
      with self.assertRaisesRegex(OSError, "disk full"):
        rundir.write_json(self.path, {"version": 2})
    with open(self.path, "rb") as f:
      self.assertEqual(f.read(), old)
    self.assertEqual(os.listdir(os.path.dirname(self.path)), ["run.json"])

  def test_crash_while_writing_leaves_the_old_file_and_no_temp(self):
    rundir.write_json(self.path, {"version": 1})
    with mock.patch.object(os, "fsync", side_effect=OSError("I/O error")):
      with self.assertRaises(OSError):
        rundir.write_json(self.path, {"version": 2})
    self.assertEqual(rundir.read_json(self.path), {"version": 1})
    self.assertEqual(os.listdir(os.path.dirname(self.path)), ["run.json"])

  def test_unserializable_value_is_named_and_nothing_is_written(self):
    with self.assertRaisesRegex(TypeError, r"a\.b is a object"):
      rundir.write_json(self.path, {"a": {"b": object()}})
    self.assertFalse(os.path.exists(self.path))

  def test_read_json_names_the_invalid_file(self):
    os.makedirs(os.path.dirname(self.path))
    with open(self.path, "w") as f:
      f.write('{"config": {"lr": 0.1,')
    with self.assertRaises(rundir.RunDirError) as raised:
      rundir.read_json(self.path)
    self.assertIn(self.path, str(raised.exception))
    self.assertIn("not valid JSON", str(raised.exception))
    self.assertIn("move it away", str(raised.exception))

  def test_read_json_of_absent_file(self):
    with self.assertRaises(FileNotFoundError):
      rundir.read_json(self.path)

  def test_flatten(self):
    self.assertEqual(
        rundir.flatten({"model": {"k": 512, "sub": {"x": [1]}}, "e": {},
                        "s": 1}),
        {"model.k": 512, "model.sub.x": [1], "e": {}, "s": 1})
    self.assertEqual(rundir.flatten({"k": 1}, "model"), {"model.k": 1})


class LockTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = os.path.join(tempfile.mkdtemp(), "run")

  def _start(self, script, warm=False):
    """A process holding the lock: fresh, or from warm_cli (imports TF)."""
    if warm:
      holder = warm_cli.start(["-c", script, self.workdir],
                              env=warm_cli.environment())
    else:
      holder = subprocess.Popen(
          [sys.executable, "-c", script, self.workdir], env=_env(),
          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    self.addCleanup(holder.wait)
    self.addCleanup(holder.kill)
    line = holder.readline() if warm else holder.stdout.readline()
    self.assertEqual(line.strip(), "locked")
    return holder

  def _assert_refused_then_taken_after_kill(self, holder):
    run = rundir.RunDir(self.workdir)
    start = time.monotonic()
    with self.assertRaises(rundir.RunDirError) as raised:
      run.lock()
    self.assertLess(time.monotonic() - start, 1.0)  # Does not wait.
    message = str(raised.exception)
    self.assertIn(f"{self.workdir} is in use by another process "
                  f"(pid {holder.pid} on ", message)
    self.assertIn("Wait for it to finish or use another --workdir.", message)
    # Nothing is written by a refused process.
    with self.assertRaises(rundir.RunDirError):
      run.append_row("metrics.jsonl", {"step": 1})
    self.assertFalse(os.path.exists(run.path("metrics.jsonl")))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    run.lock()
    self.assertTrue(_is_locked(self.workdir))
    run.close()
    self.assertFalse(_is_locked(self.workdir))

  def test_another_process_is_refused_at_once_until_the_holder_is_killed(self):
    os.makedirs(self.workdir)
    holder = self._start(_RAW_HOLDER)
    self._assert_refused_then_taken_after_kill(holder)

  @pytest.mark.slow
  def test_a_rundir_in_another_process_holds_the_lock(self):
    holder = self._start(_HOLDER, warm=True)
    with open(os.path.join(self.workdir, rundir.LOCK_FILE)) as f:
      details = json.load(f)
    self.assertEqual(details["pid"], holder.pid)
    self.assertEqual(details["argv"], ["-c", self.workdir])
    self._assert_refused_then_taken_after_kill(holder)

  def test_reentrant_within_a_process(self):
    first = rundir.RunDir(self.workdir)
    first.lock()
    first.lock()
    second = rundir.RunDir(self.workdir)
    second.lock()
    first.close()
    self.assertTrue(_is_locked(self.workdir))
    second.close()
    self.assertFalse(_is_locked(self.workdir))

  def test_context_manager_locks_and_releases(self):
    with rundir.RunDir(self.workdir) as run:
      self.assertTrue(_is_locked(run.workdir))
    self.assertFalse(_is_locked(self.workdir))

  def test_writes_take_the_lock(self):
    run = rundir.RunDir(self.workdir)
    run.write_metadata("run.json", {"a": 1})
    self.assertTrue(_is_locked(self.workdir))
    run.close()

  def test_reader_neither_locks_nor_writes(self):
    reader = rundir.RunDir(self.workdir, writer=False)
    with reader:
      reader.write_metadata("run.json", {"a": 1})
      reader.append_row("metrics.jsonl", {"step": 1})
      reader.truncate_rows("metrics.jsonl", 0)
    self.assertFalse(os.path.exists(self.workdir))
    with rundir.RunDir(self.workdir) as writer:
      writer.write_metadata("run.json", {"a": 1})
      writer.append_row("metrics.jsonl", {"step": 1})
      # A reader works while the writer holds the lock.
      self.assertEqual(reader.read_metadata("run.json"),
                       {"fingerprint": {"a": 1}})
      self.assertEqual(reader.read_rows("metrics.jsonl"), [{"step": 1}])
      reader.truncate_rows("metrics.jsonl", 0)
    self.assertEqual(reader.read_rows("metrics.jsonl"), [{"step": 1}])


class FingerprintTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.run = rundir.RunDir(tempfile.mkdtemp())
    self.addCleanup(self.run.close)
    self.file = self.run.path("run.json")

  def test_absent_file(self):
    self.assertIsNone(self.run.read_metadata("run.json"))
    self.assertIsNone(self.run.check_fingerprint("run.json", {"a": 1}))

  def test_match_after_a_json_round_trip(self):
    self.run.write_metadata(
        "run.json", {"model": {"channels": (16, 32), "lr": 1, "x": math.nan}},
        data_variance=np.float64(0.06))
    stored = self.run.check_fingerprint(
        "run.json",
        {"model": {"channels": [16, 32], "lr": 1.0, "x": float("nan")}})
    self.assertEqual(stored["data_variance"], 0.06)
    self.assertEqual(stored["nonfinite"], ["fingerprint.model.x"])
    self.assertEqual(stored["fingerprint"]["model"]["channels"], [16, 32])

  def test_mismatch_lists_every_difference(self):
    self.run.write_metadata(
        "run.json", {"model": {"num_embeddings": 512, "dim": 64}, "seed": 1,
                     "old": True, "flag": True, "name": "a"})
    with self.assertRaises(rundir.FingerprintMismatch) as raised:
      self.run.check_fingerprint(
          "run.json", {"model": {"num_embeddings": 16, "dim": 64}, "seed": 2,
                       "flag": 1, "name": "a", "new": "x"})
    message = str(raised.exception)
    for line in (f"model.num_embeddings: 512 in {self.file}, 16 now",
                 f"seed: 1 in {self.file}, 2 now",
                 f"old: true in {self.file}, absent now",
                 f"flag: true in {self.file}, 1 now",
                 f'new: absent in {self.file}, "x" now'):
      self.assertIn(line, message)
    self.assertNotIn("dim", message)
    self.assertNotIn("name", message)
    self.assertIn("use another --workdir, or rerun with the settings of the "
                  "run in it", message.lower())
    self.assertLen(raised.exception.differences, 5)
    self.assertIsInstance(raised.exception, rundir.RunDirError)

  def test_file_without_fingerprint(self):
    rundir.write_json(self.file, {"config": {}, "data_variance": 0.1})
    with self.assertRaisesRegex(rundir.FingerprintMismatch, "no run finger"):
      self.run.check_fingerprint("run.json", {})


class RowsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.run = rundir.RunDir(tempfile.mkdtemp())
    self.addCleanup(self.run.close)
    self.file = self.run.path("metrics.jsonl")

  def _text(self):
    with open(self.file) as f:
      return f.read()

  def _append_bytes(self, data):
    with open(self.file, "ab") as f:
      f.write(data)

  def test_each_row_is_one_write_of_one_line(self):
    writes = []
    real_write = os.write

    def recording_write(fd, data):
      writes.append(bytes(data))
      return real_write(fd, data)

    with mock.patch.object(os, "write", recording_write):
      for step in (1, 2, 3):
        self.run.append_row("metrics.jsonl", {"step": step, "loss": step / 2})
    self.assertLen(writes, 3)
    for data in writes:
      self.assertEqual(data.count(b"\n"), 1)
      self.assertTrue(data.endswith(b"\n"))
    self.assertEqual(self._text().splitlines(), [
        '{"step": 1, "loss": 0.5}', '{"step": 2, "loss": 1.0}',
        '{"step": 3, "loss": 1.5}'])
    self.assertEqual(self.run.read_rows("metrics.jsonl"),
                     [{"step": s, "loss": s / 2} for s in (1, 2, 3)])

  def test_nonfinite_values_are_null_and_listed(self):
    self.run.append_row("metrics.jsonl",
                        {"step": np.int64(4), "loss": np.float32(np.nan)})
    self.assertEqual(_strict_loads(self._text()),
                     {"step": 4, "loss": None, "nonfinite": ["loss"]})

  def test_row_needs_an_int_step(self):
    for row in ({"loss": 1.0}, {"step": 1.0}, {"step": True}):
      with self.assertRaisesRegex(ValueError, "int \"step\""):
        self.run.append_row("metrics.jsonl", row)
    self.assertFalse(os.path.exists(self.file))

  def test_absent_file_has_no_rows(self):
    self.assertEqual(self.run.read_rows("metrics.jsonl"), [])

  def test_torn_last_line_is_ignored_with_a_warning(self):
    self.run.append_row("metrics.jsonl", {"step": 1})
    self.run.append_row("metrics.jsonl", {"step": 2})
    self._append_bytes(b'{"step": 3, "lo')
    with self.assertLogs("absl", "WARNING") as logs:
      self.assertEqual(self.run.read_rows("metrics.jsonl"),
                       [{"step": 1}, {"step": 2}])
    self.assertIn(self.file, logs.output[0])
    self.assertIn("no newline", logs.output[0])

  def test_garbled_middle_line_is_ignored_with_its_line_number(self):
    self.run.append_row("metrics.jsonl", {"step": 1})
    self._append_bytes(b'{"step": 2, "lo\n[1, 2]\n')
    self.run.append_row("metrics.jsonl", {"step": 3})
    with self.assertLogs("absl", "WARNING") as logs:
      self.assertEqual(self.run.read_rows("metrics.jsonl"),
                       [{"step": 1}, {"step": 3}])
    self.assertLen(logs.output, 2)
    self.assertIn(f"{self.file}:2 ", logs.output[0])
    self.assertIn(f"{self.file}:3 ", logs.output[1])

  def test_append_after_a_torn_line_starts_a_new_line(self):
    self.run.append_row("metrics.jsonl", {"step": 1})
    self._append_bytes(b'{"step": 2, "lo')
    self.run.append_row("metrics.jsonl", {"step": 2})
    with self.assertLogs("absl", "WARNING"):
      rows = self.run.read_rows("metrics.jsonl")
    self.assertEqual(rows, [{"step": 1}, {"step": 2}])

  def test_truncate_after_resume_dedupes_and_drops_later_steps(self):
    # A run logged 2..6 and was killed mid-row; its checkpoint is at 4. Then
    # an older version resumed without truncating and logged 4 again.
    for step in (2, 4, 6):
      self.run.append_row("metrics.jsonl", {"step": step, "run": 1})
    self._append_bytes(b'{"step": 8, "r')
    self.run.append_row("metrics.jsonl", {"step": 4, "run": 2})
    self.run.append_row("metrics.jsonl", {"step": 6, "run": 2})
    with self.assertLogs("absl", "WARNING"):
      self.run.truncate_rows("metrics.jsonl", 4)
    self.assertEqual(self._text(),
                     '{"step": 2, "run": 1}\n{"step": 4, "run": 2}\n')
    self.assertCountEqual(os.listdir(self.run.workdir),
                          [rundir.LOCK_FILE, "metrics.jsonl"])

  def test_truncate_sorts_steps(self):
    for step in (3, 1, 2):
      self.run.append_row("metrics.jsonl", {"step": step})
    self.run.truncate_rows("metrics.jsonl", 5)
    self.assertEqual([r["step"] for r in self.run.read_rows("metrics.jsonl")],
                     [1, 2, 3])

  def test_truncate_leaves_a_clean_file_alone(self):
    for step in (1, 2):
      self.run.append_row("metrics.jsonl",
                          {"step": step, "x": [0.1, "é"], "y": math.inf})
    before = os.stat(self.file)
    self.run.truncate_rows("metrics.jsonl", 2)
    after = os.stat(self.file)
    self.assertEqual((before.st_ino, before.st_mtime_ns),
                     (after.st_ino, after.st_mtime_ns))

  def test_truncate_of_absent_file_writes_nothing(self):
    self.run.truncate_rows("metrics.jsonl", 3)
    self.assertFalse(os.path.exists(self.file))

  def test_truncate_rewrites_nan_of_older_files_as_null(self):
    self._append_bytes(b'{"step": 1, "loss": NaN}\n')
    self.run.truncate_rows("metrics.jsonl", 1)
    self.assertEqual(_strict_loads(self._text()),
                     {"step": 1, "loss": None, "nonfinite": ["loss"]})


def _tiny_checkpoint(value=0.0, size=3, extra=False):
  checkpoint = tf.train.Checkpoint(
      v=tf.Variable(tf.fill([size], float(value))),
      w=tf.Variable(int(value), dtype=tf.int64))
  if extra:
    checkpoint.extra = tf.Variable(1.0)
  return checkpoint


def _assign(checkpoint, value):
  checkpoint.v.assign(tf.fill(checkpoint.v.shape, float(value)))
  checkpoint.w.assign(int(value))


def _values(checkpoint):
  return checkpoint.v.numpy().tolist(), int(checkpoint.w.numpy())


class CheckpointsTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = os.path.join(tempfile.mkdtemp(), "checkpoints")

  def _save(self, *steps, max_to_keep=10):
    """Saves ckpt-<step> holding values `step` for each step."""
    checkpoint = _tiny_checkpoint()
    checkpoints = rundir.Checkpoints(checkpoint, self.dir,
                                     max_to_keep=max_to_keep)
    checkpoints.restore()
    for step in steps:
      _assign(checkpoint, step)
      checkpoints.save(step)

  def _restore(self, max_to_keep=10, **kwargs):
    """(step, values) restored by a fresh Checkpoints, and the object."""
    checkpoint = _tiny_checkpoint(**kwargs)
    checkpoints = rundir.Checkpoints(checkpoint, self.dir,
                                     max_to_keep=max_to_keep)
    step = checkpoints.restore()
    return step, _values(checkpoint), checkpoints

  def _listed(self):
    state = tf.train.get_checkpoint_state(self.dir)
    return ([os.path.basename(p) for p in state.all_model_checkpoint_paths],
            os.path.basename(state.model_checkpoint_path))

  def _index_path(self):
    return os.path.join(self.dir, rundir.INDEX_FILE)

  def test_empty_directory_restores_step_zero(self):
    step, values, checkpoints = self._restore()
    self.assertEqual((step, values), (0, ([0.0] * 3, 0)))
    self.assertIsNone(checkpoints.latest_step())
    self.assertFalse(os.path.exists(self.dir))

  def test_restores_the_newest(self):
    self._save(1, 2, 3)
    step, values, checkpoints = self._restore()
    self.assertEqual((step, values), (3, ([3.0] * 3, 3)))
    self.assertEqual(checkpoints.latest_step(), 3)

  def test_deleted_index_is_rebuilt_and_the_newest_restored(self):
    self._save(1, 2, 3)
    os.remove(self._index_path())
    with self.assertLogs("absl", "WARNING") as logs:
      step, values, _ = self._restore()
    self.assertEqual((step, values), (3, ([3.0] * 3, 3)))
    self.assertIn("Rebuilt", "\n".join(logs.output))
    self.assertEqual(self._listed(), (["ckpt-1", "ckpt-2", "ckpt-3"], "ckpt-3"))

  @parameterized.named_parameters(
      ("binary", b"\x00\xff garbage {"), ("empty", b""),
      ("cut_short", b'model_checkpoint_path: "ckpt-'),
      ("no_latest", b'all_model_checkpoint_paths: "ckpt-1"\n'),
      ("foreign_names", b'model_checkpoint_path: "model.ckpt-3"\n'))
  def test_garbled_index_is_kept_and_rebuilt(self, garbage):
    self._save(1, 2, 3)
    with open(self._index_path(), "wb") as f:
      f.write(garbage)
    with self.assertLogs("absl", "WARNING"):
      step, values, _ = self._restore()
    self.assertEqual((step, values), (3, ([3.0] * 3, 3)))
    kept = glob.glob(self._index_path() + ".garbled-*")
    self.assertLen(kept, 1)
    with open(kept[0], "rb") as f:
      self.assertEqual(f.read(), garbage)
    self.assertEqual(self._listed(), (["ckpt-1", "ckpt-2", "ckpt-3"], "ckpt-3"))

  def test_complete_checkpoint_newer_than_the_index_is_used_and_listed(self):
    self._save(1, 2)
    # A kill between writing ckpt-3 and listing it in the index.
    checkpoint = _tiny_checkpoint(3.0)
    checkpoint.save_counter.assign(3)  # As the manager's saves hold it.
    checkpoint.write(os.path.join(self.dir, "ckpt-3"))
    self.assertEqual(self._listed()[1], "ckpt-2")
    with self.assertLogs("absl", "WARNING"):
      step, values, _ = self._restore()
    self.assertEqual((step, values), (3, ([3.0] * 3, 3)))
    self.assertEqual(self._listed(), (["ckpt-1", "ckpt-2", "ckpt-3"], "ckpt-3"))

  def test_latest_checkpoint_deleted_by_hand_resumes_from_the_one_before(self):
    self._save(1, 2, 3)
    for path in glob.glob(os.path.join(self.dir, "ckpt-3.*")):
      os.remove(path)
    with self.assertLogs("absl", "WARNING"):
      step, values, _ = self._restore()
    self.assertEqual((step, values), (2, ([2.0] * 3, 2)))
    self.assertEqual(self._listed(), (["ckpt-1", "ckpt-2"], "ckpt-2"))

  @parameterized.parameters("flipped", "truncated")
  def test_corrupt_newest_data_is_an_error_that_changes_nothing(self, damage):
    self._save(1, 2)
    data = os.path.join(self.dir, "ckpt-2.data-00000-of-00001")
    with open(data, "rb") as f:
      content = f.read()
    with open(data, "wb") as f:
      f.write(bytes(b ^ 0xFF for b in content) if damage == "flipped"
              else content[:len(content) // 2])
    before = _contents(self.dir)
    with self.assertRaises(rundir.RunDirError) as raised:
      self._restore()
    message = str(raised.exception)
    self.assertIn(os.path.join(self.dir, "ckpt-2"), message)
    self.assertIn("Nothing was changed", message)
    self.assertIn("use another --workdir", message)
    self.assertEqual(_contents(self.dir), before)

  def test_listed_checkpoint_missing_its_data_is_an_error(self):
    self._save(1, 2)
    os.remove(os.path.join(self.dir, "ckpt-2.data-00000-of-00001"))
    before = _contents(self.dir)
    for call in ("restore", "latest_step"):
      checkpoints = rundir.Checkpoints(_tiny_checkpoint(), self.dir,
                                       max_to_keep=10)
      with self.assertRaisesRegex(rundir.RunDirError,
                                  "ckpt-2 cannot be restored: its data file"):
        getattr(checkpoints, call)()
    self.assertEqual(_contents(self.dir), before)
    # Doing what the message says resumes from the checkpoint before.
    shutil.move(os.path.join(self.dir, "ckpt-2.index"), self.dir + "-ckpt-2")
    with self.assertLogs("absl", "WARNING"):
      self.assertEqual(self._restore()[:2], (1, ([1.0] * 3, 1)))

  def test_debris_of_killed_saves_is_moved_not_deleted(self):
    self._save(1, 2)

    def write(name, data):
      path = os.path.join(self.dir, name)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "wb") as f:
        f.write(data)

    with open(os.path.join(self.dir, "ckpt-2.index"), "rb") as f:
      index = f.read()
    with open(os.path.join(self.dir, "ckpt-2.data-00000-of-00001"),
              "rb") as f:
      data = f.read()
    debris = {
        # Killed while writing the shards.
        "ckpt-3_temp/part-00000-of-00001.data-00000-of-00001": data[:7],
        # Killed while writing the index after moving the data.
        "ckpt-3.data-00000-of-00001": data,
        "ckpt-3.index": index[:len(index) // 2],
        # An index without its data.
        "ckpt-4.index": index,
        # Killed while replacing the index file.
        "checkpoint.tmp0123abcd": b'model_checkpoint_path: "ckpt-',
    }
    for name, content in debris.items():
      write(name, content)
    before = _contents(self.dir)

    # latest_step only reads.
    checkpoints = rundir.Checkpoints(_tiny_checkpoint(), self.dir,
                                     max_to_keep=10)
    self.assertEqual(checkpoints.latest_step(), 2)
    self.assertEqual(_contents(self.dir), before)

    with self.assertLogs("absl", "WARNING") as logs:
      step, values, checkpoints = self._restore()
    self.assertEqual((step, values), (2, ([2.0] * 3, 2)))
    after = _contents(self.dir)
    for name, content in debris.items():
      self.assertNotIn(name, after)
      self.assertEqual(after[os.path.join(rundir.INCOMPLETE_DIR, name)],
                       content)
    self.assertLen(logs.output, len(debris))  # One per moved name.
    # Saves of the moved numbers go through.
    checkpoint = _tiny_checkpoint()
    checkpoints = rundir.Checkpoints(checkpoint, self.dir, max_to_keep=10)
    checkpoints.restore()
    for step in (3, 4):
      _assign(checkpoint, step)
      checkpoints.save(step)
    self.assertEqual(self._restore()[:2], (4, ([4.0] * 3, 4)))
    self.assertEqual(_contents(self.dir)[
        os.path.join(rundir.INCOMPLETE_DIR, "ckpt-4.index")], index)

  @parameterized.named_parameters(
      ("other_shape", dict(size=4)), ("extra_variable", dict(extra=True)))
  def test_mismatching_model_is_an_error_that_changes_nothing(self, kwargs):
    self._save(1)
    os.remove(self._index_path())  # Would be rebuilt after a good restore.
    before = _contents(self.dir)
    with self.assertRaisesRegex(rundir.RunDirError,
                                "different model or config"):
      self._restore(**kwargs)
    self.assertEqual(_contents(self.dir), before)

  def test_restore_then_save_continues_without_overwriting(self):
    self._save(1, 2, 3)
    os.remove(self._index_path())
    before = _contents(self.dir)
    checkpoint = _tiny_checkpoint()
    checkpoints = rundir.Checkpoints(checkpoint, self.dir, max_to_keep=10)
    with self.assertLogs("absl", "WARNING"):
      self.assertEqual(checkpoints.restore(), 3)
    for step in (4, 5):
      _assign(checkpoint, step)
      self.assertEqual(checkpoints.save(step),
                       os.path.join(self.dir, f"ckpt-{step}"))
    after = _contents(self.dir)
    for name, content in before.items():
      self.assertEqual(after[name], content, name)
    self.assertEqual(self._listed(), ([f"ckpt-{n}" for n in range(1, 6)],
                                      "ckpt-5"))
    with self.assertRaisesRegex(rundir.RunDirError, "refusing to overwrite"):
      checkpoints.save(2)
    self.assertEqual(_contents(self.dir), after)
    checker = _tiny_checkpoint()
    for step in range(1, 6):
      rundir.Checkpoints(checker, self.dir, max_to_keep=10).restore_step(step)
      self.assertEqual(_values(checker), ([float(step)] * 3, step))

  def test_rebuilt_index_lets_the_manager_keep_max_to_keep(self):
    self._save(1, 2, 3)
    os.remove(self._index_path())
    checkpoint = _tiny_checkpoint()
    checkpoints = rundir.Checkpoints(checkpoint, self.dir, max_to_keep=2)
    with self.assertLogs("absl", "WARNING"):
      checkpoints.restore()
    checkpoints.save(4)
    self.assertEqual(
        sorted(n for n in os.listdir(self.dir) if n.endswith(".index")),
        ["ckpt-3.index", "ckpt-4.index"])

  def test_save_without_restore_repairs_first(self):
    self._save(1)
    with open(self._index_path(), "wb") as f:
      f.write(b"\xff")
    checkpoints = rundir.Checkpoints(_tiny_checkpoint(), self.dir,
                                     max_to_keep=10)
    with self.assertLogs("absl", "WARNING"):
      checkpoints.save(2)
    self.assertEqual(self._listed(), (["ckpt-1", "ckpt-2"], "ckpt-2"))

  def test_restore_step(self):
    self._save(1, 2)
    checkpoint = _tiny_checkpoint()
    checkpoints = rundir.Checkpoints(checkpoint, self.dir, max_to_keep=10)
    checkpoints.restore_step(1)
    self.assertEqual(_values(checkpoint), ([1.0] * 3, 1))
    with self.assertRaisesRegex(rundir.RunDirError,
                                "ckpt-7: it does not exist"):
      checkpoints.restore_step(7)

  def test_scratch_save_directory_leaves_the_read_directory_alone(self):
    self._save(1, 2)
    os.remove(self._index_path())
    os.makedirs(os.path.join(self.dir, "ckpt-3_temp"))
    before = _contents(self.dir)
    scratch = os.path.join(os.path.dirname(self.dir), "worker_1_scratch")
    checkpoint = _tiny_checkpoint()
    checkpoints = rundir.Checkpoints(checkpoint, self.dir, max_to_keep=10,
                                     save_directory=scratch)
    self.assertEqual(checkpoints.restore(), 2)
    self.assertEqual(_values(checkpoint), ([2.0] * 3, 2))
    checkpoints.save(3)
    self.assertEqual(_contents(self.dir), before)
    self.assertTrue(os.path.isdir(os.path.join(self.dir, "ckpt-3_temp")))
    self.assertTrue(os.path.exists(os.path.join(scratch, "ckpt-3.index")))

  def test_reader_restores_the_newest_and_writes_nothing(self):
    """Readers (export, evaluation, sampling) on a workdir that needs repair."""
    self._save(1, 2)
    os.remove(self._index_path())
    os.makedirs(os.path.join(self.dir, "ckpt-3_temp"))
    with open(os.path.join(self.dir, "ckpt-3.index"), "wb") as f:
      f.write(b"half an index")
    read_only(self, os.path.dirname(self.dir))
    before = _state(os.path.dirname(self.dir))
    checkpoint = _tiny_checkpoint()
    self.assertEqual(rundir.restore_newest(checkpoint, self.dir), 2)
    self.assertEqual(_values(checkpoint), ([2.0] * 3, 2))
    self.assertEqual(rundir.latest_step(self.dir), 2)
    rundir.restore_step(checkpoint, self.dir, 1)
    self.assertEqual(_values(checkpoint), ([1.0] * 3, 1))
    self.assertEqual(_state(os.path.dirname(self.dir)), before)
    self.assertEqual(rundir.restore_newest(_tiny_checkpoint(),
                                           self.dir + "_absent"), 0)

  def test_reader_during_a_save_leaves_it_alone(self):
    """A reader between a save's temporary write and its rename."""
    self._save(1)
    checkpoint = _tiny_checkpoint()
    checkpoints = rundir.Checkpoints(checkpoint, self.dir, max_to_keep=10)
    checkpoints.restore()
    _assign(checkpoint, 2)
    seen = []
    merge = gen_io_ops.merge_v2_checkpoints

    def paused_merge(*args, **kwargs):
      # The shards are in ckpt-2_temp/; the merge renames them into ckpt-2.
      before = _state(self.dir)
      self.assertIn("ckpt-2_temp", before)
      reader = _tiny_checkpoint()
      seen.append(rundir.restore_newest(reader, self.dir))
      seen.append(_values(reader))
      self.assertEqual(_state(self.dir), before)
      return merge(*args, **kwargs)

    with mock.patch.object(gen_io_ops, "merge_v2_checkpoints", paused_merge):
      checkpoints.save(2)
    self.assertEqual(seen, [1, ([1.0] * 3, 1)])
    self.assertEqual(self._restore()[:2], (2, ([2.0] * 3, 2)))
    self.assertFalse(os.path.exists(os.path.join(self.dir,
                                                 rundir.INCOMPLETE_DIR)))

  def test_step_variable_holds_the_step(self):
    checkpoint = _tiny_checkpoint()
    checkpoint.step = tf.Variable(0, dtype=tf.int64)
    checkpoints = rundir.Checkpoints(checkpoint, self.dir, max_to_keep=10)
    checkpoints.restore()
    checkpoints.save(7)
    values = tf.train.load_checkpoint(os.path.join(self.dir, "ckpt-7"))
    self.assertEqual(values.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"), 7)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "max_to_keep"):
      rundir.Checkpoints(_tiny_checkpoint(), self.dir, max_to_keep=0)
    checkpoints = rundir.Checkpoints(_tiny_checkpoint(), self.dir,
                                     max_to_keep=1)
    with self.assertRaisesRegex(ValueError, "step"):
      checkpoints.save(-1)

  @pytest.mark.slow
  def test_kill_during_saves_then_restore_resumes_from_a_complete_one(self):
    rng = random.Random(0)
    reader = _tiny_checkpoint(size=1 << 18)
    for round_ in range(2):
      # A process of its own, forked from one that imported TF (warm_cli).
      saver = warm_cli.start(["-c", _SAVER, self.dir],
                             env=warm_cli.environment())
      self.addCleanup(saver.wait)
      self.addCleanup(saver.kill)
      restored = saver.readline().split() or ["exited"]
      self.assertEqual(restored[0], "restored",
                       f"the saver failed: {saver.stderr[-3000:]}")
      saved = int(restored[1])
      # A few saves, then a kill at a random moment of the next ones.
      for _ in range(3):
        line = saver.readline().split() or ["exited"]
        self.assertEqual(line[0], "saved", "the saver failed")
        saved = int(line[1])
      time.sleep(rng.uniform(0, 0.2))
      saver.send_signal(signal.SIGKILL)
      saver.wait()
      # Any lines printed before the kill are saves that completed.
      line = saver.readline()
      while line:
        if line.startswith("saved"):
          saved = int(line.split()[1])
        line = saver.readline()

      checkpoints = rundir.Checkpoints(reader, self.dir, max_to_keep=1000)
      step = checkpoints.restore()
      self.assertGreaterEqual(step, saved, f"round {round_}")
      self.assertEqual(int(reader.w.numpy()), step)
      np.testing.assert_array_equal(reader.v.numpy(), float(step))
      listed, latest = self._listed()
      self.assertEqual(latest, f"ckpt-{step}")
      self.assertEqual(listed, [f"ckpt-{n}" for n in range(1, step + 1)])
      for n in range(1, step + 1):
        values = tf.train.load_checkpoint(os.path.join(self.dir, f"ckpt-{n}"))
        self.assertEqual(
            int(values.get_tensor("w/.ATTRIBUTES/VARIABLE_VALUE")), n)
        np.testing.assert_array_equal(
            values.get_tensor("v/.ATTRIBUTES/VARIABLE_VALUE"), float(n))


if __name__ == "__main__":
  absltest.main()
