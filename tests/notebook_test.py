"""Runs the notebooks top to bottom with a tiny step count, tiny models and
tfds mock data."""

import json
import os
import pathlib

import nbclient
import nbformat
import pytest

import tiny

_NOTEBOOKS = pathlib.Path(__file__).parent.parent / "notebooks"
# Starts tfds' mock data inside the kernel, and records the data_dir each
# dataset is opened with. Mock data, not the real subset even where
# $SONNET_VQVAE_TEST_DATA_DIR has it: there every cell would count, scale and
# encode its 6,102 images, which checks nothing more (train_test trains on
# it); what the notebook does with DATA_DIR is checked on the record.
_MOCK_DATA = """
import tensorflow_datasets as tfds
_mock_data = tfds.testing.mock_data(num_examples=64)
_mock_data.__enter__()
_data_dirs = []
_builder = tfds.builder


def _recording_builder(*args, data_dir=None, **kwargs):
  _data_dirs.append(data_dir)
  return _builder(*args, data_dir=data_dir, **kwargs)


tfds.builder = _recording_builder
"""


# Runs right after the notebook's imports: the model sizes of tests/tiny.py
# replace the reference ones (as the README test's flags do), so each cell runs
# as written, in seconds.
_TINY_MODELS = """
import tiny
from sonnet_vqvae.configs import default as _default, prior as _prior


def _tiny_sizes(get_config, tiny_config, keys):
  def get_tiny_config():
    config = get_config()
    config.update({key: tiny_config[key] for key in keys})
    return config
  return get_tiny_config


_default.get_config = _tiny_sizes(
    _default.get_config, tiny.vqvae_config(),
    ("num_hiddens", "num_residual_hiddens", "embedding_dim", "num_embeddings"))
_prior.get_config = _tiny_sizes(_prior.get_config, tiny.prior_config(),
                                ("hidden_channels", "num_layers"))
"""


def _parameters_index(notebook) -> int:
  for index, cell in enumerate(notebook.cells):
    if "parameters" in cell.metadata.get("tags", []):
      return index
  raise AssertionError("The notebook has no cell tagged 'parameters'.")


def _imports_index(notebook) -> int:
  for index, cell in enumerate(notebook.cells):
    if "from sonnet_vqvae.configs import" in cell.source:
      return index
  raise AssertionError("No cell imports the notebook's configs.")


# Each notebook, the images it must show and the files its run must write.
_EXPECTED = {
    # Training images, curves, reconstructions, codebook, encode/decode,
    # samples; the export cell wrote a SavedModel and a fresh process loaded
    # it.
    "vqvae_example.ipynb": (6, ("eval.json", "prior/prior_samples.png",
                                "export/saved_model.pb")),
    # Curves, reconstructions, the level reconstructions, samples.
    "vqvae2_example.ipynb": (4, ("eval.json", "level_reconstructions.png",
                                 "prior/prior_samples.png",
                                 "prior/eval.json")),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_EXPECTED))
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
  # The kernel imports this checkout, whether or not it is installed, and
  # tests/tiny.py.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(_NOTEBOOKS.parent), str(_NOTEBOOKS.parent / "tests")]))
  notebook = nbformat.read(_NOTEBOOKS / name, as_version=4)
  # The committed run's own parameters give way to the test's.
  notebook.cells = [cell for cell in notebook.cells if "injected-parameters"
                    not in cell.metadata.get("tags", [])]
  own_cells = list(notebook.cells)
  notebook.cells.insert(0, nbformat.v4.new_code_cell(_MOCK_DATA))
  # A directory only the mock data "reads": every dataset the notebook opens
  # must be opened there.
  data_dir = str(tmp_path / "tensorflow_datasets")
  data_dirs = tmp_path / "data_dirs.json"
  notebook.cells.append(nbformat.v4.new_code_cell(
      f"import json\nwith open({str(data_dirs)!r}, 'w') as f:\n"
      "  json.dump(_data_dirs, f)\n"))
  overrides = nbformat.v4.new_code_cell(
      f"NUM_STEPS = 3\nBATCH_SIZE = 8\nLOG_EVERY = 1\nDATA_DIR = {data_dir!r}\n"
      f"WORKDIR = {str(tmp_path / 'run')!r}\nPRIOR_NUM_STEPS = 2\n")
  # As papermill does: overrides go right after the parameters cell.
  notebook.cells.insert(_parameters_index(notebook) + 1, overrides)
  notebook.cells.insert(_imports_index(notebook) + 1,
                        nbformat.v4.new_code_cell(_TINY_MODELS))

  # A cell error raises CellExecutionError and fails the test.
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}
                          ).execute()

  outputs = [output for cell in notebook.cells if cell.cell_type == "code"
             for output in cell.get("outputs", [])]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  num_images, files = _EXPECTED[name]
  assert len(images) >= num_images
  for path in files:
    assert (tmp_path / "run" / path).exists(), path
  # The run had the tiny sizes (the cell that sets them did its job).
  with open(tmp_path / "run" / "run.json") as f:
    assert json.load(f)["config"]["num_embeddings"] == tiny.NUM_EMBEDDINGS
  # Logs are plain text: the package's lines on stdout, TF's start-up lines
  # not shown (Jupyter shows stderr in red). The mock-data cell, which
  # imports TF first, is the test's, not the notebook's.
  stderr = [output.text for cell in own_cells if cell.cell_type == "code"
            for output in cell.outputs if output.get("name") == "stderr"]
  assert not stderr, stderr
  text = "".join(output.get("text", "") for output in outputs)
  assert "step 3/3 loss" in text, text
  # Each split the notebook and its runs read came from DATA_DIR.
  with open(data_dirs) as f:
    opened = json.load(f)
  assert opened and set(opened) == {data_dir}, opened
