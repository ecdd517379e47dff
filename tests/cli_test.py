"""The programs' console: one-line user errors, --verbose, the bar and logs."""

import io
import logging
import os
import sys
from unittest import mock

from absl import flags
from absl import logging as absl_logging
from absl.testing import absltest
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import tqdm

from sonnet_vqvae import cli
from sonnet_vqvae import rundir


def _run(main, *args):
  """cli.run(main) as `prog *args`: (exit code, stderr)."""
  stderr = io.StringIO()
  with mock.patch.object(sys, "argv", ["prog", *args]), \
      mock.patch.object(sys, "stderr", stderr):
    try:
      cli.run(main, name="prog")
    except SystemExit as e:
      code = e.code
    finally:
      flags.FLAGS.unparse_flags()
  if isinstance(code, str):  # sys.exit(message) prints it to stderr.
    stderr.write(code + "\n")
    code = 1
  return code, stderr.getvalue()


def _visible(line):
  """What a terminal shows of `line`: each "\r" returns to its start."""
  shown = ""
  for part in line.split("\r"):
    shown = part + shown[len(part):]
  return shown.rstrip()


def _raises(error):
  def main(argv):
    del argv
    raise error
  return main


class RunTest(absltest.TestCase):

  def test_user_errors_are_one_line(self):
    for error in [ValueError("config.num_steps must be positive, got -1."),
                  FileNotFoundError("No trained run in '/w'."),
                  ConnectionError("cifar10 is not in data_dir: go online."),
                  rundir.FingerprintMismatch("'/w' holds another run.")]:
      code, stderr = _run(_raises(error))
      self.assertEqual(code, 1)
      self.assertEqual(stderr.splitlines(),
                       [f"prog: {error} (--verbose shows the traceback)"])

  def test_verbose_shows_the_traceback(self):
    with self.assertRaisesRegex(ValueError, "must be positive"):
      with mock.patch.object(sys, "argv", ["prog", "--verbose"]):
        try:
          cli.run(_raises(ValueError("must be positive")), name="prog")
        finally:
          flags.FLAGS.unparse_flags()

  def test_other_errors_keep_their_traceback(self):
    # A bug is not the user's to fix: it is not shortened.
    with self.assertRaises(KeyError):
      _run(_raises(KeyError("k")))

  def test_flag_that_fails_to_parse_is_one_line(self):
    def parse(value):
      raise OSError(f"cannot read {value}")

    class Parser(flags.ArgumentParser):
      def parse(self, argument):
        return parse(argument)

    flags.DEFINE(Parser(), "cli_test_file", None, "A file flag.")
    try:
      code, stderr = _run(_raises(AssertionError("not reached")),
                          "--cli_test_file=x.py")
      self.assertEqual(code, 1)
      self.assertEqual(stderr.splitlines(),
                       ["prog: cannot read x.py (--verbose shows the "
                        "traceback)"])
      code, stderr = _run(_raises(AssertionError), "--no_such_flag")
      self.assertEqual(code, 1)
      self.assertLen(stderr.splitlines(), 1)
      self.assertIn("no_such_flag", stderr)
    finally:
      delattr(flags.FLAGS, "cli_test_file")

  def test_success_exits_zero(self):
    code, stderr = _run(lambda argv: None)
    self.assertIn(code, (0, None))
    self.assertEqual(stderr, "")


class ProgramNameTest(absltest.TestCase):

  def test_named_after_the_module_or_script(self):
    main = mock.Mock(__spec__=None)
    for argv0, name in [("sonnet_vqvae.train", "train"),
                        ("/x/prior.py", "prior"), ("export", "export")]:
      with mock.patch.dict(sys.modules, {"__main__": main}), \
          mock.patch.object(sys, "argv", [argv0]):
        self.assertEqual(cli._program_name(), name)


class LibraryInfoTest(absltest.TestCase):

  def _record(self, level, path):
    return logging.LogRecord("absl", level, path, 1, "message", (), None)

  def test_hides_only_tfds_info(self):
    in_tfds = os.path.join(os.path.dirname(tfds.__file__), "core", "x.py")
    keep = cli.LIBRARY_INFO_FILTER.filter
    self.assertFalse(keep(self._record(logging.INFO, in_tfds)))
    self.assertTrue(keep(self._record(logging.WARNING, in_tfds)))
    self.assertTrue(keep(self._record(logging.INFO, cli.__file__)))
    saving = os.path.join(os.path.dirname(tf.__file__), "python",
                          "saved_model", "save.py")
    self.assertFalse(keep(self._record(logging.INFO, saving)))

  def test_installed_on_the_console_handlers(self):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.root.addHandler(handler)  # conftest restores the handlers.
    logging.root.setLevel(logging.INFO)
    cli.hide_library_info_lines()
    logging.getLogger("absl").handle(self._record(
        logging.INFO, os.path.join(os.path.dirname(tfds.__file__), "a.py")))
    absl_logging.info("ours")
    self.assertEqual(stream.getvalue(), "ours\n")
    handler.removeFilter(cli.LIBRARY_INFO_FILTER)


