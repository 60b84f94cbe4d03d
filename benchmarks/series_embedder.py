"""Which observation embedder for series? The default MLP against ``SeriesConvEmbedding`` (1-D convolutions)
on the sbibm ODE simulators, with their short sbibm summaries and with the dense series behind them.

Models (``benchmarks/sbibm_tasks.py``'s priors, ODEs and noise):

* ``sir``: sbibm's 10 infected counts (every 17th day);      ``sir_daily``: the count on each of the 161 days;
* ``lotka_volterra``: sbibm's 2 x 10 values (every 2.1 time units); ``lotka_volterra_dense``: 2 x 201 (every 0.1).

For each model, embedder and seed, one proposal is compiled with jaxic's defaults otherwise (fresh
simulations, ``--steps`` steps) and scored on ``--heldout`` joint draws made with a fixed seed (the same
for every run): the **test loss**, mean ``-log q(theta | obs)`` through the public ``jaxic.proposal.log_prob``
(lower is better; a difference of 1 nat is a factor e in the density given to the true parameters).
Reported as the mean and worst over ``--seeds`` training seeds, with training time.

    python benchmarks/series_embedder.py                                     # 4 models x 2 embedders x 3 seeds
    python benchmarks/series_embedder.py --models sir_daily --seeds 0 --steps 500 --no-write
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
from jaxic.networks import SeriesConvEmbedding

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_io import benchmark_parser, environment_lines, publish  # noqa: E402
from sbibm_tasks import (LV_NOISE, SIR_TOTAL_COUNT, lotka_volterra_prior, lotka_volterra_solution,  # noqa: E402
                         sir_infected_fraction, sir_prior)

HEADING = "## Observation embedders for series: MLP against 1-D convolutions (benchmarks/series_embedder.py)"
HELDOUT_SEED = 20_261_130
SIR_DAYS = np.arange(0.0, 161.0)
LV_DENSE_TIMES = np.arange(201) * 0.1


class Binomial(dist.BinomialProbs):
    """numpyro's Binomial with its draws from ``jax.random.binomial``. numpyro's own sampler, vmapped over
    traces, never returns for some (key, p) on CPU with jaxlib 0.10.2 (161 daily counts per trace meet
    one within ~35,000 traces): an XLA CPU optimisation fault, gone with
    ``XLA_FLAGS=--xla_backend_optimization_level=0``. Same distribution, so the benchmark is unchanged."""

    def sample(self, key, sample_shape=()):
        shape = sample_shape + self.batch_shape + self.event_shape
        return jax.random.binomial(key, self.total_count, self.probs, shape).astype(jnp.int32)


def sir_model(times, obs=None):
    theta = numpyro.sample("theta", sir_prior())
    probs = jnp.clip(sir_infected_fraction(theta, times), 0.0, 1.0)
    numpyro.sample("obs", Binomial(probs, SIR_TOTAL_COUNT).to_event(1), obs=obs)


def lotka_volterra_model(times, obs=None):
    theta = numpyro.sample("theta", lotka_volterra_prior())
    u = jnp.clip(lotka_volterra_solution(theta, times), 1e-10, 1e4)
    numpyro.sample("obs", dist.LogNormal(jnp.log(u), LV_NOISE).to_event(1), obs=obs)


# name: (model, model_kwargs, number of series in the observation)
MODELS = {
    "sir": (sir_model, {"times": np.arange(0.0, 161.0, 17.0)}, 1),
    "sir_daily": (sir_model, {"times": SIR_DAYS}, 1),
    "lotka_volterra": (lotka_volterra_model, {"times": np.arange(10) * 2.1}, 2),
    "lotka_volterra_dense": (lotka_volterra_model, {"times": LV_DENSE_TIMES}, 2),
}


def embedders(channels: int) -> dict:
    return {"mlp (default)": None, "series_conv": {"obs": SeriesConvEmbedding(channels=channels)}}


def run_one(name: str, embedder: str, seed: int, args) -> dict:
    model, kwargs, channels = MODELS[name]
    draws = Predictive(model, num_samples=args.heldout)(jax.random.key(HELDOUT_SEED), **kwargs)
    start = time.perf_counter()
    compiled = jaxic.compile(model, ["obs"], jax.random.key(seed), num_steps=args.steps, model_kwargs=kwargs,
                             observation_embedders=embedders(channels)[embedder], progress=False)
    train_s = time.perf_counter() - start
    log_q, _ = jaxic.proposal.log_prob(compiled.proposal, {"theta": draws["theta"]}, {"obs": draws["obs"]})
    return {"model": name, "embedder": embedder, "seed": seed, "test_loss": float(-jnp.mean(log_q)),
            "train_s": train_s, "obs_size": int(np.prod(draws["obs"].shape[1:]))}


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | observation | embedder | test loss mean / worst | training s (mean) |",
             "|---|---:|---|---|---:|"]
    for key in dict.fromkeys((r["model"], r["embedder"]) for r in rows):
        rs = [r for r in rows if (r["model"], r["embedder"]) == key]
        losses = [r["test_loss"] for r in rs]
        lines.append(f"| {key[0]} | {rs[0]['obs_size']} values | {key[1]} | {statistics.mean(losses):.3f} / "
                     f"{max(losses):.3f} | {statistics.mean(r['train_s'] for r in rs):.0f} |")
    return lines


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = benchmark_parser(__doc__, HERE / "RESULTS.md")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--embedders", nargs="+", default=["mlp (default)", "series_conv"],
                        choices=["mlp (default)", "series_conv"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--heldout", type=int, default=500)
    args = parser.parse_args(argv)
    rows = []
    for name in args.models:
        for embedder in args.embedders:
            for seed in args.seeds:
                rows.append(run_one(name, embedder, seed, args))
                r = rows[-1]
                print(f"{name} {embedder} seed {seed}: test loss {r['test_loss']:.3f} ({r['train_s']:.0f} s)", flush=True)
    body = environment_lines("series_embedder.py", argv) + [
        f"- Protocol: jaxic defaults (transformer, batch 64, fresh simulations), {args.steps} steps; test loss = mean "
        f"-log q(theta | obs) on {args.heldout} held-out joint draws (seed {HELDOUT_SEED}); mean and worst over "
        f"seeds {args.seeds}. SeriesConvEmbedding: defaults (3 layers of 32 features, kernel 5, pool 2, MLP 128), "
        "channels = the number of series.", "", *table(rows)]
    print("\n".join(table(rows)))
    publish(args.output, HEADING, body, write=not args.no_write)


if __name__ == "__main__":
    main()
