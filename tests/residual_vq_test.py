"""Tests of ResidualVectorQuantizer against NumPy and our one-stage quantizers."""

from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf

import bottleneck_checks
import sonnet_vqvae
from sonnet_vqvae import quantizers
from sonnet_vqvae import residual_vq


def _make(num_stages=3, num_embeddings=8, embedding_dim=4, decay=0.9,
          **options):
  """A residual VQ whose stage s has codebook N(0, 1) from seed s."""
  rvq = residual_vq.ResidualVectorQuantizer(
      embedding_dim, num_embeddings, num_stages, 0.25, decay=decay, **options)
  for s, stage in enumerate(rvq.stages[:len(set(map(id, rvq.stages)))]):
    stage.embeddings.assign(np.random.RandomState(s).randn(
        embedding_dim, num_embeddings).astype(np.float32))
  return rvq


def _codebooks(rvq):
  return [stage.embeddings.numpy().T.astype(np.float64)
          for stage in rvq.stages]


def _numpy_residual(x, codebooks):
  """Greedy residual quantization of [N, D] x: indices [N, S], codes, sums
  of squared errors per stage."""
  residual, total, indices, errors = x.copy(), np.zeros_like(x), [], []
  for codebook in codebooks:
    distances = ((residual[:, None] - codebook[None])**2).sum(-1)
    index = distances.argmin(1)
    errors.append(((residual - codebook[index])**2).sum())
    total += codebook[index]
    residual = residual - codebook[index]
    indices.append(index)
  return np.stack(indices, 1), total, np.array(errors)


def _numpy_tuple_stats(indices):
  _, counts = np.unique(indices, axis=0, return_counts=True)
  probs = counts / counts.sum()
  return len(counts), np.exp(-np.sum(probs * np.log(probs + 1e-10)))


