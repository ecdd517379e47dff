r"""Encoding images/s: the exported SavedModel vs the restored Python model.

A user who exported a run (`sonnet_vqvae.export`) and loads it with
`tf.saved_model.load` should encode at least as fast as one who rebuilds the
model with this package and calls `tf.function(model.encode)`. Both encode
the same [--batch_size, 32, 32, 3] images with the same weights (the
reference model, --config), timed in alternating rounds of one process.
Variants: `python_model` (tf.function of `VQVAEModel.encode`, a dynamic
batch), `saved_float` (the SavedModel's `encode_float` signature on the same
float images) and `saved_uint8` (its `encode` signature on uint8 images,
which includes the scaling). Prints the machine, one JSON line per variant
and the ratios.

    python bench/export_bench.py [--batch_size=256 --calls=10 --rounds=5]
"""

import json
import os
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from sonnet_vqvae import export
from sonnet_vqvae import train

import machine  # pylint: disable=g-bad-import-order  (bench/ siblings)

_BATCH = flags.DEFINE_integer("batch_size", 256, "Images per call.")
_CALLS = flags.DEFINE_integer("calls", 10, "Timed calls per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating rounds.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(train.__file__), "configs",
                           "default.py"), "Model configuration.")


def main(argv):
  del argv
  machine.print_machine()
  model, _ = train.create_model_and_optimizer(
      _CONFIG.value, 0.06, tf.distribute.get_strategy())
  uint8 = np.random.default_rng(0).integers(
      0, 256, [_BATCH.value, 32, 32, 3]).astype(np.uint8)
  floats = tf.constant(uint8.astype(np.float32) / 255. - .5)
  uint8 = tf.constant(uint8)
  python_encode = tf.function(model.encode, input_signature=[
      tf.TensorSpec([None, 32, 32, 3], tf.float32)])
  path = os.path.join(tempfile.mkdtemp(), "export")
  export.write(export.Exported(model, (32, 32, 3)), path)
  loaded = tf.saved_model.load(path)
  variants = {
      "python_model": lambda: python_encode(floats),
      "saved_float": lambda: loaded.signatures["encode_float"](
          images=floats)["codes"],
      "saved_uint8": lambda: loaded.signatures["encode"](
          images=uint8)["codes"],
  }
  reference = python_encode(floats).numpy()
  for name, run in variants.items():  # Warm up; and all agree.
    np.testing.assert_array_equal(run().numpy(), reference, err_msg=name)
  seconds = dict.fromkeys(variants, 0.)
  for _ in range(_ROUNDS.value):
    for name, run in variants.items():
      start = time.perf_counter()
      for _ in range(_CALLS.value):
        out = run()
      out.numpy()
      seconds[name] += time.perf_counter() - start
  images = _BATCH.value * _CALLS.value * _ROUNDS.value
  rates = {name: images / s for name, s in seconds.items()}
  for name, rate in rates.items():
    print(json.dumps({"variant": name, "images_per_sec": round(rate, 1),
                      "batch_size": _BATCH.value}))
  for name in ("saved_float", "saved_uint8"):
    print(json.dumps({"ratio": f"{name}/python_model",
                      "value": round(rates[name] / rates["python_model"],
                                     3)}))


if __name__ == "__main__":
  app.run(main)
