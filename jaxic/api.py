"""The convenience layer: ``jaxic.compile``, :class:`CompiledModel`, ``jaxic.load``.

Everything here is a thin shell over the functional core in ``jaxic.training``,
``jaxic.objectives`` and ``jaxic.inference``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jaxic import checkpoint, parallel, training
from jaxic.errors import CheckpointError, JaxicError, ModelError, ObservationError, UntraceableModelError
from jaxic.heads import head_for_site
from jaxic.inference import Posterior, importance_sample
from jaxic.inference.importance import EagerDecoder, importance_sample_eager
from jaxic.networks import NETWORKS, FeedForwardConfig, ProposalStatistics, TransformerConfig, proposal_statistics
from jaxic import objectives
from jaxic.objectives import OBJECTIVES, LocalPlate, forward_kl_loss
from jaxic.tracing import (ParameterisedModel, abstract_trace, TraceDataset, TraceSpec, derive_trace_spec, derive_universal_spec,
                           find_model_params, sample_joint, sample_universal)

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How the proposal is trained; saved with checkpoints so a resumed run continues identically."""

    num_steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 3e-3
    validation_size: int = 1024
    statistics_size: int = 4096
    steps_per_call: int = 25
    validation_every: int = 250
    custom_optimizer: bool = False
    microbatch_size: int | None = None


def _bind(model: Callable, model_args: Sequence, model_kwargs: Mapping | None) -> Callable:
    return functools.partial(model, *tuple(model_args), **dict(model_kwargs or {}))


