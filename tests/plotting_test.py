"""Tests for sonnet_vqvae.plotting."""

import os
import tempfile

from absl.testing import absltest
import numpy as np

from sonnet_vqvae import plotting


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

  def test_level_labels(self):
    self.assertEqual([plotting.level_label(k, 3) for k in (1, 2, 3)],
                     ["top only", "top 2 levels", "all 3 levels"])
    self.assertEqual(plotting.level_label(1, 2), "top only")
    self.assertEqual(plotting.level_label(2, 2), "all 2 levels")


if __name__ == "__main__":
  absltest.main()
