"""Strategy choice, the chief process and replica-consistent state.

Every trainer in the package takes its strategy from `make_strategy`, asks
`is_chief` whether it writes the run's files, and creates its variables under
`replica_consistent_variables`, so one replica step serves one device,
`snt.distribute.Replicator`, `TpuReplicator` and `MultiWorkerMirroredStrategy`.
Evaluation, encoding and sampling run on the same devices through
`run_batches`.
"""

import collections
import functools
import json
import os
import re
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Tuple

from absl import logging
import sonnet as snt
import tensorflow as tf

from sonnet_vqvae import input_pipeline

STRATEGIES = ("auto", "default", "replicator", "tpu", "multi_worker")
# Cloud TPU's performance guide recommends per-core batches of at least 8
# (XLA pads dimensions to multiples of 8); below, a log line says so.
TPU_MIN_PER_REPLICA = 8


def replica_consistent_variables(next_creator, **kwargs):
  """Variable creator for state every replica updates identically.

  For use with `tf.variable_creator_scope`. Every replica computes the same
  update from all-reduced statistics or gradients, so the first replica's
  value stands for all: assignments in replica context are valid under every
  strategy, and non-trainable state lives on each replica (as Sonnet's
  Replicator makes it) so that updating it needs no broadcast.
  """
  if kwargs.get("aggregation") in (None, tf.VariableAggregation.NONE):
    kwargs["aggregation"] = tf.VariableAggregation.ONLY_FIRST_REPLICA
  # trainable=None means the default, trainable.
  if kwargs.get("trainable") is False:
    kwargs["synchronization"] = tf.VariableSynchronization.ON_READ
  return next_creator(**kwargs)


def check_strategy_name(name: str) -> None:
  """Raises ValueError unless `name` is one of `STRATEGIES`."""
  if name not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}.")


# The TPU build of TensorFlow that Colab TPU runtimes and Cloud TPU VMs need:
# they ship no TensorFlow, and the plain `tensorflow` wheel has no TPU kernels.
# setup.py's "tpu" extra pins the pair and the libtpu that has every TPU
# function TF 2.20 calls; the TPU build is reinstalled last because both
# wheels write the same `tensorflow/` files.
TENSORFLOW_TPU = "tensorflow-tpu==2.20.0"
TPU_INSTALL = ('pip install ".[tpu]" in a checkout (or "sonnet_vqvae[tpu] @ '
               'git+<repository URL>"), then pip install --force-reinstall '
               f'--no-deps {TENSORFLOW_TPU} (docs/accelerators.md)')

# Google's PCI vendor id and the device ids of its TPU chips (v2/v3, v4, v5p,
# v5e, v6e), as /sys/bus/pci/devices/*/{vendor,device} spell them. TPU VMs
# from v5e on attach chips through VFIO, whose /dev/vfio/N files any VFIO
# host has, so only the PCI ids say that those are TPUs.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = frozenset({"0x0027", "0x005e", "0x0062", "0x0063",
                              "0x006f"})


def attached_tpus(root: str = "/") -> list:
  """The files that say TPU chips are attached to this host ([] if none).

  Exact names only: /dev/accel<N> character devices (TPU v2-v4 VMs) and
  Google TPU PCI devices in /sys/bus/pci/devices (every TPU VM). Not the
  /dev/accel/ directory that Linux's accel subsystem creates for Intel and
  AMD NPUs and Habana cards, nor /dev/vfio/N, which any VFIO host has.

  Args:
    root: the filesystem root to look under (tests pass a fake tree).
  """
  found = []
  dev = os.path.join(root, "dev")
  if os.path.isdir(dev):
    for name in sorted(os.listdir(dev)):
      path = os.path.join(dev, name)
      if re.fullmatch(r"accel\d+", name) and not os.path.isdir(path):
        found.append(path)
  pci = os.path.join(root, "sys", "bus", "pci", "devices")
  if os.path.isdir(pci):
    for name in sorted(os.listdir(pci)):
      if (_read(os.path.join(pci, name, "vendor")) == _GOOGLE_PCI_VENDOR and
          _read(os.path.join(pci, name, "device")) in _TPU_PCI_DEVICES):
        found.append(os.path.join(pci, name))
  return found


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return ""


