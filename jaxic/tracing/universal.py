"""The universal path: models with Python control flow on sampled values.

Such a model cannot run under ``jax.jit``, so it runs eagerly, one trace per call.
Addresses are discovered as they appear in pilot runs, and each trace is packed in
execution order into the same padded token format as the masked path, so the
proposal network still trains batched and jitted. Every eager run is bounded in sample
sites and seconds (stored in the spec), so a model that never ends on some draws raises a
:class:`ModelError` naming its line instead of hanging.

Example:
    >>> spec = derive_universal_spec(model, observed=["obs"], key=jax.random.key(0))
    >>> tokens, observations = sample_universal(spec, model, jax.random.key(1), 64)
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxic.errors import JaxicError, ModelError
from jaxic.tracing.limits import PILOT_MIN_SITES, limit_sites, resolve_timeout, time_limit, user_frame
from jaxic.tracing.spec import (DeterministicSite, LatentSite, ObservedSite, TraceSpec, as_tokens, check_observed,
                                deterministic_sites, latent_site, observed_site, run_model, shape_change_message,
                                token_mask)
from jaxic.tracing.traces import Tokens


def run_bounded(model: Callable, key: jax.Array, max_sites: int | None = None, timeout: float | None = None,
                during: str = "an eager model run") -> dict:
    """One eager run of the model under ``seed`` + ``trace``, stopped with a :class:`ModelError`
    naming the model's line once it reaches more than ``max_sites`` sample sites or runs
    longer than ``timeout`` seconds (None: no bound). Errors the model raises become a
    :class:`ModelError` that says where.

    Example:
        >>> trace = run_bounded(model, jax.random.key(0), spec.site_limit, spec.timeout)
    """
    bounded = model if max_sites is None else limit_sites(model, max_sites, during)
    try:
        with time_limit(timeout, during):
            return run_model(bounded, key)
    except JaxicError:
        raise
    except Exception as exc:  # the user's code failed: say where
        raise ModelError(f"the model raised {type(exc).__name__}: {exc} (at {user_frame(exc)})") from exc


def _latent_messages(trace: dict, observed: Sequence[str]):
    return [(n, m) for n, m in trace.items() if m["type"] == "sample" and n not in observed and not m["is_observed"]]


def derive_universal_spec(model: Callable, observed: Sequence[str], key: jax.Array | None = None,
                          num_traces: int = 256, max_tokens: int | None = None, *,
                          max_sites_per_run: int | None = None, run_timeout: float | None = None,
                          elementwise: bool | None = None) -> TraceSpec:
    """Discover a universal model's addresses from ``num_traces`` eager pilot runs.

    Addresses are numbered in order of first appearance. ``max_tokens`` (default: 25%
    above the longest pilot trace) bounds the length of a trace; longer traces are
    dropped from training and counted.

    Every eager run of the model (these pilots, training traces, importance sampling) is
    bounded, so that a model that never ends on some draws raises a :class:`ModelError`
    naming its line instead of hanging: ``max_sites_per_run`` sample sites (default: 4 times
    the pilots' longest run plus 100; pilots themselves may reach at least
    :data:`~jaxic.tracing.limits.PILOT_MIN_SITES`) and ``run_timeout`` seconds (default
    :data:`~jaxic.tracing.limits.DEFAULT_RUN_TIMEOUT`; 0 or ``inf``: no limit). Both are
    stored in the spec. ``elementwise`` as for :func:`~jaxic.tracing.derive_trace_spec`.

    Example:
        >>> spec = derive_universal_spec(model, ["obs"], jax.random.key(0), num_traces=512)
        >>> spec.site_limit, spec.timeout
    """
    if isinstance(observed, str):
        observed = [observed]
    if max_sites_per_run is not None and int(max_sites_per_run) < 1:
        raise JaxicError(f"max_sites_per_run must be a positive number of sample sites, got {max_sites_per_run}.")
    timeout = resolve_timeout(run_timeout)
    key = jax.random.key(0) if key is None else key
    sites: dict[str, LatentSite] = {}
    determ: dict[str, DeterministicSite] = {}
    obs_shapes: dict[str, tuple] = {}
    obs_sites: dict[str, ObservedSite] = {}
    longest = longest_sites = 0
    for i, k in enumerate(jax.random.split(key, num_traces)):
        # Until the pilots have shown how long a run gets, the bound grows with them.
        bound = max_sites_per_run or max(PILOT_MIN_SITES, 4 * longest_sites + 100)
        trace = run_bounded(model, k, bound, timeout, f"pilot run {i + 1} of {num_traces} deriving the trace spec")
        samples = {n: m for n, m in trace.items() if m["type"] == "sample"}
        longest_sites = max(longest_sites, len(samples))
        check_observed(samples, observed, trace)
        for name in observed:
            shape = tuple(jnp.shape(samples[name]["value"]))
            obs_sites.setdefault(name, observed_site(name, samples[name]))
            if obs_shapes.setdefault(name, shape) != shape:
                raise ModelError(f"observed site '{name}' changes shape between runs ({obs_shapes[name]} vs "
                                 f"{shape}); jaxic needs a fixed observation shape (pad it and observe a mask).")
        length = 0
        for name, msg in _latent_messages(trace, observed):
            site = latent_site(name, msg, 0, elementwise)
            known = sites.setdefault(name, site)
            if known != site:
                raise ModelError(f"site '{name}' changes between runs ({known.dist_type} {known.batch_shape} vs "
                                 f"{site.dist_type} {site.batch_shape}); give differently-shaped draws distinct "
                                 "names (e.g. f'x_{i}').")
            length += site.num_tokens
        longest = max(longest, length)
        for site in deterministic_sites(trace):
            known = determ.setdefault(site.name, site)
            if known.shape != site.shape:
                raise ModelError(shape_change_message(site.name, known.shape, site.shape))
    if not sites:
        raise ModelError(f"the model has no latent sample sites (observed: {list(observed)}); nothing to infer.")
    max_tokens = max_tokens or max(longest + 1, math.ceil(1.25 * longest))
    latents = tuple(sites.values())
    return TraceSpec(latents=latents, observed=tuple(obs_sites[n] for n in observed),
                     dist_types=tuple(sorted({s.dist_type for s in latents})), dynamic=True, max_tokens=max_tokens,
                     max_sites_per_run=int(max_sites_per_run or 4 * longest_sites + 100), run_timeout=run_timeout,
                     deterministic=tuple(determ.values()))


def stack_deterministic(runs: Sequence[dict], known: Sequence[DeterministicSite] = ()
                        ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Deterministic values of eager runs (one ``{name: value}`` per run) stacked over the runs,
    with whether each run reached the site: ``(values, executed)``.

    A site a run did not reach holds zeros there and ``executed`` False. Sites are the
    ``known`` ones (e.g. ``spec.deterministic``, found by the pilot runs) and any that first
    appear in these runs. A site whose shape differs from run to run (or from ``known``)
    raises a :class:`ModelError` naming it.

    Example:
        >>> values, executed = stack_deterministic([{"count": 2}, {"count": 5}, {}], spec.deterministic)
        >>> values["count"], executed["count"]        # [2, 5, 0], [True, True, False]
    """
    shapes = {d.name: tuple(d.shape) for d in known}
    examples: dict[str, np.ndarray] = {}
    for run in runs:
        for name, value in run.items():
            value = np.asarray(value)
            known = shapes.setdefault(name, value.shape)
            if known != value.shape:
                raise ModelError(shape_change_message(name, known, value.shape))
            examples.setdefault(name, value)
    values, executed = {}, {}
    for name, shape in shapes.items():
        blank = np.zeros(shape, examples[name].dtype if name in examples else np.float32)
        values[name] = np.stack([np.asarray(run[name]) if name in run else blank for run in runs])
        executed[name] = np.stack([np.full(shape, name in run) for run in runs])
    return values, executed


