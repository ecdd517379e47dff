"""Strategy choice, the chief process and replica-consistent state.

Every trainer in the package takes its strategy from `make_strategy`, asks
`is_chief` whether it writes the run's files, and creates its variables under
`replica_consistent_variables`, so one replica step serves one device,
`snt.distribute.Replicator`, `TpuReplicator` and `MultiWorkerMirroredStrategy`.
"""

import functools
import glob
import json
import os

import sonnet as snt
import tensorflow as tf

STRATEGIES = ("auto", "default", "replicator", "tpu", "multi_worker")


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
  check_strategy_name(name)
  if name == "auto":
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    if sum(len(tasks) for tasks in cluster.values()) > 1:
      name = "multi_worker"
    elif (_named_tpu() or glob.glob("/dev/accel*") or
          glob.glob("/dev/vfio/[0-9]*")):
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
  return tf.distribute.MultiWorkerMirroredStrategy()


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
