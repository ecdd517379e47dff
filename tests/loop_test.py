"""The compiled train loop: many steps per call, XLA, the guard, the choice."""

import json
import os
import signal
import tempfile
import time

from absl import logging
from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from sonnet_vqvae import distribute
from sonnet_vqvae import export
from sonnet_vqvae import loop
from sonnet_vqvae import precision
from sonnet_vqvae import prior
from sonnet_vqvae import rundir
from sonnet_vqvae import train
import tiny


def _batches(count, seed=0, nan_at=None):
  """`count` different [4, 32, 32, 3] batches; batch `nan_at` all NaN."""
  images = tf.random.stateless_uniform([count, 4, 32, 32, 3], [seed, 1]) - .5
  if nan_at is not None:
    images = tf.tensor_scatter_nd_update(
        images, [[nan_at]], tf.fill([1, 4, 32, 32, 3], np.nan))
  return tf.data.Dataset.from_tensor_slices(images)


def _model(strategy=None, **overrides):
  strategy = strategy or tf.distribute.get_strategy()
  return train.create_model_and_optimizer(tiny.vqvae_config(**overrides),
                                          0.06, strategy)


def _state(model, optimizer):
  return [v.numpy() for v in model.variables + optimizer.variables]


def _copy(source, target):
  for s, t in zip(source.variables, target.variables):
    t.assign(s)


def _restore_state(model, optimizer, state):
  """Puts back a `_state`: one model and loop (one trace, one XLA compile)
  then runs both sides of a comparison."""
  for variable, value in zip(model.variables + optimizer.variables, state):
    variable.assign(value)


# One model and loop per jit_compile, shared by the tests below: each trace
# costs seconds, each XLA compile more. A test starts from `initial`.
_LOOPS = {}


def _shared_loop(jit_compile):
  """(model, optimizer, initial state, loop); both models start alike."""
  if jit_compile not in _LOOPS:
    model, optimizer = _model()
    if _LOOPS:  # The same parameters as the other one's.
      _restore_state(model, optimizer, next(iter(_LOOPS.values()))[2])
    _LOOPS[jit_compile] = (
        model, optimizer, _state(model, optimizer),
        train.make_train_loop(model, optimizer, tf.distribute.get_strategy(),
                              jit_compile))
  model, optimizer, initial, train_loop = _LOOPS[jit_compile]
  _restore_state(model, optimizer, initial)
  return model, optimizer, initial, train_loop


