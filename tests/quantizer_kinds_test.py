"""config.quantizer.kind: every bottleneck through train, evaluate, prior, export.

The modules themselves are tested in their own files; here each kind is the
bottleneck of our model and trainer: the config builds it, a run's
fingerprint names it (and stays what it was for the runs from before the
kinds), bad options are named, and on mock data each kind trains, evaluates
and draws its figures; each but "vq" (whose prior and export run "ema"'s
code) fits a prior and exports a SavedModel that loads without our code, as
does a user's module holding its trained bottleneck.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import bottleneck_checks
from sonnet_vqvae import export
from sonnet_vqvae import prior
from sonnet_vqvae import train
import tiny

# Each kind's tiny options: config overrides, quantizer overrides, and the
# (embedding_dim, codes per grid, grids) they give.
KINDS = {
    "vq": ({}, {"kind": "vq"}, (8, 16, 1)),
    "ema": ({}, {"kind": "ema"}, (8, 16, 1)),
    "rotation": ({}, {"kind": "vq", "gradient": "rotation"}, (8, 16, 1)),
    "residual": ({}, {"kind": "residual", "num_stages": 3}, (8, 16, 3)),
    "fsq": ({}, {"kind": "fsq", "levels": (3, 4)}, (2, 12, 1)),
    "lfq": ({"num_embeddings": 32}, {"kind": "lfq"}, (5, 32, 1)),
}


def _config(kind, **overrides):
  config_overrides, quantizer, _ = KINDS[kind]
  config = tiny.vqvae_config(**config_overrides, **overrides)
  config.quantizer.update(quantizer)
  return config


def _images(n=3, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, [n, 32, 32, 3]).astype(np.uint8)


class FingerprintTest(absltest.TestCase):

  def test_default_run_is_the_one_from_before_the_kinds(self):
    # The model entry of a tiny run's run.json before the kinds existed: a
    # workdir holding it must resume.
    before = {
        "num_hiddens": 16, "num_residual_hiddens": 8,
        "num_residual_layers": 2, "embedding_dim": 8, "num_embeddings": 16,
        "commitment_cost": 0.25, "use_ema": True, "decay": 0.99,
        "quantizer": {"usage_decay": 0.99, "dead_code_threshold": 0.0,
                      "kmeans_init": False, "kmeans_iters": 10,
                      "cosine": False}}
    self.assertEqual(train.fingerprint(tiny.vqvae_config(), (32, 32, 3))
                     ["model"], before)
    before["use_ema"] = False
    self.assertEqual(train.fingerprint(tiny.vqvae_config(use_ema=False),
                                       (32, 32, 3))["model"], before)

  def test_explicit_vq_and_ema_kinds_are_use_ema(self):
    for use_ema in (True, False):
      for kind in ("vq", "ema"):
        config = tiny.vqvae_config(use_ema=use_ema)
        config.quantizer.kind = kind
        self.assertEqual(
            train.fingerprint(config, (32, 32, 3)),
            train.fingerprint(tiny.vqvae_config(use_ema=kind == "ema"),
                              (32, 32, 3)))

  def test_other_kinds_and_gradient_are_named(self):
    model = train.fingerprint(_config("rotation"), (32, 32, 3))["model"]
    self.assertEqual(model["quantizer"]["gradient"], "rotation")
    model = train.fingerprint(_config("residual"), (32, 32, 3))["model"]
    self.assertEqual(model["quantizer"]["kind"], "residual")
    self.assertEqual(model["quantizer"]["num_stages"], 3)
    self.assertNotIn("levels", model["quantizer"])
    model = train.fingerprint(_config("fsq"), (32, 32, 3))["model"]
    self.assertEqual(model["quantizer"]["levels"], [3, 4])
    self.assertEqual((model["embedding_dim"], model["num_embeddings"]),
                     (2, 12))
    # Options of another kind do not make another run.
    config = _config("fsq")
    config.quantizer.num_stages = 7
    self.assertEqual(train.fingerprint(config, (32, 32, 3))["model"], model)


class ValidationTest(parameterized.TestCase):

  @parameterized.parameters(
      ({}, {"kind": "pq"}, "quantizer.kind"),
      ({}, {"gradient": "sideways"}, "quantizer.gradient"),
      ({}, {"kind": "fsq", "gradient": "rotation"}, "quantizer.gradient"),
      ({}, {"kind": "residual", "num_stages": 0}, "quantizer.num_stages"),
      ({}, {"kind": "residual", "quantizer_dropout": 1.5},
       "quantizer.quantizer_dropout"),
      ({"num_levels": 2}, {"kind": "residual"}, "num_levels=1"),
      ({}, {"kind": "fsq", "levels": (8, 1)}, "quantizer.levels"),
      ({}, {"kind": "fsq", "levels": ()}, "quantizer.levels"),
      ({"num_levels": 2, "level_num_embeddings": (8, 8)}, {"kind": "fsq"},
       "level_num_embeddings"),
      ({"num_embeddings": 24}, {"kind": "lfq"}, "power of two"),
      ({}, {"kind": "lfq", "entropy_weight": -1.}, "quantizer.entropy_weight"),
  )
  def test_bad_option_is_named(self, overrides, quantizer, message):
    config = tiny.vqvae_config(**overrides)
    config.quantizer.update(quantizer)
    with self.assertRaisesRegex(ValueError, message):
      train.validate_config(config)

  def test_old_run_config_without_the_kinds_builds(self):
    # run.json configs from before the kinds lack their keys.
    config = tiny.vqvae_config().to_dict()
    for key in ("kind", "gradient", "levels", "num_stages"):
      del config["quantizer"][key]
    model = train.build_model(
        __import__("ml_collections").ConfigDict(config), 0.06)
    self.assertEqual(type(model.quantizer).__name__, "VectorQuantizerEMA")


class BuildTest(parameterized.TestCase):

  @parameterized.named_parameters((kind, kind) for kind in KINDS)
  def test_encoder_outputs_the_quantizers_embedding_dim(self, kind):
    embedding_dim, codes, grids = KINDS[kind][2]
    config = _config(kind)
    train.validate_config(config)
    model = train.build_model(config, 0.06)
    out = model(tf.zeros([2, 32, 32, 3]), is_training=False)
    self.assertEqual(out["z"].shape, (2, 8, 8, embedding_dim))
    self.assertEqual(model.quantizer.num_embeddings, codes)
    indices = model.encode(tf.random.uniform([2, 32, 32, 3]) - .5)
    self.assertEqual(indices.shape,
                     (2, 8, 8) if grids == 1 else (2, 8, 8, grids))
    self.assertEqual(model.decode(indices).shape, (2, 32, 32, 3))
    self.assertEqual(prior.grid_num_embeddings(model),
                     codes if grids == 1 else [codes] * grids)

  def test_vqvae2_levels_of_lfq(self):
    config = tiny.vqvae_config(num_levels=2, level_num_embeddings=(4, 32))
    config.quantizer.kind = "lfq"
    train.validate_config(config)
    model = train.build_model(config, 0.06)
    codes = model.encode(tf.zeros([1, 32, 32, 3]))
    self.assertEqual([c.shape for c in codes], [(1, 4, 4), (1, 8, 8)])
    self.assertEqual([q.embedding_dim for q in model.quantizers], [2, 5])
    self.assertEqual(model.decode_top(codes, 1).shape, (1, 32, 32, 3))


# Loads SavedModels in a Python where sonnet and sonnet_vqvae cannot be
# imported: each kind's export, saving what its signatures give, and the
# user's module holding its bottleneck (bottleneck_checks), in "user" beside
# the export; or saves why it failed. One Python for every kind: each start
# costs seconds of importing TensorFlow.
_LOAD_WITHOUT_OUR_CODE = tiny.BLOCK_OUR_CODE + textwrap.dedent("""
    import os
    import traceback
    import numpy as np
    import tensorflow as tf
