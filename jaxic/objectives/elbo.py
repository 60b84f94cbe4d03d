"""Amortized variational inference: the ELBO (reverse KL) with an inference network."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxic.inference.importance import sample_particles
from jaxic.objectives.data import LocalPlate, per_datum
from jaxic.tracing import TraceSpec


def leave_one_out_mean(x: jax.Array, axis: int) -> jax.Array:
    """Mean of the other entries along ``axis``: a baseline that keeps the score-function estimator unbiased."""
    n = x.shape[axis]
    return (jnp.sum(x, axis=axis, keepdims=True) - x) / (n - 1)


@dataclasses.dataclass(frozen=True)
class ELBO:
    """Negative ELBO per data point, ``-E_q[log p(x, z) - log q(z | x)]``, with ``num_particles`` draws.

    Continuous latents are reparameterised (mixture weights included, by implicit
    reparameterisation); discrete ones get score-function gradients with a leave-one-out
    baseline (over the particles, or over the minibatch with one particle). Trains the
    model's own parameters too. Needs data: ``jaxic.compile(..., objective="elbo", data=...)``.

    Example:
        >>> objective = ELBO(num_particles=4, spec=spec)
        >>> loss, metrics = objective(network, bound_model, key, 32, {"obs": observed_rows})
    """

    num_particles: int = 1
    spec: TraceSpec | None = None  # filled in by jaxic.compile
    plate: LocalPlate | None = None
    batch_sharding: Any = None  # jaxic.parallel.batch_sharding: data points split over devices (jaxic.compile devices=)
    needs_data = True
    trains_model = True

    def __call__(self, network, model, key, batch_size: int, data):
        def one(model_i, observations, k):
            p = sample_particles(network, self.spec, model_i, k, observations, self.num_particles)
            return p.log_weights, p.log_proposal_discrete

        log_w, log_q_discrete = per_datum(one, model, data, key, batch_size, self.plate, self.batch_sharding)  # (B, K)
        elbo = jnp.mean(log_w)
        if any(s.is_discrete and s.propose for s in self.spec.latents):
            if self.num_particles > 1:
                baseline = leave_one_out_mean(log_w, axis=1)
            elif batch_size > 1:
                baseline = leave_one_out_mean(log_w, axis=0)
            else:
                baseline = jnp.zeros_like(log_w)
            signal = jax.lax.stop_gradient(log_w - baseline)
            # Zero in value, the score-function gradient in derivative.
            elbo = elbo + jnp.mean(signal * (log_q_discrete - jax.lax.stop_gradient(log_q_discrete)))
        return -elbo, {"elbo": jnp.mean(log_w)}
