"""VQ-VAE-2 model: shapes per level, equality with the plain model, replicas;
its runs, and a prior on its codes end to end."""

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

from sonnet_vqvae import distribute
from sonnet_vqvae import export
from sonnet_vqvae import hierarchical
from sonnet_vqvae import input_pipeline
from sonnet_vqvae import networks
from sonnet_vqvae import optim
from sonnet_vqvae import plotting
from sonnet_vqvae import precision
from sonnet_vqvae import prior
from sonnet_vqvae import rundir
from sonnet_vqvae import train
import tiny

_SIZES = dict(num_hiddens=16, num_residual_layers=1, num_residual_hiddens=8,
              embedding_dim=8)


def _model(num_embeddings=(16, 32), **overrides):
  return hierarchical.build_hierarchical(
      num_embeddings=num_embeddings, data_variance=0.06,
      **dict(_SIZES, **overrides))


def _images(batch, size, seed=0):
  return tf.random.stateless_uniform([batch, size, size, 3], [seed, 5]) - .5


class ShapesTest(parameterized.TestCase):

  @parameterized.product(levels=(1, 2, 3), size=(32, 64))
  def test_every_level_has_its_grid(self, levels, size):
    num_embeddings = [8 * (i + 1) for i in range(levels)]
    model = _model(num_embeddings)
    images = _images(2, size)
    out = model(images, is_training=True)
    self.assertEqual(out["x_recon"].shape, images.shape)
    # Top first: the bottom grid is size / 4, each level above halves it.
    grids = [size // 4 // 2**(levels - 1 - i) for i in range(levels)]
    self.assertLen(out["vq_outputs"], levels)
    for vq_output, grid in zip(out["vq_outputs"], grids):
      self.assertEqual(vq_output["quantize"].shape, (2, grid, grid, 8))
    self.assertIs(out["vq_output"], out["vq_outputs"][-1])
    codes = model.encode(images)
    self.assertEqual([c.shape for c in codes],
                     [(2, g, g) for g in grids])
    for c, k in zip(codes, num_embeddings):
      self.assertLess(int(tf.reduce_max(c)), k)
    self.assertEqual(model.decode(codes).shape, images.shape)
    # decode(encode(x)) is the evaluation-mode reconstruction.
    np.testing.assert_allclose(model.decode(codes),
                               model(images, is_training=False)["x_recon"],
                               atol=1e-5)
    self.assertTrue(np.isfinite(float(out["loss"])))

  def test_loss_sums_every_level(self):
    model = _model((8, 8, 8))
    out = model(_images(2, 32), is_training=False)
    expected = out["recon_error"] + sum(o["loss"] for o in out["vq_outputs"])
    self.assertAlmostEqual(float(out["loss"]), float(expected), places=6)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "at least one level"):
      hierarchical.build_hierarchical(num_embeddings=[])
    model = _model((8, 8))
    model(_images(1, 32), is_training=False)
    with self.assertRaisesRegex(ValueError, "takes 2 code grids"):
      model.decode([tf.zeros([1, 8, 8], tf.int32)])
    with self.assertRaisesRegex(ValueError, "upper_encoders must hold 1"):
      hierarchical.HierarchicalVQVAE(
          model.encoder, [], model.pre_vq_convs, model.quantizers,
          model.level_decoders, model.upsamplers, model.decoder, 0.06)


class DecodeTopTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # One model for the class: its tests only decode and evaluate with it.
    cls.model = _model((8, 16, 32))
    cls.codes = cls.model.encode(_images(2, 32))

  def _changed(self, levels):
    """self.codes with every grid of `levels` (indices, top first) changed."""
    return [(c + 1) % vq.num_embeddings if i in levels else c
            for i, (c, vq) in enumerate(zip(self.codes, self.model.quantizers))]

  def test_all_levels_is_decode(self):
    np.testing.assert_array_equal(self.model.decode_top(self.codes, 3),
                                  self.model.decode(self.codes))

  @parameterized.parameters(1, 2)
  def test_reads_only_the_top_levels(self, levels):
    images = self.model.decode_top(self.codes, levels)
    self.assertEqual(images.shape, (2, 32, 32, 3))
    # Finer levels' codes are ignored...
    np.testing.assert_array_equal(
        self.model.decode_top(self._changed(range(levels, 3)), levels),
        images)
    # ... each of the top levels' is read.
    for level in range(levels):
      changed = self.model.decode_top(self._changed([level]), levels)
      self.assertGreater(float(tf.reduce_max(tf.abs(changed - images))), 0,
                         f"level {level}")

  def test_evaluate_reports_each_top_decode(self):
    images = _images(5, 32)
    # Batches of 3: the last is padded, and the padding must not count.
    metrics = train.evaluate(
        self.model, tf.data.Dataset.from_tensor_slices(images).batch(3))
    codes = self.model.encode(images)
    for levels, key in ((1, "top1_nmse"), (2, "top2_nmse"), (3, "nmse")):
      mse = tf.reduce_mean(tf.square(
          self.model.decode_top(codes, levels) - images))
      self.assertAlmostEqual(metrics[key], float(mse) / 0.06, places=5,
                             msg=key)
    self.assertNotIn("top3_nmse", metrics)

  @parameterized.parameters(0, 4, -1, 1.0, True, None)
  def test_bad_levels_are_named(self, levels):
    with self.assertRaisesRegex(
        ValueError, rf"levels must be an int in \[1, 3\].*got {levels!r}"):
      self.model.decode_top(self.codes, levels)


class OneLevelTest(absltest.TestCase):

  def test_one_level_is_the_plain_vqvae(self):
    config = tiny.vqvae_config(num_residual_layers=1)
    plain = networks.build_model(config, data_variance=0.06)
    model = hierarchical.build_hierarchical(
        num_embeddings=[config.num_embeddings], data_variance=0.06,
        num_hiddens=config.num_hiddens,
        num_residual_layers=config.num_residual_layers,
        num_residual_hiddens=config.num_residual_hiddens,
        embedding_dim=config.embedding_dim, seed=config.seed,
        quantizer_options=dict(config.quantizer))
    images = _images(4, 32)
    plain(images, is_training=False)
    model(images, is_training=False)
    # The same modules under the same names: copy by variable name.
    theirs = {v.name: v for v in plain.variables}
    self.assertEqual(sorted(theirs), sorted(v.name for v in model.variables))
    for variable in model.variables:
      variable.assign(theirs[variable.name])
    for is_training in (False, True):
      a = plain(images, is_training=is_training)
      b = model(images, is_training=is_training)
      for key in ("x_recon", "loss", "recon_error", "z"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7,
                                   err_msg=key)
      np.testing.assert_array_equal(a["vq_output"]["encoding_indices"],
                                    b["vq_output"]["encoding_indices"])
    # Training calls updated both EMA codebooks alike.
    np.testing.assert_allclose(plain.quantizer.embeddings,
                               model.quantizer.embeddings, rtol=1e-6)
    np.testing.assert_array_equal(plain.encode(images), model.encode(images)[0])


def _built(strategy, levels=(16, 32)):
  tf.random.set_seed(0)
  with strategy.scope(), tf.variable_creator_scope(
      distribute.replica_consistent_variables):
    model = _model(levels)
    optimizer = optim.Adam(1e-3)
    model(tf.zeros([1, 32, 32, 3]), is_training=False)
    optimizer.build(model.trainable_variables)
  return model, optimizer


# The one-device model and loop, traced once for the tests below (a trace
# costs seconds); a test starts from the saved initial state.
_ONE_DEVICE = []


def _one_device_loop():
  """(model, loop) on the default strategy, at `_built`'s initial state."""
  if not _ONE_DEVICE:
    strategy = tf.distribute.get_strategy()
    model, optimizer = _built(strategy)
    _ONE_DEVICE.extend([
        model, optimizer,
        [v.numpy() for v in model.variables + optimizer.variables],
        train.make_train_loop(model, optimizer, strategy, False)])
  model, optimizer, initial, train_loop = _ONE_DEVICE
  for variable, value in zip(model.variables + optimizer.variables, initial):
    variable.assign(value)
  return model, train_loop


