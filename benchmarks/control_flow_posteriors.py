"""Posteriors of models with stochastic control flow against their exact values.

For each example model in ``jaxic.models`` this compiles a proposal, runs importance
sampling for one observation, and compares posterior quantities with the exact ones
(enumeration, forward-backward or quadrature; the ``*_posterior`` functions). Models written
with Python control flow run on the universal (eager) path and are compared with the same
exact answer as their masked twins.

Columns: model and path, quantity, exact value, jaxic estimate, absolute error, ESS/N,
and the wall time of compile + training and of the posterior call (first call, so it
includes compiling the sampler).

    python benchmarks/control_flow_posteriors.py                 # ~6 min on a 2-core CPU
    python benchmarks/control_flow_posteriors.py --steps 200 --no-write   # quick check
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxic
from jaxic.models import (hmm, hmm_posterior, poisson_branch, poisson_branch_posterior, poisson_branch_universal,
                          random_objects, random_objects_posterior, random_objects_universal, rejection_model,
                          rejection_model_universal, rejection_posterior)
from results_io import environment_lines, publish

HEADING = "## Stochastic control flow against exact posteriors (benchmarks/control_flow_posteriors.py)"
HMM_Y = jnp.array([-1.4, -1.6, 0.1, 1.5, 1.7, 1.2])
POISSON_OBS = 0.5  # both branches plausible: P(n > 2 | obs) = 0.36


def weighted(post, values):
    return float(jnp.sum(post.weights * values))


def poisson_rows(post):
    exact = poisson_branch_posterior(POISSON_OBS)
    n_mean = float(np.sum(np.arange(exact["n_probs"].shape[-1]) * exact["n_probs"]))
    return [("P(n > 2)", float(exact["p_branch"]), float(post.probability_executed("a"))),
            ("E[n]", n_mean, float(post.mean("n"))),
            ("E[a], a ran", float(exact["a_mean"]), float(post.mean("a"))),
            ("sd[a], a ran", float(exact["a_sd"]), float(post.std("a"))),
            ("E[b], b ran", float(exact["b_mean"]), float(post.mean("b")))]


def objects_rows(post, universal):
    exact = random_objects_posterior(3.0, 2.2)
    n = post.samples["n"]
    if universal:  # positions are separate sites position_0..; absent ones count as zero
        total = sum(jnp.where(post.executed[f"position_{k}"], post.samples[f"position_{k}"], 0.0)
                    for k in range(4) if f"position_{k}" in post.samples)
    else:
        total = jnp.sum(jnp.where(post.executed["position"], post.samples["position"], 0.0), -1)
    return [(f"P(n = {k})", float(exact["n_probs"][k]), weighted(post, n == k)) for k in range(5)] + [
        ("E[sum of positions]", float(exact["total_mean"]), weighted(post, total))]


def rejection_rows(post):
    exact = rejection_posterior(0.3)
    # The universal path knows only the attempts its pilot runs reached.
    names = [f"x[{i}]/v" for i in range(12) if f"x[{i}]/v" in post.samples]
    ran = jnp.stack([post.samples[name] for name in names], -1)
    executed = jnp.stack([post.executed[name] for name in names], -1)
    attempts = executed.sum(-1)
    accepted = jnp.take_along_axis(ran, jnp.maximum(attempts, 1)[:, None] - 1, -1)[:, 0]
    return [("E[accepted x]", float(exact["x_mean"]), weighted(post, accepted))] + [
        (f"P({k} attempts)", float(exact["attempt_probs"][k - 1]), weighted(post, attempts == k)) for k in (1, 2, 3)]


def hmm_rows(post):
    exact = hmm_posterior(HMM_Y)
    marginals = jnp.stack([(post.samples["z"] == k).astype(jnp.float32).T @ post.weights for k in range(3)], -1)
    return [("largest error of P(z_t = k)", 0.0, float(jnp.max(jnp.abs(marginals - exact["marginals"])))),
            ("log p(y)", float(exact["log_evidence"]), float(post.log_evidence))]


CASES = [
    # name, model, observed, observations, path, particles, rows
    ("HMM in scan (6 steps, 3 states)", hmm, ["y"], {"y": HMM_Y}, "masked", 10_000, hmm_rows),
    ("Poisson branch, masks", poisson_branch, ["obs"], {"obs": POISSON_OBS}, "masked", 10_000, poisson_rows),
    ("Poisson branch, Python if", poisson_branch_universal, ["obs"], {"obs": POISSON_OBS}, "universal", 1000,
     poisson_rows),
    ("random objects, masked plate", random_objects, ["obs", "count_signal"], {"obs": 3.0, "count_signal": 2.2},
     "masked", 10_000, lambda p: objects_rows(p, False)),
    ("random objects, Python loop", random_objects_universal, ["obs", "count_signal"],
     {"obs": 3.0, "count_signal": 2.2}, "universal", 1000, lambda p: objects_rows(p, True)),
    ("rejection loop, rejection_sample", rejection_model, ["obs"], {"obs": 0.3}, "masked", 10_000, rejection_rows),
    ("rejection loop, Python while", rejection_model_universal, ["obs"], {"obs": 0.3}, "universal", 1000,
     rejection_rows),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="training steps per model (masked path)")
    parser.add_argument("--universal-steps", type=int, default=300, help="training steps per model (universal path)")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)

    table = ["| model | path | quantity | exact | jaxic | abs error | ESS/N | compile+train s | posterior s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, model, observed, observations, path, particles, rows in CASES:
        steps = args.steps if path == "masked" else args.universal_steps
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the universal path announces itself
            compiled = jaxic.compile(model, observed, jax.random.key(0), num_steps=steps, path=path, progress=False)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        post = compiled.posterior(jax.random.key(1), observations, particles)
        jax.block_until_ready(post.log_weights)
        post_s = time.perf_counter() - t0
        for i, (quantity, exact, estimate) in enumerate(rows(post)):
            lead = (f"| {name} | {path}, {steps} steps, N={particles:,}", f"{float(post.ess) / particles:.3f}",
                    f"{train_s:.0f}", f"{post_s:.1f}") if i == 0 else ("| |", "", "", "")
            error = abs(estimate - exact)
            table.append(f"{lead[0]} | {quantity} | {exact:.4f} | {estimate:.4f} | {error:.4f} | "
                         f"{lead[1]} | {lead[2]} | {lead[3]} |")
            print(table[-1], flush=True)

    body = environment_lines("control_flow_posteriors.py", sys.argv[1:] if argv is None else argv) + [
        "- Default network (d_model 64, 2 layers), batch 64; one observation per model; errors are |jaxic - exact|.",
        "", *table]
    publish(args.output, HEADING, body, write=not args.no_write)


if __name__ == "__main__":
    main()
