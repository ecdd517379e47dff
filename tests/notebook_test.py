"""Runs notebooks/vqvae_example.ipynb top to bottom with a tiny step count."""

import os
import pathlib

import nbclient
import nbformat
import pytest

_NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "vqvae_example.ipynb"
# Starts tfds' mock data inside the kernel when the real subset is absent.
_MOCK_DATA = """
import tensorflow_datasets as tfds
_mock_data = tfds.testing.mock_data(num_examples=64)
_mock_data.__enter__()
"""


def _parameters_index(notebook) -> int:
  for index, cell in enumerate(notebook.cells):
    if "parameters" in cell.metadata.get("tags", []):
      return index
  raise AssertionError("The notebook has no cell tagged 'parameters'.")


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  # The kernel imports this checkout, whether or not it is installed.
  monkeypatch.setenv("PYTHONPATH", str(_NOTEBOOK.parent.parent))
  notebook = nbformat.read(_NOTEBOOK, as_version=4)
  # The committed run's own parameters give way to the test's.
  notebook.cells = [cell for cell in notebook.cells if "injected-parameters"
                    not in cell.metadata.get("tags", [])]
  data_dir = os.environ.get("SONNET_VQVAE_TEST_DATA_DIR")
  if not (data_dir and os.path.isdir(os.path.join(data_dir, "cifar10"))):
    data_dir = None
    notebook.cells.insert(0, nbformat.v4.new_code_cell(_MOCK_DATA))
  overrides = nbformat.v4.new_code_cell(
      f"NUM_STEPS = 3\nBATCH_SIZE = 8\nLOG_EVERY = 1\nDATA_DIR = {data_dir!r}\n"
      f"WORKDIR = {str(tmp_path / 'run')!r}\nPRIOR_NUM_STEPS = 2\n")
  # As papermill does: overrides go right after the parameters cell.
  notebook.cells.insert(_parameters_index(notebook) + 1, overrides)

  # A cell error raises CellExecutionError and fails the test.
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}
                          ).execute()

  outputs = [output for cell in notebook.cells if cell.cell_type == "code"
             for output in cell.get("outputs", [])]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  # Training images, curves, reconstructions, codebook, encode/decode, samples.
  assert len(images) >= 6
  assert (tmp_path / "run" / "eval.json").exists()
  assert (tmp_path / "run" / "prior" / "prior_samples.png").exists()
  # The export cell wrote a SavedModel and a fresh process loaded it.
  assert (tmp_path / "run" / "export" / "saved_model.pb").exists()
