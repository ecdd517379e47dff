"""Tests of sonnet_vqvae.quantizers against stock snt.nets and NumPy."""

import os
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest
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


def _make(ema: bool, num_embeddings=16, embedding_dim=4, **options):
  if ema:
    return quantizers.VectorQuantizerEMA(embedding_dim, num_embeddings, 0.25,
                                         0.9, **options)
  return quantizers.VectorQuantizer(embedding_dim, num_embeddings, 0.25,
                                    **options)


def _state(vq):
  """Every variable's value, by name."""
  return {v.name: v.numpy() for v in vq.variables}


def _assert_same_state(actual, expected):
  test = absltest.TestCase()
  test.assertEqual(sorted(actual), sorted(expected))
  for name, value in expected.items():
    np.testing.assert_array_equal(actual[name], value, err_msg=name)


def _with_nonfinite_rows(batch, rows=(0, 5, 9)):
  """`batch` [N, D] with NaN, +Inf and -Inf rows inserted before `rows`."""
  bad = np.zeros([3, batch.shape[1]], batch.dtype)
  bad[0, 1] = np.nan  # One NaN component is enough.
  bad[1] = np.inf
  bad[2, -1] = -np.inf
  return np.insert(batch, rows, bad, axis=0)


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
  def test_zero_size_batch_changes_nothing(self, ema):
    vq, _ = _make_pair(ema, dead_code_threshold=1.0, kmeans_init=True)
    vq(_inputs([8, 4]), is_training=True)
    before = _state(vq)
    out = vq(tf.zeros([0, 3, 4]), is_training=True)
    self.assertEqual(out["quantize"].shape, [0, 3, 4])
    self.assertEqual(out["loss"].numpy(), 0.)
    self.assertEqual(out["codes_used"].numpy(), 0)
    self.assertEqual(out["nonfinite_inputs"].numpy(), 0)
    _assert_same_state(_state(vq), before)

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

  @parameterized.product(index=[-1, 16], use_tf_function=[False, True])
  def test_quantize_rejects_out_of_range_indices(self, index, use_tf_function):
    vq = quantizers.VectorQuantizer(4, 16, 0.25)
    quantize = tf.function(vq.quantize) if use_tf_function else vq.quantize
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "code index"):
      quantize(tf.constant([0, index]))

  @parameterized.parameters(tf.int32, tf.int64)
  def test_quantize_under_xla_poisons_out_of_range_indices(self, dtype):
    vq = quantizers.VectorQuantizer(4, 16, 0.25)
    quantize = tf.function(vq.quantize, jit_compile=True)
    vectors = quantize(tf.constant([[3, -1], [16, 15], [-7, 100]], dtype))
    codes = vq.embeddings.numpy().T
    np.testing.assert_array_equal(vectors[0, 0], codes[3])
    np.testing.assert_array_equal(vectors[1, 1], codes[15])
    for row, col in ((0, 1), (1, 0), (2, 0), (2, 1)):
      self.assertTrue(np.all(np.isnan(vectors[row, col])), (row, col))


