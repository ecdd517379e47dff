"""Trains a gated PixelCNN prior over a trained VQ-VAE's code grids, samples it.

A VQ-VAE becomes a generative model once a prior over its discrete latents is
learned: the CIFAR-10 splits are encoded to [H, W] code grids once, a
`GatedPixelCNN` is fit to the train grids, and its test negative
log-likelihood is reported in nats per code and in bits per image dimension.
New images are drawn by sampling code grids and decoding them.

  python -m sonnet_vqvae.prior --vqvae_workdir DIR --workdir DIR2
  python -m sonnet_vqvae.prior --vqvae_workdir DIR --workdir DIR2 --mode=sample
"""

import json
import math
import os
import time
from typing import Dict, Optional, Tuple

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np
import sonnet as snt
import tensorflow as tf

from sonnet_vqvae import input_pipeline
from sonnet_vqvae import pixelcnn
from sonnet_vqvae import plotting
from sonnet_vqvae import train
from sonnet_vqvae.configs import prior as prior_config

FLAGS = flags.FLAGS

CIFAR10_NUM_CLASSES = 10
CIFAR10_IMAGE_DIMS = 32 * 32 * 3
CONFIG_FILE = "prior_config.json"
METRICS_FILE = "prior_metrics.json"


def build_prior(config: ml_collections.ConfigDict,
                num_embeddings: int) -> pixelcnn.GatedPixelCNN:
  """Builds the PixelCNN described by config over num_embeddings codes."""
  return pixelcnn.GatedPixelCNN(
      num_embeddings=num_embeddings,
      hidden_channels=config.hidden_channels,
      num_layers=config.num_layers,
      kernel_size=config.kernel_size,
      num_classes=CIFAR10_NUM_CLASSES if config.class_conditional else None)


def code_nll(model: pixelcnn.GatedPixelCNN, codes: tf.Tensor,
             labels: tf.Tensor) -> tf.Tensor:
  """Negative log-likelihood of every code given the codes before it.

  Args:
    model: the prior.
    codes: [B, H, W] int code grids.
    labels: [B] int class labels, ignored by an unconditional model.

  Returns:
    [B, H, W] float32 nats.
  """
  logits = model(codes, labels if model.num_classes else None)
  return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=codes,
                                                         logits=logits)


def encode_split(vqvae: snt.Module, split: str, *, batch_size: int,
                 dataset: str, data_dir: Optional[str],
                 download: bool) -> Dict[str, np.ndarray]:
  """Encodes a dataset split to code grids with a VQ-VAE.

  Args:
    vqvae: a model with `encode(images [B, 32, 32, 3]) -> [B, H, W]` indices.
    split: tfds split name.
    batch_size: images per encoder call.
    dataset: tfds dataset name (the VQ-VAE's, e.g. "cifar10").
    data_dir: tfds data directory.
    download: whether tfds may download the data.

  Returns:
    {'codes': [N, H, W] int32 indices, 'labels': [N] int32 class labels}.
  """
  batches = input_pipeline.load_split(
      split, dataset=dataset, data_dir=data_dir, download=download).batch(
          batch_size).prefetch(tf.data.AUTOTUNE)
  encode = tf.function(vqvae.encode)
  codes, labels = [], []
  for batch in batches:
    codes.append(encode(batch["image"]).numpy())
    labels.append(batch["label"].numpy())
  return {"codes": np.concatenate(codes).astype(np.int32),
          "labels": np.concatenate(labels).astype(np.int32)}


