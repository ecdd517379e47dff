"""Checks every bottleneck (residual VQ, FSQ, LFQ) passes, shared by their tests.

Each takes a factory `make()` of fresh, identically initialised modules
and compares them on the same inputs: XLA against eager, two replicas against
one device on the concatenated batch, bfloat16 against float32. A user's
SavedModel of each bottleneck, loaded without our code, is checked against
the module in tests/quantizer_kinds_test.py: the trained bottleneck of each
kind's end-to-end run, all loaded in one fresh Python.
"""

import functools
import os
import textwrap
from typing import Callable, Sequence

import numpy as np
import sonnet as snt
import tensorflow as tf


# The keys every bottleneck returns, read by the trainer.
COMMON_KEYS = ("quantize", "loss", "perplexity", "encoding_indices",
               "codes_used", "codes_used_ema", "nonfinite_inputs")
# Metrics equal on every replica and to one device's on the global batch.
GLOBAL_KEYS = ("perplexity", "codes_used", "codes_used_ema",
               "nonfinite_inputs")


@functools.cache
def two_replicas() -> snt.distribute.Replicator:
  """One Replicator on the 2 logical CPUs of tests/conftest.py per process.

  ReductionToOneDevice: other strategies over the same devices in the
  process would otherwise reuse its collective instance keys.
  """
  return snt.distribute.Replicator(
      ["/cpu:0", "/cpu:1"],
      cross_device_ops=tf.distribute.ReductionToOneDevice())


def state(module: tf.Module):
  """Every variable's value, by name and position."""
  return [(v.name, v.numpy()) for v in module.variables]


def assert_same_state(actual, expected, **tolerance):
  assert [name for name, _ in actual] == [name for name, _ in expected]
  for (name, a), (_, e) in zip(actual, expected):
    np.testing.assert_allclose(a, e, err_msg=name, **tolerance)


def check_common_keys(test, out, input_shape, input_dtype):
  test.assertContainsSubset(COMMON_KEYS, out.keys())
  test.assertEqual(out["quantize"].shape, input_shape)
  test.assertEqual(out["quantize"].dtype, input_dtype)
  test.assertEqual(out["loss"].shape, [])
  test.assertEqual(out["loss"].dtype, tf.float32)
  test.assertEqual(out["encoding_indices"].dtype, tf.int64)
  for key in ("codes_used", "codes_used_ema", "nonfinite_inputs"):
    test.assertEqual(out[key].dtype, tf.int32, key)
    test.assertEqual(out[key].shape, [], key)


def check_xla_equals_eager(make: Callable[[], snt.Module],
                           batches: Sequence[np.ndarray]):
  """Training steps under jit_compile=True give eager's outputs and state."""
  eager, compiled = make(), make()
  step = tf.function(lambda x: compiled(x, is_training=True),
                     jit_compile=True)
  for batch in batches:
    expected = eager(tf.constant(batch), is_training=True)
    actual = step(tf.constant(batch))
    for key in COMMON_KEYS:
      np.testing.assert_allclose(actual[key], expected[key], rtol=1e-5,
                                 atol=1e-6, err_msg=key)
  assert_same_state(state(compiled), state(eager), rtol=1e-5, atol=1e-6)


def check_replicas_equal_one_device(test, make: Callable[[], snt.Module],
                                    batches: Sequence[np.ndarray]):
  """2 replicas on halves of each batch: same state on both, equal to one
  device's on the whole batch; global metrics equal everywhere."""
  strategy = two_replicas()
  with strategy.scope():
    replicated = make()
  single = make()

  @tf.function
  def step(inputs):
    def replica_fn(x):
      out = replicated(x, is_training=True)
      return {key: out[key] for key in GLOBAL_KEYS + ("loss",)}
    return strategy.run(replica_fn, args=(inputs,))

  for batch in batches:
    halves = np.split(batch, 2)
    out = step(strategy.experimental_distribute_values_from_function(
        lambda ctx, halves=halves: halves[ctx.replica_id_in_sync_group]))
    expected = single(tf.constant(batch), is_training=True)
    for key in GLOBAL_KEYS:
      for value in strategy.experimental_local_results(out[key]):
        np.testing.assert_allclose(value, expected[key], rtol=1e-5,
                                   err_msg=key)
  for variable in replicated.variables:
    first, second = strategy.experimental_local_results(variable)
    np.testing.assert_array_equal(first, second, err_msg=variable.name)
  ours = [(v.name, strategy.experimental_local_results(v)[0].numpy())
          for v in replicated.variables]
  assert_same_state(ours, state(single), rtol=1e-5, atol=1e-6)
  test.assertNotEmpty(ours)


