"""Helpers for writing stochastic control flow so that a model stays jittable.

A model whose structure depends on sampled values runs every *potential* site and
masks the ones that did not execute (``numpyro.handlers.mask``). jaxic reads the
masks into its traces, so the proposal, ``log q`` and ``log p`` ignore masked sites.
The idioms, all of which jaxic supports on its fast (jitted) path:

* a branch: ``with handlers.mask(mask=b == 1): numpyro.sample("x", ...)``, or
  ``numpyro.contrib.control_flow.cond(pred, true_fun, false_fun, operand)``;
* a random number of objects up to a bound:
  ``with numpyro.plate("objects", K), handlers.mask(mask=jnp.arange(K) < n): ...``;
* a time series: sites inside ``numpyro.contrib.control_flow.scan``;
* a loop that runs until a condition holds: :func:`bounded_while` and
  :func:`rejection_sample` below (the loop is unrolled to ``max_iterations``).

Models with Python ``if``/``while`` on sampled values cannot be jitted; jaxic runs
them on its universal (eager) path instead.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from numpyro import handlers


def bounded_while(name: str, cond_fn: Callable[[Any], jax.Array], body_fn: Callable[[int, Any], Any],
                  init: Any, max_iterations: int) -> tuple[Any, jax.Array]:
    """``while cond_fn(state): state = body_fn(i, state)``, at most ``max_iterations`` times.

    Every iteration's sample sites are named ``"{name}[{i}]/<site>"`` and masked out
    once the loop has ended, so traces of different lengths share one layout. Returns
    the final state and whether the loop ended by itself (False if it hit the bound).

    Example:
        >>> def body(i, total):
        ...     return total + numpyro.sample("step", dist.Exponential(1.0))
        >>> total, ended = bounded_while("walk", lambda t: t < 3.0, body, jnp.zeros(()), 20)
    """
    state = init
    running = jnp.asarray(cond_fn(state), bool)
    for i in range(max_iterations):
        with handlers.scope(prefix=f"{name}[{i}]", divider="/"), handlers.mask(mask=running):
            candidate = body_fn(i, state)
        state = jax.tree.map(lambda new, old: jnp.where(running, new, old), candidate, state)
        running = running & jnp.asarray(cond_fn(state), bool)
    return state, ~running


def rejection_sample(name: str, propose_fn: Callable[[], Any], accept_fn: Callable[[Any], jax.Array],
                     max_attempts: int) -> tuple[Any, jax.Array]:
    """Repeat ``propose_fn()`` until ``accept_fn(value)`` holds, at most ``max_attempts`` times.

    Attempt ``i`` samples its sites as ``"{name}[{i}]/<site>"``; attempts after the
    accepted one are masked out. Returns the last attempted value and whether it was
    accepted. Choose ``max_attempts`` so that running out is negligible.

    Example:
        >>> x, accepted = rejection_sample("x", lambda: numpyro.sample("v", dist.Normal(0, 1)),
        ...                                lambda v: v > 0, max_attempts=12)
    """
    first = None

    def body(i, state):
        value, _ = state
        value = propose_fn()
        return value, jnp.asarray(accept_fn(value), bool)

    # The state must have the value's structure before the first attempt: take it from a shape-only run.
    with handlers.block():
        first = jax.eval_shape(lambda: handlers.seed(propose_fn, 0)())
    init = (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first), jnp.zeros((), bool))
    (value, accepted), _ = bounded_while(name, lambda s: ~s[1], body, init, max_attempts)
    return value, accepted
