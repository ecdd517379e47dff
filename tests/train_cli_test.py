"""Process-level tests of sonnet_vqvae.train: CLI, presets, resume, workers.

Each test starts Python processes (the CLI's and the workers from warm_cli),
which read tfds mock data (kills and resumes of the CLI are
tests/fault_test.py's).
"""

import json
import os
import socket
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np
import pytest
import tensorflow as tf

import tiny
import warm_cli

# One worker of a cluster: trains, then saves every model variable; then
# checks argv[3] as the step it restored (pretends: the workers' differ).
_WORKER = """
import sys
from absl import logging
import numpy as np
import tensorflow_datasets as tfds
from sonnet_vqvae import distribute
from sonnet_vqvae import train
import tiny
config = tiny.vqvae_config(num_steps=3, log_every=1, checkpoint_every=3,
                           strategy="multi_worker")
logging.set_verbosity(logging.INFO)
with tfds.testing.mock_data(num_examples=16):
  model = train.train(config, sys.argv[1])
np.savez(sys.argv[2], *[v.numpy() for v in model.variables])
try:
  distribute.check_same_step(int(sys.argv[3]),
                             distribute.make_strategy("multi_worker"))
except RuntimeError as e:
  print("FAILED:", e)
"""

_TINY = tiny.cli_flags(tiny.vqvae_config())

# Holds a workdir's lock file as RunDir does (no TensorFlow) until killed.
_LOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
time.sleep(600)
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _latest_step(workdir):
  path = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
  return None if path is None else int(path.rsplit("-", 1)[1])


@pytest.mark.slow
class TrainCliTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = tempfile.mkdtemp()

  def _cli(self, *args):
    """The CLI on the tiny config, run to its exit (a process of warm_cli)."""
    return warm_cli.run(["-m", "sonnet_vqvae.train",
                         f"--workdir={self.workdir}", *_TINY, *args],
                        env=warm_cli.environment())

  def test_unknown_override_and_bad_value_are_one_line_errors(self):
    typo = self._cli("--config.num_step=2")
    self.assertNotEqual(typo.returncode, 0)
    # One line naming the key and the nearest valid one, no traceback.
    self.assertIn("Unknown config key 'num_step': did you mean num_steps?",
                  typo.stderr)
    self.assertNotIn("Traceback", typo.stderr)

    bad = self._cli("--config.jit_compile=fast")
    self.assertNotEqual(bad.returncode, 0)
    self.assertIn("train: config.jit_compile must be True, False or 'auto', "
                  "got 'fast'.", bad.stderr)
    self.assertNotIn("Traceback", bad.stderr)

  def test_presets_resume_with_the_workdir_alone_and_evaluate_mode(self):
    elsewhere = tempfile.mkdtemp()  # Not the repository root.

    def run(*args):
      return warm_cli.run(["-m", "sonnet_vqvae.train",
                           f"--workdir={self.workdir}", *args],
                          env=warm_cli.environment(), cwd=elsewhere)

    first = run("--config=default", *_TINY, "--config.num_steps=2")
    self.assertEqual(first.returncode, 0, first.stderr[-3000:])
    # The console: our INFO lines, not tensorflow_datasets' (--verbose shows
    # those).
    self.assertIn("Training from step 0 to 2", first.stderr)
    self.assertNotIn("Constructing tf.data.Dataset", first.stderr)
    # The stored config, the new num_steps: no other flag retyped.
    resumed = run("--config.num_steps=4")
    self.assertEqual(resumed.returncode, 0, resumed.stderr[-3000:])
    self.assertIn("Training from step 2 to 4", resumed.stderr)
    self.assertEqual(_latest_step(self.workdir), 4)
    with open(os.path.join(self.workdir, "run.json")) as f:
      config = json.load(f)["config"]
    self.assertEqual((config["num_steps"], config["num_hiddens"]), (4, 16))
    # An override of what the checkpoints depend on is refused.
    other = run("--config.num_embeddings=8")
    self.assertNotEqual(other.returncode, 0)
    self.assertIn("model.num_embeddings: 16 in", other.stderr)
    self.assertEqual(_latest_step(self.workdir), 4)
    unknown = run("--config=vqvae3")
    self.assertNotEqual(unknown.returncode, 0)
    self.assertEqual(unknown.stderr.strip().splitlines()[-1],
                     "train: --config=vqvae3: no such file, and no preset of "
                     "that name (presets: default, prior, vqvae2). Pass a "
                     "preset's name, e.g. --config=vqvae2, or the path of a "
                     "config file.")

    # --mode=evaluate on this run. It writes the workdir (eval.json, the
    # figures): it is refused while another holds it.
    os.remove(os.path.join(self.workdir, "eval.json"))
    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, self.workdir],
        stdout=subprocess.PIPE, text=True)
    self.addCleanup(holder.wait)
    self.addCleanup(holder.kill)
    self.assertEqual(holder.stdout.readline().strip(), "locked")
    refused = run("--mode=evaluate")
    self.assertNotEqual(refused.returncode, 0)
    self.assertIn("in use by another process", refused.stderr)
    self.assertFalse(os.path.exists(os.path.join(self.workdir, "eval.json")))
    holder.kill()
    holder.wait()
    evaluate = run("--mode=evaluate")
    self.assertEqual(evaluate.returncode, 0, evaluate.stderr[-3000:])
    with open(os.path.join(self.workdir, "eval.json")) as f:
      self.assertIn("nmse", json.load(f))

  def test_two_workers_train_identical_models_on_the_same_step(self):
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    outputs = [os.path.join(self.workdir, f"worker{i}.npz") for i in (0, 1)]
    # Processes of their own from warm_cli's zygote: TensorFlow reads
    # TF_CONFIG when the strategy is made, not at import.
    workers = [
        warm_cli.start(
            ["-c", _WORKER, self.workdir, outputs[i], str([3, 0][i])],
            env=warm_cli.environment(TF_CONFIG=json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": i}})),
            zygote_env=warm_cli.environment())
        for i in (0, 1)]
    for worker in workers:
      self.addCleanup(worker.kill)
    for worker in workers:
      worker.wait(timeout=240)
      log = worker.stdout + worker.stderr
      self.assertEqual(worker.returncode, 0, log[-3000:])
      self.assertIn("on 2 replica(s)", log)
      # Workers that restored different steps both fail clearly (the same
      # step passed the same check at the start of training).
      (failed,) = [l for l in log.splitlines() if l.startswith("FAILED:")]
      self.assertIn("The workers restored different steps [3, 0]", failed)
      self.assertIn("shared filesystem", failed)
    zero, one = np.load(outputs[0]), np.load(outputs[1])
    self.assertLen(zero.files, len(one.files))
    for key in zero.files:
      np.testing.assert_array_equal(zero[key], one[key], err_msg=key)
    self.assertEqual(_latest_step(self.workdir), 3)
    # Only the chief (worker 0) keeps files in the workdir.
    self.assertNotIn("worker_1_scratch", os.listdir(self.workdir))
    with open(os.path.join(self.workdir, "metrics.jsonl")) as f:
      self.assertLen(f.readlines(), 3)


if __name__ == "__main__":
  absltest.main()