class ExponentialMovingAverageTest(parameterized.TestCase):

  @parameterized.product(dtype=[tf.float32, tf.float64],
                         use_tf_function=[False, True])
  def test_equals_sonnet_bit_for_bit(self, dtype, use_tf_function):
    decay = tf.constant(0.9, dtype)
    ours = quantizers.ExponentialMovingAverage(decay, name="ema")
    stock = snt.ExponentialMovingAverage(decay, name="ema")
    call = tf.function(ours.__call__) if use_tf_function else ours.__call__
    for step in range(4):
      value = _inputs([3, 2], dtype.as_numpy_dtype, seed=step)
      np.testing.assert_array_equal(call(value), stock(value))
    self.assertEqual(ours.counter.numpy(), 4)
    self.assertEqual([v.name for v in ours.variables],
                     [v.name for v in stock.variables])

  def test_reads_and_writes_sonnet_checkpoints(self):
    stock = snt.ExponentialMovingAverage(0.8)
    ours = quantizers.ExponentialMovingAverage(0.8)
    for ema in (stock, ours):
      ema.initialize(tf.zeros([3]))
    for step in range(2):
      stock(_inputs([3], seed=step))
    with tempfile.TemporaryDirectory() as directory:
      path = tf.train.Checkpoint(ema=stock).write(
          os.path.join(directory, "ckpt"))
      tf.train.Checkpoint(ema=ours).read(path).assert_consumed()
    # Equal averages from here on need equal counter and hidden state.
    for step in range(2, 4):
      value = _inputs([3], seed=step)
      np.testing.assert_array_equal(ours(value), stock(value))

  def test_apply_if_false_changes_nothing(self):
    ema = quantizers.ExponentialMovingAverage(0.9)
    reference = quantizers.ExponentialMovingAverage(0.9)
    for step in range(3):
      value = _inputs([4], seed=step)
      ema(value, apply_if=tf.constant(True))
      reference(value)
      ema(value * 100, apply_if=tf.constant(False))
      np.testing.assert_array_equal(ema.value, reference.value)
      self.assertEqual(ema.counter.numpy(), step + 1)
      np.testing.assert_array_equal(ema.hidden, reference.hidden)

  def test_reset_where_sets_entries_and_blends_from_them(self):
    decay = 0.75
    ema = quantizers.ExponentialMovingAverage(decay)
    for step in range(3):
      ema(_inputs([4], seed=step))
    before = ema.value.numpy()
    mask = np.array([True, False, True, False])
    ema.reset_where(tf.constant(mask), 5.)
    np.testing.assert_allclose(ema.value, np.where(mask, 5., before))
    np.testing.assert_allclose(
        ema.hidden, np.where(mask, 5., before) * (1 - decay**3), rtol=1e-6)
    value = _inputs([4], seed=9).numpy()
    # The next update weighs the reset value as an average of 3 updates.
    hidden = np.where(mask, 5., before) * (1 - decay**3)
    hidden = hidden - (hidden - value) * (1 - decay)
    np.testing.assert_allclose(ema(value), hidden / (1 - decay**4), rtol=1e-6)

  def test_reset_forgets_everything(self):
    ema = quantizers.ExponentialMovingAverage(0.5)
    ema(tf.ones([2]))
    ema.reset()
    self.assertEqual(ema.counter.numpy(), 0)
    np.testing.assert_array_equal(ema.hidden, [0., 0.])
    np.testing.assert_array_equal(ema(tf.fill([2], 3.)), [3., 3.])


