"""The quantizers as Keras 3 layers (TensorFlow backend).

    import keras
    from sonnet_vqvae.keras import VectorQuantizerLayer

    inputs = keras.Input([8, 8, 3])
    z = keras.layers.Conv2D(64, 1)(inputs)
    z = VectorQuantizerLayer(embedding_dim=64, num_embeddings=512)(z)
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1)(z))
    model.compile("adam", "mse")
    model.fit(images, images)   # the quantizer's loss is added to the model's
    model.save("model.keras")   # the codebook and its EMA state included

The layer holds a `sonnet_vqvae.VectorQuantizer` (`ema=False`, codebook trained
by the optimizer) or `VectorQuantizerEMA` (`ema=True`, the default; codebook
updated by moving averages in training calls) whose every variable is a Keras
weight: `layer.trainable_weights` / `non_trainable_weights` list them, `fit`
trains them, `.keras` files and `save_weights` store them. Keras 3 sees no
`tf.Variable` that it did not create, so the layer creates each of the
quantizer's variables with `add_weight` (a variable creator) and the quantizer
computes on the variables behind those weights.

Importing this module imports Keras; `import sonnet_vqvae` does not.
"""

from typing import Any, Dict, Optional

import keras
import tensorflow as tf

from sonnet_vqvae import quantizers


def _weight_name(name: Optional[str]) -> Optional[str]:
  """`name` within the quantizer's modules, e.g. "ema_dw_hidden".

  Keras names may not hold "/"; the scope tells the two EMAs' variables apart.
  """
  scope = [part for part in tf.get_current_name_scope().split("/") if part]
  if "quantizer" in scope:
    scope = scope[scope.index("quantizer") + 1:]
  return "_".join(scope + [name or "weight"])


@keras.saving.register_keras_serializable(package="sonnet_vqvae")
class VectorQuantizerLayer(keras.layers.Layer):
  """Quantizes its inputs' last axis; returns the straight-through codes.

  Inputs [..., embedding_dim] (float) give outputs of the same shape: the
  nearest codebook vectors, with the straight-through gradient to the inputs.
  In a training call (`fit`, or `training=True`) the quantizer's loss (the
  commitment loss, plus the codebook loss for `ema=False`) is added with
  `add_loss`, and with `ema=True` the EMA codebook is updated.

  Attributes:
    quantizer: the `sonnet_vqvae` quantizer (after `build`), for its other
      outputs: `layer.quantizer(z, is_training=False)` returns its whole dict,
      `layer.quantizer.quantize(indices)` looks codes up.
  """

  def __init__(self,
               embedding_dim: int,
               num_embeddings: int,
               commitment_cost: float = 0.25,
               ema: bool = True,
               decay: float = 0.99,
               epsilon: float = 1e-5,
               usage_decay: float = 0.99,
               dead_code_threshold: float = 0.0,
               kmeans_init: bool = False,
               kmeans_iters: int = 10,
               cosine: bool = False,
               seed: int = 0,
               **kwargs):
    """Constructs the layer; the quantizer's arguments are as documented there.

    Args:
      embedding_dim: D, size of the last axis of the inputs.
      num_embeddings: K, number of codes.
      commitment_cost: beta, weight of the commitment loss.
      ema: True for `VectorQuantizerEMA`, False for `VectorQuantizer`.
      decay: decay of the EMA codebook (`ema=True` only).
      epsilon: Laplace smoothing of the EMA cluster sizes (`ema=True` only).
      usage_decay: decay of the code-usage EMA.
      dead_code_threshold: restart codes used less than this per step.
      kmeans_init: initialise the codebook by k-means on the first batch.
      kmeans_iters: Lloyd iterations of that k-means.
      cosine: quantize l2-normalised vectors.
      seed: seed of restarts and k-means.
      **kwargs: `keras.layers.Layer` arguments (`name`, `dtype`, ...).
    """
    super().__init__(**kwargs)
    self._quantizer_args = dict(
        embedding_dim=embedding_dim, num_embeddings=num_embeddings,
        commitment_cost=commitment_cost, usage_decay=usage_decay,
        dead_code_threshold=dead_code_threshold, kmeans_init=kmeans_init,
        kmeans_iters=kmeans_iters, cosine=cosine, seed=seed)
    self._ema_args = dict(decay=decay, epsilon=epsilon)
    self.ema = ema
    self.quantizer = None
    self._creating_weight = False

  def build(self, input_shape):
    embedding_dim = self._quantizer_args["embedding_dim"]
    if input_shape[-1] != embedding_dim:
      raise ValueError(
          f"{self.name}: the inputs' last axis must be embedding_dim="
          f"{embedding_dim}, got input shape {tuple(input_shape)}; set "
          "embedding_dim to the size of the layer before.")
    args = dict(self._quantizer_args, dtype=self.variable_dtype)
    with tf.variable_creator_scope(self._keras_weight):
      if self.ema:
        self.quantizer = quantizers.VectorQuantizerEMA(
            **args, **self._ema_args, name="quantizer")
      else:
        self.quantizer = quantizers.VectorQuantizer(**args, name="quantizer")
      # The quantizer creates the rest of its state on its first call.
      self.quantizer(tf.zeros([0, embedding_dim], self.variable_dtype),
                     is_training=False)

  def _keras_weight(self, next_creator, **kwargs) -> tf.Variable:
    """Creates a variable the quantizer asks for as a Keras weight."""
    if self._creating_weight:
      # The tf.Variable that Keras creates behind the weight.
      return next_creator(**kwargs)
    initial_value = kwargs["initial_value"]
    if callable(initial_value):
      initial_value = initial_value()
    initial_value = tf.convert_to_tensor(initial_value,
                                         dtype=kwargs.get("dtype"))
    self._creating_weight = True
    try:
      weight = self._add_keras_weight(initial_value, kwargs)
    finally:
      self._creating_weight = False
    return weight.value

  def _add_keras_weight(self, initial_value: tf.Tensor,
                        kwargs: Dict[str, Any]) -> keras.Variable:
    return self.add_weight(
        shape=initial_value.shape,
        initializer=lambda shape, dtype: initial_value,
        dtype=initial_value.dtype,
        trainable=kwargs.get("trainable") is not False,
        # The quantizer updates its state itself: no autocast of it.
        autocast=False,
        name=_weight_name(kwargs.get("name")))

  def call(self, inputs, training: Optional[bool] = None):
    out = self.quantizer(inputs, is_training=bool(training))
    if training:
      self.add_loss(out["loss"])
    return out["quantize"]

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self) -> Dict[str, Any]:
    config = super().get_config()
    config.update(self._quantizer_args, ema=self.ema, **self._ema_args)
    return config