def evaluate(model: pixelcnn.GatedPixelCNN, data: Dict[str, np.ndarray],
             batch_size: int) -> Dict[str, float]:
  """Test likelihood of code grids under the prior and the uniform baseline.

  Args:
    model: the prior.
    data: {'codes': [N, H, W], 'labels': [N]} as from `encode_split`.
    batch_size: grids per forward pass.

  Returns:
    A dict with
      nll_nats_per_code: mean negative log-likelihood per code.
      bits_per_dim: total nats of a grid / CIFAR10_IMAGE_DIMS / ln 2: the
        prior's cost of an image's codes per image dimension. The decoder's
        reconstruction term, which the VQ-VAE paper's 4.67 bits/dim
        includes, is not part of it.
      uniform_nats_per_code: log K, the cost of a uniform prior.
      uniform_bits_per_dim: the same in bits per image dimension.
  """
  total_nll = tf.function(
      lambda codes, labels: tf.reduce_sum(code_nll(model, codes, labels)))
  dataset = tf.data.Dataset.from_tensor_slices(data).batch(batch_size)
  total = sum(float(total_nll(b["codes"], b["labels"])) for b in dataset)
  codes_per_grid = int(np.prod(data["codes"].shape[1:]))
  nats_per_code = total / data["codes"].size
  uniform = math.log(model.num_embeddings)

  def bits_per_dim(per_code):
    return per_code * codes_per_grid / CIFAR10_IMAGE_DIMS / math.log(2)

  return {"nll_nats_per_code": nats_per_code,
          "bits_per_dim": bits_per_dim(nats_per_code),
          "uniform_nats_per_code": uniform,
          "uniform_bits_per_dim": bits_per_dim(uniform)}


def unigram_nll(train_codes: np.ndarray, test_codes: np.ndarray,
                num_embeddings: int) -> float:
  """Nats per test code under the train codes' add-one smoothed frequencies.

  The baseline a prior must beat to have learned more than which codes the
  VQ-VAE uses: it ignores every code's neighbours.
  """
  counts = np.bincount(train_codes.ravel(), minlength=num_embeddings) + 1.0
  log_probs = np.log(counts / counts.sum())
  return float(-log_probs[test_codes.ravel()].mean())


