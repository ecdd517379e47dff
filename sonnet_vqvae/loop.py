"""The training loop both trainers run: steps, logs, checkpoints, guards.

`train.train` (the VQ-VAE) and `prior.train_on_codes` (the PixelCNN) each
build their model, optimizer and a compiled step and run them through these
functions, which own everything a run does to its workdir:

* `open_run` locks the workdir (a second process on it fails at once) and
  checks that the run metadata stored there (`run.json`) describes the same
  run (its fingerprint: data, model, what a prior was trained on);
* `restore` restores the newest checkpoint (never starting from scratch over
  checkpoints it could not read) and drops metrics rows of steps a resumed
  run will redo;
* `run` writes the metadata just before the first checkpoint, logs windowed
  means to `metrics.jsonl`, TensorBoard and the log, saves checkpoints, and
  stops with an error naming the step when the loss is not finite, keeping
  the last good checkpoint;
* `write_eval` writes eval.json as valid JSON and fails on non-finite
  metrics.
"""

import math
import sys
import time
from typing import Any, Callable, Dict, Mapping, Optional

from absl import logging
import tensorflow as tf
from tensorflow.core.framework import summary_pb2
import tqdm

from sonnet_vqvae import distribute
from sonnet_vqvae import rundir

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
CHECKPOINT_DIR = "checkpoints"

_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))


def open_run(workdir: str, fingerprint: Mapping[str, Any]
             ) -> "tuple[rundir.RunDir, Optional[dict]]":
  """Locks `workdir` for this run and reads the run stored there.

  Only the chief writes (and locks); other workers of a multi-worker run
  read.

  Args:
    workdir: the run's directory (created if missing).
    fingerprint: what must match for a run to resume here (JSON-able).

  Returns:
    (run_dir, stored): stored is the run metadata written by an earlier run
    with the same fingerprint, None for a fresh workdir.

  Raises:
    rundir.RunDirError: another process holds the workdir.
    rundir.FingerprintMismatch: the workdir holds another run (each
      difference named).
  """
  run_dir = rundir.RunDir(workdir, writer=distribute.is_chief())
  run_dir.lock()
  try:
    stored = run_dir.check_fingerprint(RUN_FILE, dict(fingerprint))
  except Exception:
    run_dir.close()
    raise
  return run_dir, stored


def checkpoints_of(run_dir: rundir.RunDir, checkpoint: tf.train.Checkpoint,
                   strategy: tf.distribute.Strategy,
                   max_to_keep: int) -> rundir.Checkpoints:
  """The run's checkpoints; non-chief workers save into a scratch directory.

  Saving is collective under multi-worker strategies, so every worker saves;
  only the chief's copy is kept.
  """
  directory = run_dir.path(CHECKPOINT_DIR)
  save_directory = None
  if not run_dir.writer:
    save_directory = run_dir.path(
        f"worker_{distribute.task_id(strategy)}_scratch")
  return rundir.Checkpoints(checkpoint, directory, max_to_keep=max_to_keep,
                            save_directory=save_directory)


def restore(run_dir: rundir.RunDir, checkpoints: rundir.Checkpoints,
            stored: Optional[dict]) -> int:
  """Restores the newest checkpoint; returns its step (0 for a fresh run).

  Metrics rows of steps after it (logged before a kill, to be redone) are
  dropped, so the resumed run's rows continue where the checkpoint stands.

  Raises:
    rundir.RunDirError: checkpoints exist but cannot be restored, or exist
      without the run metadata that says what they were trained on.
  """
  step = checkpoints.restore()
  if step and stored is None:
    raise rundir.RunDirError(
        f"{checkpoints.directory} holds checkpoints (step {step}) but "
        f"{run_dir.path(RUN_FILE)} is missing, so what they were trained on "
        "is unknown. Restore that file, or move the checkpoints away (or use "
        "another --workdir) to start afresh. Nothing was changed.")
  run_dir.truncate_rows(METRICS_FILE, step)
  return step


def write_scalars(writer: tf.summary.SummaryWriter, prefix: str,
                  row: Mapping[str, float]) -> None:
  """Writes every value of `row` but its step as a TensorBoard scalar."""
  with writer.as_default(step=row["step"]):
    for key, value in row.items():
      if key != "step" and value is not None:
        # tf.summary.scalar needs the tensorboard package; this is its op.
        tf.summary.write(f"{prefix}/{key}", tf.constant(value, tf.float32),
                         metadata=_SCALAR_METADATA)


