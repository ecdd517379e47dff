"""Session-wide test setup."""

import logging

from absl import logging as absl_logging
import pytest
import tensorflow as tf

# Replica tests need 2+ devices on CPU-only machines. Logical devices can only be
# configured before TF initialises its runtime, so it happens here, at collection.
_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _CPU, [tf.config.LogicalDeviceConfiguration()] * 2)

# Loggers whose level, handlers or propagation a test (or code it runs, e.g.
# absl's verbosity flag) may change; "" is the root logger.
_LOGGERS = ("", "absl", "tensorflow")


def _logging_state():
  return [(logger, logger.level, list(logger.handlers), logger.propagate)
          for logger in map(logging.getLogger, _LOGGERS)]


_SESSION_LOGGING = _logging_state()


@pytest.fixture(autouse=True)
def _fresh_logging_state():
  """Every test starts from the session's logging state and leaves it.

  E.g. restoring absl's verbosity with `set_verbosity(get_verbosity())` pins
  absl's logger at WARNING, after which `assertLogs(level="INFO")` elsewhere
  sees nothing: tests must not depend on the order they run in.
  """
  _restore(_SESSION_LOGGING)
  yield
  _restore(_SESSION_LOGGING)


def _restore(state):
  for logger, level, handlers, propagate in state:
    logger.setLevel(level)
    logger.handlers[:] = handlers
    logger.propagate = propagate


# The files whose tests take longest (end-to-end runs, subprocesses), longest
# first. `--dist loadfile` hands files to the workers in collection order, so
# running these first keeps one worker from finishing a long file alone while
# the other idles (about a tenth of the suite's wall time on 2 cores).
_LONG_FILES_FIRST = (
    "loop_test.py", "fault_test.py", "hierarchical_prior_test.py",
    "hierarchical_test.py", "train_cli_test.py", "quantizers_test.py",
    "notebook_test.py", "prior_test.py", "quantizer_kinds_test.py",
    "readme_test.py", "train_test.py", "distribute_test.py")


def pytest_collection_modifyitems(items):
  """Orders the files longest first (`_LONG_FILES_FIRST`), the rest after.

  A stable sort by file: each file's tests keep their order and stay
  together, so its module-scoped fixtures are still built once.
  """
  def rank(item):
    name = item.path.name
    return (_LONG_FILES_FIRST.index(name) if name in _LONG_FILES_FIRST
            else len(_LONG_FILES_FIRST))
  items.sort(key=rank)
