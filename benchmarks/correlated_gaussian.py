"""One vector token against one token per element, on a Gaussian with a strongly correlated exact posterior.

Model: ``theta ~ N(0, I_D)`` as one vector site; ``obs ~ N(A theta, 0.1^2 I)`` with ``A`` the (D-1) x D
matrix of neighbour sums (``theta_i + theta_{i+1}``), so the data pin down every neighbour sum and leave
the alternating direction to the prior: the posterior's neighbour correlations are about -0.98.

For each ``--tokens`` layout (``vector``: ``infer={"jaxic": {"elementwise": False}}``, one token with a
diagonal-mixture head; ``elementwise``: one token per element, the transformer proposing element i given
elements < i) and each training seed, jaxic's defaults train for ``--steps``; reported at the end:

* **KL**: the expected forward KL to the exact posterior, ``E[log p(theta | obs) - log q(theta | obs)]`` over
  ``--heldout`` joint draws (fixed seed), scored with the public ``jaxic.proposal.log_prob``;
* **ESS/N** of ``--particles`` importance particles, mean over the first 5 held-out observations;
* the training time.

The table (per run, then mean and worst seed) goes to stdout and to the section
``## Correlated Gaussian: one vector token vs one token per element (benchmarks/correlated_gaussian.py)``
of ``benchmarks/RESULTS.md``.

    python benchmarks/correlated_gaussian.py                       # D = 5, 3 seeds, 3000 steps
    python benchmarks/correlated_gaussian.py --dims 3 --seeds 0 --steps 300 --no-write   # quick check
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

import jaxic
import jaxic.proposal

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_io import benchmark_parser, environment_lines, publish  # noqa: E402

HEADING = "## Correlated Gaussian: one vector token vs one token per element (benchmarks/correlated_gaussian.py)"
NOISE = 0.1
HELDOUT_SEED = 20_261_130


def design(dim: int) -> np.ndarray:
    """The (dim - 1) x dim matrix of neighbour sums."""
    return np.eye(dim - 1, dim) + np.eye(dim - 1, dim, k=1)


def correlated_model(dim: int = 5, elementwise: bool = True):
    a = jnp.asarray(design(dim), jnp.float32)
    theta = numpyro.sample("theta", dist.Normal(jnp.zeros(dim), 1.0).to_event(1),
                           infer={"jaxic": {"elementwise": elementwise}})
    numpyro.sample("obs", dist.Normal(a @ theta, NOISE).to_event(1))


def exact_posterior(dim: int, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(n, dim)`` and covariance ``(dim, dim)`` of ``theta | obs``."""
    a = design(dim)
    precision = np.eye(dim) + a.T @ a / NOISE**2
    covariance = np.linalg.inv(precision)
    return obs @ (a / NOISE**2) @ covariance.T, covariance


def run_one(dim: int, layout: str, seed: int, args) -> dict:
    model_kwargs = {"dim": dim, "elementwise": layout == "elementwise"}
    draws = numpyro.infer.Predictive(correlated_model, num_samples=args.heldout)(jax.random.key(HELDOUT_SEED),
                                                                                  dim=dim)
    theta, obs = np.asarray(draws["theta"]), np.asarray(draws["obs"])
    start = time.perf_counter()
    compiled = jaxic.compile(correlated_model, ["obs"], jax.random.key(seed), num_steps=args.steps,
                             model_kwargs=model_kwargs, progress=False)
    seconds = time.perf_counter() - start
    log_q, _ = jaxic.proposal.log_prob(compiled.proposal, {"theta": theta}, {"obs": obs})
    mean, covariance = exact_posterior(dim, obs)
    log_p = dist.MultivariateNormal(jnp.asarray(mean), jnp.asarray(covariance)).log_prob(jnp.asarray(theta))
    kl = float(jnp.mean(log_p - log_q))
    post = compiled.posterior(jax.random.key(1), {"obs": jnp.asarray(obs[:5])}, args.particles)
    correlation = covariance[0, 1] / np.sqrt(covariance[0, 0] * covariance[1, 1])
    return {"dim": dim, "layout": layout, "seed": seed, "kl": kl, "seconds": seconds,
            "ess_fraction": float(jnp.mean(post.ess)) / args.particles, "correlation": float(correlation)}


def table(runs: list[dict]) -> list[str]:
    lines = ["| D | layout | seed | forward KL to exact | ESS/N | training s |", "|---:|---|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['dim']} | {r['layout']} | {r['seed']} | {r['kl']:.3f} | {r['ess_fraction']:.3f} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", "Mean and worst seed (worst: highest KL, lowest ESS/N):", "",
              "| D | layout | seeds | KL mean / worst | ESS/N mean / worst | neighbour correlation |",
              "|---:|---|---:|---|---|---:|"]
    for dim in sorted({r["dim"] for r in runs}):
        for layout in dict.fromkeys(r["layout"] for r in runs):
            rs = [r for r in runs if r["dim"] == dim and r["layout"] == layout]
            if rs:
                lines.append(f"| {dim} | {layout} | {len(rs)} | {statistics.mean(r['kl'] for r in rs):.3f} / "
                             f"{max(r['kl'] for r in rs):.3f} | {statistics.mean(r['ess_fraction'] for r in rs):.3f} / "
                             f"{min(r['ess_fraction'] for r in rs):.3f} | {rs[0]['correlation']:.3f} |")
    return lines


def parse_args(argv):
    parser = benchmark_parser(__doc__, HERE / "RESULTS.md")
    parser.add_argument("--dims", type=int, nargs="+", default=[5])
    parser.add_argument("--tokens", nargs="+", default=["vector", "elementwise"], choices=["vector", "elementwise"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--heldout", type=int, default=1000)
    parser.add_argument("--particles", type=int, default=2000)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    runs = []
    for dim in args.dims:
        for layout in args.tokens:
            for seed in args.seeds:
                runs.append(run_one(dim, layout, seed, args))
                print(table(runs[-1:])[2], flush=True)
    body = environment_lines("correlated_gaussian.py", argv) + [
        f"- Protocol: jaxic defaults, {args.steps:,} training steps; forward KL over {args.heldout:,} held-out joint "
        f"draws (seed {HELDOUT_SEED}); ESS/N of {args.particles:,} particles, mean over 5 held-out observations.",
        "", *table(runs)]
    publish(args.output, HEADING, body, write=not args.no_write)


if __name__ == "__main__":
    main()
