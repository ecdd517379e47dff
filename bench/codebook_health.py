r"""Codebook health at equal steps: the notebook recipe vs ours, with options.

Trains the default model on the real CIFAR-10 data in --data_dir for --steps
steps, for each seed of --seeds (same initial weights and data order for all
variants of a seed), as each of --variants:
  recipe: bench/recipe.py, the notebook's model with stock
    `snt.nets.VectorQuantizerEMA`;
  ours: ours with defaults (stock behaviour);
  restarts, kmeans, cosine: ours with dead-code restarts, k-means
    initialisation or cosine codes;
  all: ours with all three.
Prints the machine, then one JSON line per run: codes used over the test split
(of 512), test perplexity and NMSE; then, per seed with a recipe run, each
variant's NMSE over the recipe's and the target check: >= 95% of the codes used
with NMSE no worse than the recipe's.

    python bench/codebook_health.py \
        --data_dir=../shared/data/tensorflow_datasets \
        [--steps=2000] [--seeds=0,1] [--variants=recipe,ours,restarts]
"""

import json
import os

from absl import app
from absl import flags

from sonnet_vqvae.configs import default

import machine  # pylint: disable=g-bad-import-order  (bench/ siblings)
import quality

# --data_dir, --steps and --seeds are bench/quality.py's flags.
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
  machine.print_machine()
  unknown = sorted(set(_VARIANTS.value) - set(_OPTIONS))
  if unknown:
    raise app.UsageError(f"Unknown --variants {unknown}; choose from "
                         f"{sorted(_OPTIONS)}.")
  data_dir = os.path.abspath(flags.FLAGS.data_dir)
  steps = flags.FLAGS.steps
  for seed in map(int, flags.FLAGS.seeds):
    config = default.get_config()
    config.seed = seed
    results = {}
    for name in _VARIANTS.value:
      options = _OPTIONS[name]
      results[name] = quality.run_quality(
          config, data_dir, steps, recipe=options is None, quantizer=options)
      print(json.dumps(dict(variant=name, options=options, seed=seed,
                            steps=steps, codes_used_share=round(
                                results[name]["codes_used"] /
                                config.num_embeddings, 3),
                            **results[name])), flush=True)
    if "recipe" not in results:
      continue
    recipe_nmse = results["recipe"]["nmse"]
    for name, metrics in results.items():
      if name != "recipe":
        print(json.dumps({
            "variant": name, "seed": seed, "steps": steps,
            "nmse_vs_recipe": round(metrics["nmse"] / recipe_nmse, 3),
            "target_met": (metrics["codes_used"] >= 0.95 * config.num_embeddings
                           and metrics["nmse"] <= recipe_nmse),
        }), flush=True)


if __name__ == "__main__":
  app.run(main)
