r"""Trains and evaluates the VQ-VAE on CIFAR-10, on one or many devices.

    python -m sonnet_vqvae.train --workdir DIR [--config.key=value ...]
    python -m sonnet_vqvae.train --workdir DIR --mode=evaluate

The workdir holds `run.json` (config and training-data variance),
`checkpoints/`, TensorBoard summaries, `metrics.jsonl` (one row per log step),
`eval.json` and the PNG figures. Starting the same command again resumes from
the latest checkpoint; a checkpoint that cannot be restored is an error and is
left untouched.

Distribution: every strategy (one device, `snt.distribute.Replicator`,
`TPUStrategy`, `MultiWorkerMirroredStrategy`) runs the same replica step:
gradients are all-reduced (mean) and every replica applies the same update.
`snt.optimizers.Adam` refuses strategies other than Sonnet's replicators, so
the step uses `Adam` below: the same update rule as `snt.optimizers.Adam`,
without the strategy check. Its slot variables, like the model's, are created
by `quantizers.replica_consistent_variables` (ONLY_FIRST_REPLICA aggregation),
which makes replica-context assignments valid under every strategy.

The input pipeline's position is not checkpointed; a resumed run reshuffles
with seed + step.
"""

import contextlib
import functools
import glob
import json
import math
import os
import sys
import time
from typing import Dict, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_dict
from ml_collections import config_flags
import numpy as np
import sonnet as snt
from sonnet.src.optimizers import adam as snt_adam
import tensorflow as tf
from tensorflow.core.framework import summary_pb2
import tqdm

from sonnet_vqvae import input_pipeline
from sonnet_vqvae import loss_scale as loss_scale_lib
from sonnet_vqvae import networks
from sonnet_vqvae import plotting
from sonnet_vqvae import quantizers
from sonnet_vqvae.configs import default

STRATEGIES = ("auto", "default", "replicator", "tpu", "multi_worker")
_RUN_FILE = "run.json"
_CHECKPOINT_DIR = "checkpoints"
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))


class Adam(snt.Module):
  """Adam (Kingma & Ba): `snt.optimizers.Adam`'s update under any strategy."""

  def __init__(self,
               learning_rate: float,
               beta1: float = 0.9,
               beta2: float = 0.999,
               epsilon: float = 1e-8,
               loss_scale: Optional[loss_scale_lib.DynamicLossScale] = None,
               name: str = "adam"):
    """Constructs the optimizer.

    Args:
      learning_rate: as in `snt.optimizers.Adam`.
      beta1: as in `snt.optimizers.Adam`.
      beta2: as in `snt.optimizers.Adam`.
      epsilon: as in `snt.optimizers.Adam`.
      loss_scale: for float16 training, the loss scale that `make_train_step`
        applies (checkpointed with the optimizer); None otherwise.
      name: module name.
    """
    super().__init__(name=name)
    self.learning_rate = learning_rate
    self.beta1 = beta1
    self.beta2 = beta2
    self.epsilon = epsilon
    self.loss_scale = loss_scale
    self.step = tf.Variable(0, trainable=False, dtype=tf.int64, name="t")
    self.m = []
    self.v = []

  def build(self, parameters: Sequence[tf.Variable]) -> None:
    """Creates the zero moments of `parameters` (call once, before `apply`)."""
    for slots, prefix in ((self.m, "m"), (self.v, "v")):
      slots.extend(
          tf.Variable(tf.zeros_like(p), trainable=False,
                      name=f"{prefix}/{p.name.split(':')[0]}")
          for p in parameters)

  def apply(self, updates: Sequence[tf.Tensor],
            parameters: Sequence[tf.Variable],
            apply_if: Optional[tf.Tensor] = None) -> None:
    """Applies one Adam step of `updates` (gradients) to `parameters`.

    Args:
      updates: gradients, one per parameter.
      parameters: the variables `build` was called with.
      apply_if: optional scalar bool; when False the step changes nothing
        (parameters, moments and step count), as loss scaling needs after a
        gradient overflow.
    """
    if len(self.m) != len(parameters):
      raise ValueError(f"Adam was built for {len(self.m)} parameters, got "
                       f"{len(parameters)}.")

    def unless_skipped(new, old):
      # tf.where, not tf.cond: assignments inside tf.cond break under
      # MirroredStrategy. A skipped step's values may be inf/NaN; unselected.
      return new if apply_if is None else tf.where(apply_if, new, old)

    self.step.assign(unless_skipped(self.step + 1, self.step))
    t = tf.cast(self.step, tf.float32)
    for update, param, m, v in zip(updates, parameters, self.m, self.v):
      # Sonnet's own update rule; only its apply() refuses our strategies.
      step, new_m, new_v = snt_adam.adam_update(
          g=update, alpha=self.learning_rate, beta_1=self.beta1,
          beta_2=self.beta2, epsilon=self.epsilon, t=t, m=m, v=v)
      m.assign(unless_skipped(new_m, m))
      v.assign(unless_skipped(new_v, v))
      param.assign(unless_skipped(param - step, param))


