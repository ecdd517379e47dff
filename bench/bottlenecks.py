r"""The reference model with each bottleneck, against our VQ-EMA default.

Every row trains the reference model (`configs/default.py`) on the real
CIFAR-10 subset in --data_dir for --steps steps with one bottleneck
(`config.quantizer.kind` and its options) and is evaluated on the whole test
split. The first rows spend the same 9 bits per position of the 8x8 code
grid as the default's 512 codes; the last spends more, where the bottleneck
is made for it:

    ema_512        VQ-EMA, 512 codes (our default: the baseline)
    vq_512         VQ, codebook trained by gradient, 512 codes
    fsq_8x8x8      FSQ, 3 channels of 8 values (512 codes)
    lfq_9          LFQ, 9 channels of 1 bit (512 codes)
    residual_3x8   residual VQ-EMA, 3 stages of 8 codes (512 code tuples)
    residual_4x512 residual VQ-EMA, 4 stages of 512 codes (36 bits)

The runs go seed-major, the rows alternating within each seed, so that the
machine's load falls on every row alike. Prints the machine, one JSON line per
run (test NMSE, PSNR, codes used and perplexity over the row's codebook:
the code tuples for residual rows, with each stage's too; the median training
steps/s of the logged windows; seconds), then each row's means over the seeds
and its ratios to ema_512's: NMSE and steps/s, per seed and mean.

A run's steps/s depends on what else the machine runs meanwhile;
--timing_rounds > 0 times the rows' train loops instead (XLA, synthetic
batches, no quality runs): --timing_steps steps of each row in turn, for
that many rounds, in this one process, and prints each row's steps/s and
its ratio to ema_512's.

    python bench/bottlenecks.py --data_dir=../shared/data/tensorflow_datasets \
        [--steps=3000 --seeds=0,1 --rows=ema_512,fsq_8x8x8]
    python bench/bottlenecks.py --timing_rounds=3 [--timing_steps=50]
"""

import json
import math
import os
import statistics
import time
from typing import Dict

from absl import app
from absl import flags
from ml_collections import config_dict
import tensorflow as tf

from sonnet_vqvae import train
from sonnet_vqvae.configs import default

import machine  # pylint: disable=g-bad-import-order  (bench/ siblings)
import quality

# quality.py defines --data_dir, --steps and --seeds; issue 20's budget.
flags.FLAGS.set_default("steps", 3000)
flags.FLAGS.set_default("seeds", ["0", "1"])

BASELINE = "ema_512"
# Row name -> (config overrides, config.quantizer overrides).
ROWS = {
    "ema_512": ({}, {"kind": "ema"}),
    "vq_512": ({}, {"kind": "vq"}),
    "fsq_8x8x8": ({}, {"kind": "fsq", "levels": (8, 8, 8)}),
    "lfq_9": ({"num_embeddings": 512}, {"kind": "lfq"}),
    "residual_3x8": ({"num_embeddings": 8},
                     {"kind": "residual", "num_stages": 3}),
    "residual_4x512": ({"num_embeddings": 512},
                       {"kind": "residual", "num_stages": 4}),
}
_ROWS = flags.DEFINE_list("rows", list(ROWS), "Rows to run, in this order "
                          f"within each seed; any of {list(ROWS)}.")
_TIMING_ROUNDS = flags.DEFINE_integer(
    "timing_rounds", 0, "If > 0: time the rows' train loops, alternating, "
    "for this many rounds (and run no quality runs).")
_TIMING_STEPS = flags.DEFINE_integer("timing_steps", 50,
                                     "Timed steps per row and round.")


def row_config(name: str, seed: int = 0) -> config_dict.ConfigDict:
  """The reference config with row `name`'s bottleneck."""
  overrides, quantizer = ROWS[name]
  config = default.get_config()
  config.update(dict(overrides, seed=seed))
  config.quantizer.update(quantizer)
  return config


