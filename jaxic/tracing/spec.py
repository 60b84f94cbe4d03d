"""The static layout of a model's traces, derived once from the model.

A :class:`TraceSpec` lists every latent site in execution order with its
distribution, support and shapes, assigns each latent element a token position,
and lists the observed sites. It is saved with every checkpoint so that a proposal
is never silently applied to a different model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import traceback
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.distribution import MaskedDistribution
from numpyro.distributions.transforms import biject_to

from jaxic.errors import ModelError, ObservationError, UnsupportedDistributionError, UntraceableModelError

_JIT_FAILURES = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
    jax.errors.TracerArrayConversionError,
)


@dataclasses.dataclass(frozen=True)
class LatentSite:
    """One latent sample site: which tokens it owns and how its values are encoded.

    Continuous sites store their value in unconstrained space (``biject_to(support)``),
    one token per element of the batch (plate) shape with the event flattened inside
    the token. Finite discrete sites store the category index ``value - lower``.
    """

    name: str
    dist_type: str
    support: str
    batch_shape: tuple[int, ...]
    event_shape: tuple[int, ...]
    unconstrained_event_shape: tuple[int, ...]
    is_discrete: bool
    num_categories: int  # 0 for continuous sites
    lower: int  # smallest value of a finite discrete support
    offset: int  # first token position

    @property
    def num_tokens(self) -> int:
        return math.prod(self.batch_shape)

    @property
    def value_dim(self) -> int:
        return 1 if self.is_discrete else math.prod(self.unconstrained_event_shape)


@dataclasses.dataclass(frozen=True)
class ObservedSite:
    """A site that is simulated during training and conditioned on at inference."""

    name: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class TraceSpec:
    """Address vocabulary and token layout of a model.

    Example:
        >>> spec = derive_trace_spec(model, observed=["obs"])
        >>> spec.num_tokens, [s.name for s in spec.latents]
    """

    latents: tuple[LatentSite, ...]
    observed: tuple[ObservedSite, ...]
    dist_types: tuple[str, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.latents)

    @property
    def value_dim(self) -> int:
        return max(s.value_dim for s in self.latents)

    @property
    def max_instances(self) -> int:
        return max(s.num_tokens for s in self.latents)

    def latent(self, name: str) -> LatentSite:
        for site in self.latents:
            if site.name == name:
                return site
        raise KeyError(name)

    def address_of(self, name: str) -> int:
        return [s.name for s in self.latents].index(name)

    def token_layout(self) -> dict[str, np.ndarray]:
        """Static per-token address, instance and distribution-type ids."""
        address, instance, dist_type = [], [], []
        for a, site in enumerate(self.latents):
            address += [a] * site.num_tokens
            instance += list(range(site.num_tokens))
            dist_type += [self.dist_types.index(site.dist_type)] * site.num_tokens
        as_int = lambda v: np.asarray(v, dtype=np.int32)
        return {"address": as_int(address), "instance": as_int(instance), "dist_type": as_int(dist_type)}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TraceSpec":
        raw = json.loads(text)
        tup = lambda v: tuple(tuple(x) if isinstance(x, list) else x for x in v)
        latents = tuple(
            LatentSite(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()}) for s in raw["latents"]
        )
        observed = tuple(ObservedSite(name=o["name"], shape=tuple(o["shape"])) for o in raw["observed"])
        return cls(latents=latents, observed=observed, dist_types=tup(raw["dist_types"]))

    def describe_difference(self, other: "TraceSpec") -> str:
        """Human-readable list of what differs between two specs ('' when equal)."""
        lines = []
        mine = {s.name: s for s in self.latents}
        theirs = {s.name: s for s in other.latents}
        for name in mine.keys() - theirs.keys():
            lines.append(f"latent site '{name}' is only in the checkpoint")
        for name in theirs.keys() - mine.keys():
            lines.append(f"latent site '{name}' is only in the model")
        for name in mine.keys() & theirs.keys():
            a, b = dataclasses.asdict(mine[name]), dataclasses.asdict(theirs[name])
            for field in a:
                if a[field] != b[field]:
                    lines.append(f"site '{name}': {field} is {a[field]} in the checkpoint but {b[field]} in the model")
        if [o for o in self.observed] != [o for o in other.observed]:
            lines.append(f"observed sites differ: checkpoint {self.observed}, model {other.observed}")
        if not lines and self != other:
            lines.append("the order of latent sites differs")
        return "\n".join(sorted(lines))


def innermost_distribution(fn):
    """Strip MaskedDistribution wrappers, returning the base distribution."""
    while isinstance(fn, MaskedDistribution):
        fn = fn.base_dist
    return fn


def site_mask(fn, batch_shape: Sequence[int]) -> jax.Array:
    """The executed-mask of a site, from every ``handlers.mask`` that wraps its distribution."""
    mask = jnp.ones(batch_shape, dtype=bool)
    while isinstance(fn, MaskedDistribution):
        mask = mask & jnp.broadcast_to(jnp.asarray(fn._mask, dtype=bool), batch_shape)
        fn = fn.base_dist
    return mask


def _finite_discrete_range(name: str, support) -> tuple[int, int]:
    if support is constraints.boolean:
        return 0, 1
    if isinstance(support, constraints.integer_interval):
        lower, upper = np.asarray(support.lower_bound), np.asarray(support.upper_bound)
        if lower.size != 1 or upper.size != 1:
            raise UnsupportedDistributionError(
                f"site '{name}' has a discrete support {support} whose bounds vary across its batch; "
                "give every element the same bounds (e.g. one Categorical with a shared probs vector)."
            )
        return int(lower.reshape(())), int(upper.reshape(()))
    raise UnsupportedDistributionError(
        f"site '{name}' has discrete support {type(support).__name__} ({support}) and jaxic has no proposal head "
        "for it yet (finite supports are supported: Bernoulli, Categorical, DiscreteUniform). "
        "Mark the site to be sampled from its prior or rewrite it with a finite support."
    )


def _latent_site(name: str, msg: dict, offset: int) -> LatentSite:
    fn = innermost_distribution(msg["fn"])
    value = jnp.asarray(msg["value"])
    batch_shape = tuple(fn.batch_shape)
    event_shape = tuple(fn.event_shape)
    support = fn.support
    if support.is_discrete:
        if event_shape:
            raise UnsupportedDistributionError(
                f"site '{name}' is a discrete distribution with event shape {event_shape}; jaxic proposes discrete "
                "sites element by element: use scalar events inside a plate instead."
            )
        lower, upper = _finite_discrete_range(name, support)
        return LatentSite(name, type(fn).__name__, str(support), batch_shape, event_shape, (), True,
                          upper - lower + 1, lower, offset)
    try:
        transform = biject_to(support)
    except NotImplementedError:
        raise UnsupportedDistributionError(
            f"site '{name}' ({type(fn).__name__}) has support {support}, which numpyro's biject_to cannot map to "
            "unconstrained space, so jaxic has no proposal head for it. Reparameterise the site with a supported "
            "support (real, positive, interval, simplex, ...)."
        ) from None
    unconstrained = transform.inv(value)
    unconstrained_event = tuple(jnp.shape(unconstrained)[len(batch_shape):])
    return LatentSite(name, type(fn).__name__, str(support), batch_shape, event_shape, unconstrained_event,
                      False, 0, 0, offset)


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside jax/numpyro/jaxic: where the user's model failed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not any(p in f.filename for p in ("/jax/", "/jaxlib/", "/numpyro/", "/jaxic/", "/flax/"))]
    if not frames:
        return "inside the model"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`"


def run_model(model: Callable, key: jax.Array) -> dict:
    """One execution of the model under ``seed`` + ``trace``: its ordered trace."""
    return handlers.trace(handlers.seed(model, key)).get_trace()


def check_jittable(model: Callable) -> None:
    """Raise :class:`UntraceableModelError` if the model cannot run under ``jax.jit``."""
    try:
        jax.eval_shape(lambda k: {n: s["value"] for n, s in run_model(model, k).items()
                                  if s["type"] == "sample"}, jax.random.key(0))
    except _JIT_FAILURES as exc:
        raise UntraceableModelError(
            f"the model cannot run under jax.jit: {type(exc).__name__} at {_user_frame(exc)}. "
            "This happens when Python control flow (if/while/int()) depends on a sampled value. "
            "Rewrite the branch with jnp.where, numpyro.contrib.control_flow.cond, or numpyro.handlers.mask "
            "so that every potential site runs and a mask says which executed."
        ) from None


def derive_trace_spec(model: Callable, observed: Sequence[str], key: jax.Array | None = None) -> TraceSpec:
    """Run the model once and derive its :class:`TraceSpec`.

    ``model`` takes no arguments (bind them with ``functools.partial``). ``observed``
    names the sites jaxic simulates during training and conditions on at inference.

    Example:
        >>> spec = derive_trace_spec(functools.partial(model, M=2), observed=["obs"])
    """
    if isinstance(observed, str):
        observed = [observed]
    key = jax.random.key(0) if key is None else key
    try:
        trace = run_model(model, key)
    except Exception as exc:  # the user's code failed: say where
        raise ModelError(f"the model raised {type(exc).__name__}: {exc} (at {_user_frame(exc)})") from exc
    samples = {n: s for n, s in trace.items() if s["type"] == "sample"}
    for name in observed:
        if name not in samples:
            raise ObservationError(
                f"observed site '{name}' is not a sample site of the model; its sample sites are {sorted(samples)}."
            )
        if samples[name]["is_observed"]:
            raise ObservationError(
                f"observed site '{name}' already has a value inside the model (obs=...). jaxic simulates observed "
                "sites during training: call the model so that the site's obs is None (e.g. model(data=None))."
            )
    latents, offset = [], 0
    for name, msg in samples.items():
        if name in observed or msg["is_observed"]:
            continue
        site = _latent_site(name, msg, offset)
        latents.append(site)
        offset += site.num_tokens
    if not latents:
        raise ModelError(
            f"the model has no latent sample sites (sites: {sorted(samples)}, observed: {list(observed)}); "
            "there is nothing to infer."
        )
    obs_sites = tuple(ObservedSite(n, tuple(jnp.shape(samples[n]["value"]))) for n in observed)
    check_jittable(model)
    dist_types = tuple(sorted({s.dist_type for s in latents}))
    return TraceSpec(latents=tuple(latents), observed=obs_sites, dist_types=dist_types)


def as_tokens(site: LatentSite, fn, value: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """A site's value as token values ``(num_tokens, width)`` and log|det J| ``(num_tokens,)``.

    The Jacobian is that of the map from unconstrained token value to model value,
    so ``log q(x) = log q(u) - log|det J|``.
    """
    n = site.num_tokens
    if site.is_discrete:
        index = (jnp.asarray(value) - site.lower).reshape(n, 1).astype(jnp.float32)
        return jnp.pad(index, ((0, 0), (0, width - 1))), jnp.zeros(n)
    transform = biject_to(innermost_distribution(fn).support)
    u = transform.inv(value)
    log_det = transform.log_abs_det_jacobian(u, value)
    log_det = jnp.broadcast_to(log_det, site.batch_shape + jnp.shape(log_det)[len(site.batch_shape):])
    flat = u.reshape(n, site.value_dim).astype(jnp.float32)
    return jnp.pad(flat, ((0, 0), (0, width - site.value_dim))), log_det.reshape(n, -1).sum(-1)


def from_tokens(site: LatentSite, fn, tokens: jax.Array) -> jax.Array:
    """Inverse of :func:`as_tokens`: token values ``(num_tokens, width)`` to the model value."""
    if site.is_discrete:
        return (jnp.round(tokens[:, 0]).astype(jnp.int32) + site.lower).reshape(site.batch_shape)
    transform = biject_to(innermost_distribution(fn).support)
    u = tokens[:, : site.value_dim].reshape(site.batch_shape + site.unconstrained_event_shape)
    return transform(u)