class LoopTest(parameterized.TestCase):

  @parameterized.named_parameters(("plain", False), ("xla", True))
  def test_k_steps_in_one_call_equal_k_calls_of_one_step(self, jit_compile):
    k = 5
    model, optimizer, initial, train_loop = _shared_loop(jit_compile)
    out = train_loop(iter(_batches(k)), tf.constant(k))
    self.assertEqual(int(out["steps"]), k)
    self.assertTrue(bool(out["finite"]))
    self.assertEqual(int(optimizer.step.numpy()), k)
    after_one_call = _state(model, optimizer)
    _restore_state(model, optimizer, initial)
    iterator, singles = iter(_batches(k)), []
    for _ in range(k):
      singles.append(train_loop(iterator, tf.constant(1)))
    # Same batches, same order, same arithmetic: the same parameters.
    for a, b in zip(after_one_call, _state(model, optimizer)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    self.assertEqual(int(optimizer.step.numpy()), k)
    for key, total in out["sums"].items():
      self.assertAlmostEqual(
          float(total), sum(float(s["sums"][key]) for s in singles),
          places=4, msg=key)
    for key, value in out["last"].items():
      self.assertAlmostEqual(float(value), float(singles[-1]["last"][key]),
                             places=5, msg=key)

  @pytest.mark.slow
  def test_xla_loop_trains_like_the_plain_loop(self):
    model_a, _, initial, plain = _shared_loop(False)
    model_b, _, initial_b, xla = _shared_loop(True)
    for x, y in zip(initial, initial_b):  # The same start.
      np.testing.assert_array_equal(x, y)
    a = plain(iter(_batches(8).repeat()), tf.constant(8))
    b = xla(iter(_batches(8).repeat()), tf.constant(8))
    # Loss falls, and XLA's rounding stays within float32 noise of TF's.
    self.assertLess(float(b["last"]["loss"]), float(b["sums"]["loss"]) / 8)
    self.assertAlmostEqual(float(a["sums"]["loss"]), float(b["sums"]["loss"]),
                           places=3)
    for x, y in zip(model_a.trainable_variables, model_b.trainable_variables):
      np.testing.assert_allclose(x.numpy(), y.numpy(), atol=1e-4,
                                 err_msg=x.name)

  @parameterized.named_parameters(("plain", False), ("xla", True))
  @pytest.mark.nonfinite
  def test_non_finite_loss_stops_the_loop_before_its_update(self, jit_compile):
    model, optimizer, initial, train_loop = _shared_loop(jit_compile)
    iterator = iter(_batches(6, nan_at=2))
    out = train_loop(iterator, tf.constant(6))
    # Steps 1 and 2 trained, step 3 was not finite: the loop stopped there.
    self.assertEqual(int(out["steps"]), 3)
    self.assertFalse(bool(out["finite"]))
    self.assertTrue(np.isnan(float(out["last"]["loss"])))
    self.assertTrue(np.isfinite(float(out["sums"]["loss"])))
    self.assertEqual(int(optimizer.step.numpy()), 2)
    # The call ran its fixed count: the good batches after the bad one ran
    # too, and changed nothing (compared below).
    with self.assertRaises(StopIteration):
      next(iterator)
    # No update from the bad step: the state is that of the two good ones.
    after_bad_step = _state(model, optimizer)
    _restore_state(model, optimizer, initial)
    train_loop(iter(_batches(2)), tf.constant(2))
    for a, b in zip(after_bad_step, _state(model, optimizer)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

  def test_the_loop_predicate_reads_only_its_counter(self):
    # The shared loop's trace of the signature the other tests call.
    train_loop = _shared_loop(False)[3]
    graph = train_loop.get_concrete_function(
        iter(_batches(2)), tf.TensorSpec([], tf.int32)).graph
    whiles = [op for op in graph.get_operations()
              if op.type in ("While", "StatelessWhile")]
    self.assertLen(whiles, 1)
    cond = graph._functions[  # pylint: disable=protected-access
        whiles[0].get_attr("cond").name].graph

    def ancestors(tensors):
      seen, todo = set(), list(tensors)
      while todo:
        op = todo.pop().op
        if op.name not in seen:
          seen.add(op.name)
          todo.extend(op.inputs)
      return seen

    # The cond function's arguments are the While's inputs, one for one.
    read = ancestors(cond.outputs) & {t.op.name for t in cond.inputs}
    used = [whiles[0].inputs[i] for i, t in enumerate(cond.inputs)
            if t.op.name in read]
    # The counter (from the constant 0) and num_steps; never `stopped`, the
    # metrics or anything a step computes.
    self.assertLen(used, 2)
    self.assertEqual(used[0].op.type, "Const")
    self.assertEqual(tf.get_static_value(used[0]), 0)
    self.assertEqual(used[1].op.type, "Placeholder")
    self.assertIn("num_steps", used[1].op.name)

  def test_the_replica_step_is_traced_once(self):
    model, optimizer = _model()
    step = train.make_replica_step(model, optimizer)
    traces = []

    def counted(images):
      traces.append(1)
      return step(images)

    train_loop = loop.make_loop(counted, tf.distribute.get_strategy())
    iterator = iter(_batches(6))
    train_loop(iterator, tf.constant(2))
    train_loop(iterator, tf.constant(3))
    self.assertLen(traces, 1)

  @pytest.mark.nonfinite
  def test_a_nan_at_step_k_leaves_the_state_of_step_k_minus_1(self):
    model, optimizer, initial, train_loop = _shared_loop(False)
    k = 4
    out = train_loop(iter(_batches(6, nan_at=k - 1)), tf.constant(6))
    self.assertEqual(int(out["steps"]), k)
    self.assertFalse(bool(out["finite"]))
    after_nan = _state(model, optimizer)
    _restore_state(model, optimizer, initial)
    train_loop(iter(_batches(6)), tf.constant(k - 1))
    for a, b in zip(after_nan, _state(model, optimizer)):
      np.testing.assert_array_equal(a, b)

  @pytest.mark.slow
  def test_two_replicas_loop_matches_one_and_refuses_xla(self):
    self.assertLen(tf.config.list_logical_devices("CPU"), 2)
    replicator = distribute.make_strategy("replicator")
    model_a, _, _, one = _shared_loop(False)
    model_b, optimizer_b = _model(replicator)
    _copy(model_a, model_b)
    with self.assertRaisesRegex(ValueError, "only on GPUs.*'auto' or False"):
      train.make_train_loop(model_b, optimizer_b, replicator, True)
    # "auto" runs the replicas without XLA and says why: that loop (the
    # plain `make_train_loop`'s) is the one compared with one device's.
    with self.assertLogs(level="INFO") as logs:
      two = loop.select_loop(
          train.make_replica_step(model_b, optimizer_b), replicator,
          iter(replicator.experimental_distribute_dataset(_batches(3))),
          "auto", num_steps=10_000)
    self.assertIn("cannot XLA-compile several CPU replicas",
                  "\n".join(logs.output))
    one(iter(_batches(3)), tf.constant(3))
    out = two(3)
    self.assertEqual(int(out["steps"]), 3)
    for a, b in zip(model_a.variables, model_b.variables):
      np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5,
                                 err_msg=a.name)

  def test_auto_skips_xla_for_short_runs(self):
    model, optimizer = _model()
    with self.assertLogs(level="INFO") as logs:
      train_loop = loop.select_loop(
          train.make_replica_step(model, optimizer),
          tf.distribute.get_strategy(), iter(_batches(3)), "auto",
          num_steps=3)
    self.assertIn("too few", "\n".join(logs.output))
    self.assertFalse(hasattr(train_loop, "chosen"))
    self.assertEqual(int(train_loop(3)["steps"]), 3)


class FastestLoopTest(absltest.TestCase):

  def _candidate(self, seconds_per_step, calls):
    def run(n):
      calls.append((seconds_per_step, n))
      time.sleep(seconds_per_step * n)
      return {"steps": np.int32(n), "finite": np.bool_(True),
              "sums": {"loss": np.float32(n)}, "last": {"loss": 1.}}
    return run

  def test_times_each_candidate_then_keeps_the_faster(self):
    calls = []
    fastest = loop.FastestLoop({"slow": self._candidate(0.004, calls),
                                "fast": self._candidate(0.001, calls)},
                               trial_steps=5, rounds=2)
    with self.assertLogs(level="INFO") as logs:
      done = [int(fastest(100)["steps"]) for _ in range(6)]
    # A one-step warm-up each, then two alternating timed rounds of 5.
    self.assertEqual(done, [1, 1, 5, 5, 5, 5])
    self.assertEqual([s for s, _ in calls],
                     [0.004, 0.001, 0.004, 0.001, 0.004, 0.001])
    self.assertEqual(fastest.chosen, "fast")
    self.assertIn("using fast", "\n".join(logs.output))
    self.assertEqual(int(fastest(100)["steps"]), 100)
    self.assertEqual(calls[-1], (0.001, 100))

  def test_trial_calls_never_pass_the_asked_steps(self):
    calls = []
    fastest = loop.FastestLoop({"a": self._candidate(0., calls),
                                "b": self._candidate(0., calls)},
                               trial_steps=10)
    fastest(3)
    fastest(3)
    fastest(3)
    self.assertEqual([n for _, n in calls], [1, 1, 3])


class RunTest(absltest.TestCase):

  @pytest.mark.slow
  def test_steps_per_loop_changes_neither_rows_nor_parameters(self):
    runs = {}
    for per_loop in (None, 1):
      workdir = tempfile.mkdtemp()
      config = tiny.vqvae_config(num_steps=6, log_every=3,
                                 checkpoint_every=2, steps_per_loop=per_loop)
      calls = []
      real = loop.make_loop

      def counting(*args, **kwargs):
        compiled = real(*args, **kwargs)

        def call(iterator, n):
          calls.append(int(n))
          return compiled(iterator, n)
        return call

      with tfds.testing.mock_data(num_examples=16), \
          absltest.mock.patch.object(loop, "make_loop", counting):
        model = train.train(config, workdir)
      rows = rundir.RunDir(workdir, writer=False).read_rows(loop.METRICS_FILE)
      runs[per_loop] = (calls, rows, [v.numpy() for v in model.variables])
    # Calls end at the first step, every log (3, 6) and checkpoint (2, 4, 6)
    # step.
    self.assertEqual(runs[None][0], [1, 1, 1, 1, 2])
    self.assertEqual(runs[1][0], [1] * 6)
    for (a, b) in zip(runs[None][1], runs[1][1]):
      a.pop("steps_per_sec"), b.pop("steps_per_sec")
      self.assertEqual(a.keys(), b.keys())
      for key in a:
        self.assertAlmostEqual(a[key], b[key], places=5, msg=key)
    for a, b in zip(runs[None][2], runs[1][2]):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

  @pytest.mark.slow
  @pytest.mark.nonfinite
  def test_non_finite_loss_in_a_loop_names_the_step_and_keeps_checkpoints(
      self):
    workdir = tempfile.mkdtemp()
    real = train.make_replica_step
    calls = tf.Variable(0)

    def nan_from_step_5(*args, **kwargs):
      step = real(*args, **kwargs)

      def replica_step(images):
        calls.assign_add(1)
        return step(tf.where(calls >= 5, np.nan, images))
      return replica_step

    config = tiny.vqvae_config(num_steps=8, log_every=4, checkpoint_every=4)
    with tfds.testing.mock_data(num_examples=16), \
        absltest.mock.patch.object(train, "make_replica_step",
                                   nan_from_step_5):
      with self.assertRaisesRegex(
          FloatingPointError,
          r"at step 5 .*without its update.*good checkpoint \(step 4\)"):
        train.train(config, workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    self.assertEqual(tf.train.latest_checkpoint(checkpoints),
                     os.path.join(checkpoints, "ckpt-4"))
    # The kept checkpoint restores, and its parameters are finite.
    _, model = train.restore_model(workdir)
    for variable in model.variables:
      self.assertTrue(np.all(np.isfinite(variable.numpy())), variable.name)


class GracefulStopTest(parameterized.TestCase):
  """SIGTERM and SIGINT: finish the call, save, stop; a second one kills."""

  @parameterized.parameters(signal.SIGTERM, signal.SIGINT)
  def test_signal_finishes_the_call_saves_its_step_and_stops(self, signum):
    workdir = tempfile.mkdtemp()
    # Stands for the model: counts the steps the loop ran.
    counter = tf.Variable(0, dtype=tf.int64)
    checkpoint = tf.train.Checkpoint(counter=counter,
                                     step=tf.Variable(0, dtype=tf.int64))
    before = {s: signal.getsignal(s) for s in loop.STOP_SIGNALS}
    seen = []

    def train_loop(num_steps):
      if counter.numpy() == 3:  # During the call that runs step 4.
        os.kill(os.getpid(), signum)
      counter.assign_add(num_steps)
      return {"steps": num_steps, "finite": True, "sums": {"loss": 1.0},
              "last": {"loss": 1.0}}

    def describe(row):
      # After each call: what a further signal would do.
      seen.append({s: signal.getsignal(s) for s in loop.STOP_SIGNALS})
      return ""

    with rundir.RunDir(workdir) as run_dir:
      checkpoints = loop.checkpoints_of(
          run_dir, checkpoint, tf.distribute.get_strategy(), max_to_keep=5)
      loop.restore(run_dir, checkpoints, None)
      with self.assertRaisesRegex(
          loop.Stopped,
          f"{signal.Signals(signum).name} at step 4 of 100, saved in "
          f"{workdir}.*to resume") as stopped:
        loop.run(train_loop, run_dir=run_dir, checkpoints=checkpoints,
                 start_step=0, num_steps=100, log_every=1,
                 checkpoint_every=50, metadata={}, fingerprint={"a": 1},
                 describe=describe)
    self.assertEqual((stopped.exception.signum, stopped.exception.step),
                     (signum, 4))
    values = tf.train.load_checkpoint(
        os.path.join(workdir, "checkpoints", "ckpt-4"))
    self.assertEqual(values.get_tensor("counter/.ATTRIBUTES/VARIABLE_VALUE"),
                     4)
    self.assertEqual(values.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"), 4)
    self.assertTrue(os.path.exists(os.path.join(workdir, loop.RUN_FILE)))
    self.assertLen(seen, 4)
    for handlers in seen[:3]:  # Before the signal: the graceful handler.
      self.assertTrue(all(callable(h) for h in handlers.values()))
    # After it, a second SIGTERM or SIGINT takes the default action: exit.
    self.assertEqual(seen[3], dict.fromkeys(loop.STOP_SIGNALS,
                                            signal.SIG_DFL))
    self.assertEqual({s: signal.getsignal(s) for s in loop.STOP_SIGNALS},
                     before)  # Put back.


def _vqvae_run(**changes):
  """A VQ-VAE's run.json as `train` writes it, with `changes` at top level."""
  config = tiny.vqvae_config()
  stored = {"fingerprint": train.fingerprint(config, [32, 32, 3]),
            "config": config.to_dict(), "data_variance": 0.06}
  stored.update(changes)
  return stored


class RunFileTest(parameterized.TestCase):
  """run.json fields are checked on read: one error naming file and field."""

  def _write(self, stored):
    workdir = tempfile.mkdtemp()
    with open(os.path.join(workdir, loop.RUN_FILE), "w") as f:
      json.dump(stored, f)
    return workdir, os.path.join(workdir, loop.RUN_FILE)

  @parameterized.named_parameters(
      ("variance_text", dict(data_variance="abc"),
       '"data_variance" is "abc"; it must be a positive finite number'),
      ("variance_missing", dict(data_variance=None),
       '"data_variance" is null'),
      ("config_missing", dict(config=None), '"config" is null'),
      ("shape", dict(fingerprint={"image_shape": [32, "x", 3]}),
       '"fingerprint.image_shape" is \\[32, "x", 3\\]'))
  def test_every_reader_names_the_file_and_field(self, changes, message):
    workdir, path = self._write(_vqvae_run(**changes))
    pattern = f"^{path}: {message}"
    for read in (loop.read_run, train.restore_model,
                 lambda w: export.export_saved_model(w, w + "_export")):
      with self.assertRaisesRegex(rundir.RunDirError, pattern):
        read(workdir)
    # The trainer, under its lock, before any work.
    with self.assertRaisesRegex(rundir.RunDirError, pattern):
      loop.open_run(workdir, json.load(open(path))["fingerprint"])

  def test_a_missing_key_is_named(self):
    stored = _vqvae_run()
    del stored["data_variance"]
    workdir, path = self._write(stored)
    with self.assertRaisesRegex(
        rundir.RunDirError, f'^{path}: "data_variance" is missing'):
      train.restore_model(workdir)

  def test_prior_fields(self):
    stored = {"fingerprint": {"model": {}, "num_embeddings": [4, "5"],
                              "code_shape": [[2, 2], [4, 4]], "vqvae": None},
              "config": tiny.prior_config().to_dict()}
    workdir, path = self._write(stored)
    with self.assertRaisesRegex(
        rundir.RunDirError,
        f'^{path}: "fingerprint.num_embeddings" is \\[4, "5"\\]'):
      prior.restore_prior(workdir)
    stored["fingerprint"].update(num_embeddings=[4, 5], vqvae={"step": 3})
    workdir, path = self._write(stored)
    with self.assertRaisesRegex(rundir.RunDirError,
                                f'^{path}: "fingerprint.vqvae"'):
      prior.restore_prior(workdir)

  def test_a_valid_file_reads(self):
    workdir, _ = self._write(_vqvae_run())
    self.assertEqual(loop.read_run(workdir)["data_variance"], 0.06)
    self.assertIsNone(loop.read_run(tempfile.mkdtemp()))


class ConfigTest(parameterized.TestCase):

  @parameterized.parameters(
      (dict(jit_compile="yes"), "jit_compile"),
      (dict(jit_compile=1), "jit_compile"),
      (dict(steps_per_loop=0), "steps_per_loop"),
      (dict(steps_per_loop=-3), "steps_per_loop"))
  def test_bad_loop_settings_are_named(self, overrides, key):
    with self.assertRaisesRegex(ValueError, f"config.{key}"):
      train.validate_config(tiny.vqvae_config(**overrides))

  def test_prior_config_checks_them_too(self):
    from sonnet_vqvae import prior  # pylint: disable=g-import-not-at-top
    with self.assertRaisesRegex(ValueError, "config.jit_compile"):
      prior.validate_config(tiny.prior_config(jit_compile="fast"))


class PrecisionTest(absltest.TestCase):

  def test_auto_is_bfloat16_only_with_amx_on_a_cpu(self):
    strategy = tf.distribute.get_strategy()
    self.assertEqual(precision.resolve(
        "auto", strategy, flags=frozenset({"avx2", "amx_bf16"}))[0],
                     "bfloat16")
    choice, why = precision.resolve("auto", strategy,
                                    flags=frozenset({"avx2", "avx512f"}))
    self.assertIsNone(choice)
    self.assertIn("no AMX-BF16", why)

  def test_explicit_choices_pass_through(self):
    strategy = tf.distribute.get_strategy()
    for choice in (None, "bfloat16", "float16"):
      self.assertEqual(precision.resolve(choice, strategy)[0], choice)

  def test_cpu_flags_read_cpuinfo(self):
    path = os.path.join(tempfile.mkdtemp(), "cpuinfo")
    with open(path, "w") as f:
      f.write("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n\n")
    self.assertEqual(precision.cpu_flags(path),
                     {"fpu", "avx2", "amx_bf16", "amx_tile"})
    self.assertEqual(precision.cpu_flags(path + ".missing"), frozenset())

  def test_auto_trains_in_what_it_resolves_to(self):
    model, optimizer = _model(mixed_precision="auto")
    self.assertIsNone(optimizer.loss_scale)  # auto never picks float16
    logging.info("auto resolves to %s here", precision.resolve(
        "auto", tf.distribute.get_strategy())[0])


class EvaluateTest(absltest.TestCase):

  def test_padded_batches_give_the_unpadded_metrics(self):
    model, _ = _model()
    images = tf.random.stateless_uniform([10, 32, 32, 3], [3, 4]) - .5
    split = tf.data.Dataset.from_tensor_slices({"image": images})
    from sonnet_vqvae import input_pipeline  # pylint: disable=g-import-not-at-top
    padded = train.evaluate(model, input_pipeline.eval_dataset(split, 4))
    whole = train.evaluate(model, tf.data.Dataset.from_tensors(images))
    plain = train.evaluate(
        model, tf.data.Dataset.from_tensor_slices(images).batch(4))
    for metrics in (padded, plain):
      self.assertEqual(metrics.keys(), whole.keys())
      for key in whole:
        self.assertAlmostEqual(metrics[key], whole[key], places=6, msg=key)
    out = model(images, is_training=False)
    mse = np.mean((out["x_recon"].numpy() - images.numpy())**2)
    self.assertAlmostEqual(whole["mse"], mse, places=6)
    codes = out["vq_output"]["encoding_indices"].numpy()
    self.assertEqual(whole["codes_used"], len(np.unique(codes)))


if __name__ == "__main__":
  absltest.main()