@functools.lru_cache(maxsize=None)
def _encoder(site: LatentSite, width: int):
    # Compiled once per site (and distribution structure); eager jnp calls would dominate.
    @jax.jit
    def encode(fn, value):
        values, log_det = as_tokens(site, fn, value, width)
        return values, log_det, token_mask(site, fn)

    return encode


def pack_trace(spec: TraceSpec, trace: dict) -> tuple[Tokens, dict[str, np.ndarray]] | None:
    """One eager trace as tokens in execution order, padded to ``spec.max_tokens``.

    Returns None when the trace is longer than ``max_tokens`` or has an address the
    spec does not know (the caller counts and skips it).
    """
    observed = [o.name for o in spec.observed]
    index = {s.name: a for a, s in enumerate(spec.latents)}
    width, total = spec.value_dim, spec.num_tokens
    address = np.zeros(total, np.int32)
    instance = np.zeros(total, np.int32)
    dist_type = np.zeros(total, np.int32)
    value = np.zeros((total, width), np.float32)
    mask = np.zeros(total, bool)
    log_jacobian = np.zeros(total, np.float32)
    position = 0
    for name, msg in _latent_messages(trace, observed):
        if name not in index:
            return None
        site = spec.latents[index[name]]
        n = site.num_tokens
        if position + n > total:
            return None
        values, log_det, executed = _encoder(site, width)(msg["fn"], msg["value"])
        span = slice(position, position + n)
        address[span] = index[name]
        instance[span] = np.arange(n)
        dist_type[span] = spec.dist_types.index(site.dist_type)
        value[span] = np.asarray(values)
        mask[span] = np.asarray(executed)
        log_jacobian[span] = np.asarray(log_det)
        position += n
    observations = {o: np.asarray(trace[o]["value"], np.float32) for o in observed}
    return Tokens(address, instance, dist_type, value, mask, log_jacobian), observations


def sample_universal(spec: TraceSpec, model: Callable, key: jax.Array, num_traces: int,
                     max_attempts_factor: int = 4) -> tuple[Tokens, dict[str, np.ndarray]]:
    """``num_traces`` eager joint samples packed as a batch of tokens (numpy arrays).

    A Python loop over traces is unavoidable here: the model itself is Python.
    Traces that do not fit the spec are skipped (and a warning says how many).

    Example:
        >>> tokens, observations = sample_universal(spec, model, jax.random.key(1), 64)
    """
    kept, skipped = [], 0
    keys = iter(jax.random.split(key, num_traces * max_attempts_factor))
    for k in keys:
        trace = run_bounded(model, k, spec.site_limit, spec.timeout, "drawing joint samples from the model")
        packed = pack_trace(spec, trace)
        if packed is None:
            skipped += 1
            continue
        kept.append(packed)
        if len(kept) == num_traces:
            break
    if len(kept) < num_traces:
        raise ModelError(f"only {len(kept)} of {num_traces * max_attempts_factor} traces fit the trace spec "
                         f"(max_tokens={spec.max_tokens}, {len(spec.latents)} addresses); derive the spec from "
                         "more pilot runs or raise max_tokens.")
    if skipped:
        warnings.warn(f"{skipped} eager traces were longer than max_tokens={spec.max_tokens} or reached an "
                      "address unseen in the pilot runs and were skipped.", stacklevel=2)
    return jax.tree.map(lambda *xs: np.stack(xs), *kept)

