"""Turn model executions into padded, fixed-shape token arrays (vmapped over seeds)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxic.parallel import shard_batch
from jaxic.tracing.spec import TraceSpec, as_tokens, run_model, token_mask


class Tokens(NamedTuple):
    """One trace as tokens (add a leading batch axis for many traces).

    ``value`` holds unconstrained values (category indices for discrete sites),
    padded to the widest site; ``mask`` is False for sites that did not execute;
    ``log_jacobian`` is log|det J| of the map from token value to model value.
    """

    address: jax.Array  # (T,) int32
    instance: jax.Array  # (T,) int32
    dist_type: jax.Array  # (T,) int32
    value: jax.Array  # (T, D) float32
    mask: jax.Array  # (T,) bool
    log_jacobian: jax.Array  # (T,) float32


def trace_to_tokens(spec: TraceSpec, trace: dict) -> tuple[Tokens, dict[str, jax.Array]]:
    """Tokens of one execution trace, and its observed values."""
    width = spec.value_dim
    values, masks, log_dets = [], [], []
    for site in spec.latents:
        msg = trace[site.name]
        v, ld = as_tokens(site, msg["fn"], msg["value"], width)
        values.append(v)
        log_dets.append(ld)
        masks.append(token_mask(site, msg["fn"]))
    layout = spec.token_layout()
    order = spec.token_order()
    tokens = Tokens(
        address=jnp.asarray(layout["address"]),
        instance=jnp.asarray(layout["instance"]),
        dist_type=jnp.asarray(layout["dist_type"]),
        value=jnp.concatenate(values)[order],
        mask=jnp.concatenate(masks)[order],
        log_jacobian=jnp.concatenate(log_dets).astype(jnp.float32)[order],
    )
    observations = {o.name: jnp.asarray(trace[o.name]["value"], dtype=jnp.float32) for o in spec.observed}
    return tokens, observations


def sample_joint(spec: TraceSpec, model: Callable, key: jax.Array, num_traces: int, sharding=None):
    """Draw ``num_traces`` joint samples (latents and observations) as tokens.

    The model runs under ``jax.vmap`` over seeds: no Python loop over traces.
    Call it inside ``jax.jit`` (the training step does). ``sharding`` (e.g.
    :func:`jaxic.parallel.batch_sharding`) splits the traces over devices.

    Example:
        >>> tokens, obs = jax.jit(lambda k: sample_joint(spec, model, k, 256))(key)
        >>> tokens.value.shape  # (256, spec.num_tokens, spec.value_dim)
    """

    def one(k):
        return trace_to_tokens(spec, run_model(model, k))

    # Sharded keys make XLA run each device's share of the traces.
    return jax.vmap(one)(shard_batch(jax.random.split(key, num_traces), sharding))
