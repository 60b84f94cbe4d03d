"""How the masked importance sampler's cost grows with the trace: a baseline revision against this tree.

Model: ``jaxic.models.pedagogical`` (x, M nuisance sites, y; ``obs = 25``), or with ``--model plate``
``jaxic.models.control_flow.pedagogical_plate`` (the M nuisance variables in one plated site), or with
``--model prior`` the pedagogical model with its nuisance sites drawn from their prior
(``infer={"jaxic": {"propose": False}}``), or with ``--model prior_x`` with ``x`` drawn from its prior. One network per M (``jaxic.compile(..., num_steps=0)``,
untrained: the sampler's cost does not depend on the weights), shared by both samplers.

The **baseline** is ``jaxic/inference/importance.py`` as of ``--baseline`` (a git revision, default
``HEAD``), loaded from git into a throw-away module; **new** is this working tree's
:func:`jaxic.inference.sample_particles`. For each M, both are compiled ahead of time (the compile
column: tracing, lowering and XLA compilation of one ``--particles`` call), then timed in turns
(``--repeats`` rounds of one call each, after a warm-up call), so that a change of machine load
hits them alike. Reported: median particles/s of each, their ratio, compile seconds, whether the
log weights of the two agree to the last bit (same keys), and (``--hlo``) the number of
``conditional`` instructions in the new sampler's optimised HLO.

    python benchmarks/is_scaling.py                                      # M = 2, 20, 50, 200; 10,000 particles
    python benchmarks/is_scaling.py --M 2 20 --particles 1000 --repeats 3 # quick check
    python benchmarks/is_scaling.py --baseline a79d7b5                   # against a given revision
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

import jaxic
from jaxic.inference import sample_particles
from jaxic.models import pedagogical
from jaxic.models.control_flow import pedagogical_plate

ROOT = Path(__file__).resolve().parent.parent
OBSERVATIONS = {"obs": 25.0}


def pedagogical_prior(M: int = 20, noise: float = 0.1):
    """:func:`jaxic.models.pedagogical` with the nuisance sites drawn from their prior."""
    x = numpyro.sample("x", dist.Normal(0.0, 10.0))
    for i in range(M):
        numpyro.sample(f"nuisance_{i}", dist.Normal(0.0, 10.0), infer={"jaxic": {"propose": False}})
    y = numpyro.sample("y", dist.Normal(0.0, 10.0))
    numpyro.sample("obs", dist.Normal(x**2 + y**2, noise))


def pedagogical_prior_x(M: int = 20, noise: float = 0.1):
    """:func:`jaxic.models.pedagogical` with ``x`` drawn from its prior (every other site proposed)."""
    x = numpyro.sample("x", dist.Normal(0.0, 10.0), infer={"jaxic": {"propose": False}})
    for i in range(M):
        numpyro.sample(f"nuisance_{i}", dist.Normal(0.0, 10.0))
    y = numpyro.sample("y", dist.Normal(0.0, 10.0))
    numpyro.sample("obs", dist.Normal(x**2 + y**2, noise))


MODELS = {"pedagogical": pedagogical, "plate": pedagogical_plate, "prior": pedagogical_prior,
          "prior_x": pedagogical_prior_x}


def baseline_sampler(revision: str):
    """``sample_particles`` of ``jaxic/inference/importance.py`` at a git revision."""
    source = subprocess.run(["git", "show", f"{revision}:jaxic/inference/importance.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location("baseline_importance", handle.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sample_particles


def compile_sampler(sampler, compiled: jaxic.CompiledModel, particles: int):
    """``sampler`` for ``particles`` particles compiled ahead of time: ``(call(key), seconds, executable)``."""
    spec, model = compiled.spec, compiled.proposal.bound_model

    def call(proposal, key, observations):
        return sampler(proposal.network, spec, model, key, observations, particles).log_weights

    observations = {k: jnp.float32(v) for k, v in OBSERVATIONS.items()}
    proposal = compiled.proposal
    start = time.perf_counter()
    executable = jax.jit(call).lower(proposal, jax.random.key(0), observations).compile()
    seconds = time.perf_counter() - start
    return (lambda key: executable(proposal, key, observations)), seconds, executable


def timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def measure(model: str, M: int, particles: int, repeats: int, old, hlo: bool) -> dict:
    compiled = jaxic.compile(MODELS[model], observed=["obs"], key=jax.random.key(0), num_steps=0,
                             model_kwargs={"M": M}, progress=False)
    samplers = {"baseline": old, "new": sample_particles}
    calls, compile_s, exes = {}, {}, {}
    for name, sampler in samplers.items():
        calls[name], compile_s[name], exes[name] = compile_sampler(sampler, compiled, particles)
    same = bool(np.array_equal(np.asarray(calls["baseline"](jax.random.key(1))),
                               np.asarray(calls["new"](jax.random.key(1)))))
    times = {name: [] for name in samplers}
    for i in range(repeats):
        for name in samplers:
            times[name].append(timed(calls[name], jax.random.key(2 + i)))
    rate = {name: particles / statistics.median(t) for name, t in times.items()}
    conditionals = exes["new"].as_text().count(" conditional(") if hlo else None
    row = {"M": M, "particles": particles, "rate": rate, "compile": compile_s, "identical": same,
           "conditionals": conditionals}
    print(f"[{model} M={M}] baseline {rate['baseline']:,.0f} /s (compile {compile_s['baseline']:.1f} s), "
          f"new {rate['new']:,.0f} /s (compile {compile_s['new']:.1f} s), ratio {rate['new'] / rate['baseline']:.2f}, "
          f"identical log weights: {same}", flush=True)
    return row


def table(model: str, rows: list[dict], revision: str) -> str:
    lines = [f"Model {model}; baseline: importance.py at {revision}; particles/s: median of the timed calls.", "",
             "| M | particles | baseline particles/s | new particles/s | new / baseline | baseline compile s "
             "| new compile s | identical log w | HLO conditionals |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['M']} | {r['particles']:,} | {r['rate']['baseline']:,.0f} | {r['rate']['new']:,.0f} | "
                     f"{r['rate']['new'] / r['rate']['baseline']:.2f} | {r['compile']['baseline']:.1f} | "
                     f"{r['compile']['new']:.1f} | {'yes' if r['identical'] else 'NO'} | "
                     f"{'-' if r['conditionals'] is None else r['conditionals']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--M", type=int, nargs="+", default=[2, 20, 50, 200])
    parser.add_argument("--model", choices=list(MODELS), default="pedagogical")
    parser.add_argument("--particles", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (one call of each sampler per round)")
    parser.add_argument("--baseline", default="HEAD", help="git revision of the baseline importance.py")
    parser.add_argument("--hlo", action="store_true", help="count conditionals in the new sampler's HLO")
    args = parser.parse_args(argv)
    old = baseline_sampler(args.baseline)
    rows = [measure(args.model, M, args.particles, args.repeats, old, args.hlo) for M in args.M]
    print()
    print(table(args.model, rows, args.baseline))


if __name__ == "__main__":
    main()
