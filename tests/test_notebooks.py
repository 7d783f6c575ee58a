"""Checks for the teaching notebooks in notebooks/.

The policy tests read the saved files: each was run from the top in a fresh kernel (execution counts
1..N, no errors) in full mode, and starts with the cell that installs reed in Colab.

The execution tests run every notebook from top to bottom in its fast mode (``REED_NOTEBOOK_FAST=1``:
shorter training, smaller images and shorter ladders). The kernel is this interpreter
(``sys.executable``), so the notebooks import the same reed and the same packages as the tests.
``HF_HUB_OFFLINE=1`` makes the cell that tries Stable Diffusion's VAE report at once that the Hub is
unreachable, so the run never touches the network.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from reed import models

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = ["01_why_vaes_drift.ipynb", "02_train_a_reed_decoder.ipynb", "03_analysis.ipynb"]
COLAB_URL = "https://colab.research.google.com/github/reed-vae/reed/blob/main/notebooks/"
# Saved notebooks keep their outputs. Above this size they are slow to open on GitHub and to review.
MAX_SAVED_BYTES = 3_000_000
# A fast run takes 10 to 40 seconds per notebook on two idle CPU cores, more on a busy machine.
# A cell that runs this long has hung.
CELL_TIMEOUT_SECONDS = 600
KERNEL_NAME = "reed-notebook-test"


def read_notebook(name: str) -> nbformat.NotebookNode:
    path = NOTEBOOK_DIR / name
    assert path.is_file(), f"{path} is missing."
    return nbformat.read(path, as_version=4)


def code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def output_text(cell: nbformat.NotebookNode) -> str:
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif "data" in output:
            parts.append(output.data.get("text/plain", ""))
    return "".join(parts)


# Policy of the saved files


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_saved_notebook_is_valid(name):
    nbformat.validate(read_notebook(name))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_code_cell_executed(name):
    cells = code_cells(read_notebook(name))
    unexecuted = [index for index, cell in enumerate(cells, start=1) if cell.execution_count is None]
    assert not unexecuted, f"{name}: code cells {unexecuted} were never run. Run the notebook from the top and save it."


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_execution_counts_in_order(name):
    counts = [cell.execution_count for cell in code_cells(read_notebook(name))]
    assert counts == list(range(1, len(counts) + 1)), (
        f"{name}: execution counts are {counts}, expected 1..{len(counts)}. "
        "Restart the kernel, run all cells once from the top, then save."
    )


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_no_saved_errors(name):
    for index, cell in enumerate(code_cells(read_notebook(name)), start=1):
        errors = [output for output in cell.outputs if output.output_type == "error"]
        assert not errors, f"{name}: code cell {index} saved an error: {errors[0].ename}: {errors[0].evalue}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_starts_with_colab_install(name):
    first = code_cells(read_notebook(name))[0].source
    assert '"google.colab" in sys.modules' in first, (
        f"{name}: the first code cell must install reed only when running in Colab (google.colab in sys.modules)."
    )
    assert "REPO_URL" in first, f"{name}: the first code cell must install reed from REPO_URL."
    assert "pip" in first, f"{name}: the first code cell must install reed with pip."


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_code_cells_open_with_comment(name):
    cells = code_cells(read_notebook(name))
    bare = [index for index, cell in enumerate(cells, start=1) if not cell.source.lstrip().startswith("#")]
    assert not bare, f"{name}: code cells {bare} do not open with a comment saying what the cell does."


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_saved_in_full_mode(name):
    notebook = read_notebook(name)
    assert "REED_NOTEBOOK_FAST" in notebook.cells[0].source, (
        f"{name}: the first markdown cell must document the REED_NOTEBOOK_FAST setting."
    )
    setup_output = output_text(code_cells(notebook)[1])
    assert "full mode" in setup_output, (
        f"{name}: the saved outputs come from a fast run (setup cell printed {setup_output.strip()!r}). "
        "Save the notebook after a run without REED_NOTEBOOK_FAST, so readers see full-length results."
    )


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_saved_notebook_size(name):
    size = (NOTEBOOK_DIR / name).stat().st_size
    assert size <= MAX_SAVED_BYTES, f"{name} is {size:,} bytes; keep saved notebooks under {MAX_SAVED_BYTES:,}."


def test_readme_links_every_notebook():
    readme = (NOTEBOOK_DIR / "README.md").read_text(encoding="utf-8")
    for name in NOTEBOOKS:
        assert f"{COLAB_URL}{name}" in readme, f"notebooks/README.md has no Open in Colab link for {name}."


# Execution in fast mode


@pytest.fixture
def kernel_environment(tmp_path, monkeypatch) -> Path:
    """Register a kernel that runs this interpreter, and set the environment the notebooks run in.

    Returns the folder the notebooks run in. Files they write (notebook 2 saves a model) land there.
    """
    spec_folder = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec_folder.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})",
        "language": "python",
    }
    (spec_folder / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("REED_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The kernel runs in a temporary folder, so put the repository first on its path for a reed that
    # is not installed (an installed editable reed resolves to the same files).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    work = tmp_path / "work"
    work.mkdir()
    return work


def missing_builtin_weights() -> list[str]:
    return [name for name, folder in models.BUILTIN_MODELS.items() if not (folder / models.WEIGHTS_NAME).is_file()]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_fast_mode(name, kernel_environment):
    missing = missing_builtin_weights()
    if missing:
        pytest.fail(f"The notebooks need the built-in models, but {', '.join(missing)} have no weights under "
                    f"{models.ASSETS / 'reed-mini'}. Train and install them with scripts/build_reed_mini.sh.")

    notebook = read_notebook(name)
    check = nbformat.v4.new_code_cell(f"# Check which interpreter runs the kernel.\nimport sys\n"
                                      f"assert sys.executable == {sys.executable!r}, sys.executable")
    notebook.cells.insert(0, check)
    client = NotebookClient(notebook, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_SECONDS,
                            resources={"metadata": {"path": str(kernel_environment)}})

    started = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as error:
        pytest.fail(f"{name} failed in fast mode:\n{error}")
    print(f"{name}: fast run in {time.perf_counter() - started:.0f} s")

    setup_output = output_text(code_cells(notebook)[2])
    assert "fast mode" in setup_output, f"{name} did not switch to fast mode: {setup_output.strip()!r}"
