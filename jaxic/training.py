"""Functional training core: pure ``init`` and ``step`` returning ``(state, info)``.

The network is split once with ``nnx.split``; its trainable parameters travel
through plain ``jax.jit``/``jax.grad`` and are merged back only inside the step.

The model's own learnable parameters (``numpyro.param``, ``nnx_module``) train in the
same step when the objective trains the model (the ELBO, reweighted wake-sleep); otherwise
they stay bit-for-bit as they are (no update, no weight decay).

Example:
    >>> graphdef, params, stats = nnx.split(network, nnx.Param, Statistic)
    >>> optimizer = guard(default_optimizer(num_steps=1000), trains_model=False)
    >>> state = init(params, stats, optimizer, jax.random.key(0))
    >>> step = jax.jit(build_step(graphdef, forward_kl(), optimizer, batch_size=64, model=model))
    >>> state, info = step(state)
    >>> info.metrics["dropped"]   # non-finite joint draws left out of this step's loss
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxic.errors import JaxicError
from jaxic.objectives import Objective, resolve
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
    # The objective's scalar metrics (keys: Objective.metrics; always "dropped" and "dropped_site").
    metrics: dict = {}


# Metrics that add up over micro-batches (the others are averaged; "dropped_site" is a site index).
_COUNTS = ("dropped",)


def _network_only(trainable):
    """Mask of the (network params, model params) pair: True on the network's side only."""
    if isinstance(trainable, tuple) and len(trainable) == 2:
        params, model_params = trainable
        return (jax.tree.map(lambda _: True, params), jax.tree.map(lambda _: False, model_params))
    return jax.tree.map(lambda _: True, trainable)


def _model_only(trainable):
    params, model_params = trainable
    return (jax.tree.map(lambda _: False, params), jax.tree.map(lambda _: True, model_params))


def warmup_cosine(count, num_steps, learning_rate, warmup_steps=-1):
    """The default learning rate of update number ``count`` (0-based): linear warm-up to
    ``learning_rate`` over ``warmup_steps`` updates (``-1``: ``min(200, num_steps // 10)``, at least
    1), then cosine decay that reaches 5% of the peak exactly at the last update, ``num_steps - 1``
    (and stays there). ``num_steps <= 0``: no horizon, the peak rate after warm-up (default 100).
    In float32, with ``jnp`` when any argument is a JAX array (traced ones too, so a horizon held in
    the optimizer state can change without recompiling), else with NumPy (cheap on the host).

    Example:
        >>> warmup_cosine(999, 1000, 1e-3)   # the last of 1000 steps: 5% of the peak, 5e-05
    """
    xp = jnp if any(isinstance(a, jax.Array) for a in (count, num_steps, learning_rate, warmup_steps)) else np
    f32 = xp.float32
    count, n, peak = (xp.asarray(a, f32) for a in (count, num_steps, learning_rate))
    auto = xp.where(n > 0, xp.clip(xp.floor(n / f32(10)), 1, 200), f32(100)).astype(f32)
    given = xp.asarray(warmup_steps, f32)
    warmup = xp.where(given < 0, auto, xp.maximum(given, f32(1)))
    warm = peak * xp.minimum(f32(1), (count + 1) / warmup)
    # From the peak at update warmup - 1 down to the end value at update n - 1.
    progress = xp.clip((count - warmup + 1) / xp.maximum(n - warmup, f32(1)), f32(0), f32(1))
    end = f32(0.05) * peak
    decayed = end + (peak - end) * f32(0.5) * (1 + xp.cos(f32(np.pi) * progress))
    return xp.where((count < warmup) | (n <= 0), warm, decayed)


def _scheduled_adamw(learning_rate, num_steps, warmup_steps, clip_norm, weight_decay, mask):
    def schedule(count):
        return warmup_cosine(count, num_steps, learning_rate, warmup_steps)

    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(schedule, weight_decay=weight_decay, mask=mask))


DEFAULT_WEIGHT_DECAY = 1e-4


