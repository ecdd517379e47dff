"""Tests for sonnet_vqvae.prior."""

import json
import math
import os
import shutil
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from sonnet_vqvae import input_pipeline
from sonnet_vqvae import networks
from sonnet_vqvae import prior
from sonnet_vqvae import rundir
from sonnet_vqvae import train
import tiny
import warm_cli

_K = 8
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


_tiny_config = tiny.prior_config

# The prior's CLI where reading any dataset fails (warm_cli's children run
# on tfds mock data, which would answer).
_WITHOUT_DATA = """
import runpy, sys
from unittest import mock
import tensorflow_datasets as tfds
def no_data(*args, **kwargs):
  raise AssertionError("the prior's CLI read a dataset")
with mock.patch.object(tfds, "builder", no_data):
  sys.argv[0] = "sonnet_vqvae.prior"
  runpy.run_module("sonnet_vqvae.prior", run_name="__main__", alter_sys=True)
"""

def _constant_grids(num, seed):
  """Grids repeating one code: only the first code of a grid is uncertain."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, prior.CIFAR10_NUM_CLASSES, num).astype(np.int32)
  # The code is the label (mod K), so a class-conditional prior can also get
  # the first code right.
  codes = np.broadcast_to((labels % _K)[:, None, None], [num, 3, 3])
  return {"codes": np.ascontiguousarray(codes), "labels": labels}


def _file_contents(directory):
  contents = {}
  for root, _, names in os.walk(directory):
    for name in names:
      with open(os.path.join(root, name), "rb") as f:
        contents[os.path.join(root, name)] = f.read()
  return contents


def _tiny_vqvae():
  return networks.build_model(tiny.vqvae_config(num_embeddings=_K),
                              data_variance=0.06)


class EncodeSplitTest(absltest.TestCase):

  def test_codes_and_labels_of_every_image(self):
    vqvae = _tiny_vqvae()
    with tfds.testing.mock_data(num_examples=5):
      data = prior.encode_split(vqvae, "test", batch_size=2,
                                dataset="cifar10", data_dir=None,
                                download=True)
      examples = next(iter(input_pipeline.load_split("test").batch(5)))
    np.testing.assert_array_equal(data["codes"],
                                  vqvae.encode(examples["image"]).numpy())
    np.testing.assert_array_equal(data["labels"], examples["label"].numpy())
    self.assertEqual(data["codes"].dtype, np.int32)
    self.assertEqual(data["codes"].shape, (5, 8, 8))


class EvaluateTest(parameterized.TestCase):

  def test_matches_numpy_log_softmax(self):
    tf.random.set_seed(0)
    model = prior.build_prior(_tiny_config(), _K)
    data = _constant_grids(5, seed=0)
    data["codes"] = np.random.default_rng(1).integers(
        0, _K, [5, 3, 3]).astype(np.int32)
    metrics = prior.evaluate(model, data, batch_size=2)
    logits = model(data["codes"], data["labels"]).numpy().astype(np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, data["codes"][..., None],
                                   -1).mean()
    self.assertAlmostEqual(metrics["nll_nats_per_code"], expected, places=5)
    self.assertAlmostEqual(metrics["bits_per_dim"],
                           expected * 9 / 3072 / math.log(2), places=7)

  def test_flat_logits_cost_the_uniform_baseline(self):
    model = prior.build_prior(_tiny_config(class_conditional=False), _K)
    for variable in model.head_logits:
      variable.assign(tf.zeros_like(variable))
    metrics = prior.evaluate(model, _constant_grids(4, seed=0), batch_size=3)
    self.assertAlmostEqual(metrics["uniform_nats_per_code"], math.log(_K))
    self.assertAlmostEqual(metrics["nll_nats_per_code"], math.log(_K),
                           places=5)
    self.assertAlmostEqual(metrics["bits_per_dim"],
                           metrics["uniform_bits_per_dim"], places=7)


class UnigramNllTest(absltest.TestCase):

  def test_matches_hand_computation(self):
    # Train counts of codes 0, 1, 2 are 3, 1, 0; add-one gives 4/7, 2/7, 1/7.
    train_codes = np.array([[0, 0], [0, 1]])
    test_codes = np.array([[2, 0]])
    expected = -(math.log(1 / 7) + math.log(4 / 7)) / 2
    self.assertAlmostEqual(prior.unigram_nll(train_codes, test_codes, 3),
                           expected)


# Module-level prior runs on the repeated-code grids, trained once and shared
# (each training traces its loop and evaluation anew: seconds per run).
_RUNS = {}


def _repeated_data():
  return _constant_grids(64, seed=0), _constant_grids(32, seed=1)


def _shared_run(num_steps):
  """(workdir, metrics) of the class-conditional prior after `num_steps`.

  Checkpoints and test-NLL validations every 50 steps. Tests only read the
  workdir; one that trains on it or damages it copies it first.
  """
  if num_steps not in _RUNS:
    workdir = tempfile.mkdtemp()
    metrics = prior.train_on_codes(
        _tiny_config(num_steps=num_steps, checkpoint_every=50),
        *_repeated_data(), _K, workdir)
    _RUNS[num_steps] = (workdir, metrics)
  return _RUNS[num_steps]


def _copy_of_shared_run(test, num_steps):
  copy = os.path.join(test.enter_context(tempfile.TemporaryDirectory()), "w")
  shutil.copytree(_shared_run(num_steps)[0], copy)
  return copy


def tearDownModule():
  for workdir, _ in _RUNS.values():
    shutil.rmtree(workdir, ignore_errors=True)


class TrainOnCodesTest(parameterized.TestCase):

  def _check_learned(self, metrics, workdir):
    # Uniform costs log 8 = 2.08 nats per code. Knowing that the grid repeats
    # its first code leaves about log(8) / 9 = 0.23 unconditionally.
    self.assertLess(metrics["nll_nats_per_code"], 0.35 * math.log(_K))
    # Codes are spread over all K, so their frequencies alone do not help.
    self.assertGreater(metrics["unigram_nats_per_code"], 0.9 * math.log(_K))
    with open(os.path.join(workdir, prior.METRICS_FILE)) as f:
      self.assertEqual(json.load(f), metrics)
    self.assertEqual(metrics["step"], 100)

  def test_learns_repeated_codes_class_conditional(self):
    workdir, metrics = _shared_run(100)
    self._check_learned(metrics, workdir)

  def test_learns_repeated_codes_unconditional(self):
    workdir = self.enter_context(tempfile.TemporaryDirectory())
    # No validation passes: the conditional run above has them.
    config = _tiny_config(class_conditional=False, num_steps=100,
                          checkpoint_every=100)
    metrics = prior.train_on_codes(config, *_repeated_data(), _K, workdir)
    self._check_learned(metrics, workdir)

  @parameterized.named_parameters(
      ("xla", dict(jit_compile=True)),
      ("two_replicas", dict(strategy="replicator")))
  @pytest.mark.slow
  def test_learns_in_the_compiled_loop(self, overrides):
    workdir = self.enter_context(tempfile.TemporaryDirectory())
    # checkpoint_every: no validation passes (each traces an evaluation).
    config = _tiny_config(num_steps=100, steps_per_loop=50,
                          checkpoint_every=100, **overrides)
    metrics = prior.train_on_codes(config, *_repeated_data(), _K, workdir)
    self.assertLess(metrics["nll_nats_per_code"], 0.35 * math.log(_K))
    rows = rundir.RunDir(workdir, writer=False).read_rows(
        prior.loop.METRICS_FILE)
    self.assertEqual([r["step"] for r in rows], [1, *range(10, 101, 10)])

  def test_incompatible_checkpoint_is_error_and_workdir_kept(self):
    workdir = _copy_of_shared_run(self, 20)
    before = _file_contents(workdir)
    with self.assertRaisesRegex(rundir.FingerprintMismatch,
                                "model.hidden_channels: 8 in .*, 16 now"):
      prior.train_on_codes(_tiny_config(hidden_channels=16),
                           *_repeated_data(), _K, workdir)
    self.assertEqual(_file_contents(workdir), before)

  def test_resumed_run_equals_uninterrupted_run(self):
    once, _ = _shared_run(100)
    resumed = _copy_of_shared_run(self, 20)  # Stopped at step 20.
    metrics = prior.train_on_codes(
        _tiny_config(num_steps=100, checkpoint_every=50), *_repeated_data(),
        _K, resumed)
    self.assertEqual(metrics["step"], 100)
    _, model_once = prior.restore_prior(once, _K)
    _, model_resumed = prior.restore_prior(resumed, _K)
    for a, b in zip(model_once.trainable_variables,
                    model_resumed.trainable_variables):
      np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)

  def test_restore_without_checkpoint_raises(self):
    with self.assertRaises(FileNotFoundError):
      prior.restore_prior(self.enter_context(tempfile.TemporaryDirectory()), _K)


class SampleImagesTest(parameterized.TestCase):

  @parameterized.parameters((True, -1), (True, 3), (False, -1))
  def test_images(self, class_conditional, label):
    model = prior.build_prior(_tiny_config(class_conditional=class_conditional),
                              _K)
    images = prior.sample_images(model, _tiny_vqvae(), num_samples=3,
                                 label=label, temperature=1.0, seed=0)
    self.assertEqual(images.shape, (3, 32, 32, 3))
    self.assertEqual(images.dtype, np.float32)

  def test_negative_label_cycles_through_the_classes(self):
    model = prior.build_prior(_tiny_config(), _K)
    vqvae = _tiny_vqvae()
    images = prior.sample_images(model, vqvae, num_samples=12, label=-1,
                                 temperature=1.0, seed=0)
    labels = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    expected = vqvae.decode(model.sample(12, 8, 8, labels=labels, seed=0))
    np.testing.assert_array_equal(images, expected.numpy())

  @parameterized.parameters((True, 10), (False, 0))
  def test_label_not_a_class_raises(self, class_conditional, label):
    model = prior.build_prior(_tiny_config(class_conditional=class_conditional),
                              _K)
    with self.assertRaises(ValueError):
      prior.sample_images(model, _tiny_vqvae(), num_samples=3, label=label,
                          temperature=1.0, seed=0)


@pytest.mark.slow
class EndToEndTest(absltest.TestCase):

  def test_vqvae_then_prior_then_samples(self):
    vqvae_dir = self.enter_context(tempfile.TemporaryDirectory())
    prior_dir = self.enter_context(tempfile.TemporaryDirectory())
    vqvae_config = tiny.vqvae_config(num_embeddings=_K, num_steps=2,
                                     log_every=1)
    with tfds.testing.mock_data(num_examples=16):
      train.train(vqvae_config, vqvae_dir)  # The prior needs no evaluation.
      # Batches of the 16 mock images, not the default 256 (padding).
      metrics = prior.train_prior(
          _tiny_config(num_steps=4), vqvae_dir,
          prior_dir)
    self.assertEqual(metrics["step"], 4)
    self.assertAlmostEqual(metrics["uniform_nats_per_code"], math.log(_K))
    self.assertTrue(math.isfinite(metrics["bits_per_dim"]))

    config = _tiny_config(num_samples=4, sample_label=2)
    path = prior.sample(config, vqvae_dir, prior_dir)
    self.assertEqual(path, os.path.join(prior_dir, "prior_samples_class2.png"))
    # The command line, from another directory: sampling needs no data, and
    # the prior's workdir alone (its run.json names the VQ-VAE's). Processes
    # of their own, forked from a Python that imported TF (warm_cli).
    env = warm_cli.environment()
    elsewhere = self.enter_context(tempfile.TemporaryDirectory())
    sampled = warm_cli.run(
        ["-c", _WITHOUT_DATA, "--mode=sample", "--config=prior",
         f"--workdir={prior_dir}", "--config.num_samples=3",
         "--config.sample_label=-1"], env, cwd=elsewhere)
    self.assertEqual(sampled.returncode, 0, sampled.stderr[-3000:])
    for name in ("prior_samples_class2.png", "prior_samples.png"):
      with open(os.path.join(prior_dir, name), "rb") as f:
        self.assertEqual(f.read(8), _PNG_MAGIC)
    # Resuming the training (on tfds mock data): the stored config, only
    # num_steps given.
    resumed = warm_cli.run(
        ["-m", "sonnet_vqvae.prior", f"--workdir={prior_dir}",
         "--config.num_steps=6"], env, cwd=elsewhere)
    self.assertEqual(resumed.returncode, 0, resumed.stderr[-3000:])
    self.assertIn("Training the prior from step 4 to 6", resumed.stderr)
    with open(os.path.join(prior_dir, "eval.json")) as f:
      self.assertEqual(json.load(f)["step"], 6)


if __name__ == "__main__":
  absltest.main()
