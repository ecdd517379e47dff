"""Finite scalar quantization (FSQ, Mentzer et al. 2023) for Sonnet 2.

https://arxiv.org/abs/2309.15505: each of a few channels is bounded and
rounded to one of `levels[i]` values; the implied codebook is every
combination, prod(levels) codes, never stored. No codebook, no auxiliary loss
and so no codebook collapse; the encoder's last layer outputs len(levels)
channels.
"""

from typing import Dict, Sequence

import numpy as np
import sonnet as snt
import tensorflow as tf

from sonnet_vqvae import code_statistics
from sonnet_vqvae import quantizers

# Widens the bound a little, so that an even L's shift (atanh) is finite.
_BOUND_EPS = 1e-3


# No trainable variables, and asking for them is not an error.
@snt.allow_empty_variables
class FiniteScalarQuantizer(snt.Module):
  """FSQ layer: bounded channels rounded to a fixed grid, straight-through.

  Each channel i of the input is bounded by a shifted tanh to the interval
  of `levels[i]` integers centred on 0 ({-L/2, ..., L/2 - 1} for even L, the
  paper's offset), rounded with a straight-through gradient and rescaled by
  1 / (L // 2) into [-1, 1]. The code index is the mixed-radix number of the
  channels' levels, channel 0 the least significant digit.

  The last axis of the input holds the len(levels) channels; all other axes
  are flattened into vectors quantized independently. The output has the
  input's shape and dtype; arithmetic runs in float32 (float64 for float64
  inputs).

  Attributes:
    levels: tuple of ints, the number of values of each channel.
    embedding_dim: len(levels), the channels of the inputs.
    num_embeddings: prod(levels), the size of the implied codebook.
    usage: `CodeUsage`, the usage EMA behind `codes_used_ema` (no trainable
      variables).
  """

  def __init__(self,
               levels: Sequence[int] = (8, 5, 5, 5),
               *,
               usage_decay: float = 0.99,
               name: str = "finite_scalar_quantizer"):
    """Constructs the quantizer.

    Args:
      levels: number of values of each channel, each >= 2; their product
        (the implied codebook) at most 2**20.
      usage_decay: decay of the per-code usage EMA behind `codes_used_ema`.
      name: name of the module.

    Raises:
      ValueError: if levels is empty, a level is < 2, or their product is
        over 2**20.
    """
    super().__init__(name=name)
    levels = tuple(levels)
    if not levels or any(int(l) != l or l < 2 for l in levels):
      raise ValueError(
          f"levels must be a non-empty sequence of integers >= 2, got "
          f"{levels}.")
    self.levels = tuple(int(l) for l in levels)
    self.embedding_dim = len(levels)
    self.num_embeddings = int(np.prod(self.levels))
    self.usage = code_statistics.CodeUsage(self.num_embeddings, usage_decay)
    # Mixed-radix place values: channel 0 is the least significant digit.
    self._basis = np.cumprod((1,) + self.levels[:-1]).astype(np.int64)

  def _constants(self, dtype):
    levels = tf.constant(self.levels, dtype)
    return levels, tf.math.floordiv(levels, 2)

  def bound(self, z: tf.Tensor) -> tf.Tensor:
    """[..., D] -> [..., D]: each channel squashed into its rounding range.

    tanh(z + shift) * (L - 1)(1 + eps) / 2 - offset, with offset 1/2 for even
    L (so that rounding yields L values) and shift = atanh(offset / half
    range) so that 0 maps to 0, as lucidrains' vector-quantize-pytorch. (The
    paper's listing has (1 - eps) and tan for atanh, which differ from these
    by ~1e-3; with atanh, (1 - eps) would leave no shift for L = 2.)
    """
    levels, _ = self._constants(z.dtype)
    half_range = (levels - 1) * (1 + _BOUND_EPS) / 2
    offset = tf.where(tf.math.floormod(levels, 2) == 0, 0.5, 0.)
    offset = tf.cast(offset, z.dtype)
    shift = tf.math.atanh(offset / half_range)
    return tf.tanh(z + shift) * half_range - offset

  def codes_to_indices(self, codes: tf.Tensor) -> tf.Tensor:
    """[..., D] codes on the grid (values k / (L // 2)) -> int64 [...] indices."""
    codes = tf.convert_to_tensor(codes)
    levels, half_width = self._constants(codes.dtype)
    digits = tf.cast(tf.round(codes * half_width + half_width), tf.int64)
    return tf.reduce_sum(digits * self._basis, axis=-1)

  def indices_to_codes(self, indices: tf.Tensor) -> tf.Tensor:
    """int [...] indices -> float32 [..., D] codes; see `quantize`."""
    indices = tf.convert_to_tensor(indices)
    in_range = quantizers.check_indices(indices, self.num_embeddings,
                             "indices_to_codes")
    safe = tf.cast(tf.where(in_range, indices, tf.zeros_like(indices)),
                   tf.int64)
    levels, half_width = self._constants(tf.float32)
    digits = tf.math.floormod(
        tf.math.floordiv(safe[..., None], self._basis),
        tf.cast(self.levels, tf.int64))
    codes = (tf.cast(digits, tf.float32) - half_width) / half_width
    return tf.where(in_range[..., None], codes, float("nan"))

  def quantize(self, encoding_indices: tf.Tensor) -> tf.Tensor:
    """Returns the float32 codes [..., embedding_dim] of integer indices.

    An index outside [0, num_embeddings) raises InvalidArgumentError eagerly
    and in graphs; under XLA, where assertions are compiled out, it gives a
    vector of NaNs instead.
    """
    return self.indices_to_codes(encoding_indices)

  def __call__(self, inputs: tf.Tensor,
               is_training: bool) -> Dict[str, tf.Tensor]:
    """Quantizes `inputs` to the grid.

    Args:
      inputs: [..., embedding_dim] floating tensor of rank >= 2.
      is_training: whether to update the usage EMA.

    A non-finite input vector (any NaN or +-Inf) is left out of every
    statistic, gets index 0 and a NaN `quantize` row.

    Returns:
      dict with
        quantize: inputs' shape and dtype, the codes (values k / (L // 2) in
          [-1, 1]) with a straight-through gradient through the rounding and
          the tanh bound's gradient.
        loss: float32 scalar 0 (FSQ has no auxiliary loss).
        perplexity: scalar, exp(entropy) of the code histogram of the global
          batch (all replicas).
        encoding_indices: int64 inputs.shape[:-1], the code indices.
        codes_used: int32 scalar, distinct codes in the global batch.
        codes_used_ema: int32 scalar, codes whose usage EMA is at least
          (1 - usage_decay) / 2 vectors per step.
        nonfinite_inputs: int32 scalar, non-finite vectors in the global
          batch.
    """
    inputs = tf.convert_to_tensor(inputs)
    quantizers.check_inputs(inputs, self.embedding_dim)
    dtype = tf.float64 if inputs.dtype == tf.float64 else tf.float32
    z = tf.cast(inputs, dtype)
    finite = tf.reduce_all(tf.math.is_finite(z), axis=-1)
    bounded = self.bound(tf.where(finite[..., None], z, 0.))
    rounded = bounded + tf.stop_gradient(tf.round(bounded) - bounded)
    _, half_width = self._constants(dtype)
    codes = rounded / half_width
    indices = tf.where(finite, self.codes_to_indices(codes), 0)
    codes = tf.where(finite[..., None], codes, float("nan"))
    stats = self.usage(tf.reshape(indices, [-1]), tf.reshape(finite, [-1]),
                       is_training)
    return dict(quantize=tf.cast(codes, inputs.dtype),
                loss=tf.constant(0., tf.float32),
                encoding_indices=indices, **stats)

