"""Residual vector quantization (SoundStream, Zeghidour et al. 2021) for Sonnet 2.

https://arxiv.org/abs/2107.03312 and RQ-VAE (Lee et al. 2022,
https://arxiv.org/abs/2203.01941): a stack of vector quantizers, each
quantizing what the previous ones left, so S stages of K codes address K**S
sums of code vectors with S * K stored vectors.
"""

from typing import Dict

import sonnet as snt
import tensorflow as tf

from sonnet_vqvae import code_statistics
from sonnet_vqvae import distribute
from sonnet_vqvae import quantizers


class ResidualVectorQuantizer(snt.Module):
  """Residual VQ: `num_stages` quantizers, each of the previous residual.

  Stage 0 quantizes the input x; stage s quantizes the residual
  r_s = x - sg(q_0 + ... + q_{s-1}) it leaves (sg: stop-gradient). The output
  is the sum of the stages' codes, with a straight-through (or rotation)
  gradient from the sum to x. Each stage is a `VectorQuantizerEMA` (or a
  `VectorQuantizer` without EMA) with every option of those modules, and
  keeps its own statistics, restarts and metrics. The loss is the sum of the
  stages' losses, so the commitment term of stage s pulls x towards the
  partial sum q_0 + ... + q_s, as in RQ-VAE.

  `shared_codebook=True` uses one quantizer at every stage (RQ-VAE's shared
  codebook): it is called once per stage, in stage order, so its EMA and
  usage statistics are updated `num_stages` times per training step (as
  lucidrains' vector-quantize-pytorch), and restarts and k-means see the
  stages' residuals one after another.

  Quantizer dropout (SoundStream): in training, with probability
  `quantizer_dropout` per example (the first axis), the example uses a
  number of stages drawn uniformly from [1, num_stages] instead of all; its
  later stages contribute nothing (their index is -1 and `quantize(indices)`
  skips them), see nothing (they are left out of those stages' statistics,
  metrics and k-means, as non-finite vectors are) and add nothing to the
  loss, which stays a mean over all positions. The draws are stateless
  random functions of (seed, the training step, the replica); XLA
  draws other numbers than the TF kernels from the same seed. At evaluation
  every example uses every stage.

  The last axis of the input is the space we quantize in; all other axes are
  flattened. Arithmetic between stages runs in float32 (float64 for float64
  inputs or dtype) and the output has the input's shape and dtype.

  Attributes:
    embedding_dim: D, size of the vectors.
    num_embeddings: K, codes per stage.
    num_stages: S, the number of stages.
    stages: tuple of S quantizers (one module S times if shared_codebook).
    quantizer_dropout: probability of a random number of stages per example.
    dropout_steps: int64 variable, the training steps so far (only with
      quantizer_dropout > 0), which seed the draws.
    gradient: "straight_through" or "rotation", from the sum to the inputs.
  """

  def __init__(self,
               embedding_dim: int,
               num_embeddings: int,
               num_stages: int,
               commitment_cost: float,
               *,
               use_ema: bool = True,
               decay: float = 0.99,
               epsilon: float = 1e-5,
               shared_codebook: bool = False,
               quantizer_dropout: float = 0.0,
               usage_decay: float = 0.99,
               dead_code_threshold: float = 0.0,
               kmeans_init: bool = False,
               kmeans_iters: int = 10,
               cosine: bool = False,
               gradient: str = "straight_through",
               seed: int = 0,
               dtype: tf.DType = tf.float32,
               name: str = "residual_vector_quantizer"):
    """Constructs the stages.

    Args:
      embedding_dim: D, size of the vectors; inputs' last axis must have it.
      num_embeddings: K, number of codes of each stage.
      num_stages: S >= 1, number of stages.
      commitment_cost: beta, weight of each stage's commitment loss.
      use_ema: stages are `VectorQuantizerEMA` (True) or `VectorQuantizer`.
      decay: decay of the EMA stages' moving averages.
      epsilon: Laplace smoothing of the EMA stages' cluster sizes.
      shared_codebook: one quantizer (one codebook) for every stage.
      quantizer_dropout: in [0, 1], the probability per training example of
        using a uniformly drawn number of stages (SoundStream); 0 turns it
        off.
      usage_decay: each stage's usage EMA decay (see `VectorQuantizer`).
      dead_code_threshold: each stage's restart threshold.
      kmeans_init: k-means initialisation of each stage on its first batch.
      kmeans_iters: Lloyd iterations of the k-means initialisation.
      cosine: each stage quantizes the direction of its residual with unit
        codes (the residual then subtracts unit vectors).
      gradient: "straight_through" or "rotation" (see
        `quantizers.rotation_trick`), from the sum of the codes to the
        inputs; the stages' own outputs carry no gradient.
      seed: seed of the dropout draws; stage s's restarts and k-means use
        seed + s.
      dtype: dtype of the codebooks and statistics.
      name: name of the module.

    Raises:
      ValueError: if num_stages < 1, quantizer_dropout is outside [0, 1],
        gradient is unknown, or a stage's argument is out of range.
    """
    super().__init__(name=name)
    if num_stages < 1:
      raise ValueError(f"num_stages must be at least 1, got {num_stages}.")
    if not 0 <= quantizer_dropout <= 1:
      raise ValueError(
          f"quantizer_dropout must be in [0, 1], got {quantizer_dropout}.")
    if gradient not in quantizers.GRADIENTS:
      raise ValueError(
          f"gradient must be one of {quantizers.GRADIENTS}, got {gradient!r}.")
    self.embedding_dim = embedding_dim
    self.num_embeddings = num_embeddings
    self.num_stages = num_stages
    self.quantizer_dropout = quantizer_dropout
    self.gradient = gradient
    self.cosine = cosine
    self._seed = seed
    self._dtype = tf.as_dtype(dtype)
    options = dict(dtype=dtype, usage_decay=usage_decay,
                   dead_code_threshold=dead_code_threshold,
                   kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
                   cosine=cosine)

    def make_stage(stage):
      if use_ema:
        return quantizers.VectorQuantizerEMA(
            embedding_dim, num_embeddings, commitment_cost, decay, epsilon,
            seed=seed + stage, name=f"stage_{stage}", **options)
      return quantizers.VectorQuantizer(
          embedding_dim, num_embeddings, commitment_cost, seed=seed + stage,
          name=f"stage_{stage}", **options)

    if quantizer_dropout > 0:
      with tf.variable_creator_scope(distribute.replica_consistent_variables):
        # Training steps so far: a new draw each step.
        self.dropout_steps = tf.Variable(0, trainable=False, dtype=tf.int64,
                                         name="dropout_steps")
    if shared_codebook:
      self.stages = (make_stage(0),) * num_stages
    else:
      self.stages = tuple(make_stage(s) for s in range(num_stages))

  def _active_stages(self, batch_size: tf.Tensor) -> tf.Tensor:
    """[batch_size] int32, the number of stages each example uses."""
    seed = tf.stack([tf.constant(self._seed, tf.int64),
                     self.dropout_steps.read_value()])
    self.dropout_steps.assign_add(1)
    context = tf.distribute.get_replica_context()
    if context is not None:
      # Replicas draw for different examples.
      seed = tf.random.experimental.stateless_fold_in(
          seed, tf.cast(context.replica_id_in_sync_group, tf.int32))
    seeds = tf.random.experimental.stateless_split(seed, 2)
    drop = tf.random.stateless_uniform([batch_size], seeds[0]) < (
        self.quantizer_dropout)
    drawn = tf.random.stateless_uniform([batch_size], seeds[1], minval=1,
                                        maxval=self.num_stages + 1,
                                        dtype=tf.int32)
    return tf.where(drop, drawn, self.num_stages)

  def quantize(self, encoding_indices: tf.Tensor) -> tf.Tensor:
    """Returns the summed code vectors [..., embedding_dim] of indices.

    Args:
      encoding_indices: integer [..., num_stages], each stage's index in
        [0, num_embeddings), or -1 for a stage left out (quantizer dropout).

    Raises:
      ValueError: if the last axis is not num_stages.
      tf.errors.InvalidArgumentError: if an index is outside
        [-1, num_embeddings) (under XLA: NaNs instead, see
        `VectorQuantizer.quantize`).
    """
    encoding_indices = tf.convert_to_tensor(encoding_indices)
    if encoding_indices.shape[-1] != self.num_stages:
      raise ValueError(
          f"encoding_indices must have shape [..., num_stages="
          f"{self.num_stages}], got {encoding_indices.shape}.")
    total = 0.
    for stage_index, stage in enumerate(self.stages):
      indices = encoding_indices[..., stage_index]
      skipped = tf.equal(indices, -1)
      vectors = stage.quantize(tf.where(skipped, tf.zeros_like(indices),
                                        indices))
      total += tf.where(skipped[..., None], tf.zeros_like(vectors), vectors)
    return total

  def __call__(self, inputs: tf.Tensor,
               is_training: bool) -> Dict[str, tf.Tensor]:
    """Quantizes `inputs` stage by stage.

    Args:
      inputs: [..., embedding_dim] floating tensor of rank >= 2.
      is_training: whether the stages update their statistics, and whether
        quantizer dropout applies.

    A non-finite input vector is left out of every stage's statistics, as
    in `VectorQuantizer`; it gets index 0 at every stage and a non-finite
    `quantize` row and `loss`.

    Returns:
      dict with
        quantize: inputs' shape and dtype, the sum of the stages' codes with
          a straight-through (or rotation) gradient to `inputs`.
        loss: float32 scalar, the sum of the stages' losses.
        perplexity: float32 scalar, exp(entropy) of the frequencies of the
          index tuples (the codes of the implied K**S codebook) in the global
          batch (all replicas).
        encoding_indices: int64 [..., num_stages], each stage's index (-1
          where quantizer dropout left the stage out).
        codes_used: int32 scalar, distinct index tuples in the global batch.
        codes_used_ema: int32 scalar, the codebook vectors alive in all
          stages (the sum of the distinct stages' `codes_used_ema`, at most
          S * K; K with a shared codebook).
        nonfinite_inputs: int32 scalar, non-finite input vectors in the
          global batch.
        stage_perplexity: float32 [num_stages], each stage's perplexity.
        stage_codes_used: int32 [num_stages], each stage's codes used.
        stage_codes_used_ema: int32 [num_stages], each stage's
          codes_used_ema.
    """
    inputs = tf.convert_to_tensor(inputs)
    quantizers.check_inputs(inputs, self.embedding_dim)
    dtype = (tf.float64 if tf.float64 in (inputs.dtype, self._dtype)
             else tf.float32)
    x = tf.cast(inputs, dtype)
    positions = tf.shape(x)[:-1]
    dropout = is_training and self.quantizer_dropout > 0 and self.num_stages > 1
    if dropout:
      active = self._active_stages(positions[0])
      active = tf.reshape(active, tf.concat(
          [positions[:1], tf.ones_like(positions[1:])], axis=0))
    residual = x
    total = tf.zeros_like(x)
    loss = tf.constant(0., tf.float32)
    outputs, indices = [], []
    for stage_index, stage in enumerate(self.stages):
      if dropout and stage_index > 0:
        keep = tf.broadcast_to(stage_index < active, positions)
        # A NaN vector is left out of the stage's statistics.
        out = stage(tf.where(keep[..., None], residual, float("nan")),
                    is_training)
        stage_indices = tf.where(keep, out["encoding_indices"], -1)
        codes = tf.where(keep[..., None], tf.cast(out["quantize"], dtype), 0.)
        stage_loss = self._masked_loss(stage, residual, stage_indices, keep)
      else:
        out = stage(residual, is_training)
        stage_indices = out["encoding_indices"]
        codes = tf.cast(out["quantize"], dtype)
        stage_loss = out["loss"]
      codes = tf.stop_gradient(codes)
      total += codes
      residual -= codes
      loss += tf.cast(stage_loss, tf.float32)
      outputs.append(out)
      indices.append(stage_indices)
    encoding_indices = tf.stack(indices, axis=-1)

    if self.gradient == "rotation":
      quantized = quantizers.rotation_trick(x, total)
    else:
      quantized = x + tf.stop_gradient(total - x)
    finite = tf.reduce_all(tf.math.is_finite(x), axis=-1)
    joint = code_statistics.tuple_statistics(
        tf.reshape(encoding_indices, [-1, self.num_stages]),
        tf.reshape(finite, [-1]))
    # A shared quantizer's metrics after its last call of the step.
    latest = {id(stage): out["codes_used_ema"]
              for stage, out in zip(self.stages, outputs)}
    return {
        "quantize": tf.cast(quantized, inputs.dtype),
        "loss": loss,
        "perplexity": joint["perplexity"],
        "encoding_indices": encoding_indices,
        "codes_used": joint["codes_used"],
        "codes_used_ema": tf.add_n(list(latest.values())),
        "nonfinite_inputs": outputs[0]["nonfinite_inputs"],
        "stage_perplexity": tf.stack([tf.cast(o["perplexity"], tf.float32)
                                      for o in outputs]),
        "stage_codes_used": tf.stack([o["codes_used"] for o in outputs]),
        "stage_codes_used_ema": tf.stack([o["codes_used_ema"]
                                          for o in outputs]),
    }

  def _masked_loss(self, stage, residual, stage_indices, keep):
    """The stage's loss over the kept positions, a mean over all of them."""
    target = residual
    if self.cosine:
      target = tf.math.l2_normalize(target, axis=-1)
    codes = stage.quantize(tf.where(keep, stage_indices,
                                    tf.zeros_like(stage_indices)))
    zeros = tf.zeros_like(target)
    mask = keep[..., None]
    return stage._loss(tf.where(mask, target, zeros),  # pylint: disable=protected-access
                       tf.where(mask, tf.cast(codes, target.dtype), zeros))