def run(train_step: Callable[[], Mapping[str, tf.Tensor]], *,
        run_dir: rundir.RunDir,
        checkpoints: rundir.Checkpoints,
        start_step: int,
        num_steps: int,
        log_every: int,
        checkpoint_every: int,
        metadata: Mapping[str, Any],
        fingerprint: Mapping[str, Any],
        describe: Callable[[Mapping[str, float]], str],
        summary_prefix: str = "train",
        after_checkpoint: Optional[Callable[[int], None]] = None
        ) -> Dict[str, float]:
  """Runs `train_step` from `start_step` to `num_steps`.

  Args:
    train_step: runs one step and returns scalar metrics, among them `loss`.
    run_dir: the run's directory (from `open_run`).
    checkpoints: the run's checkpoints (from `checkpoints_of`), restored.
    start_step: the restored step.
    num_steps: the step to stop at.
    log_every: steps between metrics rows (means over the window).
    checkpoint_every: steps between checkpoints; the last step saves too.
    metadata: extra entries of the run metadata, written with `fingerprint`
      just before this invocation's first checkpoint (a run that never saved
      leaves none, so a failed start cannot leave settings for the next).
    fingerprint: see `open_run`.
    describe: a row -> the text of its log line after "step N/M".
    summary_prefix: TensorBoard tag prefix.
    after_checkpoint: called with the step after each checkpoint but the
      last (e.g. a validation pass).

  Returns:
    The last metrics row ({} when there was nothing to train).

  Raises:
    FloatingPointError: the loss was not finite; training stopped there and
      the last good checkpoint is kept.
  """
  writer = (tf.summary.create_file_writer(run_dir.workdir) if run_dir.writer
            else tf.summary.create_noop_writer())
  progress = tqdm.tqdm(total=num_steps, initial=start_step,
                       disable=not (run_dir.writer and sys.stderr.isatty()))
  # Rewritten by every invocation that saves, so it holds the config of the
  # newest one (e.g. a larger num_steps); the fingerprint cannot change.
  metadata_written = False
  sums, count, row = {}, 0, {}
  last_good, step = (start_step or None), start_step
  window_start, window_first = time.time(), step
  while step < num_steps:
    metrics = {k: float(v) for k, v in train_step().items()}
    step += 1
    progress.update()
    if not math.isfinite(metrics["loss"]):
      kept = (f"the last good checkpoint (step {last_good}) in "
              f"{checkpoints.directory} is kept" if last_good else
              "no checkpoint had been written yet")
      raise FloatingPointError(
          f"Non-finite loss {metrics['loss']} at step {step} ({metrics}); "
          f"training stopped and {kept}. Lower the learning rate or check "
          "the data.")
    for k, v in metrics.items():
      sums[k] = sums.get(k, 0.) + v
    count += 1
    if step % log_every == 0 or step == num_steps:
      steps_per_sec = (step - window_first) / (time.time() - window_start)
      row = {k: v / count for k, v in sums.items()}
      row.update(step=step, steps_per_sec=steps_per_sec)
      run_dir.append_row(METRICS_FILE, row)
      write_scalars(writer, summary_prefix, row)
      logging.info("step %d/%d %s %.2f steps/s ETA %.0fs", step, num_steps,
                   describe(row), steps_per_sec,
                   (num_steps - step) / steps_per_sec)
      sums, count = {}, 0
      window_start, window_first = time.time(), step
    if step % checkpoint_every == 0 or step == num_steps:
      if not metadata_written:
        run_dir.write_metadata(RUN_FILE, dict(fingerprint), **metadata)
        metadata_written = True
      checkpoints.save(step)
      last_good = step
      if after_checkpoint is not None and step < num_steps:
        after_checkpoint(step)
  progress.close()
  writer.flush()
  return row


def remove_scratch(checkpoints: rundir.Checkpoints) -> None:
  """Removes a non-chief worker's scratch checkpoints after training."""
  scratch = checkpoints.save_directory
  if scratch and scratch != checkpoints.directory and tf.io.gfile.exists(
      scratch):
    tf.io.gfile.rmtree(scratch)


def write_eval(run_dir: rundir.RunDir, metrics: Mapping[str, Any],
               name: str = EVAL_FILE) -> None:
  """Writes evaluation metrics as valid JSON, failing on non-finite ones.

  Raises:
    FloatingPointError: after writing, when a metric is not finite (it is
      written as null and listed under "nonfinite"), so a run that evaluated
      to NaN exits non-zero.
  """
  path = run_dir.path(name)
  nonfinite = rundir.write_json(path, dict(metrics))
  if nonfinite:
    raise FloatingPointError(
        f"Non-finite evaluation metrics {nonfinite} (written as null to "
        f"{path}); the model or the evaluation data holds NaN or Inf.")

