"""Tests for sonnet_vqvae.hierarchical_prior and the prior on VQ-VAE-2 codes."""

import json
import math
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf

from sonnet_vqvae import hierarchical_prior
from sonnet_vqvae import prior
from sonnet_vqvae import rundir
import tiny

# Two levels: a 2x2 top grid over a 4x4 bottom one; three: 1x1, 2x2, 4x4.
_SHAPES = {2: [(2, 2), (4, 4)], 3: [(1, 1), (2, 2), (4, 4)]}
_K = [5, 7, 6]


def _model(levels=2, num_classes=None, num_layers=4):
  tf.random.set_seed(0)
  return hierarchical_prior.HierarchicalPrior(
      _K[:levels], hidden_channels=8, num_layers=num_layers, kernel_size=3,
      num_classes=num_classes)


_SAMPLER = []


def _three_level_sampler():
  """_model(3, num_classes=10), built once: the sampling tests share its
  traced sampler (one trace per call signature costs seconds)."""
  if not _SAMPLER:
    _SAMPLER.append(_model(3, num_classes=10))
  return _SAMPLER[0]


def _random_codes(levels, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, k, [batch, *shape]).astype(np.int32)
          for k, shape in zip(_K, _SHAPES[levels])]


def _chained_grids(num, seed):
  """Top grids repeat one random code; the bottom grid repeats the top's + 1.

  Unconditionally the top costs its first code; the bottom is fully known
  from the top, so a prior that uses its condition learns it to ~0 nats.
  """
  rng = np.random.default_rng(seed)
  top = rng.integers(0, 4, num).astype(np.int32)
  codes = (np.broadcast_to(top[:, None, None], [num, 2, 2]),
           np.broadcast_to((top + 1)[:, None, None], [num, 4, 4]))
  return {"codes": tuple(np.ascontiguousarray(c) for c in codes),
          "labels": rng.integers(0, 10, num).astype(np.int32)}


class HierarchicalPriorTest(parameterized.TestCase):

  @parameterized.parameters(2, 3)
  def test_logits_of_every_level(self, levels):
    model = _model(levels, num_classes=10)
    logits = model(_random_codes(levels), tf.constant([1, 2]))
    self.assertEqual([tuple(l.shape) for l in logits],
                     [(2, *s, k) for s, k in zip(_SHAPES[levels], _K)])

  @parameterized.parameters(2, 3)
  def test_causal_within_a_level_and_only_coarser_levels_across(self, levels):
    model = _model(levels)
    codes = _random_codes(levels, batch=1)
    # One call: row 0 the codes, row i the codes with the i-th (level,
    # position) changed.
    changes = [(level, position)
               for level, (height, width) in enumerate(_SHAPES[levels])
               for position in range(height * width)]
    changed = [np.repeat(c, 1 + len(changes), axis=0) for c in codes]
    for row, (level, position) in enumerate(changes, start=1):
      grid = changed[level][row].reshape(-1)
      grid[position] = (grid[position] + 1) % _K[level]
    all_logits = [l.numpy() for l in model(changed)]
    base = [l[:1] for l in all_logits]
    for row, (level, position) in enumerate(changes, start=1):
      height, width = _SHAPES[levels][level]
      logits = [l[row:row + 1] for l in all_logits]
      for other in range(levels):
        flat_base = base[other].reshape(-1, _K[other])
        flat_new = logits[other].reshape(-1, _K[other])
        if other < level:
          # Coarser levels never see finer codes.
          np.testing.assert_array_equal(flat_new, flat_base)
        elif other == level:
          # This level: the code and those before it are not seen...
          np.testing.assert_array_equal(flat_new[:position + 1],
                                        flat_base[:position + 1])
          # ...while the next position sees it.
          if position + 1 < height * width:
            self.assertFalse(np.allclose(flat_new[position + 1],
                                         flat_base[position + 1]))
        else:
          # Finer levels see all coarser codes from their first position.
          self.assertFalse(np.allclose(flat_new[0], flat_base[0]))

  def test_sample_shapes_range_and_seed(self):
    model = _three_level_sampler()
    draw = lambda seed: model.sample(4, _SHAPES[3], labels=3, seed=seed)
    codes = draw(7)
    self.assertEqual([tuple(c.shape) for c in codes],
                     [(4, *s) for s in _SHAPES[3]])
    for c, k in zip(codes, _K):
      self.assertEqual(c.dtype, tf.int32)
      self.assertBetween(int(tf.reduce_min(c)), 0, k - 1)
      self.assertBetween(int(tf.reduce_max(c)), 0, k - 1)
    for a, b in zip(codes, draw(7)):
      np.testing.assert_array_equal(a, b)
    self.assertFalse(all(np.array_equal(a, b)
                         for a, b in zip(codes, draw(8))))

  def test_cold_sampling_is_greedy_top_down(self):
    # Near zero temperature each level is its PixelCNN's greedy decoding
    # given the levels drawn above it: sampling conditions as the loss does.
    # (Labels: an untrained top's first position is otherwise a tie.)
    model = _model(2, num_classes=10)
    labels = tf.constant([0, 4, 9])
    codes = model.sample(3, _SHAPES[2], labels=labels, temperature=1e-6,
                         seed=0)
    logits = model(codes, labels)
    for c, l in zip(codes, logits):
      np.testing.assert_array_equal(c, tf.argmax(l, -1, output_type=tf.int32))

  def test_given_top_levels_are_kept_and_the_rest_drawn_given_them(self):
    model = _three_level_sampler()
    full = model.sample(4, _SHAPES[3], labels=3, seed=1)
    top = [np.full([4, 1, 1], 2, np.int32)]
    codes = model.sample(4, _SHAPES[3], labels=3, seed=1, given=top)
    np.testing.assert_array_equal(codes[0], top[0])
    self.assertEqual([tuple(c.shape) for c in codes[1:]],
                     [(4, 2, 2), (4, 4, 4)])
    # Given a full draw's own top levels, the same seed draws the rest as
    # that draw did: the finer levels are drawn given what is given.
    again = model.sample(4, _SHAPES[3], labels=3, seed=1, given=full[:2])
    for a, b in zip(again, full):
      np.testing.assert_array_equal(a, b)
    with self.assertRaisesRegex(ValueError, "at most 2"):
      model.sample(4, _SHAPES[3], labels=3, given=full)
    with self.assertRaisesRegex(ValueError, r"given\[0\] has shape"):
      model.sample(4, _SHAPES[3], labels=3, given=[full[1]])

  @parameterized.parameters(
      (dict(shapes=[(2, 2)]), "shapes"),
      (dict(temperature=0.0), "temperature"),
      (dict(labels=1), "labels"))
  def test_bad_sampling_arguments_raise(self, overrides, message):
    model = _model(2)
    kwargs = dict(dict(num_samples=2, shapes=_SHAPES[2]), **overrides)
    with self.assertRaisesRegex(ValueError, message):
      model.sample(**kwargs)

  def test_grid_that_does_not_tile_raises(self):
    model = _model(2)
    codes = [np.zeros([1, 3, 3], np.int32), np.zeros([1, 4, 4], np.int32)]
    with self.assertRaisesRegex(ValueError, "3x3 code grid"):
      model(codes)


