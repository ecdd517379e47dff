"""SavedModel export: loads without our code or Sonnet, in Keras 3, errors."""

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import sonnet_vqvae
from sonnet_vqvae import export
from sonnet_vqvae import prior
from sonnet_vqvae import rundir
from sonnet_vqvae import train
import tiny
import warm_cli

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(export.__file__)))

# Runs in a fresh Python in which `sonnet` and `sonnet_vqvae` cannot be
# imported; loads the SavedModel, calls every signature, saves the outputs.
_LOAD_WITHOUT_OUR_CODE = tiny.BLOCK_OUR_CODE + textwrap.dedent("""
    for name in ("sonnet", "sonnet_vqvae"):
      try:
        __import__(name)
      except ImportError:
        pass
      else:
        raise SystemExit(name + " was importable")

    import numpy as np
    import tensorflow as tf

    path, inputs, outputs, errors_file = sys.argv[1:]
    data = np.load(inputs)
    model = tf.saved_model.load(path)
    sig = model.signatures
    out = {}
    out["encode"] = sig["encode"](images=tf.constant(data["uint8"]))["codes"]
    out["encode_float"] = sig["encode_float"](
        images=tf.constant(data["float"]))["codes"]
    decoded = sig["decode"](codes=tf.constant(data["codes"]))
    out["decode"] = decoded["images"]
    out["decode_uint8"] = decoded["images_uint8"]
    recon = sig["reconstruct"](images=tf.constant(data["uint8"]))
    out["reconstruct"] = recon["images"]
    out["reconstruct_codes"] = recon["codes"]
    for i in range(2):
      drawn = sig["sample"](labels=tf.constant(data["labels"]),
                            temperature=tf.constant(1.0),
                            seed=tf.constant(7, tf.int64))
      out[f"sample_codes_{i}"] = drawn["codes"]
      out[f"sample_images_{i}"] = drawn["images"]
    out["num_embeddings"] = model.num_embeddings
    out["code_shape"] = model.code_shape
    np.savez(outputs, **{k: np.asarray(v) for k, v in out.items()})
""") + textwrap.dedent("""
    # Then calls each signature with one bad input and saves {case: the
    # error's type and its lines that say what failed}.
    import json

    uint8 = lambda *shape: tf.zeros(shape, tf.uint8)
    codes = lambda *shape, value=0: tf.fill(shape, value)
    draw = lambda labels=(1, 2), temperature=1.0, seed=0: sig["sample"](
        labels=tf.constant(labels, tf.int32, shape=np.shape(labels)),
        temperature=tf.constant(temperature, tf.float32),
        seed=tf.constant(seed, tf.int64))
    cases = {
        "encode 64x64": lambda: sig["encode"](images=uint8(2, 64, 64, 3)),
        "encode 1 channel": lambda: sig["encode"](images=uint8(2, 32, 32, 1)),
        "encode batch 0": lambda: sig["encode"](images=uint8(0, 32, 32, 3)),
        "encode no batch": lambda: sig["encode"](images=uint8(32, 32, 3)),
        "encode_float 28x28": lambda: sig["encode_float"](
            images=tf.zeros([2, 28, 28, 3])),
        "reconstruct 64x64": lambda: sig["reconstruct"](
            images=uint8(1, 64, 64, 3)),
        "decode 4x4": lambda: sig["decode"](codes=codes(2, 4, 4)),
        "decode batch 0": lambda: sig["decode"](codes=codes(0, 8, 8)),
        "decode code 16": lambda: sig["decode"](codes=codes(1, 8, 8,
                                                            value=16)),
        "sample no labels": lambda: draw(labels=np.zeros([0], np.int32)),
        "sample labels [2, 1]": lambda: draw(labels=[[1], [2]]),
        "sample label 10": lambda: draw(labels=[10]),
        "sample temperature inf": lambda: draw(temperature=np.inf),
        "sample temperature nan": lambda: draw(temperature=np.nan),
        "sample temperature 0": lambda: draw(temperature=0.),
        "sample temperature [2]": lambda: draw(temperature=[1., 1.]),
    }
    errors = {}
    for case, call in cases.items():
      try:
        call()
        errors[case] = "no error"
      except Exception as e:  # pylint: disable=broad-except
        errors[case] = type(e).__name__ + ": " + " ".join(
            line for line in str(e).splitlines()
            if "must" in line or "expected" in line)
    with open(errors_file, "w") as f:
      json.dump(errors, f)
""")