def validate_config(config: config_dict.ConfigDict) -> None:
  """Raises ValueError for a config that cannot train, before any work.

  Checks keys against `configs.default.get_config()` (unknown keys are
  typos), positive sizes, steps and intervals, and the strategy name. The batch
  divisibility by the replica count is checked by `make_strategy`'s caller.
  """
  _check_keys(config, default.get_config(), prefix="")
  for key in ("num_steps", "batch_size", "eval_batch_size", "log_every",
              "checkpoint_every", "max_checkpoints_to_keep", "num_hiddens",
              "num_residual_hiddens", "embedding_dim", "num_embeddings",
              "shuffle_buffer"):
    if config[key] <= 0:
      raise ValueError(f"config.{key} must be positive, got {config[key]}.")
  if config.num_residual_layers < 0:
    raise ValueError("config.num_residual_layers must be >= 0, got "
                     f"{config.num_residual_layers}.")
  if not config.learning_rate > 0:
    raise ValueError(
        f"config.learning_rate must be positive, got {config.learning_rate}.")
  if not 0 <= config.decay < 1:
    raise ValueError(f"config.decay must be in [0, 1), got {config.decay}.")
  if config.mixed_precision not in (None, "bfloat16", "float16"):
    raise ValueError(
        "config.mixed_precision must be None, 'bfloat16' or 'float16', got "
        f"{config.mixed_precision!r}.")
  if config.strategy not in STRATEGIES:
    raise ValueError(
        f"config.strategy must be one of {STRATEGIES}, got {config.strategy!r}.")


def _check_keys(config, reference, prefix):
  unknown = sorted(set(config.keys()) - set(reference.keys()))
  if unknown:
    raise ValueError(f"Unknown config keys: {[prefix + k for k in unknown]}; "
                     f"known: {sorted(reference.keys())}.")
  for key, value in reference.items():
    if isinstance(value, config_dict.ConfigDict):
      _check_keys(config[key], value, prefix=f"{prefix}{key}.")


@functools.cache
def make_strategy(name: str) -> tf.distribute.Strategy:
  """The strategy `name` (see `STRATEGIES`); "auto" picks from the machine.

  One instance per name and process: strategies number their collectives
  independently, so a second one over the same devices would reuse the first
  one's collective keys with other shapes. Other code in the process should
  take its strategy from here too.

  auto: multi_worker when TF_CONFIG names more than one task, tpu when a TPU
  is named (TPU_NAME / COLAB_TPU_ADDR) or attached to this host (Colab TPU
  runtimes and Cloud TPU VMs), replicator over several GPUs, the default
  one-device strategy otherwise. "replicator" uses all local GPUs, or all
  logical CPUs when there is no GPU; "tpu" is `snt.distribute.TpuReplicator`.
  """
  if name == "auto":
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    if sum(len(tasks) for tasks in cluster.values()) > 1:
      name = "multi_worker"
    elif _named_tpu() or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
      name = "tpu"
    elif len(tf.config.list_logical_devices("GPU")) > 1:
      name = "replicator"
    else:
      name = "default"
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "replicator":
    devices = (tf.config.list_logical_devices("GPU") or
               tf.config.list_logical_devices("CPU"))
    return snt.distribute.Replicator(devices=[d.name for d in devices])
  if name == "tpu":
    # A TPU attached to this host has no address: the resolver calls it local.
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu=None if _named_tpu() else "local")
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return snt.distribute.TpuReplicator(resolver)
  if name == "multi_worker":
    return tf.distribute.MultiWorkerMirroredStrategy()
  raise ValueError(f"Unknown strategy {name!r}; expected one of {STRATEGIES}.")


