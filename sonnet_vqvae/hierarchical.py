"""VQ-VAE-2: a hierarchy of quantized latents (Razavi et al., 2019).

Razavi, van den Oord and Vinyals, "Generating Diverse High-Fidelity Images
with VQ-VAE-2" (arXiv 1906.00446), Figure 2a, for any number of levels:

* the bottom encoder downsamples the image 4x (`networks.Encoder`); each
  level above downsamples the one below 2x (`UpperEncoder`);
* the top level is quantized first; each level's decoder (`LevelDecoder`)
  upsamples its quantized vectors (joined with the decoder output from
  above) 2x, and that joins the level below's features before that level
  is quantized;
* the image decoder (`networks.Decoder`) reads every level: the bottom's
  quantized vectors and each higher level's, upsampled to the bottom grid by
  stride-2 transposed convolutions.

Lists of levels are top first throughout. With one level the model computes
exactly `networks.VQVAEModel`: encoder, 1x1 conv, quantizer, decoder.

`train` trains it when `config.num_levels >= 2` (`configs/vqvae2.py`), with
checkpoints, every strategy and per-level metrics; `decode_top` decodes from
the top levels alone (`train` plots it as level_reconstructions.png).
`prior` fits one PixelCNN per level to its codes (`hierarchical_prior`) and
samples them top-down; `export` writes it with one code grid per level.
"""

import numbers
from typing import Dict, List, Optional, Sequence, Union

import ml_collections
import sonnet as snt
import tensorflow as tf

from sonnet_vqvae import networks

Quantizer = networks.Quantizer


class UpperEncoder(snt.Module):
  """One level up: a stride-2 4x4 conv and a 3x3 conv (each with a relu), then
  a residual stack. Maps [B, h, w, C] to [B, h/2, w/2, num_hiddens]."""

  def __init__(self, num_hiddens: int, num_residual_layers: int,
               num_residual_hiddens: int, name: str = "upper_encoder"):
    """Constructs the encoder; args as in `networks.ResidualStack`."""
    super().__init__(name=name)
    self._down = snt.Conv2D(num_hiddens, 4, stride=2, name="down")
    self._conv = snt.Conv2D(num_hiddens, 3, name="conv")
    self._residual_stack = networks.ResidualStack(
        num_hiddens, num_residual_layers, num_residual_hiddens)

  @networks.mixed_precision_modes
  def __call__(self, inputs: tf.Tensor) -> tf.Tensor:
    h = tf.nn.relu(self._down(inputs))
    return self._residual_stack(tf.nn.relu(self._conv(h)))


class LevelDecoder(snt.Module):
  """A level's decoder: a 3x3 conv, a residual stack, a relu and a stride-2
  4x4 transposed conv. Maps [B, h, w, C] to [B, 2h, 2w, output_channels]."""

  def __init__(self, num_hiddens: int, num_residual_layers: int,
               num_residual_hiddens: int, output_channels: int,
               name: str = "level_decoder"):
    """Constructs the decoder; args as in `networks.ResidualStack`."""
    super().__init__(name=name)
    self._conv = snt.Conv2D(num_hiddens, 3, name="conv")
    self._residual_stack = networks.ResidualStack(
        num_hiddens, num_residual_layers, num_residual_hiddens)
    self._up = snt.Conv2DTranspose(output_channels, 4, stride=2, name="up")

  @networks.mixed_precision_modes
  def __call__(self, inputs: tf.Tensor) -> tf.Tensor:
    return self._up(tf.nn.relu(self._residual_stack(self._conv(inputs))))


class Upsampler(snt.Module):
  """`times` stride-2 4x4 transposed convs (relu between): 2**times upsampling
  of a level's quantized vectors to the bottom grid, for the image decoder."""

  def __init__(self, channels: int, times: int, name: str = "upsampler"):
    super().__init__(name=name)
    self._ups = [snt.Conv2DTranspose(channels, 4, stride=2, name=f"up_{i}")
                 for i in range(times)]

  @networks.mixed_precision_modes
  def __call__(self, inputs: tf.Tensor) -> tf.Tensor:
    h = inputs
    for i, up in enumerate(self._ups):
      h = up(h if i == 0 else tf.nn.relu(h))
    return h


