r"""Trains and evaluates the VQ-VAE on CIFAR-10, on one or many devices.

    python -m sonnet_vqvae.train --workdir DIR [--config.key=value ...]
    python -m sonnet_vqvae.train --workdir DIR --mode=evaluate

The workdir holds `run.json` (what the run trains on: dataset, image shape,
model config, and the training-data variance), `checkpoints/`, TensorBoard
summaries, `metrics.jsonl` (one row per log step), `eval.json` and the PNG
figures. Starting the same command again resumes from the latest checkpoint;
`loop` and `rundir` say what a workdir guarantees (locking, a resume that
must match the stored run, checkpoints that are never overwritten).

Distribution: every strategy (one device, `snt.distribute.Replicator`,
`TpuReplicator`, `MultiWorkerMirroredStrategy`; see `distribute`) runs the same
replica step: gradients are all-reduced (mean) and every replica applies the
same update with `optim.Adam`, whose state, like the model's, is created by
`distribute.replica_consistent_variables`. The step runs in `loop`'s compiled
loop, many steps per call, with XLA if it is faster (`jit_compile="auto"`).

The input pipeline's position is not checkpointed; a resumed run reshuffles
with seed + step.
"""

import contextlib
import functools
import math
import os
import sys
from typing import (Any, Dict, Iterator, List, Optional, Sequence, Tuple,
                    Union)

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_dict
from ml_collections import config_flags
import numpy as np
import sonnet as snt
import tensorflow as tf

from sonnet_vqvae import cli
from sonnet_vqvae import distribute
from sonnet_vqvae import hierarchical
from sonnet_vqvae import input_pipeline
from sonnet_vqvae import loop
from sonnet_vqvae import loss_scale as loss_scale_lib
from sonnet_vqvae import networks
from sonnet_vqvae import optim
from sonnet_vqvae import plotting
from sonnet_vqvae import precision
from sonnet_vqvae import rundir
from sonnet_vqvae import configs
from sonnet_vqvae.configs import default

# Names that moved to their own modules, kept for existing callers.
Adam = optim.Adam
STRATEGIES = distribute.STRATEGIES
make_strategy = distribute.make_strategy
is_chief = distribute.is_chief

# The config keys `networks.build_model` reads: a checkpoint depends on them.
_MODEL_KEYS = ("num_hiddens", "num_residual_hiddens", "num_residual_layers",
               "embedding_dim", "num_embeddings", "commitment_cost",
               "use_ema", "decay", "quantizer")


def validate_config(config: config_dict.ConfigDict) -> None:
  """Raises ValueError for a config that cannot train, before any work.

  Checks keys against `configs.default.get_config()` (an unknown key is a
  typo: the error names it and the nearest valid keys), positive sizes, steps
  and intervals, finite learning rate and ranges (the quantizer options'
  too), non-empty dataset and eval_split names, the precision and the
  strategy name. Each error is one line naming the key and the value. The
  batch's divisibility by the replica count, the dataset (its images, the
  grids of num_levels, its files and eval_split) are checked by `train`,
  also before its workdir is created.
  """
  configs.check_keys(config, default.get_config())
  for key in ("num_steps", "batch_size", "eval_batch_size", "log_every",
              "checkpoint_every", "max_checkpoints_to_keep", "num_hiddens",
              "num_residual_hiddens", "embedding_dim", "num_embeddings",
              "shuffle_buffer"):
    if not config[key] > 0:
      raise ValueError(f"config.{key} must be positive, got {config[key]}.")
  if config.num_hiddens < 2:
    raise ValueError("config.num_hiddens must be >= 2 (the first encoder "
                     f"layer has num_hiddens // 2 channels), got "
                     f"{config.num_hiddens}.")
  if not (isinstance(config.num_levels, int) and config.num_levels >= 1):
    raise ValueError("config.num_levels must be an int >= 1 (1: the plain "
                     f"VQ-VAE), got {config.num_levels!r}.")
  per_level = config.level_num_embeddings
  if per_level is not None and (
      len(per_level) != config.num_levels or
      not all(isinstance(k, int) and k > 0 for k in per_level)):
    raise ValueError(
        "config.level_num_embeddings must be None or one positive int per "
        f"level (top first; num_levels={config.num_levels}), got "
        f"{per_level!r}.")
  if config.num_residual_layers < 0:
    raise ValueError("config.num_residual_layers must be >= 0, got "
                     f"{config.num_residual_layers}.")
  if not (math.isfinite(config.learning_rate) and config.learning_rate > 0):
    raise ValueError("config.learning_rate must be a finite number > 0, got "
                     f"{config.learning_rate}.")
  if not 0 <= config.decay < 1:
    raise ValueError(f"config.decay must be in [0, 1), got {config.decay}.")
  if not (math.isfinite(config.commitment_cost) and
          config.commitment_cost >= 0):
    raise ValueError("config.commitment_cost must be a finite number >= 0, "
                     f"got {config.commitment_cost}.")
  _check_quantizer_options(config.quantizer)
  # The kind and its options (sizes the kind needs; VQ-VAE-2 levels).
  networks.check_quantizer_config(config)
  if not config.dataset or not config.dataset.strip():
    raise ValueError("config.dataset is empty: name a tfds dataset, e.g. "
                     "--config.dataset=cifar10.")
  if not config.eval_split:
    raise ValueError("config.eval_split is empty: name a split of the "
                     "dataset, e.g. --config.eval_split=test.")
  if config.mixed_precision not in precision.CHOICES:
    raise ValueError(
        "config.mixed_precision must be None (float32), 'auto', 'bfloat16' or "
        f"'float16', got {config.mixed_precision!r}; None is the default: for "
        "float32 leave --config.mixed_precision out (the command line cannot "
        "pass None).")
  loop.check_loop_config(config)
  if config.strategy not in STRATEGIES:
    raise ValueError(
        f"config.strategy must be one of {STRATEGIES}, got {config.strategy!r}.")


