"""Installs sonnet_vqvae: VQ-VAE quantizers, networks and training for TF2 / Sonnet 2."""

import os

import setuptools


def _read_version() -> str:
  # Read, not import: importing the package at install time would need TF.
  path = os.path.join(os.path.dirname(__file__), "sonnet_vqvae", "__init__.py")
  with open(path) as f:
    for line in f:
      if line.startswith("__version__"):
        return line.split("=")[1].strip().strip('"')
  raise RuntimeError("__version__ not found in sonnet_vqvae/__init__.py")


setuptools.setup(
    name="sonnet_vqvae",
    version=_read_version(),
    description="VQ-VAE (van den Oord et al., 2017) for TensorFlow 2 and Sonnet 2.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["sonnet_vqvae", "sonnet_vqvae.*"]),
    python_requires=">=3.10",
    install_requires=[
        "absl-py",
        "dm-sonnet>=2.0.2",
        # tensorflow-datasets 4.9.10 imports it without declaring it.
        "importlib_resources",
        "matplotlib",
        "ml-collections",
        "numpy",
        "tensorflow>=2.16",
        "tensorflow-datasets>=4.9",
        "tqdm",
    ],
    extras_require={
        # Colab TPU runtimes and Cloud TPU VMs ship no TensorFlow, and the
        # plain wheel has no TPU kernels. tensorflow-tpu is TensorFlow's TPU
        # build; it writes the same tensorflow/ files as the plain wheel
        # (pulled in above), so both are pinned to one version and the TPU
        # build is reinstalled after (distribute.TPU_INSTALL). libtpu 0.0.14
        # is the lowest its `libtpu~=0.0.14` allows and exports all 86 TPU
        # functions TF 2.20 looks up; the newest (0.0.52) exports 20 of them.
        "tpu": [
            "libtpu==0.0.14",
            "tensorflow==2.20.0",
            "tensorflow-tpu==2.20.0",
        ],
        # NVIDIA GPUs outside Colab (whose GPU runtime ships TensorFlow with
        # CUDA): TensorFlow with its CUDA libraries from pip.
        "gpu": ["tensorflow[and-cuda]>=2.16"],
        "test": [
            "ipykernel",
            "nbclient",
            "nbformat",
            "pytest",
            "pytest-xdist",
        ],
    },
    license="Apache 2.0",
)
