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
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import distributions as dist, handlers
from numpyro.distributions import constraints
from numpyro.distributions.distribution import MaskedDistribution
from numpyro.distributions.transforms import biject_to
from numpyro.contrib.control_flow.scan import scan_wrapper
from numpyro.primitives import Messenger

from jaxic.errors import (JaxicError, ModelError, NoLikelihoodError, ObservationError, UnsupportedDistributionError,
                          UntraceableModelError)
from jaxic.tracing import limits

# What jax raises when a model branches in Python on a traced value (the universal path's cue).
JIT_FAILURES = (
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
    the token, or with ``elementwise`` one token per element of the unconstrained event too
    (the proposal then draws element i given elements < i: correlated vectors). Finite
    discrete sites store the category index ``value - lower``.
    """

    name: str
    dist_type: str
    support: str
    batch_shape: tuple[int, ...]
    event_shape: tuple[int, ...]
    unconstrained_event_shape: tuple[int, ...]
    is_discrete: bool
    num_categories: int  # 0 for continuous sites
    lower: int  # smallest value of a discrete support
    offset: int  # first token position
    propose: bool = True  # False: drawn from its prior at inference (``infer={"jaxic": {"propose": False}}``)
    scan_length: int = 0  # > 0: the site runs inside ``scan``; its leading batch axis is time
    stride: int = 0  # tokens between consecutive time steps of a scanned site
    raw: bool = False  # value stored as is (prior-only sites whose support has no encoding)
    elementwise: bool = False  # one token per element of the unconstrained event (``infer={"jaxic": ...}``)

    @property
    def event_tokens(self) -> int:
        """Tokens per element of the batch shape: the unconstrained event's size if ``elementwise``, else 1."""
        return math.prod(self.unconstrained_event_shape) if self.elementwise else 1

    @property
    def num_tokens(self) -> int:
        return math.prod(self.batch_shape) * self.event_tokens

    @property
    def is_unbounded(self) -> bool:
        """An integer support with no upper bound (Poisson, Geometric, ...)."""
        return self.is_discrete and self.num_categories == 0

    @property
    def step_tokens(self) -> int:
        """Tokens per time step of a scanned site (all tokens otherwise)."""
        return self.num_tokens // self.scan_length if self.scan_length else self.num_tokens

    def positions(self) -> np.ndarray:
        """Token positions of this site's elements (time-major interleaving inside ``scan``)."""
        if not self.scan_length:
            return np.arange(self.offset, self.offset + self.num_tokens)
        steps = np.arange(self.scan_length)[:, None] * self.stride
        return (self.offset + steps + np.arange(self.step_tokens)[None, :]).reshape(-1)

    def one_step(self) -> "LatentSite":
        """The site as seen inside one step of its ``scan`` body (time axis dropped)."""
        return dataclasses.replace(self, batch_shape=self.batch_shape[1:], scan_length=0, stride=0)

    @property
    def value_dim(self) -> int:
        return 1 if self.is_discrete or self.elementwise else math.prod(self.unconstrained_event_shape)


OBSERVATION_SCALES = ("linear", "log", "logit")


@dataclasses.dataclass(frozen=True)
class ObservedSite:
    """A site that is simulated during training and conditioned on at inference.

    ``scale``: how the network sees its values, from the site's support: ``"log"`` for positive
    supports (log-normal, gamma, ... observations span orders of magnitude), ``"logit"`` for the unit
    interval, ``"linear"`` otherwise (and for specs saved before the field existed).
    ``has_likelihood``: False when the site is a ``Delta`` holding a simulator's output (a black-box
    simulator's summary statistics): the proposal learns from it, but p(obs | latents) does not exist,
    so importance sampling, the evidence and the ELBO/RWS objectives refuse it.
    """

    name: str
    shape: tuple[int, ...]
    scale: str = "linear"
    has_likelihood: bool = True

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def features(self, value: jax.Array) -> jax.Array:
        """``value`` on the site's ``scale`` (clipped into the open support, so always finite for finite input).

        Example:
            >>> ObservedSite("obs", (3,), "log").features(jnp.array([1.0, 10.0, 100.0]))   # [0, 2.3, 4.6]
        """
        if self.scale == "log":
            return jnp.log(jnp.maximum(jnp.asarray(value, jnp.float32), jnp.finfo(jnp.float32).tiny))
        if self.scale == "logit":
            eps = jnp.finfo(jnp.float32).eps
            return jax.scipy.special.logit(jnp.clip(jnp.asarray(value, jnp.float32), eps, 1 - eps))
        return jnp.asarray(value)


def observation_scale(name: str, msg: dict) -> str:
    """The :class:`ObservedSite` scale of the observed site ``name`` (its trace entry ``msg``): the site's
    ``infer={"jaxic": {"scale": ...}}`` if given, else from its support."""
    options = (msg.get("infer") or {}).get("jaxic", {})
    if set(options) - {"scale"}:
        raise ModelError(f"observed site '{name}' has unknown jaxic options {sorted(set(options) - {'scale'})} in "
                         f"infer={{'jaxic': ...}}; an observed site takes 'scale' ({' / '.join(OBSERVATION_SCALES)}: "
                         "how the network reads its values).")
    if "scale" in options:
        if options["scale"] not in OBSERVATION_SCALES:
            raise ModelError(f"observed site '{name}' has infer={{'jaxic': {{'scale': {options['scale']!r}}}}}; "
                             f"it must be one of {', '.join(map(repr, OBSERVATION_SCALES))}.")
        return options["scale"]
    support = msg["fn"].support
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    if support is constraints.positive or support is constraints.softplus_positive:
        return "log"
    if support is constraints.unit_interval:
        return "logit"
    return "linear"


def observation_has_likelihood(msg: dict) -> bool:
    """False when an observed site's distribution is a point mass (``Delta``, possibly masked, expanded or
    made independent): a simulator's output observed as it is, with no density p(obs | latents).

    Example:
        >>> observation_has_likelihood({"fn": dist.Delta(jnp.zeros(3), event_dim=1)})
        False
    """
    fn = msg["fn"]
    while isinstance(fn, (MaskedDistribution, dist.ExpandedDistribution, dist.Independent)):
        fn = fn.base_dist
    return not isinstance(fn, dist.Delta)


def observed_site(name: str, msg: dict) -> ObservedSite:
    """The :class:`ObservedSite` of the observed site ``name``, its trace entry ``msg``.

    Example:
        >>> observed_site("obs", trace["obs"]).scale   # "log" for a LogNormal observation
    """
    return ObservedSite(name, tuple(jnp.shape(msg["value"])), observation_scale(name, msg),
                        observation_has_likelihood(msg))


@dataclasses.dataclass(frozen=True)
class DeterministicSite:
    """A ``numpyro.deterministic`` site: a value computed from the latents, reported with them."""

    name: str
    shape: tuple[int, ...]


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
    # Universal (eager) path: tokens are packed in execution order up to ``max_tokens``.
    dynamic: bool = False
    max_tokens: int = 0
    # Universal path: bounds on one eager model run (sample sites; seconds, None: the default).
    # They bound runs without changing the layout, so specs that differ only in them are equal.
    max_sites_per_run: int | None = dataclasses.field(default=None, compare=False)
    run_timeout: float | None = dataclasses.field(default=None, compare=False)
    # Deterministic sites (in execution order) with their shapes. They own no tokens, so the
    # proposal does not depend on them: specs (and checkpoints) that differ only in them are equal.
    deterministic: tuple[DeterministicSite, ...] = dataclasses.field(default=(), compare=False)

    @property
    def num_tokens(self) -> int:
        return self.max_tokens if self.dynamic else sum(s.num_tokens for s in self.latents)

    @property
    def value_dim(self) -> int:
        return max(s.value_dim for s in self.latents)

    @property
    def site_limit(self) -> int:
        """Most sample sites one eager run may reach: ``max_sites_per_run``, or for specs saved
        before it was stored, a bound derived from ``max_tokens`` with the same margin."""
        if self.max_sites_per_run:
            return int(self.max_sites_per_run)
        return 4 * (self.num_tokens + len(self.observed)) + 100

    @property
    def timeout(self) -> float | None:
        """Seconds one eager run may take (None: no limit); ``run_timeout`` or the default
        :data:`jaxic.tracing.limits.DEFAULT_RUN_TIMEOUT`."""
        return limits.resolve_timeout(self.run_timeout)

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

    def token_order(self) -> np.ndarray:
        """Permutation taking site-by-site concatenated tokens to token positions."""
        return np.argsort(np.concatenate([s.positions() for s in self.latents]), kind="stable")

    def token_layout(self) -> dict[str, np.ndarray]:
        """Static per-token address, instance and distribution-type ids (fixed layouts only)."""
        address, instance, dist_type = [], [], []
        for a, site in enumerate(self.latents):
            address += [a] * site.num_tokens
            instance += list(range(site.num_tokens))
            dist_type += [self.dist_types.index(site.dist_type)] * site.num_tokens
        order = self.token_order()
        as_int = lambda v: np.asarray(v, dtype=np.int32)[order]
        return {"address": as_int(address), "instance": as_int(instance), "dist_type": as_int(dist_type)}

    @property
    def likelihood_free(self) -> tuple[str, ...]:
        """Names of the observed sites that are a simulator's output with no likelihood (``Delta``)."""
        return tuple(o.name for o in self.observed if not o.has_likelihood)

    def check_likelihood(self, needed_for: str) -> None:
        """Raise :class:`jaxic.NoLikelihoodError` if an observed site has no likelihood, saying what needed it.

        Example:
            >>> spec.check_likelihood("importance sampling")
        """
        if self.likelihood_free:
            names = ", ".join(f"'{n}'" for n in self.likelihood_free)
            raise NoLikelihoodError(
                f"{needed_for} cannot run: it needs p(obs | latents), but observed site {names} is a Delta: a "
                "simulator's output with no likelihood. The amortized posterior needs none: draw from it with "
                "compiled.sample(key, observations, n) (as NPE does), or give the site a noise model (e.g. "
                "dist.Normal(value, noise)) if its values are noisy measurements."
            )

    def with_likelihood_of(self, model_spec: "TraceSpec") -> "TraceSpec":
        """This spec with each observed site's ``has_likelihood`` taken from ``model_spec`` (the model's own,
        freshly derived): a trace dataset written before the field existed reads it as True.

        Example:
            >>> saved.with_likelihood_of(derive_trace_spec(model, ["obs"])).likelihood_free   # ('obs',)
        """
        fresh = {o.name: o.has_likelihood for o in model_spec.observed}
        return dataclasses.replace(self, observed=tuple(
            dataclasses.replace(o, has_likelihood=fresh.get(o.name, o.has_likelihood)) for o in self.observed))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TraceSpec":
        raw = json.loads(text)
        tup = lambda v: tuple(tuple(x) if isinstance(x, list) else x for x in v)
        latents = tuple(
            LatentSite(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()}) for s in raw["latents"]
        )
        observed = tuple(ObservedSite(name=o["name"], shape=tuple(o["shape"]), scale=o.get("scale", "linear"),
                                      has_likelihood=o.get("has_likelihood", True)) for o in raw["observed"])
        return cls(latents=latents, observed=observed, dist_types=tup(raw["dist_types"]),
                   dynamic=raw.get("dynamic", False), max_tokens=raw.get("max_tokens", 0),
                   max_sites_per_run=raw.get("max_sites_per_run"), run_timeout=raw.get("run_timeout"),
                   deterministic=tuple(DeterministicSite(d["name"], tuple(d["shape"]))
                                       for d in raw.get("deterministic", ())))

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
        # An observed site's scale is how the network was trained to read it, not part of the model.
        if [(o.name, o.shape) for o in self.observed] != [(o.name, o.shape) for o in other.observed]:
            lines.append(f"observed sites differ: checkpoint {self.observed}, model {other.observed}")
        if not lines and dataclasses.replace(self, observed=other.observed) != other:
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