def tpu_address(environ: Optional[Mapping[str, str]] = None,
                root: str = "/") -> Tuple[Optional[str], str]:
  """The `tpu` argument of `TPUClusterResolver` for this process, and why.

  Resolved here, not by the resolver: with tpu=None it reads only TPU_NAME,
  and it looks a name up as a Cloud TPU node, also "local".

  Args:
    environ: environment variables (default: os.environ).
    root: filesystem root for `attached_tpus`.

  Returns:
    (tpu, reason): tpu is TPU_NAME as given ("local" for a TPU attached to
    this host, a grpc:// address, or a Cloud TPU node's name), else
    "grpc://$COLAB_TPU_ADDR" (Colab's TPU node runtimes), else "local" when
    `attached_tpus` finds chips; None when no TPU is named or attached.
  """
  environ = os.environ if environ is None else environ
  if environ.get("TPU_NAME"):
    name = environ["TPU_NAME"]
    return name, f"TPU_NAME={name}"
  if environ.get("COLAB_TPU_ADDR"):
    address = environ["COLAB_TPU_ADDR"]
    return f"grpc://{address}", f"COLAB_TPU_ADDR={address}"
  attached = attached_tpus(root)
  if attached:
    return "local", f"TPU chips attached to this host ({attached[0]})"
  return None, "no TPU named (TPU_NAME, COLAB_TPU_ADDR) or attached"


def connect_tpu(tpu: str) -> tf.distribute.Strategy:
  """Initialises the TPU system `tpu` and returns Sonnet's TpuReplicator.

  Raises:
    RuntimeError: initialisation left no TPU device (e.g. a TensorFlow build
      without TPU support that did not raise).
    Whatever the resolver or initialisation raised, e.g. NotFoundError or
    InvalidArgumentError ("No OpKernel was registered to support Op
    'ConfigureDistributedTPU'") with a TensorFlow that has no TPU kernels.
  """
  resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
  tf.config.experimental_connect_to_cluster(resolver)
  tf.tpu.experimental.initialize_tpu_system(resolver)
  devices = tf.config.list_logical_devices("TPU")
  if not devices:
    raise RuntimeError(f"TPU initialisation of tpu={tpu!r} returned but "
                       "TensorFlow lists no TPU device.")
  logging.info("TPU %r: %d TPU cores.", tpu, len(devices))
  return snt.distribute.TpuReplicator(resolver)


@functools.cache
def make_strategy(name: str) -> tf.distribute.Strategy:
  """The strategy `name` (see `STRATEGIES`); "auto" picks from the machine.

  One instance per name and process: strategies number their collectives
  independently, so a second one over the same devices would reuse the first
  one's collective keys with other shapes. Other code in the process should
  take its strategy from here too. See `build_strategy` for the choice.
  """
  return build_strategy(name)


