"""Image datasets from tfds: checked, scaled images, their variance, batches.

`load_split` checks, before any work, that a dataset's images are what the
reference model takes (`check_images`), and downloads only after a quick check
that the download hosts answer (`check_reachable`); a download happens in a
private staging folder, so a failed one removes only what it wrote. Then it
checks every split's files against their recorded sizes (`check_files`: a
truncated or missing file of any split is found before training) and that
the split exists (`check_split`). Unknown or empty dataset names are one line
naming the nearest tfds datasets.
"""

import contextlib
import difflib
import functools
import os
import socket
import threading
import time
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple
import urllib.parse
import urllib.request
import uuid

import tensorflow as tf
import tensorflow_datasets as tfds

# What the reference model takes: two stride-2 convolutions encode, two
# stride-2 transposed convolutions decode to 3 channels.
MODEL_DOWNSAMPLE = 4
MODEL_CHANNELS = 3

# Seconds `load_split` waits for the download hosts before giving up.
CONNECT_TIMEOUT_S = 5.0

_DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21}


def _model_takes(downsample: int = MODEL_DOWNSAMPLE,
                 channels: int = MODEL_CHANNELS) -> str:
  return (f"a uint8 `image` feature of [H, W, {channels}] images with H and W "
          f"divisible by {downsample}, the same for every image")


def load_split(split: str,
               *,
               dataset: str = "cifar10",
               data_dir: Optional[str] = None,
               download: bool = True) -> tf.data.Dataset:
  """Loads one split as unbatched examples.

  Checks the dataset's metadata first (`image_spec`, `check_images`); when it
  must download, checks that the download hosts answer (`check_reachable`),
  then downloads and prepares in a private staging folder of the data
  directory and moves the prepared dataset into place: a failed download
  removes only that folder (and folders it created, if left empty), never
  files that other processes write into the data directory meanwhile.

  Args:
    split: tfds split, e.g. "train", "test" or "train[:10%]".
    dataset: tfds dataset name with a uint8 [H, W, 3] `image` feature (H and
      W divisible by 4) and a `label` feature.
    data_dir: directory of prepared tfds datasets (tfds' default when None).
    download: whether tfds may download and prepare the data.

  Returns:
    Dataset of {'image': float32 [H, W, 3] in [-0.5, 0.5], 'label': the
    dataset's label}.

  Raises:
    ValueError: when the dataset is unknown, its images or features are not
      what the model takes (before anything is read or downloaded), or it
      has no split `split`.
    FileNotFoundError: when the data is not prepared and download is False,
      or a file of a prepared split is missing.
    ConnectionError: when the data is not prepared and cannot be downloaded.
    tf.errors.DataLossError: when a split's files are shorter than tfds
      recorded (`check_files`).
  """
  builder = _builder(dataset, data_dir)
  check_images(_image_spec(builder, dataset), dataset=dataset)
  if "label" not in builder.info.features.keys():
    raise ValueError(
        f"Dataset {dataset!r} has no `label` feature (it has "
        f"{sorted(builder.info.features.keys())}); load_split yields each "
        "image's label. Choose a tfds dataset with `image` and `label` "
        "features (--config.dataset=NAME).")
  if not builder.is_prepared():
    if not download:
      raise FileNotFoundError(
          f"No prepared {dataset!r} in {os.fspath(builder.data_dir)!r} "
          f"(data_dir={data_dir!r}, download=False). Point `data_dir` "
          f"(--config.data_dir=DIR) at a directory holding "
          f"{dataset}/<version>/ prepared by tfds, or set download=True on a "
          "machine with network access.")
    _download_and_prepare(builder, dataset)
    # Prepared elsewhere and moved into place: read what is on disk now.
    builder = _builder(dataset, data_dir)
  check_files(builder, dataset)
  _check_split(builder, split, dataset)
  ds = builder.as_dataset(split=split)
  return ds.map(_scale, num_parallel_calls=tf.data.AUTOTUNE)


