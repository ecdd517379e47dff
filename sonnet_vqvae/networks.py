"""The reference VQ-VAE for 32x32 images (Sonnet 2 vqvae_example notebook).

The encoder downsamples 4x to an 8x8 grid, a 1x1 conv maps it to the quantizer's
embedding size, and the decoder upsamples the quantized grid back to an image.
"""

from typing import Dict, Union

import ml_collections
import sonnet as snt
import tensorflow as tf

from sonnet_vqvae import quantizers

Quantizer = Union[quantizers.VectorQuantizer, quantizers.VectorQuantizerEMA]

# Inside snt.mixed_precision.scope(tf.bfloat16 or tf.float16) the encoder's and
# decoder's convolutions compute in that type on float32 variables (cast on
# read) and return float32, so the quantizer and the losses stay in float32.
# The first call in the scope creates the variables in float32.
_mixed_precision = snt.mixed_precision.modes(
    [tf.float32, tf.bfloat16, tf.float16])
# The same decorator for other modules' convolution stacks (`hierarchical`).
mixed_precision_modes = _mixed_precision


class ResidualStack(snt.Module):
  """Residual blocks relu -> 3x3 conv -> relu -> 1x1 conv, then a final relu."""

  def __init__(self,
               num_hiddens: int,
               num_residual_layers: int,
               num_residual_hiddens: int,
               name: str = "residual_stack"):
    """Constructs the stack.

    Args:
      num_hiddens: channels of the input and of each block's output.
      num_residual_layers: number of residual blocks.
      num_residual_hiddens: channels inside each block.
      name: module name.

    Raises:
      ValueError: if a size is not positive (num_residual_layers may be 0).
    """
    super().__init__(name=name)
    _check_positive(num_hiddens=num_hiddens,
                    num_residual_hiddens=num_residual_hiddens)
    if num_residual_layers < 0:
      raise ValueError(
          f"num_residual_layers must be >= 0, got {num_residual_layers}.")
    self._layers = [
        (snt.Conv2D(num_residual_hiddens, 3, name=f"res3x3_{i}"),
         snt.Conv2D(num_hiddens, 1, name=f"res1x1_{i}"))
        for i in range(num_residual_layers)]

  def __call__(self, inputs: tf.Tensor) -> tf.Tensor:
    """Applies the stack to [B, H, W, num_hiddens] inputs; same shape out."""
    h = inputs
    for conv3, conv1 in self._layers:
      h += conv1(tf.nn.relu(conv3(tf.nn.relu(h))))
    return tf.nn.relu(h)


