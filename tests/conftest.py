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


# The files that take longest, longest first (seconds in a `-n 2` run). xdist
# hands whole files (`--dist loadfile`) to whichever worker is free, in
# collection order: a long file handed out last would leave the other worker
# idle while it runs. Unlisted files follow in their usual order.
_LONGEST_FIRST = (
    "fault_test.py",             # 85
    "notebook_test.py",          # 78
    "quantizer_kinds_test.py",   # 61
    "train_cli_test.py",         # 56
    "prior_test.py",             # 54
    "hierarchical_prior_test.py",  # 53
    "export_test.py",            # 49
    "train_test.py",             # 47
    "readme_test.py",            # 44
    "hierarchical_test.py",      # 39
    "quantizers_test.py",        # 38
    "loop_test.py",              # 33
    "residual_vq_test.py",       # 22
    "keras_test.py",             # 15
    "rundir_test.py",            # 14
    "doctor_test.py",            # 12
)


def pytest_configure(config):
  # xdist otherwise orders files by their number of tests, not their time.
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
