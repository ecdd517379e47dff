r"""Checks that training works on this machine or runtime, one line per check.

Run it first on a new machine or Colab runtime (CPU, GPU or TPU), and paste
its output into bug reports:

    python -m sonnet_vqvae.doctor                     # what "auto" picks
    python -m sonnet_vqvae.doctor --logical_cpus=2    # 2 replicas on a CPU
    python -m sonnet_vqvae.doctor --data_dir=DIR      # tfds CIFAR-10, not synthetic

It prints the versions, the CPU and its flags, the devices, the strategy and
precision that "auto" picks and why, then one line per check, PASS or FAIL:

* strategy: the strategy builds (on TPUs: TPU devices are listed after init);
* train: a short run of the default model lowers the loss, with steps/s;
* replicas: every replica holds the same variables after it (several
  replicas only; SKIP otherwise);
* codes: the quantizer's codes, computed on the strategy's devices, equal a
  NumPy float64 nearest-code search on a sample (codes within float32
  rounding of the nearest count as equal).

The exit code is 1 when a check fails. It takes under a minute on 2 CPU
cores.
"""

import json
import os
import sys
import time
import traceback
from typing import Callable, List, Tuple

from absl import app
from absl import flags
from absl import logging
import numpy as np

from sonnet_vqvae import cli

_STRATEGY = flags.DEFINE_string(
    "strategy", None, "Strategy to check (see distribute.STRATEGIES); "
    "default: 'replicator' with --logical_cpus, else 'auto'.")
_LOGICAL_CPUS = flags.DEFINE_integer(
    "logical_cpus", 0, "Split the CPU into this many logical devices (e.g. 2, "
    "to check several replicas on a machine without accelerators).")