def _named_tpu() -> bool:
  return bool(os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR"))


def is_chief() -> bool:
  """Whether this process writes the run's files (TF_CONFIG's chief).

  The chief task if TF_CONFIG names one, else worker 0; a process without
  TF_CONFIG is its own chief.
  """
  tf_config = json.loads(os.environ.get("TF_CONFIG", "{}"))
  task = tf_config.get("task", {})
  if not task:
    return True
  if "chief" in tf_config.get("cluster", {}):
    return task.get("type") == "chief"
  return task.get("type") == "worker" and task.get("index", 0) == 0


def create_model_and_optimizer(
    config: config_dict.ConfigDict, data_variance: float,
    strategy: tf.distribute.Strategy) -> Tuple[networks.VQVAEModel, Adam]:
  """Model and optimizer with all variables created, under `strategy`."""
  tf.random.set_seed(config.seed)
  with strategy.scope(), tf.variable_creator_scope(
      quantizers.replica_consistent_variables):
    model = networks.build_model(config, data_variance)
    optimizer = Adam(config.learning_rate, loss_scale=(
        loss_scale_lib.DynamicLossScale()
        if config.mixed_precision == "float16" else None))
    # Sonnet creates variables on the first call; create them now, so that a
    # checkpoint restores into existing variables and mismatches are caught.
    with precision_scope(config.mixed_precision):
      model(tf.zeros([1, 32, 32, 3]), is_training=False)
    optimizer.build(model.trainable_variables)
  return model, optimizer


def precision_scope(mixed_precision: Optional[str]):
  """Context in which the model computes in `mixed_precision` (None: float32)."""
  if mixed_precision is None:
    return contextlib.nullcontext()
  return snt.mixed_precision.scope(tf.as_dtype(mixed_precision))


def make_train_step(model: networks.VQVAEModel, optimizer: Adam,
                    strategy: tf.distribute.Strategy, jit_compile: bool,
                    mixed_precision: Optional[str] = None):
  """Returns step(iterator) -> dict of scalar metrics (means over replicas).

  With float16, the optimizer's loss scale scales the loss; a step whose
  gradients overflow changes nothing but the scale. The metrics then include
  loss_scale.

  Raises:
    ValueError: for float16 with an optimizer that has no loss scale.
  """
  loss_scale = optimizer.loss_scale
  if mixed_precision == "float16" and loss_scale is None:
    raise ValueError("float16 training needs a loss scale: "
                     "Adam(..., loss_scale=DynamicLossScale()).")

  def replica_step(images):
    with tf.GradientTape() as tape, precision_scope(mixed_precision):
      out = model(images, is_training=True)
      loss = (out["loss"] if loss_scale is None
              else loss_scale.scale_loss(out["loss"]))
    params = model.trainable_variables
    grads = tape.gradient(loss, params)
    context = tf.distribute.get_replica_context()
    if context.num_replicas_in_sync > 1:
      grads = context.all_reduce(tf.distribute.ReduceOp.MEAN, grads)
    apply_if = None
    if loss_scale is not None:
      grads, apply_if = loss_scale.update(grads)
    optimizer.apply(grads, params, apply_if)
    vq = out["vq_output"]
    metrics = {"loss": out["loss"], "recon_error": out["recon_error"],
               "perplexity": vq["perplexity"],
               "codes_used": tf.cast(vq["codes_used"], tf.float32),
               # Usage over ~70 steps: one batch's count depends on its size.
               "codes_used_ema": tf.cast(vq["codes_used_ema"], tf.float32)}
    if loss_scale is not None:
      metrics["loss_scale"] = loss_scale.scale.read_value()
    if context.num_replicas_in_sync > 1:
      metrics = context.all_reduce(tf.distribute.ReduceOp.MEAN, metrics)
    return metrics

  # XLA cannot compile a replica function whose variables live on another
  # device than the one it is placed on (a TF known issue), so several local
  # replicas run without it; TPUStrategy compiles with XLA anyway.
  replica_step = tf.function(
      replica_step,
      jit_compile=jit_compile and strategy.num_replicas_in_sync == 1)

  @tf.function
  def step(iterator):
    metrics = strategy.run(replica_step, args=(next(iterator),))
    return {k: strategy.experimental_local_results(v)[0]
            for k, v in metrics.items()}

  return step


def _save_run(workdir: str, config: config_dict.ConfigDict,
              data_variance: float) -> None:
  with tf.io.gfile.GFile(os.path.join(workdir, _RUN_FILE), "w") as f:
    json.dump({"config": config.to_dict(), "data_variance": data_variance}, f,
              indent=2)


def _load_run(workdir: str) -> Optional[Tuple[config_dict.ConfigDict, float]]:
  path = os.path.join(workdir, _RUN_FILE)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    run = json.load(f)
  return config_dict.ConfigDict(run["config"]), run["data_variance"]


def restore_checkpoint(checkpoint: tf.train.Checkpoint, directory: str) -> int:
  """Restores the latest checkpoint in `directory` (if any); returns its step.

  Raises:
    RuntimeError: naming the checkpoint, when it is corrupt or does not match
      the model/optimizer (the files are left as they are).
  """
  path = tf.train.latest_checkpoint(directory)
  if path is None:
    return 0
  try:
    checkpoint.restore(path).assert_existing_objects_matched()
  # The checkpoint reader raises IndexError for truncated files.
  except (tf.errors.OpError, ValueError, AssertionError, IndexError) as e:
    raise RuntimeError(
        f"Cannot restore checkpoint {path}: {e}\nIt is corrupt or was written "
        "by a different model/config. It was left untouched; move it away (or "
        "use another --workdir) to start afresh.") from e
  return int(checkpoint.step.numpy())


def train(config: config_dict.ConfigDict,
          workdir: str) -> networks.VQVAEModel:
  """Trains to `config.num_steps`, resuming from `workdir`'s checkpoint.

  Args:
    config: hyperparameters, see `configs/default.py`.
    workdir: directory for the run's files (created if missing); only the
      chief writes there (see `is_chief`).

  Returns:
    The trained model (its variables live under the run's strategy).

  Raises:
    ValueError: for a config that cannot train (before any work).
    RuntimeError: for a checkpoint that cannot be restored.
    FloatingPointError: when the loss is not finite; the last good checkpoint
      is kept.
  """
  validate_config(config)
  strategy = make_strategy(config.strategy)
  num_replicas = strategy.num_replicas_in_sync
  if config.batch_size % num_replicas:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible "
                     f"by the {num_replicas} replicas.")
  chief = is_chief()
  tf.io.gfile.makedirs(workdir)

  def load(split):
    return input_pipeline.load_split(split, dataset=config.dataset,
                                     data_dir=config.data_dir,
                                     download=config.download)
  train_split = load("train")
  previous = _load_run(workdir)
  data_variance = (previous[1] if previous else
                   input_pipeline.data_variance(train_split))
  model, optimizer = create_model_and_optimizer(config, data_variance,
                                                strategy)
  checkpoint = tf.train.Checkpoint(
      model=model, optimizer=optimizer, step=tf.Variable(0, dtype=tf.int64))
  # Non-chief workers must take part in saving (collectives), into a scratch
  # directory of their own.
  checkpoint_dir = os.path.join(workdir, _CHECKPOINT_DIR)
  if not chief:
    checkpoint_dir = os.path.join(
        workdir, f"worker_{strategy.cluster_resolver.task_id}_scratch")
  manager = tf.train.CheckpointManager(
      checkpoint, checkpoint_dir, max_to_keep=config.max_checkpoints_to_keep)
  step = restore_checkpoint(checkpoint, os.path.join(workdir, _CHECKPOINT_DIR))
  if chief:
    _save_run(workdir, config, data_variance)
  logging.info("Training from step %d to %d on %d replica(s) (%s).", step,
               config.num_steps, num_replicas, type(strategy).__name__)

  dataset = strategy.distribute_datasets_from_function(
      lambda ctx: input_pipeline.train_dataset(
          train_split, config.batch_size, shuffle_buffer=config.shuffle_buffer,
          seed=config.seed + step, input_context=ctx))
  iterator = iter(dataset)
  train_step = make_train_step(model, optimizer, strategy, config.jit_compile,
                               config.mixed_precision)
  writer = (tf.summary.create_file_writer(workdir) if chief
            else tf.summary.create_noop_writer())
  progress = tqdm.tqdm(total=config.num_steps, initial=step,
                       disable=not (chief and sys.stderr.isatty()))
  sums, count, last_good, start = {}, 0, step, time.time()
  start_step = step
  while step < config.num_steps:
    metrics = {k: float(v) for k, v in train_step(iterator).items()}
    step += 1
    progress.update()
    if not math.isfinite(metrics["loss"]):
      raise FloatingPointError(
          f"Non-finite loss {metrics['loss']} at step {step} ({metrics}). The "
          f"last good checkpoint (step {last_good}) in {checkpoint_dir} is "
          "kept; lower the learning rate or check the data.")
    for k, v in metrics.items():
      sums[k] = sums.get(k, 0.) + v
    count += 1
    if step % config.log_every == 0 or step == config.num_steps:
      row = {k: v / count for k, v in sums.items()}
      steps_per_sec = (step - start_step) / (time.time() - start)
      row.update(step=step, steps_per_sec=steps_per_sec)
      _log_row(workdir, writer, row, chief)
      logging.info(
          "step %d/%d loss %.4f nmse %.4f perplexity %.1f codes %.0f "
          "(window %.0f) %.2f steps/s ETA %.0fs", step, config.num_steps,
          row["loss"], row["recon_error"], row["perplexity"],
          row["codes_used"], row["codes_used_ema"], steps_per_sec,
          (config.num_steps - step) / steps_per_sec)
      sums, count = {}, 0
    if step % config.checkpoint_every == 0 or step == config.num_steps:
      checkpoint.step.assign(step)
      manager.save(checkpoint_number=step)
      last_good = step
  progress.close()
  if not chief:
    tf.io.gfile.rmtree(checkpoint_dir)
  return model


