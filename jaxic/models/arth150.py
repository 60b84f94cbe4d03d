"""The arth150 gene-expression network: a 107-node linear-Gaussian model with an exact posterior.

arth150 is a Gaussian Bayesian network over the expression of 107 *Arabidopsis thaliana*
genes (150 arcs, 7 roots, 67 leaves, 40 non-leaf nodes). Each node is
``x[n] = intercept[n] + sum_p coefficient[n, p] * x[p] + residual_sd[n] * eps``, ``eps ~ N(0, 1)``,
so the joint is Gaussian and any posterior follows by conditioning it: a large, realistic
benchmark where the proposal can be scored against the truth.

Two inference problems (``variant``):

* ``"leaves"``: observe all 67 leaves, infer the 40 non-leaf nodes;
* ``"leaves40"``: observe the first 40 leaves in topological order, infer the other 67 nodes
  (the 40 non-leaves and the 27 remaining leaves).

Observed nodes are always leaves, so their parents are all latent and, given those parents,
they are independent: the model draws every latent node as its own scalar site ``x<gene>``
(in topological order) and then all observed nodes as one vector site ``"expression"`` (in
topological order; :func:`arth150_layout` gives both orders). Values are in the data's units
(node means 3.6 to 9.4, marginal sds 0.18 to 2.4); jaxic standardises each site itself.

Data: the arth150 network of the bnlearn Bayesian network repository (M. Scutari,
https://www.bnlearn.com/bnrepository/), structure from R. Opgen-Rhein and K. Strimmer (2007),
BMC Systems Biology 1:37; parameters as redistributed (MIT licence) in pgmpy 1.1.2
(``utils/example_models/arth150.json``, rounded there to 4 decimals). Cite bnlearn and
Opgen-Rhein & Strimmer when using it.

Example:
    >>> compiled = jaxic.compile(arth150, observed=["expression"], key=jax.random.key(0),
    ...                          model_kwargs={"variant": "leaves"})
    >>> latents, obs = simulate_arth150(jax.random.key(1), "leaves", 1)
    >>> post = compiled.posterior(jax.random.key(2), {"expression": obs[0]})
    >>> exact_mean, exact_cov = arth150_posterior("leaves", obs[0])
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from importlib import resources
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from scipy.linalg import cho_factor, cho_solve, solve_triangular

VARIANTS = ("leaves", "leaves40")
NUM_OBSERVED_LEAVES40 = 40
OBSERVED_SITE = "expression"


def _frozen(array) -> np.ndarray:
    # Cached results are shared between callers: make accidental in-place edits fail loudly.
    array = np.array(array)
    array.setflags(write=False)
    return array


@dataclasses.dataclass(frozen=True, eq=False)  # arrays: compare by identity
class Arth150:
    """The network's parameters, nodes in topological order (parents before children).

    ``parents[i]`` are node indices and ``coefficients[i]`` their weights; ``leaves`` and
    ``roots`` are node indices in topological order; ``citation`` is the data's source.
    """

    names: tuple[str, ...]
    parents: tuple[np.ndarray, ...]
    coefficients: tuple[np.ndarray, ...]
    intercepts: np.ndarray
    residual_sds: np.ndarray
    leaves: np.ndarray
    roots: np.ndarray
    citation: str

    @property
    def num_nodes(self) -> int:
        return len(self.names)

    @property
    def weight_matrix(self) -> np.ndarray:
        """``B`` with ``B[child, parent]`` = coefficient, so that ``x = B x + c + D eps``."""
        weights = np.zeros((self.num_nodes, self.num_nodes))
        for i, (parents, coefficients) in enumerate(zip(self.parents, self.coefficients)):
            weights[i, parents] = coefficients
        return weights


@functools.lru_cache(maxsize=None)
def load_arth150() -> Arth150:
    """The packaged arth150 network (read once, then cached).

    Example:
        >>> net = load_arth150(); net.num_nodes, len(net.leaves), net.citation
    """
    text = resources.files("jaxic.models").joinpath("data/arth150.json").read_text()
    data = json.loads(text)
    nodes = data["nodes"]
    names = tuple(node["name"] for node in nodes)
    index = {name: i for i, name in enumerate(names)}
    parents = tuple(_frozen(np.array([index[p] for p in node["parents"]], dtype=np.int64)) for node in nodes)
    if any(len(p) and p.max() >= i for i, p in enumerate(parents)):
        raise ValueError("arth150.json: nodes are not in topological order")
    return Arth150(
        names=names,
        parents=parents,
        coefficients=tuple(_frozen(np.array(node["coefficients"], np.float64)) for node in nodes),
        intercepts=_frozen([node["intercept"] for node in nodes]),
        residual_sds=_frozen([node["residual_sd"] for node in nodes]),
        leaves=_frozen(sorted(index[name] for name in data["leaves"])),
        roots=_frozen(sorted(index[name] for name in data["roots"])),
        citation=data["citation"],
    )


class Arth150Layout(NamedTuple):
    """Which nodes one variant observes, and the order of sites and vector entries.

    ``latent`` / ``observed``: node indices in topological order; ``latent_sites``: the
    model's latent site names in that order (the order of every latent vector this module
    returns); ``observed_names``: the genes behind the entries of the ``"expression"`` site.
    """

    latent: np.ndarray
    observed: np.ndarray
    latent_sites: tuple[str, ...]
    observed_names: tuple[str, ...]


@functools.lru_cache(maxsize=None)
def arth150_layout(variant: str = "leaves") -> Arth150Layout:
    """Latent and observed nodes of ``variant`` (``"leaves"`` or ``"leaves40"``).

    Example:
        >>> layout = arth150_layout("leaves40"); len(layout.latent_sites), layout.observed_names[:3]
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    net = load_arth150()
    observed = net.leaves if variant == "leaves" else net.leaves[:NUM_OBSERVED_LEAVES40]
    latent = np.setdiff1d(np.arange(net.num_nodes), observed)
    # The model samples all of "expression" after the latents: valid only if no node depends on it.
    if any(np.isin(net.parents[i], observed).any() for i in range(net.num_nodes)):
        raise ValueError(f"variant {variant!r} observes a node with children")
    return Arth150Layout(_frozen(latent), _frozen(observed), tuple(f"x{net.names[i]}" for i in latent),
                         tuple(net.names[i] for i in observed))


