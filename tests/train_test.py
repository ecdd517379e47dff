"""Tests for sonnet_vqvae.train (tiny configs, tfds mock data)."""

import json
import os
import shutil
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from sonnet_vqvae import rundir
from sonnet_vqvae import train
import tiny


tiny_config = tiny.vqvae_config


def _train(config, workdir):
  with tfds.testing.mock_data(num_examples=16):
    return train.train_and_evaluate(config, workdir)


def _train_only(config, workdir):
  """`_train` without the evaluation and figures, for tests that skip them."""
  with tfds.testing.mock_data(num_examples=16):
    train.train(config, workdir)


_TRAINED = {}


def _trained_two_steps():
  """A tiny run's workdir after 2 steps, trained once for the module.

  Tests only read it; one that trains on or damages it copies it first.
  """
  if not _TRAINED:
    _TRAINED["base"] = tempfile.mkdtemp()
    _TRAINED["workdir"] = os.path.join(_TRAINED["base"], "run")
    _train_only(tiny_config(num_steps=2), _TRAINED["workdir"])
  return _TRAINED["workdir"]


def tearDownModule():
  if _TRAINED:
    shutil.rmtree(_TRAINED["base"])


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


class TrainTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)

  def _copy_of_trained_run(self):
    """self.workdir holding a copy of `_trained_two_steps()`'s run."""
    os.rmdir(self.workdir)
    shutil.copytree(_trained_two_steps(), self.workdir)

  @pytest.mark.slow
  def test_train_resume_evaluate_restore(self):
    # The shared run, 2 steps (a fresh run's rows: 1, 2); the same command
    # with more steps resumes at 2 instead of starting afresh, then
    # evaluates.
    self._copy_of_trained_run()
    self.assertEqual([r["step"] for r in _rows(self.workdir)], [1, 2])
    metrics = _train(tiny_config(), self.workdir)
    self.assertEqual(set(metrics),
                     {"nmse", "mse", "psnr", "perplexity", "codes_used"})
    for name in ("eval.json", "curves.png", "reconstructions.png",
                 "codebook.png", "run.json"):
      self.assertTrue(os.path.exists(os.path.join(self.workdir, name)), name)
    # One level: nothing to decode from the top alone.
    self.assertFalse(os.path.exists(
        os.path.join(self.workdir, "level_reconstructions.png")))
    self.assertEqual([r["step"] for r in _rows(self.workdir)], [1, 2, 4])
    self.assertEqual(tf.train.latest_checkpoint(
        os.path.join(self.workdir, "checkpoints")).split("-")[-1], "4")

    config, model = train.restore_model(self.workdir)
    self.assertEqual(config.num_steps, 4)
    with tfds.testing.mock_data(num_examples=16):
      again = train.evaluate_and_plot(config, model, self.workdir)
    with open(os.path.join(self.workdir, "eval.json")) as f:
      self.assertEqual(json.load(f), again)

  @pytest.mark.slow
  def test_two_replicas_match_one(self):
    self.assertLen(tf.config.list_logical_devices("CPU"), 2)
    # The shared run is tiny_config(num_steps=2) on the default strategy.
    one, two = _trained_two_steps(), self.workdir
    _train_only(tiny_config(num_steps=2, strategy="replicator"), two)
    model_one = train.restore_model(one)[1]
    model_two = train.restore_model(two)[1]
    self.assertLen(model_one.variables, len(model_two.variables))
    for a, b in zip(model_one.variables, model_two.variables):
      np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4,
                                 err_msg=a.name)

  @parameterized.named_parameters(
      ("negative_steps", dict(num_steps=-1), "num_steps"),
      ("indivisible_batch", dict(batch_size=3, strategy="replicator"),
       "not divisible"),
      ("unknown_strategy", dict(strategy="gpu"), "strategy"),
      ("bad_decay", dict(decay=1.0), "decay"),
      ("precision", dict(mixed_precision="half"), "mixed_precision"))
  def test_bad_config(self, overrides, message):
    with self.assertRaisesRegex(ValueError, message):
      _train(tiny_config(**overrides), self.workdir)
    self.assertEmpty(os.listdir(self.workdir))

  @parameterized.parameters("bfloat16", "float16")
  def test_mixed_precision_step_computes_convolutions_in_it(self, precision):
    config = tiny_config(mixed_precision=precision)
    strategy = tf.distribute.get_strategy()
    model, optimizer = train.create_model_and_optimizer(config, 0.06, strategy)
    train_loop = train.make_train_loop(model, optimizer, strategy,
                                       jit_compile=False,
                                       mixed_precision=precision)
    images = tf.data.Dataset.from_tensors(
        tf.random.stateless_uniform([4, 32, 32, 3], [0, 1]) - 0.5).repeat()
    iterator, one = iter(images), tf.constant(1)
    rows = [train_loop(iterator, one)["last"] for _ in range(8)]
    self.assertLess(float(rows[-1]["loss"]), float(rows[0]["loss"]))
    graph = train_loop.get_concrete_function(
        iterator, one).graph.as_graph_def()
    conv_types = {node.attr["T"].type for function in graph.library.function
                  for node in function.node_def if node.op == "Conv2D"}
    self.assertIn(tf.as_dtype(precision).as_datatype_enum, conv_types)
    # Master weights stay float32.
    self.assertEqual({v.dtype for v in model.trainable_variables}, {tf.float32})
    # Only float16 scales the loss.
    self.assertEqual("loss_scale" in rows[-1], precision == "float16")

  @pytest.mark.nonfinite
  def test_float16_overflowing_step_is_skipped_and_scale_lowered(self):
    config = tiny_config(mixed_precision="float16")
    strategy = tf.distribute.get_strategy()
    model, optimizer = train.create_model_and_optimizer(config, 0.06, strategy)
    # This step's float16 backward pass overflows (max 65504) at scales of
    # 2**21 and above, fits at 2**20: a few halvings from 2**24.
    optimizer.loss_scale.scale.assign(2.**24)
    step = train.make_train_step(model, optimizer, strategy, jit_compile=False,
                                 mixed_precision="float16")
    iterator = iter(tf.data.Dataset.from_tensors(
        tf.random.stateless_uniform([4, 32, 32, 3], [0, 1]) - 0.5).repeat())
    before = [v.numpy() for v in model.trainable_variables]
    step(iterator)
    self.assertEqual(float(optimizer.loss_scale.scale.numpy()), 2.**23)
    self.assertEqual(int(optimizer.step.numpy()), 0)
    for a, b in zip(before, model.trainable_variables):
      np.testing.assert_array_equal(a, b.numpy())
    for _ in range(9):  # Halves until the gradients fit, then trains.
      step(iterator)
    # Each skipped step halved the scale (no growth within 2000 steps).
    skipped = 24 - int(np.log2(optimizer.loss_scale.scale.numpy()))
    self.assertBetween(skipped, 2, 9)
    self.assertEqual(int(optimizer.step.numpy()), 10 - skipped)

  def test_float16_needs_a_loss_scale(self):
    strategy = tf.distribute.get_strategy()
    model, optimizer = train.create_model_and_optimizer(tiny_config(), 0.06,
                                                        strategy)
    with self.assertRaisesRegex(ValueError, "loss scale"):
      train.make_train_step(model, optimizer, strategy, jit_compile=False,
                            mixed_precision="float16")

  @pytest.mark.slow
  def test_float16_run_checkpoints_and_resumes_its_loss_scale(self):
    _train_only(tiny_config(mixed_precision="float16"), self.workdir)
    self.assertIn("loss_scale", _rows(self.workdir)[-1])
    _train_only(tiny_config(mixed_precision="float16", num_steps=6),
                self.workdir)
    self.assertEqual([r["step"] for r in _rows(self.workdir)], [1, 2, 4, 6])
    reader = tf.train.load_checkpoint(
        os.path.join(self.workdir, "checkpoints"))
    self.assertTrue(any("loss_scale" in name
                        for name in reader.get_variable_to_shape_map()))
    config, _ = train.restore_model(self.workdir)
    self.assertEqual(config.mixed_precision, "float16")

  def test_unknown_key(self):
    config = tiny_config()
    config.quantizer.unlock()
    config.quantizer.dead_code_treshold = 1.0
    with self.assertRaisesRegex(ValueError, "quantizer.dead_code_treshold"):
      _train(config, self.workdir)

  @pytest.mark.slow
  def test_corrupt_checkpoint_is_error_and_kept(self):
    self._copy_of_trained_run()
    checkpoints = os.path.join(self.workdir, "checkpoints")
    data = [os.path.join(checkpoints, f) for f in os.listdir(checkpoints)
            if ".data-" in f][0]
    with open(data, "r+b") as f:
      f.truncate(10)
    before = {f: open(os.path.join(checkpoints, f), "rb").read()
              for f in os.listdir(checkpoints)}
    with self.assertRaisesRegex(rundir.RunDirError, "ckpt-2"):
      _train(tiny_config(num_steps=4), self.workdir)
    after = {f: open(os.path.join(checkpoints, f), "rb").read()
             for f in os.listdir(checkpoints)}
    self.assertEqual(before, after)

  @pytest.mark.slow
  def test_incompatible_checkpoint_is_error(self):
    self._copy_of_trained_run()
    with self.assertRaisesRegex(rundir.FingerprintMismatch,
                                "model.num_hiddens: 16 in .*run.json, 32 now"):
      _train(tiny_config(num_steps=4, num_hiddens=32), self.workdir)

  @pytest.mark.slow
  @pytest.mark.nonfinite
  def test_non_finite_loss_stops_and_keeps_checkpoint(self):
    self._copy_of_trained_run()
    with self.assertRaisesRegex(FloatingPointError, "last good checkpoint"):
      _train(tiny_config(num_steps=6, learning_rate=1e38), self.workdir)
    self.assertEqual(tf.train.latest_checkpoint(
        os.path.join(self.workdir, "checkpoints")).split("-")[-1], "2")

  @pytest.mark.slow
  @absltest.skipUnless(
      os.path.isdir(os.environ.get("SONNET_VQVAE_TEST_DATA_DIR", "")),
      "SONNET_VQVAE_TEST_DATA_DIR (prepared tfds cifar10) is not set.")
  def test_real_subset_lowers_nmse(self):
    config = tiny_config(
        data_dir=os.environ["SONNET_VQVAE_TEST_DATA_DIR"], download=False,
        batch_size=16, num_steps=150, log_every=10, checkpoint_every=150,
        eval_batch_size=256)
    metrics = train.train_and_evaluate(config, self.workdir)
    start = _rows(self.workdir)[0]["recon_error"]
    self.assertLess(metrics["nmse"], 0.5 * start)
    self.assertGreater(metrics["codes_used"], 1)

  def test_restore_model_without_run(self):
    with self.assertRaisesRegex(FileNotFoundError, "No trained VQ-VAE"):
      train.restore_model(self.workdir)


if __name__ == "__main__":
  absltest.main()