# What each bad input's error must say: the argument, what it must be, what
# was received.
_SHAPE = "must have shape [B, 32, 32, 3] with B >= 1, received"
_BAD_INPUT_ERRORS = {
    "encode 64x64": f"encode: images {_SHAPE} [2 64 64 3]",
    "encode 1 channel": f"encode: images {_SHAPE} [2 32 32 1]",
    "encode batch 0": f"encode: images {_SHAPE} [0 32 32 3]",
    "encode no batch": f"encode: images {_SHAPE} [32 32 3]",
    "encode_float 28x28": f"encode_float: images {_SHAPE} [2 28 28 3]",
    "reconstruct 64x64": f"reconstruct: images {_SHAPE} [1 64 64 3]",
    "decode 4x4": "decode: codes must have shape [B, 8, 8] with B >= 1, "
                  "received [2 4 4]",
    "decode batch 0": "decode: codes must have shape [B, 8, 8] with B >= 1, "
                      "received [0 8 8]",
    "decode code 16": "decode: codes must be in [0, 16)",
    "sample no labels": "sample: labels must have shape [B] with B >= 1, "
                        "received [0]",
    "sample labels [2, 1]": "sample: labels must have shape [B] with B >= 1, "
                            "received [2 1]",
    "sample label 10": "sample: labels must be in [0, 10)",
    "sample temperature inf": "sample: temperature must be a finite scalar "
                              "> 0, received inf",
    "sample temperature nan": "sample: temperature must be a finite scalar "
                              "> 0, received nan",
    "sample temperature 0": "sample: temperature must be a finite scalar "
                            "> 0, received 0",
    "sample temperature [2]": "temperature",
}


_RUNS = {}


def _trained_runs():
  """(vqvae_dir, prior_dir): tiny runs trained once for the whole module.

  Export only reads a workdir; a test that damages one copies it first.
  """
  if not _RUNS:
    base = _RUNS["base"] = tempfile.mkdtemp()
    vqvae_dir, prior_dir = os.path.join(base, "vqvae"), os.path.join(base, "p")
    with tfds.testing.mock_data(num_examples=16):
      train.train(tiny.vqvae_config(num_steps=4), vqvae_dir)
      prior.train_prior(tiny.prior_config(num_steps=4, log_every=2,
                                          checkpoint_every=2), vqvae_dir,
                        prior_dir)
    _RUNS["dirs"] = vqvae_dir, prior_dir
  return _RUNS["dirs"]


def tearDownModule():
  if _RUNS:
    shutil.rmtree(_RUNS["base"])


def _images(n=5, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, [n, 32, 32, 3]).astype(np.uint8)


def _tree(directory):
  if not os.path.exists(directory):
    return None
  return sorted(os.path.relpath(os.path.join(d, f), directory)
                for d, _, fs in os.walk(directory) for f in fs)


class ExportTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.base = tempfile.mkdtemp()
    cls.vqvae_dir, cls.prior_dir = _trained_runs()
    cls.path = export.export_saved_model(cls.prior_dir,
                                         os.path.join(cls.base, "export"))
    # The VQ-VAE's own export, into an empty directory (which export takes),
    # beside the staging folders two killed exports of it left (as kill -9
    # leaves them): one of an ended process, one of a running one.
    cls.vqvae_only = tempfile.mkdtemp(dir=cls.base)
    ended = subprocess.Popen(["true"])
    ended.wait()
    cls.running = subprocess.Popen(["sleep", "600"])
    cls.addClassCleanup(cls.running.wait)
    cls.addClassCleanup(cls.running.kill)
    cls.staging = {pid: f"{cls.vqvae_only}.export-{pid}"
                   for pid in (ended.pid, cls.running.pid)}
    for staging in cls.staging.values():
      os.makedirs(os.path.join(staging, "variables"))
      with open(os.path.join(staging, "saved_model.pb"), "wb") as f:
        f.write(b"cut short")
    export.export_saved_model(cls.vqvae_dir, cls.vqvae_only)
    cls.without_our_code = None

  def _run_without_our_code(self):
    """(outputs.npz, errors.json) of _LOAD_WITHOUT_OUR_CODE, run once.

    One Python for both tests that read them: each start costs seconds of
    importing TensorFlow and loading the model.
    """
    cls = type(self)
    if cls.without_our_code is None:
      _, vqvae = train.restore_model(cls.vqvae_dir)
      images = _images()
      floats = images.astype(np.float32) / 255. - .5
      codes = vqvae.encode(floats).numpy().astype(np.int32)
      labels = np.array([0, 3, 9], np.int32)
      inputs, outputs, errors = (os.path.join(cls.base, name) for name in
                                 ("inputs.npz", "outputs.npz", "errors.json"))
      np.savez(inputs, uint8=images, float=floats, codes=codes, labels=labels)
      subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_OUR_CODE, cls.path,
                      inputs, outputs, errors], check=True, cwd=cls.base,
                     env=dict(os.environ, PYTHONPATH=""))
      cls.without_our_code = outputs, errors
    return cls.without_our_code

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.base)
    super().tearDownClass()

  @pytest.mark.slow
  def test_loads_without_our_code_and_gives_the_models_outputs(self):
    outputs, _ = self._run_without_our_code()
    _, vqvae = train.restore_model(self.vqvae_dir)
    _, model = prior.restore_prior(self.prior_dir)
    images = _images()
    floats = images.astype(np.float32) / 255. - .5
    codes = vqvae.encode(floats).numpy().astype(np.int32)
    labels = np.array([0, 3, 9], np.int32)
    got = dict(np.load(outputs))

    np.testing.assert_array_equal(got["encode"], codes)
    np.testing.assert_array_equal(got["encode_float"], codes)
    self.assertEqual(got["encode"].dtype, np.int32)
    decoded = vqvae.decode(codes).numpy()
    np.testing.assert_allclose(got["decode"], decoded, atol=1e-5)
    np.testing.assert_array_equal(
        got["decode_uint8"],
        np.round(np.clip(decoded + .5, 0, 1) * 255).astype(np.uint8))
    np.testing.assert_array_equal(got["reconstruct_codes"], codes)
    np.testing.assert_allclose(got["reconstruct"], decoded, atol=1e-5)
    # Sampling: deterministic for a seed, and the in-process model's draw.
    np.testing.assert_array_equal(got["sample_codes_0"], got["sample_codes_1"])
    expected = model.sample(3, 8, 8, labels=labels, temperature=1.0, seed=7)
    np.testing.assert_array_equal(got["sample_codes_0"], expected.numpy())
    np.testing.assert_allclose(got["sample_images_0"],
                               vqvae.decode(expected).numpy(), atol=1e-5)
    self.assertEqual(int(got["num_embeddings"]), tiny.NUM_EMBEDDINGS)
    self.assertEqual(got["code_shape"].tolist(), [8, 8])

  def test_keras_3_tfsm_layer_encodes_the_same(self):
    import keras  # pylint: disable=g-import-not-at-top
    self.assertTrue(keras.__version__.startswith("3"), keras.__version__)
    layer = keras.layers.TFSMLayer(self.path, call_endpoint="encode")
    images = _images(4, seed=1)
    got = layer(tf.constant(images))
    _, vqvae = train.restore_model(self.vqvae_dir)
    expected = vqvae.encode(images.astype(np.float32) / 255. - .5).numpy()
    np.testing.assert_array_equal(np.asarray(got["codes"]), expected)
    # In a functional model, as docs/export.md says: a uint8 keras.Input.
    inputs = keras.Input(shape=(32, 32, 3), dtype="uint8")
    model = keras.Model(inputs, layer(inputs)["codes"])
    np.testing.assert_array_equal(model.predict(images, verbose=0), expected)

  def test_bad_inputs_are_clear_errors(self):
    loaded = tf.saved_model.load(self.path)
    # The object's own functions take their arguments by name, and give
    # the signatures' outputs.
    images = tf.constant(_images(2))
    np.testing.assert_array_equal(
        loaded.encode(images=images)["codes"],
        loaded.signatures["encode"](images=images)["codes"])
    with self.assertRaisesRegex((TypeError, ValueError), r"32, 32, 3"):
      loaded.encode(tf.zeros([2, 28, 28, 3], tf.uint8))
    with self.assertRaisesRegex((TypeError, ValueError), r"32, 32, 3"):
      loaded.encode(tf.zeros([2, 32, 32, 1], tf.uint8))
    bad = np.zeros([1, 8, 8], np.int32)
    bad[0, 3, 3] = tiny.NUM_EMBEDDINGS
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                r"codes must be in \[0, 16\)"):
      loaded.signatures["decode"](codes=tf.constant(bad))
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                r"labels must be in \[0, 10\)"):
      loaded.signatures["sample"](labels=tf.constant([10]),
                                  temperature=tf.constant(1.),
                                  seed=tf.constant(0, tf.int64))
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                "temperature must be a finite scalar > 0"):
      loaded.signatures["sample"](labels=tf.constant([1]),
                                  temperature=tf.constant(0.),
                                  seed=tf.constant(0, tf.int64))

  @pytest.mark.slow
  def test_signatures_loaded_without_our_code_check_every_input(self):
    _, errors_file = self._run_without_our_code()
    with open(errors_file) as f:
      errors = json.load(f)
    self.assertEqual(set(errors), set(_BAD_INPUT_ERRORS))
    for case, expected in _BAD_INPUT_ERRORS.items():
      self.assertStartsWith(errors[case], "InvalidArgumentError: ", case)
      self.assertIn(expected, errors[case], case)

  def test_vqvae_workdir_exports_without_sample(self):
    loaded = tf.saved_model.load(self.vqvae_only)
    self.assertEqual(set(loaded.signatures),
                     {"encode", "encode_float", "decode", "reconstruct"})
    # No [N, K] output in any signature.
    for signature in loaded.signatures.values():
      self.assertNoCommonElements(signature.structured_outputs,
                                  {"distances", "encodings"})

  def test_the_next_export_removes_what_a_killed_one_left(self):
    # setUpClass's VQ-VAE export, beside two killed ones' staging folders.
    name = os.path.basename(self.vqvae_only)
    self.assertEqual(
        sorted(n for n in os.listdir(self.base) if n.startswith(name)),
        [name, os.path.basename(self.staging[self.running.pid])])  # Its own.
    self.assertIsNone(self.running.poll())

  def test_into_an_empty_directory(self):
    # setUpClass exported the VQ-VAE into an empty directory.
    self.assertIn("saved_model.pb", os.listdir(self.vqvae_only))


class ExportErrorTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.base = tempfile.mkdtemp()
    self.output = os.path.join(self.base, "out")

  def test_workdir_without_a_run(self):
    empty = tempfile.mkdtemp(dir=self.base)
    with self.assertRaisesRegex(FileNotFoundError, "No trained run"):
      export.export_saved_model(empty, self.output)
    self.assertFalse(os.path.exists(self.output))

  @pytest.mark.slow
  def test_non_empty_output_or_corrupt_checkpoint_writes_nothing(self):
    workdir = os.path.join(self.base, "vqvae")
    shutil.copytree(_trained_runs()[0], workdir)
    os.makedirs(self.output)
    with open(os.path.join(self.output, "mine.txt"), "w") as f:
      f.write("keep")
    with self.assertRaisesRegex(FileExistsError, "not an empty directory"):
      export.export_saved_model(workdir, self.output)
    self.assertEqual(_tree(self.output), ["mine.txt"])

    # The newest checkpoint, the one export restores, is truncated.
    newest = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    for path in glob.glob(newest + ".data*"):
      with open(path, "r+b") as f:
        f.truncate(100)
    fresh = os.path.join(self.base, "fresh")
    with self.assertRaises(rundir.RunDirError):
      export.export_saved_model(workdir, fresh)
    self.assertFalse(os.path.exists(fresh))
    self.assertEqual(sorted(os.listdir(self.base)), ["out", "vqvae"])

  @pytest.mark.slow
  def test_command_line(self):
    workdir = _trained_runs()[0]
    command = [sys.executable, "-m", "sonnet_vqvae.export",
               f"--workdir={workdir}", f"--output={self.output}"]
    first = subprocess.run(command, check=True, cwd=_REPO,
                           capture_output=True, text=True)
    self.assertIn("saved_model.pb", os.listdir(self.output))
    # No alarming lines: grappler's remapper error, "untraced functions"
    # (every signature works), TF's start-up lines twice.
    self.assertNotIn("remapper failed", first.stderr)
    self.assertNotIn("untraced functions", first.stderr)
    startup = [line.split("] ", 1)[-1] for line in first.stderr.splitlines()
               if "port.cc" in line or "cudart_stub.cc" in line]
    self.assertEqual(len(startup), len(set(startup)), first.stderr)
    # The user error needs no fresh Python: a process of warm_cli's.
    again = warm_cli.run(command[1:], warm_cli.environment(), cwd=_REPO)
    self.assertNotEqual(again.returncode, 0)
    # A user error: one line, no traceback.
    (line,) = [l for l in again.stderr.splitlines() if "export" in l]
    self.assertTrue(line.startswith("export: "), line)
    self.assertIn("exists and is not an empty directory", line)
    self.assertNotIn("Traceback", again.stderr)


