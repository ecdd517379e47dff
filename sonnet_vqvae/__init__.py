"""VQ-VAE for TensorFlow 2 and Sonnet 2.

The quantizers are drop-in replacements for `snt.nets.VectorQuantizer` and
`snt.nets.VectorQuantizerEMA`; the rest of the package trains the reference
CIFAR-10 model with them.
"""

__version__ = "0.1.0"

import sys as _sys

if _sys.argv[:1] == ["-m"]:  # `python -m sonnet_vqvae.<program>` starting.
  from sonnet_vqvae import cli as _cli
  _cli.import_tensorflow_once()
elif "ipykernel" in _sys.modules:  # A notebook: it shows fd 2 in red.
  from sonnet_vqvae import cli as _cli
  _cli.import_tensorflow_quietly()

from sonnet_vqvae.quantizers import VectorQuantizer
from sonnet_vqvae.quantizers import VectorQuantizerEMA
from sonnet_vqvae.networks import Decoder
from sonnet_vqvae.networks import Encoder
from sonnet_vqvae.networks import ResidualStack
from sonnet_vqvae.networks import VQVAEModel
from sonnet_vqvae.networks import build_model
from sonnet_vqvae.pixelcnn import GatedPixelCNN
from sonnet_vqvae.fsq import FiniteScalarQuantizer
from sonnet_vqvae.lfq import LookupFreeQuantizer
from sonnet_vqvae.residual_vq import ResidualVectorQuantizer