class ResidualVectorQuantizerTest(parameterized.TestCase):

  @parameterized.product(use_ema=[False, True], shared_codebook=[False, True])
  def test_matches_numpy(self, use_ema, shared_codebook):
    rvq = _make(use_ema=use_ema, shared_codebook=shared_codebook)
    x = np.random.RandomState(10).randn(6, 5, 4)
    out = rvq(tf.constant(x, tf.float32), is_training=False)
    flat = x.reshape(-1, 4).astype(np.float32).astype(np.float64)
    indices, total, errors = _numpy_residual(flat, _codebooks(rvq))
    np.testing.assert_array_equal(
        out["encoding_indices"], indices.reshape(6, 5, 3))
    np.testing.assert_allclose(out["quantize"], total.reshape(x.shape),
                               rtol=1e-5, atol=1e-5)
    factor = 0.25 if use_ema else 1.25
    np.testing.assert_allclose(out["loss"], factor * errors.sum() / flat.size,
                               rtol=1e-5)
    codes_used, perplexity = _numpy_tuple_stats(indices)
    self.assertEqual(out["codes_used"], codes_used)
    np.testing.assert_allclose(out["perplexity"], perplexity, rtol=1e-5)
    for s in range(3):
      self.assertEqual(out["stage_codes_used"][s],
                       len(np.unique(indices[:, s])))
    np.testing.assert_allclose(rvq.quantize(out["encoding_indices"]),
                               out["quantize"], rtol=1e-5, atol=1e-5)
    self.assertLen(rvq.variables, len(rvq.stages[0].variables) *
                   (1 if shared_codebook else 3))

  @parameterized.product(
      use_ema=[False, True],
      options=[{}, dict(dead_code_threshold=0.5, kmeans_init=True,
                        usage_decay=0.9)])
  def test_one_stage_is_our_quantizer(self, use_ema, options):
    rvq = _make(num_stages=1, use_ema=use_ema, **options)
    if use_ema:
      vq = quantizers.VectorQuantizerEMA(4, 8, 0.25, 0.9, **options)
      vq.ema_dw.average.assign(rvq.stages[0].ema_dw.average)
    else:
      vq = quantizers.VectorQuantizer(4, 8, 0.25, **options)
    vq.embeddings.assign(rvq.stages[0].embeddings)
    for seed in range(3):
      x = tf.constant(np.random.RandomState(seed).randn(5, 3, 4), tf.float32)
      upstream = tf.constant(np.random.RandomState(9).randn(5, 3, 4),
                             tf.float32)
      with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours = rvq(x, is_training=True)
        stock = vq(x, is_training=True)
        ours_objective = tf.reduce_sum(ours["quantize"] * upstream) + ours[
            "loss"]
        stock_objective = tf.reduce_sum(stock["quantize"] * upstream) + stock[
            "loss"]
      for key in bottleneck_checks.COMMON_KEYS:
        expected = stock[key]
        if key == "encoding_indices":
          expected = expected[..., None]
        np.testing.assert_allclose(ours[key], expected, rtol=1e-6,
                                   err_msg=key)
      np.testing.assert_array_equal(tape.gradient(ours_objective, x),
                                    tape.gradient(stock_objective, x))
      if not use_ema:
        np.testing.assert_array_equal(
            tape.gradient(ours_objective, rvq.stages[0].embeddings),
            tape.gradient(stock_objective, vq.embeddings))
    bottleneck_checks.assert_same_state(
        [(v.name.replace("residual_vector_quantizer/stage_0/", ""), v.numpy())
         for v in rvq.variables],
        [(v.name.split("/", 1)[1], v.numpy()) for v in vq.variables])

  def test_quantizer_dropout(self):
    # Without EMA the codebooks do not change in training: NumPy can
    # replay the step.
    rvq = _make(use_ema=False, quantizer_dropout=1.0)
    x = np.random.RandomState(11).randn(24, 2, 4).astype(np.float32)
    out = rvq(x, is_training=True)
    indices = out["encoding_indices"].numpy()
    # Per example: stages 0 .. n-1 kept, the rest -1.
    kept = indices >= 0
    self.assertTrue(np.all(kept[:, :, 0]))
    np.testing.assert_array_equal(kept[:, 0], kept[:, 1])
    num_kept = kept[:, 0].sum(1)
    np.testing.assert_array_equal(kept[:, 0],
                                  np.arange(3)[None] < num_kept[:, None])
    self.assertEqual(set(num_kept), {1, 2, 3})
    # Kept stages are the greedy stages; the rest add nothing.
    flat = x.reshape(-1, 4).astype(np.float64)
    codebooks = _codebooks(rvq)
    full, _, _ = _numpy_residual(flat, codebooks)
    flat_kept = kept.reshape(-1, 3)
    np.testing.assert_array_equal(indices.reshape(-1, 3)[flat_kept],
                                  full[flat_kept])
    residual, total, loss = flat.copy(), np.zeros_like(flat), 0.
    for s, codebook in enumerate(codebooks):
      codes = np.where(flat_kept[:, s:s + 1], codebook[full[:, s]], 0.)
      loss += 1.25 * np.sum(np.where(flat_kept[:, s:s + 1],
                                     (residual - codes)**2, 0.))
      total += codes
      residual -= codes
    np.testing.assert_allclose(out["quantize"], total.reshape(x.shape),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rvq.quantize(indices), out["quantize"],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["loss"], loss / flat.size, rtol=1e-5)
    # A stage counts only the vectors that reached it.
    for s in range(3):
      counts = np.bincount(full[flat_kept[:, s], s], minlength=8)
      np.testing.assert_array_equal(rvq.stages[s].code_usage, counts)
      self.assertEqual(out["stage_codes_used"][s], np.count_nonzero(counts))
    self.assertEqual(out["nonfinite_inputs"], 0)
    codes_used, perplexity = _numpy_tuple_stats(indices.reshape(-1, 3))
    self.assertEqual(out["codes_used"], codes_used)
    np.testing.assert_allclose(out["perplexity"], perplexity, rtol=1e-5)
    # Evaluation uses every stage; so does training without dropout.
    self.assertTrue(np.all(rvq(x, is_training=False)["encoding_indices"] >= 0))
    self.assertTrue(np.all(_make()(x, is_training=True)["encoding_indices"]
                           >= 0))
    # The next step draws again.
    again = rvq(x, is_training=True)["encoding_indices"].numpy() >= 0
    self.assertFalse(np.array_equal(again, kept))

  @parameterized.parameters(False, True)
  def test_gradient(self, rotation):
    rvq = _make(gradient="rotation" if rotation else "straight_through")
    x = tf.constant(np.random.RandomState(12).randn(5, 4), tf.float32)
    upstream = tf.constant(np.random.RandomState(13).randn(5, 4), tf.float32)
    with tf.GradientTape() as tape:
      tape.watch(x)
      out = rvq(x, is_training=False)
      objective = tf.reduce_sum(out["quantize"] * upstream)
    grad = tape.gradient(objective, x)
    if rotation:
      # The rotation from each input to the sum of its codes.
      with tf.GradientTape() as tape:
        tape.watch(x)
        objective = tf.reduce_sum(
            quantizers.rotation_trick(x, out["quantize"]) * upstream)
      expected = tape.gradient(objective, x)
      np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
      self.assertGreater(np.abs(grad - upstream).max(), 1e-2)
    else:
      np.testing.assert_array_equal(grad, upstream)

  def test_commitment_pulls_towards_partial_sums(self):
    # d loss / dx = 2 beta / (N D) * sum_s (x - (q_0 + ... + q_s)).
    rvq = _make()
    x = tf.constant(np.random.RandomState(14).randn(5, 4), tf.float32)
    with tf.GradientTape() as tape:
      tape.watch(x)
      loss = rvq(x, is_training=False)["loss"]
    indices, _, _ = _numpy_residual(x.numpy().astype(np.float64),
                                    _codebooks(rvq))
    partial, expected = 0., 0.
    for s, codebook in enumerate(_codebooks(rvq)):
      partial = partial + codebook[indices[:, s]]
      expected = expected + 2 * 0.25 / x.numpy().size * (x.numpy() - partial)
    np.testing.assert_allclose(tape.gradient(loss, x), expected, rtol=1e-4,
                               atol=1e-6)

  @pytest.mark.nonfinite
  def test_nonfinite_inputs_are_left_out(self):
    x = np.random.RandomState(15).randn(6, 4).astype(np.float32)
    dirty = np.concatenate([x, [[np.nan, 0., 0., 0.], [np.inf] * 4]])
    rvq, clean = _make(), _make()
    out = rvq(dirty, is_training=True)
    expected = clean(x, is_training=True)
    self.assertEqual(out["nonfinite_inputs"], 2)
    for key in ("perplexity", "codes_used", "codes_used_ema",
                "stage_codes_used", "stage_perplexity"):
      np.testing.assert_allclose(out[key], expected[key], rtol=1e-6,
                                 err_msg=key)
    bottleneck_checks.assert_same_state(bottleneck_checks.state(rvq),
                                        bottleneck_checks.state(clean),
                                        rtol=1e-6, atol=1e-7)
    self.assertFalse(np.any(np.all(np.isfinite(out["quantize"][6:]), -1)))
    self.assertFalse(np.isfinite(out["loss"]))

  def test_quantize_checks_indices(self):
    rvq = _make()
    with self.assertRaisesRegex(ValueError, "num_stages=3"):
      rvq.quantize(tf.zeros([2, 2], tf.int64))
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "quantize"):
      rvq.quantize(tf.constant([[0, 8, 0]]))
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "quantize"):
      rvq.quantize(tf.constant([[0, -2, 0]]))
    np.testing.assert_allclose(
        rvq.quantize(tf.constant([[1, -1, -1]])),
        rvq.stages[0].quantize(tf.constant([1])))

  @parameterized.parameters(
      (dict(num_stages=0), "num_stages must be at least 1"),
      (dict(quantizer_dropout=1.5), "quantizer_dropout must be in"),
      (dict(gradient="sign"), "gradient must be one of"),
      (dict(decay=2.), "decay must be in"),
  )
  def test_bad_arguments(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      _make(**kwargs)

  def test_exported_from_the_package(self):
    self.assertIs(sonnet_vqvae.ResidualVectorQuantizer,
                  residual_vq.ResidualVectorQuantizer)


_BATCHES = [np.random.RandomState(s).randn(4, 3, 4).astype(np.float32)
            for s in range(3)]


class ResidualVectorQuantizerStrategyTest(bottleneck_checks.StandardChecks,
                                         parameterized.TestCase):

  BATCHES = _BATCHES

  def make(self):
    return _make(num_stages=2)

  def test_output_keys(self):
    super().test_output_keys()
    out = _make()(_BATCHES[0], is_training=True)
    self.assertEqual(out["encoding_indices"].shape, [4, 3, 3])
    for key in ("stage_perplexity", "stage_codes_used",
                "stage_codes_used_ema"):
      self.assertEqual(out[key].shape, [3], key)

  # Not with restarts, k-means or dropout: XLA's random draws differ from
  # the kernels' (see test_xla_with_dropout).
  def test_xla(self):
    bottleneck_checks.check_xla_equals_eager(
        lambda: _make(num_stages=2, shared_codebook=True, cosine=True),
        _BATCHES)

  @pytest.mark.slow
  def test_xla_with_dropout(self):
    rvq = _make(num_stages=2, use_ema=False, quantizer_dropout=1.0)
    step = tf.function(lambda x: rvq(x, is_training=True), jit_compile=True)
    batch = np.concatenate(_BATCHES * 4)
    out = step(batch)
    kept = out["encoding_indices"].numpy() >= 0
    num_kept = kept[:, 0].sum(-1)
    np.testing.assert_array_equal(
        kept, np.broadcast_to(np.arange(2) < num_kept[:, None, None],
                              kept.shape))
    self.assertEqual(set(num_kept), {1, 2})
    # Without EMA the step leaves the codebooks: its indices give its output.
    np.testing.assert_allclose(rvq.quantize(out["encoding_indices"]),
                               out["quantize"], rtol=1e-5, atol=1e-5)

  @pytest.mark.slow
  def test_replicas_with_dropout_hold_the_same_state(self):
    strategy = bottleneck_checks.two_replicas()
    with strategy.scope():
      rvq = _make(num_stages=2, quantizer_dropout=1.0,
                  dead_code_threshold=0.5)

    @tf.function
    def step(inputs):
      return strategy.run(
          lambda x: rvq(x, is_training=True)["encoding_indices"],
          args=(inputs,))

    for batch in _BATCHES:
      halves = np.split(batch, 2)
      indices = step(strategy.experimental_distribute_values_from_function(
          lambda ctx, halves=halves: halves[ctx.replica_id_in_sync_group]))
    self.assertTrue(np.any(np.concatenate(
        strategy.experimental_local_results(indices)) == -1))
    for variable in rvq.variables:
      first, second = strategy.experimental_local_results(variable)
      np.testing.assert_array_equal(first, second, err_msg=variable.name)