def _builder(dataset: str,
             data_dir: Optional[str]) -> tfds.core.DatasetBuilder:
  """tfds.builder, with a one-line error for an empty or unknown name."""
  if not dataset or not dataset.strip():
    raise ValueError("The dataset name is empty: name a tfds dataset, e.g. "
                     "--config.dataset=cifar10.")
  try:
    return tfds.builder(dataset, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    # tfds' own message lists all ~450 datasets: name the nearest few.
    name = dataset.split("/")[0].split(":")[0]
    nearest = difflib.get_close_matches(
        name, tfds.list_builders(with_community_datasets=False), n=3,
        cutoff=0.6)
    hint = (f"did you mean {' or '.join(nearest)}?" if nearest else
            "tfds.list_builders() lists the datasets tfds can download.")
    if data_dir is None:
      where = ""
    elif not tf.io.gfile.exists(data_dir):
      where = f", and data_dir {data_dir!r} does not exist (--config.data_dir)"
    else:
      where = f", and data_dir {data_dir!r} holds no prepared {name}/"
    raise ValueError(f"Unknown tfds dataset {dataset!r} (--config.dataset)"
                     f"{where}: {hint}") from None
  except (ValueError, AssertionError) as e:  # An unknown config or version.
    raise ValueError(f"Cannot load tfds dataset {dataset!r} "
                     f"(--config.dataset): {' '.join(str(e).split())}") from e


def check_split(split: str, *, dataset: str, data_dir: Optional[str] = None,
                name: str = "split") -> None:
  """Raises ValueError, before any work, if `dataset` has no split `split`.

  Reads the dataset's metadata only. A split may be sliced or combined as
  tfds allows ("test[:10%]", "train+test"). When the splits are not known
  yet (a dataset to be downloaded, or mock data) nothing is checked: tfds
  checks them once the data is prepared.

  Args:
    split: the split, e.g. "test".
    dataset: tfds dataset name.
    data_dir: directory of prepared tfds datasets (tfds' default when None).
    name: what the error calls the split, e.g. "config.eval_split".
  """
  _check_split(_builder(dataset, data_dir), split, dataset, name)


def _check_split(builder: tfds.core.DatasetBuilder, split: str, dataset: str,
                 name: str = "split") -> None:
  splits = builder.info.splits
  if not splits:
    return
  try:
    splits[split]
  except (KeyError, ValueError, AssertionError) as e:
    names = ", ".join(sorted(splits))
    if any(part.split("[")[0].strip() not in splits
           for part in split.split("+")):
      raise ValueError(f"{name} {split!r} is not a split of {dataset!r}: its "
                       f"splits are {names}.") from None
    # A known split, sliced in a way tfds refuses.
    raise ValueError(f"{name} {split!r} cannot be read from {dataset!r} "
                     f"(splits {names}): {' '.join(str(e).split())}") from None


# A tfrecord holds each record with 16 bytes of framing: its length and two
# CRCs. tfds' num_bytes counts the records alone.
_TFRECORD_FRAMING_BYTES = 16


def check_files(builder: tfds.core.DatasetBuilder, dataset: str) -> None:
  """Raises if a split's files are missing or shorter than tfds recorded.

  A stat of each file against the split's size in dataset_info.json: cheap,
  and it finds a truncated copy or download of any split (the test split's
  too) before training rather than when that split is read.

  Raises:
    FileNotFoundError: naming a split's missing file.
    tf.errors.DataLossError: naming the split whose files are truncated.
  """
  reads_files = (type(builder).as_dataset.__module__ ==
                 tfds.core.DatasetBuilder.__module__)  # Not mock data.
  if (not reads_files or not builder.is_prepared() or
      builder.info.file_format != tfds.core.FileFormat.TFRECORD):
    return
  again = (f"Prepare {dataset!r} again: delete {os.fspath(builder.data_dir)!r}"
           " and run with download=True, or copy the whole folder again.")
  for split, info in builder.info.splits.items():
    paths = [os.fspath(p) for p in info.filepaths]
    for path in paths:
      if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"{path!r}, a file of {dataset!r}'s {split!r} split, is missing. "
            + again)
    size = sum(tf.io.gfile.stat(path).length for path in paths)
    expected = info.num_bytes + _TFRECORD_FRAMING_BYTES * info.num_examples
    if size < expected:
      where = (repr(paths[0]) if len(paths) == 1 else
               f"the {len(paths)} files {paths[0]!r}, ...")
      raise tf.errors.DataLossError(
          None, None,
          f"{where} of {dataset!r}'s {split!r} split hold {size} bytes, "
          f"fewer than the {expected} its dataset_info.json records: "
          f"truncated (an interrupted copy or download?). {again}")


