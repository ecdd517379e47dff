r"""Test NLL of the VQ-VAE-2 prior per level, against its baselines.

Encodes the real CIFAR-10 subset with a trained VQ-VAE-2 (--vqvae_workdir,
e.g. the workdir of notebooks/vqvae2_example.ipynb or of `python -m
sonnet_vqvae.train --config=sonnet_vqvae/configs/vqvae2.py`), then trains, on the
same codes and for the same steps:

  hierarchical: `prior.train_on_codes`'s `HierarchicalPrior` (one PixelCNN per
    level, every finer level conditioned on the coarser codes);
  bottom_alone: the plain `GatedPixelCNN` on the bottom codes only, which
    shows what conditioning on the top buys the bottom level.

Prints the machine, one JSON line per run, then a table of each level's test
NLL in nats per code next to the uniform prior (log K) and the codes'
train frequencies, and the total in bits per image dimension.

    python bench/vqvae2_prior.py --vqvae_workdir DIR \
        --data_dir=../shared/data/tensorflow_datasets [--steps=3000]
"""

import json
import os
import tempfile
import time

from absl import app
from absl import flags

from sonnet_vqvae import prior
from sonnet_vqvae import train
from sonnet_vqvae.configs import prior as prior_config

import machine  # pylint: disable=g-bad-import-order  (bench/ siblings)

_VQVAE_WORKDIR = flags.DEFINE_string(
    "vqvae_workdir", None, "A trained VQ-VAE-2 workdir.", required=True)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "../shared/data/tensorflow_datasets", "Prepared tfds data.")
_STEPS = flags.DEFINE_integer("steps", 3000, "Prior training steps.")


def _train(config, train_data, test_data, num_embeddings):
  start = time.time()
  with tempfile.TemporaryDirectory() as workdir:
    metrics = prior.train_on_codes(config, train_data, test_data,
                                   num_embeddings, workdir)
  return dict(metrics, seconds=round(time.time() - start, 1))


def main(argv):
  del argv
  machine.print_machine()
  vqvae_config, vqvae = train.restore_model(_VQVAE_WORKDIR.value)
  if train.num_levels(vqvae_config) < 2:
    raise app.UsageError(f"{_VQVAE_WORKDIR.value} holds a plain VQ-VAE; "
                         "give a VQ-VAE-2 workdir (num_levels >= 2).")
  data = {split: prior.encode_split(
      vqvae, split, batch_size=256, dataset=vqvae_config.dataset,
      data_dir=os.path.abspath(_DATA_DIR.value), download=False)
          for split in ("train", "test")}
  sizes = [q.num_embeddings for q in vqvae.quantizers]
  config = prior_config.get_config()
  config.num_steps = _STEPS.value
  config.checkpoint_every = _STEPS.value

  def bottom(split):
    return {"codes": data[split]["codes"][-1],
            "labels": data[split]["labels"]}

  results = {}
  for name, run in (
      ("hierarchical",
       lambda: _train(config, data["train"], data["test"], sizes)),
      ("bottom_alone",
       lambda: _train(config, bottom("train"), bottom("test"), sizes[-1]))):
    results[name] = run()
    print(json.dumps(dict(model=name, steps=_STEPS.value, **results[name])),
          flush=True)

  ours = results["hierarchical"]
  print(f"\n{'test nats/code':16s} {'prior':>7s} {'uniform':>8s} "
        f"{'frequencies':>12s}")
  for level in range(len(sizes)):
    print(f"level {level:<10d} "
          f"{ours[f'level{level}_nll_nats_per_code']:7.3f} "
          f"{ours[f'level{level}_uniform_nats_per_code']:8.3f} "
          f"{ours[f'level{level}_unigram_nats_per_code']:12.3f}")
  alone = results["bottom_alone"]
  print(f"{'bottom alone':16s} {alone['nll_nats_per_code']:7.3f} "
        f"{alone['uniform_nats_per_code']:8.3f} "
        f"{alone['unigram_nats_per_code']:12.3f}")
  print(f"{'bits/dim, all':16s} {ours['bits_per_dim']:7.4f} "
        f"{ours['uniform_bits_per_dim']:8.4f} "
        f"{ours['unigram_bits_per_dim']:12.4f}")
  print(json.dumps({
      "ratio": "bottom level NLL, conditioned on the top / alone",
      "value": round(ours[f"level{len(sizes) - 1}_nll_nats_per_code"] /
                     alone["nll_nats_per_code"], 4)}))


if __name__ == "__main__":
  app.run(main)
