"""Tests of sonnet_vqvae.quantizers against stock snt.nets and NumPy."""

from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import sonnet as snt
import tensorflow as tf

from sonnet_vqvae import quantizers


def _make_pair(ema: bool, dtype=tf.float32, **options):
  """Ours and stock Sonnet's quantizer with the same codebook."""
  if ema:
    ours = quantizers.VectorQuantizerEMA(4, 16, 0.25, 0.9, dtype=dtype, **options)
    stock = snt.nets.VectorQuantizerEMA(4, 16, 0.25, 0.9, dtype=dtype)
    stock.embeddings.assign(ours.embeddings)
    stock.ema_dw.average.assign(ours.ema_dw.average)
  else:
    ours = quantizers.VectorQuantizer(4, 16, 0.25, dtype=dtype, **options)
    stock = snt.nets.VectorQuantizer(4, 16, 0.25, dtype=dtype)
    stock.embeddings.assign(ours.embeddings)
  return ours, stock


def _inputs(shape, dtype=np.float32, seed=0):
  return tf.constant(np.random.RandomState(seed).randn(*shape).astype(dtype))


def _two_replica_strategy(strategy_class):
  # ReductionToOneDevice: several strategies over the same devices in one
  # process would otherwise reuse collective instance keys.
  return strategy_class(["/cpu:0", "/cpu:1"],
                        cross_device_ops=tf.distribute.ReductionToOneDevice())


class ParityWithSonnetTest(parameterized.TestCase):

  @parameterized.product(ema=[False, True], use_tf_function=[False, True],
                         dtype=[tf.float32, tf.float64])
  def test_outputs_and_updates_equal_stock(self, ema, use_tf_function, dtype):
    ours, stock = _make_pair(ema, dtype)
    call_ours = tf.function(ours.__call__) if use_tf_function else ours.__call__
    for step in range(3):
      inputs = _inputs([2, 3, 5, 4], dtype.as_numpy_dtype, seed=step)
      # Stock is run eagerly: its EMA fails in float64 under tf.function.
      expected = stock(inputs, is_training=True)
      actual = call_ours(inputs, is_training=True)
      for key, value in expected.items():
        np.testing.assert_allclose(actual[key], value, rtol=1e-5, atol=1e-5,
                                   err_msg=key)
      np.testing.assert_allclose(ours.embeddings, stock.embeddings,
                                 rtol=1e-5, atol=1e-6)

  def test_gradients_equal_stock(self):
    ours, stock = _make_pair(ema=False)
    inputs = _inputs([8, 4])
    grads = []
    for module in (ours, stock):
      with tf.GradientTape() as tape:
        tape.watch(inputs)
        out = module(inputs, is_training=True)
        objective = out["loss"] + tf.reduce_sum(out["quantize"] * inputs)
      grads.append(tape.gradient(objective, [inputs, module.embeddings]))
    for actual, expected in zip(*grads):
      np.testing.assert_allclose(tf.convert_to_tensor(actual),
                                 tf.convert_to_tensor(expected), rtol=1e-5,
                                 atol=1e-6)

  @parameterized.parameters(False, True)
  def test_nearest_codes_match_numpy(self, ema):
    ours, _ = _make_pair(ema)
    inputs = _inputs([6, 7, 4])
    out = ours(inputs, is_training=False)
    codebook = ours.embeddings.numpy()
    flat = inputs.numpy().reshape(-1, 4)
    distances = ((flat[:, :, None] - codebook[None])**2).sum(axis=1)
    np.testing.assert_array_equal(out["encoding_indices"],
                                  distances.argmin(axis=1).reshape(6, 7))
    np.testing.assert_allclose(out["distances"], distances, rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(out["quantize"],
                               codebook.T[distances.argmin(axis=1)].reshape(
                                   6, 7, 4), rtol=1e-6, atol=1e-6)
    counts = np.bincount(distances.argmin(axis=1), minlength=16)
    self.assertEqual(out["codes_used"], np.count_nonzero(counts))
    probs = counts / counts.sum()
    np.testing.assert_allclose(
        out["perplexity"], np.exp(-np.sum(probs * np.log(probs + 1e-10))),
        rtol=1e-5)

  def test_chunked_search_equals_full_search(self):
    ours, _ = _make_pair(ema=True)
    inputs = _inputs([50, 4])
    full = ours(inputs, is_training=False)["encoding_indices"]
    # A tiny chunk budget forces the chunked search with a ragged last chunk.
    with mock.patch.object(quantizers, "_CHUNK_ELEMENTS", 16 * 7):
      chunked = tf.function(
          lambda x: ours(x, is_training=False)["encoding_indices"])(inputs)
    np.testing.assert_array_equal(chunked, full)


class BehaviourTest(parameterized.TestCase):

  @parameterized.parameters([[4]], [[3, 4]], [[2, 3, 4]], [[2, 2, 3, 4]])
  def test_shapes(self, shape):
    vq = quantizers.VectorQuantizerEMA(4, 16, 0.25, 0.99)
    out = vq(_inputs([2] + shape[:-1] + [4]), is_training=True)
    n = 2 * int(np.prod(shape[:-1]))
    self.assertEqual(out["quantize"].shape, [2] + shape[:-1] + [4])
    self.assertEqual(out["encoding_indices"].shape, [2] + shape[:-1])
    self.assertEqual(out["encodings"].shape, [n, 16])
    self.assertEqual(out["distances"].shape, [n, 16])
    self.assertEqual(vq.embeddings.shape, [4, 16])
    self.assertFalse(vq.embeddings.trainable)

  def test_ema_updates_only_when_training(self):
    vq = quantizers.VectorQuantizerEMA(4, 16, 0.25, 0.9)
    before = vq.embeddings.numpy()
    vq(_inputs([32, 4]), is_training=False)
    np.testing.assert_array_equal(vq.embeddings, before)
    self.assertEqual(vq.training_steps.numpy(), 0)
    vq(_inputs([32, 4]), is_training=True)
    self.assertFalse(np.allclose(vq.embeddings, before))
    self.assertEqual(vq.training_steps.numpy(), 1)

  @parameterized.parameters(False, True)
  def test_zero_size_batch(self, ema):
    vq, _ = _make_pair(ema, dead_code_threshold=1.0, kmeans_init=True)
    out = vq(tf.zeros([0, 3, 4]), is_training=True)
    self.assertEqual(out["quantize"].shape, [0, 3, 4])
    self.assertEqual(out["loss"].numpy(), 0.)
    self.assertEqual(out["codes_used"].numpy(), 0)
    self.assertTrue(np.all(np.isfinite(vq.embeddings.numpy())))

  @parameterized.parameters(tf.bfloat16, tf.float16)
  def test_low_precision_inputs(self, dtype):
    vq = quantizers.VectorQuantizerEMA(4, 16, 0.25, 0.9)
    reference = quantizers.VectorQuantizerEMA(4, 16, 0.25, 0.9)
    reference.embeddings.assign(vq.embeddings)
    inputs = tf.cast(_inputs([8, 5, 4]), dtype)
    out = vq(inputs, is_training=True)
    self.assertEqual(out["quantize"].dtype, dtype)
    self.assertEqual(out["distances"].dtype, tf.float32)
    self.assertEqual(vq.embeddings.dtype, tf.float32)
    np.testing.assert_array_equal(
        out["encoding_indices"],
        reference(tf.cast(inputs, tf.float32), False)["encoding_indices"])

  def test_quantize_looks_codes_up(self):
    vq = quantizers.VectorQuantizer(4, 16, 0.25)
    indices = tf.constant([[0, 15], [3, 3]])
    np.testing.assert_array_equal(vq.quantize(indices),
                                  vq.embeddings.numpy().T[indices.numpy()])

  @parameterized.parameters(-1, 16)
  def test_quantize_rejects_out_of_range_indices(self, index):
    vq = quantizers.VectorQuantizer(4, 16, 0.25)
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "code index"):
      vq.quantize(tf.constant([0, index]))


