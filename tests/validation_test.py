"""Bad configs and bad data fail before any work, in one line naming the cause.

Each case runs the trainer on a workdir path that does not exist yet and
checks the error (one line, the key and the value) and that the workdir is
still absent: not even its `.lock` was created.
"""

import inspect
import math
import os
import re
import shutil
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

import sonnet_vqvae
from sonnet_vqvae import distribute
from sonnet_vqvae import input_pipeline
from sonnet_vqvae import prior
from sonnet_vqvae import train
from sonnet_vqvae.configs import default
import tiny


def _set(key, value):
  """A change of `config`, e.g. _set("quantizer.usage_decay", 2.)."""
  def change(config):
    *parents, leaf = key.split(".")
    for parent in parents:
      config = config[parent]
    config[leaf] = value
  return change


def _store_tiny_cifar(data_dir):
  """A prepared tfds dataset of 32x32 RGB images: 8 train, 4 test."""
  images = np.random.RandomState(0).randint(0, 256, [12, 32, 32, 3], np.uint8)
  labels = np.arange(12) % 10

  def examples(rows):
    return tf.data.Dataset.from_tensor_slices(
        {"image": images[rows], "label": labels[rows]})

  tfds.dataset_builders.store_as_tfds_dataset(
      "tiny_cifar", "1.0.0", tfds.features.FeaturesDict(
          {"image": tfds.features.Image(shape=(32, 32, 3)),
           "label": tfds.features.ClassLabel(num_classes=10)}),
      {"train": examples(slice(0, 8)), "test": examples(slice(8, 12))},
      data_dir=data_dir)
  return os.path.join(data_dir, "tiny_cifar", "1.0.0")


class _WorkdirTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.base = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.base)
    self.workdir = os.path.join(self.base, "run")

  def assert_one_line_before_any_work(self, error, *parts):
    message = str(error)
    self.assertNotIn("\n", message)
    for part in parts:
      self.assertIn(part, message)
    self.assertFalse(os.path.exists(self.workdir),
                     f"{self.workdir} was created before the error")


class BadConfigTest(_WorkdirTest):

  @parameterized.named_parameters(
      ("learning_rate_inf", "learning_rate", math.inf),
      ("learning_rate_nan", "learning_rate", math.nan),
      ("learning_rate_zero", "learning_rate", 0.),
      ("commitment_cost_inf", "commitment_cost", math.inf),
      ("dead_code_threshold", "quantizer.dead_code_threshold", -1.),
      ("dead_code_threshold_inf", "quantizer.dead_code_threshold", math.inf),
      ("usage_decay", "quantizer.usage_decay", 2.),
      ("usage_decay_negative", "quantizer.usage_decay", -0.5),
      ("kmeans_iters", "quantizer.kmeans_iters", -3),
      ("mixed_precision", "mixed_precision", "None"),
      ("dataset_empty", "dataset", ""),
      ("eval_split_empty", "eval_split", ""),
      ("num_levels", "num_levels", 0))
  def test_vqvae_config(self, key, value):
    config = tiny.vqvae_config()
    _set(key, value)(config)
    # Mock data: a check that let the value through would not download.
    with tfds.testing.mock_data(num_examples=16), self.assertRaisesRegex(
        ValueError, f"^config.{key}") as caught:
      train.train(config, self.workdir)
    self.assert_one_line_before_any_work(caught.exception, f"config.{key}",
                                         "empty" if value == "" else str(value))

  def test_the_strategy_comment_lists_what_validation_takes(self):
    lines = inspect.getsource(default.get_config).splitlines()
    end = next(i for i, line in enumerate(lines)
               if line.strip().startswith("config.strategy ="))
    start = end
    while lines[start - 1].strip().startswith("#"):
      start -= 1
    listed = re.findall(r'"(\w+)"', "\n".join(lines[start:end]))
    self.assertCountEqual(listed, distribute.STRATEGIES)

  def test_mixed_precision_says_how_to_get_float32(self):
    with self.assertRaisesRegex(
        ValueError, "leave --config.mixed_precision out"):
      train.validate_config(tiny.vqvae_config(mixed_precision="float32"))

  def test_vqvae2_config(self):
    config = tiny.vqvae_config(num_levels=2)
    config.quantizer.usage_decay = 1.
    with self.assertRaisesRegex(ValueError, "config.quantizer.usage_decay "
                                "must be a number in \\[0, 1\\), got 1.0"):
      train.train(config, self.workdir)
    self.assertFalse(os.path.exists(self.workdir))

  @parameterized.named_parameters(
      ("learning_rate_inf", "learning_rate", math.inf),
      ("temperature_inf", "temperature", math.inf),
      ("num_layers", "num_layers", 0))
  def test_prior_config(self, key, value):
    config = tiny.prior_config()
    config[key] = value
    with self.assertRaisesRegex(ValueError, f"^config.{key}") as caught:
      prior.train_prior(config, os.path.join(self.base, "no_vqvae"),
                        self.workdir)
    self.assert_one_line_before_any_work(caught.exception, str(value))

  def test_num_levels_against_the_image_size(self):
    with tfds.testing.mock_data(num_examples=16), self.assertRaises(
        ValueError) as caught:
      train.train(tiny.vqvae_config(num_levels=5), self.workdir)
    # 32x32 images take at most 4 levels (grids 8, 4, 2, 1).
    self.assert_one_line_before_any_work(
        caught.exception, "config.num_levels=5 needs images whose height and "
        "width are divisible by 64", "'cifar10' has 32x32 images",
        "set --config.num_levels to at most 4")


