"""The machine: CPU model and feature flags, devices, software versions.

What `precision.resolve("auto")` decides from, what `python -m
sonnet_vqvae.doctor` reports and what every bench/ script prints before its
figures (figures from different machines are not comparable: the CPU model,
cores and matrix extensions such as AMX and AVX-512 BF16 change convolution
speed several-fold).
"""

import os
import platform
from typing import Dict, List

import sonnet as snt
import tensorflow as tf

CPUINFO = "/proc/cpuinfo"
# /proc/cpuinfo flags behind TF's CPU kernels' speed, reported present or not.
WATCHED_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni",
                 "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                 "amx_int8")


def cpuinfo(path: str = CPUINFO) -> Dict[str, str]:
  """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
  fields = {}
  try:
    with open(path) as f:
      for line in f:
        if not line.strip():
          break  # The first processor's block ends at a blank line.
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
  except OSError:
    pass
  return fields


def cpu_flags(path: str = CPUINFO) -> frozenset:
  """The first CPU's feature flags from /proc/cpuinfo (empty when unknown)."""
  return frozenset(cpuinfo(path).get("flags", "").split())


def gpus() -> List[str]:
  """Names of the GPUs TensorFlow sees ([] on CPU)."""
  names = []
  for device in tf.config.list_physical_devices("GPU"):
    details = tf.config.experimental.get_device_details(device)
    names.append(details.get("device_name", device.name))
  return names


def describe(cpuinfo_path: str = CPUINFO) -> Dict[str, object]:
  """The machine and software versions.

  Args:
    cpuinfo_path: where to read the CPU model and flags (Linux).

  Returns:
    Dict with
      cpu_model: e.g. "AMD EPYC" ("unknown" without /proc/cpuinfo).
      cpu_count: logical CPUs of the machine.
      usable_cores: logical CPUs this process may run on.
      load_average_1min: the 1-minute load average when described; above
        usable_cores, other processes took CPU time from the figures.
      flags: {flag: present} for each of WATCHED_FLAGS.
      gpus: GPU names TF sees ([] on CPU).
      python, tensorflow, sonnet: versions.
      platform: OS and kernel.
  """
  info = cpuinfo(cpuinfo_path)
  flags = set(info.get("flags", "").split())
  return {
      "cpu_model": info.get("model name") or platform.processor() or "unknown",
      "cpu_count": os.cpu_count(),
      "usable_cores": len(os.sched_getaffinity(0)),
      "load_average_1min": round(os.getloadavg()[0], 2),
      "flags": {flag: flag in flags for flag in WATCHED_FLAGS},
      "gpus": gpus(),
      "python": platform.python_version(),
      "tensorflow": tf.__version__,
      "sonnet": snt.__version__,
      "platform": platform.platform(),
  }
