"""Amortized variational inference: the ELBO (reverse KL) with an inference network."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxic.inference.importance import sample_particles
from jaxic.objectives.base import Objective, check_positive_int
from jaxic.objectives.data import per_datum
from jaxic.objectives.finite import masked_mean
from jaxic.objectives.weights import datum_summary

ELBO_METRICS = ("elbo", "log_evidence", "dropped", "dropped_site")


def leave_one_out_mean(x: jax.Array, axis: int) -> jax.Array:
    """Mean of the other entries along ``axis``: a baseline that keeps the score-function estimator unbiased.

    Example:
        >>> leave_one_out_mean(jnp.array([1.0, 2.0, 3.0]), axis=0)
        Array([2.5, 2. , 1.5], dtype=float32)
    """
    n = x.shape[axis]
    return (jnp.sum(x, axis=axis, keepdims=True) - x) / (n - 1)


def elbo(num_particles: int = 1) -> Objective:
    """Negative ELBO per data point, ``-E_q[log p(x, z) - log q(z | x)]``, with ``num_particles`` draws.

    Continuous latents are reparameterised (mixture weights included, by implicit
    reparameterisation); discrete ones get score-function gradients with a leave-one-out
    baseline (over the particles, or over the minibatch with one particle). Trains the
    model's own parameters too. Needs data: ``jaxic.compile(..., objective="elbo", data=...)``.
    Particles with a non-finite weight count zero; data points with a non-finite row or no
    finite particle are dropped and counted. A non-finite *gradient* (from a particle whose
    own computation is not finite) still skips the step, as ``TrainInfo.skipped`` shows.
    Metrics: ``elbo``, ``log_evidence`` (the importance-sampling estimate), ``dropped``, ``dropped_site``.

    Example:
        >>> objective = elbo(num_particles=4)
        >>> loss, metrics = objective.loss(network, bound_model, key, 32, {"obs": observed_rows})
    """
    check_positive_int("num_particles", num_particles, "elbo")

    def loss(network, model, key, batch_size: int, data, *, plate=None, sharding=None):
        spec = network.spec

        def one(model_i, observations, k):
            p = sample_particles(network, spec, model_i, k, observations, num_particles)
            return p.log_weights, p.log_proposal_discrete

        (log_w, log_q_discrete), rows_bad = per_datum(one, model, data, key, batch_size, plate, sharding)  # (B, K)
        finite, keep, log_evidence, _, drops = datum_summary(spec, log_w, rows_bad)
        log_w = jnp.where(finite, log_w, 0.0)
        per_datum_elbo = jnp.sum(log_w, axis=1) / jnp.maximum(jnp.sum(finite, axis=1), 1)
        value = masked_mean(per_datum_elbo, keep)
        objective = value
        if any(s.is_discrete and s.propose for s in spec.latents):
            if num_particles > 1:
                baseline = leave_one_out_mean(log_w, axis=1)
            elif batch_size > 1:
                baseline = leave_one_out_mean(log_w, axis=0)
            else:
                baseline = jnp.zeros_like(log_w)
            signal = jax.lax.stop_gradient(jnp.where(finite, log_w - baseline, 0.0))
            log_q_discrete = jnp.where(finite, log_q_discrete, 0.0)
            # Zero in value, the score-function gradient in derivative.
            score = signal * (log_q_discrete - jax.lax.stop_gradient(log_q_discrete))
            objective = objective + masked_mean(jnp.sum(score, axis=1) / jnp.maximum(jnp.sum(finite, axis=1), 1),
                                               keep)
        return -objective, {"elbo": value, "log_evidence": masked_mean(log_evidence, keep), **drops}

    return Objective("elbo", loss, needs_data=True, trains_model=True, options={"num_particles": num_particles},
                     metrics=ELBO_METRICS)

