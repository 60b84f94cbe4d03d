"""Up-front checks of user input: observations, arguments and latent distributions.

Every check runs on the host (numpy) before anything is traced or compiled, and fails
with an error from :mod:`jaxic.errors` that names the site, argument or row at fault
and says how to fix it.

Example:
    >>> from jaxic import validation
    >>> validation.positive_int("num_samples", 1000)
    1000
    >>> supports = validation.observed_supports(model, ["obs"])
    >>> values, batch_shape = validation.check_observations(spec, {"obs": 25.0}, supports)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.distributions import Distribution, ImproperUniform
from numpyro.distributions.distribution import ExpandedDistribution, Independent, MaskedDistribution
from numpyro.primitives import Messenger

from jaxic.errors import IndexOutOfRangeError, JaxicError, ObservationError, UnsupportedDistributionError

__all__ = ["check_observations", "observed_supports", "positive_int", "nonnegative_int", "positive_float",
           "nonnegative_float", "prng_key", "observed_names", "model_callable", "probability", "index_in_range",
           "check_latent_distribution", "SupportedLatents"]

_MAX_LISTED = 5  # offending rows / elements quoted in a message


def _show(value: Any) -> str:
    """A short repr of a user value for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------------------------
# Arguments


def _integer(name: str, value: Any, minimum: int, what: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise JaxicError(f"{name} must be {what}, got the boolean {value!r}; pass a number such as {name}=10.")
    if isinstance(value, numbers.Integral):
        number = int(value)
    elif isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0 and not isinstance(value, jax.core.Tracer) \
            and np.issubdtype(np.asarray(value).dtype, np.integer):
        number = int(value)
    elif isinstance(value, numbers.Real):
        hint = f"{name}={int(value)}" if math.isfinite(value) and float(value).is_integer() else "a whole number"
        raise JaxicError(f"{name} must be {what}, got the float {value!r}; pass an int ({hint}).")
    else:
        raise JaxicError(f"{name} must be {what}, got {_show(value)} of type {type(value).__name__}; "
                         f"pass an int such as {name}={max(minimum, 1) * 10}.")
    if number < minimum:
        raise JaxicError(f"{name} must be {what}, got {number}; pass {name}>={minimum}.")
    return number


def positive_int(name: str, value: Any) -> int:
    """``value`` as a Python int ``>= 1`` (ints and numpy integers; floats, bools and strings are rejected).

    Example:
        >>> positive_int("batch_size", np.int64(64))
        64
    """
    return _integer(name, value, 1, "a positive integer")


def nonnegative_int(name: str, value: Any) -> int:
    """``value`` as a Python int ``>= 0`` (same rules as :func:`positive_int`).

    Example:
        >>> nonnegative_int("num_steps", 0)
        0
    """
    return _integer(name, value, 0, "a non-negative integer")


def _real_number(name: str, value: Any, what: str) -> float:
    """``value`` as a Python float if it is a real number (ints allowed; bools and strings rejected)."""
    scalar = isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0 and \
        not isinstance(value, jax.core.Tracer) and np.asarray(value).dtype.kind in "iuf"
    if isinstance(value, (bool, np.bool_)) or not (isinstance(value, numbers.Real) or scalar):
        raise JaxicError(f"{name} must be {what}, got {_show(value)} of type {type(value).__name__}; "
                         f"pass a float such as {name}=0.001.")
    try:
        return float(value)
    except OverflowError:
        return math.inf


def positive_float(name: str, value: Any) -> float:
    """``value`` as a finite Python float ``> 0`` (ints allowed; bools, strings, NaN and inf rejected).

    Example:
        >>> positive_float("learning_rate", 3e-3)
        0.003
    """
    number = _real_number(name, value, "a positive number")
    if not math.isfinite(number) or number <= 0:
        raise JaxicError(f"{name} must be a finite number > 0, got {number}; pass e.g. {name}=0.001.")
    return number


def nonnegative_float(name: str, value: Any) -> float:
    """``value`` as a finite Python float ``>= 0`` (ints allowed; bools, strings, NaN and inf rejected).

    Example:
        >>> nonnegative_float("weight_decay", 0)
        0.0
    """
    number = _real_number(name, value, "a non-negative number")
    if not math.isfinite(number) or number < 0:
        raise JaxicError(f"{name} must be a finite number >= 0, got {number}; pass e.g. {name}=0.0001.")
    return number


def prng_key(name: str, key: Any) -> jax.Array:
    """One JAX PRNG key, returned as a typed key: ``jax.random.key(0)``, or a legacy
    ``jax.random.PRNGKey(0)`` (a uint32 array of shape ``(2,)``, wrapped).

    Ints, numpy arrays, ``None`` and batches of keys are rejected.

    Example:
        >>> prng_key("key", jax.random.PRNGKey(0)).shape
        ()
    """
    hint = f"pass one key such as {name}=jax.random.key(0)"
    if not isinstance(key, jax.Array):
        extra = " (an int seed is not a key)" if isinstance(key, numbers.Integral) else ""
        raise JaxicError(f"{name} must be a JAX PRNG key, got {_show(key)} of type {type(key).__name__}{extra}; "
                         f"{hint}.")
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise JaxicError(f"{name} is a batch of keys of shape {key.shape}; {hint} (jaxic splits it itself).")
        return key
    if key.dtype == jnp.uint32 and key.shape == (2,):
        return jax.random.wrap_key_data(key)
    if key.dtype == jnp.uint32 and key.ndim == 2 and key.shape[-1] == 2:
        raise JaxicError(f"{name} is a batch of {key.shape[0]} legacy keys; {hint} (jaxic splits it itself).")
    raise JaxicError(f"{name} must be a JAX PRNG key, got an array of dtype {key.dtype} and shape {key.shape}; "
                     f"{hint}.")


def observed_names(observed: Any) -> list[str]:
    """The observed site names as a list: a non-empty sequence of distinct, non-empty strings
    (one string is one name).

    Example:
        >>> observed_names("obs")
        ['obs']
    """
    hint = 'pass the observed sites\' names, e.g. observed=["obs"]'
    if isinstance(observed, str):
        observed = [observed]
    if isinstance(observed, (bytes, Mapping)) or not isinstance(observed, Sequence):
        raise JaxicError(f"observed must be a list of site names, got {_show(observed)} of type "
                         f"{type(observed).__name__}; {hint}.")
    names = list(observed)
    if not names:
        raise JaxicError(f"observed is empty; jaxic conditions on observed sites: {hint}.")
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise JaxicError(f"observed must hold site names (non-empty strings), got {_show(bad[0])} in "
                         f"{_show(names)}; {hint}.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise JaxicError(f"observed names {repeated} more than once ({_show(names)}); list each site once.")
    return names


def model_callable(model: Any) -> Callable:
    """``model`` if it is a NumPyro model function (a callable that is not a distribution).

    Example:
        >>> model_callable(pedagogical) is pedagogical
        True
    """
    if isinstance(model, Distribution):
        raise JaxicError(f"model must be a NumPyro model function, got the distribution {_show(model)}; "
                         "wrap it: def model(): numpyro.sample('x', ...).")
    if not callable(model):
        raise JaxicError(f"model must be a NumPyro model function, got {_show(model)} of type "
                         f"{type(model).__name__}; pass the function itself (model, not model()).")
    return model


def probability(name: str, q: Any) -> Any:
    """``q`` unchanged if it is a probability in [0, 1] or a non-empty sequence of them.

    Example:
        >>> probability("q", [0.05, 0.95])
        [0.05, 0.95]
    """
    if isinstance(q, jax.core.Tracer):
        return q  # traced inside a user's jit: nothing to check on the host
    try:
        values = np.asarray(q)
    except Exception:
        values = np.asarray(None, dtype=object)
    if values.dtype.kind not in "iuf":  # bools, strings, complex, objects
        raise JaxicError(f"{name} must be a probability in [0, 1] or a sequence of them, got {_show(q)}; "
                         f"pass e.g. {name}=[0.05, 0.5, 0.95].")
    if values.ndim > 1 or values.size == 0:
        raise JaxicError(f"{name} must be one probability or a flat, non-empty sequence of them, got shape "
                         f"{values.shape}; pass e.g. {name}=[0.05, 0.5, 0.95].")
    outside = values[~((values >= 0) & (values <= 1))]
    if outside.size:
        raise JaxicError(f"{name} must lie in [0, 1], got {outside.reshape(-1)[0]} in {_show(q)}; quantiles are "
                         f"probabilities (the median is {name}=0.5).")
    return q


def index_in_range(index: Any, size: int) -> int | slice | np.ndarray:
    """``index`` into an axis of length ``size``, normalised: an int in ``[0, size)``, a slice,
    or an integer array. Out of range raises :class:`IndexOutOfRangeError` (an ``IndexError``,
    so ``for p in post`` stops at the end).

    Example:
        >>> index_in_range(-1, 3)
        2
    """
    if isinstance(index, slice):
        return index
    if isinstance(index, (bool, np.bool_)):
        raise JaxicError(f"index {index!r} is a boolean; index observation sets with an int in [0, {size}).")
    if isinstance(index, numbers.Integral):
        if not -size <= int(index) < size:
            raise IndexOutOfRangeError(f"index {int(index)} is out of range for {size} observation sets; "
                                       f"use 0 to {size - 1} (or -{size} to -1).")
        return int(index) % size
    try:
        array = np.asarray(index)
    except Exception:
        array = np.asarray(None, dtype=object)
    if np.issubdtype(array.dtype, np.integer) and array.ndim <= 1:
        bad = array[(array < -size) | (array >= size)]
        if bad.size:
            raise IndexOutOfRangeError(f"index {int(bad.reshape(-1)[0])} (in {_show(index)}) is out of range for "
                                       f"{size} observation sets; use 0 to {size - 1}.")
        return array % size if array.ndim else int(array) % size
    raise JaxicError(f"cannot index observation sets with {_show(index)} of type {type(index).__name__}; use an "
                     f"int in [0, {size}), a slice or a list of ints.")


# ----------------------------------------------------------------------------------------------
# Latent distributions


def _innermost(fn):
    while isinstance(fn, (MaskedDistribution, ExpandedDistribution, Independent)):
        fn = fn.base_dist
    return fn


def check_latent_distribution(name: str, fn: Any, observed: bool = False) -> None:
    """Raise :class:`UnsupportedDistributionError` if site ``name`` with distribution ``fn``
    cannot be simulated (improper or sampler-less) or, for a latent, is a point mass (``Delta``),
    which has no density for a proposal (or prior draw) to be weighed against.

    Example:
        >>> check_latent_distribution("x", dist.Delta(1.0))
        Traceback (most recent call last):
        UnsupportedDistributionError: site 'x' is a Delta ...
    """
    base = _innermost(fn)
    kind = type(base).__name__
    role = "observed site" if observed else "site"
    if isinstance(base, ImproperUniform):
        raise UnsupportedDistributionError(
            f"{role} '{name}' has an improper distribution (ImproperUniform on {base.support}): an improper prior "
            "cannot be simulated for inference compilation (it trains on draws from the model); give the site a "
            "proper prior (e.g. Normal, or LogNormal for a positive value)."
        )
    if type(base).sample is Distribution.sample and \
            type(base).sample_with_intermediates is Distribution.sample_with_intermediates:
        raise UnsupportedDistributionError(
            f"{role} '{name}' ({kind}) has no sampler, so it cannot be simulated for inference compilation (it "
            "trains on draws from the model); give the site a distribution numpyro can sample."
        )
    if not observed and kind == "Delta":
        raise UnsupportedDistributionError(
            f"site '{name}' is a Delta (a point mass): a Delta site has no density to propose; use "
            "numpyro.deterministic for a computed value, or observe it."
        )


class SupportedLatents(Messenger):
    """While active, every sample site the model is about to simulate is checked with
    :func:`check_latent_distribution` before numpyro samples it (whose own error for an
    improper prior is an empty ``NotImplementedError``).

    Example:
        >>> with SupportedLatents(["obs"]):
        ...     spec = derive_trace_spec(model, ["obs"])
    """

    def __init__(self, observed: Sequence[str], fn=None):
        self.observed = frozenset(observed)
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample" or msg.get("is_observed"):
            return
        check_latent_distribution(msg["name"], msg["fn"], msg["name"] in self.observed)


# ----------------------------------------------------------------------------------------------
# Observations


def observed_supports(model: Callable, observed: Sequence[str]) -> dict[str, Any]:
    """The support of each observed site, from one abstract run of ``model`` (arguments bound).

    Supports whose parameters depend on sampled values (traced) are left out, as are sites an
    untraceable model does not reach abstractly: only checkable supports are returned, with
    their parameters as numpy arrays.

    Example:
        >>> observed_supports(functools.partial(model, M=2), ["obs"])
        {'obs': Real()}
    """
    wanted = set(observed)
    found: dict[str, Any] = {}

    def run(key):
        with handlers.trace() as trace:
            try:
                handlers.seed(model, key)()
            finally:  # an untraceable model stops part way: keep the sites it reached
                for name, site in trace.items():
                    if name in wanted and site["type"] == "sample":
                        found[name] = _innermost(site["fn"]).support
        return 0

    try:
        jax.eval_shape(run, jax.random.key(0))
    except Exception:  # noqa: BLE001 - whatever stopped the run, the sites before it were recorded
        pass
    out = {}
    for name, support in found.items():
        leaves = jax.tree.leaves(support)
        if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
            continue  # bounds computed from sampled values: not checkable once for all observations
        try:
            out[name] = jax.tree.map(np.asarray, support)
        except Exception:  # noqa: BLE001 - a constraint that does not rebuild from numpy leaves: skip it
            continue
    return out


def _as_number_array(name: str, value: Any) -> np.ndarray:
    hint = f"pass a number or an array of numbers for site '{name}'"
    if value is None or isinstance(value, (str, bytes, Mapping)):
        raise ObservationError(f"observation of site '{name}' is {_show(value)} of type {type(value).__name__}; "
                               f"{hint}.")
    if isinstance(value, jax.core.Tracer):
        raise ObservationError(f"observation of site '{name}' is a traced value ({_show(value)}); posterior "
                               "takes concrete observations: call it outside jax.jit / vmap.")
    try:
        array = np.asarray(value)
    except Exception as exc:  # ragged lists, keys, objects numpy refuses
        raise ObservationError(f"observation of site '{name}' ({_show(value)}) is not an array of numbers "
                               f"({type(exc).__name__}: {exc}); {hint}.") from None
    kind = array.dtype.kind
    if kind == "c":
        raise ObservationError(f"observation of site '{name}' is complex ({_show(value)}); observations are real: "
                               "pass the real part (np.real) if that is what the model sees.")
    if kind not in "biuf":
        raise ObservationError(f"observation of site '{name}' has dtype {array.dtype} ({_show(value)}); {hint}.")
    return array


def _where(mask: np.ndarray, batched: bool) -> str:
    """Where ``mask`` (False = bad) fails: rows for a batch, element indices otherwise."""
    bad = ~mask
    if bad.ndim == 0:
        return ""
    if batched:
        rows = np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1)).tolist()
        more = "" if len(rows) <= _MAX_LISTED else f" and {len(rows) - _MAX_LISTED} more"
        return f"in row{'s' if len(rows) > 1 else ''} {rows[:_MAX_LISTED]}{more} of the batch"
    index = [tuple(int(i) for i in ix) for ix in np.argwhere(bad)]
    more = "" if len(index) <= _MAX_LISTED else f" and {len(index) - _MAX_LISTED} more"
    return f"at element{'s' if len(index) > 1 else ''} {index[:_MAX_LISTED]}{more}"


