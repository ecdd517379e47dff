"""Trains a gated PixelCNN prior over a trained VQ-VAE's code grids, samples it.

A VQ-VAE becomes a generative model once a prior over its discrete latents is
learned: the CIFAR-10 splits are encoded to [H, W] code grids once, a
`GatedPixelCNN` is fit to the train grids, and its test negative
log-likelihood is reported in nats per code and in bits per image dimension.
New images are drawn by sampling code grids and decoding them.

On a VQ-VAE-2 workdir (`num_levels` > 1) the prior is a `HierarchicalPrior`:
one PixelCNN per level, each finer level conditioned on the coarser codes,
trained together; its NLL is reported per level and in total, and sampling
runs top-down. A residual quantizer's stages (codes [H, W, S]) are modelled
the same way, as S grids of one size, stage s given stages 0 .. s - 1: its
metrics' level{s} is stage s. (One index per position, K**S codes, would
not fit a softmax for most residual quantizers.) FSQ and LFQ codes are
indices like a VQ's, over prod(levels) and 2**bits codes.

  python -m sonnet_vqvae.prior --vqvae_workdir DIR --workdir DIR2
  python -m sonnet_vqvae.prior --vqvae_workdir DIR --workdir DIR2 --mode=sample

Once a prior's workdir holds its run, `--workdir DIR2` alone resumes it (its
config and VQ-VAE workdir are in its run.json).
"""

import hashlib
import math
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np
import sonnet as snt
import tensorflow as tf

from sonnet_vqvae import cli
from sonnet_vqvae import configs
from sonnet_vqvae import distribute
from sonnet_vqvae import hierarchical_prior
from sonnet_vqvae import input_pipeline
from sonnet_vqvae import loop
from sonnet_vqvae import optim
from sonnet_vqvae import pixelcnn
from sonnet_vqvae import plotting
from sonnet_vqvae import rundir
from sonnet_vqvae import train
from sonnet_vqvae.configs import prior as prior_config

FLAGS = flags.FLAGS

CIFAR10_NUM_CLASSES = 10
CIFAR10_IMAGE_DIMS = 32 * 32 * 3
# The prior's run files are the VQ-VAE's (see `loop`): run.json, eval.json.
METRICS_FILE = loop.EVAL_FILE
# The config keys of the model: its checkpoints depend on them.
_MODEL_KEYS = ("hidden_channels", "num_layers", "kernel_size",
               "class_conditional")

# A plain VQ-VAE's codebook size and [N, H, W] codes, or a VQ-VAE-2's list
# (top first) of sizes and tuple of code arrays.
NumEmbeddings = Union[int, Sequence[int]]
Prior = Union[pixelcnn.GatedPixelCNN, hierarchical_prior.HierarchicalPrior]


def build_prior(config: ml_collections.ConfigDict,
                num_embeddings: NumEmbeddings) -> Prior:
  """Builds the prior described by config over num_embeddings codes.

  An int gives the `GatedPixelCNN` of a plain VQ-VAE's codes; a list (top
  first) gives the `HierarchicalPrior` of a VQ-VAE-2's levels.
  """
  kwargs = dict(
      hidden_channels=config.hidden_channels,
      num_layers=config.num_layers,
      kernel_size=config.kernel_size,
      num_classes=CIFAR10_NUM_CLASSES if config.class_conditional else None)
  if isinstance(num_embeddings, int):
    return pixelcnn.GatedPixelCNN(num_embeddings=num_embeddings, **kwargs)
  return hierarchical_prior.HierarchicalPrior(num_embeddings, **kwargs)


def _levels(codes) -> List[Any]:
  """A plain VQ-VAE's codes as a one-level list; a VQ-VAE-2's as they are."""
  return list(codes) if isinstance(codes, (list, tuple)) else [codes]


def num_stages(vqvae: snt.Module) -> int:
  """A plain VQ-VAE's residual stages S (its codes are [B, H, W, S]), or 0."""
  if hasattr(vqvae, "quantizers"):  # VQ-VAE-2: no residual levels.
    return 0
  return int(getattr(vqvae.quantizer, "num_stages", 0))


def code_grids(vqvae: snt.Module, codes) -> List[tf.Tensor]:
  """The [B, H, W] grids the prior models, of `vqvae.encode`'s codes.

  A VQ-VAE's one grid, a VQ-VAE-2's levels (top first), or a residual
  quantizer's [B, H, W, S] codes as S grids, stage 0 first: the prior models
  the stages as a VQ-VAE-2's levels on one grid size, each stage given the
  ones before it.
  """
  if num_stages(vqvae):
    return tf.unstack(codes, axis=-1)
  return _levels(codes)


