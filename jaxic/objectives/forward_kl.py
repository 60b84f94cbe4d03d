"""Inference compilation: forward KL on fresh joint samples."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxic.tracing import Tokens, TraceSpec, sample_joint


def forward_kl_loss(network, tokens: Tokens, observations: Mapping[str, jax.Array]) -> jax.Array:
    """Batch mean of ``-sum_t mask_t log q(x_t | x_<t, y)``: forward KL up to a constant.

    Example:
        >>> loss = forward_kl_loss(network, tokens, observations)   # tokens with a batch axis
    """
    return -jnp.mean(jnp.sum(jax.vmap(network.log_prob)(observations, tokens), axis=-1))


@dataclasses.dataclass(frozen=True)
class ForwardKL:
    """Inference compilation: fresh traces from the joint inside the jitted step, scored by the proposal.

    Needs no data; never trains the model's parameters (its joint samples are drawn from
    the model as it currently is).

    Example:
        >>> objective = ForwardKL(spec=spec)
        >>> loss, metrics = objective(network, ParameterisedModel(model, {}, {}), key, 64, None)
    """

    spec: TraceSpec | None = None  # filled in by jaxic.compile
    batch_sharding: Any = None  # jaxic.parallel.batch_sharding: traces split over devices (jaxic.compile devices=)
    needs_data = False
    trains_model = False

    def __call__(self, network, model, key, batch_size: int, data=None):
        tokens, observations = sample_joint(self.spec, model.frozen(), key, batch_size, self.batch_sharding)
        return forward_kl_loss(network, tokens, observations), {}
