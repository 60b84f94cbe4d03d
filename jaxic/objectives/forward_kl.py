"""Inference compilation: forward KL on fresh joint samples."""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

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
    """Objective: fresh traces from the joint inside the jitted step, scored by the proposal.

    Example:
        >>> objective = ForwardKL(spec, model)
        >>> loss, metrics = objective(network, key, batch_size=64)
    """

    spec: TraceSpec
    model: Callable

    def __call__(self, network, key, batch_size: int):
        tokens, observations = sample_joint(self.spec, self.model, key, batch_size)
        return forward_kl_loss(network, tokens, observations), {}