def token_mask(site: "LatentSite", fn) -> jax.Array:
    """The executed-mask of each of a site's tokens ``(num_tokens,)`` (an event's tokens share its element's).

    Example:
        >>> token_mask(spec.latent("x"), trace["x"]["fn"])
    """
    return jnp.repeat(site_mask(fn, site.batch_shape).reshape(-1), site.event_tokens)


def _scalar_bound(name: str, support, bound) -> int:
    bound = np.asarray(bound)
    if bound.size != 1:
        raise UnsupportedDistributionError(
            f"site '{name}' has a discrete support {support} whose bounds vary across its batch; "
            "give every element the same bounds (e.g. one Categorical with a shared probs vector)."
        )
    return int(bound.reshape(()))


def _discrete_range(name: str, support) -> tuple[int, int | None]:
    """``(lower, upper)`` of a discrete support; ``upper`` is None when unbounded."""
    if support is constraints.boolean:
        return 0, 1
    if isinstance(support, constraints.integer_interval):
        return _scalar_bound(name, support, support.lower_bound), _scalar_bound(name, support, support.upper_bound)
    if isinstance(support, constraints.integer_greater_than):
        return _scalar_bound(name, support, support.lower_bound), None
    raise UnsupportedDistributionError(
        f"site '{name}' has discrete support {type(support).__name__} ({support}) and jaxic has no proposal head "
        "for it yet (supported: finite supports such as Bernoulli, Categorical, DiscreteUniform, Binomial, and "
        "integers with a lower bound such as Poisson, Geometric, NegativeBinomial). "
        'Mark the site to be drawn from its prior with infer={"jaxic": {"propose": False}}.'
    )


