"""The shrunken configs every test trains with (tfds mock data, a few steps).

One definition, shared by the in-process tests (`vqvae_config`,
`prior_config`), the CLI tests (`cli_flags`) and the subprocess scripts that
import this module (tests/ is on their PYTHONPATH).
"""

from typing import List

from ml_collections import config_dict

from sonnet_vqvae.configs import default
from sonnet_vqvae.configs import prior

# Codebook size of the tiny VQ-VAE, which the tiny prior models.
NUM_EMBEDDINGS = 16


def vqvae_config(**overrides) -> config_dict.ConfigDict:
  """The reference config shrunk to seconds of training on mock data.

  Without XLA: "auto" compiles and times both loops on runs of 500+ steps
  (loop.select_loop); a test about XLA passes jit_compile itself.
  """
  config = default.get_config()
  config.update(num_hiddens=16, num_residual_hiddens=8, embedding_dim=8,
                num_embeddings=NUM_EMBEDDINGS, batch_size=4, num_steps=4,
                log_every=2, checkpoint_every=2, eval_batch_size=8,
                strategy="default", jit_compile=False)
  config.update(overrides)
  return config


def prior_config(**overrides) -> config_dict.ConfigDict:
  """The prior's config shrunk to seconds of training.

  Codes are encoded in batches of the 16 mock images, not padded to 256.
  """
  config = prior.get_config()
  config.update(hidden_channels=8, num_layers=2, batch_size=8,
                learning_rate=1e-2, num_steps=40, log_every=10,
                checkpoint_every=20, eval_batch_size=16, encode_batch_size=16,
                strategy="default", jit_compile=False)
  config.update(overrides)
  return config


def cli_flags(config: config_dict.ConfigDict) -> List[str]:
  """`--config.key=value` flags that turn a CLI's default config into `config`.

  Only the keys that differ from the defaults of the same kind of config.
  """
  reference = (prior.get_config() if "hidden_channels" in config
               else default.get_config())
  flat, flat_reference = _flatten(config), _flatten(reference)
  return [f"--config.{key}={value}" for key, value in sorted(flat.items())
          if flat_reference.get(key) != value and value is not None]


def _flatten(config, prefix=""):
  flat = {}
  for key, value in config.items():
    if isinstance(value, config_dict.ConfigDict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


# The start of a subprocess script that must run without our code: importing
# `sonnet` or `sonnet_vqvae` there fails (a SavedModel must load without them).
BLOCK_OUR_CODE = """import sys


class _Blocked:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("sonnet", "sonnet_vqvae"):
      raise ImportError(name + " is blocked in this test")


sys.meta_path.insert(0, _Blocked())
"""