def arth150(variant: str = "leaves"):
    """The arth150 network as a NumPyro model: one scalar site ``x<gene>`` per latent node,
    in topological order, then the observed leaves as one vector site ``"expression"``.

    Example:
        >>> jaxic.compile(arth150, observed=["expression"], key=key, model_kwargs={"variant": "leaves40"})
    """
    net, layout = load_arth150(), arth150_layout(variant)
    values: dict[int, jax.Array] = {}

    def loc(i):
        return net.intercepts[i] + sum((float(w) * values[int(p)] for p, w in zip(net.parents[i], net.coefficients[i])),
                                       0.0)

    for i, site in zip(layout.latent, layout.latent_sites):
        values[int(i)] = numpyro.sample(site, dist.Normal(loc(i), net.residual_sds[i]))
    observed_loc = jnp.stack([jnp.asarray(loc(i), jnp.float32) for i in layout.observed])
    observed_sd = jnp.asarray(net.residual_sds[layout.observed], jnp.float32)
    numpyro.sample(OBSERVED_SITE, dist.Normal(observed_loc, observed_sd).to_event(1))


@functools.lru_cache(maxsize=None)
def _joint():
    net = load_arth150()
    # x = B x + c + D eps  =>  x = A (c + D eps) with A = (I - B)^-1 (unit lower triangular).
    transform = solve_triangular(np.eye(net.num_nodes) - net.weight_matrix, np.eye(net.num_nodes), lower=True,
                                 unit_diagonal=True)
    scaled = transform * net.residual_sds
    return _frozen(transform @ net.intercepts), _frozen(scaled @ scaled.T), _frozen(scaled)


def arth150_joint() -> tuple[np.ndarray, np.ndarray]:
    """Exact mean vector and covariance matrix of all 107 nodes (topological order, float64).

    Example:
        >>> mean, cov = arth150_joint(); np.sqrt(np.diag(cov)).max()     # about 2.41
    """
    mean, cov, _ = _joint()
    return mean, cov


