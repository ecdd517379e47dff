"""Tests for sonnet_vqvae.configs: unknown keys are named with the nearest."""

import inspect
import os
import re
import sys
import tempfile
from unittest import mock

from absl import flags
from absl.testing import absltest
from ml_collections import config_flags

from sonnet_vqvae import configs
from sonnet_vqvae import distribute
from sonnet_vqvae.configs import default
from sonnet_vqvae.configs import prior


class CheckKeysTest(absltest.TestCase):

  def test_known_keys_pass(self):
    configs.check_keys(default.get_config(), default.get_config())
    configs.check_keys(prior.get_config(), prior.get_config())

  def test_unknown_key_names_the_nearest(self):
    config = default.get_config()
    config.unlock()
    config.num_step = 3
    with self.assertRaisesRegex(
        ValueError, r"^Unknown config key 'num_step': did you mean num_steps\?"):
      configs.check_keys(config, default.get_config())

  def test_unknown_nested_key(self):
    config = default.get_config()
    config.quantizer.unlock()
    config.quantizer.dead_code_treshold = 1.0
    with self.assertRaisesRegex(
        ValueError, "'quantizer.dead_code_treshold': did you mean "
        "quantizer.dead_code_threshold"):
      configs.check_keys(config, default.get_config())

  def test_nothing_near_lists_the_valid_keys(self):
    config = prior.get_config()
    config.unlock()
    config.zzz = 1
    with self.assertRaisesRegex(ValueError, "valid keys: .*batch_size"):
      configs.check_keys(config, prior.get_config())


class UnknownOverrideTest(absltest.TestCase):

  def test_messages_for_each_unknown_override(self):
    messages = configs.unknown_override(
        ["prog", "--config.num_steps=3", "--config.typo_key=3",
         "--config.quantizer.cosin=true", "--config.seed.x=1", "--other=1"],
        "config", default.get_config())
    self.assertLen(messages, 3)
    self.assertIn("'typo_key'", messages[0])
    self.assertIn("did you mean quantizer.cosine", messages[1])
    self.assertIn("seed has no sub-keys", messages[2])

  def test_exit_names_the_key(self):
    with self.assertRaisesRegex(SystemExit, "did you mean num_steps"):
      configs.exit_on_unknown_override(["prog", "--config.num_step=3"],
                                       "config", default.get_config())
    configs.exit_on_unknown_override(["prog", "--config.num_steps=3"],
                                     "config", default.get_config())

class CommentsTest(absltest.TestCase):

  def test_strategy_comments_list_what_validation_takes(self):
    for module in (default, prior):
      source = inspect.getsource(module.get_config).split("\n")
      line = next(i for i, l in enumerate(source)
                  if "config.strategy =" in l)
      comment = []
      while source[line - 1].strip().startswith("#"):
        line -= 1
        comment.append(source[line])
      self.assertEqual(set(re.findall(r'"(\w+)"', "".join(comment))),
                       set(distribute.STRATEGIES), module.__name__)


class PresetTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    # Not the repository root: presets must not depend on the cwd.
    self.addCleanup(os.chdir, os.getcwd())
    os.chdir(tempfile.mkdtemp())

  def test_names_and_the_repository_path_from_anywhere(self):
    folder = os.path.dirname(os.path.abspath(configs.__file__))
    self.assertEqual(configs.presets(), ["default", "prior", "vqvae2"])
    for value in ("vqvae2", "vqvae2.py", "sonnet_vqvae/configs/vqvae2.py"):
      self.assertEqual(configs.config_file(value),
                       os.path.join(folder, "vqvae2.py"), value)
    self.assertEqual(configs.config_file("default:arg"),
                     os.path.join(folder, "default.py") + ":arg")

  def test_an_existing_file_is_itself(self):
    with open("mine.py", "w") as f:
      f.write("")
    self.assertEqual(configs.config_file("mine.py"), "mine.py")
    self.assertEqual(configs.config_file("mine.py:x"), "mine.py:x")

  def test_neither_file_nor_preset_names_the_presets(self):
    for value in ("vqvae3", "elsewhere/vqvae2.py"):
      with self.assertRaisesRegex(
          ValueError, f"^--config={value}: no such file, and no preset of "
          "that name \\(presets: default, prior, vqvae2\\)"):
        configs.config_file(value)

  def test_resolve_config_flag_rewrites_both_forms(self):
    folder = os.path.dirname(os.path.abspath(configs.__file__))
    argv = ["prog", "--config=vqvae2", "--config.num_steps=3", "--config",
            "prior", "--workdir=w"]
    self.assertEqual(configs.resolve_config_flag(argv), [
        "prog", f"--config={folder}/vqvae2.py", "--config.num_steps=3",
        "--config", f"{folder}/prior.py", "--workdir=w"])


def _parsed_flag(*args):
  """The config flag of `train`'s command line after parsing `args`."""
  argv = configs.resolve_config_flag(["prog", *args])
  values = flags.FlagValues()
  # ml_collections defines the override flags from sys.argv.
  with mock.patch.object(sys, "argv", argv):
    config_flags.DEFINE_config_file(
        "config", configs.config_file("default"), flag_values=values,
        lock_config=True)
  values(argv)
  return values["config"]


class ForRunTest(absltest.TestCase):
  """`train --workdir W` resumes W's stored config, overrides on top."""

  def setUp(self):
    super().setUp()
    stored = default.get_config()
    stored.update(num_embeddings=32, num_steps=4, learning_rate=1e-3,
                  level_num_embeddings=(8, 16), num_levels=2)
    stored.quantizer.cosine = True
    # As run.json holds it: JSON types (the tuple became a list).
    self.stored = dict(stored.to_dict(), level_num_embeddings=[8, 16])

  def test_no_stored_run_is_the_flags_config(self):
    config = configs.for_run(_parsed_flag("--config.num_steps=7"), None, "r")
    self.assertEqual(config.to_dict(), dict(default.get_config().to_dict(),
                                            num_steps=7))

  def test_stored_config_with_the_overrides_given(self):
    config = configs.for_run(_parsed_flag("--config.num_steps=20"),
                             self.stored, "w/run.json")
    self.assertEqual(config.to_dict(), dict(
        self.stored, num_steps=20, level_num_embeddings=(8, 16)))
    # An override of a fingerprint key is kept, for the resume to refuse.
    config = configs.for_run(_parsed_flag("--config.num_embeddings=8"),
                             self.stored, "w/run.json")
    self.assertEqual(config.num_embeddings, 8)
    self.assertEqual(config.num_steps, 4)

  def test_a_config_file_given_is_used_as_it_is(self):
    config = configs.for_run(_parsed_flag("--config=vqvae2"), self.stored,
                             "w/run.json")
    self.assertEqual(config.num_embeddings, 512)
    self.assertEqual(config.num_levels, 2)

  def test_stored_keys_and_values_it_cannot_take_name_the_file(self):
    with self.assertRaisesRegex(
        ValueError, "^w/run.json: config key 'num_stepz' is unknown"):
      configs.for_run(_parsed_flag(), dict(self.stored, num_stepz=3),
                      "w/run.json")
    with self.assertRaisesRegex(
        ValueError, "^w/run.json: config.num_steps is 'abc'"):
      configs.for_run(_parsed_flag(), dict(self.stored, num_steps="abc"),
                      "w/run.json")


if __name__ == "__main__":
  absltest.main()
