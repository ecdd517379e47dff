"""Tests for sonnet_vqvae.input_pipeline."""

import os
import shutil
import socket
import tempfile
import threading
import time
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


def _tree(root):
  """{relative path: file bytes or None for a folder} of everything in root."""
  tree = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames:
      tree[os.path.relpath(os.path.join(dirpath, name), root)] = None
    for name in filenames:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        tree[os.path.relpath(path, root)] = f.read()
  return tree


def _write(path, content=b"x"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(content)


def _offline(*args, **kwargs):
  del args, kwargs
  raise OSError("[Errno 101] Network is unreachable")


# Guards against a real download should the connection check be skipped.
_NO_DOWNLOAD = mock.patch.object(
    tfds.download.DownloadManager, "download_and_extract",
    side_effect=AssertionError("tfds started a download."))

class StagedImages(tfds.core.GeneratorBasedBuilder):
  """Six 8x8 images made on the spot: tfds' download path without a network."""

  VERSION = tfds.core.Version("1.0.0")

  # A test module has no package folder of checksums or metadata.
  url_infos = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=(
        tfds.features.FeaturesDict(
            {"image": tfds.features.Image(shape=(8, 8, 3)),
             "label": tfds.features.ClassLabel(num_classes=2)})))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(6):
      yield i, {"image": np.full([8, 8, 3], i, np.uint8), "label": i % 2}


_IMAGES = np.random.RandomState(1).randint(0, 256, [6, 16, 24, 3], np.uint8)