class Encoder(snt.Module):
  """Two stride-2 4x4 convs, a 3x3 conv, each with a relu, and a residual stack.

  Maps [B, H, W, C] images to [B, H/4, W/4, num_hiddens] features.
  """

  def __init__(self,
               num_hiddens: int,
               num_residual_layers: int,
               num_residual_hiddens: int,
               name: str = "encoder"):
    """Constructs the encoder; args as in `ResidualStack`."""
    super().__init__(name=name)
    _check_positive(num_hiddens=num_hiddens)
    self._enc_1 = snt.Conv2D(num_hiddens // 2, 4, stride=2, name="enc_1")
    self._enc_2 = snt.Conv2D(num_hiddens, 4, stride=2, name="enc_2")
    self._enc_3 = snt.Conv2D(num_hiddens, 3, name="enc_3")
    self._residual_stack = ResidualStack(num_hiddens, num_residual_layers,
                                         num_residual_hiddens)

  @_mixed_precision
  def __call__(self, images: tf.Tensor) -> tf.Tensor:
    """Encodes [B, H, W, C] images to [B, H/4, W/4, num_hiddens] features."""
    h = tf.nn.relu(self._enc_1(images))
    h = tf.nn.relu(self._enc_2(h))
    h = tf.nn.relu(self._enc_3(h))
    return self._residual_stack(h)


class Decoder(snt.Module):
  """A 3x3 conv, a residual stack and two stride-2 transposed convs.

  Upsamples 4x: [B, h, w, D] -> [B, 4h, 4w, output_channels].
  """

  def __init__(self,
               num_hiddens: int,
               num_residual_layers: int,
               num_residual_hiddens: int,
               output_channels: int = 3,
               name: str = "decoder"):
    """Constructs the decoder; args as in `ResidualStack`, plus channels."""
    super().__init__(name=name)
    _check_positive(num_hiddens=num_hiddens, output_channels=output_channels)
    self._dec_1 = snt.Conv2D(num_hiddens, 3, name="dec_1")
    self._residual_stack = ResidualStack(num_hiddens, num_residual_layers,
                                         num_residual_hiddens)
    self._dec_2 = snt.Conv2DTranspose(num_hiddens // 2, 4, stride=2,
                                      name="dec_2")
    self._dec_3 = snt.Conv2DTranspose(output_channels, 4, stride=2,
                                      name="dec_3")

  @_mixed_precision
  def __call__(self, inputs: tf.Tensor) -> tf.Tensor:
    """Decodes [B, h, w, D] to [B, 4h, 4w, output_channels] images."""
    h = self._residual_stack(self._dec_1(inputs))
    return self._dec_3(tf.nn.relu(self._dec_2(h)))


class VQVAEModel(snt.Module):
  """Encoder -> pre-VQ conv -> quantizer -> decoder, with the reference loss."""

  def __init__(self,
               encoder: Encoder,
               decoder: Decoder,
               quantizer: Quantizer,
               pre_vq_conv: snt.Module,
               data_variance: float,
               name: str = "vqvae_model"):
    """Constructs the model.

    Args:
      encoder: maps images to feature grids.
      decoder: maps quantized grids back to images.
      quantizer: a `VectorQuantizer` or `VectorQuantizerEMA` (or snt.nets').
      pre_vq_conv: maps encoder features to the quantizer's embedding_dim.
      data_variance: variance of the training images (in [0, 1] scale);
        `recon_error` is the MSE divided by it.
      name: module name.

    Raises:
      ValueError: if data_variance is not positive.
    """
    super().__init__(name=name)
    if not data_variance > 0:
      raise ValueError(f"data_variance must be positive, got {data_variance}.")
    self.encoder = encoder
    self.decoder = decoder
    self.quantizer = quantizer
    self.pre_vq_conv = pre_vq_conv
    self.data_variance = float(data_variance)

  def __call__(self, images: tf.Tensor,
               is_training: bool) -> Dict[str, Union[tf.Tensor, Dict]]:
    """Reconstructs images.

    Args:
      images: [B, 32, 32, 3] float images in [-0.5, 0.5].
      is_training: whether the quantizer updates its state (EMA, usage).

    Returns:
      Dict with
        z: [B, 8, 8, D] pre-quantization encodings.
        x_recon: [B, 32, 32, 3] reconstructions.
        loss: scalar, recon_error + quantizer loss.
        recon_error: scalar, mean squared error / data_variance.
        vq_output: the quantizer's output dict.
    """
    z = self.pre_vq_conv(self.encoder(images))
    vq_output = self.quantizer(z, is_training=is_training)
    x_recon = self.decoder(vq_output["quantize"])
    recon_error = tf.reduce_mean(
        tf.square(tf.cast(x_recon, tf.float32) - tf.cast(images, tf.float32))
    ) / self.data_variance
    loss = recon_error + tf.cast(vq_output["loss"], tf.float32)
    return {"z": z, "x_recon": x_recon, "loss": loss,
            "recon_error": recon_error, "vq_output": vq_output}

  def encode(self, images: tf.Tensor) -> tf.Tensor:
    """Maps [B, 32, 32, 3] images to [B, 8, 8] int code indices."""
    z = self.pre_vq_conv(self.encoder(images))
    return self.quantizer(z, is_training=False)["encoding_indices"]

  def decode(self, indices: tf.Tensor) -> tf.Tensor:
    """Maps [B, 8, 8] int code indices to [B, 32, 32, 3] images."""
    return self.decoder(self.quantizer.quantize(indices))


def build_model(config: ml_collections.ConfigDict,
                data_variance: float) -> VQVAEModel:
  """Builds the model `config` describes (see configs/default.py).

  Args:
    config: num_hiddens, num_residual_hiddens, num_residual_layers,
      embedding_dim, num_embeddings, commitment_cost, use_ema, decay, seed and
      the `quantizer` sub-dict of codebook-health options.
    data_variance: variance of the training images.

  Returns:
    An unbuilt `VQVAEModel` (variables are created on the first call).
  """
  sizes = (config.num_hiddens, config.num_residual_layers,
           config.num_residual_hiddens)
  health = dict(config.quantizer)
  if config.use_ema:
    quantizer = quantizers.VectorQuantizerEMA(
        config.embedding_dim, config.num_embeddings, config.commitment_cost,
        config.decay, seed=config.seed, **health)
  else:
    quantizer = quantizers.VectorQuantizer(
        config.embedding_dim, config.num_embeddings, config.commitment_cost,
        seed=config.seed, **health)
  return VQVAEModel(
      encoder=Encoder(*sizes),
      decoder=Decoder(*sizes),
      quantizer=quantizer,
      pre_vq_conv=snt.Conv2D(config.embedding_dim, 1, name="to_vq"),
      data_variance=data_variance)


def _check_positive(**sizes: int) -> None:
  for key, value in sizes.items():
    if value <= 0:
      raise ValueError(f"{key} must be positive, got {value}.")
