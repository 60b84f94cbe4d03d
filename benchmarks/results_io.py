"""Shared by the benchmark scripts: machine description and writing sections of RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
from importlib import metadata
from pathlib import Path
from typing import Sequence

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


def replace_section(text: str, heading: str, body: list[str]) -> str:
    """``text`` with the markdown section ``heading`` replaced by ``body`` (appended if absent).

    A section runs from its heading to the next ``#`` or ``##`` heading.
    """
    lines = text.splitlines()
    section = [heading, "", *body]
    if heading in (line.rstrip() for line in lines):
        start = [line.rstrip() for line in lines].index(heading)
        end = next((i for i in range(start + 1, len(lines)) if re.match(r"#{1,2} ", lines[i])), len(lines))
        before, after = lines[:start], lines[end:]
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


def publish(path: Path, heading: str, body: list[str], write: bool = True) -> None:
    """Print ``body`` and, if ``write``, put it under ``heading`` in ``path`` (see :func:`write_section`)."""
    print("\n".join(body))
    if write:
        write_section(path, heading, body)
        print(f"\nwritten to {path}")
