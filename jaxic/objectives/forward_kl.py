"""Inference compilation: forward KL on fresh joint samples."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from jaxic.objectives.base import Objective
from jaxic.objectives.finite import clean, clean_tokens, drop_summary, masked_mean, nonfinite_sites, sample_joint_checked
from jaxic.tracing import Tokens

FORWARD_KL_METRICS = ("log_q", "dropped", "dropped_site")


def forward_kl_loss(network, tokens: Tokens, observations: Mapping[str, jax.Array],
                    log_density_bad: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean of ``-sum_t mask_t log q(x_t | x_<t, y)`` over the finite traces: forward KL up to a constant.

    ``tokens`` and ``observations`` carry a batch axis. A trace with a non-finite executed
    token, observation (or, given ``log_density_bad`` from
    :func:`jaxic.objectives.finite.sample_joint_checked`, log density) is left out and counted.
    Returns ``(loss, {"log_q", "dropped", "dropped_site"})``; the loss is NaN (and the step
    skipped) only when no trace is finite.

    Example:
        >>> loss, metrics = forward_kl_loss(network, tokens, observations)
        >>> int(metrics["dropped"])
        0
    """
    keep, drops = drop_summary(nonfinite_sites(network.spec, tokens, observations, log_density_bad))
    log_q = jnp.sum(jax.vmap(network.log_prob)(clean(observations, keep), clean_tokens(tokens, keep)), axis=-1)
    mean_log_q = masked_mean(log_q, keep)
    return -mean_log_q, {"log_q": mean_log_q, **drops}


def forward_kl() -> Objective:
    """Inference compilation: fresh traces from the joint inside the jitted step, scored by the proposal.

    Needs no data; never trains the model's parameters (its joint samples are drawn from
    the model as it currently is). With a ``plate``, traces are drawn from one element of it.
    Metrics: ``log_q`` (mean log q of the kept traces), ``dropped``, ``dropped_site``.

    Example:
        >>> objective = forward_kl()
        >>> loss, metrics = objective.loss(network, ParameterisedModel(model, {}, {}), key, 64, None)
    """

    def loss(network, model, key, batch_size: int, data=None, *, plate=None, sharding=None):
        joint = model.frozen()
        if plate is not None:
            joint = plate.element_model(joint, 0)
        tokens, observations, bad = sample_joint_checked(network.spec, joint, key, batch_size, sharding)
        return forward_kl_loss(network, tokens, observations, bad)

    return Objective("forward_kl", loss, needs_data=False, trains_model=False, options={},
                     metrics=FORWARD_KL_METRICS)
