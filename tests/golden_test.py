"""Golden checkpoints: today's code restores the checkpoints of earlier code.

tests/golden/{ema,vq}/ hold a tiny trained model's checkpoint and its expected
outputs, written once by tests/golden/make_golden.py (see there). A failure here
means that checkpoints written before this change no longer restore, or
restore into the wrong variables: fix the change, do not regenerate the golden
unless breaking old checkpoints is the intent.
"""

import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from sonnet_vqvae import train
from sonnet_vqvae.configs import default

_GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "golden")
# Outputs computed by convolutions or EMA arithmetic; everything else (indices,
# counts, code lookups, restored values) must be identical.
_RTOL, _ATOL = 1e-5, 1e-6


def _restore(name):
  """(model, optimizer, checkpoint, expected npz) of the restored golden."""
  directory = os.path.join(_GOLDEN_DIR, name)
  with np.load(os.path.join(directory, "expected.npz")) as npz:
    expected = dict(npz)
  config = default.get_config()
  config.update(json.loads(str(expected["config/overrides"])))
  model, optimizer = train.create_model_and_optimizer(
      config, float(expected["config/data_variance"]),
      tf.distribute.get_strategy())
  checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                   step=tf.Variable(0, dtype=tf.int64))
  status = checkpoint.read(os.path.join(directory, "ckpt"))
  # Every variable of the fresh model restored, and every value of the
  # checkpoint used.
  status.assert_existing_objects_matched()
  status.assert_consumed()
  return model, optimizer, checkpoint, expected


def _assert_equal_outputs(test, actual, expected, prefix):
  keys = sorted(k[len(prefix):] for k in expected if k.startswith(prefix))
  test.assertNotEmpty(keys)
  for key in keys:
    value = np.asarray(actual[key])
    want = expected[prefix + key]
    if np.issubdtype(want.dtype, np.floating):
      np.testing.assert_allclose(value, want, rtol=_RTOL, atol=_ATOL,
                                 err_msg=prefix + key)
    else:
      np.testing.assert_array_equal(value, want, err_msg=prefix + key)


class GoldenCheckpointTest(parameterized.TestCase):

  @parameterized.parameters("ema", "vq")
  def test_layout_is_unchanged(self, name):
    _, optimizer, checkpoint, expected = _restore(name)
    self.assertEqual(int(checkpoint.step.numpy()), 3)
    self.assertEqual(int(optimizer.step.numpy()), 3)
    # Written back, the restored model gives the same keys, shapes, dtypes and
    # values as the golden: every value went to the variable of its key.
    with tempfile.TemporaryDirectory() as directory:
      path = checkpoint.write(os.path.join(directory, "ckpt"))
      layout = tf.train.list_variables(path)
      keys = [key for key, _ in layout]
      self.assertEqual(keys, list(expected["layout/keys"]))
      self.assertEqual([str(shape) for _, shape in layout],
                       list(expected["layout/shapes"]))
      written = tf.train.load_checkpoint(path)
      dtypes = written.get_variable_to_dtype_map()
      self.assertEqual([dtypes[key].name for key in keys],
                       list(expected["layout/dtypes"]))
      golden = tf.train.load_checkpoint(os.path.join(_GOLDEN_DIR, name,
                                                     "ckpt"))
      for key in keys:
        if key != "_CHECKPOINTABLE_OBJECT_GRAPH":
          np.testing.assert_array_equal(written.get_tensor(key),
                                        golden.get_tensor(key), err_msg=key)

  @parameterized.parameters("ema", "vq")
  def test_decode_is_unchanged(self, name):
    model, _, _, expected = _restore(name)
    indices = tf.constant(expected["inputs/indices"])
    # The lookup is exact; the decoder's convolutions to a tight tolerance.
    np.testing.assert_array_equal(
        model.quantizer.quantize(indices),
        model.quantizer.embeddings.numpy().T[expected["inputs/indices"]])
    np.testing.assert_allclose(model.decode(indices), expected["decode/images"],
                               rtol=_RTOL, atol=_ATOL)

  @parameterized.parameters("ema", "vq")
  def test_quantizer_outputs_and_update_are_unchanged(self, name):
    model, _, _, expected = _restore(name)
    quantizer = model.quantizer
    z = tf.constant(expected["inputs/z"])
    _assert_equal_outputs(self, quantizer(z, is_training=False), expected,
                          "eval/")
    quantizer(z, is_training=True)
    state = {"embeddings": quantizer.embeddings,
             "code_usage": quantizer.code_usage,
             "training_steps": quantizer.training_steps}
    if name == "ema":
      state.update(ema_cluster_size=quantizer.ema_cluster_size.value,
                   ema_dw=quantizer.ema_dw.value)
    _assert_equal_outputs(self, state, expected, "train/")


if __name__ == "__main__":
  absltest.main()