""") + bottleneck_checks.LOAD_USER_MODEL + textwrap.dedent("""
    inputs, *paths = sys.argv[1:]
    data = np.load(inputs)
    for path in paths:
      try:
        sig = tf.saved_model.load(path).signatures
        codes = sig["encode"](images=tf.constant(data["uint8"]))["codes"]
        decoded = sig["decode"](codes=codes)["images"]
        drawn = sig["sample"](labels=tf.constant([0, 1], tf.int32),
                              temperature=tf.constant(1.0),
                              seed=tf.constant(3, tf.int64))
        np.savez(path + ".npz", codes=codes.numpy(), decoded=decoded.numpy(),
                 sample_codes=drawn["codes"].numpy(),
                 sample_images=drawn["images"].numpy())
        load_user_model(os.path.join(os.path.dirname(path), "user"))
      except Exception:  # pylint: disable=broad-except
        with open(path + ".error", "w") as f:
          f.write(traceback.format_exc())
""")

# The end-to-end kinds. "ema" is the default config's kind (the same model,
# see FingerprintTest), which export_test and prior_test run end to end.
# "vq" differs from it in training only (a codebook learnt by gradients, not
# moving averages): it trains and evaluates here, but its prior and export
# would run the same code as "ema"'s (the quantizers share their inference
# path), so it fits none. Residual with 2 stages: several grids (per-stage
# metrics and figures, a prior per stage) at less cost than KINDS' 3.
_END_TO_END = {"vq": {}, "residual": {"num_stages": 2}, "fsq": {},
               "lfq": {}}
_TRAIN_ONLY = ("vq",)


def _train_and_export(kind, base):
  """Trains and evaluates one kind under `base`; then, but for _TRAIN_ONLY,
  fits a prior, exports it and saves the trained bottleneck in a user's
  module."""
  vqvae_dir = os.path.join(base, "vqvae")
  prior_dir = os.path.join(base, "prior")
  config = _config(kind, num_steps=4, jit_compile=False)
  config.quantizer.update(_END_TO_END[kind])
  with tfds.testing.mock_data(num_examples=16):
    # No XLA: "auto" would compile both loops for 4 steps.
    metrics = train.train_and_evaluate(config, vqvae_dir)
    if kind in _TRAIN_ONLY:
      return {"metrics": metrics, "vqvae_dir": vqvae_dir}
    prior_metrics = prior.train_prior(
        tiny.prior_config(num_steps=2, log_every=1, checkpoint_every=2,
                          jit_compile=False),
        vqvae_dir, prior_dir)
  path = export.export_saved_model(prior_dir, os.path.join(base, "export"))
  _, vqvae = train.restore_model(vqvae_dir)
  user = os.path.join(base, "user")
  os.makedirs(user)
  images = _images().astype(np.float32) / 255. - .5
  z = vqvae(images, is_training=False)["z"].numpy()
  bottleneck_checks.save_user_model(vqvae.quantizer, z, user)
  return {"metrics": metrics, "prior_metrics": prior_metrics,
          "vqvae_dir": vqvae_dir, "prior_dir": prior_dir, "export": path,
          "user": user}


@pytest.mark.slow
class EndToEndTest(parameterized.TestCase):
  """Each kind trained, evaluated, fitted a prior and exported once.

  Its trained bottleneck, in a user's own tf.Module, loads without our code
  too (bottleneck_checks' SavedModel check of residual VQ, FSQ and LFQ).

  A kind that fails there fails its own test, with its error; the others
  still run.
  """

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.base = tempfile.mkdtemp()
    cls.runs = {}
    for kind in _END_TO_END:
      try:
        cls.runs[kind] = _train_and_export(kind, os.path.join(cls.base, kind))
      except Exception as e:  # pylint: disable=broad-except
        cls.runs[kind] = e
    cls.inputs = os.path.join(cls.base, "in.npz")
    np.savez(cls.inputs, uint8=_images())
    paths = [run["export"] for run in cls.runs.values()
             if not isinstance(run, Exception) and "export" in run]
    cls.loaded = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_OUR_CODE, cls.inputs, *paths],
        cwd=cls.base, env=dict(os.environ, PYTHONPATH=""),
        capture_output=True, text=True)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.base)
    super().tearDownClass()

  @parameterized.named_parameters((kind, kind) for kind in _END_TO_END)
  def test_train_evaluate_prior_export(self, kind):
    run = self.runs[kind]
    if isinstance(run, Exception):
      raise run
    _, codes_per_grid, grids = KINDS[kind][2]
    grids = _END_TO_END[kind].get("num_stages", grids)
    metrics, vqvae_dir = run["metrics"], run["vqvae_dir"]

    # Evaluation: codes over the kind's codebook, per stage for residual.
    self.assertTrue(np.isfinite(metrics["nmse"]))
    with open(os.path.join(vqvae_dir, "eval.json")) as f:
      self.assertEqual(json.load(f)["codes_used"], metrics["codes_used"])
    rows = [json.loads(line) for line in
            open(os.path.join(vqvae_dir, "metrics.jsonl"))]
    if grids > 1:
      for stage in range(grids):
        self.assertBetween(metrics[f"stage{stage}_codes_used"], 1,
                           codes_per_grid)
        self.assertIn(f"stage{stage}_perplexity", rows[-1])
        self.assertTrue(os.path.exists(
            os.path.join(vqvae_dir, f"codebook_stage{stage}.png")))
      self.assertNotIn(f"stage{grids}_codes_used", metrics)
      self.assertBetween(metrics["codes_used"], 1, codes_per_grid**grids)
    else:
      self.assertBetween(metrics["codes_used"], 1, codes_per_grid)
      self.assertTrue(os.path.exists(os.path.join(vqvae_dir, "codebook.png")))

    if kind in _TRAIN_ONLY:
      return
    prior_metrics, prior_dir = run["prior_metrics"], run["prior_dir"]

    # The prior: one grid of the kind's codes, or one per stage.
    self.assertTrue(np.isfinite(prior_metrics["nll_nats_per_code"]))
    self.assertAlmostEqual(prior_metrics["uniform_nats_per_code"],
                           np.log(codes_per_grid), places=5)
    if grids > 1:
      self.assertIn(f"level{grids - 1}_nll_nats_per_code", prior_metrics)

    # The export loads without our code and gives the model's codes.
    error, outputs = run["export"] + ".error", run["export"] + ".npz"
    if os.path.exists(error):
      self.fail(open(error).read())
    if not os.path.exists(outputs):
      self.fail(self.loaded.stderr[-3000:])
    got = dict(np.load(outputs))
    images = np.load(self.inputs)["uint8"]
    _, vqvae = train.restore_model(vqvae_dir)
    codes = vqvae.encode(images.astype(np.float32) / 255. - .5).numpy()
    np.testing.assert_array_equal(got["codes"], codes)
    np.testing.assert_allclose(got["decoded"], vqvae.decode(codes).numpy(),
                               atol=1e-5)
    self.assertEqual(got["sample_codes"].shape, (2, *codes.shape[1:]))
    self.assertTrue(((got["sample_codes"] >= 0) &
                     (got["sample_codes"] < codes_per_grid)).all())
    np.testing.assert_allclose(
        got["sample_images"], vqvae.decode(got["sample_codes"]).numpy(),
        atol=1e-5)
    # Sampling from our code decodes the same way.
    _, model = prior.restore_prior(prior_dir)
    drawn = prior.sample_images(model, vqvae, num_samples=2, label=0,
                                temperature=1.0, seed=3)
    self.assertEqual(drawn.shape, (2, 32, 32, 3))
    # The user's module holding the trained bottleneck.
    bottleneck_checks.check_loaded_user_model(self, vqvae.quantizer,
                                              run["user"])


if __name__ == "__main__":
  absltest.main()