class CompiledModel:
    """A trained proposal for one model: train more, infer, save.

    Create it with :func:`jaxic.compile` or :func:`jaxic.load`.

    Example:
        >>> compiled = jaxic.compile(model, observed=["obs"], key=jax.random.key(0), num_steps=3000)
        >>> post = compiled.posterior(jax.random.key(1), {"obs": 25.0}, num_samples=10_000)
        >>> compiled.train(1000)          # continue training exactly where it stopped
        >>> compiled.save("proposal_ckpt/")
    """

    def __init__(self, model, model_args, model_kwargs, spec: TraceSpec, network_config, train_config: TrainConfig,
                 network, optimizer: optax.GradientTransformation, key: jax.Array, validation,
                 dataset: TraceDataset | None = None, objective=None, data: Mapping | None = None,
                 plate: LocalPlate | None = None, model_params: Mapping | None = None,
                 param_constraints: Mapping | None = None, devices: Any = None):
        # ``key`` is the key given to compile: it determines the training keys and the validation set.
        self.model = model
        self.model_args = tuple(model_args)
        self.model_kwargs = dict(model_kwargs or {})
        self._full_model = _bind(model, model_args, model_kwargs)
        self.plate = plate
        # With local amortization the proposal (and inference) sees one element of the plate.
        self._bound = plate.element_model(self._full_model, 0) if plate is not None else self._full_model
        self.param_constraints = dict(param_constraints or {})
        self.objective = objectives.resolve(objective)
        self.data = None if data is None else {k: jnp.asarray(v, jnp.float32) for k, v in data.items()}
        self.spec = spec
        self.network_config = network_config
        self.train_config = train_config
        self.graphdef, params, statistics = nnx.split(network, nnx.Param, ...)
        self.optimizer = training.guard(optimizer, trains_model=self.objective.trains_model)
        self.compile_key = key
        self.state = training.init(params, statistics, self.optimizer, jax.random.split(key, 4)[3], model_params)
        self.validation = validation
        self.history: dict[str, list] = {"loss": [], "validation_step": [], "validation_loss": [], "skipped": []}
        self.dataset = dataset
        self._batches = None
        self._setup_devices(devices)
        if self.path == "masked":
            # The objective picks plate elements itself (data objectives) or trains on one element.
            step = training.build_step(self.graphdef, self.objective, self.optimizer, train_config.batch_size,
                                       self._full_model, self.param_constraints, train_config.microbatch_size,
                                       plate=self.plate, sharding=self.batch_sharding)
            placement = {} if self.mesh is None else {"out_shardings": parallel.replicated(self.mesh)}
            self._multi_step = jax.jit(training.build_multi_step(step, train_config.steps_per_call), **placement)
        else:
            if train_config.microbatch_size is not None:
                raise JaxicError(f"microbatch_size works on the masked path only; this model takes the {self.path} "
                                 "path. Drop microbatch_size (or lower batch_size).")
            self._batch_step = jax.jit(training.build_batch_step(self.graphdef, forward_kl_loss, self.optimizer))
        self._validate = jax.jit(functools.partial(training.evaluate, forward_kl_loss, self.graphdef))
        self._samplers: dict[tuple[int, bool], Callable] = {}
        self._eager_decoder = EagerDecoder(self.graphdef, spec) if spec.dynamic else None

    def _setup_devices(self, devices) -> None:
        """Data parallelism (``devices=``): batch split over a mesh, everything else replicated on it."""
        devices = parallel.resolve_devices(devices)
        self.mesh = None if devices is None else parallel.data_mesh(devices)
        self.batch_sharding = None
        if self.mesh is None:
            return
        if self.path != "masked":
            raise JaxicError(f"devices= trains on several devices on the masked path only; this model takes the "
                             f"{self.path} path. Drop devices= (or make the model jit: see jaxic.control_flow).")
        parallel.check_divisible(self.train_config.batch_size, self.mesh, "batch_size")
        if self.train_config.microbatch_size is not None:
            parallel.check_divisible(self.train_config.microbatch_size, self.mesh, "microbatch_size")
        self.batch_sharding = parallel.batch_sharding(self.mesh)
        self.state = parallel.replicate(self.state, self.mesh)
        self.validation = parallel.replicate(self.validation, self.mesh)
        if self.data is not None:
            self.data = parallel.replicate(self.data, self.mesh)

    @property
    def path(self) -> str:
        """How traces reach training: ``"masked"`` (jitted, vmapped model runs), ``"universal"``
        (eager model runs, for Python control flow) or ``"dataset"`` (an offline trace dataset)."""
        if self.dataset is not None:
            return "dataset"
        return "universal" if self.spec.dynamic else "masked"

    # ------------------------------------------------------------------------------------------
    @property
    def network(self):
        """The proposal network as an ``nnx.Module`` (a fresh merge of the current parameters)."""
        return nnx.merge(self.graphdef, self.state.params, self.statistics)

    @property
    def statistics(self):
        """Non-trainable network state (moments of the joint samples)."""
        return self.state.statistics

    @property
    def step(self) -> int:
        return int(self.state.step)

    @property
    def model_params(self) -> dict[str, Any]:
        """The model's learnable parameters (``numpyro.param`` / ``nnx_module`` sites), constrained.

        Example:
            >>> compiled.model_params["decoder$params"]
        """
        return self._parameterised_model(self.state.model_params).constrained()

    def _parameterised_model(self, model_params) -> ParameterisedModel:
        return ParameterisedModel(self._bound, model_params, self.param_constraints)

    @property
    def num_parameters(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state.params))

    def validation_loss(self) -> float:
        """Mean ``-log q(x | y)`` on the fixed held-out joint samples."""
        tokens, observations = self.validation
        return float(self._validate(self.state.params, self.statistics, tokens, observations))

    def train(self, num_steps: int, progress: bool = True) -> "CompiledModel":
        """Run ``num_steps`` more optimisation steps (one compiled call per ``steps_per_call``)."""
        cfg = self.train_config
        horizon = cfg.num_steps
        if not cfg.custom_optimizer and 0 < horizon < self.step + num_steps:
            warnings.warn(f"training to step {self.step + num_steps}, past the {horizon} steps the learning-rate "
                          "schedule was built for: the rate stays at 5% of its peak from there on. Compile with "
                          "the total num_steps (or num_steps=0 for a constant rate) to avoid this.", stacklevel=2)
        desc = "compiling proposal" + ("" if self.path == "masked" else f" ({self.path} path)")
        bar = tqdm(total=num_steps, disable=not progress, desc=desc, unit="step")
        done, since_validation = 0, 0
        postfix = {}
        while done < num_steps:
            active = min(cfg.steps_per_call, num_steps - done)
            loss, skipped = self._run_steps(active)
            self.history["loss"].extend(loss.tolist())
            self.history["skipped"].extend((np.flatnonzero(skipped) + self.step - active).tolist())
            done += active
            since_validation += active
            if since_validation >= cfg.validation_every or done == num_steps:
                since_validation = 0
                self.history["validation_step"].append(self.step)
                self.history["validation_loss"].append(self.validation_loss())
                postfix["val"] = f"{self.history['validation_loss'][-1]:.3f}"
            finite = loss[np.isfinite(loss)]
            postfix["loss"] = f"{finite.mean():.3f}" if finite.size else "nan"
            if skipped.any():
                postfix["skipped"] = len(self.history["skipped"])
            bar.set_postfix(postfix, refresh=False)
            bar.update(active)
        bar.close()
        return self

    def _next_batch(self):
        if self.dataset is not None:
            if self._batches is None:
                self._batches = self.dataset.batches(jax.random.fold_in(self.state.key, 1), self.train_config.batch_size)
            return next(self._batches)
        # Derived from the state's key, so a resumed run draws the same traces.
        return sample_universal(self.spec, self._bound, jax.random.fold_in(self.state.key, 1),
                                self.train_config.batch_size)

    def _run_steps(self, active: int) -> tuple[np.ndarray, np.ndarray]:
        if self.path == "masked":
            if self.objective.needs_data and self.data is None:
                raise JaxicError(f"the {self.objective.name} objective trains on real observations: pass "
                                 "data={site: array with one row per data point} to jaxic.compile / jaxic.load.")
            self.state, info = self._multi_step(self.state, active, self.data)
            return np.asarray(info.loss)[:active], np.asarray(info.skipped)[:active]
        losses, skipped = [], []
        for _ in range(active):
            self.state, info = self._batch_step(self.state, *self._next_batch())
            losses.append(float(info.loss))
            skipped.append(bool(info.skipped))
        return np.asarray(losses), np.asarray(skipped)

    # ------------------------------------------------------------------------------------------
    def _check_observations(self, observations: Mapping[str, Any]) -> tuple[dict[str, jax.Array], tuple]:
        expected = {o.name: o for o in self.spec.observed}
        unknown = set(observations) - set(expected)
        if unknown:
            raise ObservationError(f"{sorted(unknown)} are not observed sites of this proposal; "
                                   f"its observed sites are {sorted(expected)}.")
        missing = set(expected) - set(observations)
        if missing:
            raise ObservationError(f"no observation given for {sorted(missing)}; pass a value for every observed "
                                   f"site: {sorted(expected)}.")
        out, batch_shapes = {}, {}
        for name, site in expected.items():
            value = jnp.asarray(observations[name], jnp.float32)
            if self.plate is not None:
                # One data point of the plate, or a batch of them: the plate axis is implicit.
                if value.shape == site.shape[1:]:
                    value = value[None]
                elif value.shape[1:] == site.shape[1:]:
                    value = value[:, None]
                else:
                    raise ObservationError(
                        f"observation of site '{name}' has shape {value.shape}; expected {site.shape[1:]} for one "
                        f"data point of plate '{self.plate.name}' or (n, {', '.join(map(str, site.shape[1:]))}) "
                        "for n of them.")
            if value.shape == site.shape:
                batch_shapes[name] = ()
            elif value.ndim == len(site.shape) + 1 and value.shape[1:] == site.shape:
                batch_shapes[name] = value.shape[:1]
            else:
                raise ObservationError(
                    f"observation of site '{name}' has shape {value.shape}; expected {site.shape} for one "
                    f"observation or (n, {', '.join(map(str, site.shape))}) for a batch of n.")
            out[name] = value
        if len(set(batch_shapes.values())) > 1:
            raise ObservationError(f"observed sites disagree on the batch of observations: {batch_shapes}.")
        return out, next(iter(batch_shapes.values()))

    def _sampler(self, num_samples: int, batched: bool) -> Callable:
        if (num_samples, batched) not in self._samplers:
            def run(params, statistics, model_params, key, observations):
                network = nnx.merge(self.graphdef, params, statistics)
                return importance_sample(network, self.spec, self._parameterised_model(model_params), key,
                                         observations, num_samples,
                                         None if self.mesh is None else parallel.batch_sharding(self.mesh))

            if batched:
                single = run
                run = lambda p, s, m, key, obs: jax.vmap(lambda k, o: single(p, s, m, k, o))(
                    jax.random.split(key, jax.tree.leaves(obs)[0].shape[0]), obs)
            # Replicated results stay readable on every host of a multi-host mesh.
            self._samplers[(num_samples, batched)] = jax.jit(
                run, **({} if self.mesh is None else {"out_shardings": parallel.replicated(self.mesh)}))
        return self._samplers[(num_samples, batched)]

    def posterior(self, key: jax.Array, observations: Mapping[str, Any], num_samples: int = 1000) -> Posterior:
        """Importance-sampling posterior for one observation set, or for a batch of them at once.

        Give each observed site either its own shape or a leading batch axis of n
        observations: the result then has ``batch_shape == (n,)``. Compiled with ``devices=``,
        the particles are split over the devices (``num_samples`` must divide their number).
        """
        observations, batch_shape = self._check_observations(observations)
        if self.spec.dynamic:
            return self._posterior_eager(key, observations, batch_shape, int(num_samples))
        if self.mesh is not None:
            parallel.check_divisible(int(num_samples), self.mesh, "num_samples")
            key, observations = parallel.replicate((key, observations), self.mesh)
        result = self._sampler(int(num_samples), bool(batch_shape))(
            self.state.params, self.statistics, self.state.model_params, key, observations)
        if self.plate is not None:  # drop the element's plate axis (length one) after the particles
            axis = len(batch_shape) + 1
            result = result._replace(samples={k: v.squeeze(axis) for k, v in result.samples.items()},
                                     executed={k: v.squeeze(axis) for k, v in result.executed.items()})
        return Posterior(*result)

    def _posterior_eager(self, key, observations, batch_shape, num_samples) -> Posterior:
        """Universal path: the model runs eagerly per particle (a Python loop the model's own
        control flow requires); the proposal's decoding is compiled."""
        run = lambda k, obs: importance_sample_eager(self._eager_decoder, self.state.params, self.statistics,
                                                     self._bound, k, obs, num_samples)
        if not batch_shape:
            return Posterior(*run(key, observations))
        keys = jax.random.split(key, batch_shape[0])
        results = [run(keys[i], {k: v[i] for k, v in observations.items()}) for i in range(batch_shape[0])]
        return Posterior(*jax.tree.map(lambda *xs: jnp.stack(xs), *results))

    # ------------------------------------------------------------------------------------------
    def _arrays(self) -> list[jax.Array]:
        return jax.tree.leaves(self.state._replace(key=jax.random.key_data(self.state.key)))

    def _restore_arrays(self, arrays: list) -> None:
        treedef = jax.tree.structure(self.state._replace(key=jax.random.key_data(self.state.key)))
        state = jax.tree.unflatten(treedef, [jnp.asarray(a) for a in arrays])
        self.state = state._replace(key=jax.random.wrap_key_data(state.key))
        if self.mesh is not None:
            self.state = parallel.replicate(self.state, self.mesh)

    def save(self, path: str | os.PathLike) -> None:
        """Write network, optimizer state, step, PRNG key, trace spec and configuration (atomically)."""
        network_name = {v: k for k, v in NETWORKS.items()}[type(self.network_config)]
        metadata = {
            "trace_spec": self.spec.to_json(),
            "network": {"type": network_name, "config": dataclasses.asdict(self.network_config)},
            "train_config": dataclasses.asdict(self.train_config),
            "objective": _objective_metadata(self.objective),
            "local_plate": None if self.plate is None else dataclasses.asdict(self.plate),
            "compile_key": np.asarray(jax.random.key_data(self.compile_key)).tolist(),
            "history": {k: [x if isinstance(x, int) else float(x) for x in v] for k, v in self.history.items()},
        }
        checkpoint.write_checkpoint(path, self._arrays(), metadata)