def check_bfloat16(test, make: Callable[[], snt.Module], batch: np.ndarray):
  """bfloat16 inputs give bfloat16 codes equal to float32's of the same
  (bfloat16-rounded) values."""
  low = tf.constant(batch, tf.bfloat16)
  out = make()(low, is_training=True)
  expected = make()(tf.cast(low, tf.float32), is_training=True)
  test.assertEqual(out["quantize"].dtype, tf.bfloat16)
  np.testing.assert_array_equal(out["encoding_indices"],
                                expected["encoding_indices"])
  np.testing.assert_allclose(tf.cast(out["quantize"], tf.float32),
                             tf.cast(tf.cast(expected["quantize"],
                                             tf.bfloat16), tf.float32))


# Defines load_user_model(directory) for a fresh Python in which sonnet and
# sonnet_vqvae cannot be imported (after tiny.BLOCK_OUR_CODE, numpy as np and
# tensorflow as tf): what save_user_model saved there, called on its inputs.
LOAD_USER_MODEL = textwrap.dedent("""
    def load_user_model(directory):
      data = np.load(os.path.join(directory, "in.npz"))
      user = tf.saved_model.load(os.path.join(directory, "model"))
      encoded = user.encode(tf.constant(data["inputs"]))
      np.savez(os.path.join(directory, "out.npz"),
               quantize=encoded["quantize"].numpy(),
               indices=encoded["indices"].numpy(),
               decoded=user.decode(tf.constant(data["indices"])).numpy())
""")


class _UserModel(tf.Module):
  """What a user writes: their own module holding our bottleneck."""

  def __init__(self, bottleneck, input_shape, indices_shape):
    super().__init__()
    self.bottleneck = bottleneck
    self.encode = tf.function(
        self._encode,
        input_signature=[tf.TensorSpec([None] + list(input_shape), tf.float32)])
    self.decode = tf.function(
        bottleneck.quantize,
        input_signature=[tf.TensorSpec([None] + list(indices_shape),
                                       tf.int64)])

  def _encode(self, x):
    out = self.bottleneck(x, is_training=False)
    return {"quantize": out["quantize"], "indices": out["encoding_indices"]}


def save_user_model(bottleneck: snt.Module, batch: np.ndarray,
                    directory: str) -> None:
  """Saves `bottleneck` in a user's tf.Module with a dynamic batch, and the
  inputs load_user_model calls it on, in `directory`."""
  indices = bottleneck(tf.constant(batch),
                       is_training=False)["encoding_indices"].numpy()
  user = _UserModel(bottleneck, batch.shape[1:], indices.shape[1:])
  tf.saved_model.save(user, os.path.join(directory, "model"))
  # A batch size the functions were not traced with.
  np.savez(os.path.join(directory, "in.npz"),
           inputs=np.concatenate([batch, batch[:1]]),
           indices=np.concatenate([indices, indices[:1]]))


def check_loaded_user_model(test, bottleneck: snt.Module,
                            directory: str) -> None:
  """What load_user_model gave in `directory` is the module's codes and
  vectors."""
  data = np.load(os.path.join(directory, "in.npz"))
  got = dict(np.load(os.path.join(directory, "out.npz")))
  again = bottleneck(tf.constant(data["inputs"]), is_training=False)
  np.testing.assert_array_equal(got["indices"], again["encoding_indices"])
  np.testing.assert_allclose(got["quantize"], again["quantize"], rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_allclose(got["decoded"],
                             bottleneck.quantize(data["indices"]),
                             rtol=1e-6, atol=1e-6)
  test.assertEqual(got["indices"].shape, data["indices"].shape)


class StandardChecks:
  """The checks above as tests: mix into a TestCase that defines `make()`
  (a fresh module) and `BATCHES` (a few equal-shaped float32 batches)."""

  BATCHES: Sequence[np.ndarray] = ()

  def make(self) -> snt.Module:
    raise NotImplementedError

  def test_output_keys(self):
    out = self.make()(self.BATCHES[0], is_training=True)
    check_common_keys(self, out, list(self.BATCHES[0].shape), tf.float32)

  def test_xla(self):
    check_xla_equals_eager(self.make, self.BATCHES)

  def test_replicas(self):
    check_replicas_equal_one_device(self, self.make, self.BATCHES)

  def test_bfloat16(self):
    check_bfloat16(self, self.make, self.BATCHES[0])
