"""Checkpoints move between stock `snt.nets` quantizers and ours, both ways.

A stock checkpoint restores into ours with `assert_existing_objects_matched()`
(our extra state, `code_usage` and `training_steps`, is created on the first
call and optional on restore), k-means never replaces a restored codebook, and
training goes on as stock Sonnet's would; ours restores into stock Sonnet's.
"""

import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import sonnet as snt
import tensorflow as tf

from sonnet_vqvae import quantizers


def _inputs(seed, n=32):
  return tf.constant(np.random.RandomState(seed).randn(n, 4).astype("float32"))


def _stock(ema):
  if ema:
    return snt.nets.VectorQuantizerEMA(4, 16, 0.25, 0.9)
  return snt.nets.VectorQuantizer(4, 16, 0.25)


def _ours(ema, **options):
  if ema:
    return quantizers.VectorQuantizerEMA(4, 16, 0.25, 0.9, **options)
  return quantizers.VectorQuantizer(4, 16, 0.25, **options)


def _train(vq, ema, seeds):
  """Training steps on batches of `seeds` (the codebook by SGD without EMA)."""
  optimizer = snt.optimizers.SGD(0.1)
  for seed in seeds:
    with tf.GradientTape() as tape:
      loss = vq(_inputs(seed), is_training=True)["loss"]
    if not ema:
      optimizer.apply(tape.gradient(loss, [vq.embeddings]), [vq.embeddings])


def _write(directory, vq):
  return tf.train.Checkpoint(vq=vq).write(os.path.join(directory, "ckpt"))


class CheckpointCompatTest(parameterized.TestCase):

  @parameterized.product(ema=(False, True), kmeans_init=(False, True))
  def test_stock_checkpoint_restores_into_ours_and_trains_on_as_stock(
      self, ema, kmeans_init):
    stock = _stock(ema)
    _train(stock, ema, seeds=range(3))
    ours = _ours(ema, kmeans_init=kmeans_init, dead_code_threshold=0.5)
    with tempfile.TemporaryDirectory() as directory:
      status = tf.train.Checkpoint(vq=ours).read(_write(directory, stock))
      status.assert_existing_objects_matched()
    np.testing.assert_array_equal(ours.embeddings, stock.embeddings)
    # The first training step of ours: no k-means over the restored codebook
    # (and no restarts on a first step), so ours computes what stock computes.
    batch = _inputs(3)
    expected = stock(batch, is_training=True)
    actual = ours(batch, is_training=True)
    np.testing.assert_array_equal(actual["encoding_indices"],
                                  expected["encoding_indices"])
    np.testing.assert_allclose(actual["quantize"], expected["quantize"],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.embeddings, stock.embeddings,
                               rtol=1e-6, atol=1e-6)
    self.assertEqual(int(ours.training_steps), 1)

  @parameterized.parameters(False, True)
  def test_ours_restores_into_stock(self, ema):
    ours = _ours(ema, dead_code_threshold=0.5)
    _train(ours, ema, seeds=range(3))
    stock = _stock(ema)
    with tempfile.TemporaryDirectory() as directory:
      status = tf.train.Checkpoint(vq=stock).read(_write(directory, ours))
      status.assert_existing_objects_matched()
    np.testing.assert_array_equal(stock.embeddings, ours.embeddings)
    if ema:
      for name in ("ema_cluster_size", "ema_dw"):
        np.testing.assert_array_equal(getattr(stock, name).average,
                                      getattr(ours, name).average)
    batch = _inputs(7)
    np.testing.assert_array_equal(
        stock(batch, is_training=False)["encoding_indices"],
        ours(batch, is_training=False)["encoding_indices"])

  @parameterized.parameters(False, True)
  def test_ours_restores_its_extra_state_before_the_first_call(self, ema):
    ours = _ours(ema, dead_code_threshold=0.5, kmeans_init=True)
    _train(ours, ema, seeds=range(3))
    restored = _ours(ema, dead_code_threshold=0.5, kmeans_init=True)
    with tempfile.TemporaryDirectory() as directory:
      status = tf.train.Checkpoint(vq=restored).read(_write(directory, ours))
      status.assert_existing_objects_matched()
      restored(_inputs(0), is_training=False)  # creates the extra state
      status.assert_consumed()
    self.assertEqual(int(restored.training_steps), 3)
    np.testing.assert_array_equal(restored.code_usage, ours.code_usage)
    for vq in (ours, restored):
      vq(_inputs(5), is_training=True)
    np.testing.assert_array_equal(restored.embeddings, ours.embeddings)

  def test_kmeans_initialises_a_fresh_codebook_and_keeps_an_assigned_one(self):
    batch = _inputs(0) * 3
    fresh = _ours(True, kmeans_init=True)
    initial = fresh.embeddings.numpy()
    fresh(batch, is_training=True)
    self.assertFalse(np.allclose(fresh.embeddings, initial))
    assigned = _ours(True, kmeans_init=True)
    assigned.embeddings.assign(initial + 1.)
    reference = _ours(True)
    reference.embeddings.assign(initial + 1.)
    assigned(batch, is_training=True)
    reference(batch, is_training=True)
    np.testing.assert_array_equal(assigned.embeddings, reference.embeddings)


if __name__ == "__main__":
  absltest.main()