class ProgressBarTest(absltest.TestCase):

  def test_log_lines_never_share_the_bars_line(self):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.root.addHandler(handler)  # conftest restores the handlers.
    with cli.progress_bar(total=10, file=stream, mininterval=0,
                          ascii=True) as bar:
      bar.update(3)
      logging.warning("step 3/10 loss 1.0")
      bar.update(3)
    logging.warning("after")
    out = stream.getvalue()
    # A line that shows a log message shows nothing else: tqdm blanked the
    # bar before writing it.
    for message in ("step 3/10 loss 1.0", "after"):
      (line,) = [l for l in out.split("\n") if message in l]
      self.assertEqual(_visible(line), message)
    # The bar was drawn again after the log line.
    self.assertIn("6/10", out.split("step 3/10 loss 1.0")[1])
    self.assertIs(handler.stream, stream)  # Restored when the bar closed.

  def test_plain_tqdm_would_share_the_line(self):
    # What the redirection prevents: a handler writing while a bar is drawn
    # appends to the bar's line.
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.root.addHandler(handler)
    with tqdm.tqdm(total=10, file=stream, mininterval=0, ascii=True) as bar:
      bar.update(3)
      logging.warning("message")
    (line,) = [l for l in stream.getvalue().split("\n") if "message" in l]
    self.assertNotEqual(_visible(line), "message")

  def test_disabled_bar_changes_no_handler(self):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.root.addHandler(handler)
    with cli.progress_bar(total=10, file=stream, disable=True):
      self.assertIs(handler.stream, stream)


def test_a_descriptor_filter_keeps_only_the_lines_asked(capfd):
  # C++ writes to file descriptor 2, not to sys.stderr.
  with cli._stderr_lines_kept(lambda line: b"drop" not in line):
    os.write(2, b"E0000 00:00:1796142501.241688   32038 x.cc:1] drop me\n")
    os.write(2, b"E0000 00:00:1796142501.241688   32038 y.cc:1] kept\n")
  assert capfd.readouterr().err == (
      "E0000 00:00:1796142501.241688   32038 y.cc:1] kept\n")


class LogToTest(absltest.TestCase):
  """cli.log_to: a notebook's logs as plain text on one stream."""

  def setUp(self):
    super().setUp()
    # hide_library_info_lines filters the handlers it finds; undo that.
    handlers = logging.getLogger("tensorflow").handlers
    before = [list(handler.filters) for handler in handlers]
    self.addCleanup(lambda: [setattr(h, "filters", f)
                             for h, f in zip(handlers, before)])

  def _record(self, name, level, path, message):
    return logging.LogRecord(name, level, path, 1, message, (), None)

  def test_package_info_and_every_warning_once(self):
    stream = io.StringIO()
    logging.root.handlers[:] = []  # As in a kernel; conftest restores them.
    cli.log_to(stream)
    cli.log_to(stream)  # A cell run twice adds no second handler.
    logging.basicConfig()  # Some library's call adds no stderr handler.
    self.assertEqual(logging.root.handlers, [cli._NOTEBOOK_HANDLER])
    self.assertEqual(absl_logging.get_verbosity(), absl_logging.INFO)
    in_tfds = os.path.join(os.path.dirname(tfds.__file__), "core", "x.py")
    absl = logging.getLogger("absl")
    absl.handle(self._record("absl", logging.INFO, cli.__file__, "ours"))
    absl.handle(self._record("absl", logging.INFO, in_tfds, "tfds info"))
    absl.handle(self._record("absl", logging.WARNING, in_tfds, "tfds warns"))
    absl.handle(self._record("absl", logging.DEBUG, cli.__file__, "debug"))
    self.assertEqual(stream.getvalue(), "ours\nWARNING: tfds warns\n")

  def test_tensorflow_lines_left_to_its_own_handler(self):
    stream = io.StringIO()
    cli.log_to(stream)
    own = io.StringIO()
    tf_logger = logging.getLogger("tensorflow")
    tf_logger.handlers[:] = [logging.StreamHandler(own)]  # conftest restores.
    tf_logger.warning("once")
    self.assertEqual((stream.getvalue(), own.getvalue()), ("", "once\n"))
    tf_logger.handlers[:] = []  # Without its own handler, ours shows it.
    tf_logger.warning("shown")
    self.assertEqual(stream.getvalue(), "WARNING: shown\n")


# TF's libraries, each printing its start-up lines as it loads.
_TF_IMPORT_LINES = [
    b"WARNING: All log messages before absl::InitializeLog() is called "
    b"are written to STDERR\n",
    b"I0000 00:00:1796142501.241688   32038 cudart_stub.cc:31] no cuda\n",
    b"I0000 00:00:1796142501.241688   32038 cpu_feature_guard.cc:1] AVX\n",
    b"To enable the following instructions: AVX2\n",  # The line above's.
    b"W0000 00:00:1796142501.241688   32038 x.cc:1] a warning\n",
    b"second line of the warning\n",
    b"WARNING: All log messages before absl::InitializeLog() is called "
    b"are written to STDERR\n",
    b"I0000 00:00:1796142509.000000   32038 cudart_stub.cc:31] no cuda\n",
    b"W0000 00:00:1796142509.000000   32038 x.cc:1] a warning\n",
    b"second line of the warning\n",
    b"E0000 00:00:1796142509.000000   32038 y.cc:2] an error\n",
]


@pytest.mark.parametrize("drop_info, kept", [
    # A program (import_tensorflow_once): every line, the first time.
    (False, [0, 1, 2, 3, 4, 5, 10]),
    # A notebook (import_tensorflow_quietly): warnings and errors with their
    # second lines, the first time.
    (True, [4, 5, 10]),
])
def test_tensorflow_import_lines_are_kept_once(capfd, drop_info, kept):
  with cli._stderr_lines_kept(cli._tf_lines_once(drop_info=drop_info)):
    for line in _TF_IMPORT_LINES:
      os.write(2, line)
  assert capfd.readouterr().err == b"".join(
      _TF_IMPORT_LINES[i] for i in kept).decode()

if __name__ == "__main__":
  absltest.main()