def _check_quantizer_options(options: config_dict.ConfigDict) -> None:
  """The quantizer's own range checks, as one line naming the config key.

  Here, before any work: the quantizer would raise them only when the model
  is built, after the workdir exists.
  """
  ranges = {
      "usage_decay": ("a number in [0, 1)", lambda v: 0 <= v < 1),
      "dead_code_threshold": ("a finite number >= 0",
                              lambda v: math.isfinite(v) and v >= 0),
      "kmeans_iters": ("an int >= 0",
                       lambda v: isinstance(v, int) and v >= 0),
      "kmeans_init": ("True or False", lambda v: isinstance(v, bool)),
      "cosine": ("True or False", lambda v: isinstance(v, bool)),
  }
  for key, (what, valid) in ranges.items():
    if key in options and not valid(options[key]):
      raise ValueError(f"config.quantizer.{key} must be {what}, got "
                       f"{options[key]!r}.")


def check_num_levels(config: config_dict.ConfigDict, dataset: str,
                     image_shape: Sequence[int]) -> None:
  """Raises ValueError naming num_levels unless the images fit its grids.

  Every level halves the grid: H and W must be divisible by
  `downsampling(config)`.
  """
  height, width = image_shape[:2]
  factor = downsampling(config)
  if height % factor or width % factor:
    most = 0  # Levels whose grids divide the images.
    while not (height % (input_pipeline.MODEL_DOWNSAMPLE * 2**most) or
               width % (input_pipeline.MODEL_DOWNSAMPLE * 2**most)):
      most += 1
    raise ValueError(
        f"config.num_levels={config.num_levels} needs images whose height and "
        f"width are divisible by {factor} (4 * 2**(num_levels - 1)); "
        f"{dataset!r} has {height}x{width} images: set --config.num_levels "
        f"to at most {most}.")


def fingerprint(config: config_dict.ConfigDict,
                image_shape: Sequence[int]) -> Dict[str, Any]:
  """What a run's checkpoints depend on: a resumed run must match it.

  The data (dataset, data_dir, image shape) and the model's sizes and
  quantizer; steps, batch size, learning rate, seed, precision and strategy
  may change between resumes.
  """
  data_dir = config.data_dir
  model = {key: config[key] for key in _MODEL_KEYS if key != "quantizer"}
  # A vq or ema run's quantizer entry is the one of runs from before the
  # kinds (their workdirs resume); other kinds add theirs.
  overrides, model["quantizer"] = networks.quantizer_fingerprint(config)
  model.update(overrides)
  if num_levels(config) > 1:
    # Only then: a plain run's fingerprint stays what it was before VQ-VAE-2.
    model.update(num_levels=config.num_levels,
                 level_num_embeddings=hierarchical.level_num_embeddings(config))
  return {
      "dataset": config.dataset,
      "data_dir": None if data_dir is None else os.path.abspath(data_dir),
      "image_shape": [int(n) for n in image_shape],
      "model": model,
  }