SITE_OPTIONS = {"propose": "False draws the site from its prior",
                "elementwise": "True gives each element of a vector site its own token, False one token for all"}


def _site_options(name: str, msg: dict) -> tuple[bool, bool | None]:
    """``(propose, elementwise)`` from the site's ``infer={"jaxic": {...}}`` (``elementwise`` None: the default)."""
    options = (msg.get("infer") or {}).get("jaxic", {})
    unknown = set(options) - set(SITE_OPTIONS)
    if unknown:
        raise ModelError(f"site '{name}' has unknown jaxic options {sorted(unknown)} in infer={{'jaxic': ...}}; "
                         "the options are " + "; ".join(f"'{k}' ({v})" for k, v in SITE_OPTIONS.items()) + ".")
    elementwise = options.get("elementwise")
    if elementwise is not None and not isinstance(elementwise, (bool, np.bool_)):
        raise ModelError(f"site '{name}' has infer={{'jaxic': {{'elementwise': {elementwise!r}}}}}; "
                         "it must be True or False.")
    return bool(options.get("propose", True)), None if elementwise is None else bool(elementwise)


def default_elementwise(unconstrained_event_shape: Sequence[int]) -> bool:
    """Whether a continuous vector site gets one token per element when its ``infer`` does not say:
    vectors of 2 to ``ELEMENTWISE_MAX`` unconstrained elements. Measured (benchmarks/RESULTS.md,
    "Correlated Gaussian", D = 5, neighbour correlations -0.98, 3 seeds): forward KL to the exact
    posterior 1.27 with one diagonal-mixture token, 0.17 element by element; ESS/N 0.15 and 0.74.

    Example:
        >>> default_elementwise((5,)), default_elementwise(())
        (True, False)
    """
    return 2 <= math.prod(unconstrained_event_shape) <= ELEMENTWISE_MAX


