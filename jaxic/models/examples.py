"""Small models with known posteriors, and the pedagogical model of attention for inference compilation."""

from __future__ import annotations

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist


def pedagogical(M: int = 20, noise: float = 0.1):
    """x, then M nuisance variables, then y, all N(0, 10); observe ``x**2 + y**2`` with noise.

    The posterior given ``obs`` is a ring of radius sqrt(obs); proposing y well needs x,
    which lies M sites back (the long-range dependency attention is good at).

    Example:
        >>> jaxic.compile(pedagogical, observed=["obs"], key=key, model_kwargs={"M": 20})
    """
    x = numpyro.sample("x", dist.Normal(0.0, 10.0))
    for i in range(M):
        numpyro.sample(f"nuisance_{i}", dist.Normal(0.0, 10.0))
    y = numpyro.sample("y", dist.Normal(0.0, 10.0))
    numpyro.sample("obs", dist.Normal(x**2 + y**2, noise))


def gaussian_unknown_mean(prior_mean: float = 1.0, prior_sd: float = 5.0**0.5, noise_sd: float = 2.0**0.5,
                          num_obs: int = 2):
    """mu ~ N(1, sqrt 5); ``num_obs`` observations ~ N(mu, sqrt 2) in one site ``obs``."""
    mu = numpyro.sample("mu", dist.Normal(prior_mean, prior_sd))
    numpyro.sample("obs", dist.Normal(mu, noise_sd).expand([num_obs]).to_event(1))


def gaussian_unknown_mean_posterior(obs, prior_mean: float = 1.0, prior_sd: float = 5.0**0.5,
                                    noise_sd: float = 2.0**0.5):
    """Exact posterior mean and sd of ``mu`` for :func:`gaussian_unknown_mean`."""
    obs = jnp.asarray(obs)
    precision = 1.0 / prior_sd**2 + obs.shape[-1] / noise_sd**2
    mean = (prior_mean / prior_sd**2 + obs.sum(-1) / noise_sd**2) / precision
    return mean, precision**-0.5


def coin_flips(num_flips: int = 5):
    """A discrete latent with an enumerable posterior: which of three coins was flipped.

    coin ~ Categorical(0.5, 0.3, 0.2) with heads probabilities (0.2, 0.5, 0.9);
    a bias flag ~ Bernoulli(0.3) adds 0.05 to every heads probability.
    """
    coin = numpyro.sample("coin", dist.Categorical(jnp.array([0.5, 0.3, 0.2])))
    biased = numpyro.sample("biased", dist.Bernoulli(0.3))
    p = jnp.array([0.2, 0.5, 0.9])[coin] + 0.05 * biased
    numpyro.sample("flips", dist.Bernoulli(p).expand([num_flips]).to_event(1))