def create_model_and_optimizer(
    config: config_dict.ConfigDict, data_variance: float,
    strategy: tf.distribute.Strategy,
    image_shape: Sequence[int] = (32, 32, 3)
) -> Tuple[networks.VQVAEModel, optim.Adam]:
  """Model and optimizer with all variables created, under `strategy`."""
  tf.random.set_seed(config.seed)
  with strategy.scope(), tf.variable_creator_scope(
      distribute.replica_consistent_variables):
    model = build_model(config, data_variance)
    mixed_precision = precision.resolve(config.mixed_precision, strategy)[0]
    optimizer = optim.Adam(config.learning_rate, loss_scale=(
        loss_scale_lib.DynamicLossScale()
        if mixed_precision == "float16" else None))
    # Sonnet creates variables on the first call; create them now, so that a
    # checkpoint restores into existing variables and mismatches are caught.
    with precision.scope(mixed_precision):
      model(tf.zeros([1, *image_shape]), is_training=False)
    optimizer.build(model.trainable_variables)
  return model, optimizer


def build_model(config: config_dict.ConfigDict, data_variance: float
                ) -> Union[networks.VQVAEModel, hierarchical.HierarchicalVQVAE]:
  """The model of `config`: the plain VQ-VAE, or VQ-VAE-2 for num_levels > 1."""
  if num_levels(config) > 1:
    return hierarchical.build_from_config(config, data_variance)
  return networks.build_model(config, data_variance)


def downsampling(config: config_dict.ConfigDict) -> int:
  """How much the model shrinks H and W: 4, and 2 more per upper level."""
  return 4 * 2**(num_levels(config) - 1)


def num_levels(config: config_dict.ConfigDict) -> int:
  """config.num_levels; 1 for the configs of runs from before VQ-VAE-2."""
  return int(config.get("num_levels", 1))


# Kept for existing callers; `precision` is its home.
precision_scope = precision.scope


def make_replica_step(model: networks.VQVAEModel, optimizer: optim.Adam,
                      mixed_precision: Optional[str] = None):
  """Returns replica_step(images) -> dict of scalar metrics (replica means).

  One step on one replica's [B, H, W, C] images: gradients and loss are
  averaged over the replicas and the update is skipped when the loss is not
  finite (`loop.update`). With float16, the optimizer's loss scale scales
  the loss; a step whose gradients overflow changes nothing but the scale,
  and the metrics include loss_scale.

  A batch with a non-finite image changes nothing (parameters, optimizer,
  the quantizers' statistics and usage): its loss reads NaN, so the loop
  stops there and names the step.

  Raises:
    ValueError: for float16 with an optimizer that has no loss scale.
  """
  loss_scale = optimizer.loss_scale
  if mixed_precision == "float16" and loss_scale is None:
    raise ValueError("float16 training needs a loss scale: "
                     "Adam(..., loss_scale=DynamicLossScale()).")

  # What the forward pass assigns (EMA statistics, usage, k-means and
  # restarted codes): put back after a step that must change nothing.
  state = list({id(v): v for v in list(model.non_trainable_variables) + [
      v for q in quantizers_of(model) for v in q.variables]}.values())

  def replica_step(images):
    # Checked on the input, not on the loss: oneDNN fuses Conv+ReLU, and
    # relu(conv(NaN)) is 0, so a non-finite image may give a finite loss.
    finite_images = tf.reduce_all(tf.math.is_finite(images))
    before = loop.snapshot(state)
    with tf.GradientTape() as tape, precision.scope(mixed_precision):
      out = model(images, is_training=True)
      loss = (out["loss"] if loss_scale is None
              else loss_scale.scale_loss(out["loss"]))
    params = model.trainable_variables
    step_loss = tf.where(finite_images, out["loss"],
                         tf.constant(float("nan"), out["loss"].dtype))
    loss = loop.update(optimizer, params, tape.gradient(loss, params),
                       step_loss, loss_scale, kept=before)
    vq = out["vq_output"]
    metrics = {"recon_error": out["recon_error"],
               "perplexity": vq["perplexity"],
               "codes_used": tf.cast(vq["codes_used"], tf.float32),
               # Usage over ~70 steps: one batch's count depends on its size.
               "codes_used_ema": tf.cast(vq["codes_used_ema"], tf.float32)}
    if "stage_perplexity" in vq:  # Residual VQ: each stage's too.
      for stage in range(vq["stage_perplexity"].shape[0]):
        metrics[f"stage{stage}_perplexity"] = vq["stage_perplexity"][stage]
        metrics[f"stage{stage}_codes_used"] = tf.cast(
            vq["stage_codes_used"][stage], tf.float32)
    if len(out.get("vq_outputs", ())) > 1:  # VQ-VAE-2: each level's too.
      for level, vq_level in enumerate(out["vq_outputs"]):
        metrics[f"level{level}_perplexity"] = vq_level["perplexity"]
        metrics[f"level{level}_codes_used"] = tf.cast(vq_level["codes_used"],
                                                      tf.float32)
    if loss_scale is not None:
      metrics["loss_scale"] = loss_scale.scale.read_value()
    return dict(loop.mean_over_replicas(metrics), loss=loss)

  return replica_step