PATHS = ("auto", "masked", "universal")


def _objective_metadata(objective) -> dict:
    return {"name": objective.name, "options": dict(objective.options)}


def _local_plate(bound: Callable, name: str, observed: Sequence[str]) -> LocalPlate:
    """Check that every latent and observed site lies inside plate ``name``; its full size."""
    trace = abstract_trace(bound)
    plates = sorted(n for n, site in trace.items() if site["type"] == "plate")
    if name not in plates:
        raise ModelError(f"local_plate={name!r} is not a plate of the model; its plates are {plates}.")
    outside = [n for n, site in trace.items() if site["type"] == "sample"
               and name not in {frame.name for frame in site["cond_indep_stack"]}]
    if outside:
        raise ModelError(f"sites {outside} lie outside plate '{name}': with local_plate every latent and observed "
                         "site belongs to one data point. Make global quantities learnable parameters "
                         "(numpyro.param) or amortize over whole observation sets (no local_plate).")
    misplaced = [n for n, site in trace.items() if site["type"] == "sample" and
                 len(site["value"].shape) - len(site["fn"].event_shape) + [f.dim for f in site["cond_indep_stack"]
                                                                       if f.name == name][0] != 0]
    if misplaced:
        raise ModelError(f"plate '{name}' is not the leading axis of sites {misplaced}; make it the outermost "
                         "plate so that one row of the data is one data point.")
    return LocalPlate(name, int(trace[name]["args"][0]))


