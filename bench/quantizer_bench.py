"""Forward+backward time and peak memory: our quantizers vs stock snt.nets.

For each (N, K, D) it times a `tf.function` training call (quantize, loss,
gradients with respect to the inputs and trainable codebook) of
`sonnet_vqvae.VectorQuantizer{,EMA}` and `snt.nets.VectorQuantizer{,EMA}` in the
same process, and reads the peak of TF's CPU allocator (the BFC allocator, which
keeps statistics; both sides use it). Prints the machine, then one JSON line
per (size, quantizer) with the ratios stock / ours.

  python bench/quantizer_bench.py                      # all sizes
  python bench/quantizer_bench.py --sizes=2048,512,64  # one size
"""

import json
import os
import time

# TF's default CPU allocator keeps no statistics, so reading the peak fails
# ("Cannot reset memory stats for device 'CPU:0'"); its BFC allocator keeps
# them. TF reads this when it creates its devices, after these imports.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import numpy as np
import sonnet as snt
import tensorflow as tf

import sonnet_vqvae

import machine  # pylint: disable=g-bad-import-order  (bench/ sibling)
# pylint: enable=g-import-not-at-top,wrong-import-position

_SIZES = flags.DEFINE_multi_string(
    "sizes", ["2048,512,64", "16384,4096,64", "65536,16384,64"],
    "N,K,D: vectors, codes, dimension.")
_MIN_SECONDS = flags.DEFINE_float(
    "min_seconds", 2.0, "Time each pair of implementations at least this long "
    "(and at least 5 calls each); small sizes get many calls.")


def _quantizers(kind: str, dim: int, codes: int):
  if kind == "ema":
    return (sonnet_vqvae.VectorQuantizerEMA(dim, codes, 0.25, 0.99),
            snt.nets.VectorQuantizerEMA(dim, codes, 0.25, 0.99))
  return (sonnet_vqvae.VectorQuantizer(dim, codes, 0.25),
          snt.nets.VectorQuantizer(dim, codes, 0.25))


def _train_call(quantizer):
  """A compiled training call: quantize, loss, gradients."""

  @tf.function
  def train_call(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      out = quantizer(x, is_training=True)
      # A stand-in for the decoder's loss, so gradients flow through quantize.
      loss = out["loss"] + tf.reduce_mean(out["quantize"]**2)
    trainable = [v for v in quantizer.variables if v.trainable]
    grads = tape.gradient(loss, [x] + trainable)
    return loss, out["perplexity"], grads

  return lambda x: tf.nest.map_structure(lambda t: t.numpy(), train_call(x))


def _peak_bytes(call, inputs) -> int:
  """Peak of TF's CPU allocator during one call, above what was held before."""
  call(inputs)  # Compiles.
  tf.config.experimental.reset_memory_stats("CPU:0")
  base = tf.config.experimental.get_memory_info("CPU:0")["current"]
  call(inputs)
  return tf.config.experimental.get_memory_info("CPU:0")["peak"] - base


def _median_seconds(calls, inputs, min_seconds):
  """Median seconds per call of each of `calls`, timed in alternation."""
  times = [[] for _ in calls]
  start = time.perf_counter()
  while len(times[0]) < 5 or time.perf_counter() - start < min_seconds:
    # Alternating spreads load from other processes over both alike.
    for call, seconds in zip(calls, times):
      begin = time.perf_counter()
      call(inputs)
      seconds.append(time.perf_counter() - begin)
  return [float(np.median(t)) for t in times]


def main(argv):
  del argv
  machine.print_machine()
  for size in _SIZES.value:
    n, k, d = (int(v) for v in size.split(","))
    inputs = tf.random.normal([n, d])
    for kind in ("ema", "gradient"):
      calls = [_train_call(q) for q in _quantizers(kind, d, k)]
      ours_mem, stock_mem = (_peak_bytes(call, inputs) for call in calls)
      ours_s, stock_s = _median_seconds(calls, inputs, _MIN_SECONDS.value)
      print(json.dumps({
          "N": n, "K": k, "D": d, "quantizer": kind,
          "ours_ms": round(1e3 * ours_s, 2),
          "stock_ms": round(1e3 * stock_s, 2),
          "speedup": round(stock_s / ours_s, 2),
          "ours_peak_mib": round(ours_mem / 2**20, 1),
          "stock_peak_mib": round(stock_mem / 2**20, 1),
          "memory_ratio": round(ours_mem / max(stock_mem, 1), 3),
      }), flush=True)


if __name__ == "__main__":
  app.run(main)
