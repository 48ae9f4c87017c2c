"""The colab/ notebooks run top to bottom without error, and are committed without outputs."""
import glob
import os

import nbclient  # the `test` extra, which CI installs
import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(REPO, "colab")
NOTEBOOKS = sorted(glob.glob(os.path.join(COLAB, "*.ipynb")))


def test_the_four_notebooks_exist():
  assert [os.path.basename(p) for p in NOTEBOOKS] == [
      "01_quickstart.ipynb", "02_routers.ipynb", "03_expert_parallel.ipynb", "04_kernels.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, (
          f"{os.path.basename(path)} has outputs: clear them before committing "
          "(jupyter nbconvert --clear-output --inplace colab/*.ipynb)")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path):
  """Runs every cell in a fresh python3 kernel with cwd colab/; any cell error fails the test.

  The notebooks assert their own claims (losses agree across meshes, kernels match ragged_dot,
  kept tokens match the dropless output, the tiny LM learns), so a wrong result fails too.
  """
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                   resources={"metadata": {"path": COLAB}})
  client.execute()  # raises CellExecutionError naming the cell and the traceback