def quantizers_of(model: networks.VQVAEModel) -> List[snt.Module]:
  """The model's quantizers, top first (one for the plain VQ-VAE)."""
  return list(getattr(model, "quantizers", None) or [model.quantizer])


def make_train_loop(model: networks.VQVAEModel, optimizer: optim.Adam,
                    strategy: tf.distribute.Strategy, jit_compile: bool,
                    mixed_precision: Optional[str] = None):
  """`loop.make_loop` of `make_replica_step`: train_loop(iterator, steps)."""
  return loop.make_loop(make_replica_step(model, optimizer, mixed_precision),
                        strategy, jit_compile)


def make_train_step(model: networks.VQVAEModel, optimizer: optim.Adam,
                    strategy: tf.distribute.Strategy, jit_compile: bool,
                    mixed_precision: Optional[str] = None):
  """Returns step(iterator) -> the metrics of one step: a loop of one step.

  Raises:
    ValueError: as `make_replica_step` and `loop.make_loop`.
  """
  train_loop = make_train_loop(model, optimizer, strategy, jit_compile,
                               mixed_precision)
  one = tf.constant(1)
  return lambda iterator: train_loop(iterator, one)["last"]


def train(config: config_dict.ConfigDict,
          workdir: str) -> networks.VQVAEModel:
  """Trains to `config.num_steps`, resuming from `workdir`'s checkpoint.

  The workdir is locked from the start to the end of training.

  Args:
    config: hyperparameters, see `configs/default.py`.
    workdir: directory for the run's files (created if missing); only the
      chief writes there (see `distribute.is_chief`).

  Returns:
    The trained model (its variables live under the run's strategy).

  Raises:
    ValueError: for a config or dataset that cannot train, or an eval_split
      the dataset lacks (before the workdir is created).
    FileNotFoundError, ConnectionError, tf.errors.DataLossError: for data
      that is missing, cannot be downloaded or is truncated (also before the
      workdir is created; see `input_pipeline.load_split`).
    rundir.RunDirError: the workdir is in use, holds another run
      (`rundir.FingerprintMismatch`) or checkpoints that cannot be restored.
    FloatingPointError: when the loss is not finite; the last good checkpoint
      is kept.
  """
  with _training(config, workdir) as model:
    return model


@contextlib.contextmanager
def _training(config: config_dict.ConfigDict,
              workdir: str) -> Iterator[networks.VQVAEModel]:
  """`train`, yielding the model while the workdir is still locked."""
  validate_config(config)
  strategy = make_strategy(config.strategy)
  distribute.check_batch_size(config.batch_size, strategy)
  image_shape = input_pipeline.check_images(
      input_pipeline.image_spec(config.dataset, data_dir=config.data_dir),
      dataset=config.dataset)
  check_num_levels(config, config.dataset, image_shape)
  # The data before the workdir: a missing, offline or damaged dataset, or
  # an eval_split it lacks, leaves no workdir behind.
  train_split = _load(config, "train")
  input_pipeline.check_split(config.eval_split, dataset=config.dataset,
                             data_dir=config.data_dir,
                             name="config.eval_split")
  print_ = fingerprint(config, image_shape)
  run_dir, stored = loop.open_run(workdir, print_)
  with run_dir:  # Releases the workdir's lock however training ends.
    model, optimizer, checkpoints, step, variance = _restore_or_start(
        config, strategy, run_dir, stored, image_shape, train_split)
    logging.info("Training from step %d to %d on %d replica(s) (%s).", step,
                 config.num_steps, strategy.num_replicas_in_sync,
                 type(strategy).__name__)
    dataset = strategy.distribute_datasets_from_function(
        lambda ctx: input_pipeline.train_dataset(
            train_split, config.batch_size,
            shuffle_buffer=config.shuffle_buffer, seed=config.seed + step,
            input_context=ctx))
    mixed_precision, why = precision.resolve(config.mixed_precision, strategy)
    logging.info("Computing in %s: %s.", mixed_precision or "float32", why)
    train_loop = loop.select_loop(
        make_replica_step(model, optimizer, mixed_precision), strategy,
        iter(dataset), config.jit_compile, config.num_steps - step)
    loop.run(train_loop, run_dir=run_dir,
             checkpoints=checkpoints, start_step=step,
             num_steps=config.num_steps, log_every=config.log_every,
             checkpoint_every=config.checkpoint_every,
             steps_per_loop=config.steps_per_loop,
             metadata={"config": config.to_dict(), "data_variance": variance},
             fingerprint=print_, describe=_describe,
             stop_on_signals=not distribute.is_multi_worker(strategy))
    loop.remove_scratch(checkpoints)
    yield model


