"""Fault suite: what a workdir guarantees when runs are killed, edited or mixed.

Each test reproduces a way a run used to be lost or silently mixed up and
checks that it now ends in a correct recovery or a clear error, with no file
lost or overwritten.
"""

import fcntl
import glob
import json
import os
import random
import re
import shutil
import signal
import tempfile
import time
from unittest import mock

from absl.testing import absltest
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
# The op a save renames its temporary shards with: a test pauses it there.
from tensorflow.python.ops import gen_io_ops

from sonnet_vqvae import export
from sonnet_vqvae import loop
from sonnet_vqvae import prior
from sonnet_vqvae import rundir
from sonnet_vqvae import train
import rundir_test
import tiny
import warm_cli


def _train(config, workdir):
  with tfds.testing.mock_data(num_examples=16):
    return train.train_and_evaluate(config, workdir)


def _train_only(config, workdir):
  """`train` without the evaluation: for tests that check none of it."""
  with tfds.testing.mock_data(num_examples=16):
    return train.train(config, workdir)


# The workdir of one tiny run (4 steps, checkpoints at 2 and 4, evaluated),
# trained once per module: tests that only need a trained run copy it.
_TRAINED = []
# Whether its workdir was locked as another process finds it: probed when
# its trainer started evaluating, then after the run.
_TRAINED_LOCKED = []


def _trained_copy():
  """A fresh copy of the module's tiny trained workdir (see _TRAINED)."""
  if not _TRAINED:
    workdir = tempfile.mkdtemp()
    evaluate_and_plot = train.evaluate_and_plot

    def probing(*args, **kwargs):
      _TRAINED_LOCKED.append(_held_by_another(workdir))
      return evaluate_and_plot(*args, **kwargs)

    with mock.patch.object(train, "evaluate_and_plot", probing):
      _train(tiny.vqvae_config(), workdir)
    _TRAINED_LOCKED.append(_held_by_another(workdir))
    _TRAINED.append(workdir)
  copy = os.path.join(tempfile.mkdtemp(), "workdir")
  # Checkpoint paths in the index are relative: the copy is a run of its own.
  shutil.copytree(_TRAINED[0], copy)
  return copy


# A tiny prior (2 steps) on a copy of _TRAINED, trained once per module.
_TRAINED_PRIOR = []


def _trained_prior_copy():
  """(vqvae_dir, prior_dir): fresh copies of a run and a prior trained on it.

  The prior's run.json names the VQ-VAE workdir it was trained on, not the
  copy: pass the copy where the prior's VQ-VAE is read (as after a move).
  """
  if not _TRAINED_PRIOR:
    vqvae_dir, prior_dir = _trained_copy(), tempfile.mkdtemp()
    with tfds.testing.mock_data(num_examples=16):
      prior.train_prior(tiny.prior_config(num_steps=2, log_every=2,
                                          checkpoint_every=2), vqvae_dir,
                        prior_dir)
    _TRAINED_PRIOR.extend([vqvae_dir, prior_dir])
  base = tempfile.mkdtemp()
  copies = os.path.join(base, "vqvae"), os.path.join(base, "prior")
  for source, copy in zip(_TRAINED_PRIOR, copies):
    shutil.copytree(source, copy)
  return copies


# _TRAINED trained on to step 6 once per module, and what a reader saw while
# that run's save of step 6 was between its temporary write and its rename.
_TRAINED_FURTHER = []


def _trained_further_copy():
  """(copy of the run trained on to 6, [state, embeddings, state]).

  What a reader saw during the save: the workdir's state, the embeddings it
  restored, and the state after it also exported.
  """
  if not _TRAINED_FURTHER:
    workdir, output = _trained_copy(), tempfile.mkdtemp()
    directory = os.path.join(workdir, "checkpoints")
    merge = gen_io_ops.merge_v2_checkpoints
    seen = []

    def paused_merge(*args, **kwargs):
      if not seen and os.path.isdir(os.path.join(directory, "ckpt-6_temp")):
        seen.append(rundir_test._state(workdir))
        seen.append(
            train.restore_model(workdir)[1].quantizer.embeddings.numpy())
        export.export_saved_model(workdir, os.path.join(output, "export"))
        seen.append(rundir_test._state(workdir))
      return merge(*args, **kwargs)

    with mock.patch.object(gen_io_ops, "merge_v2_checkpoints", paused_merge):
      _train_only(tiny.vqvae_config(num_steps=6), workdir)
    _TRAINED_FURTHER.extend([workdir, seen])
  copy = os.path.join(tempfile.mkdtemp(), "workdir")
  shutil.copytree(_TRAINED_FURTHER[0], copy)
  return copy, _TRAINED_FURTHER[1]