@contextlib.contextmanager
def naming_corrupt_files(split: str, *, dataset: str,
                         data_dir: Optional[str] = None) -> Iterator[None]:
  """Re-raises a DataLossError from reading `split` naming its bad file.

  TensorFlow's error says only "corrupted record at <offset>". On that error
  (only then) each of the split's files is read once to find the first one
  that does not read whole, and the error names it and what to do.

  Args:
    split: the split the body reads, e.g. "train" or "test[:10%]".
    dataset: tfds dataset name.
    data_dir: directory of prepared tfds datasets (tfds' default when None).

  Yields:
    None.
  """
  try:
    yield
  except tf.errors.DataLossError as e:
    builder = _builder(dataset, data_dir)
    names = [part.split("[")[0].strip() for part in split.split("+")]
    paths = [os.fspath(p) for name in names if name in builder.info.splits
             for p in builder.info.splits[name].filepaths]
    bad = next((p for p in paths if not _reads_whole(p)), None)
    where = (repr(bad) if bad else
             f"one of the files of {dataset!r}'s {split!r} split")
    cause = " ".join(e.message.split()).split("[Op:")[0].strip()
    raise tf.errors.DataLossError(
        e.node_def, e.op,
        f"{where} is corrupt ({cause}). Prepare {dataset!r} again: delete "
        f"{os.fspath(builder.data_dir)!r} and run with download=True, or "
        "copy the whole folder again.") from e


def _reads_whole(path: str) -> bool:
  """Whether every record of the tfrecord `path` reads with a valid CRC."""
  try:
    tf.data.TFRecordDataset(path).reduce(0, _count)
  except tf.errors.DataLossError:
    return False
  return True


def _download_and_prepare(builder: tfds.core.DatasetBuilder,
                          dataset: str) -> None:
  """Downloads and prepares `builder`'s data, failing fast when offline.

  tfds' own download_and_prepare runs in a staging folder (see `load_split`).
  A replaced one (tfds.testing.mock_data, a builder's override) runs as it
  is: where it writes is its own business, and nothing is removed after it.
  """
  if (type(builder).download_and_prepare.__module__
      != tfds.core.DatasetBuilder.__module__):
    try:
      builder.download_and_prepare()
    except OSError as e:  # requests' network errors are OSErrors too.
      raise ConnectionError(_offline_message(builder, dataset, e)) from e
    return
  # Only tfds' own download_and_prepare fetches `url_infos`.
  try:
    check_reachable(_download_urls(builder, dataset),
                    timeout_s=CONNECT_TIMEOUT_S)
  except ConnectionError as e:
    raise ConnectionError(_offline_message(builder, dataset, e)) from e
  root = os.fspath(builder.data_dir_root)
  with _staging_folder(root, dataset) as staging:
    staged = tfds.builder(dataset, data_dir=staging)
    try:
      staged.download_and_prepare(
          download_dir=os.path.join(staging, "downloads"),
          # Files a user put in place for datasets tfds cannot download.
          download_config=tfds.download.DownloadConfig(
              manual_dir=os.path.join(root, "downloads", "manual")))
    except OSError as e:  # requests' network errors are OSErrors too.
      raise ConnectionError(_offline_message(builder, dataset, e)) from e
    prepared = os.fspath(staged.data_dir)
    target = os.path.join(root, os.path.relpath(prepared, staging))
    tf.io.gfile.makedirs(os.path.dirname(target))
    if tf.io.gfile.exists(target):
      return  # Another process prepared it meanwhile: keep theirs.
    tf.io.gfile.rename(prepared, target)


