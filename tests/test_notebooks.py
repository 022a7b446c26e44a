"""The notebooks in ``notebooks/`` execute top to bottom on real MedMNIST data (issue 16).

Each notebook runs in a fresh kernel with ``MEDCL_QUICK=1`` (tiny budgets) and its runs written
under a temporary folder; any cell error fails the test with the cell's traceback. The stored
notebooks carry no outputs (they are source, not results).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
NAMES = [
    "01_quickstart",
    "02_per_site_analysis",
    "03_export_and_predict",
    "04_methods",
]


def test_the_four_notebooks_exist_and_nothing_else():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    book = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(book)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code, "a notebook without code"
    dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
    assert not dirty, (
        f"{name}.ipynb holds outputs in code cells {dirty}; clear them before committing "
        "(Jupyter: Edit > Clear All Outputs)."
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, request, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCL_QUICK", "1")
    if name != "04_methods":  # 04 only reads benchmarks/results
        monkeypatch.setenv("MEDCL_DATA_ROOT", str(request.getfixturevalue("data_root")))
    monkeypatch.setenv("MEDCL_NOTEBOOK_OUT", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    book = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(
        book,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
        startup_timeout=600,  # kernel start-up on a loaded CI machine; cells have no limit
    )
    client.execute()  # raises CellExecutionError (with the failing cell) on any error
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    if name in ("01_quickstart", "02_per_site_analysis"):  # figures of the runs they train
        assert any("image/png" in o.get("data", {}) for o in outputs), "no figure was drawn"