def train_and_evaluate(config: config_dict.ConfigDict,
                       workdir: str) -> Dict[str, float]:
  """`train`, then (on the chief) `evaluate_and_plot` on the test split.

  Returns:
    The test metrics written to `workdir/eval.json`; {} on other workers.

  Raises:
    As `train`.
  """
  model = train(config, workdir)
  if not is_chief():
    return {}
  return evaluate_and_plot(config, model, workdir)


def _log_row(workdir: str, writer, row: Dict[str, float],
             chief: bool) -> None:
  with writer.as_default(step=row["step"]):
    for key, value in row.items():
      if key != "step":
        # tf.summary.scalar needs the tensorboard package; this is its op.
        tf.summary.write(f"train/{key}", tf.constant(value, tf.float32),
                         metadata=_SCALAR_METADATA)
  if chief:
    with tf.io.gfile.GFile(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps(row) + "\n")


def evaluate(model: networks.VQVAEModel, dataset: tf.data.Dataset
             ) -> Tuple[Dict[str, float], np.ndarray, np.ndarray]:
  """Evaluates on every image of `dataset` (batches of [B, 32, 32, 3]).

  Returns:
    (metrics, counts, first_batch): metrics has nmse (MSE / training
    variance), mse, psnr (dB, images of range 1), perplexity and codes_used of
    the code histogram over the whole split; counts is that [K] histogram;
    first_batch is (originals, reconstructions) of the first batch.
  """
  @tf.function
  def batch_stats(images):
    out = model(images, is_training=False)
    indices = tf.reshape(out["vq_output"]["encoding_indices"], [-1])
    counts = tf.math.bincount(tf.cast(indices, tf.int32),
                              minlength=model.quantizer.num_embeddings,
                              dtype=tf.float64)
    squared = tf.reduce_sum(tf.square(tf.cast(out["x_recon"] - images,
                                              tf.float64)))
    return squared, tf.cast(tf.size(images), tf.float64), counts, out["x_recon"]

  squared, size, counts, first = 0., 0., 0., None
  for images in dataset:
    s, n, c, recon = batch_stats(images)
    squared, size, counts = squared + s, size + n, counts + c
    if first is None:
      first = (images.numpy(), recon.numpy())
  mse = float(squared / size)
  counts = np.asarray(counts)
  probs = counts / counts.sum()
  nonzero = probs[probs > 0]
  metrics = {"nmse": mse / model.data_variance, "mse": mse,
             "psnr": float(10 * np.log10(1. / mse)),
             "perplexity": float(np.exp(-np.sum(nonzero * np.log(nonzero)))),
             "codes_used": int((counts > 0).sum())}
  return metrics, counts, first


