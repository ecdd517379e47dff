r"""Writes the golden checkpoints that pin today's checkpoint layout.

    python tests/golden/make_golden.py   # from the repository root

For each of a tiny EMA model (`ema/`) and a tiny gradient-VQ model (`vq/`) it
builds the model and optimizer with `train.create_model_and_optimizer`, trains
three steps on fixed inputs with `train.make_train_step` (so the EMA state,
Adam moments and step counters are non-trivial) and writes

* `ckpt.index`, `ckpt.data-00000-of-00001`: `tf.train.Checkpoint(model=...,
  optimizer=..., step=...)`, as the trainer saves it (without the manager's
  save counter);
* `expected.npz`: the model's config (`config/overrides`, JSON overrides of
  configs/default.py, and `config/data_variance`) and outputs that do not
  depend on the encoder (whose architecture may change): `decode/images` is
  `model.decode(inputs/indices)`, `eval/*` the quantizer's output dict on
  `inputs/z` with is_training=False, `train/*` its state after one more
  is_training=True call on `inputs/z`, and `layout/*` the checkpoint's keys,
  shapes and dtypes.

tests/golden_test.py restores these into freshly built models. Regenerate ONLY
on purpose, when the checkpoint format is meant to change (old checkpoints will
then no longer restore); the commit that did so is recorded in the npz.
"""

import json
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
sys.path.insert(0, _ROOT)

from sonnet_vqvae import train  # pylint: disable=g-import-not-at-top
from sonnet_vqvae.configs import default  # pylint: disable=g-import-not-at-top

GOLDEN_DIR = os.path.dirname(os.path.abspath(__file__))
NAMES = {"ema": True, "vq": False}  # Golden folder -> config.use_ema.
DATA_VARIANCE = 0.0625
CHECKPOINT_PREFIX = "ckpt"
# Every code once; [2, 2, 2] indices decode to [2, 8, 8, 3] images.
DECODE_INDICES = np.array([[[0, 1], [2, 3]], [[4, 5], [6, 7]]], np.int64)


def config_overrides(use_ema: bool) -> dict:
  """The tiny model of the goldens: overrides of configs/default.py."""
  return dict(num_hiddens=4, num_residual_hiddens=2, num_residual_layers=1,
              embedding_dim=4, num_embeddings=8, use_ema=use_ema, decay=0.9,
              seed=0, strategy="default")


def quantizer_inputs(embeddings: np.ndarray) -> np.ndarray:
  """[2, 3, 4] float32 inputs of the quantizer near its [4, 8] codebook.

  Four vectors next to the four longest codes (so that several codes are hit
  and updated) and two random ones of the codebook's scale.
  """
  codes = embeddings.T
  longest = np.argsort(-np.linalg.norm(codes, axis=1), kind="stable")[:4]
  noise = np.random.RandomState(1).randn(6, 4).astype(np.float32)
  scale = codes.std()
  z = np.concatenate([codes[longest] + 0.1 * scale * noise[:4],
                      scale * noise[4:]])
  return z.reshape(2, 3, 4).astype(np.float32)


def _train_batches() -> np.ndarray:
  """Three fixed [2, 16, 16, 3] batches in [-0.5, 0.5] (4x4 code grids)."""
  return np.random.RandomState(0).uniform(
      -0.5, 0.5, [3, 2, 16, 16, 3]).astype(np.float32)


def _quantizer_state(quantizer) -> dict:
  state = {"embeddings": quantizer.embeddings.numpy(),
           "code_usage": quantizer.code_usage.numpy(),
           "training_steps": quantizer.training_steps.numpy()}
  if hasattr(quantizer, "ema_dw"):
    state["ema_cluster_size"] = quantizer.ema_cluster_size.value.numpy()
    state["ema_dw"] = quantizer.ema_dw.value.numpy()
  return state


def make_golden(name: str, use_ema: bool) -> None:
  """Trains the tiny model 3 steps and writes `name/`."""
  strategy = tf.distribute.get_strategy()
  overrides = config_overrides(use_ema)
  config = default.get_config()
  config.update(overrides)
  model, optimizer = train.create_model_and_optimizer(config, DATA_VARIANCE,
                                                      strategy)
  step = train.make_train_step(model, optimizer, strategy, jit_compile=False)
  iterator = iter(tf.data.Dataset.from_tensor_slices(_train_batches()))
  for _ in range(3):
    step(iterator)
  checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                   step=tf.Variable(3, dtype=tf.int64))
  directory = os.path.join(GOLDEN_DIR, name)
  tf.io.gfile.makedirs(directory)
  path = checkpoint.write(os.path.join(directory, CHECKPOINT_PREFIX))

  z = quantizer_inputs(model.quantizer.embeddings.numpy())
  expected = {"config/overrides": np.array(json.dumps(overrides)),
              "config/data_variance": np.array(DATA_VARIANCE, np.float32),
              "inputs/indices": DECODE_INDICES, "inputs/z": z,
              "decode/images": model.decode(DECODE_INDICES).numpy()}
  for key, value in model.quantizer(z, is_training=False).items():
    expected[f"eval/{key}"] = value.numpy()
  model.quantizer(z, is_training=True)
  for key, value in _quantizer_state(model.quantizer).items():
    expected[f"train/{key}"] = value
  shapes = tf.train.list_variables(path)
  expected["layout/keys"] = np.array([key for key, _ in shapes])
  expected["layout/shapes"] = np.array([str(shape) for _, shape in shapes])
  reader = tf.train.load_checkpoint(path)
  dtypes = reader.get_variable_to_dtype_map()
  expected["layout/dtypes"] = np.array([dtypes[key].name for key, _ in shapes])
  expected["source_commit"] = np.array(subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=_ROOT, capture_output=True,
      text=True, check=False).stdout.strip())
  np.savez_compressed(os.path.join(directory, "expected.npz"), **expected)


def main() -> None:
  for name, use_ema in NAMES.items():
    make_golden(name, use_ema)


if __name__ == "__main__":
  main()
