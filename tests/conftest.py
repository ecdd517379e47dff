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


# The files that take longest, longest first (seconds in a quiet `-n 2` run,
# 2026-12-02). xdist hands whole files (`--dist loadfile`) to whichever
# worker is free, in collection order: a long file handed out last would
# leave the other worker idle while it runs. Unlisted files follow in their
# usual order.
_LONGEST_FIRST = (
    "hierarchical_test.py",      # 75
    "quantizer_kinds_test.py",   # 60
    "fault_test.py",             # 58
    "quantizers_test.py",        # 54
    "notebook_test.py",          # 50
    "train_test.py",             # 48
    "prior_test.py",             # 44
    "loop_test.py",              # 37
    "readme_test.py",            # 36
    "export_test.py",            # 31
    "hierarchical_prior_test.py",  # 27
    "train_cli_test.py",         # 20
    "residual_vq_test.py",       # 18
    "keras_test.py",             # 13
    "distributed_eval_test.py",  # 12
    "doctor_test.py",            # 7
)


def pytest_configure(config):
  # xdist otherwise orders files by their number of tests, not their time.
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
