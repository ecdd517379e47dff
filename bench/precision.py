r"""What bfloat16 costs in test NMSE and gains in speed: the "auto" precision check.

`config.mixed_precision="auto"` may become the default only if bfloat16 costs
at most 2% test NMSE against float32 over >= 2 seeds at >= 3,000 steps on the
real CIFAR-10 subset (issue 11). This trains ours in float32 and in bfloat16
from the same seed (same initial weights and batches) for --steps steps, per
seed, alternating the two, and prints the machine, one JSON line per run
(test metrics and seconds), the mean NMSE of each and the ratio
bfloat16/float32 with the verdict.

    python bench/precision.py --data_dir=../shared/data/tensorflow_datasets \
        [--steps=3000 --seeds=0,1]

On a CPU without AMX-BF16 bfloat16 convolutions run about 10x slower than
float32 (23 vs 213 images/s measured on a 2-core AMD EPYC), so run it where
bfloat16 is native: a CPU with AMX-BF16, a GPU of compute capability >= 8.0
or a TPU.
"""

import json
import os
import statistics

from absl import app
from absl import flags

from sonnet_vqvae.configs import default

import machine  # pylint: disable=g-bad-import-order  (bench/ siblings)
import quality

# quality.py defines --data_dir, --steps and --seeds; this check's budget.
flags.FLAGS.set_default("steps", 3000)
flags.FLAGS.set_default("seeds", ["0", "1"])
# The most test NMSE bfloat16 may cost for "auto" to be the default.
MAX_COST = 1.02


def main(argv):
  del argv
  machine.print_machine()
  data_dir = os.path.abspath(flags.FLAGS.data_dir)
  nmse = {"float32": [], "bfloat16": []}
  for seed in map(int, flags.FLAGS.seeds):
    for name in nmse:
      config = default.get_config()
      config.seed = seed
      config.mixed_precision = None if name == "float32" else name
      metrics = quality.run_quality(config, data_dir, flags.FLAGS.steps)
      nmse[name].append(metrics["nmse"])
      print(json.dumps(dict(precision=name, seed=seed, steps=flags.FLAGS.steps,
                            **metrics)), flush=True)
  for name, values in nmse.items():
    print(json.dumps({"precision": name, "seeds": len(values),
                      "nmse_mean": round(statistics.mean(values), 5)}))
  ratio = statistics.mean(nmse["bfloat16"]) / statistics.mean(nmse["float32"])
  qualifies = (ratio <= MAX_COST and len(nmse["float32"]) >= 2 and
               flags.FLAGS.steps >= 3000)
  print(json.dumps({"ratio": "mean nmse bfloat16/float32",
                    "value": round(ratio, 4),
                    "auto_may_be_default": qualifies}))


if __name__ == "__main__":
  app.run(main)
