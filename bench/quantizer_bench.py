"""Forward+backward time and peak memory: our quantizers vs stock snt.nets.

For each (N, K, D) it times a `tf.function` training call (quantize, loss,
gradients with respect to the inputs and trainable codebook) of
`sonnet_vqvae.VectorQuantizer{,EMA}` and `snt.nets.VectorQuantizer{,EMA}` in the
same process, and reads the peak of TF's CPU allocator. Prints one JSON line per
(size, quantizer) with the ratios stock / ours.

  python bench/quantizer_bench.py                      # all sizes
  python bench/quantizer_bench.py --sizes=2048,512,64  # one size
"""

import json
import time

from absl import app
from absl import flags
import numpy as np
import sonnet as snt
import tensorflow as tf

import sonnet_vqvae

_SIZES = flags.DEFINE_multi_string(
    "sizes", ["2048,512,64", "16384,4096,64", "65536,16384,64"],
    "N,K,D: vectors, codes, dimension.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement.")


def _quantizers(kind: str, dim: int, codes: int):
  if kind == "ema":
    return (sonnet_vqvae.VectorQuantizerEMA(dim, codes, 0.25, 0.99),
            snt.nets.VectorQuantizerEMA(dim, codes, 0.25, 0.99))
  return (sonnet_vqvae.VectorQuantizer(dim, codes, 0.25),
          snt.nets.VectorQuantizer(dim, codes, 0.25))


def _measure(quantizer, inputs, repeats):
  """(median seconds per call, peak allocator bytes) of a training call."""

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

  tf.nest.map_structure(lambda t: t.numpy(), train_call(inputs))  # Compiles.
  tf.config.experimental.reset_memory_stats("CPU:0")
  base = tf.config.experimental.get_memory_info("CPU:0")["current"]
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    tf.nest.map_structure(lambda t: t.numpy(), train_call(inputs))
    times.append(time.perf_counter() - start)
  peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - base
  return float(np.median(times)), peak


def main(argv):
  del argv
  for size in _SIZES.value:
    n, k, d = (int(v) for v in size.split(","))
    inputs = tf.random.normal([n, d])
    for kind in ("ema", "gradient"):
      ours, stock = _quantizers(kind, d, k)
      ours_s, ours_mem = _measure(ours, inputs, _REPEATS.value)
      stock_s, stock_mem = _measure(stock, inputs, _REPEATS.value)
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
