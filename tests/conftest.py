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
