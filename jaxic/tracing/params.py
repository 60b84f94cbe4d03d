"""The model's own learnable parameters (``numpyro.param``, ``numpyro.contrib.module``).

They are found by running the model once, kept in unconstrained space (``biject_to``
of each site's constraint) and substituted back into the model on every run, so a
proposal and the model's parameters train together through plain ``jax.grad``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to

from jaxic.tracing.spec import JIT_FAILURES


def find_model_params(model: Callable, key: jax.Array | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(unconstrained initial values, constraints)`` of every ``numpyro.param`` site of the model.

    Sites from ``numpyro.contrib.module`` (``nnx_module``, ``flax_module``) hold pytrees of
    unconstrained arrays and are returned as they are.

    Example:
        >>> values, constraints = find_model_params(functools.partial(vae, num_data=1000))
        >>> sorted(values)   # ['decoder$params']
    """
    key = jax.random.key(0) if key is None else key

    def initial(k):
        trace = handlers.trace(handlers.seed(model, k)).get_trace()
        found = {name: site for name, site in trace.items() if site["type"] == "param"}
        support.update({name: site["kwargs"].get("constraint", constraints.real) for name, site in found.items()})
        return {name: jax.tree.map(biject_to(support[name]).inv, site["value"]) for name, site in found.items()}

    support: dict[str, Any] = {}
    try:
        # One compiled run rather than an eager one: eager runs compile every operation of the model separately.
        values = jax.jit(initial)(key)
    except JIT_FAILURES:  # Python control flow on sampled values (the universal path): run it eagerly
        support.clear()
        values = initial(key)
    return values, support


@dataclasses.dataclass(frozen=True)
class ParameterisedModel:
    """A model with its learnable parameters substituted (constrained on the way in).

    Objectives receive one: calling it runs the model; :meth:`frozen` gives the same model
    with the parameters behind ``stop_gradient``, for terms that must not train the model
    (e.g. the forward KL on joint samples).

    Example:
        >>> bound = ParameterisedModel(model, params, constraints)
        >>> trace = handlers.trace(handlers.seed(bound, 0)).get_trace()
    """

    model: Callable
    params: Mapping[str, Any]
    constraints: Mapping[str, Any]

    def constrained(self) -> dict[str, Any]:
        return {name: jax.tree.map(biject_to(self.constraints[name]), value) for name, value in self.params.items()}

    def __call__(self, *args, **kwargs):
        if not self.params:
            return self.model(*args, **kwargs)
        return handlers.substitute(self.model, data=self.constrained())(*args, **kwargs)

    def frozen(self) -> "ParameterisedModel":
        return dataclasses.replace(self, params=jax.lax.stop_gradient(self.params))