def _offline_message(builder: tfds.core.DatasetBuilder, dataset: str,
                     error: Exception) -> str:
  return (f"Could not download and prepare {dataset!r} into "
          f"{os.fspath(builder.data_dir)!r} ({error}). Offline, point "
          "`data_dir` (--config.data_dir=DIR) at a directory holding "
          f"{dataset}/<version>/ prepared by tfds (e.g. copied from a machine "
          "that ran it online), or run again with network access.")


def _download_urls(builder: tfds.core.DatasetBuilder,
                   dataset: str) -> Sequence[str]:
  """The URLs tfds lists for `builder` (none when it lists no checksums)."""
  try:
    url_infos = builder.url_infos
  except ModuleNotFoundError as e:
    # tensorflow-datasets imports it here without requiring it on Python 3.9+.
    if e.name != "importlib_resources":
      raise
    raise ImportError(
        "tensorflow-datasets needs the `importlib_resources` package to "
        f"download {dataset!r}, and it is not installed: `pip install "
        "importlib_resources` (sonnet_vqvae's setup.py requires it).") from e
  return sorted(url_infos or ())


def check_reachable(urls: Sequence[str], *, timeout_s: float) -> None:
  """Raises unless a TCP connection opens to the host of every URL.

  Connects where `requests` would: to the proxy from the environment
  (`https_proxy`, `all_proxy`, ... unless `no_proxy` matches) or to the host.
  All hosts are tried at once, so the check takes at most about `timeout_s`
  even when name resolution hangs. URLs other than http, https and ftp are
  not checked.

  Args:
    urls: URLs that will be fetched.
    timeout_s: seconds to wait for all connections.

  Raises:
    ConnectionError: naming each host that did not answer and why.
  """
  targets = {t for t in map(_connect_target, urls) if t is not None}
  errors: Dict[Tuple[str, int], Optional[BaseException]] = {}

  def connect(target):
    try:
      with socket.create_connection(target, timeout=timeout_s):
        errors[target] = None
    except OSError as e:
      errors[target] = e

  # Daemon threads: a name lookup that never returns must not block exit.
  threads = [threading.Thread(target=connect, args=(t,), daemon=True)
             for t in targets]
  deadline = time.monotonic() + timeout_s
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(max(0.0, deadline - time.monotonic()))
  failures = []
  for host, port in sorted(targets):
    error = errors.get((host, port), TimeoutError(
        f"no answer within {timeout_s:g} s"))
    if error is not None:
      failures.append(f"{host}:{port} ({error})")
  if failures:
    raise ConnectionError(f"cannot connect to {', '.join(failures)}")


def _connect_target(url: str) -> Optional[Tuple[str, int]]:
  """(host, port) a download of `url` connects to, or None to skip it."""
  parts = urllib.parse.urlsplit(url)
  if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
    return None
  proxies = urllib.request.getproxies()
  proxy = proxies.get(parts.scheme) or proxies.get("all")
  if proxy and not urllib.request.proxy_bypass(parts.hostname):
    # requests reads a proxy without a scheme as http://.
    if "://" not in proxy:
      proxy = "http://" + proxy
    proxy_parts = urllib.parse.urlsplit(proxy)
    if proxy_parts.hostname:
      return proxy_parts.hostname, (proxy_parts.port or
                                    _DEFAULT_PORTS.get(proxy_parts.scheme, 80))
  return parts.hostname, parts.port or _DEFAULT_PORTS[parts.scheme]