class PreparedDatasetsTest(parameterized.TestCase):
  """load_split and image_spec on small datasets prepared by tfds."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = tempfile.mkdtemp()
    labels = np.arange(6, dtype=np.int64) % 3

    def store(name, features, examples):
      tfds.dataset_builders.store_as_tfds_dataset(
          name, "1.0.0", tfds.features.FeaturesDict(features),
          {"train": tf.data.Dataset.from_tensor_slices(examples)},
          data_dir=cls.data_dir)

    label = tfds.features.ClassLabel(num_classes=3)
    store("tiny_rgb", {"image": tfds.features.Image(shape=(16, 24, 3)),
                       "label": label}, {"image": _IMAGES, "label": labels})
    store("tiny_gray", {"image": tfds.features.Image(shape=(28, 28, 1)),
                        "label": label},
          {"image": np.zeros([6, 28, 28, 1], np.uint8), "label": labels})
    store("tiny_float",
          {"image": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.float32),
           "label": label},
          {"image": np.zeros([6, 8, 8, 3], np.float32), "label": labels})
    store("tiny_pixels", {"pixels": tfds.features.Image(shape=(8, 8, 3)),
                          "label": label},
          {"pixels": np.zeros([6, 8, 8, 3], np.uint8), "label": labels})
    store("tiny_unlabelled", {"image": tfds.features.Image(shape=(8, 8, 3))},
          {"image": np.zeros([6, 8, 8, 3], np.uint8)})

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.data_dir)
    super().tearDownClass()

  def test_any_size_divisible_by_4(self):
    ds = input_pipeline.load_split("train", dataset="tiny_rgb",
                                   data_dir=self.data_dir, download=False)
    examples = list(ds.as_numpy_iterator())
    images = np.stack([e["image"] for e in examples])
    # tfds may reorder examples; compare as sets of images.
    np.testing.assert_allclose(
        np.sort(images.reshape(6, -1), axis=0),
        np.sort(_IMAGES.reshape(6, -1) / 255.0 - 0.5, axis=0), atol=1e-6)
    np.testing.assert_allclose(input_pipeline.data_variance(ds),
                               np.var(_IMAGES / 255.0), rtol=1e-6)
    batch = next(iter(input_pipeline.train_dataset(ds, 4, shuffle_buffer=6)))
    self.assertEqual(batch.shape, (4, 16, 24, 3))

  def test_image_spec_reads_only_metadata(self):
    # Without its example files, the dataset still answers from its metadata.
    with tempfile.TemporaryDirectory() as data_dir:
      src = os.path.join(self.data_dir, "tiny_rgb", "1.0.0")
      dst = os.path.join(data_dir, "tiny_rgb", "1.0.0")
      os.makedirs(dst)
      for name in os.listdir(src):
        if ".tfrecord" not in name:
          tf.io.gfile.copy(os.path.join(src, name), os.path.join(dst, name))
      spec = input_pipeline.image_spec("tiny_rgb", data_dir=data_dir)
    self.assertEqual(spec.shape, (16, 24, 3))
    self.assertEqual(spec.dtype, tf.uint8)

  @parameterized.named_parameters(
      ("channels", "tiny_gray", r"'tiny_gray'.*uint8.*\(28, 28, 1\).*"
       r"\[H, W, 3\].*divisible by 4"),
      ("dtype", "tiny_float", r"'tiny_float'.*float32.*\(8, 8, 3\).*uint8"),
      ("no_image", "tiny_pixels", r"'tiny_pixels'.*no `image`.*'pixels'"),
      ("no_label", "tiny_unlabelled", r"'tiny_unlabelled'.*no `label`"))
  def test_rejects_before_any_work(self, dataset, message):
    as_dataset = mock.patch.object(
        tfds.core.DatasetBuilder, "as_dataset",
        side_effect=AssertionError("read examples"))
    with as_dataset, self.assertRaisesRegex(ValueError, message):
      input_pipeline.load_split("train", dataset=dataset,
                                data_dir=self.data_dir, download=False)


class ImageChecksTest(parameterized.TestCase):

  @parameterized.parameters(((32, 32, 3),), ((16, 24, 3),), ((64, 8, 3),))
  def test_check_images_accepts(self, shape):
    spec = tf.TensorSpec(shape, tf.uint8)
    self.assertEqual(input_pipeline.check_images(spec, dataset="d"), shape)

  @parameterized.parameters(
      ((30, 32, 3), tf.uint8), ((32, 30, 3), tf.uint8), ((32, 32, 1), tf.uint8),
      ((32, 32, 4), tf.uint8), ((None, None, 3), tf.uint8),
      ((32, 32), tf.uint8), ((32, 32, 3), tf.float32), ((32, 32, 3), tf.uint16))
  def test_check_images_rejects(self, shape, dtype):
    with self.assertRaisesRegex(ValueError, "'d' has.*divisible by 4"):
      input_pipeline.check_images(tf.TensorSpec(shape, dtype), dataset="d")

  def test_check_images_other_model(self):
    spec = tf.TensorSpec((24, 24, 1), tf.uint8)
    self.assertEqual(input_pipeline.check_images(
        spec, dataset="d", downsample=8, channels=1), (24, 24, 1))
    with self.assertRaisesRegex(ValueError, r"\[H, W, 1\].*divisible by 16"):
      input_pipeline.check_images(spec, dataset="d", downsample=16, channels=1)

  def test_image_spec_mock(self):
    with tfds.testing.mock_data(num_examples=1):
      self.assertEqual(input_pipeline.image_spec("cifar10"),
                       tf.TensorSpec((32, 32, 3), tf.uint8, name="image"))
      self.assertEqual(input_pipeline.image_spec("mnist").shape, (28, 28, 1))

  def test_mnist_rejected_before_download(self):
    with tempfile.TemporaryDirectory() as data_dir, _NO_DOWNLOAD:
      with mock.patch.object(socket, "create_connection") as connect:
        with self.assertRaisesRegex(ValueError, r"'mnist'.*\(28, 28, 1\)"):
          input_pipeline.load_split("train", dataset="mnist",
                                    data_dir=data_dir)
      connect.assert_not_called()
      self.assertEqual(os.listdir(data_dir), [])


class CheckReachableTest(absltest.TestCase):

  def test_refused_and_invalid_hosts_fail_fast(self):
    start = time.monotonic()
    with self.assertRaisesRegex(
        ConnectionError, r"127\.0\.0\.1:9 .*nothing\.invalid:443"):
      input_pipeline.check_reachable(
          ["http://127.0.0.1:9/a", "https://nothing.invalid/b"], timeout_s=5)
    self.assertLess(time.monotonic() - start, 10)

  def test_hanging_lookup_times_out(self):
    release = threading.Event()
    self.addCleanup(release.set)

    def hang(*args, **kwargs):
      del args, kwargs
      release.wait(60)
      raise OSError("released")

    start = time.monotonic()
    with mock.patch.object(socket, "create_connection", side_effect=hang):
      with self.assertRaisesRegex(ConnectionError,
                                  r"host\.example:80 \(no answer within 0.5 s"):
        input_pipeline.check_reachable(["http://host.example/x"],
                                       timeout_s=0.5)
    self.assertLess(time.monotonic() - start, 3)

  def test_listening_host_and_proxy(self):
    with socket.socket() as server:
      server.bind(("127.0.0.1", 0))
      server.listen(4)
      port = server.getsockname()[1]
      input_pipeline.check_reachable([f"http://127.0.0.1:{port}/a"],
                                     timeout_s=5)
      # Downloads go through the environment's proxy, so the check does too.
      proxy = {"https_proxy": f"http://127.0.0.1:{port}", "no_proxy": ""}
      with mock.patch.dict(os.environ, proxy):
        input_pipeline.check_reachable(["https://nothing.invalid/a"],
                                       timeout_s=5)
      with mock.patch.dict(os.environ, dict(proxy, no_proxy="nothing.invalid")):
        with self.assertRaisesRegex(ConnectionError, "nothing.invalid:443"):
          input_pipeline.check_reachable(["https://nothing.invalid/a"],
                                         timeout_s=5)

  def test_skips_urls_it_cannot_check(self):
    with mock.patch.object(socket, "create_connection") as connect:
      input_pipeline.check_reachable(["gs://bucket/a", "file:///tmp/a"],
                                     timeout_s=1)
    connect.assert_not_called()


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

  def test_offline_fails_fast_and_leaves_nothing(self):
    with tempfile.TemporaryDirectory() as data_dir:
      _write(os.path.join(data_dir, "downloads", "old.tar.gz"))
      before = _tree(data_dir)
      start = time.monotonic()
      offline = mock.patch.object(socket, "create_connection",
                                  side_effect=_offline)
      with offline, _NO_DOWNLOAD, self.assertRaisesRegex(
          ConnectionError, r"www\.cs\.toronto\.edu:443 .*unreachable.*"
          r"--config\.data_dir"):
        input_pipeline.load_split("train", data_dir=data_dir)
      self.assertLess(time.monotonic() - start, 10)
      self.assertEqual(_tree(data_dir), before)

  def test_failed_download_leaves_data_dir_as_it_was(self):
    with tempfile.TemporaryDirectory() as data_dir:
      _write(os.path.join(data_dir, "downloads", "old.tar.gz"), b"old")
      _write(os.path.join(data_dir, "other", "1.0.0", "a.tfrecord"), b"a")
      os.makedirs(os.path.join(data_dir, "staged_images"))
      before = _tree(data_dir)

      def fail_midway(builder, unused_dl_manager):
        # Where tfds writes: the builder's data directory (a staging one).
        root = os.fspath(builder.data_dir_root)
        _write(os.path.join(root, "downloads", "new.tar.gz.tmp"))
        _write(os.path.join(root, "downloads", "extracted", "x", "y"))
        _write(os.path.join(root, "staged_images", "1.0.0.incomplete", "z"))
        raise OSError("Failed to resolve 'www.cs.toronto.edu'")

      download = mock.patch.object(StagedImages, "_split_generators",
                                   autospec=True, side_effect=fail_midway)
      with download as prepare, self.assertRaisesRegex(
          ConnectionError, "toronto.*--config.data_dir"):
        input_pipeline.load_split("train", dataset="staged_images",
                                  data_dir=data_dir)
      prepare.assert_called_once()
      self.assertEqual(_tree(data_dir), before)

  @parameterized.parameters(False, True)
  def test_failed_prepare_removes_the_data_dir_it_created(self, relative):
    with tempfile.TemporaryDirectory() as parent:
      data_dir = os.path.join(parent, "new", "tfds")
      if relative:
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(parent)
        data_dir = os.path.join("new", "tfds")

      def fail(builder, unused_dl_manager):
        _write(os.path.join(os.fspath(builder.data_dir_root), "downloads",
                            "a"))
        raise RuntimeError("disk on fire")

      download = mock.patch.object(StagedImages, "_split_generators",
                                   autospec=True, side_effect=fail)
      with download, self.assertRaisesRegex(RuntimeError, "disk on fire"):
        input_pipeline.load_split("train", dataset="staged_images",
                                  data_dir=data_dir)
      self.assertEqual(os.listdir(parent), [])

  def test_mock_data_prepares_nothing_in_place(self):
    """tfds.testing.mock_data replaces download_and_prepare: called as it is."""
    with tempfile.TemporaryDirectory() as data_dir:
      with tfds.testing.mock_data(num_examples=2):
        self.assertLen(list(input_pipeline.load_split(
            "train", data_dir=data_dir)), 2)
      self.assertEqual(os.listdir(data_dir), [])

  def test_missing_importlib_resources_says_what_to_install(self):
    def missing(self):
      del self
      raise ModuleNotFoundError("No module named 'importlib_resources'",
                                name="importlib_resources")

    url_infos = mock.patch.object(tfds.core.DatasetBuilder, "url_infos",
                                  new=property(missing))
    with tempfile.TemporaryDirectory() as data_dir, url_infos, _NO_DOWNLOAD:
      with self.assertRaisesRegex(ImportError,
                                  "pip install importlib_resources"):
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
    images = np.stack([e["image"] for e in ds.as_numpy_iterator()])
    batches = list(input_pipeline.eval_dataset(ds, 4).as_numpy_iterator())
    # One shape for every batch; the last is padded with zeros and masked.
    self.assertEqual({b.shape for b, _ in batches}, {(4, 32, 32, 3)})
    self.assertEqual([m.tolist() for _, m in batches],
                     [[True] * 4, [True] * 4, [True, True, False, False]])
    real = np.concatenate([b[m] for b, m in batches])
    np.testing.assert_array_equal(real, images)
    np.testing.assert_array_equal(batches[-1][0][2:], 0.)


if __name__ == "__main__":
  absltest.main()
