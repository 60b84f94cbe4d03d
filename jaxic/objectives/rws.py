"""Reweighted wake-sleep: importance-weighted updates of the proposal and the model on real data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxic.errors import JaxicError
from jaxic.inference.importance import sample_particles
from jaxic.objectives.base import Objective, check_positive_int
from jaxic.objectives.data import per_datum
from jaxic.objectives.finite import masked_mean, sample_joint_checked
from jaxic.objectives.forward_kl import forward_kl_loss
from jaxic.objectives.weights import datum_summary

RWS_METRICS = ("log_evidence", "ess", "dropped", "dropped_site")


def rws(num_particles: int = 10, sleep_weight: float = 0.0) -> Objective:
    """Reweighted wake-sleep (Bornschein & Bengio 2015; Le et al. 2019).

    On each data point, ``num_particles`` proposal draws are weighted by
    ``w = p(x, z) / q(z | x)``; with self-normalised weights ``w~`` (held constant):

    * wake phase, proposal: ``-sum_k w~_k log q(z_k | x)`` (forward KL to the posterior of the real data),
    * wake phase, model: ``-sum_k w~_k log p(x, z_k)`` (trains the model's parameters),
    * sleep phase (``sleep_weight > 0``): forward KL on joint samples from the current model.

    No gradient passes through the draws, so discrete latents need nothing special. Particles
    with a non-finite weight weigh zero; a data point with a non-finite row or no finite weight
    is dropped and counted (as are non-finite sleep traces). Metrics: ``log_evidence``, ``ess``
    (mean effective sample size of the kept data points' weights, 1 to ``num_particles``),
    ``dropped``, ``dropped_site``.

    Example:
        >>> objective = rws(num_particles=10)
        >>> loss, metrics = objective.loss(network, bound_model, key, 32, {"obs": observed_rows})
    """
    check_positive_int("num_particles", num_particles, "rws")
    if not (isinstance(sleep_weight, (int, float)) and sleep_weight >= 0):
        raise JaxicError(f"rws(sleep_weight={sleep_weight!r}): sleep_weight must be a number >= 0.")

    def loss(network, model, key, batch_size: int, data, *, plate=None, sharding=None):
        spec = network.spec
        graphdef, state = nnx.split(network)
        frozen_network = nnx.merge(graphdef, jax.lax.stop_gradient(state))

        def one(model_i, observations, k):
            p = sample_particles(frozen_network, spec, model_i, k, observations, num_particles)
            tokens = jax.lax.stop_gradient(p.tokens)
            log_q = jnp.sum(jax.vmap(network.log_prob, in_axes=(None, 0))(observations, tokens), axis=-1)
            return log_q, p.log_joint, p.log_weights

        (log_q, log_joint, log_w), rows_bad = per_datum(one, model, data, key, batch_size, plate, sharding)
        finite, keep, log_evidence, weights, drops = datum_summary(spec, log_w, rows_bad)
        wake_proposal = -jnp.sum(weights * jnp.where(finite, log_q, 0.0), axis=1)
        wake_model = -jnp.sum(weights * jnp.where(finite, log_joint, 0.0), axis=1)
        value = masked_mean(wake_proposal + wake_model, keep)
        ess = 1.0 / jnp.sum(weights**2, axis=1)
        if sleep_weight > 0:
            sleeper = model.frozen() if plate is None else plate.element_model(model.frozen(), 0)
            tokens, observations, bad = sample_joint_checked(spec, sleeper, jax.random.fold_in(key, 1), batch_size,
                                                             sharding)
            sleep, sleep_metrics = forward_kl_loss(network, tokens, observations, bad)
            value = value + sleep_weight * sleep
            drops = {"dropped": drops["dropped"] + sleep_metrics["dropped"],
                     "dropped_site": jnp.where(drops["dropped_site"] >= 0, drops["dropped_site"],
                                               sleep_metrics["dropped_site"])}
        return value, {"log_evidence": masked_mean(log_evidence, keep), "ess": masked_mean(ess, keep), **drops}

    return Objective("rws", loss, needs_data=True, trains_model=True,
                     options={"num_particles": num_particles, "sleep_weight": sleep_weight}, metrics=RWS_METRICS)

