"""Evaluation, encoding and sampling on the strategy's replicas.

On the 2 logical CPUs of tests/conftest.py: the metrics, codes and images of
`distribute.run_batches` under a 2-replica strategy equal one device's, with
batches that do not split evenly over the replicas and a padded last batch,
and the models ran in replica context on both replicas.
"""

from unittest import mock

from absl.testing import absltest
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from sonnet_vqvae import distribute
from sonnet_vqvae import input_pipeline
from sonnet_vqvae import networks
from sonnet_vqvae import pixelcnn
from sonnet_vqvae import prior
from sonnet_vqvae import train
import bottleneck_checks
import tiny


def _replica_spy(cls, method):
  """Patches cls.method to record each call's replica id (at trace time)."""
  original = getattr(cls, method)
  seen = set()

  def record(self, *args, **kwargs):
    context = tf.distribute.get_replica_context()
    seen.add(None if context is None else int(tf.get_static_value(
        context.replica_id_in_sync_group)))
    return original(self, *args, **kwargs)

  return mock.patch.object(cls, method, record), seen


def _copy(source, target):
  for a, b in zip(source.variables, target.variables):
    b.assign(a)


class DistributedEvaluationTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.replicator = bottleneck_checks.two_replicas()  # The 2 CPUs' one.
    config = tiny.vqvae_config()
    cls.one, _ = train.create_model_and_optimizer(
        config, 0.06, tf.distribute.get_strategy())
    cls.two, _ = train.create_model_and_optimizer(config, 0.06, cls.replicator)
    _copy(cls.one, cls.two)
    cls.prior_one = prior.build_prior(tiny.prior_config(), tiny.NUM_EMBEDDINGS)
    with cls.replicator.scope():
      cls.prior_two = prior.build_prior(tiny.prior_config(),
                                        tiny.NUM_EMBEDDINGS)
    _copy(cls.prior_one, cls.prior_two)

  def test_vqvae_metrics_equal_one_device_on_both_replicas(self):
    self.assertEqual(self.replicator.num_replicas_in_sync, 2)
    images = tf.random.stateless_uniform([7, 32, 32, 3], [1, 2]) - .5
    # Batches of 3 (padded to 4 for 2 replicas), the last one padded.
    batches = input_pipeline.eval_dataset(
        tf.data.Dataset.from_tensor_slices({"image": images}), 3)
    metrics, counts, (originals, recons) = train._evaluate(self.one, batches)
    spy, seen = _replica_spy(networks.VQVAEModel, "__call__")
    with spy:
      metrics_two, counts_two, (originals_two, recons_two) = train._evaluate(
          self.two, batches, self.replicator)
    self.assertEqual(seen, {0, 1})
    self.assertEqual(metrics_two.keys(), metrics.keys())
    for key, value in metrics.items():
      self.assertAlmostEqual(metrics_two[key], value, places=5, msg=key)
    np.testing.assert_array_equal(counts_two, counts)
    self.assertEqual(counts[0].sum(), 7 * 8 * 8)  # The padding not counted.
    # The first batch comes back whole, in order.
    np.testing.assert_array_equal(originals_two, images[:3])
    np.testing.assert_allclose(recons_two[0], recons[0], atol=1e-6)

  def test_prior_nll_and_codes_equal_one_device(self):
    rng = np.random.default_rng(0)
    data = {"codes": rng.integers(0, tiny.NUM_EMBEDDINGS, [5, 8, 8],
                                  dtype=np.int32),
            "labels": rng.integers(0, 10, [5], dtype=np.int32)}
    expected = prior.evaluate(self.prior_one, data, batch_size=3)
    spy, seen = _replica_spy(pixelcnn.GatedPixelCNN, "__call__")
    with spy:
      got = prior.evaluate(self.prior_two, data, batch_size=3,
                           strategy=self.replicator)
    self.assertEqual(seen, {0, 1})
    for key, value in expected.items():
      self.assertAlmostEqual(got[key], value, places=5, msg=key)

    options = dict(batch_size=3, dataset="cifar10", data_dir=None,
                   download=True)
    with tfds.testing.mock_data(num_examples=5):
      codes = prior.encode_split(self.one, "test", **options)
      spy, seen = _replica_spy(networks.VQVAEModel, "encode")
      with spy:
        codes_two = prior.encode_split(self.two, "test",
                                       strategy=self.replicator, **options)
    self.assertEqual(seen, {0, 1})
    np.testing.assert_array_equal(codes_two["codes"], codes["codes"])
    np.testing.assert_array_equal(codes_two["labels"], codes["labels"])
    self.assertEqual(codes["codes"].shape, (5, 8, 8))

  def test_samples_split_over_replicas_deterministically(self):
    # One class: samples 0, 1 on replica 0 and 2, 3 on replica 1.
    draw = lambda: prior.sample_images(
        self.prior_two, self.two, num_samples=4, label=2, temperature=1.0,
        seed=5, strategy=self.replicator)
    spy, seen = _replica_spy(pixelcnn.GatedPixelCNN, "__call__")
    with spy:
      images = draw()
    self.assertEqual(seen, {0, 1})
    self.assertEqual(images.shape, (4, 32, 32, 3))
    np.testing.assert_array_equal(draw(), images)
    # Replica 1 draws with its own seed: its first sample is not replica 0's.
    self.assertFalse(np.array_equal(images[0], images[2]))

  def test_calls_with_one_key_run_one_trace_of_current_values(self):
    batches = input_pipeline.padded_batches(
        tf.data.Dataset.from_tensor_slices(tf.range(5.)), 3)
    scale, owner, traces = tf.Variable(1.), object(), []

    def run(strategy, key, name="first"):
      def times_scale(batch, mask):
        traces.append(name)  # At trace time only.
        return tf.reduce_sum(tf.where(mask, batch, 0.)), batch * scale
      out = list(distribute.run_batches(strategy, times_scale, batches,
                                        key=key))
      return (sum(float(totals) for totals, _, _ in out),
              np.concatenate([rows.numpy()[mask.numpy()]
                              for _, rows, mask in out]))

    one_device = tf.distribute.get_strategy()
    np.testing.assert_array_equal(run(one_device, ("k", owner))[1],
                                  [0, 1, 2, 3, 4])
    self.assertEqual(traces, ["first"])
    # The same key: the first call's trace, reading the variable's new value
    # (this call's function is never traced).
    scale.assign(2.)
    total, rows = run(one_device, ("k", owner), name="second")
    np.testing.assert_array_equal(rows, [0, 2, 4, 6, 8])
    self.assertEqual((total, traces), (10., ["first"]))
    # Another key, no key, or another strategy: traced anew.
    run(one_device, ("k", object()))
    run(one_device, None)
    run(one_device, None)
    self.assertLen(traces, 4)
    with self.replicator.scope():
      scale = tf.Variable(3.)
    total, rows = run(self.replicator, ("k", owner), name="replicas")
    np.testing.assert_array_equal(rows, [0, 3, 6, 9, 12])
    self.assertEqual(total, 10.)
    self.assertEqual(traces[4:], ["replicas"] * 2)  # One trace per replica.
    run(self.replicator, ("k", owner))
    self.assertLen(traces, 6)

  def test_variables_of_another_strategy_are_an_error(self):
    batches = tf.data.Dataset.from_tensors(tf.zeros([2, 32, 32, 3]))
    with self.assertRaisesRegex(ValueError, r"strategy\.scope\(\)"):
      train.evaluate(self.one, batches, self.replicator)


if __name__ == "__main__":
  absltest.main()
