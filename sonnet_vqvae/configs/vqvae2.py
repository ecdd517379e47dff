"""VQ-VAE-2 on CIFAR-10: two levels, a 4x4 top grid over the 8x8 bottom one.

    python -m sonnet_vqvae.train --workdir DIR \
        --config=sonnet_vqvae/configs/vqvae2.py [--config.key=value ...]

The reference config (`default.py`) with `num_levels = 2`; every other
hyperparameter is the plain VQ-VAE's, so the two compare at equal settings.
Razavi et al. (2019) use a 32x32 bottom and 64x64 top grid on 256x256
ImageNet; on 32x32 CIFAR-10 the grids are 8x8 and 4x4.
"""

import ml_collections

from sonnet_vqvae.configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns the two-level config (override with --config.key=value)."""
  config = default.get_config()
  config.num_levels = 2
  return config
