"""Strategy choice on emulated accelerators: fake /dev trees, env vars, TPUs.

No accelerator is available here: each case builds the files a host would
have (an NPU's /dev/accel/ directory, VFIO, a TPU VM's /dev/accel0 or PCI ids)
in a temporary directory and passes the environment a runtime would set, and
TPU initialisation is a fake that records its argument or fails. (Workers
that restored different steps: tests/train_cli_test.py's two workers.)
"""

import importlib.util
import io
import json
import os
import subprocess
import tempfile

from absl import logging
from absl.testing import absltest
from absl.testing import parameterized
import pytest
import tensorflow as tf

from sonnet_vqvae import distribute
import warm_cli


def _tree(files):
  """A fake filesystem root holding `files` ({path: content}; '/' ends dirs)."""
  root = tempfile.mkdtemp()
  for path, content in files.items():
    full = os.path.join(root, path)
    if path.endswith("/"):
      os.makedirs(full, exist_ok=True)
      continue
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "w") as f:
      f.write(content)
  return root


_NPU = {"dev/accel/accel0": ""}  # Linux accel subsystem: Intel/AMD NPU, Habana.
_VFIO = {"dev/vfio/0": "", "dev/vfio/vfio": "",
         # A VFIO-bound NVIDIA GPU.
         "sys/bus/pci/devices/0000:00:04.0/vendor": "0x10de\n",
         "sys/bus/pci/devices/0000:00:04.0/device": "0x2330\n"}
_TPU_V4 = {"dev/accel0": "", "dev/accel1": ""}
_TPU_V5E = {"dev/vfio/0": "", "dev/vfio/vfio": "",
            "sys/bus/pci/devices/0000:00:05.0/vendor": "0x1ae0\n",
            "sys/bus/pci/devices/0000:00:05.0/device": "0x0063\n"}
# Google's vendor id on a device that is not a TPU (e.g. a gVNIC).
_GOOGLE_NIC = {"sys/bus/pci/devices/0000:00:06.0/vendor": "0x1ae0\n",
               "sys/bus/pci/devices/0000:00:06.0/device": "0x0042\n"}


class _FakeConnect:
  """Stands for `connect_tpu`: records the address, or fails like plain TF."""

  def __init__(self, fail=False):
    self.calls = []
    self.fail = fail

  def __call__(self, tpu):
    self.calls.append(tpu)
    if self.fail:
      raise tf.errors.InvalidArgumentError(
          None, None, "No OpKernel was registered to support Op "
          "'ConfigureDistributedTPU' used by {{node ConfigureDistributedTPU}}"
          "\nRegistered devices: [CPU]")
    return "tpu strategy"


class TpuAddressTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("nothing", {}, {}, None),
      ("npu_accel_directory", _NPU, {}, None),
      ("vfio_without_tpu", _VFIO, {}, None),
      ("google_device_not_tpu", _GOOGLE_NIC, {}, None),
      ("tpu_v4_accel0", _TPU_V4, {}, "local"),
      ("tpu_v5e_vfio", _TPU_V5E, {}, "local"),
      ("colab_tpu_node", {}, {"COLAB_TPU_ADDR": "10.0.0.2:8470"},
       "grpc://10.0.0.2:8470"),
      ("tpu_name_local", {}, {"TPU_NAME": "local"}, "local"),
      ("tpu_name_node", {}, {"TPU_NAME": "my-tpu"}, "my-tpu"),
      ("tpu_name_grpc", {}, {"TPU_NAME": "grpc://10.0.0.3:8470"},
       "grpc://10.0.0.3:8470"),
      # A name the user gave wins over what the host has.
      ("tpu_name_over_attached", _TPU_V4, {"TPU_NAME": "my-tpu"}, "my-tpu"),
      ("tpu_name_over_colab", {},
       {"TPU_NAME": "my-tpu", "COLAB_TPU_ADDR": "10.0.0.2:8470"}, "my-tpu"),
  )
  def test_resolver_argument(self, files, environ, expected):
    tpu, why = distribute.tpu_address(environ, _tree(files))
    self.assertEqual(tpu, expected)
    self.assertTrue(why)

  def test_attached_tpus_names_exact_files(self):
    root = _tree({**_NPU, **_VFIO, **_TPU_V4, "dev/accelerator": ""})
    self.assertEqual(distribute.attached_tpus(root),
                     [os.path.join(root, "dev", "accel0"),
                      os.path.join(root, "dev", "accel1")])
    self.assertEqual(distribute.attached_tpus("/nonexistent"), [])


class BuildStrategyTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("npu", _NPU, {}),
      ("vfio", _VFIO, {}),
  )
  def test_auto_never_tries_a_tpu_on_npu_or_vfio_hosts(self, files, environ):
    connect = _FakeConnect()
    strategy = distribute.build_strategy("auto", environ, _tree(files),
                                         connect)
    self.assertEqual(connect.calls, [])
    self.assertIs(strategy, tf.distribute.get_strategy())

  @parameterized.named_parameters(
      ("attached", _TPU_V5E, {}, "local"),
      ("colab", {}, {"COLAB_TPU_ADDR": "10.0.0.2:8470"},
       "grpc://10.0.0.2:8470"),
      ("named", {}, {"TPU_NAME": "my-tpu"}, "my-tpu"),
  )
  def test_auto_and_tpu_connect_to_the_resolved_tpu(self, files, environ,
                                                     expected):
    for name in ("auto", "tpu"):
      connect = _FakeConnect()
      strategy = distribute.build_strategy(name, environ, _tree(files),
                                           connect)
      self.assertEqual(connect.calls, [expected])
      self.assertEqual(strategy, "tpu strategy")

  def test_auto_falls_back_with_one_warning_when_tpu_init_fails(self):
    connect = _FakeConnect(fail=True)
    with self.assertLogs(level="WARNING") as logs:
      strategy = distribute.build_strategy("auto", {}, _tree(_TPU_V4),
                                           connect)
    self.assertEqual(connect.calls, ["local"])
    # No GPU here: the one-device default strategy, as without a TPU.
    self.assertIs(strategy, tf.distribute.get_strategy())
    warnings = [r for r in logs.records if r.levelno >= logging.WARNING]
    self.assertLen(warnings, 1)
    message = warnings[0].getMessage()
    self.assertIn("could not be initialised", message)
    self.assertIn("ConfigureDistributedTPU", message)
    self.assertIn(distribute.TENSORFLOW_TPU, message)

  def test_tpu_failure_says_what_to_install(self):
    with self.assertRaisesRegex(RuntimeError, r"(?s)'local'.*"
                                r"ConfigureDistributedTPU.*plain `tensorflow` "
                                r"has no TPU kernels.*tensorflow-tpu==2\.20"):
      distribute.build_strategy("tpu", {}, _tree({}), _FakeConnect(True))

  def test_auto_multi_worker_from_tf_config_before_any_tpu(self):
    connect = _FakeConnect()
    environ = {"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1", "b:2"]},
                                        "task": {"type": "worker",
                                                 "index": 0}}),
               "TPU_NAME": "local"}
    # Not built (it would start a server): only which branch is taken.
    with absltest.mock.patch.object(
        tf.distribute, "MultiWorkerMirroredStrategy",
        return_value="multi worker"):
      self.assertEqual(distribute.build_strategy("auto", environ, "/",
                                                 connect), "multi worker")
    self.assertEqual(connect.calls, [])

  def test_unknown_name(self):
    with self.assertRaisesRegex(ValueError, "strategy must be one of"):
      distribute.build_strategy("gpu", {}, "/")


class BatchSizeTest(absltest.TestCase):

  def test_small_per_core_batch_on_tpu_gets_one_log_line(self):
    replicator = distribute.make_strategy("replicator")  # 2 logical CPUs.
    with absltest.mock.patch.object(distribute, "is_tpu", return_value=True):
      with self.assertLogs(level="INFO") as logs:
        distribute.check_batch_size(8, replicator)
      lines = [r.getMessage() for r in logs.records]
      self.assertLen(lines, 1)
      self.assertIn("config.batch_size=8 is 4 per TPU core", lines[0])
      self.assertIn("consider batch_size=16 or more", lines[0])
      with self.assertNoLogs(level="INFO"):
        distribute.check_batch_size(16, replicator)
    with self.assertNoLogs(level="INFO"):  # Not a TPU: nothing to say.
      distribute.check_batch_size(8, replicator)
    with self.assertRaisesRegex(ValueError, "not divisible by the 2"):
      distribute.check_batch_size(7, replicator)

  def test_same_step_check_is_a_no_op_off_multi_worker(self):
    distribute.check_same_step(5, tf.distribute.get_strategy())
    distribute.check_same_step(5, distribute.make_strategy("replicator"))


_NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "notebooks")


def _install_cell(name):
  import nbformat  # pylint: disable=g-import-not-at-top
  notebook = nbformat.read(os.path.join(_NOTEBOOKS, name), as_version=4)
  cells = [c for c in notebook.cells if "install" in c.metadata.get("tags", [])]
  assert len(cells) == 1, name
  return cells[0].source