def evaluate_and_plot(config: config_dict.ConfigDict,
                      model: networks.VQVAEModel,
                      workdir: str) -> Dict[str, float]:
  """Evaluates on the test split; writes eval.json and the four figures."""
  test = input_pipeline.load_split("test", dataset=config.dataset,
                                   data_dir=config.data_dir,
                                   download=config.download)
  metrics, counts, (originals, recons) = evaluate(
      model, input_pipeline.eval_dataset(test, config.eval_batch_size))
  logging.info("Test: %s", metrics)
  with tf.io.gfile.GFile(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(metrics, f, indent=2)
  history_path = os.path.join(workdir, "metrics.jsonl")
  if tf.io.gfile.exists(history_path):
    with tf.io.gfile.GFile(history_path) as f:
      plotting.plot_curves([json.loads(line) for line in f],
                           os.path.join(workdir, "curves.png"))
  plotting.plot_reconstructions(originals, recons,
                                os.path.join(workdir, "reconstructions.png"))
  plotting.plot_codebook(model.quantizer.embeddings.numpy(), counts,
                         os.path.join(workdir, "codebook.png"))
  return metrics


def restore_model(workdir: str) -> Tuple[config_dict.ConfigDict,
                                         networks.VQVAEModel]:
  """The config and the model of the latest checkpoint in `workdir`.

  Raises:
    FileNotFoundError: when `workdir` holds no run or no checkpoint.
    RuntimeError: when the checkpoint cannot be restored.
  """
  run = _load_run(workdir)
  checkpoints = os.path.join(workdir, _CHECKPOINT_DIR)
  if run is None or tf.train.latest_checkpoint(checkpoints) is None:
    raise FileNotFoundError(
        f"No trained run in {workdir!r} ({_RUN_FILE} and {_CHECKPOINT_DIR}/ "
        "are written by `python -m sonnet_vqvae.train --workdir DIR`).")
  config, data_variance = run
  model, optimizer = create_model_and_optimizer(
      config, data_variance, tf.distribute.get_strategy())
  checkpoint = tf.train.Checkpoint(
      model=model, optimizer=optimizer, step=tf.Variable(0, dtype=tf.int64))
  restore_checkpoint(checkpoint, checkpoints)
  return config, model


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdir = flags.FLAGS.workdir
  if flags.FLAGS.mode == "evaluate":
    config, model = restore_model(workdir)
    evaluate_and_plot(config, model, workdir)
  else:
    train_and_evaluate(flags.FLAGS.config, workdir)


if __name__ == "__main__":
  # Defined here, not at import, so that other programs (bench/) can import
  # this module and define their own --config.
  flags.DEFINE_string("workdir", None, "Directory of the run.", required=True)
  flags.DEFINE_enum(
      "mode", "train", ["train", "evaluate"],
      "train: train (or resume) then evaluate; evaluate: evaluate and plot "
      "the latest checkpoint of --workdir.")
  config_flags.DEFINE_config_file(
      "config",
      os.path.join(os.path.dirname(__file__), "configs", "default.py"),
      "Training configuration.", lock_config=True)
  app.run(main)
