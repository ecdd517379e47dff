"""Tests for sonnet_vqvae.plotting."""

import os
import tempfile

from absl.testing import absltest
import numpy as np

from sonnet_vqvae import loop
from sonnet_vqvae import plotting
from sonnet_vqvae import rundir


class _Checkpoints:
  """What `loop.run` asks of `rundir.Checkpoints`, without TF."""
  directory = "checkpoints"

  def __init__(self):
    self.saved = []

  def save(self, step):
    self.saved.append(step)


def _one_step_at_a_time(num_steps):
  # A train loop (see `loop.make_loop`) whose loss is 1 / step.
  _one_step_at_a_time.step += 1
  loss = 1. / _one_step_at_a_time.step
  return {"steps": np.int32(1), "finite": np.bool_(True),
          "sums": {"recon_error": loss, "perplexity": 2., "codes_used": 3.},
          "last": {"recon_error": loss}}


class PlottingTest(absltest.TestCase):

  def test_grid_layout(self):
    images = np.arange(3, dtype=np.float32)[:, None, None, None] * np.ones(
        [3, 2, 2, 1], np.float32) / 4 - 0.5
    grid = plotting._grid(images, rows=2, cols=2)
    self.assertEqual(grid.shape, (4, 4, 1))
    np.testing.assert_allclose(grid[:2, :2, 0], 0.0)   # image 0, top left
    np.testing.assert_allclose(grid[:2, 2:, 0], 0.25)  # image 1, top right
    np.testing.assert_allclose(grid[2:, :2, 0], 0.5)   # image 2, bottom left
    np.testing.assert_allclose(grid[2:, 2:, 0], 0.0)   # padding

  def test_projection_keeps_the_main_axes(self):
    rng = np.random.RandomState(0)
    codes = rng.normal(size=[50, 3]) * [10.0, 3.0, 0.01]  # [K, D]
    xy = plotting.project_codebook(codes.T)
    self.assertEqual(xy.shape, (50, 2))
    centred = codes - codes.mean(0)
    # The projection preserves the variance along the two largest axes.
    np.testing.assert_allclose(
        np.sort(np.var(xy, 0)),
        np.sort(np.linalg.eigvalsh(np.cov(centred.T, bias=True))[1:]),
        rtol=1e-6)

  def test_projection_of_degenerate_codebooks(self):
    # D = 1 and K = 1 leave fewer than two axes of variation.
    np.testing.assert_allclose(
        plotting.project_codebook(np.array([[1.0, 2.0, 4.0]])),
        [[-4 / 3, 0], [-1 / 3, 0], [5 / 3, 0]], atol=1e-12)
    np.testing.assert_allclose(
        plotting.project_codebook(np.ones([3, 1])), [[0, 0]])

  def test_codebook_figure_of_degenerate_and_non_finite_codes(self):
    with tempfile.TemporaryDirectory() as workdir:
      for i, (codes, usage) in enumerate([
          (np.ones([1, 5]), np.arange(5)),
          (np.ones([4, 1]), np.ones(1)),
          (np.array([[1.0, np.nan, 2.0], [0.0, 1.0, np.inf]]), np.ones(3)),
          (np.full([2, 2], np.nan), np.zeros(2))]):
        path = os.path.join(workdir, f"{i}.png")
        plotting.plot_codebook(codes, usage, path)
        with open(path, "rb") as f:
          self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

  def test_curves_with_null_metrics(self):
    with tempfile.TemporaryDirectory() as workdir:
      path = os.path.join(workdir, "curves.png")
      plotting.plot_curves(
          [{"step": 1, "recon_error": 1.0, "perplexity": None,
            "codes_used": 2},
           {"step": 2, "recon_error": 0.5, "perplexity": 3.0,
            "codes_used": 3}], path)
      self.assertTrue(os.path.getsize(path) > 0)

  def test_writes_pngs(self):
    with tempfile.TemporaryDirectory() as workdir:
      paths = [os.path.join(workdir, f"{n}.png") for n in "abcde"]
      plotting.plot_curves(
          [{"step": 1, "recon_error": 1.0, "perplexity": 2.0, "codes_used": 2},
           {"step": 2, "recon_error": 0.5, "perplexity": 3.0, "codes_used": 3}],
          paths[0])
      images = np.zeros([32, 32, 32, 3])
      plotting.plot_reconstructions(images, images, paths[1])
      plotting.plot_codebook(np.eye(4), np.array([3, 0, 1, 0]), paths[2])
      plotting.plot_image_grid(np.zeros([5, 4, 4, 3]), paths[3], "samples")
      # Fewer images than columns: the rows are padded.
      plotting.plot_level_reconstructions(images[:5], [images[:5]] * 3,
                                          paths[4])
      for path in paths:
        with open(path, "rb") as f:
          self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

  def test_run_shorter_than_log_every_has_curves_from_the_first_step(self):
    with tempfile.TemporaryDirectory() as workdir, \
        rundir.RunDir(workdir) as run_dir:
      _one_step_at_a_time.step = 0
      loop.run(_one_step_at_a_time, run_dir=run_dir,
               checkpoints=_Checkpoints(), start_step=0, num_steps=3,
               log_every=10, checkpoint_every=10, metadata={},
               fingerprint={}, describe=lambda row: "")
      rows = run_dir.read_rows(loop.METRICS_FILE)
      self.assertEqual([r["step"] for r in rows], [1, 3])
      # The first row is the first step's; the last the mean of steps 2, 3.
      self.assertAlmostEqual(rows[0]["recon_error"], 1.)
      self.assertAlmostEqual(rows[1]["recon_error"], (1 / 2 + 1 / 3) / 2)
      fig = plotting.plot_curves(rows, os.path.join(workdir, "curves.png"))
    for ax in fig.axes:
      (line,) = ax.get_lines()
      np.testing.assert_array_equal(line.get_xdata(), [1, 3])
      self.assertTrue(np.isfinite(line.get_ydata()).all(), ax.get_title())

  def test_a_single_row_is_a_visible_point(self):
    with tempfile.TemporaryDirectory() as workdir:
      fig = plotting.plot_curves(
          [{"step": 4, "recon_error": 1.0, "perplexity": 2.0,
            "codes_used": 2, "codes_used_ema": 2}],
          os.path.join(workdir, "curves.png"))
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    self.assertLen(lines, 4)
    for line in lines:  # A line of one point draws nothing: a marker does.
      self.assertNotIn(line.get_marker(), ("None", None, "", " "))
      self.assertEqual(len(line.get_xdata()), 1)

  def test_reconstruction_titles_name_the_split(self):
    images = np.zeros([8, 4, 4, 3])
    with tempfile.TemporaryDirectory() as workdir:
      path = os.path.join(workdir, "r.png")
      for split in ("test", "validation"):
        fig = plotting.plot_reconstructions(images, images, path,
                                            split=split)
        self.assertEqual([ax.get_title() for ax in fig.axes],
                         [f"{split} originals", f"{split} reconstructions"])
        fig = plotting.plot_level_reconstructions(images, [images] * 2, path,
                                                  split=split)
        self.assertTrue(fig.axes[0].get_title().startswith(f"{split} images"))
      self.assertEqual(
          plotting.plot_reconstructions(images, images, path).axes[0]
          .get_title(), "test originals")

  def test_level_labels(self):
    self.assertEqual([plotting.level_label(k, 3) for k in (1, 2, 3)],
                     ["top only", "top 2 levels", "all 3 levels"])
    self.assertEqual(plotting.level_label(1, 2), "top only")
    self.assertEqual(plotting.level_label(2, 2), "all 2 levels")


if __name__ == "__main__":
  absltest.main()