def _snapshot(directory):
  """{path: bytes} of every file under `directory`."""
  contents = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        contents[path] = f.read()
  return contents


def _checkpoint_files(workdir):
  """{path: bytes} of the complete checkpoints (those with an .index)."""
  files = {}
  for index in glob.glob(os.path.join(workdir, "checkpoints", "ckpt-*.index")):
    prefix = index[:-len(".index")]
    files.update({p: open(p, "rb").read() for p in glob.glob(prefix + ".*")})
  return files


def _rows(workdir):
  return rundir.RunDir(workdir, writer=False).read_rows(loop.METRICS_FILE)


def _latest_step(workdir):
  path = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
  return None if path is None else int(path.rsplit("-", 1)[1])


def _held_by_another(workdir):
  """Whether the workdir's lock is held: what a second `train` would find.

  A new open file description conflicts with a flock held through another,
  also in this process, so this is the check a second process makes.
  """
  fd = os.open(os.path.join(workdir, rundir.LOCK_FILE), os.O_RDWR)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    return True
  finally:
    os.close(fd)
  return False


class ReaderTest(absltest.TestCase):
  """Readers (export, evaluation's restore, sampling's) never write."""

  @pytest.mark.slow
  def test_readers_work_on_a_read_only_workdir_and_change_nothing(self):
    vqvae_dir, prior_dir = _trained_prior_copy()
    base = os.path.dirname(vqvae_dir)
    for workdir in (vqvae_dir, prior_dir):
      # What a writer would repair: no index, a killed save's directory.
      os.remove(os.path.join(workdir, "checkpoints", "checkpoint"))
      os.makedirs(os.path.join(workdir, "checkpoints", "ckpt-9_temp"))
    rundir_test.read_only(self, base)
    before = rundir_test._state(base)
    _, model = train.restore_model(vqvae_dir)
    self.assertGreater(int(model.quantizer.embeddings.shape[0]), 0)
    output = tempfile.mkdtemp()
    export.export_saved_model(vqvae_dir, os.path.join(output, "vqvae"))
    export.export_saved_model(prior_dir, os.path.join(output, "prior"),
                              vqvae_workdir=vqvae_dir)
    prior.restore_prior(prior_dir)
    self.assertEqual(rundir_test._state(base), before)

  @pytest.mark.slow
  def test_reader_during_the_trainers_save_leaves_it_alone(self):
    """Export and restore between a save's temporary write and its rename."""
    # The module's run trained on to 6 with that reader (see there).
    workdir, seen = _trained_further_copy()
    directory = os.path.join(workdir, "checkpoints")
    self.assertLen(seen, 3, "the reader did not run during the save")
    self.assertEqual(seen[2], seen[0])  # It moved and wrote nothing.
    self.assertEqual(_latest_step(workdir), 6)  # The save went through.
    self.assertFalse(os.path.exists(os.path.join(directory, "incomplete")))
    # It restored the newest complete checkpoint then: step 4's.
    np.testing.assert_array_equal(seen[1], train.restore_model(
        workdir, step=4)[1].quantizer.embeddings.numpy())


class LockDuringEvaluationTest(absltest.TestCase):

  @pytest.mark.slow
  def test_the_trainer_holds_the_lock_through_its_evaluation(self):
    _trained_copy()  # The module's run, probed as it trained (see there).
    # Held in its one evaluation, released at the end.
    self.assertEqual(_TRAINED_LOCKED, [True, False])


