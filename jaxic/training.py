"""Functional training core: pure ``init`` and ``step`` returning ``(state, info)``.

The network is split once with ``nnx.split``; its trainable parameters travel
through plain ``jax.jit``/``jax.grad`` and are merged back only inside the step.

The model's own learnable parameters (``numpyro.param``, ``nnx_module``) train in the
same step when the objective trains the model (the ELBO, reweighted wake-sleep).

Example:
    >>> graphdef, params, stats = nnx.split(network, nnx.Param, Statistic)
    >>> optimizer = guard(default_optimizer(num_steps=1000))
    >>> state = init(params, stats, optimizer, jax.random.key(0))
    >>> step = jax.jit(build_step(graphdef, ForwardKL(spec), optimizer, batch_size=64, model=model))
    >>> state, info = step(state)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxic.errors import JaxicError
from jaxic.tracing.params import ParameterisedModel

# Far above any real run: non-finite steps are skipped and counted, never applied.
_MAX_CONSECUTIVE_NONFINITE = 2**30


class TrainState(NamedTuple):
    params: Any  # nnx.State of nnx.Param (optimised)
    statistics: Any  # nnx.State of everything else (moments of joint samples; not optimised)
    opt_state: Any
    step: jax.Array
    key: jax.Array
    model_params: Any = None  # the model's numpyro.param values, unconstrained ({} when it has none)


class TrainInfo(NamedTuple):
    loss: jax.Array
    grad_norm: jax.Array
    skipped: jax.Array  # True where the loss or gradient was not finite and the update was dropped


def default_optimizer(num_steps: int, learning_rate: float = 3e-3, warmup_steps: int | None = None,
                      clip_norm: float = 1.0) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay to 5% of the peak over ``num_steps``.

    ``num_steps=0`` (no planned horizon) keeps the peak rate after warm-up.

    Example:
        >>> optimizer = default_optimizer(num_steps=3000, learning_rate=1e-3)
    """
    if num_steps <= 0:
        warmup = 100 if warmup_steps is None else warmup_steps
        schedule = optax.linear_schedule(0.0, learning_rate, max(warmup, 1))
        return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=1e-4))
    warmup = min(200, max(num_steps // 10, 1)) if warmup_steps is None else warmup_steps
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1), end_value=0.05 * learning_rate)
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=1e-4))


