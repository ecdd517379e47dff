"""Code statistics over the global batch for quantizers without a codebook.

FSQ and LFQ imply a codebook (every combination of levels or signs) that they
never store; residual VQ's codes are tuples of stage indices. Their
`perplexity`, `codes_used` and `codes_used_ema` mean what they mean for
`VectorQuantizer`: counted over the global batch (all replicas), with
non-finite input vectors left out.
"""

from typing import Dict

import sonnet as snt
import tensorflow as tf

from sonnet_vqvae import distribute
from sonnet_vqvae import quantizers

# The most codes `CodeUsage` keeps a usage EMA for: 4 MiB of float32 per
# quantizer, all-reduced every step.
MAX_CODES = 1 << 20


def _perplexity(counts: tf.Tensor) -> tf.Tensor:
  # The formula of VectorQuantizer's perplexity.
  probs = counts / tf.maximum(tf.reduce_sum(counts), 1.)
  return tf.exp(-tf.reduce_sum(probs * tf.math.log(probs + 1e-10)))


class CodeUsage(snt.Module):
  """Histogram metrics and a usage EMA of `num_codes` integer codes.

  The same metrics and usage rule as `VectorQuantizer`'s, for a quantizer
  whose codes are computed rather than looked up.

  Attributes:
    num_codes: K, the number of codes.
    usage_decay: decay of the usage EMA.
    code_usage: [K] EMA of the vectors per training step given each code.
    training_steps: int64 scalar, training steps with a finite vector.
  """

  def __init__(self, num_codes: int, usage_decay: float = 0.99,
               name: str = "code_usage"):
    """Constructs the statistics.

    Args:
      num_codes: K, the number of codes, at most `MAX_CODES`.
      usage_decay: decay of the per-code usage EMA behind `codes_used_ema`.
      name: name of the module.

    Raises:
      ValueError: if num_codes is not in [1, MAX_CODES] or usage_decay not
        in [0, 1).
    """
    super().__init__(name=name)
    if not 1 <= num_codes <= MAX_CODES:
      raise ValueError(
          f"The implied codebook has {num_codes} codes; at most {MAX_CODES} "
          f"(2**20) are supported: use fewer channels or levels.")
    if not 0 <= usage_decay < 1:
      raise ValueError(f"usage_decay must be in [0, 1), got {usage_decay}.")
    self.num_codes = num_codes
    self.usage_decay = usage_decay
    with tf.variable_creator_scope(distribute.replica_consistent_variables):
      self.code_usage = tf.Variable(tf.zeros([num_codes], tf.float32),
                                    trainable=False, name="code_usage")
      self.training_steps = tf.Variable(0, trainable=False, dtype=tf.int64,
                                        name="training_steps")

  def __call__(self, indices: tf.Tensor, finite: tf.Tensor,
               is_training: bool) -> Dict[str, tf.Tensor]:
    """Counts this replica's codes with the other replicas'.

    Args:
      indices: [N] integer codes in [0, num_codes).
      finite: [N] bool, False for the vectors to leave out (non-finite).
      is_training: whether to update the usage EMA; a step whose global
        batch has no finite vector changes nothing.

    Returns:
      dict with the int32 scalars `codes_used` (distinct codes in the global
      batch), `codes_used_ema` (codes whose usage EMA is at least
      (1 - usage_decay) / 2 vectors per step), `nonfinite_inputs` (left-out
      vectors in the global batch) and the float32 scalar `perplexity`
      (exp(entropy) of the global histogram).
    """
    segments = tf.where(finite, tf.cast(indices, tf.int64), self.num_codes)
    histogram = quantizers._sum_over_replicas(tf.math.unsorted_segment_sum(  # pylint: disable=protected-access
        tf.ones_like(segments, tf.float32), segments, self.num_codes + 1))
    counts = histogram[:self.num_codes]
    if is_training:
      has_data = tf.reduce_sum(counts) > 0
      # As VectorQuantizer: the first step sets the EMA to its histogram.
      usage = tf.where(
          tf.equal(self.training_steps, 0), counts,
          self.usage_decay * self.code_usage + (1 - self.usage_decay) * counts)
      self.code_usage.assign(tf.where(has_data, usage, self.code_usage))
      self.training_steps.assign_add(tf.cast(has_data, tf.int64))
    return {
        "perplexity": _perplexity(counts),
        "codes_used": tf.math.count_nonzero(counts, dtype=tf.int32),
        "codes_used_ema": tf.math.count_nonzero(
            self.code_usage >= (1 - self.usage_decay) / 2, dtype=tf.int32),
        "nonfinite_inputs": tf.cast(histogram[self.num_codes], tf.int32),
    }


def _gather_from_replicas(rows: tf.Tensor, fill: int) -> tf.Tensor:
  """[N, S] int32 rows of every replica, [R * max N, S], padded with `fill`.

  An all-reduce of one slot per replica rather than an all-gather, which
  cannot be ordered with the step's other collectives.
  """
  context = quantizers._replica_context()  # pylint: disable=protected-access
  if context is None:
    return rows
  num_rows = tf.shape(rows)[0]
  slot = tf.one_hot(context.replica_id_in_sync_group,
                    context.num_replicas_in_sync, dtype=rows.dtype)
  # ReduceOp has no MAX: every replica's row count, then their maximum.
  max_rows = tf.reduce_max(
      context.all_reduce(tf.distribute.ReduceOp.SUM, slot * num_rows))
  rows = tf.pad(rows, [[0, max_rows - num_rows], [0, 0]], constant_values=fill)
  everyone = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                slot[:, None, None] * rows[None])
  return tf.reshape(everyone, [-1, rows.shape[1]])


def tuple_statistics(codes: tf.Tensor,
                     valid: tf.Tensor) -> Dict[str, tf.Tensor]:
  """Distinct tuples and their perplexity over the global batch.

  For codes that are tuples of indices (residual VQ's stages), whose joint
  codebook is too large for a histogram: the rows of every replica are
  gathered and sorted. Memory and time are O(global N * S).

  Args:
    codes: [N, S] integer tuples, entries in [-1, 2**31 - 1).
    valid: [N] bool, the rows to count.

  Returns:
    dict with `codes_used` (int32 scalar, distinct valid tuples in the global
    batch) and `perplexity` (float32 scalar, exp(entropy) of their
    frequencies).
  """
  invalid = -2
  codes = tf.where(valid[:, None], tf.cast(codes, tf.int32), invalid)
  codes = _gather_from_replicas(codes, invalid)
  num_rows = tf.shape(codes)[0]
  # Lexicographic order: stable sorts from the last key to the first.
  order = tf.range(num_rows)
  for stage in reversed(range(codes.shape[1])):
    keys = tf.gather(codes[:, stage], order)
    order = tf.gather(order, tf.argsort(keys, stable=True))
  codes = tf.gather(codes, order)
  valid = codes[:, 0] != invalid
  changed = tf.reduce_any(codes[1:] != codes[:-1], axis=1)
  first_of_run = valid & tf.concat([[True], changed], axis=0)
  run = tf.cumsum(tf.cast(first_of_run, tf.int32)) - 1
  counts = tf.math.unsorted_segment_sum(
      tf.cast(valid, tf.float32), tf.where(valid, run, num_rows),
      num_rows + 1)[:num_rows]
  return {
      "codes_used": tf.reduce_sum(tf.cast(first_of_run, tf.int32)),
      "perplexity": _perplexity(counts),
  }
