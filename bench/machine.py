"""The machine a benchmark runs on, printed before its figures.

Figures from different machines are not comparable (CPU model, cores, matrix
extensions such as AMX and AVX-512 BF16 change convolution speed several-fold),
so every script in bench/ starts with `print_machine()`:

    {"machine": {"cpu_model": "...", "cpu_count": 2, ...}}
"""

import json
import os
import platform
from typing import Dict, List

import sonnet as snt
import tensorflow as tf

# /proc/cpuinfo flags behind TF's CPU kernels' speed, reported present or not.
WATCHED_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni",
                 "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                 "amx_int8")


def _cpuinfo(path: str = "/proc/cpuinfo") -> Dict[str, str]:
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


def _gpus() -> List[str]:
  names = []
  for device in tf.config.list_physical_devices("GPU"):
    details = tf.config.experimental.get_device_details(device)
    names.append(details.get("device_name", device.name))
  return names


def describe(cpuinfo_path: str = "/proc/cpuinfo") -> Dict[str, object]:
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
  info = _cpuinfo(cpuinfo_path)
  flags = set(info.get("flags", "").split())
  return {
      "cpu_model": info.get("model name") or platform.processor() or "unknown",
      "cpu_count": os.cpu_count(),
      "usable_cores": len(os.sched_getaffinity(0)),
      "load_average_1min": round(os.getloadavg()[0], 2),
      "flags": {flag: flag in flags for flag in WATCHED_FLAGS},
      "gpus": _gpus(),
      "python": platform.python_version(),
      "tensorflow": tf.__version__,
      "sonnet": snt.__version__,
      "platform": platform.platform(),
  }


def print_machine() -> Dict[str, object]:
  """Prints `describe()` as one JSON line {"machine": {...}} and returns it."""
  machine = describe()
  print(json.dumps({"machine": machine}), flush=True)
  return machine
