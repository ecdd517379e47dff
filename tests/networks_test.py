"""Tests for sonnet_vqvae.networks."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import sonnet as snt
import tensorflow as tf

from sonnet_vqvae import networks
from sonnet_vqvae.configs import default


def _tiny_config(use_ema=True):
  config = default.get_config()
  config.num_hiddens = 8
  config.num_residual_hiddens = 4
  config.embedding_dim = 4
  config.num_embeddings = 16
  config.use_ema = use_ema
  return config


def _images(batch=2):
  return tf.random.stateless_uniform([batch, 32, 32, 3], seed=[1, 2]) - 0.5


class ResidualStackTest(parameterized.TestCase):

  def test_matches_numpy(self):
    stack = networks.ResidualStack(num_hiddens=3, num_residual_layers=2,
                                   num_residual_hiddens=2)
    x = tf.random.stateless_normal([1, 5, 5, 3], seed=[0, 1])
    y = stack(x).numpy()
    h = x
    for conv3, conv1 in stack._layers:
      h = h + conv1(tf.nn.relu(conv3(tf.nn.relu(h))))
    np.testing.assert_allclose(y, np.maximum(h.numpy(), 0), atol=1e-6)
    self.assertEqual(
        sorted(v.name.split("/")[1] for v in stack.trainable_variables
               if v.name.endswith("w:0")),
        ["res1x1_0", "res1x1_1", "res3x3_0", "res3x3_1"])

  def test_zero_layers_is_relu(self):
    x = tf.constant([[[[-1.0, 2.0]]]])
    np.testing.assert_array_equal(
        networks.ResidualStack(2, 0, 1)(x).numpy(), [[[[0.0, 2.0]]]])

  @parameterized.parameters(
      dict(num_hiddens=0, num_residual_layers=1, num_residual_hiddens=1),
      dict(num_hiddens=1, num_residual_layers=-1, num_residual_hiddens=1),
      dict(num_hiddens=1, num_residual_layers=1, num_residual_hiddens=0))
  def test_bad_sizes(self, **kwargs):
    with self.assertRaises(ValueError):
      networks.ResidualStack(**kwargs)


class VQVAEModelTest(parameterized.TestCase):

  @parameterized.parameters(True, False)
  def test_outputs(self, use_ema):
    model = networks.build_model(_tiny_config(use_ema), data_variance=0.06)
    images = _images()
    out = model(images, is_training=False)
    self.assertEqual(out["z"].shape, [2, 8, 8, 4])
    self.assertEqual(out["x_recon"].shape, [2, 32, 32, 3])
    recon_error = np.mean((out["x_recon"].numpy() - images.numpy())**2) / 0.06
    self.assertAllClose(out["recon_error"], recon_error, rtol=1e-5)
    self.assertAllClose(out["loss"], recon_error + out["vq_output"]["loss"],
                        rtol=1e-5)
    self.assertIn("codes_used", out["vq_output"])

  def assertAllClose(self, a, b, **kwargs):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **kwargs)

  def test_encode_decode_roundtrip(self):
    model = networks.build_model(_tiny_config(), data_variance=0.06)
    images = _images()
    out = model(images, is_training=False)
    indices = model.encode(images)
    self.assertEqual(indices.shape, [2, 8, 8])
    self.assertTrue(indices.dtype.is_integer)
    np.testing.assert_array_equal(
        indices, out["vq_output"]["encoding_indices"])
    np.testing.assert_allclose(model.decode(indices), out["x_recon"],
                               atol=1e-6)

  def test_same_as_stock_quantizer(self):
    config = _tiny_config()
    model = networks.build_model(config, data_variance=0.06)
    stock = snt.nets.VectorQuantizerEMA(
        config.embedding_dim, config.num_embeddings, config.commitment_cost,
        config.decay)
    images = _images()
    model(images, is_training=False)  # Creates the variables.
    stock.embeddings.assign(model.quantizer.embeddings)
    out = model(images, is_training=True)
    ref = stock(out["z"], is_training=True)
    for key in ("quantize", "loss", "perplexity"):
      np.testing.assert_allclose(out["vq_output"][key], ref[key], rtol=1e-5,
                                 atol=1e-6)

  def test_health_options_reach_quantizer(self):
    config = _tiny_config()
    config.quantizer.dead_code_threshold = 0.5
    config.quantizer.cosine = True
    model = networks.build_model(config, data_variance=0.06)
    self.assertEqual(model.quantizer.dead_code_threshold, 0.5)
    self.assertTrue(model.quantizer.cosine)

  def test_reference_layer_names(self):
    model = networks.build_model(_tiny_config(), data_variance=0.06)
    model(_images(), is_training=False)
    names = {v.name.split("/")[-2] for v in model.trainable_variables
             if v.name.endswith("w:0")}
    self.assertContainsSubset(
        {"enc_1", "enc_2", "enc_3", "dec_1", "dec_2", "dec_3", "to_vq"}, names)

  def test_bad_variance(self):
    with self.assertRaisesRegex(ValueError, "data_variance"):
      networks.build_model(_tiny_config(), data_variance=0.0)


if __name__ == "__main__":
  absltest.main()