def model_codes(vqvae: snt.Module, grids: Sequence[tf.Tensor]):
  """`code_grids`' inverse: what `vqvae.decode` takes."""
  if num_stages(vqvae):
    return tf.stack(grids, axis=-1)
  return list(grids) if hasattr(vqvae, "quantizers") else grids[0]


def grid_num_embeddings(vqvae: snt.Module) -> NumEmbeddings:
  """The codes of each grid of `code_grids` (an int if there is one grid)."""
  stages = num_stages(vqvae)
  if stages > 1:
    return [int(vqvae.quantizer.num_embeddings)] * stages
  if hasattr(vqvae, "quantizers") and len(vqvae.quantizers) > 1:
    return [int(q.num_embeddings) for q in vqvae.quantizers]
  return int(vqvae.quantizer.num_embeddings)


def code_nll(model: Prior, codes, labels: tf.Tensor):
  """Negative log-likelihood of every code given the codes before it.

  Args:
    model: the prior.
    codes: [B, H, W] int code grids, or for a `HierarchicalPrior` each
      level's grids, top first.
    labels: [B] int class labels, ignored by an unconditional model.

  Returns:
    [B, H, W] float32 nats, or for a `HierarchicalPrior` a list of each
    level's (given the coarser levels).
  """
  logits = model(codes, labels if model.num_classes else None)
  nll = [tf.nn.sparse_softmax_cross_entropy_with_logits(labels=c, logits=l)
         for c, l in zip(_levels(codes), _levels(logits))]
  hierarchical_ = isinstance(model, hierarchical_prior.HierarchicalPrior)
  return nll if hierarchical_ else nll[0]


# Traced by tf.data: no AutoGraph rewrite needed (see input_pipeline._scale).
@tf.autograph.experimental.do_not_convert
def _image_and_label(example):
  return {k: example[k] for k in ("image", "label")}


def encode_split(vqvae: snt.Module, split: str, *, batch_size: int,
                 dataset: str, data_dir: Optional[str], download: bool,
                 strategy: Optional[tf.distribute.Strategy] = None
                 ) -> Dict[str, np.ndarray]:
  """Encodes a dataset split to code grids with a VQ-VAE.

  Args:
    vqvae: a model with `encode(images [B, 32, 32, 3]) -> [B, H, W]` indices
      (a VQ-VAE-2: a list of each level's, top first; a residual
      quantizer's [B, H, W, S]: see `code_grids`).
    split: tfds split name.
    batch_size: images per encoder call (the last batch padded: one trace).
    dataset: tfds dataset name (the VQ-VAE's, e.g. "cifar10").
    data_dir: tfds data directory.
    download: whether tfds may download the data.
    strategy: the strategy the VQ-VAE's variables were created under; the
      batches are split over its replicas (`distribute.run_batches`).
      Default: the current one.

  Returns:
    {'codes': [N, H, W] int32 indices (several grids, a VQ-VAE-2's levels
    or residual stages: a tuple, see `code_grids`), 'labels': [N] int32
    class labels}.
  """
  batches = input_pipeline.padded_batches(input_pipeline.load_split(
      split, dataset=dataset, data_dir=data_dir, download=download).map(
          _image_and_label), batch_size)

  def encode(batch, unused_mask):
    return {}, (code_grids(vqvae, vqvae.encode(batch["image"])),
                batch["label"])

  codes, labels = [], []
  with input_pipeline.naming_corrupt_files(split, dataset=dataset,
                                           data_dir=data_dir):
    for _, (grids, batch_labels), mask in distribute.run_batches(
        strategy or tf.distribute.get_strategy(), encode,
        batches.prefetch(tf.data.AUTOTUNE), vqvae.variables, "The VQ-VAE",
        key=("prior.encode_split", vqvae)):  # Both splits: one trace.
      real = mask.numpy()
      codes.append([c.numpy()[real] for c in grids])
      labels.append(batch_labels.numpy()[real])
  levels = tuple(np.concatenate(level).astype(np.int32)
                 for level in zip(*codes))
  return {"codes": levels if len(levels) > 1 else levels[0],
          "labels": np.concatenate(labels).astype(np.int32)}


def _per_level(metrics: Dict[str, List[float]],
               codes: Sequence[np.ndarray]) -> Dict[str, float]:
  """Per-code values of each level, named as a plain prior's if one level.

  Args:
    metrics: {name: each level's nats per code}.
    codes: each level's [N, H_i, W_i] codes (their sizes weigh the levels).

  Returns:
    For one level {name: nats per code}. For several, also
    level{i}_{name} for each level (top is level 0) and {name} the mean
    over all codes of the image, e.g. nll_nats_per_code.
  """
  sizes = [c.size for c in codes]
  out = {name: sum(v * n for v, n in zip(values, sizes)) / sum(sizes)
         for name, values in metrics.items()}
  if len(codes) > 1:
    for name, values in metrics.items():
      out.update({f"level{i}_{name}": v for i, v in enumerate(values)})
  return out