class ErrorsTest(parameterized.TestCase):

  def test_wrong_channel_size_names_both_sizes(self):
    vq = quantizers.VectorQuantizer(4, 16, 0.25)
    with self.assertRaisesRegex(ValueError, "embedding_dim=4, got 5"):
      vq(tf.zeros([2, 5]), is_training=False)

  def test_rank_one_input(self):
    vq = quantizers.VectorQuantizer(4, 16, 0.25)
    with self.assertRaisesRegex(ValueError, "rank >= 2"):
      vq(tf.zeros([4]), is_training=False)

  def test_integer_input(self):
    vq = quantizers.VectorQuantizerEMA(4, 16, 0.25, 0.9)
    with self.assertRaisesRegex(TypeError, "floating point"):
      vq(tf.zeros([2, 4], tf.int32), is_training=False)

  @parameterized.named_parameters(
      ("decay_negative", dict(decay=-0.1), "decay"),
      ("decay_above_one", dict(decay=1.5), "decay"),
      ("zero_dim", dict(embedding_dim=0), "embedding_dim"),
      ("negative_codes", dict(num_embeddings=-2), "num_embeddings"),
      ("negative_cost", dict(commitment_cost=-1.), "commitment_cost"),
      ("negative_epsilon", dict(epsilon=-1.), "epsilon"),
      ("usage_decay", dict(usage_decay=1.0), "usage_decay"),
      ("threshold", dict(dead_code_threshold=-1.), "dead_code_threshold"),
      ("kmeans_iters", dict(kmeans_iters=-1), "kmeans_iters"),
      ("integer_dtype", dict(dtype=tf.int32), "floating"),
  )
  def test_bad_constructor_arguments(self, override, message):
    kwargs = dict(embedding_dim=4, num_embeddings=16, commitment_cost=0.25,
                  decay=0.9)
    kwargs.update(override)
    with self.assertRaisesRegex(ValueError, message):
      quantizers.VectorQuantizerEMA(**kwargs)


