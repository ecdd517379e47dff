"""The reference VQ-VAE for 32x32 images (Sonnet 2 vqvae_example notebook).

The encoder downsamples 4x to an 8x8 grid, a 1x1 conv maps it to the quantizer's
embedding size, and the decoder upsamples the quantized grid back to an image.
"""

import math
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import ml_collections
import sonnet as snt
import tensorflow as tf

from sonnet_vqvae import fsq
from sonnet_vqvae import lfq
from sonnet_vqvae import quantizers
from sonnet_vqvae import residual_vq
from sonnet_vqvae.configs import default

Quantizer = Union[quantizers.VectorQuantizer, quantizers.VectorQuantizerEMA,
                  residual_vq.ResidualVectorQuantizer,
                  fsq.FiniteScalarQuantizer, lfq.LookupFreeQuantizer]

# The bottlenecks `config.quantizer.kind` names; None means "ema" or "vq" as
# config.use_ema says (the configs of runs from before the kinds existed).
KINDS = ("vq", "ema", "residual", "fsq", "lfq")
# config.quantizer's keys of each kind (the other keys are the codebook-health
# options of every VQ codebook).
KIND_KEYS = {
    "vq": (), "ema": (),
    "residual": ("num_stages", "shared_codebook", "quantizer_dropout"),
    "fsq": ("levels",),
    "lfq": ("entropy_weight", "diversity_gamma"),
}
# Keys added with the kinds: a run's fingerprint names them only where they
# matter, so that the runs from before them resume.
_KIND_OPTIONS = ("kind", "gradient") + tuple(
    key for keys in KIND_KEYS.values() for key in keys)
_STRAIGHT_THROUGH = "straight_through"
# FSQ's and LFQ's largest implied codebooks (their usage EMAs hold a counter
# per code).
_MAX_CODES = 1 << 20

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
      h += conv1(tf.nn.relu(conv3(tf.nn.relu(_fusion_barrier(h)))))
    return tf.nn.relu(_fusion_barrier(h))


