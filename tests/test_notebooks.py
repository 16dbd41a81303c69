"""The notebooks: each runs top to bottom with quick settings, and the committed files keep the
outputs and plots of a full run (``notebooks/run.py`` writes them).

The runs go through nbclient with a kernel on this interpreter (``notebooks/run.py``), with
``JPEFT_NOTEBOOK_QUICK=1``: every notebook reads it and shrinks its settings (MiniLM's first layer
only, a few steps, a few hundred sentences), so a run checks that the code works, not what it finds.
"""

import importlib.util
import pathlib

import pytest

from conftest import require

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

#: The notebooks there must be, and how many plots each must hold at least.
PLOTS = {
    "quickstart.ipynb": 1,              # the loss curve
    "selective.ipynb": 1,               # loss curves, accuracy against trainable %
    "reparametrisation.ipynb": 2,       # AdaLoRA's final ranks as a heat map; loss, accuracy
    "additive_hybrid.ipynb": 2,         # loss, accuracy; UniPELT's gates per layer
    "multi_adapter.ipynb": 1,           # loss curves, the weighted_lora sweep
    "bring_your_own_model.ipynb": 1,    # loss curves
    "decoder.ipynb": 1,                 # loss curves, held-out loss
    "results.ipynb": 2,                 # accuracy against trainable % (log), step cost
}


def _run_module():
    for module in ("nbformat", "nbclient", "ipykernel", "matplotlib"):
        require(module)
    spec = importlib.util.spec_from_file_location("notebooks_run", NOTEBOOK_DIR / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    return run


def test_every_notebook_is_there():
    missing = sorted(set(PLOTS) - {p.name for p in NOTEBOOKS})
    assert not missing, f"notebooks missing: {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
    """Top to bottom in a fresh kernel, quick settings; a cell that raises fails the test."""
    nb = _run_module().execute(path, quick=True, timeout=600)
    if "JPEFT_NOTEBOOK_QUICK" in "".join(c.source for c in nb.cells):     # it saw the setting
        assert any("quick settings" in out.get("text", "") for c in nb.cells
                   if c.cell_type == "code" for out in c.outputs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_keeps_its_outputs(path):
    """Committed as run: every code cell executed, in order, in one full-settings run, each with
    its output; no error; the plots saved as images."""
    nbformat = require("nbformat")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert cells, f"{path.name} has no code"
    counts = [c.execution_count for c in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name}: execution counts {counts}: save it from one top-to-bottom run "
        f"(python notebooks/run.py {path.stem})")
    images = 0
    for i, cell in enumerate(cells):
        where = f"{path.name}, code cell {i + 1}"
        assert cell.outputs, f"{where} has no saved output"
        for out in cell.outputs:
            assert out.output_type != "error", f"{where}: {out.ename}: {out.evalue}"
            text = out.get("text", "")
            assert "Traceback" not in text, f"{where} printed a traceback"
            assert "quick settings" not in text, f"{where} holds the outputs of a quick run"
            images += "image/png" in out.get("data", {})
    assert images >= PLOTS.get(path.name, 0), f"{path.name}: {images} plots saved"
