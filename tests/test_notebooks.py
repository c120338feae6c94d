"""Execute every notebook in notebooks/ top to bottom (nbclient + ipykernel, test-only
dependencies); a cell that raises fails the test.

The notebooks run with notebooks/ as working directory, as in Jupyter, and write nothing into
the repository (temporary files go to temporary folders). They use the built-in corpus, which
is synthesised once on first use (about a minute) and reused afterwards; the fixture below
builds it before the first notebook so that no cell's timeout has to cover it.
06_results.ipynb reads results/spg_experiment.json, which the SPG experiment writes
(`python experiments/spg_experiment.py`); without that file its test fails and says so.
The notebooks are committed executed, so that they open with their plots; the test runs them
again from the top (their committed outputs are replaced in memory, not on disk) and checks
that each committed file stays under MAX_NOTEBOOK_BYTES.
"""

from pathlib import Path

import nbclient
import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
RESULTS = REPO / "results"
CELL_TIMEOUT = 600          # seconds per cell; every notebook takes well under a minute of CPU time
MAX_NOTEBOOK_BYTES = 1_000_000


@pytest.fixture(scope="module")
def built_in_corpus():
    from spg.corpus import build_corpus
    return build_corpus(progress=False)


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, built_in_corpus, monkeypatch):
    if path.name == "06_results.ipynb":
        experiment = RESULTS / "spg_experiment.json"
        if not experiment.is_file():
            pytest.fail(f"{experiment} is missing: run `python experiments/spg_experiment.py` to write it "
                        f"(06_results.ipynb plots it)", pytrace=False)
        monkeypatch.setenv("SPG_RESULTS", str(RESULTS))
    notebook = nbformat.read(path, as_version=4)
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES, f"{path.name} is {path.stat().st_size:,} bytes"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()          # raises CellExecutionError, naming the cell, on any error


def test_every_notebook_is_tested():
    assert [p.name for p in sorted(NOTEBOOKS.glob("*.ipynb"))] == [
        "01_model_and_loader.ipynb", "02_self_pinching_gates.ipynb", "03_parameter_clustering.ipynb",
        "04_hard_concrete_pruning.ipynb", "05_wer_and_significance.ipynb", "06_results.ipynb"]
