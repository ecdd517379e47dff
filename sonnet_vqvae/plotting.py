"""The reference notebook's figures, written as PNG files."""

import math
from typing import Mapping, Sequence

# Figure objects draw without pyplot, so no display and no global backend
# change (a notebook importing us keeps its inline plots).
from matplotlib import figure
import numpy as np


def plot_curves(history: Sequence[Mapping[str, float]],
                path: str) -> figure.Figure:
  """Training NMSE (log scale), perplexity and codes used against the step.

  Args:
    history: logged rows with keys step, recon_error, perplexity and
      codes_used (and codes_used_ema, when logged).
    path: PNG file to write.

  Returns:
    The figure written.
  """
  steps = [row["step"] for row in history]
  # A short run logs a row or two: markers keep single points visible.
  marker = "o" if len(steps) <= _MARKED_ROWS else None
  fig = figure.Figure(figsize=(16, 4))
  axes = fig.subplots(1, 3)
  for ax, key, title in ((axes[0], "recon_error", "NMSE"),
                         (axes[1], "perplexity",
                          "Average codebook usage (perplexity)"),
                         (axes[2], "codes_used", "Codes used")):
    ax.plot(steps, _values(history, key), label="per batch", marker=marker)
    ax.set_title(title)
    ax.set_xlabel("step")
  if all("codes_used_ema" in row for row in history):
    axes[2].plot(steps, _values(history, "codes_used_ema"),
                 label="in the last ~70 steps (usage EMA)", marker=marker)
    axes[2].legend()
  axes[0].set_yscale("log")
  fig.savefig(path)
  return fig


# Curves with at most this many points mark each of them.
_MARKED_ROWS = 20


def _values(history: Sequence[Mapping[str, float]], key: str) -> np.ndarray:
  # Non-finite metrics are logged as null; they plot as gaps.
  return np.array([np.nan if row.get(key) is None else row[key]
                   for row in history], np.float64)


