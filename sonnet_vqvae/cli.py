"""The console of the programs (train, prior, export, doctor): one home.

    from sonnet_vqvae import cli

    if __name__ == "__main__":
      flags.DEFINE_string(...)
      cli.run(main)  # instead of absl's app.run(main)

`run` adds `--verbose` and, without it:

* an error the user can fix (`user_errors()`: a bad flag or config value, a
  missing file or run, another run in the workdir, no network for a
  download, a non-finite loss) is one line on stderr, `<program>: <message>`,
  and exit status 1; `--verbose` re-raises it with its traceback;
* the INFO lines of tensorflow_datasets and of TF's SavedModel writer are not
  shown (`--verbose` shows them).

`progress_bar` is the training loops' tqdm bar: while it is open, log lines
are written above it, never on its line. `import_tensorflow_once` imports
TensorFlow printing its start-up lines once (its shared libraries print them
once each).

This module imports neither TensorFlow nor the rest of the package at import
time: the package imports it before TensorFlow.
"""

import contextlib
import functools
import logging
import os
import re
import sys
import threading
from typing import Callable, Iterator, List, Optional, Sequence

from absl import app
from absl import flags
import tqdm


def user_errors() -> tuple:
  """The exception types `run` shows as one line: their messages say what to do."""
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from sonnet_vqvae import rundir
  # pylint: enable=g-import-not-at-top
  return (ValueError, FileNotFoundError, FileExistsError, ConnectionError,
          ImportError, FloatingPointError, rundir.RunDirError,
          tf.errors.DataLossError)


def run(main: Callable[[List[str]], None], name: Optional[str] = None) -> None:
  """absl's `app.run(main)` with the programs' console (module docstring).

  Args:
    main: the program's main(argv).
    name: the program's name in error lines; default: the module's, e.g.
      "train" for `python -m sonnet_vqvae.train`.
  """
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False,
                      "Show errors with their traceback, and the INFO lines "
                      "of tensorflow_datasets.")
  name = name or _program_name()
  app.run(functools.partial(_main, main, name),
          flags_parser=functools.partial(_parse_flags, name))


def _program_name() -> str:
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  if spec is not None:
    module = spec.name
  else:
    # Not splitext: a module path given as argv[0] ("sonnet_vqvae.train")
    # would lose its last part, not a ".py".
    module = os.path.basename(sys.argv[0])
    module = module[:-len(".py")] if module.endswith(".py") else module
  return module.rsplit(".", 1)[-1]


