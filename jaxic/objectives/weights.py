"""Importance weights per data point, with non-finite particles and data rows left out."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from jaxic.objectives.finite import drop_summary
from jaxic.tracing import TraceSpec


def datum_summary(spec: TraceSpec, log_w: jax.Array, rows_bad: Mapping[str, jax.Array]):
    """From ``(B, K)`` log weights and per-site bad data rows: ``(finite, keep, log_evidence, weights, metrics)``.

    ``finite`` (B, K): particles whose weight counts; ``keep`` (B,): data points with a finite row and
    at least one finite particle; ``log_evidence`` (B,): ``log mean_k w_k`` (non-finite particles weigh
    zero); ``weights`` (B, K): self-normalised, zero where not finite or not kept (no gradient);
    ``metrics``: ``dropped`` (data points left out) and ``dropped_site`` (the observed site of the
    most bad rows; -1 when only weights were at fault).

    Example:
        >>> finite, keep, log_evidence, weights, metrics = datum_summary(spec, log_w, rows_bad)
    """
    num_particles = log_w.shape[1]
    finite = jnp.isfinite(log_w)
    row_bad = jnp.stack([rows_bad[o.name] for o in spec.observed], axis=-1)
    no_weight = ~jnp.any(finite, axis=1)
    keep = ~(jnp.any(row_bad, axis=-1) | no_weight)
    _, row_drops = drop_summary(jnp.concatenate([jnp.zeros((log_w.shape[0], len(spec.latents)), bool), row_bad], -1))
    masked = jnp.where(finite, log_w, -jnp.inf)
    log_evidence = jax.nn.logsumexp(masked, axis=1) - jnp.log(num_particles)
    weights = jax.lax.stop_gradient(jnp.where(keep[:, None] & finite, jax.nn.softmax(masked, axis=1), 0.0))
    metrics = {"dropped": jnp.sum(~keep).astype(jnp.int32), "dropped_site": row_drops["dropped_site"]}
    return finite, keep, log_evidence, weights, metrics
