"""sonnet_vqvae.keras: our quantizers as Keras 3 layers whose state Keras owns."""

import os
import re
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

from sonnet_vqvae import quantizers
from sonnet_vqvae.keras import VectorQuantizerLayer


def _images(seed=0, n=32):
  return np.random.RandomState(seed).randn(n, 4, 4, 3).astype("float32")


def _model(ema, **options):
  keras.utils.set_random_seed(0)
  inputs = keras.Input([4, 4, 3])
  z = keras.layers.Conv2D(8, 1)(inputs)
  z = VectorQuantizerLayer(embedding_dim=8, num_embeddings=16, ema=ema,
                           name="vq", **options)(z)
  model = keras.Model(inputs, keras.layers.Conv2D(3, 1)(z))
  # Without XLA: compiling costs more than these few steps.
  model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=False)
  return model


def _values(weights):
  return [w.numpy() for w in weights]


class VectorQuantizerLayerTest(parameterized.TestCase):

  @parameterized.parameters(False, True)
  def test_keras_sees_and_fit_trains_every_variable(self, ema):
    model = _model(ema)
    layer = model.get_layer("vq")
    quantizer = layer.quantizer
    # Every variable of the quantizer is one of the layer's weights.
    self.assertCountEqual([id(v) for v in quantizer.variables],
                          [id(w.value) for w in layer.weights])
    self.assertEqual([w.value is quantizer.embeddings
                      for w in layer.trainable_weights], [] if ema else [True])
    before = quantizer.embeddings.numpy()
    images = _images()
    history = model.fit(images, images, epochs=4, batch_size=8, verbose=0)
    # 4 epochs of 4 batches: the codebook moved, by the optimizer (gradient)
    # or the moving averages (EMA), and the usage state counted each step.
    self.assertFalse(np.allclose(quantizer.embeddings.numpy(), before))
    self.assertEqual(int(quantizer.training_steps), 16)
    self.assertLess(history.history["loss"][-1], history.history["loss"][0])

  @parameterized.parameters(False, True)
  def test_outputs_are_the_quantizers(self, ema):
    layer = VectorQuantizerLayer(embedding_dim=8, num_embeddings=16, ema=ema)
    z = tf.constant(np.random.RandomState(1).randn(5, 8).astype("float32"))
    actual = layer(z)
    reference = (quantizers.VectorQuantizerEMA(8, 16, 0.25, 0.99) if ema
                 else quantizers.VectorQuantizer(8, 16, 0.25))
    reference.embeddings.assign(layer.quantizer.embeddings)
    np.testing.assert_array_equal(
        actual, reference(z, is_training=False)["quantize"])

  @parameterized.parameters(False, True)
  def test_keras_file_restores_every_weight_and_training_goes_on_equal(
      self, ema):
    model = _model(ema, dead_code_threshold=0.5)
    images = _images()
    model.fit(images, images, epochs=1, batch_size=8, verbose=0)
    with tempfile.TemporaryDirectory() as directory:
      path = os.path.join(directory, "model.keras")
      model.save(path)
      loaded = keras.models.load_model(path)
    layer, loaded_layer = model.get_layer("vq"), loaded.get_layer("vq")
    self.assertEqual(loaded_layer.get_config(), layer.get_config())
    for actual, expected in zip(_values(loaded_layer.weights),
                                _values(layer.weights)):
      np.testing.assert_array_equal(actual, expected)
    test = _images(seed=1)
    np.testing.assert_array_equal(loaded.predict(test, verbose=0),
                                  model.predict(test, verbose=0))
    # The optimizer's and the quantizer's state both came back: one more
    # step gives the same weights.
    for m in (model, loaded):
      m.fit(images, images, epochs=1, batch_size=32, shuffle=False, verbose=0)
    for actual, expected in zip(_values(loaded.weights), _values(model.weights)):
      np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)

  def test_docs_snippet_runs(self):
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs",
                        "quantizers.md")
    with open(path) as f:
      (snippet,) = [block for block in re.findall(r"```python\n(.*?)```",
                                                  f.read(), re.S)
                    if "VectorQuantizerLayer" in block]
    with tempfile.TemporaryDirectory() as directory:
      snippet = snippet.replace("/tmp/", directory + "/")
      namespace = {}
      exec(compile(snippet, path, "exec"), namespace)  # pylint: disable=exec-used
    images = namespace["images"]
    np.testing.assert_array_equal(namespace["loaded"].predict(images, verbose=0),
                                  namespace["model"].predict(images, verbose=0))

  def test_wrong_input_size_is_an_error_naming_embedding_dim(self):
    layer = VectorQuantizerLayer(embedding_dim=8, num_embeddings=16)
    with self.assertRaisesRegex(ValueError, "embedding_dim=8.*got input shape"):
      layer(tf.zeros([2, 4]))


if __name__ == "__main__":
  absltest.main()
