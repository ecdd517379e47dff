"""Vector quantizers of VQ-VAE (https://arxiv.org/abs/1711.00937) for Sonnet 2.

`VectorQuantizer` and `VectorQuantizerEMA` are drop-in replacements for
`snt.nets.VectorQuantizer` and `snt.nets.VectorQuantizerEMA`: same constructor
arguments, same output dict, same initialisers, losses and EMA updates. On top of
the reference they

* all-reduce the EMA statistics and the code histogram across replicas, so under
  any `tf.distribute` strategy every replica holds the same codebook, equal to
  the one a single device computes on the concatenated batch;
* accept bfloat16 / float16 inputs and search codes in float32;
* derive counts and summed inputs from the indices (segment sums) instead of an
  `[N, K]` one-hot matmul, and search large codebooks in chunks;
* offer codebook-health options, all off by default: a usage EMA with metrics,
  dead-code restarts, k-means initialisation and l2-normalised (cosine) codes;
* leave non-finite input vectors out of every statistic, so that one NaN or Inf
  never reaches the codebook (they are counted in `nonfinite_inputs`).
"""

from typing import Dict, Optional, Union

import sonnet as snt
import tensorflow as tf

from sonnet_vqvae import distribute

# Above this many [N, K] distance entries the nearest-code search runs in chunks
# of rows, so that memory stays O(chunk * K) instead of O(N * K).
_CHUNK_ELEMENTS = 1 << 24

# Where matmuls round their operands (`reduced_precision_matmul`), the search
# re-ranks this many candidates of the matmul's scores exactly.
RERANK_CANDIDATES = 8

# An input vector whose squared norm exceeds this (or overflows) counts as
# non-finite: its share of the EMA statistics could overflow them, or leave a
# code out at 1e15. Encoders' outputs are many orders of magnitude smaller.
MAX_SQUARED_NORM = 1e30


# Moved to `distribute`; kept here for existing callers.
replica_consistent_variables = distribute.replica_consistent_variables

# The checkpoint keys of `snt.ExponentialMovingAverage`'s state (its attribute
# names). Our moving average stores its state under them, so checkpoints of
# the Sonnet-based quantizer (tests/golden/) keep restoring.
_EMA_COUNTER_KEY = "_counter"
_EMA_HIDDEN_KEY = "_hidden"


class ExponentialMovingAverage(snt.Module):
  """Debiased exponential moving average, as `snt.ExponentialMovingAverage`.

  The same variables, update order and arithmetic as Sonnet 2.0.2's module, so
  both compute identical values and read each other's checkpoints; on top of
  it, an update can be skipped (`apply_if`) and chosen entries reset
  (`reset_where`). Starting from hidden = 0, each update of `value` computes

      counter += 1
      hidden -= (hidden - value) * (1 - decay)
      average = hidden / (1 - decay^counter)

  Attributes:
    decay: the decay, a float or a scalar tensor of the values' dtype.
    average: variable, the debiased average; None until `initialize`.
  """

  def __init__(self, decay: Union[float, tf.Tensor],
               name: Optional[str] = None):
    """Constructs the moving average.

    Args:
      decay: values close to 1 decay slowly, close to 0 track the inputs.
        With float64 values pass a float64 tensor: a Python float meets them
        as float32 inside tf.function.
      name: module name.
    """
    super().__init__(name=name)
    self.decay = decay
    setattr(self, _EMA_COUNTER_KEY, tf.Variable(
        0, trainable=False, dtype=tf.int64, name="counter"))
    setattr(self, _EMA_HIDDEN_KEY, None)
    self.average = None

  @snt.once
  def initialize(self, value: tf.Tensor) -> None:
    """Creates the zero state of `value`'s shape and dtype (first call only)."""
    setattr(self, _EMA_HIDDEN_KEY, tf.Variable(
        tf.zeros_like(value), trainable=False, name="hidden"))
    self.average = tf.Variable(tf.zeros_like(value), trainable=False,
                               name="average")

  @property
  def counter(self) -> tf.Variable:
    """int64 scalar variable, the number of updates since the last reset."""
    return getattr(self, _EMA_COUNTER_KEY)

  @property
  def hidden(self) -> Optional[tf.Variable]:
    """The biased state, average * (1 - decay^counter); None until created."""
    return getattr(self, _EMA_HIDDEN_KEY)

  def update(self, value: tf.Tensor,
             apply_if: Optional[tf.Tensor] = None) -> None:
    """Folds `value` into the average.

    Args:
      value: tensor of the average's shape and dtype (the first call creates
        the state from it).
      apply_if: optional scalar bool; when False nothing changes (counter
        included), as if this update had not happened.
    """
    self.initialize(value)
    value = tf.convert_to_tensor(value)

    def unless_skipped(new, old):
      # tf.where, not tf.cond: MirroredStrategy cannot sync assignments
      # inside control flow.
      return new if apply_if is None else tf.where(apply_if, new, old)

    counter = self.counter + 1
    hidden = self.hidden - (self.hidden - value) * (1 - self.decay)
    average = hidden / (1. - tf.pow(self.decay, tf.cast(counter, value.dtype)))
    self.counter.assign(unless_skipped(counter, self.counter))
    self.hidden.assign(unless_skipped(hidden, self.hidden))
    self.average.assign(unless_skipped(average, self.average))

  def __call__(self, value: tf.Tensor,
               apply_if: Optional[tf.Tensor] = None) -> tf.Tensor:
    """`update(value, apply_if)`, then returns the average."""
    self.update(value, apply_if)
    return self.value

  @property
  def value(self) -> tf.Tensor:
    """The current average."""
    return self.average.read_value()

  def reset(self) -> None:
    """Forgets every value: counter, hidden and average back to zero."""
    self.counter.assign(tf.zeros_like(self.counter))
    self.hidden.assign(tf.zeros_like(self.hidden))
    self.average.assign(tf.zeros_like(self.average))

  def reset_where(self, mask: tf.Tensor, value: tf.Tensor) -> None:
    """Sets the average to `value` where `mask` is True, keeping the counter.

    The reset entries' hidden state becomes value * (1 - decay^counter), so
    the next update blends the new value into `value` as into an average of
    `counter` updates. Before the first update (counter 0) only the average
    is set: the first update replaces it.

    Args:
      mask: bool tensor broadcastable to the average's shape.
      value: tensor broadcastable to the average's shape.
    """
    dtype = self.average.dtype
    value = tf.cast(value, dtype)
    debias = 1 - tf.pow(tf.cast(self.decay, dtype),
                        tf.cast(self.counter, dtype))
    self.hidden.assign(tf.where(mask, value * debias, self.hidden))
    self.average.assign(tf.where(mask, value, self.average))


