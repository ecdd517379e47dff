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