@functools.lru_cache(maxsize=None)
def _conditional(variant: str):
    """Gain ``K`` (latent mean = m_l + K (y - m_o)), posterior covariance and its Cholesky
    factor, and the Cholesky factor of the observations' marginal covariance."""
    mean, cov = arth150_joint()
    layout = arth150_layout(variant)
    lat, obs = layout.latent, layout.observed
    factor = cho_factor(cov[np.ix_(obs, obs)], lower=True)
    cross = cov[np.ix_(lat, obs)]
    gain = cho_solve(factor, cross.T).T
    post_cov = cov[np.ix_(lat, lat)] - gain @ cross.T
    post_cov = 0.5 * (post_cov + post_cov.T)
    return (_frozen(gain), _frozen(post_cov), _frozen(np.linalg.cholesky(post_cov)),
            _frozen(np.tril(factor[0])))


def _observations(variant: str, observed_values) -> np.ndarray:
    y = np.asarray(observed_values, np.float64)
    expected = len(arth150_layout(variant).observed)
    if y.ndim < 1 or y.shape[-1] != expected:
        raise ValueError(f"variant {variant!r} observes {expected} values (last axis), got shape {y.shape}")
    return y


def arth150_posterior(variant: str, observed_values) -> tuple[np.ndarray, np.ndarray]:
    """Exact posterior mean and covariance of the latent nodes (``arth150_layout(variant).latent_sites``
    order) given the ``"expression"`` values; a leading batch axis on the values batches the mean
    (the covariance does not depend on them).

    Example:
        >>> mean, cov = arth150_posterior("leaves", obs)        # obs: shape (67,)
    """
    y = _observations(variant, observed_values)
    mean, _ = arth150_joint()
    layout = arth150_layout(variant)
    gain, post_cov, _, _ = _conditional(variant)
    return mean[layout.latent] + (y - mean[layout.observed]) @ gain.T, post_cov


def arth150_log_evidence(variant: str, observed_values) -> np.ndarray:
    """Exact ``log p(expression)`` (batched over leading axes of the values).

    Example:
        >>> arth150_log_evidence("leaves", obs), compiled.posterior(key, {"expression": obs}).log_evidence
    """
    y = _observations(variant, observed_values)
    mean, _ = arth150_joint()
    chol = _conditional(variant)[3]
    return _gaussian_log_density(y - mean[arth150_layout(variant).observed], chol)


def _gaussian_log_density(residual, chol):
    """log N(residual; 0, chol chol^T) over the last axis, any leading shape."""
    flat = residual.reshape(-1, residual.shape[-1])
    whitened = solve_triangular(chol, flat.T, lower=True).T.reshape(residual.shape)
    k = chol.shape[0]
    return -0.5 * np.sum(whitened**2, -1) - np.sum(np.log(np.diag(chol))) - 0.5 * k * math.log(2 * math.pi)


def exact_posterior_samples(variant: str, observed_values, key: jax.Array, num_samples: int) -> np.ndarray:
    """Draws from the exact posterior, shape ``batch + (num_samples, num_latents)`` (float64).

    Scoring the proposal on these draws gives the true forward KL without bias:
    ``KL(p || q) = E_{x ~ p(x|y)}[log p(x|y) - log q(x|y)]`` with ``log p(x|y)`` from
    :func:`exact_posterior_log_prob` and ``log q`` from the network (e.g. the per-token
    ``network.log_prob`` of the draws' tokens, as :func:`jaxic.objectives.forward_kl_loss` uses).

    Example:
        >>> draws = exact_posterior_samples("leaves", obs, jax.random.key(0), 1000)   # (1000, 40)
    """
    mean, _ = arth150_posterior(variant, observed_values)
    chol = _conditional(variant)[2]
    noise = np.asarray(jax.random.normal(key, mean.shape[:-1] + (num_samples, mean.shape[-1])), np.float64)
    return mean[..., None, :] + noise @ chol.T