def _describe(row: Dict[str, float]) -> str:
  return ("loss {loss:.4f} nmse {recon_error:.4f} perplexity {perplexity:.1f} "
          "codes {codes_used:.0f} (window {codes_used_ema:.0f})").format(**row)


def _load(config: config_dict.ConfigDict, split: str) -> tf.data.Dataset:
  return input_pipeline.load_split(split, dataset=config.dataset,
                                   data_dir=config.data_dir,
                                   download=config.download)


def _restore_or_start(config, strategy, run_dir, stored, image_shape,
                      train_split):
  """Builds the model and restores the run's newest checkpoint, if any.

  The training variance is the stored run's (so a resumed run's NMSE keeps
  its scale), or computed from the training split for a fresh run.
  """
  if stored is not None:
    variance = stored["data_variance"]
  else:
    with input_pipeline.naming_corrupt_files(
        "train", dataset=config.dataset, data_dir=config.data_dir):
      variance = input_pipeline.data_variance(train_split)
  model, optimizer = create_model_and_optimizer(config, variance, strategy,
                                                image_shape)
  checkpoint = tf.train.Checkpoint(
      model=model, optimizer=optimizer, step=tf.Variable(0, dtype=tf.int64))
  checkpoints = loop.checkpoints_of(run_dir, checkpoint, strategy,
                                    config.max_checkpoints_to_keep)
  step = loop.restore(run_dir, checkpoints, stored)
  distribute.check_same_step(step, strategy)  # Workers share one workdir.
  return model, optimizer, checkpoints, step, variance


def train_and_evaluate(config: config_dict.ConfigDict,
                       workdir: str) -> Dict[str, float]:
  """`train`, then (on the chief) `evaluate_and_plot` on the test split.

  The evaluation runs on the training's devices (multi-worker: the chief's
  default device, see `distribute.evaluation_strategy`). The workdir stays
  locked from the start of training to the end of the evaluation: no other
  process trains or evaluates in it meanwhile.

  Returns:
    The test metrics written to `workdir/eval.json`; {} on other workers.

  Raises:
    As `train`, and FloatingPointError for non-finite test metrics (written
    as null).
  """
  with _training(config, workdir) as model:
    if not is_chief():
      return {}
    # The process's one strategy of this name: the one `train` used.
    return evaluate_and_plot(config, model, workdir,
                             make_strategy(config.strategy))


