"""The objective protocol: a NamedTuple of a pure loss function and what drives it."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from jaxic.errors import JaxicError


class Objective(NamedTuple):
    """A training objective, complete at construction (as an Optax transformation is).

    ``loss(network, model, key, batch_size, data, *, plate=None, sharding=None) -> (loss, metrics)``
    draws what it needs from ``key`` (joint samples, proposal draws, a minibatch of ``data``)
    and returns a scalar loss to minimise and a dict of scalar metrics whose keys are
    ``metrics`` (always with ``"dropped"`` and ``"dropped_site"``: see
    :mod:`jaxic.objectives.finite`). ``network`` is the proposal (its ``spec`` describes the
    traces), ``model`` a :class:`jaxic.tracing.ParameterisedModel`; ``plate``
    (:class:`jaxic.objectives.LocalPlate`) and ``sharding`` (:func:`jaxic.parallel.batch_sharding`)
    are given when the step is built (:func:`jaxic.training.build_step`).

    ``needs_data``: real observations are required; ``trains_model``: the model's own
    parameters are trained (else they stay bit-for-bit as they are); ``options``: the factory's
    keyword arguments, so that ``OBJECTIVES[o.name](**o.options)`` rebuilds it.

    Example:
        >>> objective = jaxic.objectives.elbo(num_particles=4)
        >>> loss, metrics = objective.loss(network, model, key, 32, {"x": rows})
        >>> sorted(metrics) == sorted(objective.metrics)
        True
    """

    name: str
    loss: Callable[..., Any]
    needs_data: bool
    trains_model: bool
    options: dict
    metrics: tuple[str, ...] = ()


def check_positive_int(name: str, value, factory: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise JaxicError(f"{factory}({name}={value!r}): {name} must be a positive integer.")
    return value