class TrainingTest(absltest.TestCase):

  @pytest.mark.slow
  def test_trains_in_the_compiled_loop(self):
    _, train_loop = _one_device_loop()
    # Smooth images (4x4 blocks of noise, upsampled) a tiny model can learn.
    images = tf.image.resize(_images(4, 4), [32, 32])
    iterator = iter(tf.data.Dataset.from_tensors(images).repeat())
    first = train_loop(iterator, tf.constant(1))["last"]["recon_error"]
    out = train_loop(iterator, tf.constant(120))
    self.assertLess(float(out["last"]["recon_error"]), 0.5 * float(first))

  @pytest.mark.slow
  def test_two_replicas_hold_one_codebook_per_level_and_match_one(self):
    self.assertLen(tf.config.list_logical_devices("CPU"), 2)
    replicator = distribute.make_strategy("replicator")
    model_a, one_device_loop = _one_device_loop()
    model_b, optimizer_b = _built(replicator)
    for a, b in zip(model_a.variables, model_b.variables):
      b.assign(a)
    batches = tf.data.Dataset.from_tensor_slices(
        tf.stack([_images(4, 32, seed=s) for s in range(3)]))
    one_device_loop(iter(batches), tf.constant(3))
    train.make_train_loop(model_b, optimizer_b, replicator, False)(
        iter(replicator.experimental_distribute_dataset(batches)),
        tf.constant(3))
    for level, (vq_a, vq_b) in enumerate(zip(model_a.quantizers,
                                             model_b.quantizers)):
      replicas = replicator.experimental_local_results(vq_b.embeddings)
      self.assertLen(replicas, 2)
      np.testing.assert_array_equal(replicas[0], replicas[1],
                                    err_msg=f"level {level}")
      np.testing.assert_allclose(replicas[0], vq_a.embeddings, atol=1e-5,
                                 err_msg=f"level {level}")

  def test_bfloat16_convolutions_return_float32(self):
    model = _model((8, 8))
    with precision.scope("bfloat16"):
      out = model(_images(2, 32), is_training=True)
    self.assertEqual(out["x_recon"].dtype, tf.float32)
    self.assertEqual({v.dtype for v in model.trainable_variables},
                     {tf.float32})


# The two-level run (train_and_evaluate for 4 steps, resumed to 6), trained
# once for the tests below, which only read it.
_TWO_LEVELS = []


def _two_level_run():
  """(workdir, metrics of its evaluation at step 4)."""
  if not _TWO_LEVELS:
    workdir = tempfile.mkdtemp()
    config = tiny.vqvae_config(num_levels=2, level_num_embeddings=(8, 16))
    with tfds.testing.mock_data(num_examples=16):
      metrics = train.train_and_evaluate(config, workdir)
      # Resumes at step 4 with the same fingerprint (no second evaluation:
      # the rows and the restored run are what is checked of it).
      train.train(tiny.vqvae_config(
          num_levels=2, level_num_embeddings=(8, 16), num_steps=6), workdir)
    _TWO_LEVELS.append((workdir, metrics))
  return _TWO_LEVELS[0]


def tearDownModule():
  for workdir, _ in _TWO_LEVELS:
    shutil.rmtree(workdir, ignore_errors=True)


