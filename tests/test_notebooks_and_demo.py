"""Notebooks run top to bottom on a small budget; the README's demo command works."""

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, tmp_path):
    monkeypatch.setenv("JAXIC_NOTEBOOK_STEPS", "100")
    monkeypatch.setenv("JAXIC_NOTEBOOK_PARTICLES", "400")
    monkeypatch.setenv("JAXIC_NOTEBOOK_SECONDS", "10")
    monkeypatch.setenv("JAXIC_NOTEBOOK_BATCH", "32")  # notebook 02's circuit proposal: a third of its CI time
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                   ).execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.slow
def test_demo_command_prints_a_posterior():
    out = subprocess.run([sys.executable, "-m", "jaxic", "demo", "--M", "2", "--steps", "100", "--samples", "500"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, check=True).stdout
    assert "ESS" in out and "log evidence" in out and " x " in out and "sampling from the prior" in out