class HierarchicalVQVAE(snt.Module):
  """VQ-VAE-2 with `len(quantizers)` levels (top first)."""

  def __init__(self,
               encoder: networks.Encoder,
               upper_encoders: Sequence[UpperEncoder],
               pre_vq_convs: Sequence[snt.Module],
               quantizers_: Sequence[Quantizer],
               level_decoders: Sequence[LevelDecoder],
               upsamplers: Sequence[Upsampler],
               decoder: networks.Decoder,
               data_variance: float,
               name: str = "hierarchical_vqvae"):
    """Constructs the model; every list is top first.

    Args:
      encoder: the bottom encoder (images -> 4x smaller features).
      upper_encoders: one per level above the bottom (L - 1).
      pre_vq_convs: one per level (L): features (joined with the decoder
        output from above) -> the quantizer's embedding_dim.
      quantizers_: one per level (L), each with its own codebook.
      level_decoders: one per level above the bottom (L - 1): that level's
        quantized vectors (joined with the decoder output from above) -> the
        grid of the level below.
      upsamplers: one per level above the bottom (L - 1): that level's
        quantized vectors -> the bottom grid, for the image decoder.
      decoder: the image decoder, reading all levels.
      data_variance: variance of the training images; `recon_error` is the
        MSE divided by it.
      name: module name.

    Raises:
      ValueError: for lists of inconsistent lengths or no level, or a data
        variance that is not positive.
    """
    super().__init__(name=name)
    levels = len(quantizers_)
    if levels < 1:
      raise ValueError("A hierarchical VQ-VAE needs at least one level.")
    for key, value in (("upper_encoders", upper_encoders),
                       ("level_decoders", level_decoders),
                       ("upsamplers", upsamplers)):
      if len(value) != levels - 1:
        raise ValueError(f"{key} must hold {levels - 1} modules (one per "
                         f"level above the bottom), got {len(value)}.")
    if len(pre_vq_convs) != levels:
      raise ValueError(f"pre_vq_convs must hold {levels} modules, got "
                       f"{len(pre_vq_convs)}.")
    if not data_variance > 0:
      raise ValueError(f"data_variance must be positive, got {data_variance}.")
    self.encoder = encoder
    self.upper_encoders = list(upper_encoders)
    self.pre_vq_convs = list(pre_vq_convs)
    self.quantizers = list(quantizers_)
    self.level_decoders = list(level_decoders)
    self.upsamplers = list(upsamplers)
    self.decoder = decoder
    self.data_variance = float(data_variance)

  @property
  def num_levels(self) -> int:
    return len(self.quantizers)

  @property
  def quantizer(self) -> Quantizer:
    """The bottom level's quantizer (`VQVAEModel`'s one quantizer)."""
    return self.quantizers[-1]

  def _features(self, images):
    """Encoder features of every level, top first."""
    features = [self.encoder(images)]
    for upper in reversed(self.upper_encoders):  # Bottom-up.
      features.append(upper(features[-1]))
    return features[::-1]

  def _quantize_levels(self, images, is_training):
    """Quantizes top-down; returns (zs, vq_outputs), top first."""
    zs, outputs, above = [], [], None
    for level, features in enumerate(self._features(images)):
      if above is not None:
        features = tf.concat([features, tf.cast(above, features.dtype)], -1)
      z = self.pre_vq_convs[level](features)
      vq_output = self.quantizers[level](z, is_training=is_training)
      zs.append(z)
      outputs.append(vq_output)
      if level < self.num_levels - 1:
        h = vq_output["quantize"]
        if above is not None:
          h = tf.concat([h, tf.cast(above, h.dtype)], -1)
        above = self.level_decoders[level](h)
    return zs, outputs

  def _decode_quantized(self, quantized: Sequence[tf.Tensor]) -> tf.Tensor:
    """The image decoder on every level's quantized vectors (top first)."""
    bottom = quantized[-1]
    parts = [up(q) for up, q in zip(self.upsamplers, quantized[:-1])]
    inputs = tf.concat([tf.cast(p, bottom.dtype) for p in parts] + [bottom],
                       -1) if parts else bottom
    return self.decoder(inputs)

  def __call__(self, images: tf.Tensor,
               is_training: bool) -> Dict[str, Union[tf.Tensor, Dict, List]]:
    """Reconstructs images.

    Args:
      images: [B, H, W, C] float images in [-0.5, 0.5]; H and W divisible by
        4 * 2**(levels - 1).
      is_training: whether the quantizers update their state.

    Returns:
      Dict with
        z: the bottom level's pre-quantization encodings [B, H/4, W/4, D].
        x_recon: [B, H, W, C] reconstructions.
        loss: scalar, recon_error + every level's quantizer loss.
        recon_error: scalar, mean squared error / data_variance.
        vq_outputs: each level's quantizer output dict, top first.
        vq_output: the bottom level's (as `VQVAEModel`'s).
    """
    zs, vq_outputs = self._quantize_levels(images, is_training)
    x_recon = self._decode_quantized([o["quantize"] for o in vq_outputs])
    recon_error = tf.reduce_mean(
        tf.square(tf.cast(x_recon, tf.float32) - tf.cast(images, tf.float32))
    ) / self.data_variance
    loss = recon_error + tf.add_n(
        [tf.cast(o["loss"], tf.float32) for o in vq_outputs])
    return {"z": zs[-1], "x_recon": x_recon, "loss": loss,
            "recon_error": recon_error, "vq_outputs": vq_outputs,
            "vq_output": vq_outputs[-1]}

  def encode(self, images: tf.Tensor) -> List[tf.Tensor]:
    """Maps images to each level's int code grid, top first.

    [B, H, W, C] -> [[B, H/2**(L+1), W/2**(L+1)], ..., [B, H/4, W/4]].
    """
    return [o["encoding_indices"]
            for o in self._quantize_levels(images, is_training=False)[1]]

  def decode(self, codes: Sequence[tf.Tensor]) -> tf.Tensor:
    """Maps code grids (top first, as from `encode`) to [B, H, W, C] images."""
    return self.decode_top(codes, self.num_levels)

  def decode_top(self, codes: Sequence[tf.Tensor], levels: int) -> tf.Tensor:
    """Decodes from the top `levels` levels alone: what those levels carry.

    Args:
      codes: every level's int code grid, top first, as from `encode`:
        [[B, H/2**(L+1), W/2**(L+1)], ..., [B, H/4, W/4]]. Only the top
        `levels` grids are read; the finer ones give only their shapes.
      levels: how many levels, from the top, to decode from: 1 (the top
        only) to `num_levels` (all: `decode(codes)`).

    Returns:
      [B, H, W, C] images.

    Raises:
      ValueError: for a wrong number of code grids, or `levels` not an int
        in [1, num_levels].
    """
    if len(codes) != self.num_levels:
      raise ValueError(f"decoding takes {self.num_levels} code grids (top "
                       f"first), got {len(codes)}.")
    if (isinstance(levels, bool) or not isinstance(levels, numbers.Integral)
        or not 1 <= levels <= self.num_levels):
      raise ValueError(f"levels must be an int in [1, {self.num_levels}] "
                       f"(how many levels from the top), got {levels!r}.")
    quantized = [vq.quantize(c) for vq, c in
                 zip(self.quantizers[:levels], codes[:levels])]
    # Finer levels' vectors are zeros, the same for every image: the decoder
    # gets no information from them (their codes are not even looked up).
    quantized += [tf.zeros(tf.concat([tf.shape(c), [vq.embedding_dim]], 0),
                           quantized[0].dtype)
                  for vq, c in zip(self.quantizers[levels:], codes[levels:])]
    return self._decode_quantized(quantized)