@contextlib.contextmanager
def _staging_folder(root: str, dataset: str) -> Iterator[str]:
  """A new folder of this process under `root`, removed however the body ends.

  Folders made to hold it (`root` and missing parents) are removed too on
  failure, each only if empty: another process may have put files there.

  Args:
    root: the data directory tfds writes into.
    dataset: tfds dataset name, part of the folder's name.

  Yields:
    The folder's path.
  """
  created = []
  if "://" not in root:
    # tfds makes missing parents (left alone on remote file systems).
    root = os.path.abspath(root)
    parent = root
    while not tf.io.gfile.exists(parent):
      created.append(parent)
      parent = os.path.dirname(parent)
  staging = os.path.join(root, f".staging-{dataset.replace('/', '_')}-"
                               f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
  tf.io.gfile.makedirs(staging)
  succeeded = False
  try:
    yield staging
    succeeded = True
  finally:
    if tf.io.gfile.exists(staging):
      tf.io.gfile.rmtree(staging)
    if not succeeded:
      for folder in created:  # Innermost first.
        with contextlib.suppress(OSError):
          os.rmdir(folder)  # Only if empty.


def image_spec(dataset: str, *, data_dir: Optional[str] = None
               ) -> tf.TensorSpec:
  """Shape and dtype of a tfds dataset's `image` feature, from its metadata.

  Reads no examples: prepared datasets answer from their dataset_info.json,
  others from their builder's code (also under `tfds.testing.mock_data`).

  Args:
    dataset: tfds dataset name.
    data_dir: directory of prepared tfds datasets (tfds' default when None).

  Returns:
    TensorSpec of one image, e.g. [32, 32, 3] uint8 (None for a size that
    varies between images).

  Raises:
    ValueError: when the dataset is unknown or has no `image` tensor feature.
  """
  return _image_spec(_builder(dataset, data_dir), dataset)


def _image_spec(builder: tfds.core.DatasetBuilder,
                dataset: str) -> tf.TensorSpec:
  features = builder.info.features
  names = sorted(features.keys()) if hasattr(features, "keys") else []
  if "image" not in names:
    raise ValueError(
        f"Dataset {dataset!r} has no `image` feature (it has {names}). "
        f"The model takes {_model_takes()}; choose such a tfds dataset "
        "(--config.dataset=NAME).")
  image = features["image"]
  if not isinstance(image.shape, tuple):
    raise ValueError(
        f"Dataset {dataset!r}'s `image` feature is {image}, not one tensor. "
        f"The model takes {_model_takes()}.")
  return tf.TensorSpec(image.shape, image.tf_dtype, name="image")


def check_images(spec: tf.TensorSpec,
                 *,
                 dataset: str,
                 downsample: int = MODEL_DOWNSAMPLE,
                 channels: int = MODEL_CHANNELS) -> Tuple[int, int, int]:
  """Checks that images of `spec` are what the model takes.

  Args:
    spec: one image, as from `image_spec`.
    dataset: the dataset's name, for the error message.
    downsample: factor by which the encoder shrinks H and W (the decoder
      grows them back by it).
    channels: image channels the decoder outputs.

  Returns:
    (H, W, C).

  Raises:
    ValueError: naming the dataset, its image shape and dtype and what the
      model takes, unless the images are uint8 [H, W, channels] with H and W
      divisible by `downsample`.
  """
  shape = tuple(spec.shape.as_list()) if spec.shape.rank is not None else None
  if (spec.dtype != tf.uint8 or shape is None or len(shape) != 3 or
      None in shape or shape[0] % downsample or shape[1] % downsample or
      shape[2] != channels):
    raise ValueError(
        f"Dataset {dataset!r} has {spec.dtype.name} images of shape {shape}; "
        f"the model takes {_model_takes(downsample, channels)}. Choose such a "
        "tfds dataset (--config.dataset=NAME), or resize and convert its "
        "images first.")
  return shape


def scale_images(images: tf.Tensor) -> tf.Tensor:
  """uint8 images -> float32 in [-0.5, 0.5], the range the model trains on."""
  return tf.cast(images, tf.float32) / 255.0 - 0.5


# The functions tf.data traces below hold no Python control flow on tensors:
# marked so, AutoGraph skips rewriting their source (about a second per
# process, as `tf.function(autograph=False)` saves for the training loop).
@tf.autograph.experimental.do_not_convert
def _scale(example):
  return {"image": scale_images(example["image"]), "label": example["label"]}


@tf.autograph.experimental.do_not_convert
def _image(example):
  return example["image"]


@tf.autograph.experimental.do_not_convert
def _count(n, unused_record):
  return n + 1


def data_variance(ds: tf.data.Dataset) -> float:
  """Variance of all pixel values of `load_split` images, in [0, 1] scale.

  Computed in one streaming pass (float64 sums), so the split never has to
  fit in memory; images may have any shape. Shifting by 0.5 does not change
  the variance.
  """
  @tf.autograph.experimental.do_not_convert
  def add(acc, example):
    x = tf.cast(tf.reshape(example["image"], [-1]), tf.float64)
    return (acc[0] + tf.reduce_sum(x), acc[1] + tf.reduce_sum(tf.square(x)),
            acc[2] + tf.cast(tf.size(x), tf.float64))
  zero = tf.constant(0.0, tf.float64)
  total, total_sq, count = ds.reduce((zero, zero, zero), add)
  if count == 0:
    raise ValueError("data_variance: empty dataset.")
  mean = total / count
  return float(total_sq / count - mean * mean)


def train_dataset(ds: tf.data.Dataset,
                  global_batch_size: int,
                  *,
                  shuffle_buffer: int = 10_000,
                  seed: int = 0,
                  input_context: Optional[tf.distribute.InputContext] = None
                  ) -> tf.data.Dataset:
  """Shuffled, repeated batches of images for training.

  Args:
    ds: unbatched examples from `load_split`.
    global_batch_size: images per step over all replicas.
    shuffle_buffer: shuffle buffer size.
    seed: shuffle seed.
    input_context: from `strategy.distribute_datasets_from_function`; each
      input pipeline then reads its own shard and yields per-replica batches.

  Returns:
    Dataset of float32 [per_replica_batch, H, W, 3] images, drop_remainder.
  """
  batch_size = global_batch_size
  if input_context is not None:
    batch_size = input_context.get_per_replica_batch_size(global_batch_size)
    ds = ds.shard(input_context.num_input_pipelines,
                  input_context.input_pipeline_id)
  ds = ds.map(_image)
  ds = ds.shuffle(shuffle_buffer, seed=seed).repeat()
  return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


@tf.autograph.experimental.do_not_convert
def pad_batch(batch: Any, batch_size: int) -> Tuple[Any, tf.Tensor]:
  """Pads a batch (a nest of [n, ...] tensors) with zeros to `batch_size` rows.

  Returns:
    (the padded nest, mask): mask is a [batch_size] bool, True for the n
    real rows. Batches of one fixed shape compile once (a TPU or XLA
    otherwise compiles again for a smaller last batch).
  """
  n = tf.shape(tf.nest.flatten(batch)[0])[0]

  def pad(x):
    x = tf.pad(x, [[0, batch_size - n]] + [[0, 0]] * (len(x.shape) - 1))
    return tf.ensure_shape(x, [batch_size, *x.shape[1:]])

  return tf.nest.map_structure(pad, batch), tf.range(batch_size) < n


def padded_batches(ds: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
  """Every element of `ds` once, in order, as (batch, mask) of fixed shape.

  The last batch is padded with zeros (see `pad_batch`); `mask` marks the
  real elements.
  """
  return ds.batch(batch_size).map(
      functools.partial(pad_batch, batch_size=batch_size))


def eval_dataset(ds: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
  """All images of `ds` once, in order, as fixed-shape (images, mask) batches.

  images: float32 [batch_size, H, W, C]; mask: bool [batch_size], False for
  the zero images that pad the last batch.
  """
  return padded_batches(ds.map(_image),
                        batch_size).prefetch(tf.data.AUTOTUNE)
