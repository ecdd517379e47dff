"""Lookup-free quantization (LFQ, MAGVIT-v2, Yu et al. 2023) for Sonnet 2.

https://arxiv.org/abs/2310.05737: each channel is quantized to its sign, so
the implied codebook is {-1, 1}^D, 2**D codes never stored, and the code
index is the D sign bits. An entropy penalty keeps the codes confident (low
per-sample entropy) and all of them used (high entropy of the batch's mean
code distribution), with code probabilities softmax(2 x . c / temperature)
over the codes c, as lucidrains' vector-quantize-pytorch.
"""

from typing import Dict

import numpy as np
import sonnet as snt
import tensorflow as tf

from sonnet_vqvae import code_statistics
from sonnet_vqvae import quantizers

# Largest D of the exact codebook entropy: it holds [N, 2**D] probabilities.
MAX_EXACT_ENTROPY_DIM = 16


def _binary_entropy(logits: tf.Tensor) -> tf.Tensor:
  """Entropy (nats) of Bernoulli(sigmoid(logits)), elementwise and stable."""
  p = tf.sigmoid(logits)
  return p * tf.nn.softplus(-logits) + (1 - p) * tf.nn.softplus(logits)


def _entropy(probs: tf.Tensor) -> tf.Tensor:
  # xlogy: 0 log 0 = 0, and its gradient there is 0 rather than NaN.
  return -tf.reduce_sum(tf.math.xlogy(probs, probs), axis=-1)