def default_optimizer(num_steps: int, learning_rate: float = 3e-3, warmup_steps: int | None = None,
                      clip_norm: float = 1.0, weight_decay: float = DEFAULT_WEIGHT_DECAY,
                      decay_model_params: bool = False) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay to 5% of the peak at step ``num_steps``
    (:func:`warmup_cosine`).

    ``num_steps=0`` (no planned horizon) keeps the peak rate after warm-up. Weight decay applies
    to the network's parameters only, unless ``decay_model_params=True`` (the model's own
    ``numpyro.param`` values are estimates, not weights to shrink). The horizon, peak rate and
    warm-up are hyperparameters in the optimizer state (``optax.inject_hyperparams``):
    :func:`set_num_steps` refits the schedule to another horizon without recompiling the step.

    Example:
        >>> optimizer = default_optimizer(num_steps=3000, learning_rate=1e-3)
    """
    decay_mask = None if decay_model_params else _network_only
    return optax.inject_hyperparams(_scheduled_adamw, static_args=("clip_norm", "weight_decay", "mask"))(
        # Strongly typed, so that a value set later (set_num_steps) has the same type: no recompilation.
        learning_rate=jnp.asarray(learning_rate, jnp.float32), num_steps=jnp.asarray(num_steps, jnp.int32),
        warmup_steps=jnp.asarray(-1 if warmup_steps is None else warmup_steps, jnp.int32),
        clip_norm=clip_norm, weight_decay=weight_decay, mask=decay_mask)


def schedule_hyperparams(opt_state) -> dict | None:
    """``{"learning_rate", "num_steps", "warmup_steps"}`` of a :func:`default_optimizer` state (also
    inside :func:`guard`), as Python numbers; None for an optimizer without them (a custom one).

    Example:
        >>> schedule_hyperparams(state.opt_state)["num_steps"]
        2000
    """
    values = {name: optax.tree_utils.tree_get(opt_state, name) for name in ("learning_rate", "num_steps",
                                                                              "warmup_steps")}
    if any(v is None for v in values.values()):
        return None
    return {name: (float if name == "learning_rate" else int)(jax.device_get(v)) for name, v in values.items()}


def set_num_steps(opt_state, num_steps: int):
    """The :func:`default_optimizer` state ``opt_state`` with its schedule fitted to ``num_steps``
    updates in all (counted from the first): same shapes and dtypes, so the jitted step does not
    recompile (on a device mesh, replicate the result again). A :class:`JaxicError` for a state
    without that hyperparameter.

    Example:
        >>> state = state._replace(opt_state=set_num_steps(state.opt_state, 5000))
    """
    old = optax.tree_utils.tree_get(opt_state, "num_steps")
    if old is None:
        raise JaxicError("set_num_steps needs the state of jaxic.training.default_optimizer (a custom optimizer "
                         "has no schedule horizon to refit); build the optimizer with default_optimizer.")
    return optax.tree_utils.tree_set(opt_state, num_steps=jnp.asarray(int(num_steps), old.dtype))


def guard(optimizer: optax.GradientTransformation, trains_model: bool = True) -> optax.GradientTransformation:
    """Wrap an optimizer so that updates with non-finite gradients are skipped.

    With ``trains_model=False`` the model's parameters (second half of the ``(params,
    model_params)`` pair the training state optimises) get a zero update: no step and no weight
    decay. Give the same wrapped optimizer to :func:`init` and :func:`build_step`.

    Example:
        >>> optimizer = guard(default_optimizer(1000), trains_model=forward_kl().trains_model)
    """
    if not trains_model:
        optimizer = optax.chain(optimizer, optax.masked(optax.set_to_zero(), _model_only))
    return optax.apply_if_finite(optimizer, max_consecutive_errors=_MAX_CONSECUTIVE_NONFINITE)


def init(params, statistics, optimizer: optax.GradientTransformation, key: jax.Array,
         model_params: Any = None) -> TrainState:
    """Initial training state. ``optimizer`` must be the one given to :func:`build_step`.

    ``model_params``: the model's learnable parameters in unconstrained space
    (:func:`jaxic.tracing.find_model_params`), optimised jointly with the network.

    Example:
        >>> state = init(params, statistics, optimizer, jax.random.key(0), model_params)
    """
    # Strong types: a weakly typed initial value (numpyro.param("theta", 0.3)) would come back
    # strongly typed from the first update and make the jitted step trace a second time.
    model_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.result_type(x)), {} if model_params is None else model_params)
    return TrainState(params, statistics, optimizer.init((params, model_params)), jnp.zeros((), jnp.int32), key,
                      model_params)


def _update(optimizer, state: TrainState, loss, grads, key, metrics, trains_model: bool) -> tuple[TrainState, TrainInfo]:
    grad_norm = optax.tree.norm(grads)
    trainable = (state.params, state.model_params)
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    new = optax.apply_updates(trainable, updates)
    skipped = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    # apply_if_finite already zeroes the update; also keep the old params bit-for-bit.
    params, model_params = jax.tree.map(lambda n, o: jnp.where(skipped, o, n), new, trainable)
    if not trains_model:  # whatever the optimizer does (e.g. weight decay), the model stays as it is
        model_params = state.model_params
    new_state = TrainState(params, state.statistics, opt_state, state.step + 1, key, model_params)
    return new_state, TrainInfo(loss, grad_norm, skipped, metrics)


def combine_metrics(metrics: dict) -> dict:
    """One step's metrics from per-slice ones (leading axis: micro-batches): counts add up,
    ``dropped_site`` is that of the slice that dropped most, the rest are averaged.

    Example:
        >>> combine_metrics({"dropped": jnp.array([1, 0]), "dropped_site": jnp.array([2, -1])})["dropped_site"]
        Array(2, dtype=int32)
    """
    out = {}
    for name, value in metrics.items():
        if name in _COUNTS:
            out[name] = jnp.sum(value, axis=0).astype(value.dtype)
        elif name == "dropped_site":
            most = jnp.argmax(metrics["dropped"]) if "dropped" in metrics else jnp.argmax(value)
            out[name] = value[most]
        else:
            out[name] = jnp.mean(value, axis=0)
    return out


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


def build_step(graphdef, objective: Objective | str, optimizer: optax.GradientTransformation, batch_size: int,
               model: Callable | None = None, param_constraints: dict | None = None,
               microbatch_size: int | None = None, *, plate=None,
               sharding=None) -> Callable[..., tuple[TrainState, TrainInfo]]:
    """One optimisation step of ``objective``; pure, so jit, scan or shard it freely.

    Calls ``objective.loss(network, model, key, batch_size, data, plate=plate, sharding=sharding)``
    where ``model`` is a :class:`jaxic.tracing.ParameterisedModel` carrying the state's model
    parameters. ``step(state)`` or, for objectives that read real data, ``step(state, data)``;
    it returns ``(state, TrainInfo)`` with the objective's metrics. ``optimizer`` should be
    wrapped with :func:`guard` (``init`` must use the same object). ``plate`` (a
    :class:`jaxic.objectives.LocalPlate`) amortizes over one plate's elements; ``sharding`` (from
    :func:`jaxic.parallel.batch_sharding`) splits the batch over devices. When
    ``objective.trains_model`` is False the model's parameters are never changed.

    ``microbatch_size`` (dividing ``batch_size``): the batch is drawn and differentiated in
    ``batch_size // microbatch_size`` slices of that size, one after another in a ``lax.scan``, and
    their mean loss and gradient make one update. Activations then scale with the micro-batch, not
    the batch: long traces fit in memory, and on CPUs the per-slice matrices stay in cache (see
    ``benchmarks/RESULTS.md``). Objectives are means over the batch, so the update is that of the
    whole batch in distribution (the slices draw their traces with keys of their own).

    Example:
        >>> step = jax.jit(build_step(graphdef, forward_kl(), optimizer, batch_size=64, model=model,
        ...                           microbatch_size=16))
    """
    objective = resolve(objective)
    constraints = dict(param_constraints or {})
    num_slices = num_microbatches(batch_size, microbatch_size)
    micro = batch_size // num_slices

    def loss_fn(trainable, statistics, key, data):
        params, model_params = trainable
        network = nnx.merge(graphdef, params, statistics)
        return objective.loss(network, ParameterisedModel(model, model_params, constraints), key, micro, data,
                              plate=plate, sharding=sharding)

    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

    def loss_and_grads(trainable, statistics, key, data):
        if num_slices == 1:
            (loss, metrics), grads = value_and_grad(trainable, statistics, key, data)
            return loss, grads, metrics

        def accumulate(total, slice_key):
            (loss, metrics), grads = value_and_grad(trainable, statistics, slice_key, data)
            return jax.tree.map(jnp.add, total, (loss, grads)), metrics

        keys = jax.random.split(key, num_slices)
        (loss_shape, _), grad_shapes = jax.eval_shape(value_and_grad, trainable, statistics, keys[0], data)
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_shape, grad_shapes))
        total, metrics = jax.lax.scan(accumulate, zero, keys)
        loss, grads = jax.tree.map(lambda x: x / num_slices, total)
        return loss, grads, combine_metrics(metrics)

    def step(state: TrainState, data=None) -> tuple[TrainState, TrainInfo]:
        key, step_key = jax.random.split(state.key)
        trainable = (state.params, state.model_params)
        loss, grads, metrics = loss_and_grads(trainable, state.statistics, step_key, data)
        return _update(optimizer, state, loss, grads, key, metrics, objective.trains_model)

    return step


def build_evaluation(graphdef, objective: Objective | str, batch_size: int, model: Callable,
                     param_constraints: dict | None = None, *, plate=None) -> Callable[..., jax.Array]:
    """``objective``'s loss at the state as it is now, with a key given from outside:
    ``evaluate(state, key, data=None) -> loss``. Pure (jit it); nothing is trained. With a fixed
    key, successive values differ only through the parameters, so they are comparable over
    training; the model's current parameters are used, so what is measured moves with the model.

    Example:
        >>> evaluate = jax.jit(build_evaluation(graphdef, elbo(), 1024, model, constraints, plate=plate))
        >>> negative_elbo = evaluate(state, jax.random.key(7), data)
    """
    objective = resolve(objective)
    constraints = dict(param_constraints or {})

    def evaluate(state: TrainState, key: jax.Array, data=None) -> jax.Array:
        network = nnx.merge(graphdef, state.params, state.statistics)
        loss, _ = objective.loss(network, ParameterisedModel(model, state.model_params, constraints), key,
                                 batch_size, data, plate=plate)
        return loss

    return evaluate


def _loss_and_metrics(out) -> tuple[jax.Array, dict]:
    return out if isinstance(out, tuple) else (out, {})


def build_batch_step(graphdef, loss_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """One optimisation step on a batch given from outside: ``step(state, *batch) -> (state, info)``.

    For traces that cannot be drawn inside the jitted step: eager (universal) models and
    offline datasets. ``loss_fn(network, *batch)`` returns ``(loss, metrics)`` (or a scalar
    loss), e.g. :func:`jaxic.objectives.forward_kl_loss`. The model's parameters are not trained.

    Example:
        >>> step = jax.jit(build_batch_step(graphdef, forward_kl_loss, optimizer))
        >>> state, info = step(state, tokens, observations)
    """

    def loss_of(trainable, statistics, *batch):
        return _loss_and_metrics(loss_fn(nnx.merge(graphdef, trainable[0], statistics), *batch))

    def step(state: TrainState, *batch) -> tuple[TrainState, TrainInfo]:
        key, _ = jax.random.split(state.key)
        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(
            (state.params, state.model_params), state.statistics, *batch)
        return _update(optimizer, state, loss, grads, key, metrics, trains_model=False)

    return step


def build_multi_step(step: Callable, chunk: int) -> Callable:
    """``chunk`` steps in one compiled call; only the first ``num_active`` are applied.

    ``num_active`` is a traced argument, so a final partial chunk reuses the same compilation.
    Inactive steps report NaN for float entries of the info (loss, metrics), -1 for integer ones
    (``dropped``, ``dropped_site``) and ``skipped=False``.

    Example:
        >>> multi = jax.jit(build_multi_step(step, chunk=25))
        >>> state, infos = multi(state, 10)        # infos.loss[:10] are the applied steps
    """

    def multi(state: TrainState, num_active, data=None):
        return build_indexed_multi_step(lambda s, i: step(s, data), chunk)(state, num_active)

    return multi


def build_indexed_multi_step(step_at: Callable, chunk: int) -> Callable:
    """Like :func:`build_multi_step`, with step ``i`` of the chunk being ``step_at(state, i)`` (e.g. a step on the
    ``i``-th batch of indices into data held on the device).

    Example:
        >>> multi = jax.jit(lambda state, n, idx: build_indexed_multi_step(
        ...     lambda s, i: batch_step(s, *gather(idx[i])), 25)(state, n))
    """

    def multi(state: TrainState, num_active):
        shapes = jax.eval_shape(step_at, state, 0)[1]

        def filler(s):
            if s.dtype == jnp.bool_:
                return jnp.zeros(s.shape, s.dtype)
            return jnp.full(s.shape, jnp.nan if jnp.issubdtype(s.dtype, jnp.inexact) else -1, s.dtype)

        def idle(state: TrainState, i) -> tuple[TrainState, TrainInfo]:
            return state, jax.tree.map(filler, shapes)

        def body(state, i):
            return jax.lax.cond(i < num_active, step_at, idle, state, i)

        return jax.lax.scan(body, state, jnp.arange(chunk))

    return multi


def evaluate(loss_fn: Callable, graphdef, params, statistics, *batch) -> jax.Array:
    """A loss (e.g. :func:`jaxic.objectives.forward_kl_loss`) on a fixed batch, such as validation traces.

    Example:
        >>> validation_loss = evaluate(forward_kl_loss, graphdef, params, statistics, tokens, observations)
    """
    return _loss_and_metrics(loss_fn(nnx.merge(graphdef, params, statistics), *batch))[0]
