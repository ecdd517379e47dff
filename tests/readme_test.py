"""Every command and snippet in README.md runs.

The README's Python blocks run as written. Its `python -m sonnet_vqvae.*`
commands run in order, each in a process of its own (forked from one that
has imported TF: tests/warm_cli.py) as `python -m` runs it, on tfds mock
data, with the tiny configs of `tests/tiny.py` added (a README `--config.key`
the tiny config also sets is replaced) and its /tmp paths moved into a
temporary directory. Its install and
test commands must be the ones CI (`.ci/run`) runs.
"""

import os
import re
import shlex
import tempfile
from typing import List

from absl.testing import absltest
import pytest

import tiny
import warm_cli

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Calls the signatures of the export at argv[1], as a user's process does
# (grappler optimizes them there: tests/remapper_test.py).
_CALL_EXPORT = """
import sys
import tensorflow as tf
signatures = tf.saved_model.load(sys.argv[1]).signatures
signatures["reconstruct"](images=tf.zeros([2, 32, 32, 3], tf.uint8))
signatures["sample"](labels=tf.constant([0, 1]), temperature=tf.constant(1.0),
                     seed=tf.constant(0, tf.int64))
"""


def _read(path: str) -> str:
  with open(os.path.join(_ROOT, path)) as f:
    return f.read()


def _blocks(language: str) -> List[str]:
  return re.findall(rf"^```{language}\n(.*?)^```", _read("README.md"),
                    re.S | re.M)


def _commands(block: str) -> List[str]:
  """The block's command lines, continuation lines joined, comments dropped."""
  joined = block.replace("\\\n", " ")
  lines = [line.split(" #")[0].strip() for line in joined.splitlines()]
  return [line for line in lines if line and not line.startswith("#")]


def _cli_commands() -> List[List[str]]:
  return [shlex.split(command) for block in _blocks("sh")
          for command in _commands(block)
          if command.startswith("python -m sonnet_vqvae.")]


def _tiny_flags(module: str, argv: List[str]) -> List[str]:
  if module == "sonnet_vqvae.train":
    return tiny.cli_flags(tiny.vqvae_config())
  if module == "sonnet_vqvae.prior":
    flags = tiny.cli_flags(tiny.prior_config())
    if "--mode=sample" in argv:
      flags.append("--config.num_samples=4")
    return flags
  return []


def _with_tiny_flags(argv: List[str], tmp: str) -> List[str]:
  """argv with the tiny config's flags and its /tmp paths under `tmp`."""
  module = argv[2]
  extra = _tiny_flags(module, argv)
  overridden = {flag.split("=")[0] for flag in extra}
  argv = [arg.replace("/tmp/", tmp + "/") for arg in argv[3:]
          if arg.split("=")[0] not in overridden]
  return [module] + argv + extra


class ReadmeTest(absltest.TestCase):

  def test_install_and_test_commands_are_what_ci_runs(self):
    ci = " ".join(_read(".ci/run").replace("--quiet ", "").split())
    (tests_block,) = [block for block in _blocks("sh")
                      if "pytest" in block]
    commands = _commands(tests_block)
    self.assertNotEmpty(commands)
    for command in commands:
      # The README says `pip`, CI `python -m pip` in its virtualenv.
      self.assertIn(command.replace("pip install", "python -m pip install"),
                    ci)

  def test_readme_is_at_most_150_lines(self):
    # Details belong in docs/: the README is what a newcomer reads first.
    self.assertLessEqual(len(_read("README.md").splitlines()), 150)

  def test_readme_names_no_data_beside_the_dev_checkout(self):
    self.assertNotIn("shared/data", _read("README.md"))

  def test_linked_files_exist(self):
    readme = _read("README.md")
    links = re.findall(r"\]\(((?!https?:|#)[^)]+)\)", readme)
    self.assertNotEmpty(links)
    for link in links:
      self.assertTrue(os.path.exists(os.path.join(_ROOT, link)), link)

  def test_python_snippets_run(self):
    blocks = _blocks("python")
    self.assertNotEmpty(blocks)
    for block in blocks:
      exec(compile(block, "README.md", "exec"), {})  # pylint: disable=exec-used

  @pytest.mark.slow
  def test_cli_commands_run_in_order(self):
    commands = _cli_commands()
    modules = {argv[2] for argv in commands}
    self.assertContainsSubset(
        {"sonnet_vqvae.train", "sonnet_vqvae.prior", "sonnet_vqvae.export"},
        modules)
    env = warm_cli.environment()
    with tempfile.TemporaryDirectory() as tmp:
      runs = [["-m", *_with_tiny_flags(argv, tmp)] for argv in commands]
      runs.append(["-c", _CALL_EXPORT, os.path.join(tmp, "prior_export")])
      for argv in runs:  # In order: each reads what the ones before wrote.
        process = warm_cli.run(argv, env, cwd=_ROOT, timeout=600)
        output = process.stdout + process.stderr
        self.assertEqual(process.returncode, 0,
                         f"{' '.join(argv)}\n{output[-3000:]}")
        # With oneDNN, grappler's remapper failed on our residual stacks
        # (tests/remapper_test.py): in no program, nor in an export's calls.
        self.assertEmpty([line for line in output.splitlines()
                          if "remapper failed" in line], " ".join(argv))
      self.assertTrue(os.path.exists(
          os.path.join(tmp, "prior", "prior_samples.png")))
      self.assertTrue(os.path.exists(
          os.path.join(tmp, "prior_export", "saved_model.pb")))


if __name__ == "__main__":
  absltest.main()