class TrainConfigTest(parameterized.TestCase):

  @pytest.mark.slow
  def test_train_resume_evaluate_two_levels(self):
    workdir, metrics = _two_level_run()
    for level, k in enumerate((8, 16)):
      self.assertBetween(metrics[f"level{level}_codes_used"], 1, k)
      self.assertGreaterEqual(metrics[f"level{level}_perplexity"], 1.)
    # The top level alone's NMSE (checked in DecodeTopTest); all levels'
    # is nmse.
    self.assertGreater(metrics["top1_nmse"], 0)
    self.assertNotIn("top2_nmse", metrics)
    self.assertTrue(os.path.exists(
        os.path.join(workdir, "level_reconstructions.png")))
    self.assertEqual(metrics["codes_used"], metrics["level1_codes_used"])
    rows = rundir.RunDir(workdir, writer=False).read_rows("metrics.jsonl")
    self.assertEqual([r["step"] for r in rows], [1, 2, 4, 6])
    self.assertIn("level0_perplexity", rows[-1])
    with open(os.path.join(workdir, "run.json")) as f:
      model = json.load(f)["fingerprint"]["model"]
    self.assertEqual(model["num_levels"], 2)
    self.assertEqual(model["level_num_embeddings"], [8, 16])
    restored_config, restored = train.restore_model(workdir)
    self.assertIsInstance(restored, hierarchical.HierarchicalVQVAE)
    self.assertEqual(restored_config.num_steps, 6)
    self.assertEqual([q.num_embeddings for q in restored.quantizers], [8, 16])
    # Another hierarchy in the same workdir is a mismatch, named.
    with tfds.testing.mock_data(num_examples=16):
      with self.assertRaisesRegex(rundir.FingerprintMismatch, "num_levels"):
        train.train(tiny.vqvae_config(num_levels=3, num_steps=8), workdir)

  @pytest.mark.slow
  def test_three_levels_on_64x64_images(self):
    workdir = tempfile.mkdtemp()
    # tfds' 64x64 ImageNet, mocked: 4x4, 8x8 and 16x16 code grids.
    config = tiny.vqvae_config(
        num_levels=3, level_num_embeddings=(8, 8, 16), num_steps=2,
        dataset="imagenet_resized/64x64", eval_split="validation")
    with tfds.testing.mock_data(num_examples=8), absltest.mock.patch.object(
        plotting, "plot_reconstructions",
        wraps=plotting.plot_reconstructions) as plot:
      metrics = train.train_and_evaluate(config, workdir)
    # The figure names the split it shows.
    self.assertEqual(plot.call_args.kwargs["split"], "validation")
    for level in range(3):
      self.assertIn(f"level{level}_codes_used", metrics)
    self.assertIn("top2_nmse", metrics)
    _, model = train.restore_model(workdir)
    codes = model.encode(_images(1, 64))
    self.assertEqual([tuple(c.shape) for c in codes],
                     [(1, 4, 4), (1, 8, 8), (1, 16, 16)])

  def test_plain_fingerprint_is_unchanged(self):
    print_ = train.fingerprint(tiny.vqvae_config(), (32, 32, 3))
    self.assertNotIn("num_levels", print_["model"])
    self.assertNotIn("level_num_embeddings", print_["model"])

  @parameterized.parameters(
      (dict(num_levels=0), "num_levels"),
      (dict(num_levels=2, level_num_embeddings=(8,)), "level_num_embeddings"),
      (dict(num_levels=2, level_num_embeddings=(8, 0)),
       "level_num_embeddings"))
  def test_bad_hierarchy_is_named(self, overrides, key):
    with self.assertRaisesRegex(ValueError, f"config.{key}"):
      train.validate_config(tiny.vqvae_config(**overrides))

  def test_vqvae2_config_file(self):
    from sonnet_vqvae.configs import vqvae2  # pylint: disable=g-import-not-at-top
    config = vqvae2.get_config()
    self.assertEqual(config.num_levels, 2)
    train.validate_config(config)
    model = train.build_model(config, 0.06)
    self.assertIsInstance(model, hierarchical.HierarchicalVQVAE)
    self.assertEqual(train.downsampling(config), 8)