def _evaluate(model: networks.VQVAEModel, dataset: tf.data.Dataset,
              strategy: Optional[tf.distribute.Strategy] = None
              ) -> Tuple[Dict[str, float], List[np.ndarray],
                         Tuple[np.ndarray, List[np.ndarray]]]:
  """`evaluate`'s metrics, the code histograms and the first batch.

  The histograms are each level's [K_i], top first (one for the plain
  VQ-VAE), or a residual quantizer's, one [K] per stage. The first batch is
  its [N, H, W, C] images and their reconstructions: the model's, then
  (VQ-VAE-2) those decoded from the top 1, ..., L - 1 levels.
  """
  strategy = strategy or tf.distribute.get_strategy()
  if not isinstance(dataset.element_spec, tuple):
    # Image batches: pad each to the first's size, so they share one shape.
    first = next(iter(dataset), None)
    if first is None:
      raise ValueError("evaluate: the dataset holds no images.")
    dataset = dataset.map(functools.partial(input_pipeline.pad_batch,
                                            batch_size=int(first.shape[0])))
  # Every level's codebook, top first (one for the plain VQ-VAE).
  quantizers_ = quantizers_of(model)
  levels = len(quantizers_)
  # A residual quantizer's codes are [..., num_stages]: one grid per stage.
  stages = getattr(quantizers_[-1], "num_stages", 0)

  # float32 on the devices (TPUs have no float64): per-image squared errors
  # and per-batch code counts (exact below 2**24); the host sums in float64.
  def replica_stats(images, mask):
    out = model(images, is_training=False)
    vq_outputs = out.get("vq_outputs", [out["vq_output"]])
    valid = tf.cast(mask, tf.float32)
    rows = {"images": images}
    if stages:
      indices = out["vq_output"]["encoding_indices"]
      counts = [_code_counts(indices[..., stage], valid,
                             model.quantizer.num_embeddings)
                for stage in range(stages)]
      rows["indices"] = indices  # The joint histogram's tuples.
    else:
      counts = [_code_counts(o["encoding_indices"], valid, vq.num_embeddings)
                for o, vq in zip(vq_outputs, quantizers_)]
    rows["recons"] = [out["x_recon"]]
    if levels > 1:
      # What the top levels carry: the same codes, decoded without the finer
      # levels. One decoder pass each, no encoding, so evaluation stays cheap.
      codes = [o["encoding_indices"] for o in vq_outputs]
      rows["recons"] += [model.decode_top(codes, k) for k in range(1, levels)]
    rows["squared"] = [
        tf.reduce_sum(tf.square(tf.cast(recon, tf.float32) - images),
                      axis=list(range(1, len(images.shape))))
        for recon in rows["recons"]]
    return counts, rows

  squared, size, counts, first, tuples = 0., 0, None, None, []
  for c, rows, mask in distribute.run_batches(
      strategy, replica_stats, dataset, model.variables, "The VQ-VAE",
      key=("train.evaluate", model)):
    real = mask.numpy()
    squared = np.add(squared, [np.sum(s.numpy()[real], dtype=np.float64)
                               for s in rows["squared"]])
    size += int(real.sum())
    c = [np.asarray(level, np.float64) for level in c]
    counts = c if counts is None else [a + b for a, b in zip(counts, c)]
    if stages:
      tuples.append(rows["indices"].numpy()[real].reshape(-1, stages))
    if first is None:
      first = (rows["images"].numpy()[real],
               [r.numpy()[real] for r in rows["recons"]])
  if first is None or not size:
    raise ValueError("evaluate: the dataset holds no images.")
  size *= float(np.prod(first[0].shape[1:]))
  mse = float(squared[0] / size)
  metrics = {"nmse": mse / model.data_variance, "mse": mse,
             "psnr": float(10 * np.log10(1. / mse)) if mse > 0 else math.inf}
  if stages:
    # A code is a position's tuple of stage codes: the joint histogram's
    # perplexity and codes used compare with one codebook's.
    _, joint = np.unique(np.concatenate(tuples), axis=0, return_counts=True)
    metrics.update(_histogram_metrics(joint))
    for stage, stage_counts in enumerate(counts):
      metrics.update({f"stage{stage}_{k}": v for k, v in
                      _histogram_metrics(stage_counts).items()})
    return metrics, counts, first
  # The bottom level's, the plain VQ-VAE's one codebook.
  metrics.update(_histogram_metrics(counts[-1]))
  if len(counts) > 1:
    for level, level_counts in enumerate(counts):
      metrics.update({f"level{level}_{k}": v for k, v in
                      _histogram_metrics(level_counts).items()})
    for k in range(1, levels):
      metrics[f"top{k}_nmse"] = float(squared[k] / size) / model.data_variance
  return metrics, counts, first


def _code_counts(indices: tf.Tensor, valid: tf.Tensor,
                 num_embeddings: int) -> tf.Tensor:
  """[K] float32 counts of `indices` [B, ...] over the valid [B] images.

  A segment sum, which XLA compiles with the static K (bincount's size is
  computed from the data).
  """
  weights = tf.broadcast_to(
      tf.reshape(valid, [-1] + [1] * (len(indices.shape) - 1)),
      tf.shape(indices))
  return tf.math.unsorted_segment_sum(
      tf.reshape(weights, [-1]), tf.reshape(tf.cast(indices, tf.int32), [-1]),
      num_embeddings)


def _histogram_metrics(counts: np.ndarray) -> Dict[str, float]:
  """perplexity and codes_used of a code histogram."""
  probs = counts / counts.sum()
  nonzero = probs[probs > 0]
  return {"perplexity": float(np.exp(-np.sum(nonzero * np.log(nonzero)))),
          "codes_used": int((counts > 0).sum())}