def _check_data(data: Mapping | None, spec: TraceSpec, plate: LocalPlate | None) -> dict | None:
    if data is None:
        return None
    expected = {o.name: (o.shape[1:] if plate is not None else o.shape) for o in spec.observed}
    if set(data) != set(expected):
        raise ObservationError(f"data has sites {sorted(data)}; give one array per observed site {sorted(expected)}.")
    out = {}
    for name, row_shape in expected.items():
        value = np.asarray(data[name], np.float32)
        if value.shape[1:] != row_shape:
            raise ObservationError(f"data['{name}'] has shape {value.shape}; expected (n, "
                                   f"{', '.join(map(str, row_shape))}) with one row per data point.")
        if plate is not None and value.shape[0] != plate.size:
            raise ObservationError(f"data['{name}'] has {value.shape[0]} rows but plate '{plate.name}' has size "
                                   f"{plate.size} in the model; pass the data size to the model (e.g. "
                                   "model_kwargs={'num_data': len(x)}).")
        out[name] = jnp.asarray(value)
    objectives.check_data_finite(out)
    if len({v.shape[0] for v in out.values()}) > 1:
        raise ObservationError(f"data arrays disagree on the number of data points: "
                               f"{ {k: v.shape[0] for k, v in out.items()} }.")
    return out


