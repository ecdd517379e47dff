r"""Training speed in float32 and bfloat16 on this machine: what "auto" assumes.

`precision.resolve("auto")` picks bfloat16 on CPUs with AMX-BF16 or
AVX512-BF16, where bfloat16 convolutions are native; without them oneDNN
emulates bfloat16 several times slower than float32. This trains the
reference model (our train loop without XLA, synthetic images) in both
precisions from the same initial weights, alternating rounds in one process,
and prints the machine, images/s of each and the ratio bfloat16/float32.

oneDNN's ONEDNN_MAX_CPU_ISA caps the instructions it uses, so one machine
with AMX measures the CPUs below it too:

    python bench/precision_speed.py                 # all of this CPU (AMX)
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python bench/precision_speed.py
    ONEDNN_MAX_CPU_ISA=AVX512_CORE python bench/precision_speed.py  # no BF16
"""

import json
import os
import time

from absl import app
from absl import flags
import tensorflow as tf

from sonnet_vqvae import train
from sonnet_vqvae.configs import default

import machine  # pylint: disable=g-bad-import-order  (bench/ siblings)

_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds per precision.")


def main(argv):
  del argv
  machine.print_machine()
  print(json.dumps({"ONEDNN_MAX_CPU_ISA": os.environ.get(
      "ONEDNN_MAX_CPU_ISA", "(unset: all of this CPU)")}), flush=True)
  config = default.get_config()
  strategy = tf.distribute.get_strategy()
  images = tf.random.stateless_uniform(
      [config.batch_size * 4, 32, 32, 3], [0, 1]) - 0.5
  iterator = iter(tf.data.Dataset.from_tensor_slices(images).batch(
      config.batch_size, drop_remainder=True).repeat())
  loops = {}
  for name in ("float32", "bfloat16"):
    model, optimizer = train.create_model_and_optimizer(config, 0.06, strategy)
    loops[name] = train.make_train_loop(
        model, optimizer, strategy, jit_compile=False,
        mixed_precision=None if name == "float32" else name)
    loops[name](iterator, tf.constant(2))  # Trace and warm up.
  steps = tf.constant(_STEPS.value)
  seconds = dict.fromkeys(loops, 0.)
  for _ in range(_ROUNDS.value):
    for name, train_loop in loops.items():
      start = time.perf_counter()
      int(train_loop(iterator, steps)["steps"])  # Reads the result: waits.
      seconds[name] += time.perf_counter() - start
  images_per_sec = {
      name: _STEPS.value * _ROUNDS.value * config.batch_size / s
      for name, s in seconds.items()}
  for name, rate in images_per_sec.items():
    print(json.dumps({"precision": name, "images_per_sec": round(rate, 1),
                      "steps": _STEPS.value * _ROUNDS.value}))
  print(json.dumps({"ratio": "images/s bfloat16/float32", "value": round(
      images_per_sec["bfloat16"] / images_per_sec["float32"], 3)}))


if __name__ == "__main__":
  app.run(main)
