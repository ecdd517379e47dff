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
* `make_loop` turns a replica step into a compiled loop that runs a fixed
  number of steps per call on the device (a `tf.while_loop` on a counter
  over the distributed iterator), sums the metrics there and, from a step
  with a non-finite loss on, changes nothing (a flag on the device);
  `update` is the replica step's guarded optimizer update and `FastestLoop`
  times candidate loops (XLA or not) on the first steps and keeps the
  faster;
* `run` calls the loop up to the next log or checkpoint step at a time,
  writes the metadata just before the first checkpoint, logs windowed means
  to `metrics.jsonl`, TensorBoard and the log, saves checkpoints, and stops
  with an error naming the step when the loss is not finite, keeping the
  last good checkpoint;
* `write_eval` writes eval.json as valid JSON and fails on non-finite
  metrics.

SIGTERM (preemptible VMs, schedulers, Colab) and SIGINT (Ctrl-C) stop `run`
gracefully: the current loop call finishes, a checkpoint is written and
`Stopped` is raised, naming the step; a second signal exits at once.
"""

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from typing import (Any, Callable, Dict, Iterator, List, Mapping, Optional,
                    Sequence)

from absl import logging
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from sonnet_vqvae import cli
from sonnet_vqvae import distribute
from sonnet_vqvae import loss_scale as loss_scale_lib
from sonnet_vqvae import optim
from sonnet_vqvae import rundir

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
CHECKPOINT_DIR = "checkpoints"

# What stops `run` gracefully.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

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
    if stored is not None:
      check_run(stored, run_dir.path(RUN_FILE))
  except Exception:
    run_dir.close()
    raise
  return run_dir, stored


def read_run(workdir: str) -> Optional[dict]:
  """The run metadata (run.json) of `workdir`, checked; None if absent.

  Reads only (no lock). The fields every reader uses are checked here, so
  that an edited or foreign file is one error naming it and the field, not a
  TypeError deep inside a restore.

  Raises:
    rundir.RunDirError: the file is not valid JSON, or a field is missing or
      not what it must be (see `check_run`).
  """
  stored = rundir.RunDir(workdir, writer=False).read_metadata(RUN_FILE)
  if stored is not None:
    check_run(stored, os.path.join(workdir, RUN_FILE))
  return stored


def check_run(stored: Any, path: str) -> None:
  """Checks the fields of a VQ-VAE's or a prior's run metadata.

  Every run: `fingerprint` and `config` objects. A VQ-VAE's: a positive
  finite `data_variance` and an `image_shape` of three positive ints. A
  prior's (its fingerprint has `num_embeddings`): `num_embeddings` a positive
  int or a list of them, `code_shape` a list, `vqvae` null or its `step` and
  `codebook_sha256`, and `vqvae_workdir` (if present) a string.

  Raises:
    rundir.RunDirError: naming `path`, the field, its value and what it must
      be.
  """
  def fail(field, value, must):
    found = ("is missing" if value is rundir.ABSENT else
             f"is {json.dumps(value)}")
    raise rundir.RunDirError(
        f"{path}: {field} {found}; it must be {must}. Another program or an "
        "edit changed it: fix it, or restore the file from a copy.")

  def get(mapping, key):
    return mapping.get(key, rundir.ABSENT)

  def positive_int(value):
    return (isinstance(value, int) and not isinstance(value, bool) and
            value > 0)

  if not isinstance(stored, dict):
    fail("the file", stored, "a JSON object")
  for field in ("fingerprint", "config"):
    if not isinstance(get(stored, field), dict):
      fail(f'"{field}"', get(stored, field), "an object")
  print_ = stored["fingerprint"]
  if "num_embeddings" not in print_:  # A VQ-VAE's run.
    variance = get(stored, "data_variance")
    if not (isinstance(variance, (int, float)) and
            not isinstance(variance, bool) and math.isfinite(variance) and
            variance > 0):
      fail('"data_variance"', variance, "a positive finite number")
    shape = get(print_, "image_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and
            all(map(positive_int, shape))):
      fail('"fingerprint.image_shape"', shape,
           "[height, width, channels], three positive ints")
    return
  sizes = print_["num_embeddings"]
  if not (positive_int(sizes) or (isinstance(sizes, list) and sizes and
                                  all(map(positive_int, sizes)))):
    fail('"fingerprint.num_embeddings"', sizes,
         "a positive int or a list of them")
  if not isinstance(get(print_, "code_shape"), list):
    fail('"fingerprint.code_shape"', get(print_, "code_shape"), "a list")
  vqvae = get(print_, "vqvae")
  if vqvae is not None and not (
      isinstance(vqvae, dict) and isinstance(vqvae.get("step"), int) and
      not isinstance(vqvae["step"], bool) and vqvae["step"] >= 0 and
      isinstance(vqvae.get("codebook_sha256"), str)):
    fail('"fingerprint.vqvae"', vqvae,
         'null or {"step": int, "codebook_sha256": str}')
  workdir = get(stored, "vqvae_workdir")
  if workdir is not rundir.ABSENT and not isinstance(workdir, str):
    fail('"vqvae_workdir"', workdir, "a path")


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


# A train loop bound to its iterator: num_steps -> `make_loop`'s outputs.
TrainLoop = Callable[[int], Mapping[str, Any]]
# `select_loop` times XLA against plain steps only for runs at least this long:
# on a CPU, compiling the reference model takes seconds that a shorter run
# does not win back.
AUTO_JIT_MIN_STEPS = 500


def mean_over_replicas(value: Any) -> Any:
  """A nest of tensors averaged over the replicas in sync (in replica context)."""
  context = tf.distribute.get_replica_context()
  # all_reduce of an empty nest fails; there is nothing to average.
  if context.num_replicas_in_sync > 1 and tf.nest.flatten(value):
    return context.all_reduce(tf.distribute.ReduceOp.MEAN, value)
  return value


# The `stopped` flag of the `make_loop` step being traced, per thread
# (MirroredStrategy traces each replica in its own thread), for `update`.
_GUARD = threading.local()


def snapshot(variables: Sequence[tf.Variable]
             ) -> "list[tuple[tf.Variable, tf.Tensor]]":
  """The values of `variables` now, for `update(..., kept=...)`.

  Take it in the replica step before the forward pass that may assign them
  (e.g. a quantizer's EMA statistics, usage and k-means/restart codes).
  """
  return [(v, v.read_value()) for v in variables]


def update(optimizer: optim.Adam, params: Sequence[tf.Variable],
           grads: Sequence[tf.Tensor], loss: tf.Tensor,
           loss_scale: Optional[loss_scale_lib.DynamicLossScale] = None,
           kept: Sequence["tuple[tf.Variable, tf.Tensor]"] = ()
           ) -> tf.Tensor:
  """A replica step's optimizer update, skipped where the loss is not finite.

  Gradients and loss are averaged over the replicas, so every replica makes
  the same update and the same decision. A non-finite mean loss skips the
  update and puts the `kept` variables back to their values before the
  step: `make_loop` stops after such a step, and the model's state stays
  that of the last good step instead of turning NaN.

  Args:
    optimizer: built for `params`.
    params: the trained variables.
    grads: this replica's gradients of `loss` (of `loss_scale.scale_loss(loss)`
      with a loss scale, which also skips the update when they overflow).
    loss: this replica's loss, unscaled. A step that must change nothing
      (e.g. its input is not finite) passes NaN.
    loss_scale: float16 training's loss scale, or None.
    kept: `snapshot` of the other state the step changed (taken before it),
      restored when the loss is not finite.

  Returns:
    The loss averaged over the replicas.
  """
  grads, loss = mean_over_replicas((list(grads), loss))
  good = tf.math.is_finite(loss)
  stopped = getattr(_GUARD, "stopped", None)
  if stopped is not None:  # In `make_loop`: nothing changes after a bad step.
    good = tf.logical_and(good, tf.logical_not(stopped))
  apply_if = good
  if loss_scale is not None:
    # A bad step leaves the scale too; an overflow alone only skips the update.
    kept = list(kept) + snapshot(loss_scale.variables)
    grads, finite_grads = loss_scale.update(grads)
    apply_if = tf.logical_and(apply_if, finite_grads)
  optimizer.apply(grads, params, apply_if)
  for variable, value in kept:
    # tf.where, not tf.cond: MirroredStrategy cannot sync assignments inside
    # control flow.
    variable.assign(tf.where(good, variable.read_value(), value))
  return loss


def make_loop(replica_step: Callable[[Any], Mapping[str, tf.Tensor]],
              strategy: tf.distribute.Strategy, jit_compile: bool = False
              ) -> Callable[[Iterator[Any], tf.Tensor], Dict[str, Any]]:
  """Compiles `replica_step` into a loop that runs many steps per call.

  One call runs `num_steps` steps in a `tf.while_loop` over the distributed
  iterator, on the device, and sums the metrics there: the host makes one
  call and one read per loop instead of one per step (the pattern of Keras'
  steps_per_execution and orbit's loops, which TPUs need). The loop's
  predicate is its counter alone, so the host never waits on a step's
  outputs to dispatch the next, and the replica step is traced once.

  The non-finite guard lives on the device: the loop carries `stopped`, set
  by the first step whose loss is not finite. The steps after it in the same
  call still run (the count is fixed) but change nothing: `update` reads the
  flag and skips their updates, and their metrics are left out.

  Args:
    replica_step: batch -> dict of scalar metrics averaged over the replicas
      (`mean_over_replicas`), among them `loss`; it updates the model with
      `update`, so a non-finite loss changes nothing.
    strategy: the strategy the model's variables live under.
    jit_compile: XLA-compile the replica step. The iterator and the loop stay
      outside the compiled cluster. TPUs compile every step anyway.

  Returns:
    train_loop(iterator, num_steps) for a scalar int32 tensor num_steps >= 1
    (a tensor: each new Python int would trace again), returning
      steps: int32, num_steps, or the number (from 1) of the first step
        whose loss was not finite, which changed nothing, nor did the ones
        after it;
      finite: bool, False when a step's loss was not finite (step `steps`);
      sums: float32 metrics summed over the steps before that one;
      last: float32 metrics of step `steps`.

  Raises:
    ValueError: jit_compile with several replicas on CPUs, which TF cannot
      XLA-compile (only GPUs and TPUs can).
  """
  if jit_compile and not distribute.is_tpu(strategy):
    if (strategy.num_replicas_in_sync > 1 and
        not distribute.all_gpus(strategy)):
      raise ValueError(
          "jit_compile=True with several replicas on CPUs: TF's "
          "MirroredStrategy compiles a replica step with XLA only on GPUs "
          "(its cross-replica sums cannot be compiled on CPUs). Use "
          "jit_compile='auto' or False, or one replica (strategy='default').")

  def guarded_step(batch, stopped):
    _GUARD.stopped = stopped
    try:
      return replica_step(batch)
    finally:
      _GUARD.stopped = None

  if jit_compile and not distribute.is_tpu(strategy):
    guarded_step = tf.function(guarded_step, jit_compile=True,
                               autograph=False)

  # The metrics' names, known once the step is traced inside the loop: the
  # loop carries them as one vector, so nothing needs their structure before.
  names = []

  def step_metrics(iterator, stopped):
    metrics = strategy.run(guarded_step, args=(next(iterator), stopped))
    # Already averaged over the replicas: every replica holds the same value.
    metrics = {k: strategy.experimental_local_results(v)[0]
               for k, v in metrics.items()}
    names[:] = sorted(metrics)
    return tf.stack([tf.cast(metrics[k], tf.float32) for k in names])

  # Written with tf.while_loop and tf.cond: AutoGraph's source rewrite of us
  # and Sonnet would only cost seconds per process (and reread edited files).
  @tf.function(autograph=False)
  def train_loop(iterator, num_steps):
    def body(i, stopped, bad_step, sums, last):
      values = step_metrics(iterator, stopped)
      finite = tf.math.is_finite(values[names.index("loss")])
      bad = tf.logical_and(tf.logical_not(stopped), tf.logical_not(finite))
      good = tf.logical_and(tf.logical_not(stopped), finite)
      # The first pass grows the empty vectors to the metrics' size.
      sums = _padded(sums, values) + tf.where(good, values, 0.)
      last = tf.where(stopped, _padded(last, values), values)
      return (i + 1, tf.logical_or(stopped, bad),
              tf.where(bad, i + 1, bad_step), sums, last)

    empty = tf.zeros([0])
    _, stopped, bad_step, sums, last = tf.while_loop(
        lambda i, *_: i < num_steps, body,
        (tf.constant(0), tf.constant(False), tf.constant(0), empty, empty),
        shape_invariants=(None, None, None, tf.TensorShape([None]),
                          tf.TensorShape([None])))
    return {"steps": tf.where(stopped, bad_step, num_steps),
            "finite": tf.logical_not(stopped),
            "sums": {k: sums[j] for j, k in enumerate(names)},
            "last": {k: last[j] for j, k in enumerate(names)}}

  return train_loop


def _padded(vector: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
  """`vector` zero-padded at the end to the size of `like`."""
  return tf.pad(vector, [[0, tf.size(like) - tf.size(vector)]])


class FastestLoop:
  """Runs the faster of several train loops, chosen by timing the first steps.

  The first calls alternate between the candidates: one step each (it traces
  and compiles), then `trial_steps` each, `rounds` times, timed. The loop with
  the lowest time per step is used for the rest of the run and logged.
  Trial steps are training steps like the others.
  """

  def __init__(self, candidates: Mapping[str, TrainLoop],
               trial_steps: int = 10, rounds: int = 2):
    self._candidates = dict(candidates)
    names = list(candidates)
    self._schedule = ([(n, 1) for n in names] +
                      [(n, trial_steps) for _ in range(rounds) for n in names])
    self._seconds = dict.fromkeys(names, 0.)
    self._steps = dict.fromkeys(names, 0)
    self.chosen = names[0] if len(names) == 1 else None
    self.steps_per_sec: Dict[str, float] = {}

  def __call__(self, num_steps: int) -> Dict[str, Any]:
    if self.chosen is not None:
      return self._candidates[self.chosen](num_steps)
    name, cap = self._schedule.pop(0)
    start = time.perf_counter()
    out = tf.nest.map_structure(
        np.asarray, self._candidates[name](min(cap, num_steps)))
    if cap > 1:  # Not the first call, which traces and compiles.
      self._seconds[name] += time.perf_counter() - start
      self._steps[name] += int(out["steps"])
    if not self._schedule:
      self.steps_per_sec = {n: self._steps[n] / max(self._seconds[n], 1e-9)
                            for n in self._candidates}
      self.chosen = max(self.steps_per_sec, key=self.steps_per_sec.get)
      logging.info("jit_compile='auto': %s; using %s.", ", ".join(
          f"{n} {r:.1f} steps/s" for n, r in self.steps_per_sec.items()),
                   self.chosen)
    return out


def select_loop(replica_step: Callable[[Any], Mapping[str, tf.Tensor]],
                strategy: tf.distribute.Strategy, iterator: Iterator[Any],
                jit_compile: Any, num_steps: int) -> TrainLoop:
  """The train loop of `replica_step` for a run of `num_steps` more steps.

  Args:
    replica_step, strategy: as for `make_loop`.
    iterator: the distributed iterator the loop reads.
    jit_compile: True, False or "auto": time XLA against plain steps on the
      first steps (`FastestLoop`) and keep the faster, since which one wins
      depends on the model and the machine. "auto" runs without XLA, saying
      why, on TPUs (they compile anyway), on several CPU replicas (TF cannot
      compile them), on several workers (each would time on its own) and for
      runs shorter than AUTO_JIT_MIN_STEPS.
    num_steps: steps this invocation will run.

  Returns:
    train_loop(num_steps) -> `make_loop`'s outputs as NumPy values.
  """
  def bind(jit):
    compiled = make_loop(replica_step, strategy, jit)
    return lambda n: tf.nest.map_structure(
        np.asarray, compiled(iterator, tf.constant(n, tf.int32)))

  if jit_compile != "auto":
    return bind(bool(jit_compile))
  reason = None
  if distribute.is_tpu(strategy):
    reason = "TPUs compile every step with XLA anyway"
  elif (strategy.num_replicas_in_sync > 1 and
        not distribute.all_gpus(strategy)):
    reason = "TF cannot XLA-compile several CPU replicas"
  elif isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    # Each worker would time on its own and might choose differently.
    reason = "the workers of a multi-worker run must make the same choice"
  elif num_steps < AUTO_JIT_MIN_STEPS:
    reason = (f"{num_steps} steps are too few to win back XLA's compile "
              f"time (timing starts at {AUTO_JIT_MIN_STEPS})")
  if reason:
    logging.info("jit_compile='auto': without XLA: %s.", reason)
    return bind(False)
  return FastestLoop({"XLA": bind(True), "no XLA": bind(False)})


def check_loop_config(config: Any) -> None:
  """Raises ValueError for a config's jit_compile or steps_per_loop.

  Both trainers' configs have them: jit_compile True, False or "auto" (see
  `select_loop`), steps_per_loop None (up to the next log or checkpoint
  step) or a positive int.
  """
  if not (config.jit_compile is True or config.jit_compile is False or
          config.jit_compile == "auto"):
    raise ValueError("config.jit_compile must be True, False or 'auto', got "
                     f"{config.jit_compile!r}.")
  per_loop = config.steps_per_loop
  if per_loop is not None and (isinstance(per_loop, bool) or
                               not isinstance(per_loop, int) or per_loop < 1):
    raise ValueError("config.steps_per_loop must be None (up to the next log "
                     "or checkpoint step) or a positive int, got "
                     f"{per_loop!r}.")


class Stopped(Exception):
  """`run` stopped at a signal, after writing a checkpoint of its step.

  Attributes:
    signum: the signal's number (exit status 128 + signum is the shell's
      convention for a process ended by it).
    step: the step of the checkpoint written.
  """

  def __init__(self, message: str, signum: int, step: int):
    super().__init__(message)
    self.signum = signum
    self.step = step


@contextlib.contextmanager
def exit_when_stopped(program: str) -> Iterator[None]:
  """Turns `Stopped` into one line on stderr and exit status 128 + signal."""
  try:
    yield
  except Stopped as e:
    print(f"{program}: {e}", file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)


@contextlib.contextmanager
def _stop_requests(enabled: bool) -> Iterator[List[int]]:
  """Yields a list that receives the number of a SIGTERM or SIGINT.

  The first signal only asks to stop; its handler puts the default actions
  back, so that a second one ends the process at once. Python runs handlers
  between bytecodes: a signal received during a loop call is seen when the
  call returns. The previous handlers are put back on exit. Handlers can
  only be set in the main thread; elsewhere (and when not `enabled`) the
  list stays empty.
  """
  received: List[int] = []
  if not enabled or threading.current_thread() is not threading.main_thread():
    yield received
    return

  def handler(signum, unused_frame):
    received.append(signum)
    for s in STOP_SIGNALS:
      signal.signal(s, signal.SIG_DFL)
    logging.warning(
        "Received %s: stopping after the current loop call with a "
        "checkpoint. Send it again to exit at once.",
        signal.Signals(signum).name)

  previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
  try:
    yield received
  finally:
    for s, action in previous.items():
      signal.signal(s, action)


def _next_multiple(step: int, every: int) -> int:
  return (step // every + 1) * every


def run(train_loop: TrainLoop, *,
        run_dir: rundir.RunDir,
        checkpoints: rundir.Checkpoints,
        start_step: int,
        num_steps: int,
        log_every: int,
        checkpoint_every: int,
        metadata: Mapping[str, Any],
        fingerprint: Mapping[str, Any],
        describe: Callable[[Mapping[str, float]], str],
        steps_per_loop: Optional[int] = None,
        summary_prefix: str = "train",
        after_checkpoint: Optional[Callable[[int], None]] = None,
        stop_on_signals: bool = True
        ) -> Dict[str, float]:
  """Runs `train_loop` from `start_step` to `num_steps`.

  Each call of the loop runs up to the next log or checkpoint step (or
  `steps_per_loop` steps, if fewer); everything on the host happens between
  calls.

  Args:
    train_loop: num_steps -> `make_loop`'s outputs (see `select_loop`); it
      may run fewer steps than asked and says how many.
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
    steps_per_loop: most steps per call; None: up to the next log or
      checkpoint step.
    summary_prefix: TensorBoard tag prefix.
    after_checkpoint: called with the step after each checkpoint but the
      last (e.g. a validation pass).
    stop_on_signals: stop gracefully at SIGTERM or SIGINT (see `Stopped`).
      Multi-worker runs pass False: their workers would stop at different
      steps and their collective save would hang.

  Returns:
    The last metrics row ({} when there was nothing to train).

  Raises:
    FloatingPointError: the loss was not finite; training stopped after that
      step, whose update was skipped, and the last good checkpoint is kept.
    Stopped: at SIGTERM or SIGINT, after the current loop call and a
      checkpoint of its step.
  """
  with _stop_requests(stop_on_signals) as stop:
    return _run(train_loop, run_dir=run_dir, checkpoints=checkpoints,
                start_step=start_step, num_steps=num_steps,
                log_every=log_every, checkpoint_every=checkpoint_every,
                metadata=metadata, fingerprint=fingerprint, describe=describe,
                steps_per_loop=steps_per_loop, summary_prefix=summary_prefix,
                after_checkpoint=after_checkpoint, stop_requests=stop)


def _run(train_loop, *, run_dir, checkpoints, start_step, num_steps,
         log_every, checkpoint_every, metadata, fingerprint, describe,
         steps_per_loop, summary_prefix, after_checkpoint, stop_requests):
  """`run`'s loop; `stop_requests` gets the signal that asks it to stop."""
  writer = (tf.summary.create_file_writer(run_dir.workdir) if run_dir.writer
            else tf.summary.create_noop_writer())
  # Log lines go above the bar, never on its line.
  progress = cli.progress_bar(
      total=num_steps, initial=start_step,
      disable=not (run_dir.writer and sys.stderr.isatty()))
  # Rewritten by every invocation that saves, so it holds the config of the
  # newest one (e.g. a larger num_steps); the fingerprint cannot change.
  metadata_written = False
  sums, count, row = {}, 0, {}
  last_good, step = (start_step or None), start_step
  window_start, window_first = time.time(), step
  while step < num_steps:
    stop = min(num_steps, _next_multiple(step, log_every),
               _next_multiple(step, checkpoint_every))
    if steps_per_loop:
      stop = min(stop, step + steps_per_loop)
    if step == 0:
      # The first step gets a row of its own: curves start at step 1, also
      # when num_steps <= log_every.
      stop = 1
    out = tf.nest.map_structure(np.asarray, train_loop(stop - step))
    step += int(out["steps"])
    progress.update(int(out["steps"]))
    if not out["finite"]:
      progress.close()
      last = {k: float(v) for k, v in out["last"].items()}
      kept = (f"the last good checkpoint (step {last_good}) in "
              f"{checkpoints.directory} is kept" if last_good else
              "no checkpoint had been written yet")
      raise FloatingPointError(
          f"Non-finite loss {last['loss']} at step {step} ({last}); "
          f"training stopped there, without its update, and {kept}. Lower "
          "the learning rate or check the data.")
    for k, v in out["sums"].items():
      sums[k] = sums.get(k, 0.) + float(v)
    count += int(out["steps"])
    if step % log_every == 0 or step == num_steps or step == 1:
      steps_per_sec = (step - window_first) / (time.time() - window_start)
      row = {k: v / count for k, v in sums.items()}
      row.update(step=step, steps_per_sec=steps_per_sec)
      run_dir.append_row(METRICS_FILE, row)
      write_scalars(writer, summary_prefix, row)
      # The first window's rate includes tracing and compiling: no ETA yet.
      eta = ("" if step == 1 else
             f" ETA {(num_steps - step) / steps_per_sec:.0f}s")
      logging.info("step %d/%d %s %.2f steps/s%s", step, num_steps,
                   describe(row), steps_per_sec, eta)
      sums, count = {}, 0
      window_start, window_first = time.time(), step
    if (step % checkpoint_every == 0 or step == num_steps or
        stop_requests):
      if not metadata_written:
        run_dir.write_metadata(RUN_FILE, dict(fingerprint), **metadata)
        metadata_written = True
      checkpoints.save(step)
      last_good = step
      if stop_requests:
        progress.close()
        writer.flush()
        raise Stopped(
            f"Stopped by {signal.Signals(stop_requests[0]).name} at step "
            f"{step} of "
            f"{num_steps}, saved in {checkpoints.directory}; run the same "
            "command to resume from there.", stop_requests[0], step)
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