def guard(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """Wrap an optimizer so that updates with non-finite gradients are skipped."""
    return optax.apply_if_finite(optimizer, max_consecutive_errors=_MAX_CONSECUTIVE_NONFINITE)


def init(params, statistics, optimizer: optax.GradientTransformation, key: jax.Array,
         model_params: Any = None) -> TrainState:
    """Initial training state. ``optimizer`` must be the one given to :func:`build_step`.

    ``model_params``: the model's learnable parameters in unconstrained space
    (:func:`jaxic.tracing.find_model_params`), optimised jointly with the network.
    """
    model_params = {} if model_params is None else model_params
    return TrainState(params, statistics, optimizer.init((params, model_params)), jnp.zeros((), jnp.int32), key,
                      model_params)


def _update(optimizer, state: TrainState, loss, grads, key) -> tuple[TrainState, TrainInfo]:
    grad_norm = optax.tree.norm(grads)
    trainable = (state.params, state.model_params)
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    new = optax.apply_updates(trainable, updates)
    skipped = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    # apply_if_finite already zeroes the update; also keep the old params bit-for-bit.
    params, model_params = jax.tree.map(lambda n, o: jnp.where(skipped, o, n), new, trainable)
    new_state = TrainState(params, state.statistics, opt_state, state.step + 1, key, model_params)
    return new_state, TrainInfo(loss, grad_norm, skipped)


def num_microbatches(batch_size: int, microbatch_size: int | None) -> int:
    """How many slices ``microbatch_size`` cuts a batch into (1 for ``None``); a clear error unless it divides.

    Example:
        >>> num_microbatches(64, 16)
        4
    """
    if microbatch_size is None:
        return 1
    if microbatch_size < 1 or batch_size % microbatch_size:
        divisors = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
        raise JaxicError(f"microbatch_size={microbatch_size} must be a positive divisor of batch_size={batch_size}, "
                         f"such as {divisors[-6:]}.")
    return batch_size // microbatch_size


def build_step(graphdef, objective: Callable, optimizer: optax.GradientTransformation, batch_size: int,
               model: Callable | None = None, param_constraints: dict | None = None,
               microbatch_size: int | None = None) -> Callable[..., tuple[TrainState, TrainInfo]]:
    """One optimisation step of ``objective``; pure, so jit, scan or shard it freely.

    The objective is called as ``objective(network, model, key, batch_size, data)`` where
    ``model`` is a :class:`jaxic.tracing.ParameterisedModel` carrying the state's model
    parameters. ``step(state)`` or, for objectives that read real data, ``step(state, data)``.
    ``optimizer`` should be wrapped with :func:`guard` (``init`` must use the same object).

    ``microbatch_size`` (dividing ``batch_size``): the batch is drawn and differentiated in
    ``batch_size // microbatch_size`` slices of that size, one after another in a ``lax.scan``, and
    their mean loss and gradient make one update. Activations then scale with the micro-batch, not
    the batch: long traces fit in memory, and on CPUs the per-slice matrices stay in cache (see
    ``benchmarks/RESULTS.md``). Objectives are means over the batch, so the update is that of the
    whole batch in distribution (the slices draw their traces with keys of their own).

    Example:
        >>> step = jax.jit(build_step(graphdef, ForwardKL(spec), optimizer, batch_size=64, model=model,
        ...                           microbatch_size=16))
    """
    constraints = dict(param_constraints or {})
    num_slices = num_microbatches(batch_size, microbatch_size)
    micro = batch_size // num_slices

    def loss_fn(trainable, statistics, key, data):
        params, model_params = trainable
        network = nnx.merge(graphdef, params, statistics)
        loss, _ = objective(network, ParameterisedModel(model, model_params, constraints), key, micro, data)
        return loss

    def loss_and_grads(trainable, statistics, key, data):
        if num_slices == 1:
            return jax.value_and_grad(loss_fn)(trainable, statistics, key, data)

        def accumulate(total, slice_key):
            part = jax.value_and_grad(loss_fn)(trainable, statistics, slice_key, data)
            return jax.tree.map(jnp.add, total, part), None

        keys = jax.random.split(key, num_slices)
        shapes = jax.eval_shape(jax.value_and_grad(loss_fn), trainable, statistics, keys[0], data)
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        total, _ = jax.lax.scan(accumulate, zero, keys)
        return jax.tree.map(lambda x: x / num_slices, total)

    def step(state: TrainState, data=None) -> tuple[TrainState, TrainInfo]:
        key, step_key = jax.random.split(state.key)
        trainable = (state.params, state.model_params)
        loss, grads = loss_and_grads(trainable, state.statistics, step_key, data)
        return _update(optimizer, state, loss, grads, key)

    return step


def build_batch_step(graphdef, loss_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """One optimisation step on a batch given from outside: ``step(state, *batch) -> (state, info)``.

    For traces that cannot be drawn inside the jitted step: eager (universal) models and
    offline datasets. ``loss_fn(network, *batch)``, e.g. :func:`jaxic.objectives.forward_kl_loss`.

    Example:
        >>> step = jax.jit(build_batch_step(graphdef, forward_kl_loss, optimizer))
        >>> state, info = step(state, tokens, observations)
    """

    def loss_of(trainable, statistics, *batch):
        return loss_fn(nnx.merge(graphdef, trainable[0], statistics), *batch)

    def step(state: TrainState, *batch) -> tuple[TrainState, TrainInfo]:
        key, _ = jax.random.split(state.key)
        loss, grads = jax.value_and_grad(loss_of)((state.params, state.model_params), state.statistics, *batch)
        return _update(optimizer, state, loss, grads, key)

    return step


def build_multi_step(step: Callable, chunk: int) -> Callable:
    """``chunk`` steps in one compiled call; only the first ``num_active`` are applied.

    ``num_active`` is a traced argument, so a final partial chunk reuses the same compilation.
    """

    def idle(state: TrainState, data) -> tuple[TrainState, TrainInfo]:
        nan = jnp.full((), jnp.nan)
        return state, TrainInfo(nan, nan, jnp.zeros((), bool))

    def multi(state: TrainState, num_active, data=None):
        def body(state, i):
            return jax.lax.cond(i < num_active, step, idle, state, data)

        return jax.lax.scan(body, state, jnp.arange(chunk))

    return multi


def evaluate(loss_fn: Callable, graphdef, params, statistics, *batch) -> jax.Array:
    """A loss (e.g. :func:`jaxic.objectives.forward_kl_loss`) on a fixed batch, such as validation traces."""
    return loss_fn(nnx.merge(graphdef, params, statistics), *batch)
