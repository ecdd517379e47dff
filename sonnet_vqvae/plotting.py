"""The reference notebook's figures, written as PNG files."""

from typing import Mapping, Sequence

import matplotlib
matplotlib.use("Agg")  # Files only; training machines often have no display.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np


def plot_curves(history: Sequence[Mapping[str, float]], path: str) -> None:
  """Training NMSE (log scale) and perplexity against the step.

  Args:
    history: logged rows with keys step, recon_error and perplexity.
    path: PNG file to write.
  """
  steps = [row["step"] for row in history]
  fig, (ax_nmse, ax_ppl) = plt.subplots(1, 2, figsize=(12, 4))
  ax_nmse.plot(steps, [row["recon_error"] for row in history])
  ax_nmse.set_yscale("log")
  ax_nmse.set_title("NMSE")
  ax_ppl.plot(steps, [row["perplexity"] for row in history])
  ax_ppl.set_title("Average codebook usage (perplexity)")
  for ax in (ax_nmse, ax_ppl):
    ax.set_xlabel("step")
  fig.savefig(path)
  plt.close(fig)


def _grid(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
  """[rows * cols, H, W, C] images in [-0.5, 0.5] -> one [rows*H, cols*W, C]."""
  images = np.clip(images[:rows * cols] + 0.5, 0, 1)
  n, h, w, c = images.shape
  images = np.concatenate(
      [images, np.zeros([rows * cols - n, h, w, c], images.dtype)])
  return images.reshape(rows, cols, h, w, c).swapaxes(1, 2).reshape(
      rows * h, cols * w, c)


def plot_reconstructions(originals: np.ndarray, reconstructions: np.ndarray,
                         path: str, rows: int = 4, cols: int = 8) -> None:
  """Side-by-side grids of originals and their reconstructions.

  Args:
    originals: [N, H, W, 3] images in [-0.5, 0.5].
    reconstructions: [N, H, W, 3] model outputs for `originals`.
    path: PNG file to write.
    rows: grid rows.
    cols: grid columns.
  """
  fig, axes = plt.subplots(1, 2, figsize=(16, 8))
  for ax, images, title in ((axes[0], originals, "validation originals"),
                            (axes[1], reconstructions,
                             "validation reconstructions")):
    ax.imshow(_grid(np.asarray(images), rows, cols), interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
  fig.savefig(path)
  plt.close(fig)


def project_codebook(embeddings: np.ndarray) -> np.ndarray:
  """PCA of the codes: [D, K] embeddings -> [K, 2] coordinates (top 2 axes)."""
  codes = np.asarray(embeddings, np.float64).T
  centred = codes - codes.mean(axis=0)
  _, _, vt = np.linalg.svd(centred, full_matrices=False)
  return centred @ vt[:2].T


def plot_codebook(embeddings: np.ndarray, usage: np.ndarray,
                  path: str) -> None:
  """2-D PCA projection of the codebook, coloured and sized by usage.

  Args:
    embeddings: [D, K] codebook.
    usage: [K] how often each code was used (any non-negative scale).
    path: PNG file to write.
  """
  xy = project_codebook(embeddings)
  usage = np.asarray(usage, np.float64)
  share = usage / max(usage.sum(), 1e-12)
  fig, ax = plt.subplots(figsize=(7, 6))
  points = ax.scatter(xy[:, 0], xy[:, 1], c=share, s=5 + 2000 * share,
                      cmap="viridis")
  fig.colorbar(points, ax=ax, label="share of test vectors")
  ax.set_title(f"Codebook (PCA), {int((usage > 0).sum())}/{len(usage)} "
               "codes used")
  fig.savefig(path)
  plt.close(fig)
