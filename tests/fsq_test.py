"""Tests of FiniteScalarQuantizer against a NumPy transcription of the paper."""

import itertools

from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf

import bottleneck_checks
import sonnet_vqvae
from sonnet_vqvae import fsq


def _numpy_fsq(z, levels):
  """Codes and indices of [N, D] inputs: the paper's listing (A.1) with
  lucidrains' (1 + eps) and atanh."""
  levels = np.array(levels, np.float64)
  half_range = (levels - 1) * (1 + 1e-3) / 2
  offset = np.where(levels % 2 == 0, 0.5, 0.)
  bounded = np.tanh(z + np.arctanh(offset / half_range)) * half_range - offset
  half_width = levels // 2
  codes = np.round(bounded) / half_width
  digits = np.round(codes * half_width + half_width).astype(np.int64)
  basis = np.cumprod(np.concatenate([[1], levels[:-1]])).astype(np.int64)
  return codes, (digits * basis).sum(-1), bounded, half_range, offset


class FiniteScalarQuantizerTest(parameterized.TestCase):

  @parameterized.parameters((8, 5, 5, 5), (3, 4, 2), (7,), (2, 2, 2, 2))
  def test_codes_indices_and_gradient_match_numpy(self, *levels):
    q = fsq.FiniteScalarQuantizer(levels)
    self.assertEqual(q.embedding_dim, len(levels))
    self.assertEqual(q.num_embeddings, np.prod(levels))
    z = np.random.RandomState(0).randn(5, 6, len(levels)) * 2
    codes, indices, bounded, half_range, offset = _numpy_fsq(z, levels)
    inputs = tf.constant(z, tf.float64)
    upstream = tf.constant(np.random.RandomState(1).randn(*z.shape))
    with tf.GradientTape() as tape:
      tape.watch(inputs)
      out = q(inputs, is_training=False)
      loss = tf.reduce_sum(out["quantize"] * upstream)
    np.testing.assert_allclose(out["quantize"], codes, rtol=1e-12)
    np.testing.assert_array_equal(out["encoding_indices"], indices)
    self.assertEqual(float(out["loss"]), 0.)
    # Straight through the rounding: d/dz tanh(z + shift) * half_range,
    # divided by the half width.
    grad = ((1 - ((bounded + offset) / half_range)**2) * half_range /
            (np.array(levels) // 2) * upstream.numpy())
    np.testing.assert_allclose(tape.gradient(loss, inputs), grad, rtol=1e-9)
    # Every channel lands on one of its L values.
    for channel, level in enumerate(levels):
      values = np.unique(np.round(codes[..., channel] * (level // 2)))
      self.assertTrue(set(values) <= set(range(-(level // 2),
                                                level - level // 2)))

  @parameterized.parameters((3, 4, 2), (2, 5), (8, 5, 5, 5))
  def test_indices_and_codes_round_trip_over_the_implied_codebook(self, *levels):
    q = fsq.FiniteScalarQuantizer(levels)
    all_indices = np.arange(q.num_embeddings)
    codes = q.indices_to_codes(all_indices).numpy()
    np.testing.assert_array_equal(q.quantize(all_indices), codes)
    np.testing.assert_array_equal(q.codes_to_indices(codes), all_indices)
    # Every combination of levels appears exactly once.
    grid = set(itertools.product(*[
        [(k - l // 2) / (l // 2) for k in range(l)] for l in levels]))
    self.assertEqual({tuple(c) for c in codes.tolist()}, grid)
    # The other way: codes of the grid -> indices -> the same codes.
    grid = np.array(sorted(grid), np.float32)
    np.testing.assert_array_equal(
        q.indices_to_codes(q.codes_to_indices(grid)), grid)
    # And the quantizer maps its own codes' pre-images to them: bound()
    # inverted at each code gives inputs quantized to that code.
    levels_np = np.array(levels, np.float64)
    half_range = (levels_np - 1) * (1 + 1e-3) / 2
    offset = np.where(levels_np % 2 == 0, 0.5, 0.)
    shift = np.arctanh(offset / half_range)
    pre_images = np.arctanh((grid * (levels_np // 2) + offset) /
                            half_range) - shift
    out = q(tf.constant(pre_images[None], tf.float32), is_training=False)
    np.testing.assert_array_equal(out["quantize"][0], grid)
    np.testing.assert_array_equal(out["encoding_indices"][0],
                                  q.codes_to_indices(grid))

  def test_usage_metrics_match_numpy(self):
    q = fsq.FiniteScalarQuantizer((3, 3), usage_decay=0.5)
    z = np.random.RandomState(2).randn(40, 2).astype(np.float32)
    out = q(z, is_training=True)
    _, indices, *_ = _numpy_fsq(z, (3, 3))
    counts = np.bincount(indices, minlength=9)
    probs = counts / counts.sum()
    np.testing.assert_allclose(
        out["perplexity"], np.exp(-np.sum(probs * np.log(probs + 1e-10))),
        rtol=1e-6)
    self.assertEqual(out["codes_used"], np.count_nonzero(counts))
    self.assertEqual(out["codes_used_ema"], np.count_nonzero(counts))
    # A batch of one code: the others' usage halves below 1/4 per step.
    out = q(np.zeros([40, 2], np.float32), is_training=True)
    self.assertEqual(out["codes_used"], 1)
    np.testing.assert_allclose(q.usage.code_usage,
                               0.5 * counts + 0.5 * 40 * (np.arange(9) == 4))
    self.assertEqual(q.trainable_variables, ())

  @pytest.mark.nonfinite
  def test_nonfinite_inputs_are_left_out(self):
    q = fsq.FiniteScalarQuantizer((3, 3))
    z = np.random.RandomState(3).randn(6, 2).astype(np.float32)
    dirty = np.concatenate([z, [[np.nan, 0.], [np.inf, 1.], [0., -np.inf]]])
    out = q(dirty, is_training=True)
    clean = fsq.FiniteScalarQuantizer((3, 3))(z, is_training=True)
    self.assertEqual(out["nonfinite_inputs"], 3)
    for key in ("perplexity", "codes_used", "codes_used_ema"):
      np.testing.assert_allclose(out[key], clean[key], err_msg=key)
    self.assertTrue(np.all(np.isnan(out["quantize"][6:])))
    np.testing.assert_array_equal(out["encoding_indices"][6:], 0)
    np.testing.assert_array_equal(out["quantize"][:6], clean["quantize"])

  def test_out_of_range_indices(self):
    q = fsq.FiniteScalarQuantizer((3, 3))
    for bad in (-1, 9):
      with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                  "indices_to_codes"):
        q.quantize(tf.constant([bad]))
    codes = tf.function(q.quantize, jit_compile=True)(tf.constant([9, 2]))
    self.assertTrue(np.all(np.isnan(codes[0])))
    np.testing.assert_array_equal(codes[1], [1., -1.])

  @parameterized.parameters(((),), ((4, 1),), ((2, 2.5),))
  def test_bad_levels(self, levels):
    with self.assertRaisesRegex(ValueError, "levels must be"):
      fsq.FiniteScalarQuantizer(levels)

  def test_too_large_a_codebook(self):
    with self.assertRaisesRegex(ValueError, "2\\*\\*20"):
      fsq.FiniteScalarQuantizer((64,) * 4)

  def test_wrong_channels(self):
    with self.assertRaisesRegex(ValueError, "embedding_dim=4, got 3"):
      fsq.FiniteScalarQuantizer()(tf.zeros([2, 3]), is_training=False)

  def test_exported_from_the_package(self):
    self.assertIs(sonnet_vqvae.FiniteScalarQuantizer, fsq.FiniteScalarQuantizer)


_BATCHES = [np.random.RandomState(s).randn(4, 3, 3).astype(np.float32) * 2
            for s in range(3)]


class FiniteScalarQuantizerStrategyTest(bottleneck_checks.StandardChecks,
                                        parameterized.TestCase):

  BATCHES = _BATCHES

  def make(self):
    return fsq.FiniteScalarQuantizer((3, 4, 2), usage_decay=0.9)
