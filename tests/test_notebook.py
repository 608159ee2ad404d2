"""notebooks/analysis.ipynb runs headless (nbclient, the venv's python3 kernel) on a results folder built
here and draws its tables and figures."""

from __future__ import annotations

import nbformat
from nbclient import NotebookClient

from tests.helpers import REPO, write_fake_run

NOTEBOOK = REPO / "notebooks" / "analysis.ipynb"


def test_analysis_notebook_executes_headless(tmp_path, monkeypatch):
    results = tmp_path / "sweep"
    for s in (1, 2):
        write_fake_run(results / f"base-{s}", seed=s, group_acc=[0.9] * 5 + [0.7] * 5)
        write_fake_run(results / f"dq-{s}", compressor="dq", family="quantization", seed=s, size_mb=30.0,
                       params=12e6, group_acc=[0.85] * 5 + [0.5] * 5)
    write_fake_run(results / "failed", compressor="pr40", family="pruning", status="failed")
    monkeypatch.setenv("SR_RESULTS", str(results))
    monkeypatch.setenv("SR_N_BOOT", "200")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    NotebookClient(nb, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 2  # the size plot and the heatmap of the one dataset
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "dq" in html and "Worst-group acc" in html and "failed" in html
    assert "]*" in html  # dq loses 20 points on the minority groups: marked significant