class ReplicaTest(parameterized.TestCase):

  @parameterized.product(
      strategy_class=[tf.distribute.MirroredStrategy, snt.distribute.Replicator],
      options=[{}, dict(dead_code_threshold=2.0, kmeans_init=True)])
  def test_replicas_hold_the_same_codebook(self, strategy_class, options):
    strategy = _two_replica_strategy(strategy_class)
    with strategy.scope():
      vq = quantizers.VectorQuantizerEMA(4, 16, 0.25, 0.9, **options)
    single = quantizers.VectorQuantizerEMA(4, 16, 0.25, 0.9, **options)
    single.embeddings.assign(strategy.experimental_local_results(vq.embeddings)[0])
    single.ema_dw.average.assign(single.embeddings)
    data = np.random.RandomState(0).randn(3, 2, 32, 4).astype(np.float32)

    @tf.function
    def step(inputs):
      return strategy.run(lambda x: vq(x, is_training=True)["perplexity"],
                          args=(inputs,))

    for batch in data:
      # Each replica gets different data.
      perplexity = step(strategy.experimental_distribute_values_from_function(
          lambda ctx, batch=batch: batch[ctx.replica_id_in_sync_group]))
      expected = single(tf.constant(batch.reshape(64, 4)), is_training=True)
    first, second = strategy.experimental_local_results(vq.embeddings)
    np.testing.assert_array_equal(first, second)
    if not options:
      # Without restarts the codebook is what one device computes on the
      # concatenated batch, and perplexity comes from the global histogram.
      np.testing.assert_allclose(first, single.embeddings, rtol=1e-5, atol=1e-6)
      for value in strategy.experimental_local_results(perplexity):
        np.testing.assert_allclose(value, expected["perplexity"], rtol=1e-5)


class CodebookHealthTest(parameterized.TestCase):

  def _collapsed(self, ema, **options):
    if ema:
      vq = quantizers.VectorQuantizerEMA(4, 16, 0.25, 0.9, **options)
    else:
      vq = quantizers.VectorQuantizer(4, 16, 0.25, **options)
    # Every code at one point, the origin, far from the data (around 10).
    vq.embeddings.assign(tf.zeros([4, 16]))
    if ema:
      vq.ema_dw.average.assign(vq.embeddings)
    return vq

  @parameterized.parameters(False, True)
  def test_restarts_revive_a_collapsed_codebook(self, ema):
    data = [_inputs([64, 4], seed=s) + 10 for s in range(8)]
    without = self._collapsed(ema)
    with_restarts = self._collapsed(ema, dead_code_threshold=0.5)
    for batch in data:
      used_without = without(batch, is_training=True)["codes_used"]
      used_with = with_restarts(batch, is_training=True)["codes_used"]
    self.assertEqual(used_without, 1)
    self.assertGreaterEqual(used_with, 12)

  def test_restarts_work_under_xla(self):
    vq = self._collapsed(True, dead_code_threshold=0.5, kmeans_init=True)
    step = tf.function(lambda x: vq(x, is_training=True)["codes_used_ema"],
                       jit_compile=True)
    for s in range(4):
      used = step(_inputs([64, 4], seed=s) + 10)
    self.assertGreaterEqual(used, 12)

  @parameterized.parameters(False, True)
  def test_kmeans_init_lowers_first_step_error(self, ema):
    inputs = _inputs([256, 4]) * 3 + 1
    errors = []
    for kmeans_init in (False, True):
      vq, _ = _make_pair(ema, kmeans_init=kmeans_init)
      out = vq(inputs, is_training=True)
      errors.append(np.mean((out["quantize"].numpy() - inputs.numpy())**2))
    self.assertLess(errors[1], 0.5 * errors[0])

  def test_codes_used_ema_counts_recent_codes(self):
    # Without an optimizer step the codebook of VectorQuantizer stays put.
    vq = quantizers.VectorQuantizer(4, 16, 0.25, usage_decay=0.5)
    codes = tf.transpose(vq.embeddings)
    out = vq(codes[:8], is_training=True)
    self.assertEqual(out["codes_used"], 8)
    self.assertEqual(out["codes_used_ema"], 8)
    out = vq(codes[8:], is_training=True)
    # Codes 0-7 were used one step ago: still inside the window.
    self.assertEqual(out["codes_used"], 8)
    self.assertEqual(out["codes_used_ema"], 16)
    for _ in range(2):
      out = vq(codes[8:], is_training=True)
    self.assertEqual(out["codes_used_ema"], 8)

  @parameterized.parameters(False, True)
  def test_cosine_codes_are_unit_vectors(self, ema):
    vq, _ = _make_pair(ema, cosine=True)
    out = vq(_inputs([32, 4]) * 5, is_training=True)
    np.testing.assert_allclose(np.linalg.norm(out["quantize"], axis=-1), 1.,
                               rtol=1e-5)
    np.testing.assert_allclose(
        np.linalg.norm(vq.quantize(out["encoding_indices"]), axis=-1), 1.,
        rtol=1e-5)


if __name__ == "__main__":
  absltest.main()