def build_strategy(name: str, environ: Optional[Mapping[str, str]] = None,
                   root: str = "/",
                   connect: Callable[[str], Any] = connect_tpu
                   ) -> tf.distribute.Strategy:
  """Builds the strategy `name`; `make_strategy` is its cached form.

  auto: multi_worker when TF_CONFIG names more than one task; tpu when a TPU
  is named or attached (`tpu_address`), falling back to the next choices with
  one warning when it cannot be initialised (e.g. TensorFlow without TPU
  kernels); replicator over several GPUs; the default one-device strategy
  otherwise. "replicator" uses all local GPUs, or all logical CPUs when there
  is no GPU; "tpu" is `snt.distribute.TpuReplicator` on `tpu_address`'s TPU
  ("local" when none is named or found) and fails, saying what to install,
  when it cannot be initialised.

  Args:
    name: one of `STRATEGIES`.
    environ: environment variables (default: os.environ).
    root: filesystem root for `attached_tpus`.
    connect: tpu address -> strategy (`connect_tpu`; tests pass a fake).

  Raises:
    ValueError: an unknown name.
    RuntimeError: strategy "tpu" could not be initialised.
  """
  check_strategy_name(name)
  environ = os.environ if environ is None else environ
  if name == "auto":
    cluster = json.loads(environ.get("TF_CONFIG", "{}")).get("cluster", {})
    if sum(len(tasks) for tasks in cluster.values()) > 1:
      return tf.distribute.MultiWorkerMirroredStrategy()
    tpu, why = tpu_address(environ, root)
    if tpu is not None:
      try:
        return connect(tpu)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning(
            "strategy='auto': a TPU is named or attached (%s) but could not "
            "be initialised, so training runs on GPUs/CPU instead: %s: %s. "
            "For the TPU, install TensorFlow's TPU build: %s", why,
            type(e).__name__, str(e).splitlines()[0] if str(e) else "",
            TPU_INSTALL)
    name = ("replicator" if len(tf.config.list_logical_devices("GPU")) > 1
            else "default")
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "replicator":
    devices = (tf.config.list_logical_devices("GPU") or
               tf.config.list_logical_devices("CPU"))
    return snt.distribute.Replicator(devices=[d.name for d in devices])
  if name == "tpu":
    tpu, why = tpu_address(environ, root)
    tpu = tpu or "local"
    try:
      return connect(tpu)
    except Exception as e:  # pylint: disable=broad-except
      raise RuntimeError(
          f"strategy='tpu': could not initialise the TPU {tpu!r} ({why}): "
          f"{type(e).__name__}: {e}\nOn a Colab TPU runtime or a Cloud TPU "
          "VM, install TensorFlow's TPU build (plain `tensorflow` has no TPU "
          f"kernels): {TPU_INSTALL}, then restart the runtime. For a Cloud "
          "TPU node, set TPU_NAME to its name or grpc:// address. Or use "
          "strategy='auto' to fall back to GPUs/CPU.") from e
  return tf.distribute.MultiWorkerMirroredStrategy()


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


