"""Reweighted wake-sleep: importance-weighted updates of the proposal and the model on real data."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxic.inference.importance import sample_particles
from jaxic.objectives.data import LocalPlate, per_datum
from jaxic.objectives.forward_kl import forward_kl_loss
from jaxic.tracing import TraceSpec, sample_joint


@dataclasses.dataclass(frozen=True)
class ReweightedWakeSleep:
    """Reweighted wake-sleep (Bornschein & Bengio 2015; Le et al. 2019).

    On each data point, ``num_particles`` proposal draws are weighted by
    ``w = p(x, z) / q(z | x)``; with self-normalised weights ``w~`` (held constant):

    * wake phase, proposal: ``-sum_k w~_k log q(z_k | x)`` (forward KL to the posterior of the real data),
    * wake phase, model: ``-sum_k w~_k log p(x, z_k)`` (trains the model's parameters),
    * sleep phase (``sleep_weight > 0``): forward KL on joint samples from the current model.

    No gradient passes through the draws, so discrete latents need nothing special.

    Example:
        >>> objective = ReweightedWakeSleep(num_particles=10, spec=spec)
        >>> loss, metrics = objective(network, bound_model, key, 32, {"obs": observed_rows})
    """

    num_particles: int = 10
    sleep_weight: float = 0.0
    spec: TraceSpec | None = None  # filled in by jaxic.compile
    plate: LocalPlate | None = None
    batch_sharding: Any = None  # jaxic.parallel.batch_sharding: data points split over devices (jaxic.compile devices=)
    needs_data = True
    trains_model = True

    def __call__(self, network, model, key, batch_size: int, data):
        graphdef, state = nnx.split(network)
        frozen_network = nnx.merge(graphdef, jax.lax.stop_gradient(state))

        def one(model_i, observations, k):
            p = sample_particles(frozen_network, self.spec, model_i, k, observations, self.num_particles)
            tokens = jax.lax.stop_gradient(p.tokens)
            log_q = jnp.sum(jax.vmap(network.log_prob, in_axes=(None, 0))(observations, tokens), axis=-1)
            weights = jax.lax.stop_gradient(jax.nn.softmax(p.log_weights))
            log_evidence = jax.nn.logsumexp(p.log_weights) - jnp.log(self.num_particles)
            return -jnp.sum(weights * log_q), -jnp.sum(weights * p.log_joint), log_evidence

        wake_proposal, wake_model, log_evidence = per_datum(one, model, data, key, batch_size, self.plate,
                                                            self.batch_sharding)
        loss = jnp.mean(wake_proposal) + jnp.mean(wake_model)
        if self.sleep_weight > 0:
            sleeper = model.frozen() if self.plate is None else self.plate.element_model(model.frozen(), 0)
            tokens, observations = sample_joint(self.spec, sleeper, jax.random.fold_in(key, 1), batch_size,
                                             self.batch_sharding)
            loss = loss + self.sleep_weight * forward_kl_loss(network, tokens, observations)
        return loss, {"log_evidence": jnp.mean(log_evidence)}