class QuantizerSavedModelTest(absltest.TestCase):
  """The quantizers save inside a user's own tf.Module."""

  def _round_trip(self, vq):
    class UserModel(tf.Module):

      def __init__(self):
        super().__init__()
        self.vq = vq

      @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
      def indices(self, z):
        return self.vq(z, is_training=False)["encoding_indices"]

      @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
      def train_step(self, z):
        return self.vq(z, is_training=True)["loss"]

    model = UserModel()
    z = tf.random.stateless_normal([37, 8], [0, 2])
    expected = model.indices(z).numpy()
    path = os.path.join(tempfile.mkdtemp(), "user_model")
    tf.saved_model.save(model, path)
    loaded = tf.saved_model.load(path)
    for batch in (z, z[:5]):  # A dynamic batch.
      np.testing.assert_array_equal(loaded.indices(batch),
                                    expected[:batch.shape[0]])
    return model, loaded, z

  def test_vector_quantizer(self):
    vq = sonnet_vqvae.VectorQuantizer(embedding_dim=8, num_embeddings=16,
                                      commitment_cost=0.25)
    self._round_trip(vq)

  def test_vector_quantizer_ema_trains_after_loading(self):
    vq = sonnet_vqvae.VectorQuantizerEMA(embedding_dim=8, num_embeddings=16,
                                         commitment_cost=0.25, decay=0.9)
    model, loaded, z = self._round_trip(vq)
    before = loaded.vq.embeddings.numpy()
    model.train_step(z)
    loaded.train_step(z)
    # The loaded function updates the EMA codebook as the original does.
    self.assertFalse(np.allclose(loaded.vq.embeddings.numpy(), before))
    np.testing.assert_allclose(loaded.vq.embeddings.numpy(),
                               model.vq.embeddings.numpy(), rtol=1e-6)

if __name__ == "__main__":
  absltest.main()
