"""Which floating-point type the model computes in, by hardware.

bfloat16 convolutions pay off only where the hardware runs them natively:
measured on 2-core CPUs, the reference model trained at about 1,040 images/s
in bfloat16 against 700 in float32 on an Intel Xeon with AMX-BF16, but at 23
against 213 on an AMD EPYC without it. `resolve("auto", strategy)` picks
bfloat16 on TPUs, NVIDIA GPUs of compute capability 8.0 or more and x86 CPUs
with AMX-BF16, float32 elsewhere, and says why.
"""

import contextlib
from typing import Optional, Tuple

import sonnet as snt
import tensorflow as tf

from sonnet_vqvae import distribute

# Config values of `mixed_precision`: None is float32.
CHOICES = (None, "auto", "bfloat16", "float16")
_CPUINFO = "/proc/cpuinfo"


def scope(mixed_precision: Optional[str]):
  """Context in which the model computes in `mixed_precision` (None: float32).

  Variables stay float32; only the convolutions' and matmuls' inputs are cast.
  """
  if mixed_precision is None:
    return contextlib.nullcontext()
  return snt.mixed_precision.scope(tf.as_dtype(mixed_precision))


def cpu_flags(path: str = _CPUINFO) -> frozenset:
  """The first CPU's feature flags from /proc/cpuinfo (empty when unknown)."""
  try:
    with open(path) as f:
      for line in f:
        if line.startswith("flags"):
          return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


def _gpu_capabilities():
  capabilities = []
  for gpu in tf.config.list_physical_devices("GPU"):
    details = tf.config.experimental.get_device_details(gpu)
    capabilities.append(details.get("compute_capability", (0, 0)))
  return capabilities


def resolve(mixed_precision: Optional[str], strategy: tf.distribute.Strategy,
            flags: Optional[frozenset] = None) -> Tuple[Optional[str], str]:
  """The precision to train in, and why.

  Args:
    mixed_precision: a config value (see CHOICES); only "auto" is resolved.
    strategy: the run's strategy (a TPU strategy means TPUs).
    flags: CPU flags (default: this machine's, from /proc/cpuinfo).

  Returns:
    (None for float32 or "bfloat16" / "float16", the reason in words).
  """
  if mixed_precision != "auto":
    return mixed_precision, "set in the config"
  if distribute.is_tpu(strategy):
    return "bfloat16", "TPUs compute bfloat16 natively"
  capabilities = _gpu_capabilities()
  if capabilities:
    if all(tuple(c) >= (8, 0) for c in capabilities):
      return "bfloat16", (f"GPUs of compute capability {capabilities} "
                          ">= 8.0 compute bfloat16 natively")
    return None, (f"GPUs of compute capability {capabilities}: bfloat16 "
                  "needs >= 8.0")
  flags = cpu_flags() if flags is None else flags
  if "amx_bf16" in flags:
    return "bfloat16", "this CPU has AMX-BF16"
  return None, ("this CPU has no AMX-BF16, where bfloat16 convolutions run "
                "several times slower than float32")
