"""Which floating-point type the model computes in, by hardware.

bfloat16 convolutions pay off only where the hardware runs them natively:
measured on 2-core CPUs, the reference model trained at about 1,040 images/s
in bfloat16 against 700 in float32 on an Intel Xeon with AMX-BF16, but at 23
against 213 on an AMD EPYC without bfloat16 instructions. CPUs with
AVX512-BF16 and no AMX measured both ways: 1.28x faster on an AMD EPYC (issue
18), 0.68x on this project's Xeon with oneDNN capped below AMX
(bench/precision_speed.py). So `resolve("auto", strategy)` picks bfloat16 on
TPUs, NVIDIA GPUs of compute capability 8.0 or more and x86 CPUs with
AMX-BF16; on CPUs with AVX512-BF16 only, where a short timed probe
(`bfloat16_probe`) finds bfloat16 convolutions faster; float32 elsewhere; and
says why.
"""

import contextlib
import functools
import time
from typing import Callable, Optional, Tuple

import sonnet as snt
import tensorflow as tf

from sonnet_vqvae import distribute
from sonnet_vqvae import machine

# Config values of `mixed_precision`: None is float32.
CHOICES = (None, "auto", "bfloat16", "float16")


def scope(mixed_precision: Optional[str]):
  """Context in which the model computes in `mixed_precision` (None: float32).

  Variables stay float32; only the convolutions' and matmuls' inputs are cast.
  """
  if mixed_precision is None:
    return contextlib.nullcontext()
  return snt.mixed_precision.scope(tf.as_dtype(mixed_precision))


# The first CPU's feature flags from /proc/cpuinfo (empty when unknown).
cpu_flags = machine.cpu_flags
# bfloat16 must be at least this much faster in the probe to be picked: it
# costs some test NMSE (bench/RESULTS.md), so a tie goes to float32.
PROBE_MIN_SPEEDUP = 1.1


@functools.cache
def bfloat16_probe(rounds: int = 3, calls: int = 4) -> Tuple[bool, float]:
  """Whether bfloat16 convolutions train faster than float32 on this CPU.

  Times the forward and backward pass of the reference model's widest
  convolution (3x3, 128 channels, batch 32 at 8x8, as in its residual stack)
  in both types, alternating rounds so that other load affects both alike.
  Takes about a second; cached per process.

  Returns:
    (bfloat16 at least PROBE_MIN_SPEEDUP faster, the speedup
    time_float32 / time_bfloat16).
  """
  images = tf.random.stateless_normal([32, 8, 8, 128], [0, 1])
  steps = {}
  for dtype in (tf.float32, tf.bfloat16):
    conv = snt.Conv2D(128, 3, name=f"probe_{dtype.name}")
    conv(tf.cast(images, dtype))  # Builds its float32 variables.

    @tf.function(autograph=False)
    def step(x, conv=conv, dtype=dtype):
      with tf.GradientTape() as tape:
        with snt.mixed_precision.scope(dtype):
          y = conv(tf.cast(x, dtype))
        loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
      return tape.gradient(loss, conv.trainable_variables)[0]

    step(images).numpy()  # Trace and warm up.
    steps[dtype] = step
  seconds = {dtype: 0. for dtype in steps}
  for _ in range(rounds):
    for dtype, step in steps.items():
      start = time.perf_counter()
      for _ in range(calls):
        step(images).numpy()
      seconds[dtype] += time.perf_counter() - start
  speedup = seconds[tf.float32] / seconds[tf.bfloat16]
  return speedup >= PROBE_MIN_SPEEDUP, speedup


def _gpu_capabilities():
  capabilities = []
  for gpu in tf.config.list_physical_devices("GPU"):
    details = tf.config.experimental.get_device_details(gpu)
    capabilities.append(details.get("compute_capability", (0, 0)))
  return capabilities


def resolve(mixed_precision: Optional[str], strategy: tf.distribute.Strategy,
            flags: Optional[frozenset] = None,
            probe: Callable[[], Tuple[bool, float]] = bfloat16_probe
            ) -> Tuple[Optional[str], str]:
  """The precision to train in, and why.

  Args:
    mixed_precision: a config value (see CHOICES); only "auto" is resolved.
    strategy: the run's strategy (a TPU strategy means TPUs).
    flags: CPU flags (default: this machine's, from /proc/cpuinfo).
    probe: () -> (bfloat16 faster, speedup), run only on CPUs with
      AVX512-BF16 and no AMX (default: `bfloat16_probe`).

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
  if "avx512_bf16" in flags:
    faster, speedup = probe()
    return ("bfloat16" if faster else None), (
        f"this CPU has AVX512-BF16 but no AMX-BF16; a timed probe ran "
        f"bfloat16 convolutions {speedup:.2f}x as fast as float32 (bfloat16 "
        f"needs >= {PROBE_MIN_SPEEDUP}x)")
  return None, ("this CPU has no AMX-BF16 or AVX512-BF16, where bfloat16 "
                "convolutions run several times slower than float32")