class IndexFileTest(absltest.TestCase):
  """Case 1: the CheckpointManager's index file deleted or garbled."""

  def _resume_without_index(self, damage, num_steps=6, rows=""):
    """Resumes the trained run (rows of steps 1, 2 and 4) without its index.

    rows: text appended to its metrics rows first.
    """
    workdir = _trained_copy()
    before = _checkpoint_files(workdir)
    eval_before = open(os.path.join(workdir, "eval.json")).read()
    damage(os.path.join(workdir, "checkpoints", "checkpoint"))
    with open(os.path.join(workdir, loop.METRICS_FILE), "a") as f:
      f.write(rows)
    with self.assertLogs(level="INFO") as logs:
      _train(tiny.vqvae_config(num_steps=num_steps, checkpoint_every=4),
             workdir)
    self.assertIn(f"Training from step 4 to {num_steps}",
                  "\n".join(logs.output))
    for path, content in before.items():  # Nothing overwritten or lost.
      with open(path, "rb") as f:
        self.assertEqual(f.read(), content, path)
    self.assertEqual(_latest_step(workdir), num_steps)
    self.assertEqual([r["step"] for r in _rows(workdir)],
                     [1, 2, *range(4, num_steps + 1, 2)])
    with open(os.path.join(workdir, loop.METRICS_FILE)) as f:
      for line in f:
        json.loads(line)  # Every line whole.
    # Evaluated after the resume, its curves read from those rows.
    self.assertNotEqual(open(os.path.join(workdir, "eval.json")).read(),
                        eval_before)

  @pytest.mark.slow
  def test_deleted_index_and_torn_rows_resume_from_the_newest_checkpoint(
      self):
    """Case 1 with case 4: a torn last row, rows of steps to be redone."""
    # A row of step 6 logged before a kill that lost its checkpoint, then
    # half a row.
    self._resume_without_index(
        os.remove, num_steps=8,
        rows=json.dumps({"step": 6, "loss": 1.0}) + '\n{"step": 8, "lo')

  @pytest.mark.slow
  def test_garbled_index_resumes_and_is_kept_aside(self):
    def garble(path):
      with open(path, "w") as f:
        f.write("model_checkpoint_path: \"ckpt-4\"\n\x00garbage{{{")
    self._resume_without_index(garble)


class RunMetadataTest(absltest.TestCase):

  @pytest.mark.slow
  @pytest.mark.nonfinite
  def test_failed_start_leaves_no_run_metadata(self):
    """Case 2: a run that never checkpointed leaves nothing to adopt."""
    workdir = tempfile.mkdtemp()
    real_make_replica_step = train.make_replica_step

    def nan_step(*args, **kwargs):
      step = real_make_replica_step(*args, **kwargs)
      return lambda images: step(images * np.nan)

    with absltest.mock.patch.object(train, "make_replica_step", nan_step):
      with self.assertRaisesRegex(FloatingPointError,
                                  "at step 1.*no checkpoint had been written"):
        _train(tiny.vqvae_config(), workdir)
    self.assertFalse(os.path.exists(os.path.join(workdir, loop.RUN_FILE)))
    self.assertEqual(_checkpoint_files(workdir), {})
    # The next run in the workdir starts afresh with its own settings.
    with tfds.testing.mock_data(num_examples=16):
      train.train(tiny.vqvae_config(num_steps=2, num_embeddings=32), workdir)
    stored = rundir.read_json(os.path.join(workdir, loop.RUN_FILE))
    self.assertEqual(stored["fingerprint"]["model"]["num_embeddings"], 32)

  @pytest.mark.slow
  def test_resume_with_another_model_or_data_is_an_error(self):
    workdir = _trained_copy()
    before = _snapshot(workdir)
    for overrides, difference in (
        ({"num_embeddings": 32}, "model.num_embeddings"),
        ({"data_dir": "/elsewhere"}, "data_dir"),
        ({"dataset": "cifar100"}, "dataset")):
      with self.subTest(difference):
        with self.assertRaisesRegex(rundir.FingerprintMismatch, difference):
          _train(tiny.vqvae_config(num_steps=6, **overrides), workdir)
        self.assertEqual(_snapshot(workdir), before)

  @pytest.mark.slow
  def test_truncated_run_metadata_is_a_clear_error(self):
    """Case 4: a partial run.json names itself; nothing is touched."""
    workdir = _trained_copy()
    path = os.path.join(workdir, loop.RUN_FILE)
    with open(path, "r+") as f:
      f.truncate(40)
    before = _snapshot(workdir)
    with self.assertRaisesRegex(rundir.RunDirError, "run.json"):
      _train(tiny.vqvae_config(num_steps=6), workdir)
    with self.assertRaisesRegex(rundir.RunDirError, "run.json"):
      train.restore_model(workdir)
    self.assertEqual(_snapshot(workdir), before)