@pytest.mark.slow
class PriorEndToEndTest(absltest.TestCase):
  """The prior on a VQ-VAE-2's codes: train, sample, export."""


  def test_vqvae2_then_prior_then_samples(self):
    vqvae_dir = _two_level_run()[0]  # Read only.
    prior_dir = self.enter_context(tempfile.TemporaryDirectory())
    with tfds.testing.mock_data(num_examples=16):
      # Batches of the 16 mock images, not the default 256 (padding).
      metrics = prior.train_prior(
          tiny.prior_config(num_steps=4), vqvae_dir,
          prior_dir)
    self.assertEqual(metrics["step"], 4)
    self.assertAlmostEqual(metrics["level0_uniform_nats_per_code"],
                           math.log(8))
    self.assertAlmostEqual(metrics["level1_uniform_nats_per_code"],
                           math.log(16))
    for key in ("bits_per_dim", "level0_nll_nats_per_code",
                "level1_nll_nats_per_code", "unigram_bits_per_dim"):
      self.assertTrue(math.isfinite(metrics[key]), key)
    with open(os.path.join(prior_dir, "run.json")) as f:
      print_ = json.load(f)["fingerprint"]
    self.assertEqual(print_["num_embeddings"], [8, 16])
    self.assertEqual(print_["code_shape"], [[4, 4], [8, 8]])

    path = prior.sample(tiny.prior_config(num_samples=4), vqvae_dir,
                        prior_dir)
    self.assertEqual(path, os.path.join(prior_dir, "prior_samples.png"))
    with open(path, "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    # Sampling decodes what the prior draws, top-down, with the VQ-VAE-2.
    _, vqvae = prior.restore_vqvae_of_prior(prior_dir, vqvae_dir)
    _, model = prior.restore_prior(prior_dir)
    images = prior.sample_images(model, vqvae, num_samples=2, label=-1,
                                 temperature=1.0, seed=0)
    codes = model.sample(2, [(4, 4), (8, 8)], labels=[0, 1], seed=0)
    np.testing.assert_array_equal(images, vqvae.decode(codes).numpy())

    # The export: one code grid per level in every signature.
    output = os.path.join(prior_dir, "export")
    export.export_saved_model(prior_dir, output)
    signatures = tf.saved_model.load(output).signatures
    uint8 = np.random.default_rng(0).integers(0, 256, [3, 32, 32, 3],
                                              dtype=np.uint8)
    encoded = signatures["encode"](images=tf.constant(uint8))
    for level, grid in enumerate(vqvae.encode(
        input_pipeline.scale_images(uint8))):
      np.testing.assert_array_equal(encoded[f"codes_{level}"], grid)
    decoded = signatures["decode"](**encoded)
    np.testing.assert_allclose(
        decoded["images"], vqvae.decode([encoded["codes_0"],
                                         encoded["codes_1"]]), atol=1e-5)
    recon = signatures["reconstruct"](images=tf.constant(uint8))
    np.testing.assert_array_equal(recon["images_uint8"],
                                  decoded["images_uint8"])
    drawn = signatures["sample"](labels=tf.constant([0, 1]),
                                 temperature=tf.constant(1.0),
                                 seed=tf.constant(0, tf.int64))
    for level, grid in enumerate(codes):
      np.testing.assert_array_equal(drawn[f"codes_{level}"], grid)
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "codes_1"):
      signatures["decode"](codes_0=encoded["codes_0"],
                           codes_1=encoded["codes_1"] + 16)
    # Each level's grid shape, and one batch for all levels.
    with self.assertRaisesRegex(
        tf.errors.InvalidArgumentError, r"decode: codes_0 must have shape "
        r"\[B, 4, 4\] with B >= 1, received \[3 8 8\]"):
      signatures["decode"](codes_0=encoded["codes_1"],
                           codes_1=encoded["codes_1"])
    with self.assertRaisesRegex(
        tf.errors.InvalidArgumentError, r"decode: codes_1 must have shape "
        r"\[B, 8, 8\] with B the batch of codes_0, received \[2 8 8\]"):
      signatures["decode"](codes_0=encoded["codes_0"],
                           codes_1=encoded["codes_1"][:2])


if __name__ == "__main__":
  absltest.main()
