r"""Training images/s: our train step vs the Sonnet 2 notebook recipe.

The recipe is bench/recipe.py, a self-contained copy of the vqvae_example
notebook's model and loop: stock `snt.nets.VectorQuantizerEMA`,
`snt.optimizers.Adam`, a plain `@tf.function` step returning the whole model
output. Ours is `train.make_train_step` (with
and without XLA). All use the same model sizes, batch and synthetic images, and
are timed in alternating rounds of the same process so that load from other
processes affects them alike.

The "convolutions_only" variant is a ceiling, not a train step: the same
encoder, pre-VQ conv and decoder, forward and backward on the reconstruction
loss, with no quantizer and no optimizer. Every variant runs exactly these
convolutions, so no train step of this model can beat the recipe by more than
its ratio. Prints the machine, then one JSON line per variant, then the
ratios.

    python bench/train_throughput.py [--steps=20 --rounds=3 --config.x=y]
"""

import json
import os
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import tensorflow as tf

from sonnet_vqvae import networks
from sonnet_vqvae import train

import machine  # pylint: disable=g-bad-import-order  (bench/ siblings)
import recipe

_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds per variant.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(train.__file__), "configs",
                           "default.py"), "Model and batch configuration.")


def _images(batch_size):
  images = tf.random.stateless_uniform([batch_size * 4, 32, 32, 3], [0, 1])
  return tf.data.Dataset.from_tensor_slices(images - 0.5).batch(
      batch_size, drop_remainder=True).repeat()


def recipe_step(config):
  """The notebook's model, optimizer and step; returns step(iterator)."""
  notebook = recipe.build_recipe(0.06, **recipe.hyperparameters(config))
  return lambda iterator: notebook.train_step({"image": next(iterator)})


def convolutions_only(config):
  """Forward and backward of the model's convolutions alone; returns step."""
  model = networks.build_model(config, data_variance=0.06)

  @tf.function
  def step(iterator):
    images = next(iterator)
    convs = (model.encoder, model.pre_vq_conv, model.decoder)
    with tf.GradientTape() as tape:
      recon = model.decoder(model.pre_vq_conv(model.encoder(images)))
      loss = tf.reduce_mean(tf.square(recon - images))
    variables = [v for m in convs for v in m.trainable_variables]
    grads = tape.gradient(loss, variables)
    return tf.add_n([tf.reduce_sum(g) for g in grads])

  return step


def our_step(config, jit_compile):
  strategy = tf.distribute.get_strategy()
  model, optimizer = train.create_model_and_optimizer(config, 0.06, strategy)
  return train.make_train_step(model, optimizer, strategy, jit_compile)


def main(argv):
  del argv
  machine.print_machine()
  config = _CONFIG.value
  variants = {"recipe": recipe_step(config),
              "ours_jit": our_step(config, jit_compile=True),
              "ours_nojit": our_step(config, jit_compile=False),
              "convolutions_only": convolutions_only(config)}
  iterator = iter(_images(config.batch_size))
  for step in variants.values():  # Trace, compile and warm up.
    for _ in range(3):
      tf.nest.map_structure(lambda t: t.numpy(), step(iterator))
  seconds = dict.fromkeys(variants, 0.)
  for _ in range(_ROUNDS.value):
    for name, step in variants.items():
      start = time.perf_counter()
      for _ in range(_STEPS.value):
        out = step(iterator)
      tf.nest.map_structure(lambda t: t.numpy(), out)
      seconds[name] += time.perf_counter() - start
  images = config.batch_size * _STEPS.value * _ROUNDS.value
  rates = {name: images / s for name, s in seconds.items()}
  for name, rate in rates.items():
    print(json.dumps({"variant": name, "images_per_sec": round(rate, 1),
                      "batch_size": config.batch_size,
                      "steps": _STEPS.value * _ROUNDS.value}))
  for name in ("ours_jit", "ours_nojit", "convolutions_only"):
    print(json.dumps({"ratio": f"{name}/recipe",
                      "value": round(rates[name] / rates["recipe"], 3)}))


if __name__ == "__main__":
  app.run(main)
