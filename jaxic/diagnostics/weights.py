"""Diagnostics of importance weights: Pareto k-hat (PSIS) and effective sample size.

Thresholds follow Vehtari et al., "Pareto smoothed importance sampling" (JMLR 2024):
k-hat < 0.5 good, < 0.7 usable, above that the weights (and every estimate made with
them) are unreliable however many particles are drawn.

Example:
    >>> post = compiled.posterior(key, {"obs": 25.0}, num_samples=10_000)
    >>> pareto_khat(post), ess(post) / post.num_samples
"""

from __future__ import annotations


import jax
import numpy as np
from scipy.special import logsumexp

from jaxic.errors import JaxicError, MissingDependencyError
from jaxic.inference.posterior import ProposalDraws, resample_indices as posterior_resample_indices

KHAT_GOOD = 0.5
KHAT_OK = 0.7


def _log_weights(log_weights) -> np.ndarray:
    """Accept a :class:`jaxic.Posterior` or an array of log weights (particles last)."""
    if isinstance(log_weights, ProposalDraws):  # its equal weights would read as a perfect proposal
        raise JaxicError("these are raw proposal draws (compiled.proposal_draws): they carry no importance weights "
                         "to diagnose; use compiled.posterior(key, observations, n) for weighted particles.")
    lw = getattr(log_weights, "log_weights", log_weights)
    lw = np.asarray(lw, dtype=np.float64)
    if lw.ndim == 0:
        raise ValueError("log_weights must have a particle axis (the last one)")
    if hasattr(log_weights, "log_joint") and hasattr(log_weights, "log_proposal"):
        # Importance sampling gives a particle with a NaN log p or log q zero weight; the
        # diagnostics must still see that the weights are broken.
        broken = np.isnan(np.asarray(log_weights.log_joint)) | np.isnan(np.asarray(log_weights.log_proposal))
        lw = np.where(broken, np.nan, lw)
    return lw


def _array_stats():
    try:
        from arviz_stats.base import array_stats
    except ImportError:
        raise MissingDependencyError('Pareto k-hat needs arviz-stats: pip install "jaxic[arviz]"') from None
    return array_stats


def psis(log_weights) -> tuple[np.ndarray, np.ndarray]:
    """Pareto-smoothed, normalised log weights and k-hat (per observation set).

    Takes a :class:`jaxic.Posterior` or log weights with particles on the last axis. Where
    no weight is finite, or some weight is NaN (for a Posterior: a particle's ``log p`` or
    ``log q`` is NaN), both are NaN: the weights cannot be trusted.

    Example:
        >>> smoothed, khat = psis(post)          # smoothed: same shape as post.log_weights
        >>> np.exp(smoothed).sum(-1)             # 1 per observation set
    """
    lw = _log_weights(log_weights)
    nan_sets = np.isnan(lw).any(axis=-1).reshape(-1)
    # Zero-weight particles (-inf) only ever sit in the left tail, which PSIS never fits;
    # a large finite stand-in keeps arviz-stats' arithmetic finite.
    finite = np.isfinite(lw)
    floor = np.where(finite, lw, np.inf).min(axis=-1, keepdims=True) - 1e4
    lw = np.where(finite, lw, np.where(np.isfinite(floor), floor, 0.0))
    # Equal weights (q = p exactly) have no tail to fit, and arviz-stats raises on them: they
    # are the ideal case, k-hat = -inf.
    flat = lw.reshape(-1, lw.shape[-1])
    constant = np.ptp(flat, axis=-1) < 1e-12
    smoothed = flat - logsumexp(flat, axis=-1, keepdims=True)
    khat = np.full(flat.shape[0], -np.inf)
    if (~constant).any():
        # arviz-stats' psislw is written for PSIS-LOO, where its input is a log-likelihood and the
        # log weights are its negation: hand it the negated log weights.
        s, k = _array_stats().psislw(-flat[~constant], r_eff=1, axis=-1)
        smoothed[~constant], khat[~constant] = np.asarray(s), np.asarray(k)
    # No finite weight, or a NaN one: the weights are broken, k-hat is undefined.
    none_finite = ~finite.reshape(flat.shape).any(axis=-1) | nan_sets
    khat[none_finite] = np.nan
    smoothed[none_finite] = np.nan
    return smoothed.reshape(lw.shape), khat.reshape(lw.shape[:-1])


def pareto_khat(log_weights) -> np.ndarray | float:
    """PSIS Pareto k-hat of the importance weights (a float, or one per observation set).

    Below 0.5 the weights are good, below 0.7 usable; above 0.7 the proposal misses mass
    the target has, and estimates are unreliable: train the proposal longer.

    Example:
        >>> pareto_khat(post)                    # or pareto_khat(post.log_weights)
        >>> khat_verdict(pareto_khat(post[0]))
    """
    khat = psis(log_weights)[1]
    return float(khat) if khat.ndim == 0 else khat


def ess(log_weights) -> np.ndarray | float:
    """Kish effective sample size ``1 / sum w_i^2`` of normalised weights (per observation set);
    NaN where no weight is finite or some weight is NaN.

    Example:
        >>> ess(post) / post.num_samples         # fraction of particles that count
    """
    lw = _log_weights(log_weights)
    norm = logsumexp(lw, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        value = np.exp(-logsumexp(2.0 * (lw - norm), axis=-1))
    return float(value) if value.ndim == 0 else value


def khat_verdict(khat: float) -> str:
    """One-line reading of a k-hat value, with what to do about it.

    Example:
        >>> khat_verdict(0.9)      # 'k̂ = 0.90 > 0.7: importance weights unreliable — train longer ...'
    """
    if np.isnan(khat):
        return ("k̂ undefined: no particle has a finite weight, or some weights are NaN — the proposal misses "
                "the posterior entirely, or computes NaN (check the observations and the training loss)")
    if khat < KHAT_GOOD:
        return f"k̂ = {khat:.2f} < {KHAT_GOOD}: importance weights are reliable"
    if khat < KHAT_OK:
        return (f"k̂ = {khat:.2f} < {KHAT_OK}: importance weights usable, but estimates converge slowly "
                "— use more particles or train longer")
    return (f"k̂ = {khat:.2f} > {KHAT_OK}: importance weights unreliable — train longer or use a bigger "
            "network (more particles help little)")


def resample_indices(key: jax.Array, log_weights, num: int) -> np.ndarray:
    """Multinomial resampling: ``num`` particle indices per observation set, drawn in
    proportion to the weights (shape ``batch_shape + (num,)``).

    Example:
        >>> index = resample_indices(jax.random.key(0), post.log_weights, 1000)
    """
    lw = _log_weights(log_weights)
    flat = lw.reshape(-1, lw.shape[-1]).astype(np.float32)
    return np.asarray(posterior_resample_indices(key, flat, int(num))).reshape(lw.shape[:-1] + (int(num),))