def train_on_codes(config: ml_collections.ConfigDict,
                   train_data: Dict[str, np.ndarray],
                   test_data: Dict[str, np.ndarray], num_embeddings: int,
                   workdir: str) -> Dict[str, float]:
  """Fits the prior to code grids; checkpoints, resumes and evaluates.

  Args:
    config: a configs/prior.py config.
    train_data: {'codes': [N, H, W], 'labels': [N]} to train on.
    test_data: the same for evaluation.
    num_embeddings: K, the codebook size.
    workdir: where checkpoints, the config and the metrics JSON
      (METRICS_FILE) go; a run resumes from its latest checkpoint.

  Returns:
    The `evaluate` metrics on test_data plus `step`,
    `unigram_nats_per_code` (see `unigram_nll`) and `train_nll_nats_per_code`
    (mean over the last logging window; NaN when a finished run was resumed
    and trained no further).

  Raises:
    ValueError: if the batch does not split evenly over the replicas.
    RuntimeError: for a checkpoint in workdir that cannot be restored (it is
      left untouched).
  """
  # The process's one Replicator, shared with `train`: a second strategy over
  # the same devices would reuse its collective keys with other shapes.
  strategy = train.make_strategy("replicator")
  num_replicas = strategy.num_replicas_in_sync
  if config.batch_size % num_replicas:
    raise ValueError(f"batch_size {config.batch_size} does not split over "
                     f"{num_replicas} replicas.")
  with strategy.scope():
    tf.random.set_seed(config.seed)
    model = build_prior(config, num_embeddings)
    optimizer = train.Adam(config.learning_rate)
    optimizer.build(model.trainable_variables)
  step = tf.Variable(0, dtype=tf.int64, trainable=False)
  checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)
  checkpoints = os.path.join(workdir, "checkpoints")
  manager = tf.train.CheckpointManager(checkpoint, checkpoints, max_to_keep=3)
  start = train.restore_checkpoint(checkpoint, checkpoints)
  # Written once the workdir's checkpoint is known to fit this config.
  tf.io.gfile.makedirs(workdir)
  with tf.io.gfile.GFile(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config.to_json(indent=2))

  # A fixed shuffle seed and skipping the steps already taken give a resumed
  # run the same batches as an uninterrupted one.
  dataset = (tf.data.Dataset.from_tensor_slices(train_data)
             .shuffle(len(train_data["codes"]), seed=config.seed).repeat()
             .batch(config.batch_size, drop_remainder=True).skip(start)
             .prefetch(tf.data.AUTOTUNE))
  batches = iter(strategy.experimental_distribute_dataset(dataset))

  @tf.function
  def train_step(batch):

    def step_fn(codes, labels):
      with tf.GradientTape() as tape:
        loss = tf.reduce_mean(code_nll(model, codes, labels))
      # Dense: Adam's moments are dense; the embedding's gradient is sparse.
      grads = [tf.convert_to_tensor(g)
               for g in tape.gradient(loss, model.trainable_variables)]
      grads = tf.distribute.get_replica_context().all_reduce("mean", grads)
      optimizer.apply(grads, model.trainable_variables)
      return loss

    losses = strategy.run(step_fn, args=(batch["codes"], batch["labels"]))
    return strategy.reduce("mean", losses, axis=None)

  window, window_start, train_nll = [], time.time(), float("nan")
  for i in range(start + 1, config.num_steps + 1):
    window.append(train_step(next(batches)))
    last = i == config.num_steps
    if i % config.log_every == 0 or last:
      train_nll = float(np.mean(window))
      steps_per_sec = len(window) / (time.time() - window_start)
      logging.info("step %d/%d: train NLL %.4f nats/code, %.2f steps/s", i,
                   config.num_steps, train_nll, steps_per_sec)
      window, window_start = [], time.time()
    if i % config.checkpoint_every == 0 or last:
      step.assign(i)
      manager.save(checkpoint_number=i)
    if i % config.checkpoint_every == 0 and not last:
      # The CIFAR-10 subset is small: watch the test NLL for overfitting.
      logging.info("step %d: test NLL %.4f nats/code", i, evaluate(
          model, test_data, config.eval_batch_size)["nll_nats_per_code"])

  metrics = evaluate(model, test_data, config.eval_batch_size)
  metrics.update(
      step=int(step.numpy()), train_nll_nats_per_code=train_nll,
      unigram_nats_per_code=unigram_nll(train_data["codes"],
                                        test_data["codes"], num_embeddings))
  logging.info("Test: %s", metrics)
  with tf.io.gfile.GFile(os.path.join(workdir, METRICS_FILE), "w") as f:
    json.dump(metrics, f, indent=2)
  return metrics


def _data_options(config: ml_collections.ConfigDict,
                  vqvae_config: ml_collections.ConfigDict) -> Dict[str, object]:
  return {
      "dataset": vqvae_config.dataset,
      "data_dir": (vqvae_config.data_dir
                   if config.data_dir is None else config.data_dir),
      "download": (vqvae_config.download
                   if config.download is None else config.download),
  }


def train_prior(config: ml_collections.ConfigDict, vqvae_workdir: str,
                workdir: str) -> Dict[str, float]:
  """Encodes CIFAR-10 with a trained VQ-VAE and fits the prior to its codes.

  Args:
    config: a configs/prior.py config.
    vqvae_workdir: workdir of a `train.train_and_evaluate` run.
    workdir: the prior's workdir (see `train_on_codes`).

  Returns:
    The metrics of `train_on_codes`, also written to workdir/METRICS_FILE.
  """
  vqvae_config, vqvae = train.restore_model(vqvae_workdir)
  options = _data_options(config, vqvae_config)
  data = {
      split: encode_split(vqvae, split, batch_size=config.encode_batch_size,
                          **options) for split in ("train", "test")
  }
  logging.info("Encoded %d train and %d test images to %s code grids.",
               len(data["train"]["codes"]), len(data["test"]["codes"]),
               data["train"]["codes"].shape[1:])
  return train_on_codes(config, data["train"], data["test"],
                        vqvae_config.num_embeddings, workdir)


