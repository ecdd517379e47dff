r"""Training steps/s: our train loop vs the Sonnet 2 notebook recipe.

The recipe is bench/recipe.py, a self-contained copy of the vqvae_example
notebook's model and loop: stock `snt.nets.VectorQuantizerEMA`,
`snt.optimizers.Adam`, one `@tf.function` call per step, and a host read of
the loss after each (the notebook appends it to a list). Ours is the loop
`train.train` runs, with the config's settings: `loop.select_loop` with
`jit_compile` (default "auto": it times XLA against plain steps on the first
steps and keeps the faster), `steps_per_loop` steps per call (default: up to
the next log step, `log_every`) and metrics read once per call. "ours_xla"
and "ours_no_xla" fix the choice. All use the same model sizes, batch and
synthetic images, and are timed in alternating rounds of the same process,
so that load from other processes affects them alike.

The "convolutions_only" variant is a ceiling, not a train step: the same
encoder, pre-VQ conv and decoder, forward and backward on the reconstruction
loss, with no quantizer and no optimizer, one call per step and no host read.
Every train step runs exactly these convolutions. "recipe_xla_loop" is a
probe: the notebook's own step, XLA-compiled, in a `tf.range` loop; what XLA
and a device loop give without any of our code.

Prints the machine, the "auto" choice, one JSON line per variant, then the
ratios.

    python bench/train_throughput.py [--steps=100 --rounds=3 --config.x=y]
    # The dispatch-bound config of issue 11:
    python bench/train_throughput.py --config.num_hiddens=16 \
        --config.num_residual_hiddens=4 --config.batch_size=8
"""

import json
import os
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import tensorflow as tf

from sonnet_vqvae import loop
from sonnet_vqvae import networks
from sonnet_vqvae import precision
from sonnet_vqvae import train

import machine  # pylint: disable=g-bad-import-order  (bench/ siblings)
import recipe

_STEPS = flags.DEFINE_integer("steps", 100, "Timed steps per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds per variant.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(train.__file__), "configs",
                           "default.py"), "Model and batch configuration.")


def _images(batch_size):
  images = tf.random.stateless_uniform([batch_size * 4, 32, 32, 3], [0, 1])
  return tf.data.Dataset.from_tensor_slices(images - 0.5).batch(
      batch_size, drop_remainder=True).repeat()


def recipe_steps(config, iterator):
  """The notebook's model and step; returns run(n): n calls, n loss reads."""
  notebook = recipe.build_recipe(0.06, **recipe.hyperparameters(config))

  def run(n):
    for _ in range(n):
      float(notebook.train_step({"image": next(iterator)})["loss"])

  return run


def recipe_xla_loop(config, iterator):
  """A probe, not the notebook: its step XLA-compiled in a tf.range loop.

  What XLA and a device loop alone give the notebook's own step; returns
  run(n): one call and one loss read per `log_every` steps, as ours.
  """
  notebook = recipe.build_recipe(0.06, **recipe.hyperparameters(config))
  step = tf.function(notebook.train_step.python_function, jit_compile=True)

  @tf.function
  def steps(n):
    total = tf.constant(0.)
    for _ in tf.range(n):
      total += step({"image": next(iterator)})["loss"]
    return total

  def run(n):
    while n > 0:
      float(steps(tf.constant(min(n, config.log_every))))
      n -= config.log_every

  return run


def convolutions_only(config, iterator):
  """Forward and backward of the model's convolutions alone; returns run(n)."""
  model = networks.build_model(config, data_variance=0.06)
  convs = (model.encoder, model.pre_vq_conv, model.decoder)

  @tf.function
  def step(images):
    with tf.GradientTape() as tape:
      recon = model.decoder(model.pre_vq_conv(model.encoder(images)))
      loss = tf.reduce_mean(tf.square(recon - images))
    variables = [v for m in convs for v in m.trainable_variables]
    return tf.add_n([tf.reduce_sum(g) for g in tape.gradient(loss, variables)])

  def run(n):
    for _ in range(n):
      out = step(next(iterator))
    out.numpy()

  return run


def our_loop(config, iterator, jit_compile):
  """`train.train`'s loop with `jit_compile`; returns (run(n), train_loop)."""
  strategy = tf.distribute.get_strategy()
  model, optimizer = train.create_model_and_optimizer(config, 0.06, strategy)
  mixed_precision = precision.resolve(config.mixed_precision, strategy)[0]
  train_loop = loop.select_loop(
      train.make_replica_step(model, optimizer, mixed_precision), strategy,
      iterator, jit_compile, num_steps=config.num_steps)
  per_call = min(config.steps_per_loop or config.log_every, config.log_every)

  def run(n):
    while n > 0:
      n -= int(train_loop(min(n, per_call))["steps"])

  return run, train_loop


def main(argv):
  del argv
  machine.print_machine()
  config = _CONFIG.value
  iterator = iter(_images(config.batch_size))
  ours, ours_loop = our_loop(config, iterator, config.jit_compile)
  variants = {
      "recipe": recipe_steps(config, iterator),
      "ours": ours,
      "ours_xla": our_loop(config, iterator, True)[0],
      "ours_no_xla": our_loop(config, iterator, False)[0],
      "convolutions_only": convolutions_only(config, iterator),
      "recipe_xla_loop": recipe_xla_loop(config, iterator),
  }
  # Trace, compile and warm up; "auto" makes its choice here.
  while getattr(ours_loop, "chosen", "") is None:
    ours(1)
  for run in variants.values():
    run(3)
  print(json.dumps({"jit_compile": config.jit_compile,
                    "chosen": getattr(ours_loop, "chosen", None),
                    "trial_steps_per_sec": {
                        k: round(v, 1) for k, v in
                        getattr(ours_loop, "steps_per_sec", {}).items()}}))
  seconds = dict.fromkeys(variants, 0.)
  for _ in range(_ROUNDS.value):
    for name, run in variants.items():
      start = time.perf_counter()
      run(_STEPS.value)
      seconds[name] += time.perf_counter() - start
  steps = _STEPS.value * _ROUNDS.value
  rates = {name: steps / s for name, s in seconds.items()}
  for name, rate in rates.items():
    print(json.dumps({"variant": name, "steps_per_sec": round(rate, 2),
                      "images_per_sec": round(rate * config.batch_size, 1),
                      "batch_size": config.batch_size, "steps": steps}))
  for name in ("ours", "ours_xla", "ours_no_xla", "convolutions_only",
               "recipe_xla_loop"):
    print(json.dumps({"ratio": f"{name}/recipe",
                      "value": round(rates[name] / rates["recipe"], 3)}))
  print(json.dumps({"ratio": "ours/convolutions_only", "value": round(
      rates["ours"] / rates["convolutions_only"], 3)}))


if __name__ == "__main__":
  app.run(main)