def bits_per_dim(nats_per_code: float, codes) -> float:
  """Nats per code of an image's codes in bits per CIFAR-10 image dimension.

  Args:
    nats_per_code: mean over all the image's codes (every level's).
    codes: [N, H, W] codes, or each level's (see `encode_split`).
  """
  codes_per_image = sum(int(np.prod(c.shape[1:])) for c in _levels(codes))
  return nats_per_code * codes_per_image / CIFAR10_IMAGE_DIMS / math.log(2)


def evaluate(model: Prior, data: Dict[str, Any], batch_size: int,
             strategy: Optional[tf.distribute.Strategy] = None
             ) -> Dict[str, float]:
  """Test likelihood of code grids under the prior and the uniform baseline.

  Args:
    model: the prior.
    data: {'codes': [N, H, W] (a VQ-VAE-2: each level's, top first),
      'labels': [N]} as from `encode_split`.
    batch_size: grids per forward pass (the last batch padded: one trace).
    strategy: the strategy the prior's variables were created under; the
      batches are split over its replicas (`distribute.run_batches`).
      Default: the current one.

  Returns:
    A dict with
      nll_nats_per_code: mean negative log-likelihood per code.
      bits_per_dim: total nats of a grid / CIFAR10_IMAGE_DIMS / ln 2: the
        prior's cost of an image's codes per image dimension. The decoder's
        reconstruction term, which the VQ-VAE paper's 4.67 bits/dim
        includes, is not part of it.
      uniform_nats_per_code: log K, the cost of a uniform prior.
      uniform_bits_per_dim: the same in bits per image dimension.
    A VQ-VAE-2's prior adds level{i}_nll_nats_per_code and
    level{i}_uniform_nats_per_code of every level (top: level 0, given
    nothing; each finer one given the coarser levels); the totals above are
    over all levels' codes of an image.
  """
  dataset = input_pipeline.padded_batches(
      tf.data.Dataset.from_tensor_slices(data), batch_size)

  def total_nll(batch, mask):
    nll = _levels(code_nll(model, batch["codes"], batch["labels"]))
    return tf.stack([tf.reduce_sum(tf.where(mask, tf.reduce_sum(n, [1, 2]),
                                            0.)) for n in nll]), {}

  # float32 per batch on the devices, float64 over the batches.
  totals = sum(np.asarray(totals, np.float64)
               for totals, _, _ in distribute.run_batches(
                   strategy or tf.distribute.get_strategy(), total_nll,
                   dataset, model.variables, "The prior",
                   # Every validation of a run: one trace.
                   key=("prior.evaluate", model)))
  codes = _levels(data["codes"])
  metrics = _per_level(
      {"nll_nats_per_code": [t / c.size for t, c in zip(totals, codes)],
       "uniform_nats_per_code": [
           math.log(k) for k in _levels(model.num_embeddings)]}, codes)
  metrics["bits_per_dim"] = bits_per_dim(metrics["nll_nats_per_code"], codes)
  metrics["uniform_bits_per_dim"] = bits_per_dim(
      metrics["uniform_nats_per_code"], codes)
  return {key: float(value) for key, value in metrics.items()}


def unigram_nll(train_codes: np.ndarray, test_codes: np.ndarray,
                num_embeddings: int) -> float:
  """Nats per test code under the train codes' add-one smoothed frequencies.

  The baseline a prior must beat to have learned more than which codes the
  VQ-VAE uses: it ignores every code's neighbours.
  """
  counts = np.bincount(train_codes.ravel(), minlength=num_embeddings) + 1.0
  log_probs = np.log(counts / counts.sum())
  return float(-log_probs[test_codes.ravel()].mean())