# Longer vectors keep one token by default: every element adds a token, and decoding cost grows with the
# square of the number of tokens.
ELEMENTWISE_MAX = 16


def _encoded_site(name: str, fn, value, offset: int, propose: bool, elementwise: bool | None = None) -> LatentSite:
    batch_shape = tuple(fn.batch_shape)
    event_shape = tuple(fn.event_shape)
    support = fn.support
    if support.is_discrete:
        if event_shape:
            raise UnsupportedDistributionError(
                f"site '{name}' is a discrete distribution with event shape {event_shape}; jaxic proposes discrete "
                "sites element by element: use scalar events inside a plate instead."
            )
        lower, upper = _discrete_range(name, support)
        num_categories = 0 if upper is None else upper - lower + 1
        return LatentSite(name, type(fn).__name__, str(support), batch_shape, event_shape, (), True,
                          num_categories, lower, offset, propose=propose)
    try:
        transform = biject_to(support)
    except NotImplementedError:
        raise UnsupportedDistributionError(
            f"site '{name}' ({type(fn).__name__}) has support {support}, which numpyro's biject_to cannot map to "
            "unconstrained space, so jaxic has no proposal head for it. Reparameterise the site with a supported "
            "support (real, positive, interval, simplex, ...) or draw it from its prior with "
            'infer={"jaxic": {"propose": False}}.'
        ) from None
    unconstrained = transform.inv(value)
    unconstrained_event = tuple(jnp.shape(unconstrained)[len(batch_shape):])
    elementwise = default_elementwise(unconstrained_event) if elementwise is None else elementwise
    return LatentSite(name, type(fn).__name__, str(support), batch_shape, event_shape, unconstrained_event,
                      False, 0, 0, offset, propose=propose, elementwise=elementwise and bool(unconstrained_event))


