"""Tests of LookupFreeQuantizer against NumPy over the enumerated codebook."""

import itertools

from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf

import bottleneck_checks
import sonnet_vqvae
from sonnet_vqvae import lfq


def _codebook(dim):
  """[2**D, D] codes in index order: bit d of index i is channel d, MSB first."""
  return np.array(list(itertools.product([-1., 1.], repeat=dim)))


def _numpy_entropies(x, temperature):
  """Per-sample and codebook entropies, q = softmax(2 x . c / T) over codes."""
  logits = 2 * x @ _codebook(x.shape[1]).T / temperature
  logits -= logits.max(1, keepdims=True)
  q = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

  def entropy(p):
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1)

  mean_p = 1 / (1 + np.exp(-4 * x / temperature))
  factorized = entropy(np.stack([mean_p.mean(0), 1 - mean_p.mean(0)], -1)).sum()
  return entropy(q).mean(), entropy(q.mean(0)), factorized


def _numpy_loss(x, temperature, factorized=False, entropy_weight=0.1,
                commitment_cost=0.25, diversity_gamma=1.0):
  per_sample, codebook, factorized_codebook = _numpy_entropies(x, temperature)
  if factorized:
    codebook = factorized_codebook
  codes = np.where(x > 0, 1., -1.)
  return (entropy_weight * (per_sample - diversity_gamma * codebook) +
          commitment_cost * np.mean((x - codes)**2))