def _parse_flags(name: str, argv: Sequence[str]) -> List[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _exit(name, f"{e}. Pass --helpshort or --helpfull to see the flags.")
  except Exception as e:  # pylint: disable=broad-except
    # A flag whose parser failed otherwise, e.g. --config naming a file that
    # cannot be loaded: flags are not parsed yet, so there is no --verbose.
    if any(arg in ("--verbose", "--verbose=true", "--verbose=True")
           for arg in argv):
      raise
    _exit(name, _message(e))


def _main(main: Callable[[List[str]], None], name: str,
          argv: List[str]) -> None:
  verbose = flags.FLAGS.verbose
  if not verbose:
    hide_library_info_lines()
  try:
    main(argv)
  except user_errors() as e:
    if verbose:
      raise
    _exit(name, _message(e))


def _message(error: BaseException) -> str:
  return (f"{error} (--verbose shows the traceback)" if str(error)
          else f"{type(error).__name__} (--verbose shows the traceback)")


def _exit(name: str, message: str) -> None:
  sys.stderr.flush()
  sys.exit(f"{name}: {message}")


class _LibraryInfoFilter(logging.Filter):
  """Drops INFO (and lower) records of tensorflow_datasets and TF's saving.

  tfds says which files it reads; tf.saved_model.save which input names it
  renames: noise at every start and export.
  """

  def __init__(self):
    super().__init__()
    self._prefixes = None

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    if self._prefixes is None:
      # pylint: disable=g-import-not-at-top
      import tensorflow as tf
      import tensorflow_datasets as tfds
      # pylint: enable=g-import-not-at-top
      self._prefixes = (
          os.path.dirname(tfds.__file__) + os.sep,
          os.path.join(os.path.dirname(tf.__file__), "python",
                       "saved_model") + os.sep)
    return not record.pathname.startswith(self._prefixes)


LIBRARY_INFO_FILTER = _LibraryInfoFilter()


def hide_library_info_lines() -> None:
  """Hides tfds' and TF saving's INFO lines (WARNING and up stay)."""
  for handler in _console_handlers():
    if LIBRARY_INFO_FILTER not in handler.filters:
      handler.addFilter(LIBRARY_INFO_FILTER)


def _console_handlers() -> List[logging.Handler]:
  """The handlers of the root, absl and tensorflow loggers."""
  handlers = []
  for logger in map(logging.getLogger, ("", "absl", "tensorflow")):
    for handler in logger.handlers:
      if handler not in handlers:
        handlers.append(handler)
  return handlers


class _AboveTheBar:
  """A stream for log handlers: each write goes above the open tqdm bars."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, text: str) -> None:
    tqdm.tqdm.write(text, file=self._stream, end="")

  def flush(self) -> None:
    self._stream.flush()


class _Bar(tqdm.tqdm):
  """tqdm.tqdm whose open bar has the log lines written above it."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._streams = [] if self.disable else _redirect(self.fp)

  def close(self) -> None:
    streams, self._streams = getattr(self, "_streams", []), []
    for handler, stream in streams:
      handler.setStream(stream)
    super().close()


def _redirect(fp) -> list:
  """Points the log handlers that write where `fp` does above its bar."""
  streams = []
  for handler in _console_handlers():
    # absl's handler writes through a StreamHandler of its own.
    handler = getattr(handler, "python_handler", handler)
    stream = getattr(handler, "stream", None)
    if not isinstance(handler, logging.StreamHandler) or stream is None:
      continue
    both_std = all(s in (sys.stdout, sys.stderr) for s in (stream, fp))
    if fp == stream or both_std:
      streams.append((handler, handler.setStream(_AboveTheBar(stream))))
  return streams


def progress_bar(**kwargs) -> tqdm.tqdm:
  """A tqdm bar (kwargs as tqdm.tqdm's); log lines never share its line.

  While it is open (not disabled), the log handlers that write to the bar's
  stream write through `tqdm.write`, which clears the bar, writes the line
  and redraws the bar below it. `close()` (also via `with`) restores them.
  """
  return _Bar(**kwargs)


# TF's start-up lines: "I0000 00:00:1796139977.553378    6851 port.cc:153] ...",
# keyed without their time stamp and thread id.
_LOG_PREFIX = re.compile(rb"^[IWEF]\d{4} [\d:.]+\s+\d+ ")

@contextlib.contextmanager
def _stderr_lines_kept(keep: Callable[[bytes], bool]) -> Iterator[None]:
  """Writes only the lines of file descriptor 2 that `keep`, meanwhile.

  C++ code (TF's logging) writes to the descriptor, not to sys.stderr, so it
  is pointed at a pipe whose lines a thread copies to the real stderr.
  Without a real descriptor 2 (e.g. some notebook kernels) nothing changes.
  """
  try:
    sys.stderr.flush()
    saved = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)
  except (OSError, AttributeError, ValueError):
    yield
    return

  def forward():
    with os.fdopen(read, "rb") as pipe:
      for line in pipe:
        if keep(line):
          try:
            os.write(saved, line)
          except OSError:  # stderr closed: nothing left to show.
            return

  thread = threading.Thread(target=forward, daemon=True)
  thread.start()
  try:
    yield
  finally:
    try:
      sys.stderr.flush()
    except (OSError, ValueError):
      pass
    os.dup2(saved, 2)  # The pipe's last writer closes: the thread ends.
    thread.join(timeout=2)
    os.close(saved)


