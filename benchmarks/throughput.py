"""Compile time and throughput of jaxic's training step and importance sampler.

For the pedagogical model ``jaxic.models.pedagogical`` (x, M nuisance sites, y;
``obs`` observed) at each requested M, with jaxic's default network, this measures:

* **parameters**: number of trainable network parameters;
* **train compile s**: time of the first call of the jitted training chunk
  (``CompiledModel._multi_step``, ``steps_per_call`` optimisation steps in one
  ``lax.scan``), i.e. tracing + XLA compilation, minus the steady-state time of
  one chunk (the first call also runs one chunk);
* **train traces/s**: steady-state training throughput,
  ``batch_size * steps / seconds``, after compilation and one warm-up chunk;
* **IS compile s**: time of the first ``CompiledModel.posterior`` call at
  ``obs = 25``, minus the steady-state time of one call;
* **IS particles/s**: steady-state importance-sampling throughput at ``obs = 25``,
  ``particles / seconds`` of one ``posterior`` call (after one warm-up call).

Everything is built through the public API (``jaxic.compile(..., num_steps=0)``
builds the proposal without training); the training chunk is called directly so
that the timings exclude tqdm and the Python bookkeeping of ``CompiledModel.train``.
Each timing blocks with ``jax.block_until_ready``. Steady-state figures are the
median over ``--repeats`` repetitions; ``--steps`` is rounded up to a whole number
of chunks.

The results are printed as a markdown table and written to the section
``## Throughput (benchmarks/throughput.py)`` of ``benchmarks/RESULTS.md`` (other
sections are kept), with the machine, date, package versions and command line.

Run from the repository root on an otherwise idle machine:

    python benchmarks/throughput.py                      # M = 2, 20, 50
    python benchmarks/throughput.py --M 20 --steps 500 --particles 100000 --repeats 5
    python benchmarks/throughput.py --M 2 --steps 25 --particles 500 --no-write   # quick check
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax

import jaxic
from jaxic.models import pedagogical
from results_io import environment_lines, publish

HEADING = "## Throughput (benchmarks/throughput.py)"
OBSERVATIONS = {"obs": 25.0}
COLUMNS = ("M", "parameters", "train compile s", "train traces/s", "IS compile s", "IS particles/s")


@dataclasses.dataclass(frozen=True)
class Result:
    """Figures for one value of M (see the module docstring for their definitions)."""

    M: int
    parameters: int
    train_compile_s: float
    train_traces_per_s: float
    is_compile_s: float
    is_particles_per_s: float

    def row(self) -> tuple[str, ...]:
        return (str(self.M), f"{self.parameters:,}", f"{self.train_compile_s:.2f}",
                f"{self.train_traces_per_s:,.0f}", f"{self.is_compile_s:.2f}", f"{self.is_particles_per_s:,.0f}")


def timed(fn: Callable[..., Any], *args) -> tuple[Any, float]:
    """``fn(*args)`` and its wall time in seconds, waiting for every output array."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def benchmark_training(compiled: jaxic.CompiledModel, steps: int, repeats: int) -> tuple[float, float, int]:
    """Compile time (s), steady-state traces/s and the number of timed steps per repetition."""
    chunk = compiled.train_config.steps_per_call
    calls = max(1, math.ceil(steps / chunk))

    def run_chunks(state, num_calls: int):
        for _ in range(num_calls):
            state, _ = compiled._multi_step(state, chunk)
        return state

    state, first = timed(run_chunks, compiled.state, 1)  # tracing + compilation + one chunk
    state, _ = timed(run_chunks, state, 1)  # warm-up
    durations = []
    for _ in range(repeats):
        state, seconds = timed(run_chunks, state, calls)
        durations.append(seconds)
    per_repeat = statistics.median(durations)
    traces = compiled.train_config.batch_size * chunk * calls
    return first - per_repeat / calls, traces / per_repeat, chunk * calls


def benchmark_inference(compiled: jaxic.CompiledModel, particles: int, repeats: int) -> tuple[float, float]:
    """Compile time (s) and steady-state particles/s of ``posterior`` at ``OBSERVATIONS``."""
    keys = list(jax.random.split(jax.random.key(1), repeats + 2))

    def sample(key):
        return compiled.posterior(key, OBSERVATIONS, num_samples=particles)

    _, first = timed(sample, keys[0])  # tracing + compilation + one run
    timed(sample, keys[1])  # warm-up
    per_call = statistics.median(timed(sample, key)[1] for key in keys[2:])
    return first - per_call, particles / per_call


def benchmark(M: int, steps: int, particles: int, repeats: int) -> Result:
    """Build the proposal for ``pedagogical(M)`` through ``jaxic.compile`` and time it."""
    start = time.perf_counter()
    compiled = jaxic.compile(pedagogical, observed=["obs"], key=jax.random.key(0), num_steps=0,
                             model_kwargs={"M": M}, progress=False)
    print(f"M={M}: proposal built in {time.perf_counter() - start:.1f} s", flush=True)
    train_compile, train_rate, timed_steps = benchmark_training(compiled, steps, repeats)
    print(f"M={M}: training timed over {timed_steps} steps x {repeats} repeats", flush=True)
    is_compile, is_rate = benchmark_inference(compiled, particles, repeats)
    return Result(M, compiled.num_parameters, train_compile, train_rate, is_compile, is_rate)


# ----------------------------------------------------------------------------------------------
# Reporting


def markdown_table(results: list[Result]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---:" for _ in COLUMNS) + "|"]
    return lines + ["| " + " | ".join(r.row()) + " |" for r in results]


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--M", type=int, nargs="+", default=[2, 20, 50], help="numbers of nuisance sites")
    parser.add_argument("--steps", type=int, default=200,
                        help="timed training steps per repetition (rounded up to whole chunks)")
    parser.add_argument("--particles", type=int, default=10_000, help="importance-sampling particles per call")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (the median is reported)")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().with_name("RESULTS.md"),
                        help="markdown file whose throughput section is written or replaced")
    parser.add_argument("--no-write", action="store_true", help="only print the table")
    args = parser.parse_args(argv)
    if min(args.M) < 0 or args.steps < 1 or args.particles < 1 or args.repeats < 1:
        parser.error("--M must be >= 0 and --steps, --particles, --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    start = time.perf_counter()
    results = [benchmark(M, args.steps, args.particles, args.repeats) for M in args.M]
    body = environment_lines("throughput.py", argv) + [""] + markdown_table(results)
    print(f"\n(total {time.perf_counter() - start:.1f} s)\n")
    publish(args.output, HEADING, body, write=not args.no_write)


if __name__ == "__main__":
    main()
