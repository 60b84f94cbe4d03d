"""The public functional core: a proposal as a pytree, and pure functions of it.

A :class:`Proposal` holds the network's parameters and statistics and the model's own
learnable parameters as leaves; the network's graph definition, the :class:`TraceSpec`
and the bound model are static. Every function here is pure, so it composes with your own
``jax.jit``, ``vmap`` and ``grad`` (on the masked path; models with Python control flow
on sampled values run eagerly and cannot be jitted).

Example:
    >>> proposal = jaxic.proposal.init(model, ["obs"], jax.random.key(0))
    >>> total, per_site = jaxic.proposal.log_prob(proposal, {"x": 1.0, "y": 2.0}, {"obs": 5.0})
    >>> draws = jaxic.proposal.sample(proposal, jax.random.key(1), {"obs": 5.0}, 100)
    >>> post = jaxic.proposal.importance_sample(proposal, None, jax.random.key(2), {"obs": 5.0}, 1000)
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from numpyro import handlers

from jaxic.errors import JaxicError, ModelError, ObservationError, UntraceableModelError
from jaxic.heads import heads_for
from jaxic.inference import Posterior
from jaxic.inference.importance import DEFENSIVE_SCALE, EagerDecoder, importance_sample_eager, sample_particles
from jaxic.networks import FeedForwardConfig, ProposalStatistics, TransformerConfig, proposal_statistics, resolve_embedders
from jaxic.networks.embedders import is_embedder_config
from jaxic.objectives import LocalPlate, check_data_finite, forward_kl_loss
from jaxic.tracing import (ParameterisedModel, TraceDataset, TraceSpec, abstract_trace, derive_trace_spec,
                           derive_universal_spec, find_model_params, pack_trace, sample_joint, sample_universal,
                           trace_to_tokens)

PATHS = ("auto", "masked", "universal")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params", "statistics", "model_params"],
                   meta_fields=["graphdef", "spec", "model", "config", "plate", "param_constraints",
                                "observation_embedders"])
@dataclasses.dataclass(frozen=True)
class Proposal:
    """A proposal network for one model: parameters as leaves, structure static.

    ``model`` is the model with its arguments bound (one element of the local plate, if
    any) and without its learnable parameters; :attr:`bound_model` substitutes them.

    Example:
        >>> proposal = compiled.proposal
        >>> jax.jit(jaxic.proposal.log_prob)(proposal, latents, observations)
    """

    params: Any  # nnx.State of the network's nnx.Param
    statistics: Any  # nnx.State of everything else (moments of joint samples)
    model_params: Any  # the model's numpyro.param values, unconstrained ({} when none)
    graphdef: Any
    spec: TraceSpec
    model: Callable
    config: Any  # the network configuration (jaxic.networks.TransformerConfig, ...)
    plate: LocalPlate | None = None
    param_constraints: tuple = ()  # ((name, constraint), ...) of the model's parameters
    # ((site, configuration), ...) of the embedders chosen by configuration (checkpoints record them).
    observation_embedders: tuple = ()

    @property
    def network(self) -> nnx.Module:
        """The network as an ``nnx.Module`` (a fresh merge of the parameters)."""
        return nnx.merge(self.graphdef, self.params, self.statistics)

    @property
    def bound_model(self) -> ParameterisedModel:
        """The model with its learned parameters substituted: a plain NumPyro model function."""
        return ParameterisedModel(self.model, self.model_params, dict(self.param_constraints))

    @property
    def num_parameters(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))

    def replace(self, **changes) -> "Proposal":
        return dataclasses.replace(self, **changes)


def bind(model: Callable, model_args: Sequence = (), model_kwargs: Mapping | None = None) -> Callable:
    """The model with its fixed arguments bound (what tracing runs)."""
    return functools.partial(model, *tuple(model_args), **dict(model_kwargs or {}))


def check_dataset_fits(dataset: TraceDataset, model: Callable, observed: Sequence[str]) -> TraceSpec | None:
    """Raise a :class:`JaxicError` naming the site where ``dataset``'s traces do not fit ``model``: a latent
    or observed site missing, added, of another shape or support (a dataset of another model would train a
    proposal whose importance weights are wrong). Returns the model's own spec (None for universal traces).

    Example:
        >>> check_dataset_fits(TraceDataset("sims/"), functools.partial(model, M=2), ["obs"])
    """
    saved = dataset.spec
    if saved.dynamic:  # universal traces: addresses are discovered, the model is run eagerly at inference
        return None
    if sorted(o.name for o in saved.observed) != sorted(observed):
        raise JaxicError(f"dataset '{dataset.path}' observes {[o.name for o in saved.observed]} but observed="
                         f"{list(observed)}: pass the observed sites the dataset was written with.")
    here = derive_trace_spec(model, observed)
    describe = lambda s: (s.batch_shape + s.event_shape, s.support, s.is_discrete)
    theirs = {s.name: describe(s) for s in saved.latents}
    ours = {s.name: describe(s) for s in here.latents}
    for name in sorted(set(theirs) | set(ours)):
        if name not in ours or name not in theirs:
            where = "the dataset's traces" if name in theirs else "the model"
            raise JaxicError(f"site '{name}' is only in {where}: dataset '{dataset.path}' was written from another "
                             "model (or other model arguments). Write the dataset again from this model.")
        if ours[name] != theirs[name]:
            raise JaxicError(f"site '{name}' has shape {ours[name][0]} and support {ours[name][1]} in the model "
                             f"but {theirs[name][0]} and {theirs[name][1]} in dataset '{dataset.path}': write the "
                             "dataset again from this model (with the same model arguments).")
    shapes = {o.name: o.shape for o in here.observed}
    for o in saved.observed:
        if shapes[o.name] != o.shape:
            raise JaxicError(f"observed site '{o.name}' has shape {shapes[o.name]} in the model but {o.shape} in "
                             f"dataset '{dataset.path}': write the dataset again from this model.")
    return here


# --- construction ---------------------------------------------------------------------------
def init(model: Callable, observed: Sequence[str], key: jax.Array, *, network: Any = None,
         model_args: Sequence = (), model_kwargs: Mapping | None = None, path: str = "auto",
         local_plate: str | None = None, data: Mapping[str, Any] | None = None,
         observation_embedders: Mapping[str, Any] | None = None, statistics_size: int = 4096,
         pilot_traces: int = 256, max_tokens: int | None = None, spec: TraceSpec | None = None,
         dataset: TraceDataset | None = None, max_sites_per_run: int | None = None,
         run_timeout: float | None = None) -> Proposal:
    """An untrained proposal for ``model``: derive the trace spec, standardise on joint draws,
    build the network (its heads start at the prior).

    ``key`` is split in four as by :func:`jaxic.compile` (initialisation, statistics,
    validation, training), so the same key gives the same network there and here.

    Example:
        >>> proposal = jaxic.proposal.init(model, ["obs"], jax.random.key(0), model_kwargs={"M": 2},
        ...                                network=jaxic.networks.TransformerConfig(d_model=32))
    """
    full = bind(model, model_args, model_kwargs)
    plate = local_plate_of(full, local_plate, observed) if local_plate is not None else None
    bound = plate.element_model(full, 0) if plate is not None else full
    init_key, stats_key, _, _ = jax.random.split(key, 4)
    if spec is None and dataset is not None:
        model_spec = check_dataset_fits(dataset, bound, observed)
        # Whether an observation has a likelihood is the model's to say, also for datasets written before the field.
        spec = dataset.spec if model_spec is None else dataset.spec.with_likelihood_of(model_spec)
    if spec is None:
        spec = derive_spec(
            bound, observed, "masked" if plate is not None else path, stats_key, pilot_traces, max_tokens,
            elementwise=PLATE_ELEMENTWISE if plate is not None else None,
            max_sites_per_run=max_sites_per_run, run_timeout=run_timeout)
    data = check_data(data, spec, plate)
    observation_embedders = resolve_embedders(observation_embedders, spec.observed)
    model_params, param_constraints = find_model_params(full, init_key)
    if dataset is not None:
        tokens, observations = dataset.validation()
    elif spec.dynamic:
        # Eager traces are slow: moments from fewer of them are still good enough.
        tokens, observations = sample_universal(spec, bound, stats_key, min(statistics_size, 1024))
    else:
        draw = jax.jit(lambda k, n: sample_joint(spec, bound, k, n), static_argnums=1)
        tokens, observations = draw(stats_key, statistics_size)
    if network is None:
        # One latent token per plate element leaves nothing to attend over: an MLP encoder does the same, faster.
        network = FeedForwardConfig() if plate is not None and spec.num_tokens == 1 else TransformerConfig()
    heads = list(heads_for(spec, network.num_components))
    if data is not None:  # the network reads real observations: standardise with their moments
        observations = {k: (v[:, None] if plate is not None else v) for k, v in data.items()}
    # Compiled as one program: eagerly, each per-site operation would compile on its own.
    stats = ProposalStatistics(*jax.jit(lambda t, o: dataclasses.astuple(proposal_statistics(spec, heads, t, o)))(
        jax.tree.map(jnp.asarray, tokens), jax.tree.map(jnp.asarray, observations)))
    built = network.build(spec, stats, nnx.Rngs(init_key), observation_embedders)
    graphdef, params, statistics = nnx.split(built, nnx.Param, ...)
    return Proposal(params, statistics, model_params, graphdef, spec, bound, network, plate,
                    tuple(sorted(param_constraints.items())),
                    tuple(sorted((site, value) for site, value in observation_embedders.items()
                                 if is_embedder_config(value))))


def check_data(data: Mapping | None, spec: TraceSpec, plate: LocalPlate | None = None) -> dict | None:
    """Real data for the ELBO/RWS objectives as float32 arrays, one row per data point (an
    observation set, or an element of the local plate), after checking names and shapes.

    Example:
        >>> data = check_data({"x": X}, proposal.spec, proposal.plate)
    """
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise ObservationError(f"data must be a mapping {{site: array of rows}}, got {type(data).__name__}.")
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
    check_data_finite(out)
    if len({v.shape[0] for v in out.values()}) > 1:
        raise ObservationError(f"data arrays disagree on the number of data points: "
                               f"{ {k: v.shape[0] for k, v in out.items()} }.")
    return out


# Over a local plate (amortized VI, one latent set per data point) a vector site stays one token unless its infer
# says otherwise: each element's proposal is then a small encoder (the feed-forward network), not a sequence.
PLATE_ELEMENTWISE = False


def derive_spec(bound: Callable, observed: Sequence[str], path: str, key: jax.Array, pilot_traces: int = 256,
                max_tokens: int | None = None, elementwise: bool | None = None, **limits) -> TraceSpec:
    """The trace spec on the chosen path (``"auto"``: masked when the model jits, else universal, with a warning).
    ``limits`` (``max_sites_per_run``, ``run_timeout``) bound each eager run of a universal model;
    ``elementwise`` is the default of vector sites (see :func:`jaxic.tracing.derive_trace_spec`)."""
    if path not in PATHS:
        raise JaxicError(f"path must be one of {PATHS}, got {path!r}.")
    if path == "universal":
        return derive_universal_spec(bound, observed, key, pilot_traces, max_tokens, elementwise=elementwise, **limits)
    try:
        return derive_trace_spec(bound, observed, elementwise=elementwise)
    except UntraceableModelError as exc:
        if path == "masked":
            raise
        message = str(exc).split(". This happens")[0]
        warnings.warn(f"jaxic: {message}. Using the universal path: the model runs eagerly (one trace per "
                      "call) while the proposal still trains batched and jitted. For speed, rewrite the "
                      "control flow with handlers.mask / cond / scan (see jaxic.control_flow).", stacklevel=4)
        return derive_universal_spec(bound, observed, key, pilot_traces, max_tokens, elementwise=elementwise, **limits)


def local_plate_of(bound: Callable, name: str, observed: Sequence[str]) -> LocalPlate:
    """Plate ``name`` as a :class:`LocalPlate`, after checking that every site lies in it as its leading axis."""
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


# --- observations and latents as the network sees them ---------------------------------------
def observation_batch(proposal: Proposal, observations: Mapping[str, Any]) -> tuple[dict[str, jax.Array], tuple]:
    """Observations as float32 arrays shaped as the model's sites, and their batch shape
    (``()`` for one observation set, ``(n,)`` for n). Shapes only: works on traced values.

    Example:
        >>> obs, batch_shape = observation_batch(proposal, {"obs": jnp.array([4.0, 25.0])})   # batch_shape (2,)
    """
    if not isinstance(observations, Mapping):
        raise ObservationError(f"observations must be a mapping {{site: value}}, got {type(observations).__name__}; "
                               f"pass e.g. {{{', '.join(repr(o.name) + ': ...' for o in proposal.spec.observed)}}}.")
    expected = {o.name: o for o in proposal.spec.observed}
    unknown, missing = set(observations) - set(expected), set(expected) - set(observations)
    if unknown:
        raise ObservationError(f"{sorted(unknown)} are not observed sites of this proposal; "
                               f"its observed sites are {sorted(expected)}.")
    if missing:
        raise ObservationError(f"no observation given for {sorted(missing)}; pass a value for every observed "
                               f"site: {sorted(expected)}.")
    out, batch_shapes = {}, {}
    for name, site in expected.items():
        value = jnp.asarray(observations[name], jnp.float32)
        shape = site.shape
        if proposal.plate is not None:  # one data point of the plate, or a batch of them: the plate axis is implicit
            if value.shape == shape[1:]:
                value = value[None]
            elif value.shape[1:] == shape[1:]:
                value = value[:, None]
            else:
                raise ObservationError(
                    f"observation of site '{name}' has shape {value.shape}; expected {shape[1:]} for one "
                    f"data point of plate '{proposal.plate.name}' or (n, {', '.join(map(str, shape[1:]))}) "
                    "for n of them.")
        if value.shape == shape:
            batch_shapes[name] = ()
        elif value.ndim == len(shape) + 1 and value.shape[1:] == shape:
            batch_shapes[name] = value.shape[:1]
        else:
            raise ObservationError(f"observation of site '{name}' has shape {value.shape}; expected {shape} for one "
                                   f"observation or (n, {', '.join(map(str, shape))}) for a batch of n.")
        out[name] = value
    if len(set(batch_shapes.values())) > 1:
        raise ObservationError(f"observed sites disagree on the batch of observations: {batch_shapes}.")
    return out, next(iter(batch_shapes.values()))


def _latent_batch(proposal: Proposal, latents: Mapping[str, Any]) -> tuple[dict[str, jax.Array], tuple]:
    if not isinstance(latents, Mapping):
        raise ObservationError(f"latents must be a mapping {{site: value}}, got {type(latents).__name__}.")
    spec = proposal.spec
    names = [s.name for s in spec.latents]
    unknown = set(latents) - set(names)
    if unknown:  # Predictive and MCMC also return observed and deterministic sites: those are not scored
        trace = abstract_trace(proposal.model) if not spec.dynamic else {}
        other = ({o.name for o in spec.observed} | {d.name for d in spec.deterministic}
                 | {n for n, site in trace.items() if site["type"] == "deterministic"})
        if unknown - other:
            raise ObservationError(f"{sorted(unknown - other)} are not latent sites of this model; its latent sites "
                                   f"are {names}.")
        latents = {k: v for k, v in latents.items() if k not in other}
    missing = [n for n in names if n not in latents and not spec.dynamic]
    if missing:
        raise ObservationError(f"no value given for latent sites {missing}: give every latent site a value (any "
                               "value for sites that did not run; they are masked).")
    out, batch_shapes = {}, {}
    for site in spec.latents:
        if site.name not in latents:
            continue
        value = latents[site.name]
        if not isinstance(value, jax.Array) and np.asarray(value).dtype.kind not in "biuf":
            raise ObservationError(f"latent '{site.name}' is {value!r} of type {type(value).__name__}; give a number "
                                   "or an array of numbers.")
        value = jnp.asarray(value)
        shape = tuple(site.batch_shape) + tuple(site.event_shape)
        if proposal.plate is not None:
            shape = shape[1:]
        if value.shape == shape:
            batch_shapes[site.name] = ()
        elif value.ndim == len(shape) + 1 and value.shape[1:] == shape:
            batch_shapes[site.name] = value.shape[:1]
        else:
            raise ObservationError(f"latent '{site.name}' has shape {value.shape}; expected {shape} for one latent "
                                   f"set or (n, {', '.join(map(str, shape))}) for a batch of n.")
        out[site.name] = value[None] if proposal.plate is not None and not batch_shapes[site.name] else (
            value[:, None] if proposal.plate is not None else value)
    if len(set(batch_shapes.values())) > 1:
        raise ObservationError(f"latent sites disagree on the batch of latent sets: {batch_shapes}.")
    return out, next(iter(batch_shapes.values()), ())


def _substitute_latents(spec: TraceSpec, latents: Mapping[str, jax.Array]) -> Callable:
    """A ``substitute_fn`` giving each latent its value (inside ``scan``, the current time step's)."""
    sites = {s.name: s for s in spec.latents}

    def substitute_fn(msg):
        if msg["type"] != "sample" or msg["is_observed"] or msg["name"] not in latents:
            return None
        step = (msg.get("infer") or {}).get("_scan_current_index")
        value = latents[msg["name"]]
        return value[step] if sites[msg["name"]].scan_length and step is not None else value

    return substitute_fn


def _scored_trace(proposal: Proposal, model: Callable, latents, observations) -> dict:
    conditioned = handlers.condition(handlers.seed(model, jax.random.key(0)), data=observations)
    return handlers.trace(handlers.substitute(conditioned, substitute_fn=_substitute_latents(proposal.spec, latents))
                          ).get_trace()


def _per_site(spec: TraceSpec, network, trace: dict, tokens, observations) -> jax.Array:
    """Per-site ``log q`` of one trace: proposed tokens scored by the network; prior-drawn sites by their prior."""
    per_token = network.log_prob(observations, tokens)
    per_site = jax.ops.segment_sum(per_token, jnp.asarray(tokens.address), num_segments=len(spec.latents))
    for a, site in enumerate(spec.latents):
        if not site.propose and site.name in trace:
            msg = trace[site.name]
            per_site = per_site.at[a].add(jnp.sum(msg["fn"].log_prob(msg["value"])))
    return per_site


# --- scoring ----------------------------------------------------------------------------------
def log_prob_tokens(proposal: Proposal, tokens, observations: Mapping[str, jax.Array]) -> jax.Array:
    """``log q(x | y)`` of traces given as tokens (e.g. held-out joint draws), one value per trace.

    Example:
        >>> tokens, obs = jaxic.sample_joint(proposal.spec, proposal.bound_model, key, 256)
        >>> held_out_loss = -jaxic.proposal.log_prob_tokens(proposal, tokens, obs).mean()
    """
    network = proposal.network
    if jnp.ndim(tokens.mask) == 1:
        return jnp.sum(network.log_prob(observations, tokens))
    return jnp.sum(jax.vmap(network.log_prob)(observations, tokens), axis=-1)


def held_out_loss(proposal: Proposal, tokens, observations: Mapping[str, jax.Array]) -> jax.Array:
    """Mean ``-log q(x | y)`` over traces given as tokens (with a batch axis): the forward-KL loss,
    with traces that are not finite (a NaN draw of the model) left out, as training leaves them out.

    Example:
        >>> loss = jax.jit(held_out_loss)(proposal, *joint_draws(proposal, jax.random.key(0), 500))
    """
    return forward_kl_loss(proposal.network, tokens, observations)[0]


def log_prob(proposal: Proposal, latents: Mapping[str, Any], observations: Mapping[str, Any],
             model: Callable | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The proposal's density ``log q(x | y)`` of given latent values, in total and per site.

    ``latents`` is a NumPyro-style ``{site: value}`` dict (as ``Predictive`` and
    ``MCMC.get_samples()`` return them), for one latent set or a batch of n (leading axis);
    ``observations`` likewise, one set (shared by every latent set) or n. Sites that did
    not run in a latent set (masks, branches) contribute nothing; sites drawn from their
    prior (``infer={"jaxic": {"propose": False}}``) contribute their prior density. The model
    (default: the proposal's own) is run with the values substituted to learn which ran.

    Example:
        >>> total, per_site = jaxic.proposal.log_prob(proposal, mcmc.get_samples(), {"obs": 25.0})
        >>> held_out_score = total.mean()
    """
    model = proposal.bound_model if model is None else model
    obs, obs_batch = observation_batch(proposal, observations)
    values, latent_batch = _latent_batch(proposal, latents)
    if obs_batch and latent_batch and obs_batch != latent_batch:
        raise ObservationError(f"{latent_batch[0]} latent sets but {obs_batch[0]} observation sets: give one "
                               "observation set, or one per latent set.")
    names = [s.name for s in proposal.spec.latents]
    network = proposal.network
    if proposal.spec.dynamic:
        per_site = _log_prob_eager(proposal, model, values, obs, latent_batch, obs_batch)
    else:
        def one(latent_set, obs_set):
            trace = _scored_trace(proposal, model, latent_set, obs_set)
            tokens, _ = trace_to_tokens(proposal.spec, trace)
            return _per_site(proposal.spec, network, trace, tokens, obs_set)

        batch = latent_batch or obs_batch
        if not batch:
            per_site = one(values, obs)
        else:
            per_site = jax.vmap(one, in_axes=(0 if latent_batch else None, 0 if obs_batch else None))(values, obs)
    return jnp.sum(per_site, axis=-1), {name: per_site[..., a] for a, name in enumerate(names)}


@functools.lru_cache(maxsize=32)
def _token_scorer(graphdef) -> Callable:
    return jax.jit(lambda params, statistics, obs, tokens: nnx.merge(graphdef, params, statistics).log_prob(obs, tokens))


def _log_prob_eager(proposal, model, values, obs, latent_batch, obs_batch) -> jax.Array:
    """Universal path: the model is Python, so each latent set runs eagerly (a loop the model requires)."""
    spec = proposal.spec
    n = (latent_batch or obs_batch or (None,))[0]
    rows = []
    for i in range(1 if n is None else n):
        latent_set = {k: v[i] for k, v in values.items()} if latent_batch else values
        obs_set = {k: v[i] for k, v in obs.items()} if obs_batch else obs
        trace = _scored_trace(proposal, model, latent_set, obs_set)
        packed = pack_trace(spec, trace)
        if packed is None:
            raise ModelError(f"latent set {i} reaches more tokens than max_tokens={spec.max_tokens} or an address "
                             "unseen in the pilot runs; the proposal cannot score it.")
        tokens, _ = packed
        per_token = _token_scorer(proposal.graphdef)(proposal.params, proposal.statistics, obs_set,
                                                     jax.tree.map(jnp.asarray, tokens))
        per_site = np.zeros(len(spec.latents), np.float32)
        np.add.at(per_site, np.asarray(tokens.address), np.asarray(per_token))
        for a, site in enumerate(spec.latents):
            if not site.propose and site.name in trace:
                per_site[a] += float(jnp.sum(trace[site.name]["fn"].log_prob(trace[site.name]["value"])))
        rows.append(per_site)
    return jnp.asarray(rows[0] if n is None else np.stack(rows))


# --- drawing ----------------------------------------------------------------------------------
def importance_sample(proposal: Proposal, model: Callable | None, key: jax.Array, observations: Mapping[str, Any],
                      num_samples: int, *, sharding=None, chunk_size: int | None = None, defensive: float = 0.0,
                      defensive_scale: float = DEFENSIVE_SCALE) -> Posterior:
    """Importance sampling with the proposal running alongside ``model`` (default: the
    proposal's own, with its learned parameters): ``log w = log p(x, y) - log q(x | y)``.
    A model whose observed site is a simulator's output (a ``Delta``) has no p(y | x):
    :class:`jaxic.NoLikelihoodError` (its amortized posterior is :func:`sample`).

    One observation set, or a batch of n (leading axis) giving ``batch_shape == (n,)``.
    ``chunk_size`` draws the particles in chunks of that many (``lax.map``): memory scales
    with the chunk, the result is that of one call (up to float rounding). ``sharding``
    (:func:`jaxic.parallel.batch_sharding`) splits the particles over devices.

    ``defensive``: the share of particles drawn from a proposal widened ``defensive_scale`` times,
    every weight computed against the mixture (see :func:`jaxic.inference.sample_particles`): a
    safeguard against a proposal that is too narrow, at the price of about that share of the ESS
    when it is not. The compiled masked path only.

    Example:
        >>> post = jax.jit(jaxic.proposal.importance_sample, static_argnums=(1, 4))(
        ...     proposal, None, jax.random.key(0), {"obs": 25.0}, 1000)
        >>> post.ess, post.mean("x")
    """
    proposal.spec.check_likelihood("importance sampling")
    return draw_particles(proposal, model, key, observations, num_samples, sharding=sharding, chunk_size=chunk_size,
                          defensive=defensive, defensive_scale=defensive_scale)


def draw_particles(proposal: Proposal, model: Callable | None, key: jax.Array, observations: Mapping[str, Any],
                   num_samples: int, *, sharding=None, chunk_size: int | None = None, defensive: float = 0.0,
                   defensive_scale: float = DEFENSIVE_SCALE) -> Posterior:
    """:func:`importance_sample` without its likelihood check: the proposal's draws with the model's and
    the proposal's log densities. For readers of the draws alone (:func:`sample`, SBC on raw draws), which
    a model without a likelihood still has; its log weights are then -inf.

    Example:
        >>> draws = jaxic.proposal.draw_particles(proposal, None, jax.random.key(0), {"obs": 25.0}, 100)
        >>> draws.samples["x"].shape, draws.executed["x"].shape
    """
    model = proposal.bound_model if model is None else model
    obs, batch_shape = observation_batch(proposal, observations)
    defensive, defensive_scale = check_defensive(defensive, defensive_scale)
    if proposal.spec.dynamic:
        if defensive:
            raise JaxicError(f"defensive={defensive} needs the compiled (masked) path, but this model runs "
                             "eagerly (path='universal'); use defensive=0.0.")
        decoder = _eager_decoder(proposal.graphdef, proposal.spec)
        run = lambda k, o: importance_sample_eager(decoder, proposal.params, proposal.statistics, model, k, o,
                                                   num_samples)
        if not batch_shape:
            return run(key, obs)
        keys = jax.random.split(key, batch_shape[0])
        return jax.tree.map(lambda *xs: jnp.stack(xs), *_same_sites(
            [run(keys[i], {k: v[i] for k, v in obs.items()}) for i in range(batch_shape[0])]))
    network = proposal.network

    def single(k, o):
        p = sample_particles(network, proposal.spec, model, k, o, num_samples, sharding, chunk_size,
                             defensive, defensive_scale)
        return Posterior(p.samples, p.log_weights, p.log_joint, p.log_proposal, p.executed)

    result = single(key, obs) if not batch_shape else jax.vmap(single)(jax.random.split(key, batch_shape[0]), obs)
    if proposal.plate is not None:  # drop the element's plate axis (length one) after the particles
        axis = len(batch_shape) + 1
        # Deterministic sites computed outside the plate have no such axis.
        squeeze = lambda v: v.squeeze(axis) if v.ndim > axis and v.shape[axis] == 1 else v
        result = dataclasses.replace(result, samples={k: squeeze(v) for k, v in result.samples.items()},
                                     executed={k: squeeze(v) for k, v in result.executed.items()})
    return result


def _same_sites(posteriors: list[Posterior]) -> list[Posterior]:
    """Eager posteriors of several observation sets with the same sites: a deterministic site that
    only some sets' particles reached gets zeros and ``executed`` False in the others."""
    like = {k: v for p in posteriors for k, v in p.samples.items()}
    out = []
    for p in posteriors:
        missing = {k: v for k, v in like.items() if k not in p.samples}
        out.append(p if not missing else dataclasses.replace(
            p, samples={**p.samples, **{k: jnp.zeros_like(v) for k, v in missing.items()}},
            executed={**p.executed, **{k: jnp.zeros(v.shape, bool) for k, v in missing.items()}}))
    return out


def sample(proposal: Proposal, key: jax.Array, observations: Mapping[str, Any], num_samples: int, *,
           sharding=None, chunk_size: int | None = None) -> dict[str, jax.Array]:
    """Raw proposal draws ``x ~ q(x | y)`` as ``{site: value}``, without weights: the amortized
    posterior itself (leading axes: observation sets if batched, then draws).

    ``numpyro.deterministic`` sites are included, as ``Predictive`` returns them. Sites that did
    not run in a draw hold a placeholder value.

    Example:
        >>> draws = jaxic.proposal.sample(proposal, jax.random.key(0), {"obs": 25.0}, 1000)
        >>> draws["x"].mean()
    """
    return draw_particles(proposal, None, key, observations, num_samples, sharding=sharding,
                          chunk_size=chunk_size).samples


@functools.lru_cache(maxsize=32)
def _eager_decoder(graphdef, spec: TraceSpec) -> EagerDecoder:
    return EagerDecoder(graphdef, spec)


def joint_draws(proposal: Proposal, key: jax.Array, num_traces: int):
    """``num_traces`` joint draws from the (bound) model as tokens and observations, on either path.

    Example:
        >>> tokens, obs = jaxic.proposal.joint_draws(proposal, jax.random.key(0), 500)
        >>> held_out = -jaxic.proposal.log_prob_tokens(proposal, tokens, obs).mean()
    """
    if proposal.spec.dynamic:
        return jax.tree.map(jnp.asarray, sample_universal(proposal.spec, proposal.bound_model, key, num_traces))
    return _joint_sampler(proposal.spec, num_traces)(proposal, key)


@functools.lru_cache(maxsize=32)
def _joint_sampler(spec: TraceSpec, num_traces: int) -> Callable:
    return jax.jit(lambda proposal, key: sample_joint(spec, proposal.bound_model, key, num_traces))



def check_defensive(defensive: Any, defensive_scale: Any) -> tuple[float, float]:
    """``(defensive, defensive_scale)`` as floats, or a :class:`JaxicError` saying which is out of range.

    Example:
        >>> check_defensive(0.05, 3.0)
        (0.05, 3.0)
    """
    try:
        if isinstance(defensive, bool) or isinstance(defensive_scale, bool):
            raise TypeError
        share, scale = float(defensive), float(defensive_scale)
    except (TypeError, ValueError):
        raise JaxicError(f"defensive={defensive!r} and defensive_scale={defensive_scale!r} must be numbers "
                         "(a share of particles in [0, 1) and a widening factor >= 1).") from None
    if not 0.0 <= share < 1.0:
        raise JaxicError(f"defensive={defensive!r} must be a share of the particles in [0, 1), e.g. 0.05.")
    if not (np.isfinite(scale) and scale >= 1.0):
        raise JaxicError(f"defensive_scale={defensive_scale!r} must be a finite widening factor >= 1, e.g. 3.0.")
    return share, scale


# --- memory -----------------------------------------------------------------------------------
_PROBE_PARTICLES = 1024
# Below this many particles (per observation set) one vmapped call is assumed to fit.
PLANNING_THRESHOLD = 1 << 17


def available_memory_bytes(device: jax.Device | None = None) -> int:
    """Memory free for new arrays on ``device`` (default: this process's first device; another
    host's devices have no readable statistics): the allocator's limit minus what is in use on
    accelerators, free physical memory on CPUs.

    Example:
        >>> available_memory_bytes() / 2**30   # GiB
    """
    device = jax.local_devices()[0] if device is None else device
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    import os
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def plan_particle_chunks(proposal: Proposal, observations: Mapping[str, Any], num_samples: int,
                         memory_bytes: int | None = None) -> int | None:
    """How many particles :func:`importance_sample` can draw at once within half of
    ``memory_bytes`` (default: :func:`available_memory_bytes`), from XLA's memory analysis of
    the sampler at a probe size; ``None`` when all of them fit. Raises :class:`JaxicError`
    when the results alone would not fit, saying how much memory they need.

    Example:
        >>> chunk = plan_particle_chunks(proposal, {"obs": 25.0}, 10_000_000)
        >>> post = importance_sample(proposal, None, key, {"obs": 25.0}, 10_000_000, chunk_size=chunk)
    """
    obs, batch_shape = observation_batch(proposal, observations)
    num_sets = int(np.prod(batch_shape)) if batch_shape else 1
    budget = (available_memory_bytes() if memory_bytes is None else memory_bytes) // 2
    spec = proposal.spec
    per_particle = 16 + sum(4 * int(np.prod(s.batch_shape + s.event_shape)) + int(np.prod(s.batch_shape))
                            for s in spec.latents)
    results = per_particle * num_samples * num_sets
    if results > budget:
        raise JaxicError(f"num_samples={num_samples:,} particles{f' for {num_sets} observation sets' if num_sets > 1 else ''} "
                         f"need about {results / 2**30:.1f} GiB for the results alone, but about "
                         f"{budget / 2**30:.1f} GiB (half of the free memory) is available. Draw fewer particles, "
                         "or draw them in several calls with different keys and combine the posteriors.")
    if num_samples <= PLANNING_THRESHOLD or spec.dynamic:
        return None
    probe = _probe_sampler(proposal.spec, _PROBE_PARTICLES).lower(proposal, jax.random.key(0), obs).compile()
    analysis = probe.memory_analysis()
    temp = getattr(analysis, "temp_size_in_bytes", 0) if analysis is not None else 0
    per_particle_temp = max(temp / _PROBE_PARTICLES, 1.0) * num_sets
    room = budget - results
    if per_particle_temp * num_samples <= room:
        return None
    return max(1, min(num_samples, int(room // per_particle_temp)))


@functools.lru_cache(maxsize=8)
def _probe_sampler(spec: TraceSpec, num_particles: int) -> Callable:
    return jax.jit(lambda proposal, key, obs: importance_sample(proposal, None, key, obs, num_particles))