class EvaluationTest(absltest.TestCase):

  @pytest.mark.slow
  @pytest.mark.nonfinite
  def test_non_finite_evaluation_is_null_and_an_error(self):
    """Case 5: NaN test metrics are valid JSON and fail the run."""
    workdir = _trained_copy()
    config, model = train.restore_model(workdir)
    weights = model.decoder.trainable_variables[0]
    weights.assign(tf.fill(weights.shape, np.nan))
    with tfds.testing.mock_data(num_examples=16):
      with self.assertRaisesRegex(FloatingPointError, "nmse"):
        train.evaluate_and_plot(config, model, workdir)
    with open(os.path.join(workdir, loop.EVAL_FILE)) as f:
      stored = json.loads(f.read(), parse_constant=self.fail)
    self.assertIsNone(stored["nmse"])
    self.assertIn("nmse", stored["nonfinite"])


class PriorProvenanceTest(absltest.TestCase):
  """Case 3: a prior is tied to the VQ-VAE checkpoint it was trained on."""

  @pytest.mark.slow
  def test_sampling_with_another_vqvae_is_an_error(self):
    # On a copy of the module's run (seed 0) at step 4.
    _, prior_dir = _trained_prior_copy()
    vqvae_b = tempfile.mkdtemp()
    _train_only(tiny.vqvae_config(seed=1), vqvae_b)
    config = tiny.prior_config(num_samples=2)
    before = _snapshot(prior_dir)
    with self.assertRaisesRegex(rundir.FingerprintMismatch, "another VQ-VAE"):
      prior.sample(config, vqvae_b, prior_dir)
    self.assertEqual(_snapshot(prior_dir), before)

    # Trained further (the module's run on to step 6), the VQ-VAE's codes
    # change: resuming the prior on them is an error naming the step;
    # sampling still finds the recorded one (the checkpoint it was trained
    # on, among newer ones).
    further, _ = _trained_further_copy()
    self.assertEqual(_latest_step(further), 6)
    with tfds.testing.mock_data(num_examples=16):
      with self.assertRaisesRegex(rundir.FingerprintMismatch, "vqvae.step"):
        prior.train_prior(tiny.prior_config(num_steps=4), further, prior_dir)
    self.assertTrue(os.path.exists(prior.sample(config, further, prior_dir)))


class _Stopped(Exception):
  """Ends a trainer that a test stopped on purpose."""