def _fusion_barrier(h: tf.Tensor) -> tf.Tensor:
  """`h` through a node that computes nothing, so that no relu reads a sum.

  Grappler's oneDNN remapper fuses conv + bias + sum + relu into one node and
  deletes the sum's node even where something else reads it too (the next
  block's skip, a caller's second relu): its whole pass then fails, printing
  "remapper failed: ... Mutation::Apply error ... missing node", and nothing
  in the function is fused. EnsureShape passes `h` on without a copy; grappler
  keeps it (an Identity it prunes).
  """
  return tf.ensure_shape(h, h.shape)


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
      quantizer: a `VectorQuantizer` or `VectorQuantizerEMA` (or snt.nets'),
        or one of the other bottlenecks (see `make_quantizer`).
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
      the `quantizer` sub-dict (its kind, that kind's options and the
      codebook-health options; see `build_quantizer`).
    data_variance: variance of the training images.

  Returns:
    An unbuilt `VQVAEModel` (variables are created on the first call).
  """
  sizes = (config.num_hiddens, config.num_residual_layers,
           config.num_residual_hiddens)
  quantizer = build_quantizer(config)
  return VQVAEModel(
      encoder=Encoder(*sizes),
      decoder=Decoder(*sizes),
      quantizer=quantizer,
      # The quantizer's embedding_dim: FSQ's len(levels), LFQ's bits.
      pre_vq_conv=snt.Conv2D(quantizer.embedding_dim, 1, name="to_vq"),
      data_variance=data_variance)


def quantizer_kind(config: ml_collections.ConfigDict) -> str:
  """config.quantizer.kind, or "ema" / "vq" from config.use_ema if None."""
  return _kind(config.quantizer.to_dict(), config.use_ema)


def _kind(options: Mapping[str, Any], use_ema: bool) -> str:
  kind = options.get("kind")
  if kind is None:
    return "ema" if use_ema else "vq"
  return kind


def quantizer_options(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """config.quantizer with the defaults of keys older run configs lack."""
  return _with_defaults(config.quantizer.to_dict())


def _with_defaults(options: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
  return {**default.get_config().quantizer.to_dict(), **(options or {})}


def build_quantizer(config: ml_collections.ConfigDict) -> Quantizer:
  """`make_quantizer` of a train config (see configs/default.py)."""
  return make_quantizer(
      config.quantizer.to_dict(), embedding_dim=config.embedding_dim,
      num_embeddings=config.num_embeddings,
      commitment_cost=config.commitment_cost, use_ema=config.use_ema,
      decay=config.decay, seed=config.seed)


def make_quantizer(options: Optional[Mapping[str, Any]], *,
                   embedding_dim: int,
                   num_embeddings: int,
                   commitment_cost: float,
                   use_ema: bool,
                   decay: float,
                   seed: int,
                   name: Optional[str] = None) -> Quantizer:
  """The bottleneck `options["kind"]` names, as a model's quantizer.

  * vq, ema: `VectorQuantizer` / `VectorQuantizerEMA` (embedding_dim,
    num_embeddings, commitment_cost, decay, gradient, codebook health);
  * residual: `ResidualVectorQuantizer` of options["num_stages"] codebooks
    of num_embeddings codes, each EMA or not as use_ema says;
  * fsq: `FiniteScalarQuantizer(options["levels"])`: len(levels) channels,
    prod(levels) codes (embedding_dim and num_embeddings are not read);
  * lfq: `LookupFreeQuantizer` of log2(num_embeddings) channels (bits).

  Args:
    options: a train config's `quantizer` dict (kind, the kind's options,
      codebook health); keys it lacks take configs/default.py's values.
    embedding_dim, num_embeddings, commitment_cost, use_ema, decay: as the
      train config's (num_embeddings: per codebook).
    seed: the seed of restarts and k-means.
    name: module name instead of the module's default.

  Returns:
    The quantizer, whose `embedding_dim` the encoder must output.
  """
  options = _with_defaults(options)
  kind = _kind(options, use_ema)
  names = {} if name is None else {"name": name}
  if kind == "fsq":
    return fsq.FiniteScalarQuantizer(
        tuple(options["levels"]), usage_decay=options["usage_decay"], **names)
  if kind == "lfq":
    bits = int(math.log2(num_embeddings))
    return lfq.LookupFreeQuantizer(
        bits, entropy_weight=options["entropy_weight"],
        commitment_cost=commitment_cost,
        diversity_gamma=options["diversity_gamma"],
        # The exact codebook entropy sums over 2**bits codes: to 16 bits.
        factorized_entropy=bits > 16, usage_decay=options["usage_decay"],
        **names)
  # Codebook health, the gradient and the seed: every VQ codebook's options.
  health = {key: value for key, value in options.items()
            if key not in _KIND_OPTIONS}
  health.update(gradient=options["gradient"], seed=seed)
  if kind == "residual":
    return residual_vq.ResidualVectorQuantizer(
        embedding_dim, num_embeddings, options["num_stages"],
        commitment_cost, use_ema=use_ema, decay=decay,
        shared_codebook=options["shared_codebook"],
        quantizer_dropout=options["quantizer_dropout"], **health, **names)
  if kind == "ema":
    return quantizers.VectorQuantizerEMA(
        embedding_dim, num_embeddings, commitment_cost, decay, **health,
        **names)
  return quantizers.VectorQuantizer(embedding_dim, num_embeddings,
                                    commitment_cost, **health, **names)


def quantizer_fingerprint(config: ml_collections.ConfigDict
                          ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(model keys, quantizer dict) of a run's fingerprint that the kind sets.

  A vq or ema run's fingerprint is the one of the runs from before the
  kinds (use_ema says which, quantizer holds the codebook-health options,
  and a non-default gradient), so their workdirs resume. Other kinds add
  `kind` and their options, and their effective embedding_dim and
  num_embeddings (FSQ's and LFQ's come from their options).
  """
  kind = quantizer_kind(config)
  options = quantizer_options(config)
  quantizer = {key: value for key, value in options.items()
               if key not in _KIND_OPTIONS}
  if options["gradient"] != _STRAIGHT_THROUGH:
    quantizer["gradient"] = options["gradient"]
  if kind in ("vq", "ema"):
    return {"use_ema": kind == "ema"}, quantizer
  quantizer.update(kind=kind, **{key: options[key] for key in KIND_KEYS[kind]})
  if kind == "fsq":
    levels = [int(n) for n in options["levels"]]
    quantizer["levels"] = levels
    # Neither codebook nor EMA: only the levels say what the run is.
    return {"embedding_dim": len(levels), "num_embeddings": math.prod(levels),
            "use_ema": None, "decay": None, "commitment_cost": None}, quantizer
  if kind == "lfq":
    return {"embedding_dim": int(math.log2(config.num_embeddings)),
            "use_ema": None, "decay": None}, quantizer
  return {}, quantizer


