r"""Test-split quality after equal training steps: ours vs the notebook recipe.

Both train the reference model on the real CIFAR-10 data in --data_dir for
--steps steps from the same initial weights and batches; the recipe is
bench/recipe.py, a self-contained copy of the Sonnet 2 vqvae_example
notebook's model (stock `snt.nets.VectorQuantizerEMA`), `snt.optimizers.Adam`
and train step. Prints the machine, then one JSON line per run (NMSE, PSNR,
perplexity, codes used on the test split), each variant's mean and standard
deviation over --seeds, and the ratio of mean NMSE ours/recipe (<= 1 is no
worse). Floating-point rounding
still sends the two runs apart over thousands of steps; several seeds tell
that from a real gap.

    python bench/quality.py --data_dir=../shared/data/tensorflow_datasets \
        [--steps=2000 --seeds=0,1,2]

`run_quality` is the reusable per-run function: other benchmarks call it
with codebook-health options, e.g. run_quality(config, data_dir, 2000,
quantizer={"dead_code_threshold": 1.0}).
"""

import json
import os
import statistics
import tempfile
import time
from typing import Dict, Mapping, Optional

from absl import app
from absl import flags
from ml_collections import config_dict
import tensorflow as tf

from sonnet_vqvae import input_pipeline
from sonnet_vqvae import loop
from sonnet_vqvae import rundir
from sonnet_vqvae import train
from sonnet_vqvae.configs import default

import machine  # pylint: disable=g-bad-import-order  (bench/ siblings)
import recipe

_DATA_DIR = flags.DEFINE_string(
    "data_dir", "../shared/data/tensorflow_datasets", "Prepared tfds data.")
_STEPS = flags.DEFINE_integer("steps", 2000, "Training steps of each run.")
_SEEDS = flags.DEFINE_list("seeds", ["0"],
                           "Seeds; each variant trains once per seed.")


class _RecipeForEvaluate:
  """The notebook's model with the two attributes `train.evaluate` reads."""

  def __init__(self, notebook: recipe.Recipe):
    self.quantizer = notebook.quantizer
    self.data_variance = notebook.data_variance
    self._model = notebook.model

  def __call__(self, images: tf.Tensor, is_training: bool):
    return self._model(images, is_training=is_training)


def _recipe_run(config: config_dict.ConfigDict) -> Dict[str, float]:
  """Trains the notebook's recipe; returns `train.evaluate` test metrics."""
  train_split = input_pipeline.load_split(
      "train", data_dir=config.data_dir, download=False)
  variance = input_pipeline.data_variance(train_split)
  notebook = recipe.build_recipe(variance, **recipe.hyperparameters(config))
  notebook.model(tf.zeros([1, 32, 32, 3]), is_training=False)  # Variables.
  # Start from the weights (and quantizer state) ours starts from with this
  # seed: the two runs then differ in their implementations, not in their
  # random draws. Fails if a variable of the notebook's model is unmatched.
  ours, _ = train.create_model_and_optimizer(config, variance,
                                             tf.distribute.get_strategy())
  recipe.copy_variables(ours.variables, notebook.model.variables)
  batches = input_pipeline.train_dataset(
      train_split, config.batch_size, shuffle_buffer=config.shuffle_buffer,
      seed=config.seed)
  for images in batches.take(config.num_steps):
    notebook.train_step({"image": images})
  test = input_pipeline.load_split("test", data_dir=config.data_dir,
                                   download=False)
  return train.evaluate(
      _RecipeForEvaluate(notebook),
      input_pipeline.eval_dataset(test, config.eval_batch_size))


def run_quality(config: config_dict.ConfigDict,
                data_dir: str,
                steps: int,
                *,
                recipe: bool = False,
                quantizer: Optional[Mapping[str, object]] = None
                ) -> Dict[str, float]:
  """Trains one model for `steps` steps and returns its test metrics.

  Args:
    config: base configuration (copied; data, steps and options are set).
    data_dir: prepared tfds data directory.
    steps: training steps.
    recipe: train the notebook recipe instead of `train.train_and_evaluate`.
    quantizer: codebook-health options for our quantizer (config.quantizer).

  Returns:
    nmse, mse, psnr, perplexity, codes_used on the test split, plus seconds
    and (ours) train_steps_per_sec, the median of the logged windows' but
    the first (which compiles).
  """
  config = config_dict.ConfigDict(config.to_dict())
  config.data_dir = data_dir
  config.download = False
  config.num_steps = steps
  config.checkpoint_every = steps
  config.log_every = max(1, steps // 10)
  config.quantizer.update(quantizer or {})
  start = time.time()
  if recipe:
    metrics = _recipe_run(config)
  else:
    with tempfile.TemporaryDirectory() as workdir:
      metrics = train.train_and_evaluate(config, workdir)
      rates = [row["steps_per_sec"] for row in rundir.RunDir(
          workdir, writer=False).read_rows(loop.METRICS_FILE)[1:]]
    if rates:  # The first window holds the compilation: left out.
      metrics["train_steps_per_sec"] = round(statistics.median(rates), 3)
  return dict(metrics, seconds=round(time.time() - start, 1))


def main(argv):
  del argv
  machine.print_machine()
  data_dir = os.path.abspath(_DATA_DIR.value)
  nmse = {"recipe": [], "ours": []}
  for seed in map(int, _SEEDS.value):
    config = default.get_config()
    config.seed = seed
    for name in nmse:
      metrics = run_quality(config, data_dir, _STEPS.value,
                            recipe=name == "recipe")
      nmse[name].append(metrics["nmse"])
      print(json.dumps(dict(variant=name, seed=seed, steps=_STEPS.value,
                            **metrics)), flush=True)
  for name, values in nmse.items():
    print(json.dumps({"variant": name, "seeds": len(values),
                      "nmse_mean": round(statistics.mean(values), 5),
                      "nmse_std": round(statistics.pstdev(values), 5)}))
  print(json.dumps({"ratio": "mean nmse ours/recipe", "value": round(
      statistics.mean(nmse["ours"]) / statistics.mean(nmse["recipe"]), 3)}))


if __name__ == "__main__":
  app.run(main)