def _mean_over_replicas(total: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
  """sum(total) / sum(count) over replicas, differentiable in `total`.

  Every replica gets the global value; the all-reduce's gradient sums the
  replicas' gradients, so summing per-replica losses divided by the number
  of replicas gives the gradient of the global value.
  """
  total = quantizers._sum_over_replicas(total)  # pylint: disable=protected-access
  count = quantizers._sum_over_replicas(count)  # pylint: disable=protected-access
  return total / tf.maximum(count, 1.)


@snt.allow_empty_variables
class LookupFreeQuantizer(snt.Module):
  """LFQ layer: the sign of each channel, straight-through, entropy penalty.

  The last axis of the input holds the D = embedding_dim channels; all other
  axes are flattened into vectors quantized independently. A vector x gets
  the code sign(x) in {-1, 1}^D (0 counts as negative) and the index
  sum_d [x_d > 0] 2**(D - 1 - d) (channel 0 the most significant bit).

  With the channel probabilities p_d = sigmoid(4 x_d / temperature) (the
  per-channel factors of softmax(2 x . c / temperature) over the codes c),

      loss = entropy_weight * (per_sample_entropy
                               - diversity_gamma * codebook_entropy)
             + commitment_cost * mean((x - sg(sign(x)))^2)

  where per_sample_entropy is the mean over vectors of H(q(c | x)) (exact: a
  sum of the D channels' binary entropies) and codebook_entropy is
  H(mean over vectors of q(c | x)), both over the global batch (all replicas;
  their gradients are those of the global values, see `__call__`). The
  codebook entropy is exact over the 2**D codes, which holds [N, 2**D]
  probabilities and so needs D <= 16; `factorized_entropy=True` replaces it
  by the sum of the channels' binary entropies of their mean probabilities
  (the entropy of the product of the marginals, an upper bound; BSQ, Zhao et
  al. 2024), O(N D) for any D.

  Attributes:
    embedding_dim: D, the channels of the inputs.
    num_embeddings: 2**D, the size of the implied codebook.
    usage: `CodeUsage`, the usage EMA behind `codes_used_ema` (no trainable
      variables).
  """

  def __init__(self,
               embedding_dim: int,
               *,
               entropy_weight: float = 0.1,
               commitment_cost: float = 0.25,
               diversity_gamma: float = 1.0,
               temperature: float = 0.01,
               factorized_entropy: bool = False,
               usage_decay: float = 0.99,
               name: str = "lookup_free_quantizer"):
    """Constructs the quantizer.

    Args:
      embedding_dim: D, the number of channels (bits), 1 to 20 (the usage
        EMA holds 2**D counters); 1 to 16 unless factorized_entropy.
      entropy_weight: weight of the entropy penalty, >= 0.
      commitment_cost: weight of the commitment loss, >= 0.
      diversity_gamma: weight of the codebook (batch) entropy inside the
        penalty, >= 0.
      temperature: of the code distribution softmax(2 x . c / temperature),
        > 0 (lucidrains' inv_temperature=100 is 0.01).
      factorized_entropy: use the factorized codebook entropy (see the class
        docstring), required for embedding_dim > 16.
      usage_decay: decay of the per-code usage EMA behind `codes_used_ema`.
      name: name of the module.

    Raises:
      ValueError: if an argument is out of range.
    """
    super().__init__(name=name)
    if not 1 <= embedding_dim <= 20:
      raise ValueError(
          f"embedding_dim must be in [1, 20] (2**embedding_dim codes), got "
          f"{embedding_dim}.")
    if embedding_dim > MAX_EXACT_ENTROPY_DIM and not factorized_entropy:
      raise ValueError(
          f"embedding_dim={embedding_dim} needs factorized_entropy=True: the "
          f"exact codebook entropy holds [N, 2**embedding_dim] probabilities "
          f"and supports embedding_dim <= {MAX_EXACT_ENTROPY_DIM}.")
    for arg, value in (("entropy_weight", entropy_weight),
                       ("commitment_cost", commitment_cost),
                       ("diversity_gamma", diversity_gamma)):
      if value < 0:
        raise ValueError(f"{arg} must be non-negative, got {value}.")
    if temperature <= 0:
      raise ValueError(f"temperature must be positive, got {temperature}.")
    self.embedding_dim = embedding_dim
    self.num_embeddings = 2**embedding_dim
    self.entropy_weight = entropy_weight
    self.commitment_cost = commitment_cost
    self.diversity_gamma = diversity_gamma
    self.temperature = temperature
    self.factorized_entropy = factorized_entropy
    self.usage = code_statistics.CodeUsage(self.num_embeddings, usage_decay)
    # Bit d of an index has place value 2**(D - 1 - d).
    self._place_values = 2**np.arange(embedding_dim - 1, -1, -1,
                                      dtype=np.int64)

  def quantize(self, encoding_indices: tf.Tensor) -> tf.Tensor:
    """Returns the float32 codes [..., embedding_dim] (+-1) of integer indices.

    An index outside [0, num_embeddings) raises InvalidArgumentError eagerly
    and in graphs; under XLA, where assertions are compiled out, it gives a
    vector of NaNs instead.
    """
    in_range = quantizers.check_indices(encoding_indices, self.num_embeddings,
                                        "quantize")
    indices = tf.cast(encoding_indices, tf.int64)
    bits = tf.math.floormod(
        tf.math.floordiv(indices[..., None], self._place_values), 2)
    codes = tf.cast(2 * bits - 1, tf.float32)
    return tf.where(in_range[..., None], codes, float("nan"))

  def _entropies(self, x: tf.Tensor, finite: tf.Tensor):
    """Per-sample and codebook entropies of the [N, D] finite rows of `x`."""
    logits = 4 * x / self.temperature
    weights = tf.cast(finite, x.dtype)
    count = tf.reduce_sum(weights)
    per_sample = _mean_over_replicas(
        tf.reduce_sum(weights * tf.reduce_sum(_binary_entropy(logits), -1)),
        count)
    if self.factorized_entropy:
      mean_p = _mean_over_replicas(
          tf.reduce_sum(weights[:, None] * tf.sigmoid(logits), 0), count)
      codebook = tf.reduce_sum(
          _entropy(tf.stack([mean_p, 1 - mean_p], axis=-1)))
    else:
      # log q(c | x) = sum_d log p_d(c_d), for every code c: [N, 2**D].
      log_pos = -tf.nn.softplus(-logits)
      log_neg = -tf.nn.softplus(logits)
      bits = tf.constant(
          (np.arange(self.num_embeddings)[:, None] & self._place_values) > 0,
          x.dtype)
      log_q = (tf.reduce_sum(log_neg, -1, keepdims=True) +
               tf.matmul(log_pos - log_neg, bits, transpose_b=True))
      avg_q = _mean_over_replicas(
          tf.reduce_sum(weights[:, None] * tf.exp(log_q), 0), count)
      codebook = _entropy(avg_q)
    return per_sample, codebook

  def __call__(self, inputs: tf.Tensor,
               is_training: bool) -> Dict[str, tf.Tensor]:
    """Quantizes `inputs` to the signs of their channels.

    Args:
      inputs: [..., embedding_dim] floating tensor of rank >= 2.
      is_training: whether to update the usage EMA.

    The entropies are global (identical on every replica) and differentiable
    through the all-reduce, whose gradient sums the replicas' gradients: a
    trainer that sums each replica's loss / num_replicas (the usual global
    batch mean) gets the gradient of the global entropy. A non-finite input
    vector (any NaN or +-Inf) is left out of the entropies and the code
    statistics, gets index 0, a NaN `quantize` row and a non-finite `loss`.

    Returns:
      dict with
        quantize: inputs' shape and dtype, the codes (+-1) with a
          straight-through gradient to `inputs`.
        loss: float32 scalar, the entropy penalty plus the commitment loss.
        perplexity: scalar, exp(entropy) of the code histogram of the global
          batch (all replicas).
        encoding_indices: int64 inputs.shape[:-1], the code indices (bits).
        codes_used: int32 scalar, distinct codes in the global batch.
        codes_used_ema: int32 scalar, codes whose usage EMA is at least
          (1 - usage_decay) / 2 vectors per step.
        nonfinite_inputs: int32 scalar, non-finite vectors in the global
          batch.
        per_sample_entropy: float32 scalar, mean entropy (nats) of q(c | x).
        codebook_entropy: float32 scalar, entropy (nats) of the mean of
          q(c | x) over the global batch (factorized if so constructed).
    """
    inputs = tf.convert_to_tensor(inputs)
    quantizers.check_inputs(inputs, self.embedding_dim)
    dtype = tf.float64 if inputs.dtype == tf.float64 else tf.float32
    x = tf.reshape(tf.cast(inputs, dtype), [-1, self.embedding_dim])
    finite = tf.reduce_all(tf.math.is_finite(x), axis=-1)
    positive = x > 0
    codes = tf.where(positive, tf.constant(1., dtype), -1.)
    indices = tf.where(
        finite, tf.reduce_sum(tf.cast(positive, tf.int64) * self._place_values,
                              -1), 0)
    commitment = quantizers._mean_square(x - tf.stop_gradient(codes))  # pylint: disable=protected-access
    per_sample, codebook = self._entropies(
        tf.where(finite[:, None], x, 0.), finite)
    loss = (self.entropy_weight * (per_sample - self.diversity_gamma * codebook)
            + self.commitment_cost * commitment)
    quantized = x + tf.stop_gradient(codes - x)
    quantized = tf.where(finite[:, None], quantized, float("nan"))
    stats = self.usage(indices, finite, is_training)
    shape = tf.shape(inputs)
    return dict(
        quantize=tf.cast(tf.reshape(quantized, shape), inputs.dtype),
        loss=tf.cast(loss, tf.float32),
        encoding_indices=tf.reshape(indices, shape[:-1]),
        per_sample_entropy=tf.cast(per_sample, tf.float32),
        codebook_entropy=tf.cast(codebook, tf.float32),
        **stats)