@pytest.mark.nonfinite
class NonFiniteInputsTest(parameterized.TestCase):

  @parameterized.product(
      ema=[False, True],
      options=[{}, dict(dead_code_threshold=0.5),
               dict(kmeans_init=True, dead_code_threshold=0.5)],
      use_tf_function=[False, True])
  def test_state_equals_a_run_without_them(self, ema, options,
                                           use_tf_function):
    dirty, clean = _make(ema, **options), _make(ema, **options)
    for vq in (dirty, clean):
      # Collapsed far from the data, so that restarts happen.
      vq.embeddings.assign(tf.zeros([4, 16]))

    def both(dirty_batch, clean_batch):
      return (dirty(dirty_batch, is_training=True),
              clean(clean_batch, is_training=True))

    call = tf.function(both) if use_tf_function else both  # One trace.
    for step in range(4):
      batch = _inputs([24, 4], seed=step).numpy() + 10
      out, expected = call(tf.constant(_with_nonfinite_rows(batch)),
                           tf.constant(batch))
      _assert_same_state(_state(dirty), _state(clean))
      self.assertEqual(out["nonfinite_inputs"], 3)
      self.assertEqual(expected["nonfinite_inputs"], 0)
      for key in ("perplexity", "codes_used", "codes_used_ema"):
        self.assertEqual(out[key], expected[key], key)
      indices = out["encoding_indices"].numpy()
      np.testing.assert_array_equal(np.delete(indices, [0, 6, 11]),
                                    expected["encoding_indices"])
      np.testing.assert_array_equal(indices[[0, 6, 11]], 0)
      self.assertTrue(np.isnan(out["loss"]))
    for value in _state(dirty).values():
      self.assertTrue(np.all(np.isfinite(value)))
    if options:
      self.assertGreaterEqual(expected["codes_used"], 8)  # Restarted codes.

  @parameterized.product(
      ema=[False, True],
      options=[{}, dict(kmeans_init=True, dead_code_threshold=0.5)])
  def test_an_all_nonfinite_batch_changes_nothing(self, ema, options):
    vq = _make(ema, **options)
    # Fewer vectors than codes: some codes are dead, yet none may restart.
    vq(_inputs([4, 4]), is_training=True)
    before = _state(vq)
    batch = np.full([2, 5, 4], np.nan, np.float32)
    batch[1, :, 2] = -np.inf
    out = vq(tf.constant(batch), is_training=True)
    _assert_same_state(_state(vq), before)
    self.assertEqual(out["nonfinite_inputs"], 10)
    self.assertEqual(out["codes_used"], 0)
    self.assertEqual(out["perplexity"], 1.)
    np.testing.assert_array_equal(out["encoding_indices"], 0)

  def test_first_batch_all_nonfinite_keeps_kmeans_for_the_next(self):
    vq = _make(True, kmeans_init=True)
    initial = vq.embeddings.numpy()
    vq(tf.fill([8, 4], np.nan), is_training=True)
    np.testing.assert_array_equal(vq.embeddings, initial)
    self.assertEqual(vq.training_steps, 0)
    reference = _make(True, kmeans_init=True)
    batch = _inputs([32, 4]) * 3
    vq(batch, is_training=True)
    reference(batch, is_training=True)
    np.testing.assert_array_equal(vq.embeddings, reference.embeddings)

  @pytest.mark.slow
  def test_replicas(self):
    strategy = _two_replica_strategy(tf.distribute.MirroredStrategy)
    with strategy.scope():
      vq = quantizers.VectorQuantizerEMA(4, 16, 0.25, 0.9)
      restarting = quantizers.VectorQuantizerEMA(
          4, 16, 0.25, 0.9, dead_code_threshold=2.0, kmeans_init=True)
    single = quantizers.VectorQuantizerEMA(4, 16, 0.25, 0.9)
    single.embeddings.assign(
        strategy.experimental_local_results(vq.embeddings)[0])
    data = np.random.RandomState(0).randn(3, 2, 32, 4).astype(np.float32)
    dirty = [[_with_nonfinite_rows(part) for part in batch] for batch in data]
    # Replica 0's second batch is all NaN: restarts, which draw from replica
    # 0's batch, must wait for one with finite vectors there.
    dirty[1][0] = np.full([35, 4], np.nan, np.float32)

    @tf.function
    def step(inputs):
      def replica_fn(x):
        out = vq(x, is_training=True)
        restarting(x, is_training=True)
        return out["nonfinite_inputs"], out["codes_used"]
      return strategy.run(replica_fn, args=(inputs,))

    for i, batch in enumerate(dirty):
      nonfinite, codes_used = step(
          strategy.experimental_distribute_values_from_function(
              lambda ctx, batch=batch: batch[ctx.replica_id_in_sync_group]))
      finite = data[i].reshape(64, 4)[32:] if i == 1 else data[i].reshape(64, 4)
      expected = single(tf.constant(finite), is_training=True)
      for value in strategy.experimental_local_results(nonfinite):
        self.assertEqual(value, 38 if i == 1 else 6)
      for value in strategy.experimental_local_results(codes_used):
        self.assertEqual(value, expected["codes_used"])
    for quantizer in (vq, restarting):
      first, second = strategy.experimental_local_results(quantizer.embeddings)
      np.testing.assert_array_equal(first, second)
      self.assertTrue(np.all(np.isfinite(first)))
    np.testing.assert_allclose(
        strategy.experimental_local_results(vq.embeddings)[0],
        single.embeddings, rtol=1e-5, atol=1e-6)