def restore_prior(workdir: str, num_embeddings: int
                  ) -> Tuple[ml_collections.ConfigDict, pixelcnn.GatedPixelCNN]:
  """Rebuilds the prior from a workdir's saved config and latest checkpoint.

  Raises:
    FileNotFoundError: if workdir holds no prior config or checkpoint.
  """
  config_path = os.path.join(workdir, CONFIG_FILE)
  latest = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
  if not tf.io.gfile.exists(config_path) or latest is None:
    raise FileNotFoundError(f"No trained prior in {workdir}; train it first.")
  with tf.io.gfile.GFile(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  model = build_prior(config, num_embeddings)
  tf.train.Checkpoint(model=model).restore(latest).expect_partial()
  return config, model


def sample_images(model: pixelcnn.GatedPixelCNN, vqvae: snt.Module, *,
                  num_samples: int, label: int, temperature: float,
                  seed: int) -> np.ndarray:
  """Samples code grids from the prior and decodes them with the VQ-VAE.

  Args:
    model: the prior.
    vqvae: a model with `encode` ([B, 32, 32, 3] images -> [B, H, W] codes) and
      `decode` (codes -> images).
    num_samples: images to draw.
    label: class of every sample; < 0 cycles through the classes for a
      class-conditional prior and is required for an unconditional one.
    temperature: sampling temperature (> 0).
    seed: sampling seed.

  Returns:
    [num_samples, 32, 32, 3] float32 images, nominally in [-0.5, 0.5].

  Raises:
    ValueError: if label is set for an unconditional prior or is no class.
  """
  if label >= CIFAR10_NUM_CLASSES or (label >= 0 and not model.num_classes):
    raise ValueError(f"sample_label {label} is not a class of this prior.")
  if not model.num_classes:
    labels = None
  elif label < 0:
    labels = np.arange(num_samples) % model.num_classes
  else:
    labels = label
  # The grid size is what the encoder makes of one image.
  height, width = vqvae.encode(tf.zeros([1, 32, 32, 3])).shape[1:]
  codes = model.sample(num_samples, height, width, labels=labels,
                       temperature=temperature, seed=seed)
  return vqvae.decode(codes).numpy()


def sample(config: ml_collections.ConfigDict, vqvae_workdir: str,
           workdir: str) -> str:
  """Draws images from the trained prior and saves them as a PNG grid.

  The prior is rebuilt from workdir's saved config; of config only the
  sampling fields (num_samples, temperature, sample_label, sample_seed) are
  used.

  Args:
    config: a configs/prior.py config.
    vqvae_workdir: workdir of the VQ-VAE the prior was trained on.
    workdir: the prior's workdir.

  Returns:
    Path of the PNG written in workdir: prior_samples.png, or
    prior_samples_class<label>.png for one class.
  """
  vqvae_config, vqvae = train.restore_model(vqvae_workdir)
  _, model = restore_prior(workdir, vqvae_config.num_embeddings)
  images = sample_images(model, vqvae, num_samples=config.num_samples,
                         label=config.sample_label,
                         temperature=config.temperature,
                         seed=config.sample_seed)
  suffix = f"_class{config.sample_label}" if config.sample_label >= 0 else ""
  path = os.path.join(workdir, f"prior_samples{suffix}.png")
  plotting.plot_image_grid(
      images, path,
      f"PixelCNN prior samples{suffix}, temperature {config.temperature}")
  logging.info("Wrote %s.", path)
  return path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  run = train_prior if FLAGS.mode == "train" else sample
  run(FLAGS.config, FLAGS.vqvae_workdir, FLAGS.workdir)


def _define_flags():
  # Only when run as a program, so importing this module next to others that
  # define a --workdir never defines a flag twice.
  flags.DEFINE_string("vqvae_workdir", None, "Trained VQ-VAE workdir.",
                      required=True)
  flags.DEFINE_string("workdir", None, "Prior workdir.", required=True)
  flags.DEFINE_enum("mode", "train", ["train", "sample"],
                    "train: fit and evaluate the prior; sample: write a PNG.")
  config_flags.DEFINE_config_dict("config", prior_config.get_config())


if __name__ == "__main__":
  _define_flags()
  app.run(main)