def _first_bad(values: np.ndarray, mask: np.ndarray) -> Any:
    """The first offending value (an event vector when ``mask`` covers batch dims only)."""
    index = tuple(np.argwhere(~mask)[0]) if 0 < mask.ndim <= values.ndim else ()
    bad = values[index]
    return bad.item() if np.ndim(bad) == 0 else bad.tolist()


def _check_values(name: str, raw: np.ndarray, value: np.ndarray, batched: bool, support: Any) -> None:
    finite = np.isfinite(value)
    if not finite.all():
        where = _where(finite, batched)
        origin = "" if not np.isfinite(raw).all() else " after conversion to float32 (too large)"
        raise ObservationError(f"observation of site '{name}' is not finite{origin}: {_first_bad(value, finite)} "
                               f"{where}; pass finite values (mask missing data out of the model instead).")
    if support is None:
        return
    if raw.dtype == bool and not support.is_discrete:
        raise ObservationError(f"observation of site '{name}' is boolean but the site is continuous (support "
                               f"{support}); pass numbers (e.g. value.astype(float)) if that is really meant.")
    try:
        with jax.default_device(jax.devices("cpu")[0]):  # constraints written with jnp stay on the host
            ok = np.asarray(support.check(value), dtype=bool)
    except Exception:  # noqa: BLE001 - a constraint that cannot check these values: leave it to the model
        return
    if ok.all():
        return
    integral = np.mod(value, 1) == 0
    if support.is_discrete and not integral.all():
        raise ObservationError(f"observation of site '{name}' must be integer-valued (support {support}) but got "
                               f"{_first_bad(value, integral)} {_where(integral, batched)}; pass whole numbers.")
    raise ObservationError(f"observation of site '{name}' is outside the support {support} of its distribution: "
                           f"{_first_bad(value, ok)} {_where(ok, batched)}; pass values the model can produce.")