class SmallSizesTest(parameterized.TestCase):

  @parameterized.product(ema=[False, True],
                         options=[{}, dict(kmeans_init=True,
                                           dead_code_threshold=0.5)])
  def test_one_code(self, ema, options):
    vq = _make(ema, num_embeddings=1, **options)
    for step in range(3):
      inputs = _inputs([10, 4], seed=step)
      out = vq(inputs, is_training=True)
      np.testing.assert_array_equal(out["encoding_indices"], 0)
      self.assertEqual(out["codes_used"], 1)
      np.testing.assert_allclose(out["perplexity"], 1.)
    self.assertEqual(vq.embeddings.shape, [4, 1])
    if ema:
      # One cluster: with decay 0.9 the codebook is the debiased EMA of the
      # batch means, weighted as batch sizes are equal.
      means = np.stack([_inputs([10, 4], seed=s).numpy().mean(0)
                        for s in range(3)])
      weights = 0.9**np.arange(2, -1, -1)
      np.testing.assert_allclose(vq.embeddings.numpy()[:, 0],
                                 weights @ means / weights.sum(), rtol=1e-5,
                                 atol=1e-6)
    np.testing.assert_array_equal(vq.quantize(tf.constant([0, 0])),
                                  vq.embeddings.numpy().T[[0, 0]])

  @parameterized.product(ema=[False, True],
                         options=[{}, dict(kmeans_init=True,
                                           dead_code_threshold=0.5)])
  def test_one_dimension(self, ema, options):
    vq = _make(ema, embedding_dim=1, **options)
    for step in range(3):
      inputs = _inputs([40, 1], seed=step)
      codebook = vq.embeddings.numpy()
      out = vq(inputs, is_training=False)
      np.testing.assert_array_equal(
          out["encoding_indices"],
          np.abs(inputs.numpy() - codebook).argmin(axis=1))
      out = vq(inputs, is_training=True)
      self.assertTrue(np.all(np.isfinite(vq.embeddings.numpy())))
    self.assertEqual(vq.embeddings.shape, [1, 16])


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

  @parameterized.parameters(tf.distribute.MirroredStrategy,
                            snt.distribute.Replicator)
  def test_replicas_hold_the_same_codebook(self, strategy_class):
    # Without and with restarts: both quantizers in one traced step.
    strategy = _two_replica_strategy(strategy_class)
    options = [{}, dict(dead_code_threshold=2.0, kmeans_init=True)]
    with strategy.scope():
      vqs = [quantizers.VectorQuantizerEMA(4, 16, 0.25, 0.9, **o)
             for o in options]
    single = quantizers.VectorQuantizerEMA(4, 16, 0.25, 0.9)
    single.embeddings.assign(
        strategy.experimental_local_results(vqs[0].embeddings)[0])
    single.ema_dw.average.assign(single.embeddings)
    data = np.random.RandomState(0).randn(3, 2, 32, 4).astype(np.float32)

    @tf.function
    def step(inputs):
      return strategy.run(
          lambda x: [vq(x, is_training=True)["perplexity"] for vq in vqs],
          args=(inputs,))

    for batch in data:
      # Each replica gets different data.
      perplexity, _ = step(
          strategy.experimental_distribute_values_from_function(
              lambda ctx, batch=batch: batch[ctx.replica_id_in_sync_group]))
      expected = single(tf.constant(batch.reshape(64, 4)), is_training=True)
    for vq in vqs:
      first, second = strategy.experimental_local_results(vq.embeddings)
      np.testing.assert_array_equal(first, second)
    # Without restarts the codebook is what one device computes on the
    # concatenated batch, and perplexity comes from the global histogram.
    first = strategy.experimental_local_results(vqs[0].embeddings)[0]
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

  @pytest.mark.slow
  @pytest.mark.nonfinite
  def test_restarts_and_nonfinite_inputs_under_xla(self):
    vq = self._collapsed(True, dead_code_threshold=0.5, kmeans_init=True)
    step = tf.function(lambda x: vq(x, is_training=True), jit_compile=True)
    for s in range(4):
      batch = _with_nonfinite_rows(_inputs([64, 4], seed=s).numpy() + 10)
      out = step(tf.constant(batch))
      self.assertEqual(out["nonfinite_inputs"], 3)
    self.assertGreaterEqual(out["codes_used_ema"], 12)
    for value in _state(vq).values():
      self.assertTrue(np.all(np.isfinite(value)))

  def test_xla_step_with_kmeans_is_one_program_for_every_batch(self):
    # A value XLA must know at compile time (the batch, the step) is baked
    # into the program: a new program, and a compilation, per call.
    vq = _make(True, kmeans_init=True, kmeans_iters=1, dead_code_threshold=0.5)
    step = tf.function(lambda x: vq(x, is_training=True)["quantize"],
                       jit_compile=True)
    programs = set()
    for s in range(3):
      programs.add(step.experimental_get_compiler_ir(_inputs([32, 4], seed=s))(
          stage="hlo"))
      vq.training_steps.assign_add(1)
    self.assertEqual(len(programs), 1, "XLA programs for 3 batches and steps")

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