def _grid(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
  """[rows * cols, H, W, C] images in [-0.5, 0.5] -> one [rows*H, cols*W, C]."""
  images = np.clip(images[:rows * cols] + 0.5, 0, 1)
  n, h, w, c = images.shape
  images = np.concatenate(
      [images, np.zeros([rows * cols - n, h, w, c], images.dtype)])
  return images.reshape(rows, cols, h, w, c).swapaxes(1, 2).reshape(
      rows * h, cols * w, c)


def plot_reconstructions(originals: np.ndarray, reconstructions: np.ndarray,
                         path: str, rows: int = 4, cols: int = 8,
                         split: str = "test") -> figure.Figure:
  """Side-by-side grids of originals and their reconstructions.

  Args:
    originals: [N, H, W, 3] images in [-0.5, 0.5].
    reconstructions: [N, H, W, 3] model outputs for `originals`.
    path: PNG file to write.
    rows: grid rows.
    cols: grid columns.
    split: the dataset split of `originals`, named in the titles.

  Returns:
    The figure written.
  """
  fig = figure.Figure(figsize=(16, 16 * rows / cols / 2 + 0.5))
  axes = fig.subplots(1, 2)
  for ax, images, title in ((axes[0], originals, f"{split} originals"),
                            (axes[1], reconstructions,
                             f"{split} reconstructions")):
    ax.imshow(_grid(np.asarray(images), rows, cols), interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path)
  return fig


def level_label(levels: int, num_levels: int) -> str:
  """A row's name for a decode from the top `levels` of `num_levels` levels."""
  if levels == num_levels:
    return "all levels" if num_levels == 1 else f"all {num_levels} levels"
  return "top only" if levels == 1 else f"top {levels} levels"


def plot_level_reconstructions(originals: np.ndarray,
                               top_decodes: Sequence[np.ndarray], path: str,
                               cols: int = 8,
                               split: str = "test") -> figure.Figure:
  """Rows of originals and their decodes from the top 1, 2, ..., L levels.

  Shows what each level of a VQ-VAE-2 adds: row k + 1 is decoded from the
  top k levels alone (`HierarchicalVQVAE.decode_top`).

  Args:
    originals: [N, H, W, 3] images in [-0.5, 0.5]; the first `cols` are shown.
    top_decodes: L arrays [N, H, W, 3]; the k-th (from 1) decoded from the
      top k levels of `originals`' codes, the last from all of them.
    path: PNG file to write.
    cols: images per row.
    split: the dataset split of `originals`, named in the title.

  Returns:
    The figure written.
  """
  rows = [("original", originals)] + [
      (level_label(k, len(top_decodes)), images)
      for k, images in enumerate(top_decodes, start=1)]
  # One inch per image, as in `plot_reconstructions`, and room for the labels.
  fig = figure.Figure(figsize=(cols + 1.5, len(rows) + 0.5))
  axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
  for ax, (label, images) in zip(axes, rows):
    ax.imshow(_grid(np.asarray(images), 1, cols), interpolation="nearest")
    ax.axis("off")
    # A text artist, not a ylabel: axis("off") hides the labels.
    ax.text(-0.01, 0.5, label, transform=ax.transAxes, ha="right",
            va="center")
  axes[0].set_title(f"{split} images, decoded from the top levels alone")
  fig.tight_layout()
  fig.savefig(path)
  return fig


def plot_image_grid(images: np.ndarray, path: str, title: str) -> None:
  """A square-ish grid of images, e.g. samples of the prior.

  Args:
    images: [N, H, W, 3] images in [-0.5, 0.5].
    path: PNG file to write.
    title: figure title.
  """
  cols = math.ceil(math.sqrt(len(images)))
  rows = math.ceil(len(images) / cols)
  fig = figure.Figure(figsize=(cols, rows + 0.5))
  ax = fig.subplots()
  ax.imshow(_grid(np.asarray(images), rows, cols), interpolation="nearest")
  ax.set_title(title)
  ax.axis("off")
  fig.savefig(path, dpi=100)


def project_codebook(embeddings: np.ndarray) -> np.ndarray:
  """PCA of the codes: [D, K] embeddings -> [K, 2] coordinates (top 2 axes).

  With fewer than 2 axes of variation (D = 1, K = 1) the missing coordinates
  are 0.
  """
  codes = np.asarray(embeddings, np.float64).T
  centred = codes - codes.mean(axis=0)
  _, _, vt = np.linalg.svd(centred, full_matrices=False)
  xy = centred @ vt[:2].T
  return np.pad(xy, [(0, 0), (0, 2 - xy.shape[1])])


def plot_codebook(embeddings: np.ndarray, usage: np.ndarray,
                  path: str) -> None:
  """2-D PCA projection of the codebook, coloured and sized by usage.

  Codes with non-finite entries are left out of the projection and counted
  in the title.

  Args:
    embeddings: [D, K] codebook.
    usage: [K] how often each code was used (any non-negative scale).
    path: PNG file to write.
  """
  embeddings = np.asarray(embeddings, np.float64)
  finite = np.isfinite(embeddings).all(axis=0)
  usage = np.asarray(usage, np.float64)
  share = usage / max(usage.sum(), 1e-12)
  fig = figure.Figure(figsize=(7, 6))
  ax = fig.subplots()
  if finite.any():
    xy = project_codebook(embeddings[:, finite])
    points = ax.scatter(xy[:, 0], xy[:, 1], c=share[finite],
                        s=5 + 2000 * share[finite], cmap="viridis")
    fig.colorbar(points, ax=ax, label="share of test vectors")
  title = (f"Codebook (PCA), {int((usage > 0).sum())}/{len(usage)} "
           "codes used")
  if not finite.all():
    title += f", {int((~finite).sum())} non-finite codes not shown"
  ax.set_title(title)
  fig.savefig(path)