def check_observations(spec: Any, observations: Any, supports: Mapping[str, Any] | None = None,
                       plate: Any = None) -> tuple[dict[str, jax.Array], tuple[int, ...]]:
    """Check observations against a trace spec's observed sites (on the host) and return them
    as float32 arrays with the batch shape: ``()`` for one observation set, ``(n,)`` for ``n``.

    Each site takes either its own shape or a leading batch axis; with a local ``plate`` (an
    object with a ``name``), one data point or ``(n, *row)`` for ``n`` of them. Values must be
    finite numbers inside ``supports[site]`` (see :func:`observed_supports`) when given.

    Example:
        >>> values, batch_shape = check_observations(spec, {"obs": [4.0, 25.0]}, {"obs": constraints.real})
        >>> batch_shape
        (2,)
    """
    expected = {o.name: o for o in spec.observed}
    example = "{" + ", ".join(f"{n!r}: value" for n in expected) + "}"
    if not isinstance(observations, Mapping):
        raise ObservationError(f"observations must be a dict from observed site to value, got "
                               f"{type(observations).__name__} {_show(observations)}; pass {example}.")
    unknown = [k for k in observations if k not in expected]
    if unknown:
        listed = "[" + ", ".join(sorted(map(repr, unknown))) + "]"
        raise ObservationError(f"{listed} are not observed sites of this proposal; "
                               f"its observed sites are {sorted(expected)}.")
    missing = set(expected) - set(observations)
    if missing:
        raise ObservationError(f"no observation given for {sorted(missing)}; pass a value for every observed "
                               f"site: {sorted(expected)}.")
    supports = supports or {}
    out, batch_shapes = {}, {}
    for name, site in expected.items():
        raw = _as_number_array(name, observations[name])
        with np.errstate(over="ignore"):  # too large for float32: reported as not finite below
            value = raw.astype(np.float32)
        if plate is not None:
            # One data point of the plate, or a batch of them: the plate axis is implicit.
            if value.shape == site.shape[1:]:
                value, raw = value[None], raw[None]
            elif value.shape[1:] == site.shape[1:]:
                value, raw = value[:, None], raw[:, None]
            else:
                raise ObservationError(
                    f"observation of site '{name}' has shape {value.shape}; expected {site.shape[1:]} for one "
                    f"data point of plate '{plate.name}' or (n, {', '.join(map(str, site.shape[1:]))}) "
                    "for n of them.")
        if value.shape == site.shape:
            batch_shapes[name] = ()
        elif value.ndim == len(site.shape) + 1 and value.shape[1:] == site.shape:
            batch_shapes[name] = value.shape[:1]
        else:
            raise ObservationError(
                f"observation of site '{name}' has shape {value.shape}; expected {site.shape} for one "
                f"observation or (n, {', '.join(map(str, site.shape))}) for a batch of n.")
        if batch_shapes[name] == (0,):
            raise ObservationError(f"observation of site '{name}' is an empty batch (shape {value.shape}); pass at "
                                   "least one observation set.")
        _check_values(name, raw, value, bool(batch_shapes[name]), supports.get(name))
        out[name] = value
    if len(set(batch_shapes.values())) > 1:
        raise ObservationError(f"observed sites disagree on the batch of observations: {batch_shapes}.")
    return {k: jnp.asarray(v) for k, v in out.items()}, next(iter(batch_shapes.values()))
