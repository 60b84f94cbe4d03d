"""How the network reads observations: on their support's scale (jaxic's default) or as they are.

sbibm's Lotka-Volterra model observes 20 log-normal counts that span orders of magnitude; jaxic reads a
positive-support observation on the log scale unless the site says ``infer={"jaxic": {"scale": "linear"}}``.
For each scale and seed, one proposal is compiled with jaxic's defaults otherwise (``--steps`` steps of fresh
simulations) and scored on ``--heldout`` joint draws with a fixed seed: the **test loss**, mean
``-log q(theta | obs)`` through ``jaxic.proposal.log_prob`` (lower is better). Mean and worst over ``--seeds``.

    python benchmarks/observation_scale.py
    python benchmarks/observation_scale.py --steps 300 --seeds 0 --no-write
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import Predictive

import jaxic
import jaxic.proposal

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_io import benchmark_parser, environment_lines, publish  # noqa: E402
from sbibm_tasks import LV_NOISE, lotka_volterra_prior, lotka_volterra_solution  # noqa: E402

HEADING = "## Observations on their support's scale: log against linear (benchmarks/observation_scale.py)"
HELDOUT_SEED = 20_261_130


def lotka_volterra(scale=None, obs=None):
    """sbibm's lotka_volterra; ``scale`` None: jaxic's default reading of the observation (log)."""
    theta = numpyro.sample("theta", lotka_volterra_prior())
    u = jnp.clip(lotka_volterra_solution(theta), 1e-10, 1e4)
    infer = {} if scale is None else {"jaxic": {"scale": scale}}
    numpyro.sample("obs", dist.LogNormal(jnp.log(u), LV_NOISE).to_event(1), obs=obs, infer=infer)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = benchmark_parser(__doc__, HERE / "RESULTS.md")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--heldout", type=int, default=500)
    args = parser.parse_args(argv)
    draws = Predictive(lotka_volterra, num_samples=args.heldout)(jax.random.key(HELDOUT_SEED))
    finite = np.isfinite(np.asarray(draws["obs"])).all(axis=1)  # ODE solves that did not finish
    theta, obs = draws["theta"][finite], draws["obs"][finite]
    rows = []
    for scale in ("log (default)", "linear"):
        for seed in args.seeds:
            start = time.perf_counter()
            compiled = jaxic.compile(lotka_volterra, ["obs"], jax.random.key(seed), num_steps=args.steps,
                                     model_kwargs={"scale": None if scale.startswith("log") else scale},
                                     progress=False)
            log_q, _ = jaxic.proposal.log_prob(compiled.proposal, {"theta": theta}, {"obs": obs})
            rows.append({"scale": scale, "seed": seed, "test_loss": float(-jnp.mean(log_q)),
                         "train_s": time.perf_counter() - start})
            print(f"{scale} seed {seed}: test loss {rows[-1]['test_loss']:.3f} ({rows[-1]['train_s']:.0f} s)",
                  flush=True)
    lines = ["| observation read on | test loss mean / worst | training s (mean) |", "|---|---|---:|"]
    for scale in dict.fromkeys(r["scale"] for r in rows):
        losses = [r["test_loss"] for r in rows if r["scale"] == scale]
        lines.append(f"| {scale} | {statistics.mean(losses):.3f} / {max(losses):.3f} | "
                     f"{statistics.mean(r['train_s'] for r in rows if r['scale'] == scale):.0f} |")
    body = environment_lines("observation_scale.py", argv) + [
        f"- Protocol: sbibm's lotka_volterra (20 log-normal values), jaxic defaults, {args.steps} steps; test loss = "
        f"mean -log q(theta | obs) on {int(finite.sum())} held-out joint draws (seed {HELDOUT_SEED}); seeds "
        f"{args.seeds}.", "", *lines]
    publish(args.output, HEADING, body, write=not args.no_write)


if __name__ == "__main__":
    main()
