"""CIFAR-10 from tfds: scaled images, the training variance, batched datasets."""

from typing import Optional

import tensorflow as tf
import tensorflow_datasets as tfds


def load_split(split: str,
               *,
               dataset: str = "cifar10",
               data_dir: Optional[str] = None,
               download: bool = True) -> tf.data.Dataset:
  """Loads one split as unbatched examples.

  Args:
    split: tfds split, e.g. "train", "test" or "train[:10%]".
    dataset: tfds dataset name with 32x32x3 uint8 `image` and `label` features.
    data_dir: directory of prepared tfds datasets (tfds' default when None).
    download: whether tfds may download and prepare the data.

  Returns:
    Dataset of {'image': float32 [32, 32, 3] in [-0.5, 0.5], 'label': int64}.

  Raises:
    FileNotFoundError: when the data is not prepared and download is False.
    ConnectionError: when the data is not prepared and cannot be downloaded.
  """
  builder = tfds.builder(dataset, data_dir=data_dir)
  if not download and not builder.is_prepared():
    raise FileNotFoundError(
        f"No prepared {dataset!r} in {builder.data_dir!r} (data_dir="
        f"{data_dir!r}, download=False). Point `data_dir` (--config.data_dir="
        f"DIR) at a directory holding {dataset}/<version>/ prepared by tfds, "
        "or set download=True on a machine with network access.")
  try:
    ds = tfds.load(dataset, split=split, data_dir=data_dir, download=download)
  except OSError as e:  # requests' network errors are OSErrors too.
    if builder.is_prepared():
      raise
    raise ConnectionError(
        f"Could not download and prepare {dataset!r} into {builder.data_dir!r} "
        f"({e}). Offline, point `data_dir` (--config.data_dir=DIR) at a "
        f"directory holding {dataset}/<version>/ prepared by tfds.") from e
  return ds.map(_scale, num_parallel_calls=tf.data.AUTOTUNE)


def _scale(example):
  image = tf.cast(example["image"], tf.float32) / 255.0 - 0.5
  return {"image": image, "label": example["label"]}


def data_variance(ds: tf.data.Dataset) -> float:
  """Variance of all pixel values of `load_split` images, in [0, 1] scale.

  Computed in one streaming pass (float64 sums), so the split never has to
  fit in memory. Shifting by 0.5 does not change the variance.
  """
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
    Dataset of float32 [per_replica_batch, 32, 32, 3] images, drop_remainder.
  """
  batch_size = global_batch_size
  if input_context is not None:
    batch_size = input_context.get_per_replica_batch_size(global_batch_size)
    ds = ds.shard(input_context.num_input_pipelines,
                  input_context.input_pipeline_id)
  ds = ds.map(lambda example: example["image"])
  ds = ds.shuffle(shuffle_buffer, seed=seed).repeat()
  return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def eval_dataset(ds: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
  """All images of `ds` once, in order, in batches (the last may be smaller)."""
  return ds.map(lambda example: example["image"]).batch(batch_size).prefetch(
      tf.data.AUTOTUNE)