def _derive_spec(bound, observed, path: str, key, pilot_traces: int, max_tokens: int | None) -> TraceSpec:
    if path not in PATHS:
        raise JaxicError(f"path must be one of {PATHS}, got {path!r}.")
    if path == "universal":
        return derive_universal_spec(bound, observed, key, pilot_traces, max_tokens)
    try:
        return derive_trace_spec(bound, observed)
    except UntraceableModelError as exc:
        if path == "masked":
            raise
        message = str(exc).split(". This happens")[0]
        warnings.warn(f"jaxic: {message}. Using the universal path: the model runs eagerly (one trace per "
                      "call) while the proposal still trains batched and jitted. For speed, rewrite the "
                      "control flow with handlers.mask / cond / scan (see jaxic.control_flow).", stacklevel=4)
        return derive_universal_spec(bound, observed, key, pilot_traces, max_tokens)


def _build(model, model_args, model_kwargs, observed, key, network_config, train_config: TrainConfig,
           optimizer, observation_embedders, path: str = "auto", dataset: TraceDataset | None = None,
           spec: TraceSpec | None = None, pilot_traces: int = 256, max_tokens: int | None = None,
           objective=None, data: Mapping | None = None, local_plate: str | None = None,
           devices: Any = None) -> CompiledModel:
    full = _bind(model, model_args, model_kwargs)
    plate = _local_plate(full, local_plate, observed) if local_plate is not None else None
    bound = plate.element_model(full, 0) if plate is not None else full
    objective = objectives.resolve(objective)
    if objective.needs_data and (dataset is not None or path == "universal"):
        raise JaxicError(f"the {objective.name} objective runs the proposal alongside the model on real "
                         "data, which needs the masked path: no dataset=, no path='universal'.")
    init_key, stats_key, validation_key, _ = jax.random.split(key, 4)  # the last one trains
    if spec is None:
        spec = dataset.spec if dataset is not None else _derive_spec(
            bound, observed, "masked" if (plate is not None or objective.needs_data) else path, stats_key,
            pilot_traces, max_tokens)
    data = _check_data(data, spec, plate)
    model_params, param_constraints = find_model_params(full, init_key)
    if dataset is not None:
        validation = jax.tree.map(jnp.asarray, dataset.validation())
        tokens, observations = validation
    elif spec.dynamic:
        # Eager traces are slow: moments from fewer of them are still good enough.
        tokens, observations = sample_universal(spec, bound, stats_key, min(train_config.statistics_size, 1024))
        validation = sample_universal(spec, bound, validation_key, train_config.validation_size)
    else:
        draw = jax.jit(lambda k, n: sample_joint(spec, bound, k, n), static_argnums=1)
        tokens, observations = draw(stats_key, train_config.statistics_size)
        validation = draw(validation_key, train_config.validation_size)
    if network_config is None:
        # One latent token per plate element leaves nothing to attend over: an MLP encoder does the same, faster.
        network_config = FeedForwardConfig() if plate is not None and spec.num_tokens == 1 else TransformerConfig()
    heads = [head_for_site(s, network_config.num_components) for s in spec.latents]
    if data is not None:  # the network reads real observations: standardise with their moments
        observations = {k: (v[:, None] if plate is not None else v) for k, v in data.items()}
    # Compiled as one program: eagerly, each per-site operation would compile on its own.
    stats = ProposalStatistics(*jax.jit(lambda t, o: dataclasses.astuple(proposal_statistics(spec, heads, t, o)))(
        jax.tree.map(jnp.asarray, tokens), jax.tree.map(jnp.asarray, observations)))
    network = network_config.build(spec, stats, nnx.Rngs(init_key), observation_embedders)
    if optimizer is None:
        optimizer = training.default_optimizer(train_config.num_steps, train_config.learning_rate)
    return CompiledModel(model, model_args, model_kwargs, spec, network_config, train_config, network,
                         optimizer, key, jax.tree.map(jnp.asarray, validation), dataset, objective, data, plate,
                         model_params, param_constraints, devices)