def build_hierarchical(*, num_embeddings: Sequence[int],
                       num_hiddens: int = 128,
                       num_residual_layers: int = 2,
                       num_residual_hiddens: int = 32,
                       embedding_dim: int = 64,
                       commitment_cost: float = 0.25,
                       use_ema: bool = True,
                       decay: float = 0.99,
                       data_variance: float = 1.0,
                       seed: int = 0,
                       output_channels: int = 3,
                       quantizer_options: Optional[Dict] = None
                       ) -> HierarchicalVQVAE:
  """A VQ-VAE-2 with one level per entry of `num_embeddings` (top first).

  Sizes are the reference VQ-VAE's; every level has the same embedding_dim.
  With one level this builds `networks.build_model`'s model.

  Args:
    num_embeddings: codebook size of each level, top first, e.g. (512, 512).
    num_hiddens, num_residual_layers, num_residual_hiddens: as
      `networks.Encoder`'s, for every level's encoder and decoder.
    embedding_dim, commitment_cost, use_ema, decay: as the quantizers'.
    data_variance: see `HierarchicalVQVAE`.
    seed: the quantizers' seed (level i uses seed + i).
    output_channels: image channels.
    quantizer_options: every quantizer's kind and options (as
      `configs/default.py`'s `quantizer`; see `networks.make_quantizer`).

  Raises:
    ValueError: for no level or a size that is not positive.
  """
  levels = len(num_embeddings)
  if levels < 1:
    raise ValueError("num_embeddings must name at least one level.")
  sizes = (num_hiddens, num_residual_layers, num_residual_hiddens)
  options = dict(quantizer_options or {})

  def quantizer(level, k):
    # One level: the plain model's module names too.
    names = {} if levels == 1 else {"name": f"vector_quantizer_{level}"}
    return networks.make_quantizer(
        options, embedding_dim=embedding_dim, num_embeddings=k,
        commitment_cost=commitment_cost, use_ema=use_ema, decay=decay,
        seed=seed + level, **names)

  quantizers_ = [quantizer(i, k) for i, k in enumerate(num_embeddings)]
  return HierarchicalVQVAE(
      encoder=networks.Encoder(*sizes),
      upper_encoders=[UpperEncoder(*sizes, name=f"upper_encoder_{i}")
                      for i in range(levels - 1)],
      # Each level's quantizer's embedding_dim (FSQ's len(levels), LFQ's
      # bits; embedding_dim for VQ).
      pre_vq_convs=[snt.Conv2D(vq.embedding_dim, 1, name=(
          "to_vq" if levels == 1 else f"to_vq_{i}"))
                    for i, vq in enumerate(quantizers_)],
      quantizers_=quantizers_,
      level_decoders=[LevelDecoder(*sizes, output_channels=embedding_dim,
                                   name=f"level_decoder_{i}")
                      for i in range(levels - 1)],
      upsamplers=[Upsampler(embedding_dim, levels - 1 - i,
                            name=f"upsampler_{i}")
                  for i in range(levels - 1)],
      decoder=networks.Decoder(*sizes, output_channels=output_channels),
      data_variance=data_variance)


def level_num_embeddings(config: ml_collections.ConfigDict) -> List[int]:
  """Each level's codebook size, top first, from a train config."""
  if config.get("level_num_embeddings") is None:
    return [config.num_embeddings] * config.get("num_levels", 1)
  return [int(k) for k in config.level_num_embeddings]


def build_from_config(config: ml_collections.ConfigDict,
                      data_variance: float) -> HierarchicalVQVAE:
  """The VQ-VAE-2 a train config describes (`num_levels` >= 1)."""
  return build_hierarchical(
      num_embeddings=level_num_embeddings(config),
      num_hiddens=config.num_hiddens,
      num_residual_layers=config.num_residual_layers,
      num_residual_hiddens=config.num_residual_hiddens,
      embedding_dim=config.embedding_dim,
      commitment_cost=config.commitment_cost, use_ema=config.use_ema,
      decay=config.decay, data_variance=data_variance, seed=config.seed,
      quantizer_options=config.quantizer.to_dict())