def _bfloat16_matmul(a, b):
  """tf.matmul with operands rounded to bfloat16: a TPU's default precision."""
  def rounded(t):
    return tf.cast(tf.cast(t, tf.bfloat16), t.dtype)
  return tf.matmul(rounded(a), rounded(b))


def _search_cases():
  """(name, inputs [N, D], codebook [D, K]) on which a rounding matmul errs."""
  rng = np.random.RandomState(0)
  d, k, n = 64, 512, 4096
  cases = []
  for offset in (3, 10):  # offset / spread: a common offset, spread 1
    cases.append((f"offset{offset}", offset + rng.randn(n, d),
                  offset + rng.randn(d, k)))
  # Clusters of 8 close codes far from the origin, inputs among them.
  centres = 10 + rng.randn(k // 8, d)
  codes = np.repeat(centres, 8, axis=0) + 0.05 * rng.randn(k, d)
  inputs = np.repeat(centres, n // (k // 8), axis=0) + 0.05 * rng.randn(n, d)
  cases.append(("clusters_of_8", inputs, codes.T))
  return [(name, x.astype(np.float32), c.astype(np.float32))
          for name, x, c in cases]


def _float64_codes(inputs, codebook):
  x, c = inputs.astype(np.float64), codebook.astype(np.float64)
  return ((x**2).sum(1)[:, None] - 2 * x @ c + (c**2).sum(0)).argmin(1)


class SearchPrecisionTest(parameterized.TestCase):

  def _codes(self, inputs, codebook, rerank, jit=False):
    vq = quantizers.VectorQuantizerEMA(codebook.shape[0], codebook.shape[1],
                                       0.25, 0.9)
    vq.embeddings.assign(codebook)
    with mock.patch.object(quantizers, "_matmul", _bfloat16_matmul), \
        mock.patch.object(quantizers, "reduced_precision_matmul",
                          lambda: rerank):
      search = tf.function(
          lambda x: vq(x, is_training=False)["encoding_indices"],
          jit_compile=jit)
      return search(tf.constant(inputs)).numpy()

  def test_bfloat16_matmuls_pick_float64_codes(self):
    for name, inputs, codebook in _search_cases():
      expected = _float64_codes(inputs, codebook)
      agree = np.mean(self._codes(inputs, codebook, True) == expected)
      self.assertGreaterEqual(agree, 0.999, name)
      # Without re-ranking, the rounding matmul picks other codes.
      plain = np.mean(self._codes(inputs, codebook, False) == expected)
      self.assertLess(plain, 0.99, name)

  def test_chunked_and_xla_searches_rerank_too(self):
    _, inputs, codebook = _search_cases()[-1]
    inputs = inputs[:1000]
    expected = _float64_codes(inputs, codebook)
    # A small chunk budget forces the chunked search with a ragged last chunk.
    with mock.patch.object(quantizers, "_CHUNK_ELEMENTS", 512 * 300):
      chunked = self._codes(inputs, codebook, True)
    self.assertGreaterEqual(np.mean(chunked == expected), 0.999)
    xla = self._codes(inputs, codebook, True, jit=True)
    self.assertGreaterEqual(np.mean(xla == expected), 0.999)

  def test_reduced_precision_is_detected_by_device(self):
    def devices(tpus=(), gpus=()):
      return lambda kind: {"TPU": list(tpus), "GPU": list(gpus)}.get(kind, [])
    with mock.patch.object(tf.config, "list_logical_devices", devices()):
      self.assertFalse(quantizers.reduced_precision_matmul())
    with mock.patch.object(tf.config, "list_logical_devices",
                           devices(tpus=["TPU:0"])):
      self.assertTrue(quantizers.reduced_precision_matmul())
    with mock.patch.object(tf.config, "list_logical_devices",
                           devices(gpus=["GPU:0"])):
      self.assertTrue(quantizers.reduced_precision_matmul())
      with mock.patch.object(tf.config.experimental,
                             "tensor_float_32_execution_enabled",
                             lambda: False):
        self.assertFalse(quantizers.reduced_precision_matmul())


@pytest.mark.nonfinite
class HugeInputsTest(parameterized.TestCase):

  @parameterized.product(
      ema=[False, True], value=[3e38, 1e30, -1e16],
      options=[{}, dict(kmeans_init=True, dead_code_threshold=0.5)])
  def test_huge_finite_vectors_count_as_non_finite(self, ema, value, options):
    vq = _make(ema, embedding_dim=64, **options)
    vq(tf.zeros([0, 64]), is_training=False)  # creates every variable
    before = _state(vq)
    out = vq(tf.fill([4, 64], value), is_training=True)
    _assert_same_state(_state(vq), before)
    self.assertEqual(int(out["nonfinite_inputs"]), 4)
    self.assertTrue(np.isnan(float(out["loss"])))
    for seed in range(5):
      vq(_inputs([32, 64], seed=seed), is_training=True)
    codebook = vq.embeddings.numpy()
    self.assertTrue(np.all(np.isfinite(codebook)))
    self.assertLess(np.abs(codebook).max(), 100.)
    for variable in vq.variables:
      self.assertTrue(np.all(np.isfinite(variable.numpy())), variable.name)

  def test_the_bound_is_on_the_squared_norm(self):
    vq = _make(True, embedding_dim=4)
    bound = np.sqrt(quantizers.MAX_SQUARED_NORM / 4)
    inputs = np.stack([np.full(4, 0.99 * bound), np.full(4, 1.01 * bound)])
    out = vq(tf.constant(inputs, tf.float32), is_training=False)
    self.assertEqual(int(out["nonfinite_inputs"]), 1)
    self.assertTrue(np.isfinite(out["quantize"].numpy()[0]).all())
    self.assertTrue(np.isnan(out["quantize"].numpy()[1]).all())


class PooledReplicaTest(parameterized.TestCase):

  @parameterized.parameters(tf.distribute.MirroredStrategy,
                            snt.distribute.Replicator)
  def test_kmeans_draws_from_every_replica(self, strategy_class):
    strategy = _two_replica_strategy(strategy_class)
    rng = np.random.RandomState(0)
    # 16 clusters, 8 on each replica: replica 0's around +10, replica 1's
    # around -10, 2 vectors of each cluster per replica.
    centres = np.concatenate([10 + rng.randn(8, 4), -10 + rng.randn(8, 4)])
    batch = (np.repeat(centres, 2, axis=0) +
             0.01 * rng.randn(32, 4)).astype(np.float32).reshape(2, 16, 4)
    options = dict(kmeans_init=True, dead_code_threshold=0.5, seed=3)
    with strategy.scope():
      vq = quantizers.VectorQuantizerEMA(4, 16, 0.25, 0.9, **options)
    single = quantizers.VectorQuantizerEMA(4, 16, 0.25, 0.9, **options)

    @tf.function
    def step(inputs):
      return strategy.run(lambda x: vq(x, is_training=True)["codes_used"],
                          args=(inputs,))

    codes_used = step(strategy.experimental_distribute_values_from_function(
        lambda ctx: batch[ctx.replica_id_in_sync_group]))
    expected = single(tf.constant(batch.reshape(32, 4)), is_training=True)
    first, second = strategy.experimental_local_results(vq.embeddings)
    np.testing.assert_array_equal(first, second)

    def clusters_with_a_code(codebook):
      distances = ((centres[:, :, None] - codebook[None])**2).sum(1)
      return int((distances.min(axis=1) < 1.).sum())

    # The codes cover both replicas' clusters, as one device's on the whole
    # batch do (replica 0's alone would cover 8).
    self.assertEqual(clusters_with_a_code(single.embeddings.numpy()), 16)
    self.assertEqual(clusters_with_a_code(first.numpy()), 16)
    self.assertEqual(int(expected["codes_used"]), 16)
    for value in strategy.experimental_local_results(codes_used):
      self.assertEqual(int(value), 16)
    np.testing.assert_allclose(first, single.embeddings, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