def exact_posterior_log_prob(variant: str, observed_values, latents) -> np.ndarray:
    """Exact ``log p(latents | expression)``; ``latents`` has shape ``(..., num_latents)``, in
    ``arth150_layout(variant).latent_sites`` order, broadcasting against the observations' batch.

    Example:
        >>> kl = np.mean(exact_posterior_log_prob("leaves", obs, draws) - log_q)   # draws from the exact posterior
    """
    mean, _ = arth150_posterior(variant, observed_values)
    chol = _conditional(variant)[2]
    latents = np.asarray(latents, np.float64)
    # A batch of observations with several draws each: line the draws' axis up with the batch.
    residual = latents - (mean[..., None, :] if latents.ndim > mean.ndim else mean)
    return _gaussian_log_density(residual, chol)


def simulate_arth150(key: jax.Array, variant: str, num: int) -> tuple[np.ndarray, np.ndarray]:
    """``num`` joint draws: latents ``(num, num_latents)`` in ``latent_sites`` order and
    observations ``(num, num_observed)`` in ``"expression"`` order (float64, exact ancestral form).

    Example:
        >>> latents, obs = simulate_arth150(jax.random.key(0), "leaves", 100)
        >>> compiled.posterior(key, {"expression": obs})        # a batch of 100 posteriors
    """
    mean, _, scaled = _joint()
    layout = arth150_layout(variant)
    noise = np.asarray(jax.random.normal(key, (num, len(mean))), np.float64)
    x = mean + noise @ scaled.T
    return x[:, layout.latent], x[:, layout.observed]


def stack_sites(variant: str, samples: Mapping[str, jax.Array]) -> np.ndarray:
    """Latent site values (e.g. ``Posterior.samples``) as one array ``(..., num_latents)``.

    Example:
        >>> draws = stack_sites("leaves", post.samples)          # (num_samples, 40)
    """
    return np.stack([np.asarray(samples[s], np.float64) for s in arth150_layout(variant).latent_sites], -1)


def unstack_sites(variant: str, latents) -> dict[str, np.ndarray]:
    """An array ``(..., num_latents)`` as a dict of latent sites (the inverse of :func:`stack_sites`).

    Example:
        >>> numpyro.infer.util.log_density(arth150, ("leaves",), {}, unstack_sites("leaves", x) | {"expression": y})
    """
    latents = np.asarray(latents)
    return {s: latents[..., i] for i, s in enumerate(arth150_layout(variant).latent_sites)}


def gaussian_fit(samples, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of draws ``(n, d)``, optionally with normalised importance weights
    ``(n,)`` (then the weighted moments; no small-sample correction).

    Example:
        >>> mean_q, cov_q = gaussian_fit(stack_sites("leaves", post.samples), post.weights)
    """
    x = np.asarray(samples, np.float64)
    if weights is None:
        return x.mean(0), np.cov(x, rowvar=False)
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    mean = w @ x
    centred = x - mean
    return mean, (centred * w[:, None]).T @ centred


def kl_gaussian(mean_p, cov_p, mean_q, cov_q) -> float:
    """Closed-form ``KL(N(mean_p, cov_p) || N(mean_q, cov_q))`` in nats.

    A benchmark can fit a Gaussian to proposal (or importance-weighted) draws with
    :func:`gaussian_fit` and compare it with :func:`arth150_posterior` either way round;
    the fit's own Monte Carlo error biases this upward by about ``d(d+3)/(4n)`` for ``n`` draws.

    Example:
        >>> kl_gaussian(*arth150_posterior("leaves", obs), *gaussian_fit(draws))
    """
    mean_p, cov_p = np.asarray(mean_p, np.float64), np.asarray(cov_p, np.float64)
    mean_q, cov_q = np.asarray(mean_q, np.float64), np.asarray(cov_q, np.float64)
    chol_p, chol_q = np.linalg.cholesky(cov_p), np.linalg.cholesky(cov_q)
    # tr(cov_q^-1 cov_p) = ||L_q^-1 L_p||_F^2.
    trace = np.sum(solve_triangular(chol_q, chol_p, lower=True) ** 2)
    mahalanobis = np.sum(solve_triangular(chol_q, mean_q - mean_p, lower=True) ** 2)
    log_det = 2.0 * (np.sum(np.log(np.diag(chol_q))) - np.sum(np.log(np.diag(chol_p))))
    return float(0.5 * (trace + mahalanobis - len(mean_p) + log_det))