class LookupFreeQuantizerTest(parameterized.TestCase):

  @parameterized.parameters(1, 3, 5)
  def test_codes_and_indices_match_numpy(self, dim):
    q = lfq.LookupFreeQuantizer(dim)
    self.assertEqual(q.num_embeddings, 2**dim)
    x = np.random.RandomState(0).randn(4, 6, dim)
    x[0, 0] = 0.  # Zero is negative.
    out = q(tf.constant(x, tf.float32), is_training=False)
    codes = np.where(x > 0, 1., -1.)
    np.testing.assert_array_equal(out["quantize"], codes)
    indices = (x > 0).astype(np.int64) @ 2**np.arange(dim - 1, -1, -1)
    np.testing.assert_array_equal(out["encoding_indices"], indices)
    # Index order is the enumeration order of _codebook.
    np.testing.assert_array_equal(
        _codebook(dim)[out["encoding_indices"].numpy()], codes)

  @parameterized.parameters(1, 4)
  def test_indices_and_codes_round_trip_over_the_implied_codebook(self, dim):
    q = lfq.LookupFreeQuantizer(dim)
    codebook = q.quantize(np.arange(2**dim)).numpy()
    np.testing.assert_array_equal(codebook, _codebook(dim))
    out = q(tf.constant(codebook * 0.5, tf.float32), is_training=False)
    np.testing.assert_array_equal(out["encoding_indices"], np.arange(2**dim))
    np.testing.assert_array_equal(out["quantize"], codebook)

  @parameterized.product(temperature=[0.01, 1.0], factorized=[False, True])
  def test_entropies_and_loss_match_numpy(self, temperature, factorized):
    q = lfq.LookupFreeQuantizer(4, temperature=temperature,
                                factorized_entropy=factorized)
    x = np.random.RandomState(1).randn(3, 5, 4) * 0.3
    out = q(tf.constant(x), is_training=False)
    per_sample, codebook, factorized_codebook = _numpy_entropies(
        x.reshape(-1, 4), temperature)
    np.testing.assert_allclose(out["per_sample_entropy"], per_sample,
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        out["codebook_entropy"],
        factorized_codebook if factorized else codebook, rtol=1e-6)
    np.testing.assert_allclose(
        out["loss"], _numpy_loss(x.reshape(-1, 4), temperature, factorized),
        rtol=1e-6, atol=1e-7)
    # The factorized codebook entropy bounds the exact one from above.
    self.assertGreaterEqual(factorized_codebook, codebook - 1e-12)

  @parameterized.parameters(False, True)
  def test_loss_gradient_matches_finite_differences(self, factorized):
    weights = dict(entropy_weight=0.7, commitment_cost=0.3,
                   diversity_gamma=1.5)
    q = lfq.LookupFreeQuantizer(3, temperature=1.0,
                                factorized_entropy=factorized, **weights)
    x = np.random.RandomState(2).randn(6, 3) * 0.5
    inputs = tf.constant(x)
    with tf.GradientTape() as tape:
      tape.watch(inputs)
      loss = q(inputs, is_training=False)["loss"]
    grad = tape.gradient(loss, inputs).numpy()
    step = 1e-6
    numeric = np.zeros_like(x)
    for index in np.ndindex(*x.shape):
      up, down = x.copy(), x.copy()
      up[index] += step
      down[index] -= step
      numeric[index] = (_numpy_loss(up, 1.0, factorized, **weights) -
                        _numpy_loss(down, 1.0, factorized, **weights)) / (
                            2 * step)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-7)

  def test_quantize_is_straight_through(self):
    q = lfq.LookupFreeQuantizer(3, entropy_weight=0., commitment_cost=0.)
    inputs = tf.constant(np.random.RandomState(3).randn(4, 3), tf.float32)
    upstream = tf.constant(np.random.RandomState(4).randn(4, 3), tf.float32)
    with tf.GradientTape() as tape:
      tape.watch(inputs)
      loss = tf.reduce_sum(q(inputs, is_training=False)["quantize"] * upstream)
    np.testing.assert_array_equal(tape.gradient(loss, inputs), upstream)

  def test_usage_metrics_match_numpy(self):
    q = lfq.LookupFreeQuantizer(3)
    x = np.random.RandomState(5).randn(30, 3).astype(np.float32)
    out = q(x, is_training=True)
    counts = np.bincount((x > 0) @ np.array([4, 2, 1]), minlength=8)
    probs = counts / counts.sum()
    np.testing.assert_allclose(
        out["perplexity"], np.exp(-np.sum(probs * np.log(probs + 1e-10))),
        rtol=1e-6)
    self.assertEqual(out["codes_used"], np.count_nonzero(counts))
    self.assertEqual(out["codes_used_ema"], np.count_nonzero(counts))
    self.assertEqual(q.trainable_variables, ())

  @pytest.mark.nonfinite
  def test_nonfinite_inputs_are_left_out(self):
    q = lfq.LookupFreeQuantizer(2)
    x = np.random.RandomState(6).randn(6, 2).astype(np.float32)
    dirty = np.concatenate([x, [[np.nan, 0.], [np.inf, 1.], [0., -np.inf]]])
    out = q(dirty, is_training=True)
    clean = lfq.LookupFreeQuantizer(2)(x, is_training=True)
    self.assertEqual(out["nonfinite_inputs"], 3)
    for key in ("perplexity", "codes_used", "codes_used_ema",
                "per_sample_entropy", "codebook_entropy"):
      np.testing.assert_allclose(out[key], clean[key], err_msg=key)
    self.assertTrue(np.all(np.isnan(out["quantize"][6:])))
    np.testing.assert_array_equal(out["encoding_indices"][6:], 0)
    self.assertFalse(np.isfinite(out["loss"]))

  def test_out_of_range_indices(self):
    q = lfq.LookupFreeQuantizer(2)
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "quantize"):
      q.quantize(tf.constant([4]))
    codes = tf.function(q.quantize, jit_compile=True)(tf.constant([-1, 2]))
    self.assertTrue(np.all(np.isnan(codes[0])))
    np.testing.assert_array_equal(codes[1], [1., -1.])

  @parameterized.parameters(
      (dict(embedding_dim=0), "embedding_dim must be in \\[1, 20\\]"),
      (dict(embedding_dim=21, factorized_entropy=True), "got 21"),
      (dict(embedding_dim=17), "needs factorized_entropy=True"),
      (dict(embedding_dim=3, temperature=0.), "temperature must be positive"),
      (dict(embedding_dim=3, diversity_gamma=-1.), "diversity_gamma"),
  )
  def test_bad_arguments(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      lfq.LookupFreeQuantizer(**kwargs)

  def test_exported_from_the_package(self):
    self.assertIs(sonnet_vqvae.LookupFreeQuantizer, lfq.LookupFreeQuantizer)


_BATCHES = [np.random.RandomState(s).randn(4, 3, 3).astype(np.float32)
            for s in range(3)]


class LookupFreeQuantizerStrategyTest(bottleneck_checks.StandardChecks,
                                      parameterized.TestCase):

  BATCHES = _BATCHES

  def make(self):
    return lfq.LookupFreeQuantizer(3, usage_decay=0.9, temperature=0.5)

  @parameterized.parameters(False, True)
  def test_replicas_entropies_and_gradients_are_global(self, factorized):
    strategy = bottleneck_checks.two_replicas()
    with strategy.scope():
      replicated = lfq.LookupFreeQuantizer(3, temperature=0.5,
                                           factorized_entropy=factorized)
    single = lfq.LookupFreeQuantizer(3, temperature=0.5,
                                     factorized_entropy=factorized)
    batch = _BATCHES[0]

    @tf.function
    def step(inputs):
      def replica_fn(x):
        with tf.GradientTape() as tape:
          tape.watch(x)
          out = replicated(x, is_training=False)
          # The global-batch mean, as a trainer divides each replica's loss.
          loss = out["loss"] / 2
        return (out["per_sample_entropy"], out["codebook_entropy"],
                tape.gradient(loss, x))
      return strategy.run(replica_fn, args=(inputs,))

    halves = np.split(batch, 2)
    per_sample, codebook, grads = step(
        strategy.experimental_distribute_values_from_function(
            lambda ctx: halves[ctx.replica_id_in_sync_group]))
    inputs = tf.constant(batch)
    with tf.GradientTape() as tape:
      tape.watch(inputs)
      expected = single(inputs, is_training=False)
    expected_grad = tape.gradient(expected["loss"], inputs)
    for value in strategy.experimental_local_results(per_sample):
      np.testing.assert_allclose(value, expected["per_sample_entropy"],
                                 rtol=1e-6)
    for value in strategy.experimental_local_results(codebook):
      np.testing.assert_allclose(value, expected["codebook_entropy"],
                                 rtol=1e-6)
    np.testing.assert_allclose(
        np.concatenate(strategy.experimental_local_results(grads)),
        expected_grad, rtol=1e-5, atol=1e-7)
