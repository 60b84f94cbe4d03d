"""Shared by the benchmark scripts: machine description, writing sections of RESULTS.md, and writing
the JSON results with every path relative to the repository root (no machine paths in published files)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import jax


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def core_count() -> str:
    total = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    return f"{total} logical cores" + (f" ({usable} usable by this process)" if usable != total else "")


PACKAGES = ("jax", "jaxlib", "flax", "numpyro", "optax", "jaxic")


def environment_lines(script: str, argv: Sequence[str], packages: Sequence[str] = PACKAGES) -> list[str]:
    """Machine, date, package versions and the command line ``python benchmarks/<script> <argv>``."""
    command = shlex.join(["python", f"benchmarks/{script}", *argv])
    versions = ", ".join([f"python {platform.python_version()}"] + [f"{p} {metadata.version(p)}" for p in packages])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- Machine: {cpu_model()}, {core_count()}; JAX devices: {jax.devices()}",
        f"- Date: {date}",
        f"- Versions: {versions}",
        f"- Command: `{command}`",
    ]


NOTES_MARKER = "<!-- written by hand below this line: kept when the benchmark rewrites the section -->"
"""A line in a section after which the text is an analyst's notes: a rerun replaces what is above it only."""


def replace_section(text: str, heading: str, body: list[str]) -> str:
    """``text`` with the markdown section ``heading`` replaced by ``body`` (appended if absent).

    A section runs from its heading to the next ``#`` or ``##`` heading. Lines from :data:`NOTES_MARKER`
    on (hand-written analysis of the figures) stay, after the new ``body``.

    Example:
        >>> text = replace_section(Path("benchmarks/RESULTS.md").read_text(), HEADING, table_lines)
    """
    lines = text.splitlines()
    section = [heading, "", *body]
    if heading in (line.rstrip() for line in lines):
        start = [line.rstrip() for line in lines].index(heading)
        end = next((i for i in range(start + 1, len(lines)) if re.match(r"#{1,2} ", lines[i])), len(lines))
        before, after = lines[:start], lines[end:]
        old = [line.rstrip() for line in lines[start:end]]
        if NOTES_MARKER in old:
            section += ["", *lines[start + old.index(NOTES_MARKER):end]]
    else:
        before, after = lines, []
    while before and not before[-1].strip():
        before.pop()
    parts = [before, section, after]
    return "\n\n".join("\n".join(p).strip("\n") for p in parts if p) + "\n"


def write_section(path: Path, heading: str, body: list[str]) -> None:
    """Write ``body`` under ``heading`` in the markdown file ``path``, keeping its other sections."""
    text = path.read_text() if path.exists() else "# jaxic benchmarks\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(replace_section(text, heading, body))


def benchmark_parser(doc: str, output: Path):
    """An argument parser described by the first paragraph of a script's ``doc``, with the options every
    benchmark shares: ``--output`` (the results file, default ``output``) and ``--no-write`` (only print)."""
    import argparse
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=output)
    parser.add_argument("--no-write", action="store_true", help="only print")
    return parser


def publish(path: Path, heading: str, body: list[str], write: bool = True) -> None:
    """Print ``body`` and, if ``write``, put it under ``heading`` in ``path`` (see :func:`write_section`)."""
    print("\n".join(body))
    if write:
        write_section(path, heading, body)
        print(f"\nwritten to {path}")


# --- JSON results ---------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The repository root: stored paths are relative to it."""

# An absolute path inside a longer text: POSIX (two components at least, not after a word character, a slash
# or a colon, so "ms/step", "1/2" and URLs are left alone) or a Windows drive path.
_ABSOLUTE = re.compile(r"(?<![\w.~/:])(?:/(?:[\w.+-]+/)+[\w.+-]*|[A-Za-z]:\\(?:[\w.+ -]+\\)*[\w.+-]*)")


def repo_relative(path: str | os.PathLike, root: str | os.PathLike = REPO_ROOT) -> str:
    """``path`` as it is stored in results: relative to ``root`` (POSIX separators) when it lies inside it,
    else its file name alone, with a warning (a machine path would not mean anything elsewhere).

    A relative ``path`` is taken relative to the current directory.

    Example:
        >>> repo_relative(REPO_ROOT / "benchmarks" / "results" / "x.json")
        'benchmarks/results/x.json'
    """
    text = os.fspath(path)
    windows = re.match(r"[A-Za-z]:\\", text) is not None
    absolute = text if windows or os.path.isabs(text) else os.path.join(os.getcwd(), text)
    for base in dict.fromkeys([os.fspath(root), os.path.realpath(root)]):
        for candidate in dict.fromkeys([os.path.normpath(absolute), os.path.realpath(absolute)]):
            if candidate == base:
                return "."
            if candidate.startswith(base.rstrip(os.sep) + os.sep):
                return Path(os.path.relpath(candidate, base)).as_posix()
    name = re.split(r"[\\/]", text.rstrip("/\\"))[-1]
    warnings.warn(f"results_io: {text} lies outside the repository {os.fspath(root)}; stored as its file name "
                  f"{name!r}. Write results inside the repository to keep the folder.", stacklevel=2)
    return name


def portable(value: Any, root: str | os.PathLike = REPO_ROOT) -> Any:
    """``value`` (JSON-like: dicts, lists, tuples, strings, numbers, ``Path``s) with every path, whole or inside a
    text, made relative to ``root`` by :func:`repo_relative`; everything else unchanged.

    Example:
        >>> portable({"json": REPO_ROOT / "r.json", "cmd": f"python x.py --out {REPO_ROOT}/f.png", "n": 3})
        {'json': 'r.json', 'cmd': 'python x.py --out f.png', 'n': 3}
    """
    if isinstance(value, os.PathLike):
        return repo_relative(value, root)
    if isinstance(value, str):
        return _ABSOLUTE.sub(lambda m: repo_relative(m.group(0), root), value)
    if isinstance(value, dict):
        return {portable(k, root): portable(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, root) for v in value]
    return value


def _json_value(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy and jax scalars and arrays
        return value.tolist()
    return float(value)


def write_results_json(path: str | os.PathLike, payload: Any, root: str | os.PathLike = REPO_ROOT) -> Path:
    """Write ``payload`` as JSON to ``path``, with every path made relative to ``root`` (:func:`portable`).

    The one writer of the benchmarks' JSON results. The file is replaced atomically, so a run stopped
    while writing leaves the previous results; numpy or jax numbers are stored as plain numbers.

    Example:
        >>> write_results_json(REPO_ROOT / "benchmarks" / "results" / "x.json", {"config": {"figure": fig_path}})
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(portable(payload, root), indent=1, default=_json_value) + "\n")
    tmp.replace(path)
    return path
