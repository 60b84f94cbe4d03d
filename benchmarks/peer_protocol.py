"""The peers' protocol on the pedagogical model: quality and effective samples per second at the end of a
wall-clock budget that includes compilation, over several training seeds (mean and worst).

``jaxic.models.pedagogical(M)``: x, M nuisance sites, y, all N(0, 10); ``obs ~ N(x**2 + y**2, 0.1)``.
For every M and training seed, with jaxic's defaults:

* the clock starts before ``jaxic.compile`` and training runs until ``--seconds`` are spent
  (``compiled.train(seconds=...)``, the learning-rate schedule fitted to the steps that fit);
* **test loss**: mean ``-log q`` of all latents on ``--heldout`` joint draws made with a fixed seed
  (the same set for every run), through the public ``jaxic.proposal.log_prob``;
* the same set scored by the **prior** and by the **exact posterior** (closed form: given obs the
  nuisance sites keep their prior, and ``x**2 + y**2`` is exponential with mean 200 under the prior,
  so ``p(obs)`` is an exponential convolved with the noise), giving
  **gap closed** = (prior loss - jaxic's) / (prior loss - exact posterior's);
* **ESS/N** of ``--particles`` importance particles at obs = 25, **IS particles/s** (the jitted
  sampler after compilation, median of ``--repeats`` calls) and **effective samples/s** = their product;
* **ESS/N defensive a**: the same, with ``importance_sample(..., defensive=a)`` (``--defensive``);
* **raw draws on ring**: share of raw proposal draws (``compiled.sample``) with ``|sqrt(x**2 + y**2) - 5| < 0.25``.

The table (per run, then mean and worst seed per M) goes to stdout and to the section
``## Peer protocol: pedagogical model, time budget incl. compilation (benchmarks/peer_protocol.py)``
of ``benchmarks/RESULTS.md``.

    python benchmarks/peer_protocol.py                                  # M = 2, 20, 50; 3 seeds; 180 s each
    python benchmarks/peer_protocol.py --M 20 --seeds 0 --seconds 30 --no-write      # quick check
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm
from numpyro.infer import Predictive

import jaxic
import jaxic.proposal
from jaxic.models import pedagogical

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_io import benchmark_parser, environment_lines, publish  # noqa: E402

HEADING = "## Peer protocol: pedagogical model, time budget incl. compilation (benchmarks/peer_protocol.py)"
PRIOR_SD, NOISE, RING_OBS = 10.0, 0.1, 25.0
HELDOUT_SEED = 20_261_130


def heldout_set(M: int, num: int) -> tuple[dict, jax.Array]:
    """``num`` joint draws of the model (fixed seed): latents and observations."""
    draws = Predictive(pedagogical, num_samples=num)(jax.random.key(HELDOUT_SEED), M=M)
    obs = draws.pop("obs")
    return draws, obs


def prior_log_density(latents: dict) -> jax.Array:
    return sum(norm.logpdf(v, 0.0, PRIOR_SD) for v in latents.values())


def exact_log_posterior(latents: dict, obs: jax.Array) -> jax.Array:
    """``log p(all latents | obs)`` in closed form."""
    rate = 1.0 / (2 * PRIOR_SD**2)  # x**2 + y**2 ~ Exponential(rate) under the prior
    log_evidence = (math.log(rate) - rate * obs + 0.5 * rate**2 * NOISE**2
                    + norm.logcdf((obs - rate * NOISE**2) / NOISE))
    likelihood = norm.logpdf(obs, latents["x"] ** 2 + latents["y"] ** 2, NOISE)
    return prior_log_density(latents) + likelihood - log_evidence


def run_one(M: int, seed: int, args) -> dict:
    latents, obs = heldout_set(M, args.heldout)
    start = time.perf_counter()
    compiled = jaxic.compile(pedagogical, ["obs"], jax.random.key(seed), num_steps=0, model_kwargs={"M": M},
                             progress=False)
    built = time.perf_counter() - start
    compiled.train(seconds=max(args.seconds - built, 1.0), progress=False, validate=False)
    wall = time.perf_counter() - start
    proposal = compiled.proposal
    log_q, _ = jaxic.proposal.log_prob(proposal, latents, {"obs": obs})
    test_loss = float(-jnp.mean(log_q))
    prior_loss = float(-jnp.mean(prior_log_density(latents)))
    exact_loss = float(-jnp.mean(exact_log_posterior(latents, obs)))

    def sampler_for(defensive):
        return jax.jit(lambda p, k: jaxic.proposal.importance_sample(p, None, k, {"obs": RING_OBS}, args.particles,
                                                                     defensive=defensive))

    sampler = sampler_for(0.0)
    post = jax.block_until_ready(sampler(proposal, jax.random.key(1)))  # compiles
    times = []
    for r in range(args.repeats):
        t = time.perf_counter()
        post = jax.block_until_ready(sampler(proposal, jax.random.key(100 + r)))
        times.append(time.perf_counter() - t)
    rate = args.particles / statistics.median(times)
    ess_fraction = float(post.ess) / args.particles
    # The same trained proposal with a defensive mixture (same keys), for the robustness comparison.
    defended = {d: float(sampler_for(d)(proposal, jax.random.key(100 + args.repeats - 1)).ess) / args.particles
                for d in args.defensive}
    raw = compiled.sample(jax.random.key(7), {"obs": RING_OBS}, args.particles)
    radius = jnp.sqrt(raw["x"] ** 2 + raw["y"] ** 2)
    return {"M": M, "seed": seed, "steps": compiled.step, "build_s": built, "wall_s": wall,
            "test_loss": test_loss, "prior_loss": prior_loss, "exact_loss": exact_loss,
            "gap_closed": (prior_loss - test_loss) / (prior_loss - exact_loss),
            "ess_fraction": ess_fraction, "particles_per_s": rate, "effective_per_s": rate * ess_fraction,
            "defended": defended, "on_ring": float(jnp.mean(jnp.abs(radius - math.sqrt(RING_OBS)) < 0.25))}


def table(runs: list[dict]) -> list[str]:
    shares = sorted({d for r in runs for d in r["defended"]})
    lines = ["| M | seed | steps | wall s | test loss (prior / exact) | gap closed | ESS/N | IS particles/s | "
             "effective samples/s | " + "".join(f"ESS/N defensive {d:g} | " for d in shares) + "raw draws on ring |",
             "|---:|---:|---:|---:|---|---:|---:|---:|---:|" + "---:|" * len(shares) + "---:|"]
    for r in runs:
        lines.append(f"| {r['M']} | {r['seed']} | {r['steps']:,} | {r['wall_s']:.0f} | {r['test_loss']:.2f} "
                     f"({r['prior_loss']:.2f} / {r['exact_loss']:.2f}) | {r['gap_closed']:.3f} | "
                     f"{r['ess_fraction']:.3f} | {r['particles_per_s']:,.0f} | {r['effective_per_s']:,.0f} | "
                     + "".join(f"{r['defended'][d]:.3f} | " for d in shares) + f"{r['on_ring']:.2f} |")
    lines += ["", "Mean and worst seed per M (worst: lowest gap closed, ESS/N, effective samples/s):", "",
              "| M | seeds | gap closed mean / worst | ESS/N mean / worst | effective samples/s mean / worst | "
              + "".join(f"ESS/N defensive {d:g} mean / worst | " for d in shares),
              "|---:|---:|---|---|---|" + "---|" * len(shares)]
    for M in sorted({r["M"] for r in runs}):
        rs = [r for r in runs if r["M"] == M]
        cell = lambda key, fmt: f"{fmt.format(statistics.mean(r[key] for r in rs))} / {fmt.format(min(r[key] for r in rs))}"
        lines.append(f"| {M} | {len(rs)} | {cell('gap_closed', '{:.3f}')} | {cell('ess_fraction', '{:.3f}')} | "
                     f"{cell('effective_per_s', '{:,.0f}')} | "
                     + "".join(f"{statistics.mean(r['defended'][d] for r in rs):.3f} / {min(r['defended'][d] for r in rs):.3f} | "
                               for d in shares))
    return lines


def parse_args(argv):
    parser = benchmark_parser(__doc__, HERE / "RESULTS.md")
    parser.add_argument("--M", type=int, nargs="+", default=[2, 20, 50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (compile keys)")
    parser.add_argument("--seconds", type=float, default=180.0, help="budget per run, compilation included")
    parser.add_argument("--particles", type=int, default=10_000)
    parser.add_argument("--heldout", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--defensive", type=float, nargs="*", default=[0.05, 0.1],
                        help="also report ESS/N with these defensive shares (same proposal, same keys)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    runs = []
    for M in args.M:
        for seed in args.seeds:
            runs.append(run_one(M, seed, args))
            print(table(runs[-1:])[2], flush=True)
    body = environment_lines("peer_protocol.py", argv) + [
        f"- Protocol: budget {args.seconds:g} s per run from before `jaxic.compile` (defaults, compile key = seed) "
        f"to the end of `train(seconds=...)`; {args.heldout} held-out joint draws (seed {HELDOUT_SEED}); "
        f"{args.particles:,} IS particles at obs = {RING_OBS:g}, particles/s = median of {args.repeats} jitted calls.",
        "", *table(runs)]
    publish(args.output, HEADING, body, write=not args.no_write)


if __name__ == "__main__":
    main()