def latent_site(name: str, msg: dict, offset: int, elementwise: bool | None = None) -> LatentSite:
    """The :class:`LatentSite` of one traced sample message, its tokens starting at ``offset``.

    A site that cannot be encoded for a head but is drawn from its prior
    (``infer={"jaxic": {"propose": False}}``) becomes a raw token. ``elementwise``: the default for
    a vector site whose ``infer`` does not say (None: :func:`default_elementwise`).

    Example:
        >>> site = latent_site("x", trace["x"], 0)
    """
    fn = innermost_distribution(msg["fn"])
    value = jnp.asarray(msg["value"])
    propose, chosen = _site_options(name, msg)
    elementwise = elementwise if chosen is None else chosen
    try:
        return _encoded_site(name, fn, value, offset, propose, elementwise)
    except UnsupportedDistributionError:
        if propose:
            raise
    # Drawn from its prior, so no head is needed: the token carries the raw value to later sites.
    event_shape = tuple(fn.event_shape)
    return LatentSite(name, type(fn).__name__, str(fn.support), tuple(fn.batch_shape), event_shape, event_shape,
                      False, 0, 0, offset, propose=False, raw=True)


def user_frame(exc: BaseException) -> str:
    """The innermost traceback frame of the user's code: where the model failed.

    Example:
        >>> raise ModelError(f"the model raised {type(exc).__name__} (at {user_frame(exc)})")
    """
    return limits.user_frame(exc)


def _binomial_base(fn):
    """The Binomial under ``fn``'s wrappers (independent, expanded, masked), or None."""
    while isinstance(fn, (dist.Independent, dist.ExpandedDistribution, MaskedDistribution)):
        fn = fn.base_dist
    return fn if isinstance(fn, (dist.BinomialProbs, dist.BinomialLogits)) else None


class binomial_draws(Messenger):
    """Draw the model's unobserved Binomial sites with ``jax.random.binomial`` (same distribution,
    other random stream). numpyro's own Binomial sampler, vmapped over traces, never returns for
    rare (key, p) on CPU with jaxlib 0.10.2 (an XLA fault; ``benchmarks/binomial_stall.py``), and jaxic
    vmaps every model over traces. Put it outside ``seed``, which hands each site its key first.

    Example:
        >>> trace = handlers.trace(binomial_draws(handlers.seed(model, key))).get_trace()
    """

    def process_message(self, msg):
        if msg["type"] != "sample" or msg["value"] is not None or msg["is_observed"]:
            return
        base, key = _binomial_base(msg["fn"]), msg["kwargs"].get("rng_key")
        if base is None or key is None:
            return
        fn = msg["fn"]
        shape = tuple(msg["kwargs"].get("sample_shape", ())) + fn.batch_shape + fn.event_shape
        count, probs = jnp.broadcast_to(base.total_count, shape), jnp.broadcast_to(base.probs, shape)
        draw = jax.random.binomial(key, count.astype(probs.dtype), probs, shape)
        msg["value"], msg["intermediates"] = draw.astype(jnp.result_type(base.total_count)), []


def run_model(model: Callable, key: jax.Array) -> dict:
    """One execution of the model under ``seed`` + ``trace``: its ordered trace (Binomial sites drawn
    by :class:`binomial_draws`)."""
    return handlers.trace(binomial_draws(handlers.seed(model, key))).get_trace()


def abstract_trace(model: Callable, key: jax.Array | None = None) -> dict:
    """The model's trace with abstract values: names, plates, distributions and shapes,
    without running (or compiling) any of its computation.

    Example:
        >>> trace = abstract_trace(functools.partial(model, M=2))
        >>> trace["x"]["value"].shape
    """
    captured: dict = {}

    def run(k):
        captured.update(run_model(model, k))
        return 0

    jax.eval_shape(run, jax.random.key(0) if key is None else key)
    return captured


def check_jittable(model: Callable) -> None:
    """Raise :class:`UntraceableModelError` if the model cannot run under ``jax.jit``."""
    try:
        jax.eval_shape(lambda k: {n: s["value"] for n, s in run_model(model, k).items()
                                  if s["type"] == "sample"}, jax.random.key(0))
    except JIT_FAILURES as exc:
        raise UntraceableModelError(
            f"the model cannot run under jax.jit: {type(exc).__name__} at {user_frame(exc)}. "
            "This happens when Python control flow (if/while/int()) depends on a sampled value. "
            "Rewrite the branch with jnp.where, numpyro.contrib.control_flow.cond, or numpyro.handlers.mask "
            "so that every potential site runs and a mask says which executed."
        ) from None


