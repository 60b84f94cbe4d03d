"""The notebooks as published: their stored outputs, read without executing anything.

Every stored notebook in notebooks/ must
* store an image (image/png or image/svg+xml) for every code cell that draws (see ``draws``),
* store no error output,
* carry no absolute machine path (a home, temporary or work folder, a Windows drive) in any source or
  text output,
* have been run top to bottom once: code cells numbered 1, 2, 3, ... in order.
"""

import io
import json
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
IMAGE_TYPES = ("image/png", "image/svg+xml")

# A cell draws when its code (comments and string literals removed) calls pyplot (any ``plt.<name>(`` but the
# settings calls below), calls a ``.plot(`` method or a ``plot_*`` function (jaxic.plots, benchmarks'
# helpers), or uses a figure or axes object named ``fig``, ``ax`` or ``axes`` (``ax.hist(...)``, ``axes[0].set(...)``).
_NOT_DRAWING = {"close", "rc", "rcdefaults", "ioff", "ion", "switch_backend", "get_backend"}
_DRAWING = [re.compile(r"\bplt\.(\w+)\s*\("), re.compile(r"\.plot\s*\("), re.compile(r"\bplot_\w+\s*\("),
            re.compile(r"\b(?:fig|ax|axes)\b\s*(?:\[[^\]]*\]\s*)*\.\w+")]

MACHINE_PATH = re.compile(
    r"/(?:work|home|tmp|Users|root|private/var|var/folders|mnt|scratch)/"  # POSIX homes and scratch folders
    r"|(?<![\w$\\{])[A-Z]:\\(?=[\w .-]+\\)")                                # C:\Users\..., not LaTeX's Q:\frac


def code_only(source: str) -> str:
    """``source`` with comments and string literals blanked out and IPython magic or shell lines dropped."""
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))) + "\n"
    starts = [0]
    for line in code.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    spans = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(code).readline):
            if token.type in (tokenize.COMMENT, tokenize.STRING):
                spans.append((starts[token.start[0] - 1] + token.start[1], starts[token.end[0] - 1] + token.end[1]))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return code
    for start, end in reversed(spans):
        code = code[:start] + '""' + code[end:]
    return code


def draws(source: str) -> bool:
    """Whether a code cell with this source draws a figure (the rule in the comment above ``_DRAWING``)."""
    code = code_only(source)
    for pattern in _DRAWING:
        for match in pattern.finditer(code):
            if pattern.groups == 0 or match.group(1) not in _NOT_DRAWING:
                return True
    return False


def code_cells(notebook: dict) -> list[tuple[int, dict]]:
    return [(i, cell) for i, cell in enumerate(notebook["cells"]) if cell["cell_type"] == "code"]


def text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def missing_figures(notebook: dict) -> list[int]:
    """Indices of the code cells that draw but store no image."""
    return [i for i, cell in code_cells(notebook) if draws(text(cell["source"])) and not any(
        kind in output.get("data", {}) for output in cell.get("outputs", []) for kind in IMAGE_TYPES)]


def machine_paths(notebook: dict) -> list[str]:
    """``cell i: path`` for every machine path in a cell's source or text outputs (images are not text)."""
    found = []
    for i, cell in enumerate(notebook["cells"]):
        texts = [text(cell["source"])]
        for output in cell.get("outputs", []):
            texts += [text(output.get("text", "")), *map(text, output.get("traceback", []))]
            texts += [text(v) if isinstance(v, (str, list)) else json.dumps(v)
                      for kind, v in output.get("data", {}).items() if kind != "image/png"]
        found += [f"cell {i}: {m.group(0)!r} in ...{t[max(0, m.start() - 40):m.end() + 40]!r}..."
                  for t in texts for m in MACHINE_PATH.finditer(t)]
    return found


@pytest.fixture(scope="module", params=NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def notebook(request):
    return request.param.name, json.loads(request.param.read_text())


def test_every_drawing_cell_stores_its_figure(notebook):
    name, nb = notebook
    assert missing_figures(nb) == [], (
        f"{name}: code cells {missing_figures(nb)} draw but store no image; execute the notebook with figures "
        "shown inline (%matplotlib inline, plt.show())")


def test_no_stored_errors(notebook):
    name, nb = notebook
    errors = [(i, o.get("ename"), o.get("evalue")) for i, cell in code_cells(nb) for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert errors == [], f"{name}: stored error outputs {errors}"


def test_no_machine_paths(notebook):
    name, nb = notebook
    assert machine_paths(nb) == [], f"{name}: " + "; ".join(machine_paths(nb))


def test_run_once_top_to_bottom(notebook):
    name, nb = notebook
    counts = [cell.get("execution_count") for _, cell in code_cells(nb)]
    assert counts == list(range(1, len(counts) + 1)), f"{name}: execution counts {counts}"
    results = [(cell["execution_count"], o["execution_count"]) for _, cell in code_cells(nb)
               for o in cell.get("outputs", []) if o.get("output_type") == "execute_result"]
    assert all(a == b for a, b in results), f"{name}: results numbered apart from their cells: {results}"


# --- the rules themselves ----------------------------------------------------------------------------

@pytest.mark.parametrize("source", [
    "fig, ax = plt.subplots()\nax.hist(x)", "plot_digits(X, ncols=20)\nplt.show()", "report.sbc.plot()",
    "jaxic.plots.plot_pair(post[0], ['z'])", "axes[0].set(xlabel='x')", "axes[i, 1].bar(names, p)",
    "%matplotlib inline\nplt.show()", "fig.tight_layout()"])
def test_cells_that_draw(source):
    assert draws(source)


@pytest.mark.parametrize("source", [
    "plt.rcParams['figure.dpi'] = 90", "import matplotlib.pyplot as plt", "plt.close('all')",
    "# plt.plot(x) in a comment", "print('call plot_digits( later')", "config = figure_size(3)",
    "plotted = max_axes + 1", "%matplotlib inline"])
def test_cells_that_do_not_draw(source):
    assert not draws(source)


def test_rules_catch_a_missing_figure_a_machine_path_and_leave_latex_alone():
    nb = {"cells": [
        {"cell_type": "markdown", "source": "$f:\\mathbb{R} \\to \\mathbb{R}$, $Q:\\frac{a}{b}$"},
        {"cell_type": "code", "execution_count": 1, "source": ["fig, ax = plt.subplots()\n", "ax.plot(x)"],
         "outputs": [{"output_type": "display_data", "data": {"text/plain": ["<Figure>"]}}]},
        {"cell_type": "code", "execution_count": 2, "source": "print(path)",
         "outputs": [{"output_type": "stream", "name": "stderr", "text": "at /home/me/model.py:3 and C:\\Users\\me\\x"}]},
    ]}
    assert missing_figures(nb) == [1]
    found = machine_paths(nb)
    assert len(found) == 2 and found[0].startswith("cell 2: '/home/'") and found[1].startswith("cell 2: 'C:\\\\'")