class DatasetNameTest(_WorkdirTest):

  @parameterized.named_parameters(
      ("typo", "cifar100x", "did you mean cifar100 or cifar10"),
      ("unknown", "no_such_dataset", "Unknown tfds dataset"),
      ("unknown_config", "cifar10/bogus", "Cannot load tfds dataset"))
  def test_unknown_dataset(self, dataset, message):
    with self.assertRaises(ValueError) as caught:
      train.train(tiny.vqvae_config(dataset=dataset), self.workdir)
    self.assert_one_line_before_any_work(caught.exception, repr(dataset),
                                         "--config.dataset", message)


class DataTest(_WorkdirTest):
  """A dataset prepared by tfds, then damaged; checked before the workdir."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.prepared = tempfile.mkdtemp()
    _store_tiny_cifar(cls.prepared)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.prepared)
    super().tearDownClass()

  def setUp(self):
    super().setUp()
    self.data_dir = os.path.join(self.base, "data")
    shutil.copytree(self.prepared, self.data_dir)
    self.files = os.path.join(self.data_dir, "tiny_cifar", "1.0.0")
    self.test_file = os.path.join(self.files,
                                  "tiny_cifar-test.tfrecord-00000-of-00001")

  def _train(self, **overrides):
    train.train(tiny.vqvae_config(dataset="tiny_cifar",
                                  data_dir=self.data_dir, download=False,
                                  **overrides), self.workdir)

  def test_eval_split_the_dataset_lacks(self):
    with self.assertRaises(ValueError) as caught:
      self._train(eval_split="bogus")
    self.assert_one_line_before_any_work(
        caught.exception, "config.eval_split 'bogus' is not a split of "
        "'tiny_cifar': its splits are test, train.")

  def test_truncated_test_split(self):
    with open(self.test_file, "r+b") as f:
      f.truncate(os.path.getsize(self.test_file) - 100)
    with self.assertRaises(tf.errors.DataLossError) as caught:
      self._train()
    self.assert_one_line_before_any_work(
        caught.exception.message, repr(self.test_file), "'test' split",
        "truncated", "Prepare 'tiny_cifar' again")

  def test_corrupt_record_names_its_file(self):
    train_file = os.path.join(self.files,
                              "tiny_cifar-train.tfrecord-00000-of-00001")
    with open(train_file, "r+b") as f:  # Same size: a CRC mismatch.
      f.seek(5000)
      f.write(b"\xff" * 50)
    with self.assertRaises(tf.errors.DataLossError) as caught:
      self._train()
    message = caught.exception.message
    self.assertNotIn("\n", message)
    for part in (repr(train_file), "is corrupt", "corrupted record at",
                 "Prepare 'tiny_cifar' again"):
      self.assertIn(part, message)

  def test_missing_test_file(self):
    os.remove(self.test_file)
    with self.assertRaises(FileNotFoundError) as caught:
      self._train()
    self.assert_one_line_before_any_work(
        caught.exception, repr(self.test_file), "is missing",
        "Prepare 'tiny_cifar' again")

  def test_missing_data_dir(self):
    shutil.rmtree(self.data_dir)
    # A dataset tfds knows only from its files.
    with self.assertRaises(ValueError) as caught:
      self._train()
    self.assert_one_line_before_any_work(
        caught.exception, "'tiny_cifar'",
        f"data_dir {self.data_dir!r} does not exist (--config.data_dir)")
    # One tfds can download.
    with self.assertRaises(FileNotFoundError) as caught:
      train.train(tiny.vqvae_config(data_dir=self.data_dir, download=False),
                  self.workdir)
    self.assert_one_line_before_any_work(
        caught.exception, "No prepared 'cifar10'", repr(self.data_dir))

  def test_intact_data_and_a_sliced_eval_split_train(self):
    self._train(num_steps=2, eval_split="test[:50%]")
    self.assertTrue(os.path.exists(os.path.join(self.workdir, "run.json")))

  def test_real_data_passes_the_file_check(self):
    data_dir = os.environ.get("SONNET_VQVAE_TEST_DATA_DIR")
    if not data_dir:
      self.skipTest("SONNET_VQVAE_TEST_DATA_DIR is not set.")
    input_pipeline.check_files(tfds.builder("cifar10", data_dir=data_dir),
                               "cifar10")


class IsTrainingTest(parameterized.TestCase):

  @parameterized.parameters("no", 0, None)
  def test_not_a_bool_is_an_error(self, value):
    for vq in (sonnet_vqvae.VectorQuantizer(8, 16, 0.25),
               sonnet_vqvae.VectorQuantizerEMA(8, 16, 0.25, decay=0.9)):
      before = vq.embeddings.numpy()
      with self.assertRaisesRegex(TypeError, "is_training must be True or "
                                  f"False, got {value!r}"):
        vq(tf.ones([4, 8]), is_training=value)
      np.testing.assert_array_equal(vq.embeddings.numpy(), before)


if __name__ == "__main__":
  absltest.main()