def derive_trace_spec(model: Callable, observed: Sequence[str], key: jax.Array | None = None, *,
                      elementwise: bool | None = None) -> TraceSpec:
    """Run the model once and derive its :class:`TraceSpec`.

    ``model`` takes no arguments (bind them with ``functools.partial``). ``observed``
    names the sites jaxic simulates during training and conditions on at inference.
    ``elementwise``: whether vector sites whose ``infer`` does not say get one token per element
    (None: :func:`default_elementwise` decides per site).

    Example:
        >>> spec = derive_trace_spec(functools.partial(model, M=2), observed=["obs"])
    """
    if isinstance(observed, str):
        observed = [observed]
    key = jax.random.key(0) if key is None else key
    recorder = ScanRecorder()
    try:
        with recorder:
            trace = run_model(model, key)
    except JaxicError:
        raise
    except Exception as exc:  # the user's code failed: say where
        raise ModelError(f"the model raised {type(exc).__name__}: {exc} (at {user_frame(exc)})") from exc
    samples = {n: s for n, s in trace.items() if s["type"] == "sample"}
    check_observed(samples, observed, trace)
    latents = _lay_out(samples, observed, recorder.groups, elementwise)
    obs_sites = tuple(observed_site(n, samples[n]) for n in observed)
    check_jittable(model)
    dist_types = tuple(sorted({s.dist_type for s in latents}))
    return TraceSpec(latents=tuple(latents), observed=obs_sites, dist_types=dist_types,
                     deterministic=deterministic_sites(trace))


def deterministic_sites(trace: dict) -> tuple[DeterministicSite, ...]:
    """The ``numpyro.deterministic`` sites of one trace, in execution order, with their shapes.

    Example:
        >>> [d.name for d in deterministic_sites(run_model(model, jax.random.key(0)))]
        ['mu']
    """
    return tuple(DeterministicSite(n, tuple(jnp.shape(m["value"]))) for n, m in trace.items()
                 if m["type"] == "deterministic")


def deterministic_values(trace: dict, spec: TraceSpec) -> dict[str, jax.Array]:
    """Values of the spec's deterministic sites in one trace of a jittable (masked-path) model,
    where every site runs on every execution.

    Example:
        >>> deterministic_values(run_model(model, jax.random.key(0)), spec)
        {'mu': Array(1.3, dtype=float32)}
    """
    out = {}
    for site in spec.deterministic:
        if site.name not in trace:
            raise ModelError(f"deterministic site '{site.name}' did not run in this execution but did when the "
                             "trace spec was derived; on the masked path every site runs on every execution "
                             "(compute the value unconditionally, e.g. with jnp.where).")
        value = jnp.asarray(trace[site.name]["value"])
        if value.shape != site.shape:
            raise ModelError(shape_change_message(site.name, site.shape, value.shape))
        out[site.name] = value
    return out


def shape_change_message(name: str, known: tuple, shape: tuple) -> str:
    """Why a deterministic site whose shape changes between runs cannot be reported, and the fix."""
    return (f"deterministic site '{name}' has shape {tuple(known)} in one run and {tuple(shape)} in another; jaxic "
            "stacks a site's values over particles, so it needs one shape. Record a fixed-shape value (e.g. pad "
            "it to its largest size with jnp.pad and record the length as its own deterministic site), or give "
            "differently-shaped values distinct names (e.g. f'" + name + "_{i}').")


class ScanRecorder(Messenger):
    """Records which sample sites each ``numpyro.contrib.control_flow.scan`` produced."""

    def __init__(self, fn=None):
        self.groups: list[tuple[str, ...]] = []
        super().__init__(fn)

    def postprocess_message(self, msg):
        if msg["type"] != "control_flow" or msg["fn"] is not scan_wrapper:
            return
        if msg["args"][4]:
            raise ModelError("jaxic does not support scan(..., reverse=True): its sites must run forward in time.")
        (_, (pytree_trace, _)) = msg["value"]
        self.groups.append(tuple(n for n, site in pytree_trace.trace.items() if site["type"] == "sample"))