@pytest.mark.slow
class ProcessFaultTest(absltest.TestCase):
  """Kills and concurrent starts of the real CLI (processes from warm_cli)."""

  def setUp(self):
    super().setUp()
    self.workdir = tempfile.mkdtemp()

  def _start(self, **overrides):
    """`train` on this test's workdir: a process of its own (warm_cli)."""
    process = warm_cli.start(
        ["-m", "sonnet_vqvae.train", f"--workdir={self.workdir}",
         *tiny.cli_flags(tiny.vqvae_config(**overrides))],
        env=warm_cli.environment())
    self.addCleanup(process.kill)
    return process

  def test_second_process_on_a_workdir_fails_at_once(self):
    """A second `train` fails at once while a trainer holds the workdir.

    The trainer is this process, held where it has taken the lock and
    restored the run's newest checkpoint: only the second process starts.
    """
    self.workdir = _trained_copy()
    before = _checkpoint_files(self.workdir)
    restore = loop.restore
    second = []

    def start_a_second_process(*args, **kwargs):
      step = restore(*args, **kwargs)
      self.assertTrue(_held_by_another(self.workdir))
      start = time.time()
      second.append(self._start(num_steps=100_000))
      second[0].wait(timeout=120)
      second.append(time.time() - start)
      raise _Stopped(step)

    with mock.patch.object(loop, "restore", start_a_second_process):
      with self.assertRaises(_Stopped):
        _train_only(tiny.vqvae_config(num_steps=100_000), self.workdir)
    run, seconds = second
    self.assertNotEqual(run.returncode, 0)
    self.assertIn("in use by another process", run.stderr)
    self.assertIn(f"pid {os.getpid()}", run.stderr)
    # At once: the time of a Python/TF start, not of training.
    self.assertLess(seconds, 60)
    self.assertEqual(_checkpoint_files(self.workdir), before)

  def test_sigterm_saves_its_step_and_the_run_resumes_there(self):
    """SIGTERM loses no step: the current loop call ends in a checkpoint."""
    process = self._start(num_steps=100_000, checkpoint_every=100_000,
                          log_every=2, jit_compile=False)
    deadline = time.time() + 180
    while len(_rows(self.workdir)) < 2 and time.time() < deadline:
      self.assertIsNone(process.poll(), "the run ended early")
      time.sleep(0.1)
    logged = _rows(self.workdir)[-1]["step"]
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    stderr = process.stderr
    self.assertEqual(process.returncode, 128 + signal.SIGTERM, stderr[-3000:])
    last = stderr.strip().splitlines()[-1]
    stopped = re.fullmatch(
        r"train: Stopped by SIGTERM at step (\d+) of 100000, saved in "
        r"\S+; run the same command to resume from there\.", last)
    self.assertIsNotNone(stopped, last)
    step = int(stopped[1])
    self.assertGreaterEqual(step, logged)  # Every step it logged is saved.
    self.assertEqual(_latest_step(self.workdir), step)
    # The resume, in this process (the CLI's resume after a kill is
    # test_kills_at_random_moments_lose_nothing's).
    with self.assertLogs(level="INFO") as logs:
      _train_only(tiny.vqvae_config(num_steps=step + 2), self.workdir)
    self.assertIn(f"Training from step {step} to {step + 2}",
                  "\n".join(logs.output))
    steps = [r["step"] for r in _rows(self.workdir)]
    self.assertEqual(steps, [1, *range(2, step + 3, 2)])

  def test_kills_at_random_moments_lose_nothing(self):
    """kill -9 during a checkpoint's save, at a random moment, in evaluation.

    Each kill is a process start (most of this test's time), so the moments
    are chosen: a save between its temporary write and its rename, a random
    moment of training, checkpointing and logging, and evaluation. Each
    start of the same command resumes from the newest checkpoint, and the
    last one runs to the end.
    """
    flags = dict(num_steps=60, checkpoint_every=5, log_every=3,
                 max_checkpoints_to_keep=1000)
    checkpoints = os.path.join(self.workdir, "checkpoints")
    rng = random.Random(0)
    kept = {}
    for moment in ("save", "random", "evaluation", "end"):
      start_step = _latest_step(self.workdir) or 0
      process = self._start(**flags)  # The same command each time.
      if moment == "evaluation":
        # After the last checkpoint, before eval.json.
        while (_latest_step(self.workdir) != 60 and process.poll() is None):
          time.sleep(0.05)
      elif moment == "save":
        # A save's temporary directory exists (or, if the polls miss every
        # save, a random moment 20 steps on).
        deadline_step = start_step + 20
        while process.poll() is None:
          names = (os.listdir(checkpoints) if os.path.isdir(checkpoints)
                   else [])
          if any(name.endswith("_temp") for name in names):
            break
          steps = [int(n[5:-6]) for n in names
                   if n.startswith("ckpt-") and n.endswith(".index")]
          if max(steps, default=0) >= deadline_step:
            break
          time.sleep(0.002)
      elif moment == "random":
        # Some steps after the start, at a random moment.
        while ((_latest_step(self.workdir) or 0) < start_step + 5 and
               process.poll() is None):
          time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.5))
      if moment != "end":
        process.send_signal(signal.SIGKILL)
      process.wait(timeout=300)
      stderr = process.stderr
      # Every moment comes after the start of training.
      self.assertIn(f"Training from step {start_step} to 60", stderr)
      kept.update(_checkpoint_files(self.workdir))
    self.assertEqual(process.returncode, 0, stderr[-3000:])
    self.assertEqual(_latest_step(self.workdir), 60)
    for path, content in kept.items():  # Every earlier checkpoint intact.
      with open(path, "rb") as f:
        self.assertEqual(f.read(), content, path)
    steps = [r["step"] for r in _rows(self.workdir)]
    self.assertEqual(steps, sorted(set(steps)))  # No duplicates, in order.
    self.assertEqual(steps[-1], 60)
    with open(os.path.join(self.workdir, loop.EVAL_FILE)) as f:
      self.assertIn("nmse", json.load(f))

if __name__ == "__main__":
  absltest.main()
