"""``jaxic demo`` / ``python -m jaxic``: compile a proposal for the pedagogical model and print a posterior.

Example:
    $ jaxic demo --M 20 --steps 3000 --obs 25
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

import jaxic
from jaxic.models import pedagogical


def prior_sampling_ess(key: jax.Array, obs: float, num_samples: int) -> float:
    """ESS of plain importance sampling from the prior, the baseline a proposal must beat."""
    x, y = 10.0 * jax.random.normal(key, (2, num_samples))
    log_w = dist.Normal(x**2 + y**2, 0.1).log_prob(obs)
    return float(1.0 / jnp.sum(jax.nn.softmax(log_w) ** 2))


def demo(M: int, steps: int, obs: float, num_samples: int) -> None:
    print(f"jaxic {jaxic.__version__} on {jax.devices()[0].platform}: pedagogical model with M={M} nuisance sites, "
          f"observing x**2 + y**2 = {obs}")
    start = time.perf_counter()
    compiled = jaxic.compile(pedagogical, observed=["obs"], key=jax.random.key(0), num_steps=steps,
                             model_kwargs={"M": M})
    print(f"compiled a {compiled.num_parameters:,}-parameter transformer proposal in "
          f"{time.perf_counter() - start:.0f} s; held-out -log q(x|y): {compiled.history['validation_loss'][-1]:.2f}")
    post = compiled.posterior(jax.random.key(1), {"obs": obs}, num_samples=num_samples)
    print(post.summary(["x", "y"]))
    ring = float(jnp.sum(post.weights * jnp.abs(post.samples["x"] ** 2 + post.samples["y"] ** 2 - obs)))
    print(f"weighted mean |x^2 + y^2 - obs|: {ring:.3f}; mass with y > 0: "
          f"{float(jnp.sum(post.weights * (post.samples['y'] > 0))):.2f}")
    baseline = prior_sampling_ess(jax.random.key(2), obs, num_samples)
    print(f"ESS/N {float(post.ess) / num_samples:.3f} with the proposal vs {baseline / num_samples:.5f} "
          "sampling from the prior")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="jaxic", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("demo", help="compile a proposal for the pedagogical model and print its posterior")
    for p in (parser, run):
        p.add_argument("--M", type=int, default=20, help="number of nuisance sites between x and y")
        p.add_argument("--steps", type=int, default=3000, help="training steps")
        p.add_argument("--obs", type=float, default=25.0, help="observed x**2 + y**2")
        p.add_argument("--samples", type=int, default=10_000, help="importance samples")
    args = parser.parse_args(argv)
    demo(args.M, args.steps, args.obs, args.samples)


if __name__ == "__main__":
    main()