_STEPS = flags.DEFINE_integer("steps", 30, "Training steps of the run.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 32, "Global batch (the default config's).")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "tfds data directory holding cifar10; default: "
    "synthetic images (no download).")

# A chosen code counts as the nearest when its float64 distance is within
# this relative margin of the float64 minimum: float32 rounding of the
# distances cannot tell such codes apart (a bfloat16 search misses by
# percents).
_TIE_TOLERANCE = 1e-5


def _synthetic_images(count: int, seed: int = 0) -> np.ndarray:
  """[count, 32, 32, 3] smooth random images in [-0.5, 0.5], learnable fast."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(-0.5, 0.5, size=(count, 4, 4, 3))
  # Nearest-neighbour upsampling x8: blocks the model reconstructs early.
  return np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2).astype(np.float32)


def nearest_codes_float64(inputs: np.ndarray, embeddings: np.ndarray
                          ) -> Tuple[np.ndarray, np.ndarray]:
  """Exact nearest codes in float64 and every vector's squared distances.

  Args:
    inputs: [N, D] vectors.
    embeddings: [D, K] codebook (the quantizer's layout).

  Returns:
    (codes [N], distances [N, K]).
  """
  x = inputs.astype(np.float64)
  e = embeddings.astype(np.float64).T
  distances = ((x[:, None, :] - e[None, :, :]) ** 2).sum(-1)
  return distances.argmin(1), distances


def check_codes(codes: np.ndarray, inputs: np.ndarray,
                embeddings: np.ndarray) -> Tuple[bool, str]:
  """Whether `codes` are the nearest (float64) codes of `inputs`, and a summary."""
  best, distances = nearest_codes_float64(inputs, embeddings)
  rows = np.arange(len(codes))
  chosen, nearest = distances[rows, codes], distances[rows, best]
  equal = int((codes == best).sum())
  tied = int(((codes != best) &
              (chosen <= nearest * (1 + _TIE_TOLERANCE) + 1e-30)).sum())
  wrong = len(codes) - equal - tied
  excess = float((chosen.sum() / max(nearest.sum(), 1e-30)) - 1)
  return wrong == 0, (f"{equal} of {len(codes)} vectors' codes equal the "
                      f"float64 search, {tied} within float32 rounding of it, "
                      f"{wrong} farther (quantization error "
                      f"{100 * excess:+.3f}%)")


def _report(status: str, name: str, detail: str) -> None:
  print(f"{status:4}  {name:9} {detail}", flush=True)


def run_checks() -> bool:
  """Prints the report; returns whether every check passed."""
  # pylint: disable=g-import-not-at-top  (after the logical devices are set)
  import tensorflow as tf
  from sonnet_vqvae import distribute
  from sonnet_vqvae import machine
  from sonnet_vqvae import precision
  from sonnet_vqvae import train
  from sonnet_vqvae.configs import default
  # pylint: enable=g-import-not-at-top

  described = machine.describe()
  print(f"python {described['python']}, tensorflow {described['tensorflow']},"
        f" sonnet {described['sonnet']}, {described['platform']}")
  flags_present = [f for f, on in described["flags"].items() if on]
  print(f"cpu: {described['cpu_model']}, {described['usable_cores']} usable "
        f"of {described['cpu_count']} logical CPUs, load "
        f"{described['load_average_1min']}; flags: "
        f"{' '.join(flags_present) or 'none of ' + str(machine.WATCHED_FLAGS)}")
  print("devices: " + ", ".join(
      f"{d.device_type}:{d.name.rsplit(':', 1)[-1]}"
      for d in tf.config.list_logical_devices()) + (
          f"; gpus: {described['gpus']}" if described["gpus"] else ""))
  tpu, tpu_why = distribute.tpu_address()
  print(f"tpu: {tpu!r} ({tpu_why}); TF_CONFIG tasks: "
        f"{_tf_config_tasks()}; GPUs: "
        f"{len(tf.config.list_logical_devices('GPU'))}")

  results: List[bool] = []

  def check(name: str, body: Callable[[], Tuple[bool, str]]) -> None:
    try:
      ok, detail = body()
    except Exception as e:  # pylint: disable=broad-except
      ok, detail = False, f"{type(e).__name__}: {e}"
      logging.info("%s", traceback.format_exc())
    _report("PASS" if ok else "FAIL", name, detail)
    results.append(ok)

  name = _STRATEGY.value or ("replicator" if _LOGICAL_CPUS.value else "auto")
  state = {}

  def strategy_check():
    strategy = distribute.make_strategy(name)
    state["strategy"] = strategy
    detail = (f"{name!r} -> {type(strategy).__name__} with "
              f"{strategy.num_replicas_in_sync} replica(s)")
    if distribute.is_tpu(strategy):
      cores = tf.config.list_logical_devices("TPU")
      detail += f", {len(cores)} TPU cores"
      return bool(cores), detail
    return True, detail

  check("strategy", strategy_check)
  if "strategy" not in state:
    return False
  strategy = state["strategy"]
  auto, auto_why = precision.resolve("auto", strategy)
  print(f"precision: 'auto' picks {auto or 'float32'}: {auto_why}")

  config = default.get_config()
  config.batch_size = _BATCH_SIZE.value
  mixed_precision = precision.resolve(config.mixed_precision, strategy)[0]

  def train_check():
    dataset, variance, source = _data(config.batch_size)
    model, optimizer = train.create_model_and_optimizer(config, variance,
                                                        strategy)
    state["model"] = model
    train_loop = train.make_train_loop(model, optimizer, strategy,
                                       jit_compile=False,
                                       mixed_precision=mixed_precision)
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    first = float(train_loop(iterator, tf.constant(1))["last"]["loss"])
    start = time.perf_counter()
    out = train_loop(iterator, tf.constant(_STEPS.value - 1))
    last = float(out["last"]["loss"])  # Reading it waits for the device.
    seconds = time.perf_counter() - start
    steps = int(out["steps"])
    state["batch"] = next(iter(dataset))
    ok = np.isfinite(last) and steps == _STEPS.value - 1 and last < first
    return ok, (f"{_STEPS.value} steps of the default model "
                f"({source}, "
                f"batch {config.batch_size}, {mixed_precision or 'float32'}, "
                f"no XLA): loss {first:.4f} -> {last:.4f}, "
                f"{steps / seconds:.1f} steps/s after the first")

  check("train", train_check)
  if "model" not in state:
    return False
  model = state["model"]

  def replicas_check():
    replicas = strategy.num_replicas_in_sync
    differing = []
    for variable in model.variables:
      values = [np.asarray(v) for v in
                strategy.experimental_local_results(variable)]
      if any(not np.array_equal(values[0], v) for v in values[1:]):
        differing.append(variable.name)
    return not differing, (
        f"{len(model.variables)} variables identical on {replicas} replicas"
        if not differing else
        f"{len(differing)} of {len(model.variables)} variables differ "
        f"between replicas: {differing[:5]}")

  if strategy.num_replicas_in_sync > 1:
    check("replicas", replicas_check)
  else:
    _report("SKIP", "replicas", "one replica")

  def codes_check():
    batch = state["batch"][:8]
    z = model.pre_vq_conv(model.encoder(batch))

    @tf.function(autograph=False)
    def encode(z):
      return strategy.run(
          lambda v: model.quantizer(v, is_training=False)["encoding_indices"],
          args=(z,))

    codes = strategy.experimental_local_results(encode(z))[0]
    embeddings = strategy.experimental_local_results(
        model.quantizer.embeddings)[0]
    inputs = np.asarray(z).reshape(-1, np.asarray(z).shape[-1])
    return check_codes(np.asarray(codes).reshape(-1), inputs,
                       np.asarray(embeddings))

  check("codes", codes_check)
  return all(results)


def _tf_config_tasks() -> int:
  cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
  return sum(len(tasks) for tasks in cluster.values())


def _data(batch_size: int):
  """(dataset of image batches, its variance, what it is)."""
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from sonnet_vqvae import input_pipeline
  # pylint: enable=g-import-not-at-top
  if _DATA_DIR.value:
    split = input_pipeline.load_split("train", data_dir=_DATA_DIR.value,
                                      download=False)
    images = input_pipeline.train_dataset(split, batch_size,
                                          shuffle_buffer=1000, seed=0)
    # The variance of the first batches: it only scales the loss.
    variance = float(np.var(np.concatenate(list(images.take(4)))))
    return images, variance, "tfds cifar10"
  images = _synthetic_images(2 * batch_size)
  return (tf.data.Dataset.from_tensor_slices(images).batch(
      batch_size, drop_remainder=True).repeat(), float(np.var(images)),
          "synthetic images")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # TF's C++ start-up lines and per-collective INFO lines say nothing about
  # the checks; warnings (e.g. a TPU falling back) still show.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.set_verbosity(logging.WARNING)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.get_logger().setLevel("WARNING")
  if _LOGICAL_CPUS.value:
    # Before TF initialises its runtime, which fixes the devices.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * _LOGICAL_CPUS.value)
  ok = run_checks()
  print("all checks passed" if ok else "some checks FAILED", flush=True)
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  cli.run(main)