def unigram_metrics(train_codes, test_codes,
                    num_embeddings: NumEmbeddings) -> Dict[str, float]:
  """`unigram_nll` of every level as unigram_nats_per_code (see `_per_level`).

  Also unigram_bits_per_dim, the frequency baseline's image cost.
  """
  tests = _levels(test_codes)
  metrics = _per_level({"unigram_nats_per_code": [
      unigram_nll(train, test, k) for train, test, k in zip(
          _levels(train_codes), tests, _levels(num_embeddings))]}, tests)
  metrics["unigram_bits_per_dim"] = bits_per_dim(
      metrics["unigram_nats_per_code"], test_codes)
  return metrics


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for a prior config that cannot work, before any work.

  Unknown keys (typos; the error names the nearest valid ones), sizes,
  steps and intervals that are not positive, a learning rate or temperature
  that is not a positive finite number, an unknown strategy, jit_compile or
  steps_per_loop.
  """
  configs.check_keys(config, prior_config.get_config())
  for key in ("hidden_channels", "num_layers", "kernel_size", "batch_size",
              "num_steps", "log_every", "checkpoint_every",
              "max_checkpoints_to_keep", "encode_batch_size",
              "eval_batch_size", "num_samples"):
    if not config[key] > 0:
      raise ValueError(f"config.{key} must be positive, got {config[key]}.")
  for key in ("learning_rate", "temperature"):
    if not (math.isfinite(config[key]) and config[key] > 0):
      raise ValueError(f"config.{key} must be a positive finite number, got "
                       f"{config[key]}.")
  distribute.check_strategy_name(config.strategy)
  loop.check_loop_config(config)


def fingerprint(config: ml_collections.ConfigDict,
                num_embeddings: NumEmbeddings,
                code_shape: Sequence[Any],
                vqvae: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
  """What a prior's checkpoints depend on: its model and the codes it models.

  Args:
    config: the prior's config.
    num_embeddings: K, the number of codes (a VQ-VAE-2: each level's).
    code_shape: [H, W] of a code grid (a VQ-VAE-2: each level's).
    vqvae: the VQ-VAE the codes come from (see `vqvae_provenance`), or None
      for codes from elsewhere.
  """
  if isinstance(num_embeddings, int):
    sizes, shape = int(num_embeddings), [int(n) for n in code_shape]
  else:
    sizes = [int(k) for k in num_embeddings]
    shape = [[int(n) for n in level] for level in code_shape]
  return {
      "model": {key: config[key] for key in _MODEL_KEYS},
      "num_embeddings": sizes,
      "code_shape": shape,
      "vqvae": None if vqvae is None else dict(vqvae),
  }


def _code_shape(codes) -> Any:
  """[H, W] of [N, H, W] codes; a VQ-VAE-2's tuple: each level's."""
  if isinstance(codes, (list, tuple)):
    return [c.shape[1:] for c in codes]
  return codes.shape[1:]


def vqvae_provenance(vqvae: snt.Module, step: int) -> Dict[str, Any]:
  """Identifies a trained VQ-VAE: its checkpoint step and codebook hash.

  The hash (of every level's codebook, top first, for a VQ-VAE-2) tells two
  VQ-VAEs apart even when their configs, data and steps agree (another seed)
  or when a workdir was moved. Quantizers without an `embeddings` codebook
  (residual, FSQ, LFQ) hash every variable of the model instead: the
  encoder's weights say which codes an image gets.
  """
  quantizers_ = getattr(vqvae, "quantizers", [vqvae.quantizer])
  if all(hasattr(q, "embeddings") for q in quantizers_):
    variables = [q.embeddings for q in quantizers_]
  else:
    variables = vqvae.variables
  digest = hashlib.sha256()
  for variable in variables:
    digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
  return {"step": int(step), "codebook_sha256": digest.hexdigest()}


def train_on_codes(config: ml_collections.ConfigDict,
                   train_data: Dict[str, Any],
                   test_data: Dict[str, Any], num_embeddings: NumEmbeddings,
                   workdir: str,
                   vqvae: Optional[Mapping[str, Any]] = None,
                   metadata: Optional[Mapping[str, Any]] = None
                   ) -> Dict[str, float]:
  """Fits the prior to code grids; checkpoints, resumes and evaluates.

  Runs on `loop`'s machinery, as the VQ-VAE's training does: the workdir is
  locked, a resume must match the stored run, rows go to metrics.jsonl and
  a non-finite loss stops training with the last good checkpoint kept.

  Args:
    config: a configs/prior.py config.
    train_data: {'codes': [N, H, W], 'labels': [N]} to train on; for a
      VQ-VAE-2 'codes' is a tuple of each level's grids, top first.
    test_data: the same for evaluation.
    num_embeddings: K, the codebook size; for a VQ-VAE-2 a list of each
      level's (a `HierarchicalPrior` is trained).
    workdir: where checkpoints, run.json, metrics.jsonl and eval.json go; a
      run resumes from its latest checkpoint.
    vqvae: the VQ-VAE the codes come from (`vqvae_provenance`), part of the
      run's fingerprint: a resume on other codes is an error.
    metadata: more entries for run.json (e.g. the VQ-VAE's workdir).

  Returns:
    The `evaluate` metrics on test_data plus `step`, the frequency
    baseline's `unigram_*` (see `unigram_metrics`) and
    `train_nll_nats_per_code` (mean over the last logged window), also
    written to workdir/eval.json.

  Raises:
    ValueError: for a bad config, or a batch that does not split evenly over
      the replicas.
    rundir.RunDirError: the workdir is in use, holds another run
      (`rundir.FingerprintMismatch`) or checkpoints that cannot be restored.
    FloatingPointError: for a non-finite loss or test metric.
  """
  validate_config(config)
  # The process's one strategy of this name, shared with `train`: a second
  # strategy over the same devices would reuse its collective keys.
  strategy = distribute.make_strategy(config.strategy)
  distribute.check_batch_size(config.batch_size, strategy)
  print_ = fingerprint(config, num_embeddings, _code_shape(train_data["codes"]),
                       vqvae)
  run_dir, stored = loop.open_run(workdir, print_)
  with run_dir:  # Releases the workdir's lock however training ends.
    tf.random.set_seed(config.seed)
    with strategy.scope(), tf.variable_creator_scope(
        distribute.replica_consistent_variables):
      model = build_prior(config, num_embeddings)
      optimizer = optim.Adam(config.learning_rate)
      optimizer.build(model.trainable_variables)
    checkpoint = tf.train.Checkpoint(
        model=model, optimizer=optimizer,
        step=tf.Variable(0, dtype=tf.int64, trainable=False))
    checkpoints = loop.checkpoints_of(run_dir, checkpoint, strategy,
                                      config.max_checkpoints_to_keep)
    start = loop.restore(run_dir, checkpoints, stored)
    distribute.check_same_step(start, strategy)  # Workers share one workdir.
    logging.info("Training the prior from step %d to %d on %d replica(s).",
                 start, config.num_steps, strategy.num_replicas_in_sync)

    # A fixed shuffle seed and skipping the steps already taken give a
    # resumed run the same batches as an uninterrupted one.
    dataset = (tf.data.Dataset.from_tensor_slices(train_data)
               .shuffle(len(train_data["labels"]), seed=config.seed).repeat()
               .batch(config.batch_size, drop_remainder=True).skip(start)
               .prefetch(tf.data.AUTOTUNE))
    train_loop = loop.select_loop(
        _make_replica_step(model, optimizer), strategy,
        iter(strategy.experimental_distribute_dataset(dataset)),
        config.jit_compile, config.num_steps - start)

    def validate(step):
      # The CIFAR-10 subset is small: watch the test NLL for overfitting.
      logging.info("step %d: test NLL %.4f nats/code", step, evaluate(
          model, test_data, config.eval_batch_size,
          strategy)["nll_nats_per_code"])

    loop.run(train_loop, run_dir=run_dir,
             checkpoints=checkpoints, start_step=start,
             num_steps=config.num_steps, log_every=config.log_every,
             checkpoint_every=config.checkpoint_every,
             steps_per_loop=config.steps_per_loop,
             metadata={"config": config.to_dict(), **(metadata or {})},
             fingerprint=print_,
             describe=lambda row: f"train NLL {row['loss']:.4f} nats/code",
             summary_prefix="prior", after_checkpoint=validate,
             stop_on_signals=not distribute.is_multi_worker(strategy))
    loop.remove_scratch(checkpoints)
    if not run_dir.writer:
      return {}
    rows = run_dir.read_rows(loop.METRICS_FILE)
    metrics = evaluate(model, test_data, config.eval_batch_size, strategy)
    metrics.update(
        step=max(start, config.num_steps),
        train_nll_nats_per_code=rows[-1]["loss"] if rows else None,
        **unigram_metrics(train_data["codes"], test_data["codes"],
                          num_embeddings))
    logging.info("Test: %s", metrics)
    loop.write_eval(run_dir, metrics)
  return metrics


def _make_replica_step(model: Prior, optimizer: optim.Adam):
  """Returns replica_step(batch) -> {'loss': mean NLL in nats/code}.

  A VQ-VAE-2's loss is the mean over every level's codes (so the total NLL
  of an image, per code); level{i}_nll adds each level's mean to the rows.
  """

  def replica_step(batch):
    with tf.GradientTape() as tape:
      nll = _levels(code_nll(model, batch["codes"], batch["labels"]))
      loss = (tf.add_n([tf.reduce_sum(n) for n in nll]) /
              sum(n.shape.num_elements() for n in nll))
    # Dense: Adam's moments are dense; the embedding's gradient is sparse.
    grads = [tf.convert_to_tensor(g)
             for g in tape.gradient(loss, model.trainable_variables)]
    loss = loop.update(optimizer, model.trainable_variables, grads, loss)
    levels = ({f"level{i}_nll": tf.reduce_mean(n) for i, n in enumerate(nll)}
              if len(nll) > 1 else {})
    return dict(loop.mean_over_replicas(levels), loss=loss)

  return replica_step


def _data_options(config: ml_collections.ConfigDict,
                  vqvae_config: ml_collections.ConfigDict) -> Dict[str, object]:
  return {
      "dataset": vqvae_config.dataset,
      "data_dir": (vqvae_config.data_dir
                   if config.data_dir is None else config.data_dir),
      "download": (vqvae_config.download
                   if config.download is None else config.download),
  }


def _latest_vqvae_step(vqvae_workdir: str) -> int:
  step = rundir.latest_step(
      os.path.join(vqvae_workdir, loop.CHECKPOINT_DIR))
  if step is None:
    raise FileNotFoundError(
        f"No VQ-VAE checkpoint in {vqvae_workdir!r}: train one with "
        "`python -m sonnet_vqvae.train --workdir DIR` first.")
  return step


def train_prior(config: ml_collections.ConfigDict, vqvae_workdir: str,
                workdir: str) -> Dict[str, float]:
  """Encodes CIFAR-10 with a trained VQ-VAE and fits the prior to its codes.

  Args:
    config: a configs/prior.py config.
    vqvae_workdir: workdir of a `train.train_and_evaluate` run; its newest
      checkpoint encodes the data, and the prior's run records which one.
    workdir: the prior's workdir (see `train_on_codes`).

  Returns:
    The metrics of `train_on_codes`, also written to workdir/eval.json.
  """
  validate_config(config)
  step = _latest_vqvae_step(vqvae_workdir)
  # Under the process's one strategy of this name, `train_on_codes`' too:
  # the encoding runs on its devices.
  strategy = distribute.make_strategy(config.strategy)
  vqvae_config, vqvae = train.restore_model(vqvae_workdir, step, strategy)
  options = _data_options(config, vqvae_config)
  # The VQ-VAE's evaluation split (.get: runs from before eval_split) is the
  # prior's "test" data.
  splits = {"train": "train", "test": vqvae_config.get("eval_split", "test")}
  data = {
      name: encode_split(vqvae, split, batch_size=config.encode_batch_size,
                         strategy=strategy, **options)
      for name, split in splits.items()
  }
  logging.info("Encoded %d train and %d test images to %s code grids.",
               len(data["train"]["labels"]), len(data["test"]["labels"]),
               _code_shape(data["train"]["codes"]))
  # Several grids (levels, residual stages) get one PixelCNN each.
  num_embeddings = grid_num_embeddings(vqvae)
  return train_on_codes(
      config, data["train"], data["test"], num_embeddings,
      workdir, vqvae=vqvae_provenance(vqvae, step),
      metadata={"vqvae_workdir": os.path.abspath(vqvae_workdir)})


def restore_prior(workdir: str, num_embeddings: Optional[NumEmbeddings] = None,
                  strategy: Optional[tf.distribute.Strategy] = None
                  ) -> Tuple[ml_collections.ConfigDict, Prior]:
  """Rebuilds the prior from a workdir's run.json and newest checkpoint.

  Args:
    workdir: a `train_on_codes` / `train_prior` run's workdir.
    num_embeddings: K (a VQ-VAE-2's prior: each level's); None takes the
      run's.
    strategy: the strategy to build it under, so that `evaluate` and
      `sample_images` run on its devices; default: the current one.

  Raises:
    FileNotFoundError: if workdir holds no prior run or checkpoint.
    rundir.RunDirError: if its checkpoint cannot be restored.
    ValueError: if num_embeddings differs from the run's.
  """
  stored = _prior_run(workdir)
  config = ml_collections.ConfigDict(stored["config"])
  print_ = stored["fingerprint"]
  if num_embeddings is not None and num_embeddings != print_["num_embeddings"]:
    raise ValueError(
        f"The prior in {workdir!r} models {print_['num_embeddings']} codes, "
        f"not {num_embeddings}.")
  # Its variables exist from the constructor, so that a mismatch is caught;
  # the optimizer's too, so that the checkpoint restores whole.
  with (strategy or tf.distribute.get_strategy()).scope(), \
      tf.variable_creator_scope(distribute.replica_consistent_variables):
    model = build_prior(config, print_["num_embeddings"])
    optimizer = optim.Adam(config.learning_rate)
    optimizer.build(model.trainable_variables)
  checkpoint = tf.train.Checkpoint(
      model=model, optimizer=optimizer,
      step=tf.Variable(0, dtype=tf.int64, trainable=False))
  # Read only: sampling and export never write the prior's workdir.
  directory = os.path.join(workdir, loop.CHECKPOINT_DIR)
  if not rundir.restore_newest(checkpoint, directory):
    raise FileNotFoundError(f"No checkpoint in {directory!r}.")
  return config, model


def _prior_run(workdir: str) -> Dict[str, Any]:
  stored = loop.read_run(workdir)
  if stored is None or "num_embeddings" not in stored["fingerprint"]:
    raise FileNotFoundError(
        f"No trained prior in {workdir!r} (no prior {loop.RUN_FILE}); train "
        "it first with `python -m sonnet_vqvae.prior`.")
  return stored


def restore_vqvae_of_prior(
    workdir: str, vqvae_workdir: str,
    strategy: Optional[tf.distribute.Strategy] = None
) -> Tuple[ml_collections.ConfigDict, snt.Module]:
  """The VQ-VAE checkpoint whose codes the prior in `workdir` was trained on.

  Built under `strategy` (default: the current one), see
  `train.restore_model`.

  Raises:
    rundir.FingerprintMismatch: `vqvae_workdir` does not hold that VQ-VAE
      (another run, or that checkpoint is gone).
  """
  recorded = _prior_run(workdir)["fingerprint"]["vqvae"]
  if recorded is None:
    raise ValueError(f"The prior in {workdir!r} was trained on codes of no "
                     "recorded VQ-VAE; use `sample_images` with your model.")
  try:
    vqvae_config, vqvae = train.restore_model(vqvae_workdir, recorded["step"],
                                              strategy)
  except (FileNotFoundError, rundir.RunDirError) as e:
    raise rundir.FingerprintMismatch(
        f"The prior in {workdir!r} was trained on the codes of VQ-VAE "
        f"checkpoint step {recorded['step']}, which {vqvae_workdir!r} cannot "
        f"provide ({e}). Pass the VQ-VAE workdir the prior was trained on."
    ) from e
  found = vqvae_provenance(vqvae, recorded["step"])
  if found != recorded:
    raise rundir.FingerprintMismatch(
        f"The prior in {workdir!r} was trained on the codes of another "
        f"VQ-VAE: codebook_sha256 {recorded['codebook_sha256'][:12]}... at "
        f"step {recorded['step']} in its run.json, "
        f"{found['codebook_sha256'][:12]}... in {vqvae_workdir!r}. Pass the "
        "VQ-VAE workdir the prior was trained on, or train a prior on this "
        "one.")
  return vqvae_config, vqvae


def sample_images(model: Prior, vqvae: snt.Module, *,
                  num_samples: int, label: int, temperature: float,
                  seed: int, strategy: Optional[tf.distribute.Strategy] = None
                  ) -> np.ndarray:
  """Samples code grids from the prior and decodes them with the VQ-VAE.

  Drawing and decoding run on the strategy's devices, the samples split
  over its replicas (`distribute.run_batches`); on one device the draws are
  `model.sample`'s with the same seed. With R > 1 replicas, replica r draws
  its samples with the seed folded with r: the same seed and R give the same
  images.

  Args:
    model: the prior.
    vqvae: a model with `encode` ([B, 32, 32, 3] images -> [B, H, W] codes;
      a VQ-VAE-2: each level's, top first) and `decode` (codes -> images).
      A VQ-VAE-2's levels are drawn top-down, each given the coarser ones.
    num_samples: images to draw.
    label: class of every sample; < 0 cycles through the classes for a
      class-conditional prior and is required for an unconditional one.
    temperature: sampling temperature (> 0).
    seed: sampling seed.
    strategy: the strategy both models' variables were created under;
      default: the current one.

  Returns:
    [num_samples, 32, 32, 3] float32 images, nominally in [-0.5, 0.5].

  Raises:
    ValueError: if label is set for an unconditional prior or is no class,
      for a temperature that is not a positive finite number, or models whose
      variables are not the strategy's.
  """
  if label >= CIFAR10_NUM_CLASSES or (label >= 0 and not model.num_classes):
    raise ValueError(f"sample_label {label} is not a class of this prior.")
  pixelcnn.check_positive(num_samples=num_samples)
  if not model.num_classes:
    labels = None
  elif label < 0:
    labels = np.arange(num_samples) % model.num_classes
  else:
    labels = label
  labels, temperature = pixelcnn.sampling_args(num_samples, labels,
                                               model.num_classes, temperature)
  # The grid sizes are what the encoder makes of one image: traced, not run.
  # (code_grids inside the trace: a residual's unstack needs a graph tensor.)
  shapes = [tuple(c.shape[1:]) for c in tf.function(
      lambda images: code_grids(vqvae, vqvae.encode(images)), autograph=False
  ).get_concrete_function(tf.TensorSpec([1, 32, 32, 3], tf.float32)
                          ).structured_outputs]
  hierarchical_ = isinstance(model, hierarchical_prior.HierarchicalPrior)

  def draw(labels, unused_mask):
    context = tf.distribute.get_replica_context()
    replica_seed = tf.constant([seed, 0], tf.int64)
    if context.num_replicas_in_sync > 1:  # One device: `model.sample`'s.
      replica_seed = tf.random.experimental.stateless_fold_in(
          replica_seed, context.replica_id_in_sync_group)
    count, labels = labels.shape[0], labels if model.num_classes else None
    if hierarchical_:
      codes = model.sample_graph(count, shapes, labels, temperature,
                                 replica_seed)
    else:
      codes = [model.sample_graph(count, *shapes[0], labels, temperature,
                                  replica_seed)]
    return {}, vqvae.decode(model_codes(vqvae, codes))

  # One batch of every sample's label (zeros for an unconditional prior).
  batches = input_pipeline.padded_batches(tf.data.Dataset.from_tensor_slices(
      tf.zeros([num_samples], tf.int32) if labels is None else labels),
                                          num_samples)
  [(_, images, mask)] = list(distribute.run_batches(
      strategy or tf.distribute.get_strategy(), draw, batches,
      list(model.variables) + list(vqvae.variables), "The prior or VQ-VAE"))
  return images.numpy()[mask.numpy()]


def sample(config: ml_collections.ConfigDict, vqvae_workdir: str,
           workdir: str) -> str:
  """Draws images from the trained prior and saves them as a PNG grid.

  The prior is rebuilt from workdir's saved config; of config only the
  sampling fields (num_samples, temperature, sample_label, sample_seed) are
  used. The VQ-VAE is the checkpoint the prior was trained on, checked by its
  codebook's hash.

  Args:
    config: a configs/prior.py config.
    vqvae_workdir: workdir of the VQ-VAE the prior was trained on.
    workdir: the prior's workdir.

  Raises:
    rundir.FingerprintMismatch: vqvae_workdir holds another VQ-VAE.

  Returns:
    Path of the PNG written in workdir: prior_samples.png, or
    prior_samples_class<label>.png for one class.
  """
  validate_config(config)
  # Reads only: one worker draws, on its devices.
  strategy = distribute.evaluation_strategy(
      distribute.make_strategy(config.strategy))
  _, vqvae = restore_vqvae_of_prior(workdir, vqvae_workdir, strategy)
  _, model = restore_prior(workdir, strategy=strategy)
  images = sample_images(model, vqvae, num_samples=config.num_samples,
                         label=config.sample_label,
                         temperature=config.temperature,
                         seed=config.sample_seed, strategy=strategy)
  suffix = f"_class{config.sample_label}" if config.sample_label >= 0 else ""
  path = os.path.join(workdir, f"prior_samples{suffix}.png")
  with rundir.RunDir(workdir):  # Locked while it writes.
    plotting.plot_image_grid(
        images, path,
        f"PixelCNN prior samples{suffix}, temperature {config.temperature}")
  logging.info("Wrote %s.", path)
  return path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  # `prior --workdir W` alone resumes W's stored config and VQ-VAE.
  stored = _stored_prior_run(FLAGS.workdir)
  config = configs.for_run(FLAGS["config"], stored and stored["config"],
                           os.path.join(FLAGS.workdir, loop.RUN_FILE))
  validate_config(config)  # Before any work.
  vqvae_workdir = FLAGS.vqvae_workdir or (stored or {}).get("vqvae_workdir")
  if not vqvae_workdir:
    sys.exit(f"prior: --vqvae_workdir is needed: {FLAGS.workdir} holds no "
             "prior run that records its VQ-VAE.")
  run = train_prior if FLAGS.mode == "train" else sample
  with loop.exit_when_stopped("prior"):
    run(config, vqvae_workdir, FLAGS.workdir)


def _stored_prior_run(workdir: str) -> Optional[Dict[str, Any]]:
  """The prior run stored in `workdir`, None if there is none (or another)."""
  stored = loop.read_run(workdir)
  if stored is None or "num_embeddings" not in stored["fingerprint"]:
    return None  # A VQ-VAE's workdir fails later, naming the difference.
  return stored


def _define_flags():
  # Only when run as a program, so importing this module next to others that
  # define a --workdir never defines a flag twice.
  flags.DEFINE_string(
      "vqvae_workdir", None,
      "Trained VQ-VAE workdir; by default the one the prior in --workdir "
      "was trained on.")
  flags.DEFINE_string("workdir", None, "Prior workdir.", required=True)
  flags.DEFINE_enum("mode", "train", ["train", "sample"],
                    "train: fit and evaluate the prior; sample: write a PNG.")
  config_flags.DEFINE_config_file(
      "config",
      os.path.join(os.path.dirname(__file__), "configs", "prior.py"),
      "Prior configuration: a preset's name (prior) or a file's path. "
      "Without it, a workdir holding a prior run resumes its config, with "
      "the --config.key=value overrides given.", lock_config=True)


if __name__ == "__main__":
  try:  # --config=prior: a preset by name, from any directory.
    sys.argv = configs.resolve_config_flag(sys.argv)
  except ValueError as e:
    sys.exit(f"prior: {e}")
  configs.exit_on_unknown_override(sys.argv, "config",
                                   prior_config.get_config())
  _define_flags()
  cli.run(main)
