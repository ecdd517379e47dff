r"""Codebook health at equal steps: stock EMA vs ours, without and with options.

Trains the default model on the real CIFAR-10 data in --data_dir for --steps
steps (same seed and data order) with
  (a) the notebook recipe (stock `snt.nets.VectorQuantizerEMA`),
  (b) ours with defaults (stock behaviour),
  (c) ours with dead-code restarts, k-means initialisation and cosine codes,
and prints one JSON line per run: codes used over the test split (of 512),
test perplexity and NMSE, then the target check for (c): >= 95% of the codes
used with NMSE no worse than (a).

    python bench/codebook_health.py --data_dir=../shared/data/tensorflow_datasets \
        [--steps=2000] [--variants=recipe,ours,restarts,kmeans,cosine,all]
"""

import json
import os

from absl import app
from absl import flags

from sonnet_vqvae.configs import default

import quality  # pylint: disable=g-bad-import-order  (bench/ sibling)

# --data_dir and --steps are bench/quality.py's flags.
_VARIANTS = flags.DEFINE_list(
    "variants", ["recipe", "ours", "restarts", "kmeans", "all"],
    "Runs to make, from: " + ", ".join(sorted(
        ["recipe", "ours", "restarts", "kmeans", "cosine", "all"])))

# Codes assigned fewer than one vector per step (of 2048 per batch, 4 per code
# on average) are restarted.
_RESTARTS = {"dead_code_threshold": 1.0}
_OPTIONS = {
    "recipe": None,
    "ours": {},
    "restarts": _RESTARTS,
    "kmeans": {"kmeans_init": True},
    "cosine": {"cosine": True},
    "all": dict(_RESTARTS, kmeans_init=True, cosine=True),
}


def main(argv):
  del argv
  data_dir = os.path.abspath(flags.FLAGS.data_dir)
  steps = flags.FLAGS.steps
  config = default.get_config()
  results = {}
  for name in _VARIANTS.value:
    if name not in _OPTIONS:
      raise app.UsageError(f"Unknown variant {name!r}; choose from "
                           f"{sorted(_OPTIONS)}.")
    options = _OPTIONS[name]
    results[name] = quality.run_quality(
        config, data_dir, steps, recipe=options is None,
        quantizer=options)
    print(json.dumps(dict(variant=name, options=options, steps=steps,
                          codes_used_share=round(
                              results[name]["codes_used"] /
                              config.num_embeddings, 3),
                          **results[name])), flush=True)
  if "recipe" in results:
    for name, metrics in results.items():
      if name != "recipe":
        print(json.dumps({
            "variant": name,
            "nmse_vs_recipe": round(metrics["nmse"] / results["recipe"]["nmse"],
                                    3),
            "target_met": (metrics["codes_used"] >= 0.95 * config.num_embeddings
                           and metrics["nmse"] <= results["recipe"]["nmse"]),
        }))


if __name__ == "__main__":
  app.run(main)