def import_tensorflow_once() -> None:
  """Imports TensorFlow, printing each of its start-up lines once.

  TF's shared libraries each print the same lines when loaded (oneDNN, CUDA
  drivers, the pre-absl-init warning): lines seen before are dropped during
  the import. Nothing happens when TF is already imported.
  """
  if "tensorflow" in sys.modules:
    return
  with _stderr_lines_kept(_tf_lines_once(drop_info=False)):
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import


# Printed by absl's C++ logging before TF's first line of each library.
_PRE_INIT_NOTICE = b"WARNING: All log messages before absl::InitializeLog()"


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow without its INFO start-up lines (for notebooks).

  A notebook kernel shows what is written to file descriptor 2 as red error
  output; TF's start-up lines (the pre-absl-init notice, CUDA probing on a
  CPU, oneDNN notices) are INFO and say nothing about the run. Its warnings
  and errors are kept, once each. `import sonnet_vqvae` calls this in a
  Jupyter kernel; nothing happens when TF is already imported.
  """
  if "tensorflow" in sys.modules:
    return
  with _stderr_lines_kept(_tf_lines_once(drop_info=True)):
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import


def _tf_lines_once(drop_info: bool) -> Callable[[bytes], bool]:
  """A filter of TF's C++ log lines: each the first time it comes.

  Args:
    drop_info: also drop INFO lines and the pre-absl-init notice; a line
      without a log prefix then goes with the message before it (a message's
      second line), else it is a line of its own, kept once.
  """
  seen = set()
  last_kept = True

  def keep(line: bytes) -> bool:
    nonlocal last_kept
    if drop_info:
      if line.startswith(_PRE_INIT_NOTICE):
        return False
      if not _LOG_PREFIX.match(line):
        return last_kept
    key = _LOG_PREFIX.sub(b"", line)
    last_kept = key not in seen and not (drop_info and line.startswith(b"I"))
    seen.add(key)
    return last_kept

  return keep


class _NotebookFormatter(logging.Formatter):
  """The message alone for INFO lines; "WARNING: message" and so on above."""

  def format(self, record: logging.LogRecord) -> str:
    message = super().format(record)
    if record.levelno == logging.INFO:
      return message
    return f"{record.levelname}: {message}"


def _package_info_or_warning(record: logging.LogRecord) -> bool:
  if (record.name.split(".")[0] == "tensorflow" and
      logging.getLogger("tensorflow").handlers):
    return False  # TF's logger shows its lines itself.
  package = os.path.dirname(os.path.abspath(__file__)) + os.sep
  return (record.levelno >= logging.WARNING or
          (record.levelno >= logging.INFO and
           os.path.abspath(record.pathname).startswith(package)))


_NOTEBOOK_HANDLER = logging.StreamHandler()
_NOTEBOOK_HANDLER.setFormatter(_NotebookFormatter())
_NOTEBOOK_HANDLER.addFilter(_package_info_or_warning)


def log_to(stream) -> logging.Handler:
  """Shows this package's INFO lines and every library's warnings on `stream`.

  For notebooks, with `sys.stdout`: training progress, test metrics and
  "Restored/Wrote ..." lines as plain text, where absl would write them to
  stderr (red in Jupyter). Sets absl's verbosity to INFO and puts one handler
  on the root logger (again: the same handler, re-pointed), so a later
  `logging.basicConfig` adds no second one; other libraries' INFO lines (tfds'
  file reads, TF's SavedModel writer) are not shown.

  Args:
    stream: a text stream, e.g. `sys.stdout`.

  Returns:
    The handler (a `logging.StreamHandler`), e.g. to remove it again.
  """
  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging
  # pylint: enable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.INFO)
  _NOTEBOOK_HANDLER.setStream(stream)
  if _NOTEBOOK_HANDLER not in logging.root.handlers:
    logging.root.addHandler(_NOTEBOOK_HANDLER)
  hide_library_info_lines()
  return _NOTEBOOK_HANDLER
