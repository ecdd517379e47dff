"""Tests for sonnet_vqvae.pixelcnn."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from sonnet_vqvae import pixelcnn

_K = 6


def _model(num_layers=2, kernel_size=3, num_classes=None):
  tf.random.set_seed(0)
  return pixelcnn.GatedPixelCNN(
      num_embeddings=_K, hidden_channels=8, num_layers=num_layers,
      kernel_size=kernel_size, num_classes=num_classes)


class GatedPixelCNNTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("zero_embeddings", dict(num_embeddings=0)),
      ("zero_channels", dict(hidden_channels=0)),
      ("zero_layers", dict(num_layers=0)),
      ("even_kernel", dict(kernel_size=4)),
      ("zero_classes", dict(num_classes=0)),
  )
  def test_bad_arguments_raise(self, override):
    kwargs = dict(num_embeddings=4, hidden_channels=4, num_layers=1,
                  kernel_size=3)
    kwargs.update(override)
    with self.assertRaises(ValueError):
      pixelcnn.GatedPixelCNN(**kwargs)

  def test_bad_mask_type_raises(self):
    with self.assertRaises(ValueError):
      pixelcnn.GatedLayer(4, 3, "C")

  @parameterized.parameters(None, 3)
  def test_output_shape(self, num_classes):
    model = _model(num_classes=num_classes)
    labels = None if num_classes is None else tf.constant([0, 2])
    logits = model(tf.zeros([2, 3, 5], tf.int32), labels)
    self.assertEqual(logits.shape, (2, 3, 5, _K))
    self.assertEqual(logits.dtype, tf.float32)

  @parameterized.named_parameters(
      # num_layers * (kernel_size // 2) reaches W - 1 = 4: no blind spot.
      ("k3", 3, 4, None),
      ("k5", 5, 2, None),
      ("k3_conditional", 3, 4, 3),
  )
  def test_depends_on_exactly_the_earlier_positions(self, kernel_size,
                                                    num_layers, num_classes):
    height, width = 4, 5
    model = _model(num_layers, kernel_size, num_classes)
    base = np.random.default_rng(0).integers(0, _K, [height * width])
    # Row 0 is the base grid; row 1 + p changes only raster position p.
    grids = np.tile(base, [height * width + 1, 1])
    grids[1:] = np.where(np.eye(height * width, dtype=bool), (grids[1:] + 1) % _K,
                         grids[1:])
    labels = None if num_classes is None else tf.ones([len(grids)], tf.int32)
    logits = model(tf.constant(grids.reshape(-1, height, width)), labels)
    logits = logits.numpy().reshape(len(grids), height * width, _K)
    # moved[p, q]: did changing position p move the logits at position q?
    moved = np.abs(logits[1:] - logits[:1]).max(axis=-1) > 1e-6
    # Exactly the later positions move: nothing earlier or at p (causality),
    # every later one, also up-right of it in the next rows (no blind spot).
    expected = np.triu(np.ones([height * width] * 2, dtype=bool), k=1)
    np.testing.assert_array_equal(moved, expected)

  def test_few_layers_do_not_reach_far_up_right(self):
    # The receptive field grows by kernel_size // 2 per layer; the dependency
    # test above must therefore fail for shallow stacks.
    model = _model(num_layers=1)
    grids = np.zeros([2, 2, 5], np.int64)
    grids[1, 0, 4] = 1
    logits = model(tf.constant(grids)).numpy()
    self.assertEqual(np.abs(logits[1, 1, 0] - logits[0, 1, 0]).max(), 0.0)
    self.assertGreater(np.abs(logits[1, 1, 3] - logits[0, 1, 3]).max(), 0.0)

  def test_labels_change_logits(self):
    model = _model(num_classes=3)
    grids = tf.zeros([2, 3, 3], tf.int32)
    logits = model(grids, tf.constant([0, 1])).numpy()
    self.assertGreater(np.abs(logits[0] - logits[1]).min(), 0.0)

  @parameterized.named_parameters(
      ("missing", 3, None),
      ("unexpected", None, [0, 1]),
  )
  def test_labels_must_match_conditioning(self, num_classes, labels):
    model = _model(num_classes=num_classes)
    with self.assertRaises(ValueError):
      model(tf.zeros([2, 3, 3], tf.int32), labels)
    with self.assertRaises(ValueError):
      model.sample(2, 3, 3, labels=labels)

  @parameterized.parameters(None, 3)
  def test_sample_shape_dtype_range(self, num_classes):
    model = _model(num_classes=num_classes)
    labels = None if num_classes is None else 2
    codes = model.sample(16, 3, 4, labels=labels, seed=1).numpy()
    self.assertEqual(codes.shape, (16, 3, 4))
    self.assertEqual(codes.dtype, np.int32)
    self.assertTrue(np.all((codes >= 0) & (codes < _K)))
    # Sixteen grids of twelve codes from random logits are not all one code.
    self.assertGreater(len(np.unique(codes)), 1)

  def test_sample_is_deterministic_per_seed(self):
    model = _model()
    first = model.sample(8, 3, 3, seed=7).numpy()
    np.testing.assert_array_equal(first, model.sample(8, 3, 3, seed=7).numpy())
    self.assertFalse(np.array_equal(first, model.sample(8, 3, 3, seed=8).numpy()))

  @parameterized.parameters(None, 3)
  def test_cold_sample_is_greedy_decoding(self, num_classes):
    # Near zero temperature, sampling must pick the argmax of the logits given
    # the codes already drawn, position by position in raster order.
    model = _model(num_classes=num_classes)
    # Zero-initialised biases tie all logits at the first position.
    model.head_logits[1].assign(tf.random.normal([_K]))
    labels = None if num_classes is None else tf.constant([0, 1, 2])
    codes = model.sample(3, 3, 4, labels=labels, temperature=1e-6).numpy()
    expected = np.zeros_like(codes)
    for p in range(12):
      logits = model(tf.constant(expected), labels).numpy()
      expected[:, p // 4, p % 4] = logits[:, p // 4, p % 4].argmax(-1)
    np.testing.assert_array_equal(codes, expected)

  def test_bad_temperature_raises(self):
    for temperature in (0.0, -1.0, float("nan"), float("inf")):
      with self.assertRaisesRegex(ValueError, "temperature"):
        _model().sample(2, 3, 3, temperature=temperature)


if __name__ == "__main__":
  absltest.main()