class InstallCellTest(parameterized.TestCase):
  """The notebooks' install cell, run as Colab would run it, in dry-run mode."""

  def _run(self, environ):
    """Runs the cell with `environ` as os.environ; returns what it printed."""
    source = _install_cell("vqvae_example.ipynb")
    with absltest.mock.patch.dict(os.environ, environ, clear=True), \
        absltest.mock.patch("sys.stdout", new_callable=io.StringIO) as out:
      exec(compile(source, "install_cell", "exec"), {})  # pylint: disable=exec-used
    return out.getvalue()

  def test_both_notebooks_have_the_same_install_cell(self):
    self.assertEqual(_install_cell("vqvae_example.ipynb"),
                     _install_cell("vqvae2_example.ipynb"))

  def test_dry_run_on_a_fake_tpu_runtime_prints_the_tpu_install(self):
    printed = self._run({"SONNET_VQVAE_INSTALL_DRY_RUN": "1",
                         "TPU_NAME": "local"})
    self.assertEqual(printed.splitlines(), [
        "Runtime: tpu. Would run:",
        "pip install -q 'sonnet_vqvae[tpu] @ "
        "git+https://github.com/<owner>/sonnet_vqvae'",
        "pip install -q --force-reinstall --no-deps "
        f"{distribute.TENSORFLOW_TPU}"])

  def test_dry_run_elsewhere_prints_the_plain_install(self):
    printed = self._run({"SONNET_VQVAE_INSTALL_DRY_RUN": "1",
                         "COLAB_TPU_ADDR": "10.0.0.2:8470"})  # A TPU node.
    self.assertIn("Runtime: cpu. Would run:", printed)
    self.assertIn("pip install -q 'sonnet_vqvae @ git+https://", printed)
    self.assertNotIn("tpu", printed.split("Would run:")[1])

  def test_installed_package_or_unset_repository_never_raises(self):
    # Here the package is importable (this checkout): nothing to do.
    self.assertIn("nothing to install", self._run({}))
    # Not installed and REPOSITORY still unset: says what to set, installs
    # nothing.
    real_find_spec = importlib.util.find_spec
    with absltest.mock.patch.object(
        importlib.util, "find_spec",
        lambda name: None if name == "sonnet_vqvae" else real_find_spec(name)
    ), absltest.mock.patch.object(subprocess, "check_call") as check_call:
      printed = self._run({})
    self.assertIn("Set REPOSITORY above", printed)
    check_call.assert_not_called()

  @parameterized.named_parameters(
      ("nothing", {}), ("npu", _NPU), ("vfio", _VFIO),
      ("google_nic", _GOOGLE_NIC), ("v4", _TPU_V4), ("v5e", _TPU_V5E))
  def test_cell_finds_a_tpu_exactly_where_distribute_does(self, files):
    namespace = {}
    with absltest.mock.patch.dict(
        os.environ, {"SONNET_VQVAE_INSTALL_DRY_RUN": "1"}), \
        absltest.mock.patch("sys.stdout", new_callable=io.StringIO):
      exec(compile(_install_cell("vqvae_example.ipynb"), "install_cell",
                   "exec"), namespace)  # pylint: disable=exec-used
    root = _tree(files)
    self.assertEqual(namespace["runtime"]({}, root) == "tpu",
                     bool(distribute.attached_tpus(root)))
    self.assertEqual(namespace["TENSORFLOW_TPU"], distribute.TENSORFLOW_TPU)


# Builds the strategies with the real TPU initialisation of this TensorFlow,
# as on a Colab TPU runtime with the plain wheel.
_REAL_TPU_INIT = """
from sonnet_vqvae import distribute
print("AUTO", type(distribute.build_strategy("auto")).__name__)
try:
  distribute.build_strategy("tpu")
except RuntimeError as e:
  print("TPU ERROR", e)
"""


@pytest.mark.slow
class RealTpuInitTest(absltest.TestCase):

  def test_plain_tensorflow_falls_back_or_says_what_to_install(self):
    # In a process of its own: a TPU initialisation changes the process's
    # context. Forked from warm_cli's zygote: TPU_NAME is read after import.
    run = warm_cli.run(["-c", _REAL_TPU_INIT],
                       env=warm_cli.environment(TPU_NAME="local"),
                       zygote_env=warm_cli.environment())
    self.assertEqual(run.returncode, 0, run.stderr[-3000:])
    self.assertIn("AUTO _DefaultDistributionStrategy", run.stdout)
    # One warning, naming TensorFlow's missing TPU kernels and the fix.
    warnings = [line for line in run.stderr.splitlines()
                if "could not be initialised" in line]
    self.assertLen(warnings, 1)
    self.assertIn("ConfigureDistributedTPU", warnings[0])
    self.assertIn(distribute.TENSORFLOW_TPU, warnings[0])
    self.assertIn("TPU ERROR strategy='tpu': could not initialise the TPU "
                  "'local' (TPU_NAME=local)", run.stdout)
    self.assertIn("plain `tensorflow` has no TPU kernels", run.stdout)


if __name__ == "__main__":
  absltest.main()