def evaluate(model: networks.VQVAEModel, dataset: tf.data.Dataset,
             strategy: Optional[tf.distribute.Strategy] = None
             ) -> Dict[str, float]:
  """Evaluates on every image of `dataset`, on the strategy's devices.

  Args:
    model: the VQ-VAE.
    dataset: fixed-shape (images, mask) batches as from
      `input_pipeline.eval_dataset` (one compiled shape; the mask drops the
      padding), or batches of [B, H, W, 3] images, each no larger than the
      first (they are padded to its size).
    strategy: the strategy the model's variables were created under; each
      batch is split over its replicas (`distribute.run_batches`). Default:
      the current one (`tf.distribute.get_strategy()`).

  Returns:
    nmse (MSE / training variance), mse, psnr (dB, images of range 1), and
    perplexity and codes_used of the code histogram over the whole dataset.
    A VQ-VAE-2 adds level{i}_perplexity and level{i}_codes_used for each
    level i (0: the top), and top{k}_nmse for k = 1 .. L - 1: the NMSE of
    images decoded from the top k levels alone (`decode_top`). With a
    residual quantizer the codes are a position's tuples of stage codes
    (perplexity and codes_used of their histogram), and each stage s adds
    stage{s}_perplexity and stage{s}_codes_used.

  Raises:
    ValueError: when the dataset is empty, or the model's variables are not
      the strategy's.
  """
  return _evaluate(model, dataset, strategy)[0]


def evaluate_and_plot(config: config_dict.ConfigDict,
                      model: networks.VQVAEModel, workdir: str,
                      strategy: Optional[tf.distribute.Strategy] = None
                      ) -> Dict[str, float]:
  """Evaluates on the test split; writes eval.json and the figures.

  `evaluate` runs on `strategy` (default: the current one), the strategy
  the model's variables were created under.

  curves.png, reconstructions.png and codebook.png (the bottom level's; a
  residual quantizer's: codebook_stage{s}.png per stage; FSQ's and LFQ's
  implied codebook, every code `quantize` maps to); a VQ-VAE-2 also gets
  level_reconstructions.png: the same test images decoded from the top 1,
  2, ..., all levels.

  Raises:
    FloatingPointError: for non-finite metrics, after writing them to
      eval.json as null (the figures are then not drawn).
  """
  # .get: run.json configs written before eval_split existed.
  split = config.get("eval_split", "test")
  test = _load(config, split)
  with input_pipeline.naming_corrupt_files(split, dataset=config.dataset,
                                           data_dir=config.data_dir):
    metrics, counts, (originals, recons) = _evaluate(
        model, input_pipeline.eval_dataset(test, config.eval_batch_size),
        strategy)
  logging.info("%s split: %s", split.capitalize(), metrics)
  with rundir.RunDir(workdir) as run_dir:  # Its writer until the figures.
    loop.write_eval(run_dir, metrics)
    history = run_dir.read_rows(loop.METRICS_FILE)
    if history:
      plotting.plot_curves(history, run_dir.path("curves.png"))
    plotting.plot_reconstructions(originals, recons[0],
                                  run_dir.path("reconstructions.png"),
                                  split=split)
    if len(recons) > 1:
      # Top 1 .. L - 1 levels, then all: the model's own reconstructions.
      plotting.plot_level_reconstructions(
          originals, recons[1:] + recons[:1],
          run_dir.path("level_reconstructions.png"), split=split)
    codebooks = _codebooks(model.quantizer)
    names = (["codebook.png"] if len(codebooks) == 1 else
             [f"codebook_stage{s}.png" for s in range(len(codebooks))])
    for codebook, stage_counts, name in zip(
        codebooks, counts[-len(codebooks):], names):
      if codebook is None:
        logging.info("No %s: %d codes are too many to draw.",
                     name, len(stage_counts))
      else:
        plotting.plot_codebook(codebook, stage_counts, run_dir.path(name))
  return metrics


# Implied codebooks (FSQ, LFQ) larger than this are not drawn.
_MAX_DRAWN_CODES = 1 << 16


