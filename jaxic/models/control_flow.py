"""Models with stochastic control flow whose posteriors can be computed exactly.

Each structure comes in up to two forms:

* **masked** (jittable): every potential site runs, and the ones that did not execute
  are masked out with ``numpyro.handlers.mask`` (or written with
  ``numpyro.contrib.control_flow.scan``);
* **universal** (``*_universal``, eager only): ordinary Python control flow on sampled
  values, with the same site names as the masked twin wherever the same random choice
  is meant.

The ``*_posterior`` functions give the exact posterior (by enumeration, conjugacy,
forward-backward or quadrature) in float64 NumPy, for checking inference.

Example:
    >>> compiled = jaxic.compile(poisson_branch, observed=["obs"], key=jax.random.key(0))
    >>> post = compiled.posterior(jax.random.key(1), {"obs": 4.0})
    >>> post.probability_executed("a"), poisson_branch_posterior(4.0)["p_branch"]
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.contrib.control_flow import scan
from scipy.special import logsumexp, softmax

from jaxic.control_flow import rejection_sample


def _normal_log_pdf(x, mean, sd):
    return -0.5 * ((x - mean) / sd) ** 2 - np.log(sd) - 0.5 * math.log(2 * math.pi)


def _mixture_moments(probs, means, variances):
    """Mean and sd of a mixture of components with the given moments (last axis)."""
    total = probs.sum(-1)
    mean = (probs * means).sum(-1) / total
    second = (probs * (variances + means**2)).sum(-1) / total
    return mean, np.sqrt(np.maximum(second - mean**2, 0.0))


# --- pedagogical model with a plate ---------------------------------------------------------

def pedagogical_plate(M: int = 20, noise: float = 0.1):
    """:func:`jaxic.models.pedagogical` with the M nuisance variables in one plated site.

    Sites: ``x``, ``nuisance`` (shape ``(M,)``, in plate ``nuisance_plate``), ``y``,
    observed ``obs ~ N(x**2 + y**2, noise)``.

    Example:
        >>> jaxic.compile(pedagogical_plate, observed=["obs"], key=key, model_kwargs={"M": 20})
    """
    x = numpyro.sample("x", dist.Normal(0.0, 10.0))
    with numpyro.plate("nuisance_plate", M):
        numpyro.sample("nuisance", dist.Normal(0.0, 10.0))
    y = numpyro.sample("y", dist.Normal(0.0, 10.0))
    numpyro.sample("obs", dist.Normal(x**2 + y**2, noise))


# --- a branch on a discrete variable --------------------------------------------------------

def poisson_branch(rate: float = 3.0, threshold: int = 2, noise: float = 0.5):
    """``n ~ Poisson(rate)``; if ``n > threshold`` then ``a ~ N(n, 1)`` else ``b ~ N(-2, 1)``;
    ``obs ~ N(a or b, noise)``. Masked: both ``a`` and ``b`` are sampled, each under its mask.

    Example:
        >>> jaxic.compile(poisson_branch, observed=["obs"], key=key)
    """
    n = numpyro.sample("n", dist.Poisson(rate))
    upper = n > threshold
    with handlers.mask(mask=upper):
        a = numpyro.sample("a", dist.Normal(jnp.asarray(n, jnp.float32), 1.0))
    with handlers.mask(mask=~upper):
        b = numpyro.sample("b", dist.Normal(-2.0, 1.0))
    numpyro.sample("obs", dist.Normal(jnp.where(upper, a, b), noise))


def poisson_branch_universal(rate: float = 3.0, threshold: int = 2, noise: float = 0.5):
    """:func:`poisson_branch` with a Python ``if`` on ``n`` (eager only; same site names).

    Example:
        >>> jaxic.compile(poisson_branch_universal, observed=["obs"], key=key)   # universal path
    """
    n = numpyro.sample("n", dist.Poisson(rate))
    if int(n) > threshold:
        loc = numpyro.sample("a", dist.Normal(float(n), 1.0))
    else:
        loc = numpyro.sample("b", dist.Normal(-2.0, 1.0))
    numpyro.sample("obs", dist.Normal(loc, noise))


def poisson_branch_posterior(obs, rate: float = 3.0, threshold: int = 2, noise: float = 0.5,
                             max_n: int = 60) -> dict:
    """Exact posterior of :func:`poisson_branch` given ``obs`` (scalar or array), by
    enumerating ``n`` in ``0..max_n`` with Gaussian conjugacy for ``a`` and ``b``.

    Returns ``n_probs`` (over ``0..max_n``, last axis), ``p_branch`` = P(n > threshold | obs),
    ``a_mean``/``a_sd`` = moments of ``a`` given obs and that the a-branch ran, and
    ``b_mean``/``b_sd`` likewise for the b-branch.

    Example:
        >>> poisson_branch_posterior(4.0)["p_branch"]
    """
    obs = np.asarray(obs, np.float64)[..., None]
    n = np.arange(max_n + 1, dtype=np.float64)
    upper = n > threshold
    log_prior = n * math.log(rate) - rate - np.array([math.lgamma(k + 1) for k in n])
    # obs | n is N(prior mean of the branch's variable, sqrt(1 + noise^2)).
    branch_mean = np.where(upper, n, -2.0)
    log_post = log_prior + _normal_log_pdf(obs, branch_mean, math.sqrt(1.0 + noise**2))
    n_probs = softmax(log_post, axis=-1)
    precision = 1.0 + 1.0 / noise**2
    cond_mean = (branch_mean + obs / noise**2) / precision
    cond_var = np.full_like(cond_mean, 1.0 / precision)
    a_mean, a_sd = _mixture_moments(n_probs * upper, cond_mean, cond_var)
    b_mean, b_sd = _mixture_moments(n_probs * ~upper, cond_mean, cond_var)
    return {"n_probs": n_probs, "p_branch": (n_probs * upper).sum(-1), "a_mean": a_mean, "a_sd": a_sd,
            "b_mean": b_mean, "b_sd": b_sd}


# --- a random number of objects -------------------------------------------------------------

def _object_probs(max_objects, probs):
    if probs is None:
        return jnp.full(max_objects + 1, 1.0 / (max_objects + 1))
    probs = jnp.asarray(probs, jnp.float32)
    if probs.shape != (max_objects + 1,):
        raise ValueError(f"probs must have {max_objects + 1} entries (for 0..{max_objects} objects)")
    return probs


def random_objects(max_objects: int = 4, probs=None, prior_sd: float = 2.0, noise: float = 0.5):
    """``n ~ Categorical(probs)`` objects (0..max_objects, uniform by default), each with a
    ``position ~ N(0, prior_sd)``; observed: ``obs ~ N(sum of positions, noise)`` and a
    noisy count ``count_signal ~ N(n, 1)``.

    Masked: ``position`` has shape ``(max_objects,)`` in plate ``objects``; entries
    ``k >= n`` are masked out.

    Example:
        >>> jaxic.compile(random_objects, observed=["obs", "count_signal"], key=key)
    """
    n = numpyro.sample("n", dist.Categorical(_object_probs(max_objects, probs)))
    exists = jnp.arange(max_objects) < n
    with numpyro.plate("objects", max_objects), handlers.mask(mask=exists):
        position = numpyro.sample("position", dist.Normal(0.0, prior_sd))
    numpyro.sample("obs", dist.Normal(jnp.sum(jnp.where(exists, position, 0.0)), noise))
    numpyro.sample("count_signal", dist.Normal(jnp.asarray(n, jnp.float32), 1.0))


def random_objects_universal(max_objects: int = 4, probs=None, prior_sd: float = 2.0, noise: float = 0.5):
    """:func:`random_objects` with a Python loop over the objects (eager only).

    A plate cannot have a random size, so the positions are scalar sites
    ``position_0 .. position_{n-1}``: these names differ from the masked twin's single
    ``position`` site, so compare the two through ``n`` and the total position.

    Example:
        >>> jaxic.compile(random_objects_universal, observed=["obs", "count_signal"], key=key)
    """
    n = numpyro.sample("n", dist.Categorical(_object_probs(max_objects, probs)))
    total = 0.0
    for k in range(int(n)):
        total = total + numpyro.sample(f"position_{k}", dist.Normal(0.0, prior_sd))
    numpyro.sample("obs", dist.Normal(total, noise))
    numpyro.sample("count_signal", dist.Normal(float(n), 1.0))


def random_objects_posterior(obs, count_signal, max_objects: int = 4, probs=None, prior_sd: float = 2.0,
                             noise: float = 0.5) -> dict:
    """Exact posterior of :func:`random_objects`: ``n_probs`` over ``0..max_objects`` and
    ``total_mean``/``total_sd`` of the sum of the existing objects' positions.

    Given n, the total is N(0, sqrt(n) prior_sd), so ``obs`` is Gaussian with known
    variance and the total's posterior is conjugate; n is enumerated.

    Example:
        >>> random_objects_posterior(3.0, 2.2)["n_probs"]
    """
    obs = np.asarray(obs, np.float64)[..., None]
    count_signal = np.asarray(count_signal, np.float64)[..., None]
    probs = np.asarray(_object_probs(max_objects, probs), np.float64)
    n = np.arange(max_objects + 1, dtype=np.float64)
    prior_var = n * prior_sd**2
    log_post = (np.log(probs) + _normal_log_pdf(count_signal, n, 1.0)
                + _normal_log_pdf(obs, 0.0, np.sqrt(prior_var + noise**2)))
    n_probs = softmax(log_post, axis=-1)
    gain = prior_var / (prior_var + noise**2)
    total_mean, total_sd = _mixture_moments(n_probs, gain * obs, gain * noise**2)
    return {"n_probs": n_probs, "total_mean": total_mean, "total_sd": total_sd}


# --- a hidden Markov model ------------------------------------------------------------------

def _hmm_parameters(num_states, init_probs, transition, means):
    if init_probs is None:
        init_probs = jnp.full(num_states, 1.0 / num_states)
    if transition is None:
        # Sticky chain: staying put is likely, so neighbouring y's inform each z_t.
        off = 0.2 / max(num_states - 1, 1)
        transition = jnp.full((num_states, num_states), off) + (0.8 - off) * jnp.eye(num_states)
    if means is None:
        means = jnp.linspace(-1.5, 1.5, num_states)
    return jnp.asarray(init_probs), jnp.asarray(transition), jnp.asarray(means, jnp.float32)


def hmm(num_steps: int = 6, num_states: int = 3, init_probs=None, transition=None, means=None, sd: float = 0.8):
    """Hidden Markov model in ``numpyro.contrib.control_flow.scan``: ``z_0 ~ init_probs``,
    ``z_t ~ Categorical(transition[z_{t-1}])``, ``y_t ~ N(means[z_t], sd)``.

    Sites ``z`` (latent) and ``y`` (observed) have a leading time axis of ``num_steps``.
    Defaults: uniform start, 0.8 on the transition diagonal, means spread over [-1.5, 1.5].

    Example:
        >>> jaxic.compile(hmm, observed=["y"], key=key)
    """
    init_probs, transition, means = _hmm_parameters(num_states, init_probs, transition, means)

    def step(z_prev, t):
        # One site for every step: the first step draws from init_probs instead.
        probs = jnp.where(t == 0, init_probs, transition[z_prev])
        z = numpyro.sample("z", dist.Categorical(probs))
        numpyro.sample("y", dist.Normal(means[z], sd))
        return z, None

    scan(step, jnp.zeros((), jnp.int32), jnp.arange(num_steps))


def hmm_unrolled(num_steps: int = 6, num_states: int = 3, init_probs=None, transition=None, means=None,
                 sd: float = 0.8):
    """:func:`hmm` as a Python loop: sites ``z_0 .. z_{T-1}``, then one observed site ``y``
    of shape ``(num_steps,)``. Jittable (the loop has a fixed length).

    Example:
        >>> jaxic.compile(hmm_unrolled, observed=["y"], key=key)
    """
    init_probs, transition, means = _hmm_parameters(num_states, init_probs, transition, means)
    zs = []
    for t in range(num_steps):
        probs = init_probs if t == 0 else transition[zs[-1]]
        zs.append(numpyro.sample(f"z_{t}", dist.Categorical(probs)))
    numpyro.sample("y", dist.Normal(means[jnp.stack(zs)], sd).to_event(1))


def hmm_posterior(y, num_states: int = 3, init_probs=None, transition=None, means=None, sd: float = 0.8) -> dict:
    """Exact posterior of :func:`hmm` by forward-backward (in log space).

    ``y`` has shape ``(num_steps,)``. Returns ``marginals`` (``num_steps x num_states``,
    P(z_t = k | y)) and ``log_evidence`` (log p(y)).

    Example:
        >>> hmm_posterior(jnp.array([-1.4, -1.6, 0.1, 1.5, 1.7, 1.2]))["marginals"]
    """
    init_probs, transition, means = (np.asarray(p, np.float64) for p in
                                     _hmm_parameters(num_states, init_probs, transition, means))
    y = np.asarray(y, np.float64)
    log_emit = _normal_log_pdf(y[:, None], means[None, :], sd)
    log_trans = np.log(transition)

    num_steps = y.shape[0]
    alpha = np.zeros((num_steps, num_states))
    beta = np.zeros((num_steps, num_states))
    alpha[0] = np.log(init_probs) + log_emit[0]
    for t in range(1, num_steps):
        alpha[t] = logsumexp(alpha[t - 1][:, None] + log_trans, axis=0) + log_emit[t]
    for t in range(num_steps - 2, -1, -1):
        beta[t] = logsumexp(log_trans + (beta[t + 1] + log_emit[t + 1])[None, :], axis=1)
    log_evidence = logsumexp(alpha[-1])
    return {"marginals": softmax(alpha + beta, axis=-1), "log_evidence": log_evidence}


# --- rejection sampling ---------------------------------------------------------------------

def rejection_model(max_attempts: int = 12, noise: float = 0.5):
    """Propose ``v ~ N(0, 1)`` until ``v > 0`` (at most ``max_attempts`` times, via
    :func:`jaxic.control_flow.rejection_sample`), then ``obs ~ N(x, noise)`` with ``x`` the
    last proposal. Attempt ``i`` is site ``"x[{i}]/v"``; later attempts are masked out.

    Example:
        >>> jaxic.compile(rejection_model, observed=["obs"], key=key)
    """
    x, _ = rejection_sample("x", lambda: numpyro.sample("v", dist.Normal(0.0, 1.0)), lambda v: v > 0,
                            max_attempts)
    numpyro.sample("obs", dist.Normal(x, noise))


def rejection_model_universal(max_attempts: int = 12, noise: float = 0.5):
    """:func:`rejection_model` as a Python ``while`` loop (eager only; same site names).

    Example:
        >>> jaxic.compile(rejection_model_universal, observed=["obs"], key=key)   # universal path
    """
    attempt = 0
    while True:
        x = numpyro.sample(f"x[{attempt}]/v", dist.Normal(0.0, 1.0))
        attempt += 1
        if x > 0 or attempt == max_attempts:
            break
    numpyro.sample("obs", dist.Normal(x, noise))


def rejection_posterior(obs, noise: float = 0.5, max_attempts: int = 12, grid_size: int = 40_001) -> dict:
    """Exact posterior of :func:`rejection_model` by quadrature on a fine grid.

    Returns ``x_mean``/``x_sd`` of the final value ``x`` and ``attempt_probs``: the
    posterior probability that the loop ran ``k = 1..max_attempts`` attempts. The prior of
    ``x`` is half-normal, except with probability ``2**-max_attempts`` every attempt fails
    and ``x`` is the last (negative) proposal; that case is included, as it matters for
    strongly negative ``obs``.

    Example:
        >>> rejection_posterior(0.3)["x_mean"]
    """
    obs = float(obs)
    half_width = max(8.0, abs(obs) + 12.0 * noise)
    x = np.linspace(0.0, half_width, grid_size)
    dx = x[1] - x[0]
    trapezoid = np.full(grid_size, dx)
    trapezoid[[0, -1]] = dx / 2
    half_normal = 2.0 * np.exp(_normal_log_pdf(x, 0.0, 1.0))
    p_fail = 0.5**max_attempts
    # Unnormalised posterior mass on x >= 0 (accepted) and on x < 0 (all attempts failed).
    mass_pos = trapezoid * (1.0 - p_fail) * half_normal * np.exp(_normal_log_pdf(obs, x, noise))
    mass_neg = trapezoid * p_fail * half_normal * np.exp(_normal_log_pdf(obs, -x, noise))
    evidence = mass_pos.sum() + mass_neg.sum()
    x_mean = ((mass_pos * x).sum() - (mass_neg * x).sum()) / evidence
    x_sd = math.sqrt(((mass_pos + mass_neg) * x**2).sum() / evidence - x_mean**2)
    # obs depends only on the final value, not on how many rejections came before it, so
    # the number of attempts keeps its prior 0.5**k given acceptance; only the reweighting
    # of "accepted" against "all failed" (negligible unless obs is very negative) changes it.
    p_accepted = mass_pos.sum() / evidence
    k = np.arange(1, max_attempts + 1)
    attempt_probs = 0.5**k / (1.0 - p_fail) * p_accepted
    attempt_probs[-1] += 1.0 - p_accepted
    return {"x_mean": x_mean, "x_sd": x_sd, "attempt_probs": attempt_probs}
