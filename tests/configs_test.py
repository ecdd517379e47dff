"""Tests for sonnet_vqvae.configs: unknown keys are named with the nearest."""

from absl.testing import absltest

from sonnet_vqvae import configs
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
    self.assertIn("did you mean quantizer.cosine?", messages[1])
    self.assertIn("seed has no sub-keys", messages[2])

  def test_exit_names_the_key(self):
    with self.assertRaisesRegex(SystemExit, "did you mean num_steps"):
      configs.exit_on_unknown_override(["prog", "--config.num_step=3"],
                                       "config", default.get_config())
    configs.exit_on_unknown_override(["prog", "--config.num_steps=3"],
                                     "config", default.get_config())

if __name__ == "__main__":
  absltest.main()