def check_quantizer_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for config.quantizer options that cannot build.

  The kind's name and options, and the sizes it needs: LFQ's num_embeddings
  (each level's) a power of two, FSQ's levels ints >= 2; a residual
  quantizer and FSQ's fixed levels are not VQ-VAE-2 options.
  """
  kind = config.quantizer.get("kind")
  if kind is not None and kind not in KINDS:
    raise ValueError(f"config.quantizer.kind must be None (from use_ema) or "
                     f"one of {KINDS}, got {kind!r}.")
  kind = quantizer_kind(config)
  options = quantizer_options(config)
  gradients = quantizers.GRADIENTS
  if options["gradient"] not in gradients:
    raise ValueError(f"config.quantizer.gradient must be one of {gradients}, "
                     f"got {options['gradient']!r}.")
  if options["gradient"] != _STRAIGHT_THROUGH and kind in ("fsq", "lfq"):
    raise ValueError(f"config.quantizer.gradient={options['gradient']!r} "
                     "is an option of the vq, ema and residual kinds, not "
                     f"of {kind!r}.")
  levels = config.get("num_levels", 1)
  if kind == "residual":
    stages = options["num_stages"]
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
      raise ValueError("config.quantizer.num_stages must be an int >= 1, got "
                       f"{stages!r}.")
    if not 0 <= options["quantizer_dropout"] <= 1:
      raise ValueError("config.quantizer.quantizer_dropout must be in [0, 1], "
                       f"got {options['quantizer_dropout']}.")
    if levels > 1:
      raise ValueError("config.quantizer.kind='residual' is a plain VQ-VAE's "
                       "bottleneck: set num_levels=1 (VQ-VAE-2 levels take "
                       "vq, ema, fsq or lfq).")
  if kind == "fsq":
    fsq_levels = options["levels"]
    if (not isinstance(fsq_levels, (tuple, list)) or not fsq_levels or
        not all(isinstance(n, int) and n >= 2 for n in fsq_levels) or
        math.prod(fsq_levels) > _MAX_CODES):
      raise ValueError("config.quantizer.levels must be a tuple of ints >= 2 "
                       "(values per channel) whose product is at most 2**20, "
                       f"got {fsq_levels!r}.")
    if config.get("level_num_embeddings") is not None:
      raise ValueError("config.level_num_embeddings must be None with "
                       "kind='fsq': every level has prod(quantizer.levels) "
                       "codes.")
  if kind == "lfq":
    for key in ("entropy_weight", "diversity_gamma"):
      if not options[key] >= 0:
        raise ValueError(f"config.quantizer.{key} must be >= 0, got "
                         f"{options[key]}.")
    sizes = config.get("level_num_embeddings") or [config.num_embeddings]
    for k in sizes:
      if not (isinstance(k, int) and 2 <= k <= _MAX_CODES and
              k & (k - 1) == 0):
        raise ValueError(
            "kind='lfq' quantizes log2(num_embeddings) channels to bits: "
            "config.num_embeddings (each level's) must be a power of two "
            f"from 2 to 2**20, got {k!r}.")


def _check_positive(**sizes: int) -> None:
  for key, value in sizes.items():
    if value <= 0:
      raise ValueError(f"{key} must be positive, got {value}.")