def compile(model: Callable, observed: Sequence[str], key: jax.Array, num_steps: int = 2000, *,
            model_args: Sequence = (), model_kwargs: Mapping | None = None,
            network: Any = None, optimizer: optax.GradientTransformation | None = None,
            batch_size: int = 64, learning_rate: float = 3e-3, validation_size: int = 1024,
            microbatch_size: int | None = None, observation_embedders: Mapping[str, nnx.Module] | None = None,
            path: str = "auto", dataset: TraceDataset | str | os.PathLike | None = None,
            pilot_traces: int = 256, max_tokens: int | None = None, objective: Any = None,
            data: Mapping[str, Any] | None = None, local_plate: str | None = None,
            progress: bool = True, devices: Any = None) -> CompiledModel:
    """Compile an amortized proposal (an inference network) for a NumPyro model.

    By default it trains by inference compilation (forward KL on fresh joint samples, no
    data needed). With ``objective="elbo"`` or ``"rws"`` it trains on real ``data`` and also
    learns the model's own parameters (``numpyro.param``, ``numpyro.contrib.module``).

    Args:
        model: a plain generative NumPyro model.
        observed: names of the sites that will be observed (simulated during training).
        key: PRNG key for initialisation, statistics, validation set and training.
        num_steps: optimisation steps (each draws ``batch_size`` fresh joint traces).
        model_args, model_kwargs: fixed arguments of the model.
        network: network configuration (default :class:`jaxic.networks.TransformerConfig`; with a
            ``local_plate`` whose element has one latent token, :class:`jaxic.networks.FeedForwardConfig`), or the
            name of one in ``jaxic.networks.NETWORKS`` with default sizes (``"transformer"``, ``"lstm"``,
            ``"feedforward"``).
        optimizer: an optax optimizer (default AdamW, warm-up and cosine decay). Non-finite
            steps are always skipped and counted in ``history["skipped"]``.
        microbatch_size: masked path: process each batch in slices of this many traces (a divisor of
            ``batch_size``) and average their gradients: memory and, on CPUs, cache use scale with the
            slice (for long traces: see :func:`jaxic.training.build_step`).
        observation_embedders: per observed site, an ``nnx.Module`` mapping the observation to a
            ``(d_model,)`` vector (default: an MLP on the normalised, flattened value).
        path: ``"masked"`` runs the model vmapped under jit (stochastic control flow written with
            ``handlers.mask``, ``cond``, ``scan``); ``"universal"`` runs it eagerly, for Python control
            flow on sampled values; ``"auto"`` (default) takes the masked path when the model jits
            and says so when it falls back to the universal one.
        dataset: train on an offline :class:`jaxic.tracing.TraceDataset` (or its folder) instead of
            fresh joint samples; its first ``validation_size`` traces are held out.
        pilot_traces, max_tokens: universal path only: eager runs that discover the addresses, and
            the longest trace (in tokens) the proposal handles (default: 25% above the pilots').
        objective: ``"forward_kl"`` (default), ``"elbo"`` (amortized variational inference; reparameterised
            and score-function gradients), ``"rws"`` (reweighted wake-sleep), or an instance from
            ``jaxic.objectives`` with options, e.g. ``jaxic.objectives.elbo(num_particles=4)``.
        data: for ``"elbo"``/``"rws"``: per observed site an array with one row per data point
            (each step uses a random minibatch of ``batch_size`` rows).
        local_plate: name of a plate holding every site of the model (one data point each): the
            proposal is ``q(z | x) = prod_n q(z_n | x_n)``, compiled for one element, so any plate size
            (and subsampled plates) cost the same. ``data`` rows are then the plate's elements.
        devices: data parallelism (masked path): ``None`` (default) trains on one device; ``"all"``
            (every device of every host, after ``jax.distributed.initialize()`` on each host), a
            number of devices, or a list of devices splits each batch (traces, data points) and
            the posterior's particles over a 1-D mesh, with parameters replicated. ``batch_size``
            must divide evenly over the devices; the loss is that of one device on the same batch.

    Example:
        >>> compiled = jaxic.compile(model, observed=["obs"], key=jax.random.key(0), num_steps=3000,
        ...                          model_kwargs={"M": 20})
        >>> compiled.posterior(jax.random.key(1), {"obs": 25.0}, num_samples=10_000).ess
    """
    if isinstance(observed, str):
        observed = [observed]
    if num_steps < 0:
        raise JaxicError(f"num_steps must be >= 0, got {num_steps}.")
    if isinstance(network, str):
        if network not in NETWORKS:
            raise JaxicError(f"unknown network {network!r}; choose one of {sorted(NETWORKS)} or pass a "
                             "configuration such as jaxic.networks.LSTMConfig(lstm_dim=128).")
        network = NETWORKS[network]()
    training.num_microbatches(batch_size, microbatch_size)  # fail before tracing the model
    train_config = TrainConfig(num_steps=num_steps, batch_size=batch_size, learning_rate=learning_rate,
                               validation_size=validation_size, custom_optimizer=optimizer is not None,
                               microbatch_size=microbatch_size,
                               validation_every=max(TrainConfig.steps_per_call, num_steps // 20))
    if dataset is not None and not isinstance(dataset, TraceDataset):
        dataset = TraceDataset(dataset, holdout=validation_size)
    compiled = _build(model, model_args, model_kwargs, observed, key, network, train_config, optimizer,
                      observation_embedders, path, dataset, pilot_traces=pilot_traces, max_tokens=max_tokens,
                      objective=objective, data=data, local_plate=local_plate, devices=devices)
    return compiled.train(num_steps, progress=progress)


def load(path: str | os.PathLike, model: Callable, *, model_args: Sequence = (), model_kwargs: Mapping | None = None,
         optimizer: optax.GradientTransformation | None = None,
         observation_embedders: Mapping[str, nnx.Module] | None = None,
         dataset: TraceDataset | str | os.PathLike | None = None,
         data: Mapping[str, Any] | None = None, devices: Any = None) -> CompiledModel:
    """Load a proposal saved with :meth:`CompiledModel.save` for ``model``.

    The model's trace spec must match the saved one; training continues exactly as
    the uninterrupted run would have. The model's learned parameters come back too;
    ``data`` is needed only to train further with an objective that reads data;
    ``devices`` as in :func:`compile` (a runtime choice, not saved).

    Example:
        >>> compiled = jaxic.load("proposal_ckpt/", model, model_kwargs={"M": 20})
    """
    metadata = checkpoint.read_metadata(path)
    saved_spec = TraceSpec.from_json(metadata["trace_spec"])
    observed = [o.name for o in saved_spec.observed]
    bound = _bind(model, model_args, model_kwargs)
    local = (metadata.get("local_plate") or {}).get("name")
    try:
        if local is not None:
            bound = _local_plate(bound, local, observed).element_model(bound, 0)
        if saved_spec.dynamic:  # addresses were discovered by pilot runs: check that fresh runs fit
            spec = saved_spec
            sample_universal(spec, bound, jax.random.key(0), 4)
        else:
            spec = derive_trace_spec(bound, observed)
    except (ObservationError, ModelError) as exc:
        raise CheckpointError(f"checkpoint '{path}' does not fit this model: {exc}") from None
    difference = saved_spec.describe_difference(spec)
    if difference:
        raise CheckpointError(f"checkpoint '{path}' was written for a different model:\n{difference}\n"
                              "Pass the same model and model_args/model_kwargs it was compiled with.")
    network_meta = metadata["network"]
    if network_meta["type"] not in NETWORKS:
        raise CheckpointError(f"checkpoint '{path}' uses network '{network_meta['type']}', unknown to this jaxic.")
    network_config = NETWORKS[network_meta["type"]](**network_meta["config"])
    train_config = TrainConfig(**metadata["train_config"])
    if train_config.custom_optimizer and optimizer is None:
        raise CheckpointError(f"checkpoint '{path}' was trained with a custom optimizer; pass the same "
                              "optimizer to jaxic.load(..., optimizer=...) to restore its state.")
    # Rebuild with the original key (same validation set); statistics are restored, so few traces suffice.
    compile_key = jax.random.wrap_key_data(jnp.asarray(metadata["compile_key"], jnp.uint32))
    if dataset is not None and not isinstance(dataset, TraceDataset):
        dataset = TraceDataset(dataset, holdout=train_config.validation_size)
    objective_meta = metadata.get("objective", {"name": "forward_kl", "options": {}})
    objective = OBJECTIVES[objective_meta["name"]](**objective_meta["options"])
    compiled = _build(model, model_args, model_kwargs, observed, compile_key, network_config,
                      dataclasses.replace(train_config, statistics_size=16), optimizer, observation_embedders,
                      dataset=dataset, spec=saved_spec if saved_spec.dynamic else None, objective=objective,
                      data=data, local_plate=local, devices=devices)
    compiled.train_config = train_config
    compiled._restore_arrays(checkpoint.read_arrays(path, compiled._arrays()))
    compiled.history = {k: list(v) for k, v in metadata["history"].items()}
    return compiled