def _codebooks(quantizer) -> List[Optional[np.ndarray]]:
  """[D, K] codebooks to draw: one, or a residual quantizer's per stage.

  A VQ codebook is its `embeddings`; FSQ's and LFQ's, which have none, are
  the vectors `quantize` gives every index (None above _MAX_DRAWN_CODES).
  """
  stages = getattr(quantizer, "stages", None)
  if stages is not None:
    return [c for stage in stages for c in _codebooks(stage)]
  if hasattr(quantizer, "embeddings"):
    return [quantizer.embeddings.numpy()]
  if quantizer.num_embeddings > _MAX_DRAWN_CODES:
    return [None]
  indices = tf.range(quantizer.num_embeddings, dtype=tf.int64)
  return [tf.transpose(quantizer.quantize(indices)).numpy()]


def restore_model(workdir: str, step: Optional[int] = None,
                  strategy: Optional[tf.distribute.Strategy] = None
                  ) -> Tuple[config_dict.ConfigDict, networks.VQVAEModel]:
  """The config and the model of a checkpoint in `workdir`; writes nothing.

  Takes no lock and works on a read-only workdir, also while a trainer
  saves into it (`rundir.restore_newest`).

  Args:
    workdir: a `train` run's workdir.
    step: the checkpoint's step; None for the newest.
    strategy: the strategy to build the model under, so that `evaluate`,
      `prior.encode_split` and sampling run on its devices (see
      `distribute.evaluation_strategy`); default: the current one.

  Raises:
    FileNotFoundError: when `workdir` holds no run or no checkpoint.
    rundir.RunDirError: when the checkpoint cannot be restored.
  """
  run_dir = rundir.RunDir(workdir, writer=False)
  stored = loop.read_run(workdir)
  if stored is None or "num_embeddings" in stored["fingerprint"]:
    raise FileNotFoundError(
        f"No trained VQ-VAE in {workdir!r}: no VQ-VAE {loop.RUN_FILE} (it is "
        "written with the first checkpoint of `python -m sonnet_vqvae.train "
        "--workdir DIR`).")
  config = config_dict.ConfigDict(stored["config"])
  model, optimizer = create_model_and_optimizer(
      config, stored["data_variance"],
      strategy or tf.distribute.get_strategy(),
      stored["fingerprint"]["image_shape"])
  checkpoint = tf.train.Checkpoint(
      model=model, optimizer=optimizer, step=tf.Variable(0, dtype=tf.int64))
  # Read only: a trainer may be saving into this workdir right now.
  directory = run_dir.path(loop.CHECKPOINT_DIR)
  if step is None:
    if not rundir.restore_newest(checkpoint, directory):
      raise FileNotFoundError(f"No checkpoint in {directory!r}.")
  else:
    rundir.restore_step(checkpoint, directory, step)
  return config, model


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdir = flags.FLAGS.workdir
  if flags.FLAGS.mode == "evaluate":
    # It writes eval.json and the figures: the workdir's writer throughout.
    with rundir.RunDir(workdir):
      # On the run's devices (restore_model names a workdir without a run).
      stored = loop.read_run(workdir) or {"config": {}}
      strategy = distribute.evaluation_strategy(make_strategy(
          stored["config"].get("strategy", "default")))
      config, model = restore_model(workdir, strategy=strategy)
      evaluate_and_plot(config, model, workdir, strategy)
  else:
    # `train --workdir W` alone resumes W's stored config.
    stored = loop.read_run(workdir)
    config = configs.for_run(flags.FLAGS["config"],
                             stored and stored["config"],
                             os.path.join(workdir, loop.RUN_FILE))
    validate_config(config)  # Before any work.
    with loop.exit_when_stopped("train"):
      train_and_evaluate(config, workdir)


if __name__ == "__main__":
  # Defined here, not at import, so that other programs (bench/) can import
  # this module and define their own --config.
  flags.DEFINE_string("workdir", None, "Directory of the run.", required=True)
  flags.DEFINE_enum(
      "mode", "train", ["train", "evaluate"],
      "train: train (or resume) then evaluate; evaluate: evaluate and plot "
      "the latest checkpoint of --workdir.")
  try:  # --config=vqvae2: a preset by name, from any directory.
    sys.argv = configs.resolve_config_flag(sys.argv)
  except ValueError as e:
    sys.exit(f"train: {e}")
  configs.exit_on_unknown_override(sys.argv, "config", default.get_config())
  config_flags.DEFINE_config_file(
      "config",
      os.path.join(os.path.dirname(__file__), "configs", "default.py"),
      "Training configuration: a preset's name (default, vqvae2) or a "
      "file's path. Without it, a workdir holding a run resumes that run's "
      "config, with the --config.key=value overrides given.",
      lock_config=True)
  cli.run(main)
