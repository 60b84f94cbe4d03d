"""Posterior predictive draws: the model run forward on latents resampled from a posterior.

Example:
    >>> post = compiled.posterior(jax.random.key(1), {"obs": 25.0}, num_samples=10_000)
    >>> jaxic.predictive(model, post, jax.random.key(2), 1000)["obs"].shape      # (1000,)
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

from jaxic import validation as checks
from jaxic.errors import JaxicError
from jaxic.inference.posterior import Posterior, check_weighted, resample_indices
from jaxic.tracing.spec import JIT_FAILURES, abstract_trace, run_model
from jaxic.tracing.limits import resolve_timeout
from jaxic.tracing.universal import run_bounded, stack_deterministic


def predictive(model: Callable, posterior: Posterior, key: jax.Array, num_samples: int, *,
               model_args: Sequence = (), model_kwargs: Mapping | None = None) -> dict[str, jax.Array]:
    """Posterior predictive draws of a model's observed and deterministic sites.

    Draws ``num_samples`` particles per observation set from ``posterior`` by their weights
    (multinomial resampling), substitutes their latent values into ``model`` and runs it
    forward, vmapped over the draws as ``numpyro.infer.Predictive`` does (Binomial sites drawn by
    ``jax.random.binomial``, as in every jaxic model run): every sample site without a value (the
    observed sites, whose ``obs`` must be None, as jaxic models are written) is drawn and the
    deterministic sites are recomputed. Returns ``{site: array}`` with leading axes
    ``posterior.batch_shape`` (one per observation set), then ``num_samples``.

    Latent elements that did not run in a particle (masked sites, untaken branches) hold
    placeholders; the model masks them again, as it did when the particle was weighted. A
    model with Python control flow on sampled values (the universal path) runs eagerly, once
    per draw; a site that only some draws reach is NaN in the others (with a warning).

    Example:
        >>> post = compiled.posterior(jax.random.key(1), {"obs": jnp.array([4.0, 25.0])}, 10_000)
        >>> draws = jaxic.predictive(model, post, jax.random.key(2), 1000)
        >>> draws["obs"].shape                                        # (2, 1000)
    """
    model = checks.model_callable(model)
    if not isinstance(posterior, Posterior):
        raise JaxicError(f"posterior must be a jaxic.Posterior (from compiled.posterior or "
                         f"jaxic.importance_sample), not {type(posterior).__name__}.")
    key = checks.prng_key("key", key)
    num_samples = checks.positive_int("num_samples", num_samples)
    bound = functools.partial(model, *tuple(model_args), **dict(model_kwargs or {}))
    check_weighted(posterior)
    resample_key, model_key = jax.random.split(key)
    batch_ndims = len(posterior.batch_shape) + 1
    index = resample_indices(resample_key, posterior.log_weights, num_samples)
    draws = {n: jnp.take_along_axis(v, index.reshape(index.shape + (1,) * (v.ndim - batch_ndims)), axis=batch_ndims - 1)
             for n, v in posterior.samples.items()}
    try:
        trace = abstract_trace(bound)
    except JIT_FAILURES:  # Python control flow on sampled values: the model runs eagerly
        return _eager(bound, draws, model_key, batch_ndims)
    latents = {n: v for n, v in draws.items()
               if n in trace and trace[n]["type"] == "sample" and not trace[n]["is_observed"]}
    return _vmapped(bound, latents, model_key, batch_ndims)


def _vmapped(model: Callable, latents: dict[str, jax.Array], key: jax.Array, batch_ndims: int) -> dict[str, jax.Array]:
    """One model run per draw with its latents substituted, vmapped (what ``Predictive(parallel=True)`` does,
    through jaxic's ``run_model``, whose Binomial draws cannot stall under vmap)."""
    lead = next(iter(latents.values())).shape[:batch_ndims]
    total = int(np.prod(lead))
    flat = {n: v.reshape((total,) + v.shape[batch_ndims:]) for n, v in latents.items()}

    def one(k, draw):
        return _predicted(run_model(handlers.substitute(model, data=draw), k), draw)

    out = jax.vmap(one)(jax.random.split(key, total), flat)
    return {n: v.reshape(lead + v.shape[1:]) for n, v in out.items()}


def _predicted(trace: dict, drawn: dict) -> dict:
    """What one predictive run returns: its deterministic sites and the samples not taken from the posterior."""
    return {n: m["value"] for n, m in trace.items()
            if m["type"] == "deterministic" or (m["type"] == "sample" and n not in drawn)}


def _eager(model: Callable, draws: dict[str, jax.Array], key: jax.Array, batch_ndims: int) -> dict[str, jax.Array]:
    """The universal path: one eager run per draw (the model is Python; nothing to vectorise)."""
    lead = next(iter(draws.values())).shape[:batch_ndims]
    total = int(np.prod(lead))
    flat = {n: np.asarray(v).reshape((total,) + v.shape[batch_ndims:]) for n, v in draws.items()}
    runs = []
    for i, k in enumerate(jax.random.split(key, total)):
        draw = {n: v[i] for n, v in flat.items()}
        substitute_fn = lambda msg: draw.get(msg["name"]) if msg["type"] == "sample" and not msg["is_observed"] \
            else None
        # Bounded in time like every eager run, so a model that never ends says where instead of hanging.
        trace = run_bounded(handlers.substitute(model, substitute_fn=substitute_fn), k, timeout=resolve_timeout(None),
                            during=f"posterior predictive draw {i + 1} of {total}")
        runs.append({n: np.asarray(v) for n, v in _predicted(trace, draw).items()})
    values, executed = stack_deterministic(runs)
    out = {}
    for name, value in values.items():
        ran = executed[name]
        if not ran.all():
            warnings.warn(f"site '{name}' did not run in {int((~ran.reshape(total, -1).any(-1)).sum())} of {total} "
                          "posterior predictive draws; it is NaN there.", stacklevel=3)
            value = np.where(ran, value.astype(np.result_type(value.dtype, np.float32)), np.nan)
        out[name] = jnp.asarray(value.reshape(lead + value.shape[1:]))
    return out
