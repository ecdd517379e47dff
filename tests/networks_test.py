"""Tests for sonnet_vqvae.networks."""

import importlib.util
import os

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import sonnet as snt
import tensorflow as tf

from sonnet_vqvae import networks
import tiny


def _load_notebook_recipe():
  """Loads bench/recipe.py, the notebook's model, by path (not a package)."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))), "bench", "recipe.py")
  spec = importlib.util.spec_from_file_location("notebook_recipe", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


recipe = _load_notebook_recipe()

def _tiny_config(use_ema=True):
  return tiny.vqvae_config(use_ema=use_ema)


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
    self.assertEqual(out["z"].shape, [2, 8, 8, model.quantizer.embedding_dim])
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


class SameAsNotebookTest(parameterized.TestCase):
  """Ours with the notebook's weights computes what the notebook's model does.

  The notebook is Sonnet's examples/vqvae_example.ipynb, copied verbatim into
  bench/recipe.py; weights are copied by variable name.
  """

  def _sizes(self):
    config = _tiny_config()
    return (config.num_hiddens, config.num_residual_layers,
            config.num_residual_hiddens)

  def _assert_same(self, ours, theirs, rtol=1e-6, atol=1e-6):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs),
                               rtol=rtol, atol=atol)

  def test_encoder(self):
    # Fails without the relu after enc_3 that the notebook's Encoder applies.
    ours = networks.Encoder(*self._sizes())
    theirs = recipe.Encoder(*self._sizes())
    images = _images()
    ours(images)  # Creates the variables.
    theirs(images)
    self.assertEqual(recipe.copy_variables(ours.variables, theirs.variables),
                     len(ours.variables))
    self._assert_same(ours(images), theirs(images))

  def test_decoder(self):
    ours = networks.Decoder(*self._sizes())
    theirs = recipe.Decoder(*self._sizes())
    grid = tf.random.stateless_normal([2, 8, 8, 4], seed=[3, 4])
    ours(grid)
    theirs(grid)
    recipe.copy_variables(ours.variables, theirs.variables)
    out = ours(grid)
    self.assertEqual(out.shape, [2, 32, 32, 3])
    self._assert_same(out, theirs(grid))

  @parameterized.parameters(False, True)
  def test_model(self, is_training):
    config = _tiny_config()
    ours = networks.build_model(config, data_variance=0.06)
    notebook = recipe.build_recipe(0.06, **recipe.hyperparameters(config))
    images = _images()
    ours(images, is_training=False)
    notebook.model(images, is_training=False)
    # Every variable of the notebook's model, quantizer state included.
    self.assertEqual(
        recipe.copy_variables(ours.variables, notebook.model.variables),
        len(notebook.model.variables))
    out = ours(images, is_training=is_training)
    ref = notebook.model(images, is_training=is_training)
    self._assert_same(out["z"], ref["z"])
    for key in ("x_recon", "loss", "recon_error"):
      self._assert_same(out[key], ref[key], rtol=1e-5)
    for key in ("loss", "perplexity", "encoding_indices"):
      self._assert_same(out["vq_output"][key], ref["vq_output"][key],
                        rtol=1e-5)
    # Training moves both codebooks alike (EMA); evaluation moves neither.
    self._assert_same(ours.quantizer.embeddings, notebook.quantizer.embeddings,
                      rtol=1e-5)

  def test_copy_fails_on_unmatched_variables(self):
    ours = networks.Encoder(*self._sizes())
    hiddens, layers, residual_hiddens = self._sizes()
    wider = recipe.Encoder(2 * hiddens, layers, residual_hiddens)
    deeper = recipe.Encoder(hiddens, layers + 1, residual_hiddens)
    images = _images()
    for module in (ours, wider, deeper):
      module(images)
    before = [v.numpy() for v in wider.variables]
    with self.assertRaisesRegex(
        ValueError, rf"encoder/enc_1/w: .*{hiddens // 2}\) .* vs .*{hiddens}\)"):
      recipe.copy_variables(ours.variables, wider.variables)
    for variable, value in zip(wider.variables, before):
      np.testing.assert_array_equal(variable, value)  # Nothing assigned.
    with self.assertRaisesRegex(ValueError,
                                "without a source: .*res3x3_2/w"):
      recipe.copy_variables(ours.variables, deeper.variables)
    with self.assertRaisesRegex(ValueError,
                                "without a target: .*res3x3_2/w"):
      recipe.copy_variables(deeper.variables, ours.variables)


if __name__ == "__main__":
  absltest.main()