def _replica_context() -> Optional[tf.distribute.ReplicaContext]:
  """The replica context when there is more than one replica, else None."""
  context = tf.distribute.get_replica_context()
  if context is None or context.num_replicas_in_sync == 1:
    return None
  return context


def _sum_over_replicas(value: tf.Tensor) -> tf.Tensor:
  context = _replica_context()
  if context is None:
    return value
  return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def _broadcast_from_first_replica(value: tf.Tensor) -> tf.Tensor:
  """Replica 0's `value`, on every replica."""
  context = _replica_context()
  if context is None:
    return value
  # A sum with zeros from the other replicas: all_gather cannot be ordered with
  # the other collectives of the step, all_reduce can.
  is_first = tf.equal(context.replica_id_in_sync_group, 0)
  return context.all_reduce(tf.distribute.ReduceOp.SUM,
                            tf.where(is_first, value, tf.zeros_like(value)))


# How `quantize`'s gradient reaches the inputs (the `gradient` option).
GRADIENTS = ("straight_through", "rotation")


def rotation_trick(inputs: tf.Tensor, codes: tf.Tensor) -> tf.Tensor:
  """`codes`, with the rotation trick's gradient to `inputs`.

  The rotation trick of Fifty et al. 2024 (https://arxiv.org/abs/2410.06424):
  each input vector e reaches its code q through the rotation R that turns
  e/|e| onto q/|q| in their common plane (identity orthogonally to it) and the
  rescaling |q|/|e|, both held constant (stop-gradient), so that

      quantize = sg(|q| / |e| * R) e,     dL/de = |q| / |e| * R^T dL/dq,
      R = I - 2 r r^T + 2 q^ e^T,  r = (e^ + q^) / |e^ + q^|,

  with e^ = e/|e| and q^ = q/|q| (the paper's Householder form, O(D) per
  vector). The forward value is `codes` (to rounding). An all-zero input
  vector, which no rotation maps to its code, gets no gradient.

  Args:
    inputs: [..., D] floating tensor, the vectors before quantization (e).
    codes: tensor of `inputs`' shape and dtype, their codes (q).

  Returns:
    A tensor of `inputs`' shape and dtype equal to `codes`.
  """
  e_norm = tf.norm(inputs, axis=-1, keepdims=True)
  q_norm = tf.norm(codes, axis=-1, keepdims=True)
  e_hat = tf.stop_gradient(tf.math.divide_no_nan(inputs, e_norm))
  q_hat = tf.stop_gradient(tf.math.divide_no_nan(codes, q_norm))
  r = tf.stop_gradient(tf.math.l2_normalize(e_hat + q_hat, axis=-1))
  scale = tf.stop_gradient(tf.math.divide_no_nan(q_norm, e_norm))

  def dot(a, b):
    return tf.reduce_sum(a * b, axis=-1, keepdims=True)

  rotated = scale * (inputs - 2 * r * dot(r, inputs) +
                     2 * q_hat * dot(e_hat, inputs))
  # The value is the code exactly where float rounding would move it.
  return rotated + tf.stop_gradient(codes - rotated)


def reduced_precision_matmul() -> bool:
  """Whether float32 matmuls here may round their operands.

  TPUs multiply float32 in bfloat16 passes by default, and TF runs them in
  TF32 on Ampere and newer GPUs (`tf.config.experimental.
  enable_tensor_float_32_execution`, on by default); CPUs in float32.
  """
  if tf.config.list_logical_devices("TPU"):
    return True
  return bool(tf.config.list_logical_devices("GPU") and
              tf.config.experimental.tensor_float_32_execution_enabled())