class PriorOnLevelsTest(parameterized.TestCase):

  def test_evaluate_matches_numpy_per_level_and_in_total(self):
    model = prior.build_prior(tiny.prior_config(), _K[:2])
    data = {"codes": tuple(_random_codes(2, batch=5)),
            "labels": np.arange(5, dtype=np.int32)}
    metrics = prior.evaluate(model, data, batch_size=2)
    nats = []
    for codes, logits in zip(data["codes"],
                             model(data["codes"], data["labels"])):
      logits = logits.numpy().astype(np.float64)
      log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
      nats.append(-np.take_along_axis(log_probs, codes[..., None], -1))
    for level, n in enumerate(nats):
      self.assertAlmostEqual(metrics[f"level{level}_nll_nats_per_code"],
                             n.mean(), places=5)
      self.assertAlmostEqual(
          metrics[f"level{level}_uniform_nats_per_code"], math.log(_K[level]))
    total = sum(n.sum() for n in nats) / 5  # nats per image
    self.assertAlmostEqual(metrics["nll_nats_per_code"], total / 20, places=5)
    self.assertAlmostEqual(metrics["bits_per_dim"],
                           total / 3072 / math.log(2), places=6)
    self.assertAlmostEqual(
        metrics["uniform_bits_per_dim"],
        (4 * math.log(5) + 16 * math.log(7)) / 3072 / math.log(2))

  @parameterized.named_parameters(
      ("one_device", "default"), ("two_replicas", "replicator"))
  @pytest.mark.slow
  def test_learns_the_bottom_from_the_top(self, strategy):
    workdir = self.enter_context(tempfile.TemporaryDirectory())
    # checkpoint_every: no mid-run validation passes, each of which traces
    # an evaluation (prior_test's runs have them).
    config = tiny.prior_config(class_conditional=False, num_steps=100,
                               checkpoint_every=100, strategy=strategy)
    metrics = prior.train_on_codes(config, _chained_grids(64, seed=0),
                                   _chained_grids(32, seed=1), [4, 5],
                                   workdir)
    # The top costs about log 4 for its first code; the bottom, known from
    # the top, almost nothing (uniform: log 5 = 1.61 nats per code).
    self.assertLess(metrics["level0_nll_nats_per_code"], 0.6)
    self.assertLess(metrics["level1_nll_nats_per_code"], 0.05)
    # Frequencies alone do not know it.
    self.assertGreater(metrics["level1_unigram_nats_per_code"], 1.0)
    rows = rundir.RunDir(workdir, writer=False).read_rows(
        prior.loop.METRICS_FILE)
    self.assertIn("level1_nll", rows[-1])
    with open(os.path.join(workdir, prior.METRICS_FILE)) as f:
      self.assertEqual(json.load(f), metrics)
    _, restored = prior.restore_prior(workdir, [4, 5])
    self.assertIsInstance(restored, hierarchical_prior.HierarchicalPrior)
    with self.assertRaisesRegex(ValueError, "models"):
      prior.restore_prior(workdir, [4, 6])


if __name__ == "__main__":
  absltest.main()