def time_rows(names, steps: int, rounds: int) -> Dict[str, float]:
  """Steps/s of each row's XLA train loop, timed in alternating rounds."""
  strategy = tf.distribute.get_strategy()
  images = tf.random.stateless_uniform([128, 32, 32, 3], [0, 1]) - 0.5
  loops = {}
  for name in names:
    config = row_config(name)
    iterator = iter(tf.data.Dataset.from_tensor_slices(images).batch(
        config.batch_size, drop_remainder=True).repeat())
    model, optimizer = train.create_model_and_optimizer(config, 0.06,
                                                        strategy)
    train_loop = train.make_train_loop(model, optimizer, strategy,
                                       jit_compile=True)
    train_loop(iterator, tf.constant(2))  # Trace and compile.
    loops[name] = (train_loop, iterator)
  seconds = dict.fromkeys(names, 0.)
  for _ in range(rounds):
    for name, (train_loop, iterator) in loops.items():
      start = time.perf_counter()
      int(train_loop(iterator, tf.constant(steps))["steps"])
      seconds[name] += time.perf_counter() - start
  return {name: steps * rounds / s for name, s in seconds.items()}


def bits_per_position(name: str) -> float:
  """log2 of the codes a row's bottleneck can give one grid position."""
  overrides, quantizer = ROWS[name]
  if quantizer["kind"] == "fsq":
    return math.log2(math.prod(quantizer["levels"]))
  stages = quantizer.get("num_stages", 1)
  return stages * math.log2(overrides.get("num_embeddings", 512))


def main(argv):
  del argv
  unknown = sorted(set(_ROWS.value) - set(ROWS))
  if unknown:
    raise app.UsageError(f"--rows: unknown rows {unknown}; rows are "
                         f"{list(ROWS)}.")
  machine.print_machine()
  if _TIMING_ROUNDS.value > 0:
    rates = time_rows(_ROWS.value, _TIMING_STEPS.value, _TIMING_ROUNDS.value)
    for name, rate in rates.items():
      print(json.dumps({"row": name, "xla_steps_per_sec": round(rate, 3),
                        "steps": _TIMING_STEPS.value * _TIMING_ROUNDS.value}))
      if BASELINE in rates and name != BASELINE:
        print(json.dumps({"ratio": f"xla_steps_per_sec {name}/{BASELINE}",
                          "value": round(rate / rates[BASELINE], 3)}))
    return
  data_dir = os.path.abspath(flags.FLAGS.data_dir)
  steps = flags.FLAGS.steps
  runs = {name: {} for name in _ROWS.value}  # name -> seed -> metrics
  for seed in map(int, flags.FLAGS.seeds):
    for name in _ROWS.value:
      metrics = quality.run_quality(row_config(name, seed), data_dir, steps)
      runs[name][seed] = metrics
      print(json.dumps(dict(row=name, seed=seed, steps=steps,
                            bits=bits_per_position(name), **metrics)),
            flush=True)
  for name, by_seed in runs.items():
    if not by_seed:
      continue
    summary = {"row": name, "seeds": sorted(by_seed),
               "bits": bits_per_position(name)}
    for key in ("nmse", "codes_used", "perplexity", "train_steps_per_sec"):
      values = [m[key] for m in by_seed.values() if key in m]
      if values:
        summary[f"{key}_mean"] = round(statistics.mean(values), 5)
    print(json.dumps(summary))
  baseline = runs.get(BASELINE, {})
  for name, by_seed in runs.items():
    if name == BASELINE:
      continue
    for key in ("nmse", "train_steps_per_sec"):
      # Only seeds both ran: a ratio of the same draws and the same load.
      seeds = sorted(s for s in by_seed if s in baseline and
                     key in by_seed[s] and key in baseline[s])
      if not seeds:
        continue
      ratios = [by_seed[s][key] / baseline[s][key] for s in seeds]
      print(json.dumps({"ratio": f"{key} {name}/{BASELINE}",
                        "per_seed": {s: round(r, 4)
                                     for s, r in zip(seeds, ratios)},
                        "mean": round(statistics.mean(ratios), 4)}))


if __name__ == "__main__":
  app.run(main)