def _matmul(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
  """The search's matmul (tests round its operands as TPUs do)."""
  return tf.matmul(a, b)


def _squared_distances(flat_inputs: tf.Tensor, codebook: tf.Tensor) -> tf.Tensor:
  """[N, D] x [D, K] -> [N, K] squared Euclidean distances (reference formula)."""
  return (tf.reduce_sum(flat_inputs**2, 1, keepdims=True) -
          2 * _matmul(flat_inputs, codebook) +
          tf.reduce_sum(codebook**2, 0, keepdims=True))


def _nearest_codes(flat_inputs: tf.Tensor, codebook: tf.Tensor) -> tf.Tensor:
  """[N] int64 indices of the nearest codes, by the reference formula."""
  # |x|^2 does not change the argmin over codes, so it is left out.
  return tf.argmin(0.5 * tf.reduce_sum(codebook**2, 0, keepdims=True) -
                   _matmul(flat_inputs, codebook), axis=1)


def _nearest_codes_reranked(flat_inputs: tf.Tensor,
                            codebook: tf.Tensor) -> tf.Tensor:
  """[N] int64 indices of the nearest codes, float32's even if matmuls round.

  A matmul whose operands are rounded (bfloat16 on TPUs, TF32 on GPUs) errs
  by about |x| |c| 2^-8 on each x.c, enough to pick a neighbour of the
  nearest code when codes sit close together far from the origin. So the
  matmul only proposes: inputs and codes are centred on the codebook's mean
  (distances do not change, |x| |c| shrinks), the RERANK_CANDIDATES codes of
  the best approximate scores are kept, and the nearest of those by exact
  float32 differences sum((x - c)^2) is the answer.
  """
  mean = tf.reduce_mean(codebook, axis=1)
  centred = codebook - mean[:, None]
  scores = (0.5 * tf.reduce_sum(centred**2, 0, keepdims=True) -
            _matmul(flat_inputs - mean, centred))
  num_candidates = min(RERANK_CANDIDATES, codebook.shape[1])
  _, candidates = tf.math.top_k(-scores, k=num_candidates)  # [N, C]
  vectors = tf.gather(tf.transpose(codebook), candidates)  # [N, C, D]
  exact = tf.reduce_sum(
      tf.math.squared_difference(flat_inputs[:, None], vectors), axis=2)
  best = tf.argmin(exact, axis=1, output_type=tf.int32)
  return tf.cast(tf.gather(candidates, best, batch_dims=1), tf.int64)


def _nearest_codes_chunked(flat_inputs: tf.Tensor, codebook: tf.Tensor,
                           chunk_rows: int, nearest=_nearest_codes
                           ) -> tf.Tensor:
  """Indices [N] of the nearest codes, searching `chunk_rows` inputs at a time."""
  num_inputs = tf.shape(flat_inputs)[0]
  num_chunks = (num_inputs + chunk_rows - 1) // chunk_rows
  padded = tf.pad(flat_inputs, [[0, num_chunks * chunk_rows - num_inputs], [0, 0]])
  chunks = tf.reshape(padded, [num_chunks, chunk_rows, flat_inputs.shape[1]])
  # One chunk at a time: running chunks in parallel would bring back the memory.
  indices = tf.map_fn(lambda chunk: nearest(chunk, codebook), chunks,
                      fn_output_signature=tf.int64, parallel_iterations=1)
  return tf.reshape(indices, [-1])[:num_inputs]


def _pool_over_replicas(points: tf.Tensor, valid: tf.Tensor
                        ) -> "tuple[tf.Tensor, tf.Tensor]":
  """Every replica's [N, D] `points` and [N] `valid`, on every replica.

  Returns ([R * N, D], [R * N]) in replica order (the global batch's), or the
  arguments with one replica. Each replica writes its rows into its own slot
  of a zero tensor, summed over replicas: an all-reduce, which is ordered
  with the step's other collectives (all_gather is not).
  """
  context = _replica_context()
  if context is None:
    return points, valid
  # Invalid rows travel as zeros, flagged in an extra column.
  rows = tf.concat([tf.where(valid[:, None], points, tf.zeros_like(points)),
                    tf.cast(valid, points.dtype)[:, None]], axis=1)
  mine = tf.equal(tf.range(context.num_replicas_in_sync),
                  context.replica_id_in_sync_group)
  pooled = context.all_reduce(
      tf.distribute.ReduceOp.SUM,
      tf.where(mine[:, None, None], rows[None], tf.zeros_like(rows)[None]))
  pooled = tf.reshape(pooled, [-1, rows.shape[1]])
  return pooled[:, :-1], pooled[:, -1] > 0


def _kmeans(points: tf.Tensor, valid: tf.Tensor, num_clusters: int,
            num_iters: int, seed: tf.Tensor, nearest=None) -> tf.Tensor:
  """Lloyd's k-means with k-means++ seeding, of the `valid` points only.

  Args:
    points: [M, D] float tensor.
    valid: [M] bool, the points to cluster (at least one); the others (e.g.
      non-finite) are never chosen as centres nor averaged into one.
    num_clusters: K, the number of centres.
    num_iters: number of Lloyd iterations after seeding.
    seed: int32 [2] seed of the stateless random ops (the same seed gives the
      same centres on every replica).
    nearest: (points, centres [D, K]) -> [M] indices, the search assigning
      points to centres; None: the argmin of `_squared_distances`.

  Returns:
    [D, K] centres (columns), in the codebook layout.
  """
  num_valid = tf.reduce_sum(tf.cast(valid, tf.int32))
  # valid_rows[i] is the row of the i-th valid point: the draws below pick
  # what they pick in the batch of the valid points alone.
  valid_rows = tf.argsort(tf.cast(~valid, tf.int32), stable=True)
  # tf.gather, not [] indexing (here and below): XLA wants constant slice
  # bounds, which made the batch and step constants, one compilation a step.
  first = tf.gather(valid_rows, tf.random.stateless_uniform(
      [], seed, maxval=num_valid, dtype=tf.int32))
  first_point = tf.gather(points, first)
  centres = tf.tensor_scatter_nd_update(
      tf.zeros([num_clusters, points.shape[1]], points.dtype), [[0]],
      first_point[None])
  min_sq_dist = tf.reduce_sum((points - first_point)**2, axis=1)
  never = tf.constant(float("-inf"), points.dtype)

  def seed_next(k, centres, min_sq_dist):
    # k-means++: the next centre is drawn with probability proportional to
    # D(x)^2; invalid points with probability 0.
    logits = tf.where(valid, tf.math.log(min_sq_dist + 1e-12), never)[None]
    pick = tf.random.stateless_categorical(
        logits, 1, seed + tf.stack([k, 0]), dtype=tf.int32)[0, 0]
    picked = tf.gather(points, pick)
    centres = tf.tensor_scatter_nd_update(centres, [[k]], picked[None])
    sq_dist = tf.reduce_sum((points - picked)**2, axis=1)
    return k + 1, centres, tf.minimum(min_sq_dist, sq_dist)

  _, centres, _ = tf.while_loop(lambda k, *_: k < num_clusters, seed_next,
                                (tf.constant(1), centres, min_sq_dist))

  def lloyd_step(i, centres):
    if nearest is None:
      assignment = tf.argmin(
          _squared_distances(points, tf.transpose(centres)), axis=1)
    else:
      assignment = nearest(points, tf.transpose(centres))
    # Invalid points go to an extra segment, dropped.
    segments = tf.where(valid, assignment, num_clusters)
    sums = tf.math.unsorted_segment_sum(points, segments,
                                        num_clusters + 1)[:num_clusters]
    counts = tf.math.unsorted_segment_sum(
        tf.cast(valid, points.dtype), segments, num_clusters + 1)[:num_clusters]
    # An empty cluster keeps its centre rather than collapsing to the origin.
    means = sums / tf.maximum(counts, 1)[:, None]
    return i + 1, tf.where(counts[:, None] > 0, means, centres)

  _, centres = tf.while_loop(lambda i, _: i < num_iters, lloyd_step,
                             (tf.constant(0), centres))
  return tf.transpose(centres)


def check_inputs(inputs: tf.Tensor, embedding_dim: int) -> None:
  """Raises unless `inputs` is floating with shape [..., embedding_dim]."""
  if inputs.shape.rank is not None and inputs.shape.rank < 2:
    raise ValueError(
        f"inputs must have rank >= 2 ([..., embedding_dim]), got shape "
        f"{inputs.shape}.")
  if inputs.shape[-1] not in (None, embedding_dim):
    raise ValueError(
        f"The last axis of inputs must equal embedding_dim="
        f"{embedding_dim}, got {inputs.shape[-1]} (inputs shape "
        f"{inputs.shape}).")
  if not inputs.dtype.is_floating:
    raise TypeError(f"inputs must be floating point, got {inputs.dtype}.")


def check_indices(indices: tf.Tensor, num_embeddings: int,
                  caller: str) -> tf.Tensor:
  """Asserts 0 <= `indices` < num_embeddings; returns the bool in-range mask.

  The assertions raise InvalidArgumentError eagerly and in graphs. XLA
  compiles them out: callers poison out-of-range entries with the mask.
  """
  indices = tf.convert_to_tensor(indices)
  checks = [
      tf.debugging.assert_non_negative(
          indices, message=f"{caller}: negative code index"),
      tf.debugging.assert_less(
          indices, tf.cast(num_embeddings, indices.dtype),
          message=f"{caller}: code index >= num_embeddings={num_embeddings}"),
  ]
  with tf.control_dependencies(checks):
    return tf.identity((indices >= 0) & (indices < num_embeddings))


class _Quantizer(snt.Module):
  """Shared search, losses, metrics and codebook health of both quantizers."""

  def __init__(self, embedding_dim: int, num_embeddings: int,
               commitment_cost: float, dtype: tf.DType, trainable: bool,
               usage_decay: float, dead_code_threshold: float, kmeans_init: bool,
               kmeans_iters: int, cosine: bool, seed: int, name: str,
               gradient: str = "straight_through"):
    super().__init__(name=name)
    if gradient not in GRADIENTS:
      raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}.")
    if embedding_dim <= 0:
      raise ValueError(f"embedding_dim must be positive, got {embedding_dim}.")
    if num_embeddings <= 0:
      raise ValueError(f"num_embeddings must be positive, got {num_embeddings}.")
    if commitment_cost < 0:
      raise ValueError(
          f"commitment_cost must be non-negative, got {commitment_cost}.")
    if not tf.as_dtype(dtype).is_floating:
      raise ValueError(f"dtype must be a floating type, got {dtype}.")
    if not 0 <= usage_decay < 1:
      raise ValueError(f"usage_decay must be in [0, 1), got {usage_decay}.")
    if dead_code_threshold < 0:
      raise ValueError(
          f"dead_code_threshold must be non-negative, got {dead_code_threshold}.")
    if kmeans_iters < 0:
      raise ValueError(f"kmeans_iters must be non-negative, got {kmeans_iters}.")
    self.embedding_dim = embedding_dim
    self.num_embeddings = num_embeddings
    self.commitment_cost = commitment_cost
    self.usage_decay = usage_decay
    self.dead_code_threshold = dead_code_threshold
    self.kmeans_init = kmeans_init
    self.kmeans_iters = kmeans_iters
    self.cosine = cosine
    self.gradient = gradient
    self._seed = seed

    with tf.variable_creator_scope(replica_consistent_variables):
      initializer = snt.initializers.VarianceScaling(distribution="uniform")
      self.embeddings = tf.Variable(
          initializer([embedding_dim, num_embeddings], dtype),
          trainable=trainable, name="embeddings")
      self._create_statistics(dtype)
    # k-means replaces only this random codebook: one restored from a
    # checkpoint that has no `training_steps` (stock Sonnet's) or assigned by
    # the user differs from it and is kept. A constant, so never checkpointed.
    self._initial_embeddings = (tf.convert_to_tensor(self.embeddings)
                                if kmeans_init else None)

  @snt.once
  def _create_usage(self) -> None:
    """Creates the state stock Sonnet's quantizers lack, on the first call.

    Created after the constructor, so that a stock `snt.nets` checkpoint
    restores into a new quantizer with `assert_existing_objects_matched()`;
    where a checkpoint holds them, TensorFlow restores them on creation.
    """
    with tf.variable_creator_scope(replica_consistent_variables):
      # Vectors per training step assigned to each code, as an EMA.
      self.code_usage = tf.Variable(
          tf.zeros([self.num_embeddings], tf.float32), trainable=False,
          name="code_usage")
      self.training_steps = tf.Variable(
          0, trainable=False, dtype=tf.int64, name="training_steps")

  def _create_statistics(self, dtype: tf.DType) -> None:
    """Creates the variables the subclass updates (inside the creator scope)."""

  def _update_codebook(self, flat_inputs: tf.Tensor, segments: tf.Tensor,
                       counts: tf.Tensor, apply_if: tf.Tensor) -> None:
    """Subclass hook: updates the codebook from the global batch statistics.

    Args:
      flat_inputs: [N, D] this replica's vectors.
      segments: [N] their codes, num_embeddings for the non-finite ones.
      counts: [K] global count of the finite vectors of each code.
      apply_if: scalar bool, False when the global batch has no finite
        vector: then nothing may change.
    """

  def _reset_statistics(self, restarted: tf.Tensor, new_codes: tf.Tensor) -> None:
    """Subclass hook: statistics of the `restarted` [K] codes, now `new_codes`."""

  def _compute_dtype(self, inputs: tf.Tensor) -> tf.DType:
    if tf.float64 in (inputs.dtype, self.embeddings.dtype):
      return tf.float64
    return tf.float32

  def _codebook(self, dtype: tf.DType) -> tf.Tensor:
    codebook = tf.cast(self.embeddings, dtype)
    if self.cosine:
      codebook = tf.math.l2_normalize(codebook, axis=0)
    return codebook

  def __call__(self, inputs: tf.Tensor, is_training: bool) -> Dict[str, tf.Tensor]:
    """Quantizes `inputs` to their nearest codebook vectors.

    Args:
      inputs: [..., embedding_dim] floating tensor of rank >= 2; all leading axes
        are flattened into N vectors quantized independently.
      is_training: whether to update the codebook statistics (EMA, usage,
        restarts, k-means initialisation).

    Non-finite input vectors (any NaN or +-Inf component, or a squared norm
    above MAX_SQUARED_NORM = 1e30, which counts as one) are left out of
    every statistic: code counts and summed vectors of the EMA, the usage EMA,
    `perplexity` and `codes_used`, dead-code restarts and k-means (never drawn
    as new codes). The state after a training step is the one the batch
    without them gives (restarts and k-means included where the stateless
    random draws do not depend on the batch size, as on CPU). A step whose
    global batch holds no finite vector (all non-finite, or empty) changes no
    state at all. Such a vector gets code 0 in `encoding_indices` and
    `encodings`, NaN `distances`, a NaN `quantize` row and a NaN `loss`, so
    that a caller's non-finite guard sees it.

    The search is float32's whatever the hardware's matmul precision: where
    matmuls round their operands (TPUs, TF32 GPUs) the matmul proposes
    RERANK_CANDIDATES codes, re-ranked by exact float32 differences
    (`_nearest_codes_reranked`); `distances` stays the matmul's.

    Returns:
      dict with
        quantize: inputs' shape and dtype, the quantized inputs with a
          straight-through gradient to `inputs` (or the rotation trick's,
          see `gradient`).
        loss: scalar, commitment loss (plus codebook loss without EMA).
        perplexity: scalar, exp(entropy) of the code histogram of the global
          batch (over all replicas).
        encodings: [N, num_embeddings] one-hot codes.
        encoding_indices: int64 inputs.shape[:-1], the code indices.
        distances: [N, num_embeddings] squared distances to every code.
        codes_used: int32 scalar, distinct codes in the global batch.
        codes_used_ema: int32 scalar, codes whose usage EMA is at least
          (1 - usage_decay) / 2 vectors per step: roughly, codes used at least
          once in the last ln(2) / (1 - usage_decay) training steps.
        nonfinite_inputs: int32 scalar, non-finite vectors in the global batch.
    """
    if not isinstance(is_training, bool):  # "no" would silently train.
      raise TypeError(f"is_training must be True or False, got "
                      f"{is_training!r}.")
    inputs = tf.convert_to_tensor(inputs)
    check_inputs(inputs, self.embedding_dim)
    self._create_usage()
    compute_dtype = self._compute_dtype(inputs)
    flat_inputs = tf.cast(tf.reshape(inputs, [-1, self.embedding_dim]),
                          compute_dtype)
    # A vector with a NaN or Inf, or whose squared norm exceeds
    # MAX_SQUARED_NORM (or overflows), is non-finite: NaN from here on.
    finite = (tf.reduce_sum(tf.square(flat_inputs), axis=1) <=
              MAX_SQUARED_NORM)
    flat_inputs = tf.where(finite[:, None], flat_inputs,
                           tf.constant(float("nan"), compute_dtype))
    if self.cosine:
      flat_inputs = tf.math.l2_normalize(flat_inputs, axis=1)

    if is_training and (self.kmeans_init or self.dead_code_threshold > 0):
      self._maintain_codebook(flat_inputs, finite)

    codebook = self._codebook(compute_dtype)
    distances = _squared_distances(flat_inputs, codebook)
    num_inputs = flat_inputs.shape[0]
    large = (num_inputs is not None and
             num_inputs * self.num_embeddings > _CHUNK_ELEMENTS)
    rerank = reduced_precision_matmul()
    if large and not tf.executing_eagerly():
      # Under tf.function `distances` is only computed if the caller uses it.
      flat_indices = _nearest_codes_chunked(
          flat_inputs, codebook,
          max(1, _CHUNK_ELEMENTS // self.num_embeddings),
          _nearest_codes_reranked if rerank else _nearest_codes)
    elif rerank:
      flat_indices = _nearest_codes_reranked(flat_inputs, codebook)
    else:
      flat_indices = tf.argmin(distances, axis=1)
    # The argmin of NaN distances is unspecified: code 0 instead.
    zeros = tf.zeros_like(flat_indices)
    flat_indices = tf.where(finite, flat_indices, zeros)
    # Segment K, past the codes, collects the non-finite vectors: the segment
    # sums leave them out and count them at no extra cost.
    segments = tf.where(finite, flat_indices, zeros + self.num_embeddings)
    histogram = _sum_over_replicas(tf.math.unsorted_segment_sum(
        tf.ones_like(segments, tf.float32), segments, self.num_embeddings + 1))
    counts = histogram[:self.num_embeddings]
    num_finite = tf.reduce_sum(counts)
    encoding_indices = tf.reshape(flat_indices, tf.shape(inputs)[:-1])
    quantized = self._lookup(encoding_indices, codebook)
    target = tf.reshape(flat_inputs, tf.shape(quantized))

    if is_training:
      has_data = num_finite > 0
      self._update_codebook(flat_inputs, segments, counts, has_data)
      self._update_usage(counts, has_data)
    loss = self._loss(target, quantized)

    if self.gradient == "rotation":
      quantized = rotation_trick(target, quantized)
    else:
      # Straight Through Estimator
      quantized = target + tf.stop_gradient(quantized - target)
    avg_probs = counts / tf.maximum(num_finite, 1.)
    perplexity = tf.exp(-tf.reduce_sum(avg_probs * tf.math.log(avg_probs + 1e-10)))
    return {
        "quantize": tf.cast(quantized, inputs.dtype),
        "loss": loss,
        "perplexity": perplexity,
        "encodings": tf.one_hot(flat_indices, self.num_embeddings,
                                dtype=compute_dtype),
        "encoding_indices": encoding_indices,
        "distances": distances,
        "codes_used": tf.math.count_nonzero(counts, dtype=tf.int32),
        "codes_used_ema": tf.math.count_nonzero(
            self.code_usage >= (1 - self.usage_decay) / 2, dtype=tf.int32),
        "nonfinite_inputs": tf.cast(histogram[self.num_embeddings], tf.int32),
    }

  def _loss(self, inputs: tf.Tensor, quantized: tf.Tensor) -> tf.Tensor:
    """Scalar loss given the (flattened-compatible) inputs and their codes."""
    raise NotImplementedError

  def _update_usage(self, counts: tf.Tensor, apply_if: tf.Tensor) -> None:
    first_step = tf.equal(self.training_steps, 0)
    # The first step sets the EMA to the first histogram instead of biasing it
    # towards zero, which would declare every code dead.
    usage = tf.where(
        first_step, counts,
        self.usage_decay * self.code_usage + (1 - self.usage_decay) * counts)
    self.code_usage.assign(tf.where(apply_if, usage, self.code_usage))
    self.training_steps.assign_add(tf.cast(apply_if, tf.int64))

  def _maintain_codebook(self, flat_inputs: tf.Tensor,
                         finite: tf.Tensor) -> None:
    """k-means initialisation on the first step, then dead-code restarts.

    Both draw from the `finite` [N] rows of the [N, D] `flat_inputs` of
    every replica (the global batch) only, and do nothing without one.
    """
    # Every replica's vectors on every replica (replicas' batches differ).
    flat_inputs, finite = _pool_over_replicas(flat_inputs, finite)
    has_points = tf.reduce_any(finite)
    seed = tf.stack([tf.constant(self._seed, tf.int32),
                     tf.cast(self.training_steps, tf.int32)])
    first_step = tf.equal(self.training_steps, 0)
    codebook = tf.cast(self.embeddings, flat_inputs.dtype)
    # Variables are assigned outside tf.cond because MirroredStrategy cannot
    # sync an assignment inside control flow.
    if self.kmeans_init:
      untouched = tf.reduce_all(
          tf.equal(self.embeddings, self._initial_embeddings))
      codebook = tf.cond(
          first_step & has_points & untouched,
          lambda: _kmeans(flat_inputs, finite, self.num_embeddings,
                          self.kmeans_iters, seed,
                          _nearest_codes_reranked
                          if reduced_precision_matmul() else None),
          lambda: codebook)
    dead = tf.zeros([self.num_embeddings], tf.bool)
    if self.dead_code_threshold > 0:
      dead = (self.code_usage < self.dead_code_threshold) & ~first_step
      dead &= has_points
      restarted = tf.cond(
          tf.reduce_any(dead),
          lambda: self._random_points(flat_inputs, finite, seed),
          lambda: codebook)
      codebook = tf.where(dead[None], restarted, codebook)
    # Every replica computed them from the same pooled vectors; replica 0's
    # codebook and restart mask (the last row), broadcast once, make the
    # choice bit for bit (kernels such as GPU segment sums need not be).
    merged = _broadcast_from_first_replica(
        tf.concat([codebook, tf.cast(dead, codebook.dtype)[None]], axis=0))
    codebook, dead = merged[:-1], merged[-1] > 0
    if self.dead_code_threshold > 0:
      # A grace period of ~ln(2) / (1 - usage_decay) steps before the next
      # restart of the same code.
      self.code_usage.assign(tf.where(dead, 2 * self.dead_code_threshold,
                                      self.code_usage))
      self._reset_statistics(dead, codebook)
    self.embeddings.assign(tf.cast(codebook, self.embeddings.dtype))

  def _random_points(self, points: tf.Tensor, valid: tf.Tensor,
                     seed: tf.Tensor) -> tf.Tensor:
    """[D, K] distinct random rows of the [M, D] `points` where `valid` [M].

    The choice is the one of the batch of the valid rows alone (at least one).
    """
    num_valid = tf.reduce_sum(tf.cast(valid, tf.int32))
    keys = tf.random.stateless_uniform([tf.shape(points)[0]], seed)
    # The i-th valid row gets the i-th key; invalid rows sort last (keys < 1).
    rank = tf.maximum(tf.cumsum(tf.cast(valid, tf.int32)) - 1, 0)
    keys = tf.where(valid, tf.gather(keys, rank), 2.)
    order = tf.argsort(keys)
    # With fewer points than codes, points are reused in the same random order.
    picks = tf.gather(order, tf.range(self.num_embeddings) % num_valid)
    return tf.transpose(tf.gather(points, picks))

  def quantize(self, encoding_indices: tf.Tensor) -> tf.Tensor:
    """Returns the codebook vectors [..., embedding_dim] of integer indices.

    An index outside [0, num_embeddings) raises InvalidArgumentError eagerly
    and in graphs. XLA (tf.function(jit_compile=True)) compiles assertions
    out: there such an index gives a vector of NaNs instead, never another
    code's vector.

    Raises:
      tf.errors.InvalidArgumentError: if an index is outside [0, num_embeddings)
        (not under XLA, see above).
    """
    in_range = check_indices(encoding_indices, self.num_embeddings,
                             "quantize")
    # The lookup reads `in_range`, so it runs after the checks.
    vectors = self._lookup(
        tf.where(in_range, encoding_indices, tf.zeros_like(encoding_indices)),
        self._codebook(self.embeddings.dtype))
    return tf.where(in_range[..., None], vectors,
                    tf.constant(float("nan"), vectors.dtype))

  def _lookup(self, encoding_indices: tf.Tensor,
              codebook: tf.Tensor) -> tf.Tensor:
    return tf.nn.embedding_lookup(tf.transpose(codebook), encoding_indices)


class VectorQuantizer(_Quantizer):
  """VQ-VAE layer whose codebook is trained by gradient (the codebook loss).

  Implements the algorithm of 'Neural Discrete Representation Learning' by
  van den Oord et al. https://arxiv.org/abs/1711.00937, as
  `snt.nets.VectorQuantizer` does, and replica-aware (see the module docstring).

  The last axis of the input is the space we quantize in; all other axes are
  flattened: a [16, 32, 32, 64] input becomes 16384 vectors of size 64, each
  quantized independently. The output has the input's shape.

  Attributes:
    embedding_dim: D, size of the vectors in the quantized space.
    num_embeddings: K, number of codebook vectors.
    commitment_cost: beta of equation 4 in the paper.
    embeddings: [D, K] trainable codebook variable.
    code_usage: [K] EMA of the vectors per training step assigned to each code.
  """

  def __init__(self,
               embedding_dim: int,
               num_embeddings: int,
               commitment_cost: float,
               dtype: tf.DType = tf.float32,
               *,
               usage_decay: float = 0.99,
               dead_code_threshold: float = 0.0,
               kmeans_init: bool = False,
               kmeans_iters: int = 10,
               cosine: bool = False,
               seed: int = 0,
               gradient: str = "straight_through",
               name: str = "vector_quantizer"):
    """Constructs the quantizer.

    Args:
      embedding_dim: D, size of the vectors in the quantized space; inputs'
        last axis must have this size.
      num_embeddings: K, number of codebook vectors.
      commitment_cost: beta, weight of the commitment loss (equation 4).
      dtype: dtype of the embeddings variable.
      usage_decay: decay of the per-code usage EMA behind `codes_used_ema` and
        dead-code restarts.
      dead_code_threshold: when > 0, codes assigned fewer than this many vectors
        per step (usage EMA) are restarted on random vectors of the batch.
      kmeans_init: initialise the codebook by k-means on the first training
        batch.
      kmeans_iters: Lloyd iterations of the k-means initialisation.
      cosine: quantize l2-normalised inputs with l2-normalised codes.
      seed: seed of the random choices of restarts and k-means.
      gradient: how `quantize`'s gradient reaches the inputs (see
        `GRADIENTS`): "straight_through" (the reference) copies it,
        "rotation" passes it through the rotation and rescaling that map
        each input to its code (`rotation_trick`).
      name: name of the module.

    Raises:
      ValueError: if a size is not positive, a cost, decay or threshold is out
        of range, or dtype is not floating.
    """
    super().__init__(embedding_dim, num_embeddings, commitment_cost, dtype,
                     trainable=True, usage_decay=usage_decay,
                     dead_code_threshold=dead_code_threshold,
                     kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
                     cosine=cosine, seed=seed, name=name, gradient=gradient)

  def _loss(self, inputs, quantized):
    e_latent_loss = _mean_square(tf.stop_gradient(quantized) - inputs)
    q_latent_loss = _mean_square(quantized - tf.stop_gradient(inputs))
    return q_latent_loss + self.commitment_cost * e_latent_loss


class VectorQuantizerEMA(_Quantizer):
  """VQ-VAE layer whose codebook follows exponential moving averages.

  As `snt.nets.VectorQuantizerEMA`: the codebook is the debiased EMA of the
  summed inputs assigned to each code divided by the Laplace-smoothed EMA of
  their counts, independent of the optimizer; the loss is the commitment loss
  only. Unlike stock Sonnet, the statistics are all-reduced across replicas
  before the update, so every replica holds the same codebook.

  The last axis of the input is the space we quantize in; all other axes are
  flattened: a [16, 32, 32, 64] input becomes 16384 vectors of size 64, each
  quantized independently. The output has the input's shape.

  Attributes:
    embedding_dim: D, size of the vectors in the quantized space.
    num_embeddings: K, number of codebook vectors.
    commitment_cost: beta of equation 4 in the paper.
    decay: decay of the moving averages.
    epsilon: Laplace smoothing constant of the cluster sizes.
    embeddings: [D, K] non-trainable codebook variable.
    ema_cluster_size: `ExponentialMovingAverage` of the [K] code counts.
    ema_dw: `ExponentialMovingAverage` of the [D, K] summed inputs.
    code_usage: [K] EMA of the vectors per training step assigned to each code.
  """

  def __init__(self,
               embedding_dim: int,
               num_embeddings: int,
               commitment_cost: float,
               decay: float,
               epsilon: float = 1e-5,
               dtype: tf.DType = tf.float32,
               *,
               usage_decay: float = 0.99,
               dead_code_threshold: float = 0.0,
               kmeans_init: bool = False,
               kmeans_iters: int = 10,
               cosine: bool = False,
               seed: int = 0,
               gradient: str = "straight_through",
               name: str = "vector_quantizer_ema"):
    """Constructs the quantizer.

    Args:
      embedding_dim: D, size of the vectors in the quantized space; inputs'
        last axis must have this size.
      num_embeddings: K, number of codebook vectors.
      commitment_cost: beta, weight of the commitment loss (equation 4).
      decay: decay of the codebook moving averages, in [0, 1].
      epsilon: Laplace smoothing constant of the cluster sizes, >= 0.
      dtype: dtype of the embeddings and statistics.
      usage_decay: decay of the per-code usage EMA behind `codes_used_ema` and
        dead-code restarts.
      dead_code_threshold: when > 0, codes assigned fewer than this many vectors
        per step (usage EMA) are restarted on random vectors of the batch, with
        their EMA statistics reset so they are not pulled straight back.
      kmeans_init: initialise the codebook by k-means on the first training
        batch.
      kmeans_iters: Lloyd iterations of the k-means initialisation.
      cosine: quantize l2-normalised inputs with l2-normalised codes.
      seed: seed of the random choices of restarts and k-means.
      gradient: how `quantize`'s gradient reaches the inputs (see
        `GRADIENTS`): "straight_through" (the reference) copies it,
        "rotation" passes it through the rotation and rescaling that map
        each input to its code (`rotation_trick`).
      name: name of the module.

    Raises:
      ValueError: if a size is not positive, decay is outside [0, 1], or
        another option is out of range.
    """
    if not 0 <= decay <= 1:
      raise ValueError(f"decay must be in range [0, 1], got {decay}.")
    if epsilon < 0:
      raise ValueError(f"epsilon must be non-negative, got {epsilon}.")
    self.decay = decay
    self.epsilon = epsilon
    super().__init__(embedding_dim, num_embeddings, commitment_cost, dtype,
                     trainable=False, usage_decay=usage_decay,
                     dead_code_threshold=dead_code_threshold,
                     kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
                     cosine=cosine, seed=seed, name=name, gradient=gradient)

  def _create_statistics(self, dtype):
    # A typed decay: a Python float meets float64 statistics as float32 inside
    # tf.function.
    decay = tf.constant(self.decay, dtype)
    self.ema_cluster_size = ExponentialMovingAverage(
        decay=decay, name="ema_cluster_size")
    self.ema_cluster_size.initialize(tf.zeros([self.num_embeddings], dtype))
    self.ema_dw = ExponentialMovingAverage(decay=decay, name="ema_dw")
    self.ema_dw.initialize(self.embeddings)

  def _update_codebook(self, flat_inputs, segments, counts, apply_if):
    dtype = self.embeddings.dtype
    # The extra segment of the non-finite vectors is dropped.
    dw = tf.math.unsorted_segment_sum(flat_inputs, segments,
                                      self.num_embeddings + 1)
    dw = _sum_over_replicas(tf.transpose(dw[:self.num_embeddings]))
    cluster_size = self.ema_cluster_size(tf.cast(counts, dtype), apply_if)
    updated_dw = self.ema_dw(tf.cast(dw, dtype), apply_if)
    n = tf.reduce_sum(cluster_size)
    # Laplace smoothing keeps unused codes from dividing by zero.
    cluster_size = ((cluster_size + self.epsilon) /
                    (n + self.num_embeddings * self.epsilon) * n)
    # Codes without any statistics yet (only before the first non-empty
    # batch) keep their value instead of becoming 0 / 0.
    cluster_size = tf.reshape(cluster_size, [1, -1])
    self.embeddings.assign(tf.where(apply_if & (cluster_size > 0),
                                    updated_dw / cluster_size,
                                    self.embeddings))

  def _reset_statistics(self, restarted, new_codes):
    # A restarted code starts as a cluster of `dead_code_threshold` vectors at
    # its new position, so this step's update moves it towards its new vectors
    # rather than back to where it died.
    size = tf.cast(self.dead_code_threshold, self.embeddings.dtype)
    self.ema_cluster_size.reset_where(restarted, size)
    self.ema_dw.reset_where(restarted[None],
                            size * tf.cast(new_codes, self.embeddings.dtype))

  def _loss(self, inputs, quantized):
    e_latent_loss = _mean_square(tf.stop_gradient(quantized) - inputs)
    return self.commitment_cost * e_latent_loss


def _mean_square(x: tf.Tensor) -> tf.Tensor:
  # Unlike tf.reduce_mean, an empty batch gives 0 rather than NaN.
  size = tf.cast(tf.maximum(tf.size(x), 1), x.dtype)
  return tf.reduce_sum(x**2) / size