def task_id(strategy: tf.distribute.Strategy) -> int:
  """This worker's index in a multi-worker cluster (0 otherwise)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  return 0 if resolver is None else int(resolver.task_id or 0)


def check_batch_size(batch_size: int, strategy: tf.distribute.Strategy,
                     key: str = "batch_size") -> None:
  """Raises ValueError unless `batch_size` splits evenly over the replicas."""
  replicas = strategy.num_replicas_in_sync
  if batch_size % replicas:
    raise ValueError(f"config.{key}={batch_size} is not divisible by the "
                     f"{replicas} replicas of the strategy; use a multiple of "
                     f"{replicas}.")
  if is_tpu(strategy) and batch_size // replicas < TPU_MIN_PER_REPLICA:
    logging.info(
        "config.%s=%d is %d per TPU core; Cloud TPU's performance guide "
        "recommends per-core batches of %d or more (XLA pads dimensions to "
        "multiples of 8): consider %s=%d or more.",
        key, batch_size, batch_size // replicas, TPU_MIN_PER_REPLICA, key,
        TPU_MIN_PER_REPLICA * replicas)


def check_same_step(step: int, strategy: tf.distribute.Strategy) -> None:
  """Raises RuntimeError unless every worker restored the same step.

  Workers of a multi-worker run read one workdir, so they need a shared
  filesystem; on separate disks each restores what its own disk holds and
  the collectives of steps that do not match would hang. Called by every
  worker right after restoring (a collective, so all must call it); a no-op
  for other strategies.
  """
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return
  steps = strategy.gather(
      strategy.run(lambda: tf.constant([step], tf.int64)), axis=0).numpy()
  if steps.min() != steps.max():
    raise RuntimeError(
        f"The workers restored different steps {steps.tolist()} (one per "
        f"replica; this worker {step}). Workers of a multi-worker run must "
        "see the same workdir: use a shared filesystem (NFS, or gs:// paths) "
        "for --workdir.")


def is_tpu(strategy: tf.distribute.Strategy) -> bool:
  """Whether `strategy` runs on TPUs (which compile every step with XLA)."""
  return isinstance(strategy, (tf.distribute.TPUStrategy,
                               tf.distribute.experimental.TPUStrategy))


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
  """Whether `strategy` runs over several processes (workers)."""
  return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def all_gpus(strategy: tf.distribute.Strategy) -> bool:
  """Whether every local replica of `strategy` is a GPU."""
  devices = getattr(strategy.extended, "worker_devices", ())
  return bool(devices) and all(
      tf.DeviceSpec.from_string(d).device_type == "GPU" for d in devices)


def evaluation_strategy(strategy: tf.distribute.Strategy
                        ) -> tf.distribute.Strategy:
  """The strategy a reader or the chief's evaluation of `strategy` runs on.

  `strategy` itself, except multi-worker: only the chief evaluates, and a
  collective among one of several workers would wait forever, so it runs on
  this worker's default device (the default strategy; call it outside any
  `strategy.scope()`).
  """
  return tf.distribute.get_strategy() if is_multi_worker(strategy) else strategy


def _on_replicas(strategy: tf.distribute.Strategy) -> bool:
  """Whether `run_batches` runs under `strategy.run` (else one local call)."""
  if is_multi_worker(strategy):
    return False  # See `evaluation_strategy`.
  return is_tpu(strategy) or strategy.num_replicas_in_sync > 1


def check_variables(strategy: tf.distribute.Strategy,
                    variables: Sequence[tf.Variable], what: str) -> None:
  """Raises ValueError unless `variables` were created under `strategy`.

  A replica of `strategy` that reads a variable of another strategy (e.g. a
  model restored without `strategy.scope()`) reads it from another device:
  a copy per step on GPUs, and a TPU cannot read it at all.
  """
  if not _on_replicas(strategy):
    return
  foreign = [v.name for v in variables
             if not strategy.extended.variable_created_in_scope(v)]
  if foreign:
    raise ValueError(
        f"{what}'s variables (e.g. {foreign[0]!r}) were not created under the "
        f"{type(strategy).__name__} it runs on: build or restore it under "
        "`strategy.scope()` (e.g. train.restore_model(workdir, "
        "strategy=strategy)), or pass the strategy it was built under.")


# The traced functions of `run_batches` calls that named a key, most recent
# last: a model evaluated again (every validation of a run) runs its first
# trace. Few, as each holds its model.
_TRACED: "collections.OrderedDict[Any, Callable]" = collections.OrderedDict()
_MAX_TRACED = 8


def _traced(key: Any, build: Callable[[], Callable]) -> Callable:
  """`build()`, or the function it built for the same key before."""
  if key is None:
    return build()
  if key not in _TRACED:
    _TRACED[key] = build()
    if len(_TRACED) > _MAX_TRACED:
      _TRACED.popitem(last=False)
  _TRACED.move_to_end(key)
  return _TRACED[key]


def run_batches(strategy: tf.distribute.Strategy,
                replica_fn: Callable[[Any, tf.Tensor], Tuple[Any, Any]],
                batches: tf.data.Dataset,
                variables: Sequence[tf.Variable] = (),
                what: str = "The model",
                key: Any = None
                ) -> Iterator[Tuple[Any, Any, tf.Tensor]]:
  """Runs `replica_fn` on the strategy's devices over fixed-shape batches.

  Each global batch of B rows is padded to a multiple B' of the replica
  count R (a TPU needs the same static shape on every replica; the mask
  marks the padding) and split into R consecutive slices of B' / R rows,
  built inside the strategy's `dataset_fn`; one traced function runs every
  batch, the last padded one too. Totals are summed over the replicas and
  per-row outputs gathered in the batch's order, on the devices: the host
  reads only what it converts.

  One device (the default strategy) calls `replica_fn` on the whole batch,
  unpadded; so does multi-worker (`evaluation_strategy`).

  Args:
    strategy: the strategy `variables` were created under.
    replica_fn: (batch, mask) -> (totals, rows) for one replica's rows of a
      batch: totals a nest of float32 tensors summed over its rows (summed
      over the replicas here), rows a nest of [n, ...] tensors, one row per
      input row (n = B' / R).
    batches: (batch, mask) elements of one fixed shape, as from
      `input_pipeline.padded_batches`: batch a nest of [B, ...] tensors, mask
      a [B] bool, False for the padding.
    variables: the variables `replica_fn` reads, checked to be `strategy`'s
      (`check_variables`).
    what: names them in that error.
    key: None, or a hashable that names what `replica_fn` computes, e.g.
      ("nll", model): calls with the same key and strategy run one traced
      function, the first such call's `replica_fn` (so the key must hold
      everything the function reads besides the batch and variables, whose
      current values it reads). None traces `replica_fn` anew.

  Yields:
    Per batch (totals, rows, mask) as tensors: the totals summed over the
    replicas, rows [B', ...] and mask [B'] in the batch's order (B' = B on
    one device).

  Raises:
    ValueError: as `check_variables`.
  """
  if not _on_replicas(strategy):
    local = _traced(
        None if key is None else (key, strategy, "local"),
        lambda: tf.function(replica_fn, autograph=False))
    for batch, mask in batches:
      totals, rows = local(batch, mask)
      yield totals, rows, mask
    return
  check_variables(strategy, variables, what)
  replicas = strategy.num_replicas_in_sync
  size = batches.element_spec[1].shape[0]
  per_replica = -(-size // replicas)

  def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
    # Replica r of this input pipeline's replicas takes its r-th element:
    # the slices of the pipelines' replicas, in order.
    local = replicas // context.num_input_pipelines
    first = context.input_pipeline_id * local

    @tf.autograph.experimental.do_not_convert
    def split(batch, mask):
      (batch, mask), _ = input_pipeline.pad_batch((batch, mask),
                                                  per_replica * replicas)
      return tf.nest.map_structure(
          lambda x: tf.reshape(x, [replicas, per_replica, *x.shape[1:]])[
              first:first + local], (batch, mask))

    return batches.map(split).unbatch().prefetch(tf.data.AUTOTUNE)

  step = _traced(None if key is None else (key, strategy, "replicas"),
                 lambda: _replicated_step(strategy, replica_fn))
  for element in strategy.distribute_datasets_from_function(dataset_fn):
    totals, (rows, mask) = step(element)
    yield totals, rows, tf.cast(mask, tf.bool)


def _replicated_step(strategy: tf.distribute.Strategy,
                     replica_fn: Callable[[Any, tf.Tensor], Tuple[Any, Any]]
                     ) -> Callable:
  """`run_batches`' traced step: `replica_fn` on every replica, gathered."""

  def gathered(batch, mask):
    totals, rows = replica_fn(batch, mask)
    context = tf.distribute.get_replica_context()
    if tf.nest.flatten(totals):  # all_reduce of an empty nest fails.
      totals = context.all_reduce(tf.distribute.ReduceOp.SUM, totals)
    # all_gather takes no bools.
    return totals, context.all_gather((rows, tf.cast(mask, tf.int32)), axis=0)

  @tf.function(autograph=False)
  def step(element):
    out = strategy.run(gathered, args=element)
    # Every replica holds the same sums and the whole batch: take the first.
    return tf.nest.map_structure(
        lambda v: strategy.experimental_local_results(v)[0], out)

  return step
