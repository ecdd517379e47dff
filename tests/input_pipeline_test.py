"""Tests for sonnet_vqvae.input_pipeline."""

import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from sonnet_vqvae import input_pipeline


def _examples(n=10):
  images = np.random.RandomState(0).randint(0, 256, [n, 32, 32, 3], np.uint8)
  ds = tf.data.Dataset.from_tensor_slices(
      {"image": images, "label": np.arange(n, dtype=np.int64)})
  return images, ds.map(input_pipeline._scale)


class InputPipelineTest(parameterized.TestCase):

  def test_load_split_mock(self):
    with tfds.testing.mock_data(num_examples=3):
      ds = input_pipeline.load_split("train")
      examples = list(ds.as_numpy_iterator())
    self.assertLen(examples, 3)
    for example in examples:
      self.assertEqual(example["image"].shape, (32, 32, 3))
      self.assertEqual(example["image"].dtype, np.float32)
      self.assertBetween(example["image"].min(), -0.5, 0.5)
      self.assertBetween(example["image"].max(), -0.5, 0.5)

  def test_missing_data_names_data_dir(self):
    with tempfile.TemporaryDirectory() as data_dir:
      with self.assertRaisesRegex(FileNotFoundError, "data_dir"):
        input_pipeline.load_split("train", data_dir=data_dir, download=False)

  def test_failed_download_names_data_dir(self):
    # What an offline machine sees: the download raises a network error.
    offline = mock.patch.object(
        tfds.core.DatasetBuilder, "download_and_prepare",
        side_effect=OSError("Failed to resolve 'www.cs.toronto.edu'"))
    with tempfile.TemporaryDirectory() as data_dir, offline:
      with self.assertRaisesRegex(ConnectionError,
                                  "toronto.*--config.data_dir"):
        input_pipeline.load_split("train", data_dir=data_dir)

  def test_data_variance_matches_numpy(self):
    images, ds = _examples()
    np.testing.assert_allclose(input_pipeline.data_variance(ds),
                               np.var(images / 255.0), rtol=1e-6)

  def test_train_dataset(self):
    _, ds = _examples(10)
    batches = input_pipeline.train_dataset(ds, 4, shuffle_buffer=10).take(5)
    shapes = [b.shape for b in batches]
    self.assertEqual(shapes, [(4, 32, 32, 3)] * 5)

  def test_train_dataset_sharded_per_replica(self):
    _, ds = _examples(10)
    context = tf.distribute.InputContext(
        num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=2)
    batch = next(iter(input_pipeline.train_dataset(
        ds, 4, shuffle_buffer=1, input_context=context)))
    self.assertEqual(batch.shape, (2, 32, 32, 3))
    _, ds = _examples(10)
    odd = np.stack([e["image"] for e in ds.as_numpy_iterator()][1::2])
    np.testing.assert_array_equal(batch, odd[:2])

  def test_eval_dataset_covers_split_once(self):
    _, ds = _examples(10)
    sizes = [b.shape[0] for b in input_pipeline.eval_dataset(ds, 4)]
    self.assertEqual(sizes, [4, 4, 2])


if __name__ == "__main__":
  absltest.main()