def check_observed(samples: dict, observed: Sequence[str], trace: dict | None = None) -> None:
    """Each name in ``observed`` must be a sample site of the model whose value jaxic can simulate."""
    for name in observed:
        if name not in samples and trace is not None and trace.get(name, {}).get("type") == "deterministic":
            raise ObservationError(
                f"observed site '{name}' is a numpyro.deterministic site; jaxic observes sample sites. Observe a "
                f"simulator's output with numpyro.sample('{name}', dist.Delta(value, event_dim=value.ndim), obs=obs) "
                "(compiled.sample then gives the amortized posterior, but importance sampling needs a likelihood), "
                f"or give it a noise model, e.g. numpyro.sample('{name}', dist.Normal(value, noise), obs=obs)."
            )
        if name not in samples:
            raise ObservationError(
                f"observed site '{name}' is not a sample site of the model; its sample sites are {sorted(samples)}."
            )
        if samples[name]["is_observed"]:
            raise ObservationError(
                f"observed site '{name}' already has a value inside the model (obs=...). jaxic simulates observed "
                "sites during training: call the model so that the site's obs is None (e.g. model(data=None))."
            )


def _lay_out(samples: dict, observed: Sequence[str], scan_groups: Sequence[tuple[str, ...]],
            elementwise: bool | None = None) -> list[LatentSite]:
    """Latent sites with token positions: in trace order, time-major inside each ``scan``
    (the order in which the model draws them, which is the order the proposal decodes them)."""
    latent_names = [n for n, msg in samples.items() if n not in observed and not msg["is_observed"]]
    if not latent_names:
        raise ModelError(
            f"the model has no latent sample sites (sites: {sorted(samples)}, observed: {list(observed)}); "
            "there is nothing to infer."
        )
    group_of = {name: group for group in scan_groups for name in group}
    latents, offset, done = [], 0, set()
    for name in latent_names:
        if name in done:
            continue
        members = [n for n in group_of.get(name, (name,)) if n in latent_names]
        sites = [latent_site(n, samples[n], 0, elementwise) for n in members]
        if name in group_of:
            length = sites[0].batch_shape[0]
            stride = sum(s.num_tokens // length for s in sites)
            within = 0
            for s in sites:
                latents.append(dataclasses.replace(s, offset=offset + within, scan_length=length, stride=stride))
                within += s.num_tokens // length
            offset += length * stride
        else:
            latents.append(dataclasses.replace(sites[0], offset=offset))
            offset += sites[0].num_tokens
        done.update(members)
    return latents


def as_tokens(site: LatentSite, fn, value: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """A site's value as token values ``(num_tokens, width)`` and log|det J| ``(num_tokens,)``.

    The Jacobian is that of the map from unconstrained token value to model value,
    so ``log q(x) = log q(u) - log|det J|``.
    """
    n = site.num_tokens
    if site.is_discrete or site.raw:
        flat = (jnp.asarray(value) - site.lower).reshape(n, site.value_dim).astype(jnp.float32)
        return jnp.pad(flat, ((0, 0), (0, width - site.value_dim))), jnp.zeros(n)
    transform = biject_to(innermost_distribution(fn).support)
    u = transform.inv(value)
    log_det = transform.log_abs_det_jacobian(u, value)
    log_det = jnp.broadcast_to(log_det, site.batch_shape + jnp.shape(log_det)[len(site.batch_shape):])
    flat = u.reshape(n, site.value_dim).astype(jnp.float32)
    elements = n // site.event_tokens
    log_det = log_det.reshape(elements, -1).sum(-1)
    if site.event_tokens > 1:  # an event's Jacobian goes with its last token (log q sums over all of them)
        log_det = jnp.zeros((elements, site.event_tokens)).at[:, -1].set(log_det).reshape(-1)
    return jnp.pad(flat, ((0, 0), (0, width - site.value_dim))), log_det


def from_tokens(site: LatentSite, fn, tokens: jax.Array) -> jax.Array:
    """Inverse of :func:`as_tokens`: token values ``(num_tokens, width)`` to the model value."""
    if site.is_discrete:
        return (jnp.round(tokens[:, 0]).astype(jnp.int32) + site.lower).reshape(site.batch_shape)
    transform = biject_to(innermost_distribution(fn).support)
    u = tokens[:, : site.value_dim].reshape(site.batch_shape + site.unconstrained_event_shape)
    return transform(u)
