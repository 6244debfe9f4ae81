"""The notebooks run top to bottom, in order, on real data served over loopback HTTP as from physionet.org, with
every cell's output checked for errors and the figures they must show; the committed notebooks carry no outputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers import HTTPMirror

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
#: figures each notebook must show (image/png outputs), by file name
FIGURES = {"01-the-store.ipynb": 3, "02-train-and-evaluate.ipynb": 3, "03-score-an-archive.ipynb": 2,
           "04-rhythm.ipynb": 2}


def test_every_notebook_is_listed_and_committed_without_outputs():
    assert [p.name for p in NOTEBOOKS] == sorted(FIGURES)
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        nbformat.validate(book)
        for i, cell in enumerate(book.cells):
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name} cell {i} has outputs"
        assert set(book.metadata) <= {"kernelspec", "language_info"}, path.name
    readme = (ROOT / "notebooks" / "README.md").read_text()
    assert all(p.name in readme for p in NOTEBOOKS)


@pytest.fixture(scope="module")
def executed(mirror, tmp_path_factory):
    """Each notebook executed in order in one working folder (2 and 3 use what 1 and 2 wrote)."""
    if not (mirror / "challenge-2017" / "1.0.0" / "training2017.zip").is_file():
        pytest.skip("the mirror has no challenge-2017/1.0.0/training2017.zip (notebook 4 needs it)")
    work = tmp_path_factory.mktemp("notebooks")
    out = {}
    with HTTPMirror(mirror) as http, pytest.MonkeyPatch.context() as env:
        # The kernel inherits this environment: the notebooks read these two variables.
        env.setenv("ECG_PIPELINE_SOURCE", http.url)
        env.setenv("ECG_PIPELINE_NOTEBOOK_WORK", str(work))
        env.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
        for path in NOTEBOOKS:
            book = nbformat.read(path, as_version=4)
            client = nbclient.NotebookClient(book, timeout=900, kernel_name="python3", allow_errors=True,
                                             resources={"metadata": {"path": str(work)}})
            client.execute()
            nbformat.write(book, work / path.name)  # kept for a look when a check below fails
            out[path.name] = book
    return {"work": work, "books": out}


def _errors(book) -> list[str]:
    found = []
    for i, cell in enumerate(book.cells):
        for o in cell.get("outputs", []):
            if o.output_type == "error":
                found.append(f"cell {i}: {o.ename}: {o.evalue}")
            elif o.output_type == "stream" and o.name == "stderr" and "Traceback" in o.text:
                found.append(f"cell {i}: traceback on stderr: {o.text[-500:]}")
    return found


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_without_errors_and_shows_its_figures(executed, name):
    book = executed["books"][name]
    assert not _errors(book), "\n".join(_errors(book))
    cells = [c for c in book.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in cells), "a cell did not run"
    images = sum("image/png" in o.get("data", {}) for c in cells for o in c.outputs)
    assert images >= FIGURES[name], f"{name}: {images} figures, expected {FIGURES[name]}"


@pytest.mark.realdata
@pytest.mark.slow
def test_notebook_results_are_the_jobs_results(executed):
    """What notebook 2 shows comes from the runs it wrote, not from text typed into it."""
    work, book = executed["work"], executed["books"]["02-train-and-evaluate.ipynb"]
    html = next(o["data"]["text/html"] for c in book.cells if c.cell_type == "code" for o in c.outputs
                if "macro F1" in o.get("data", {}).get("text/html", ""))
    for split in ("inter-patient", "intra-patient"):
        metrics = json.loads((work / f"run-{split}" / "metrics.json").read_text())
        shown = [float(x) for x in re.findall(r"<td>(-?\d+\.\d+)</td>", html)]
        assert split in html and any(abs(x - metrics["macro_f1"]) <= 0.0005 for x in shown), (split, shown)
