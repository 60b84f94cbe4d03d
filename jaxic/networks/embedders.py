"""Observation embedders: per observed site, a module that turns one observation into one token.

The protocol every entry of ``EMBEDDERS`` keeps (tests/test_embedder_conformance.py checks each one;
add a new embedder there too):

- A frozen dataclass with JSON-able fields and a class attribute ``name`` (its key in ``EMBEDDERS``;
  checkpoints record ``name`` and fields, and :func:`jaxic.load` rebuilds it).
- ``build(site, d_model, loc, scale, *, rngs)`` returns an unbatched ``nnx.Module`` that maps one
  observation of ``site.shape`` to a ``(d_model,)`` vector. ``loc`` and ``scale`` are the
  observation's elementwise moments under the prior predictive (flattened, ``(site.size,)``); the
  module standardises with them, so its output does not depend on the data's units.
- Invalid options for the site raise :class:`jaxic.JaxicError` naming the site and the option.

Pass one per site to :func:`jaxic.compile`: ``observation_embedders={"obs": SeriesConvEmbedding(channels=3)}``
(or the name, ``{"obs": "series_conv"}``, for its defaults); an ``nnx.Module`` built by hand works too,
but is not recorded in checkpoints (pass it again to :func:`jaxic.load`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxic.errors import JaxicError


class Statistic(nnx.Variable):
    """Non-trainable moments of the joint samples (saved with the network, never optimised)."""


class ObservationMLP(nnx.Module):
    """Default observation embedder: normalise, flatten, two-layer MLP to one token.

    Any ``nnx.Module`` mapping one observation (the site's shape) to a ``(d_model,)``
    vector can replace it per site, e.g. a CNN for images.

    Example:
        >>> embed = ObservationMLP(10, 64, 128, jnp.zeros(10), jnp.ones(10), rngs=nnx.Rngs(0))
        >>> embed(jnp.ones(10)).shape
        (64,)
    """

    def __init__(self, size: int, d_model: int, hidden: int, loc, scale, *, rngs: nnx.Rngs):
        self.loc = Statistic(jnp.asarray(loc))
        self.scale = Statistic(jnp.asarray(scale))
        self.hidden = nnx.Linear(size, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, d_model, rngs=rngs)

    def __call__(self, y):
        z = (y.reshape(-1) - self.loc[...]) / self.scale[...]
        return self.out(jax.nn.gelu(self.hidden(z)))


def _positive(site, owner: str, field: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise JaxicError(f"observed site '{site.name}': {owner}({field}={value!r}) must be an integer >= {minimum}.")


@dataclasses.dataclass(frozen=True)
class MLPEmbedding:
    """The default embedder as a configuration: standardise, flatten, one hidden layer of ``hidden``.

    Example:
        >>> jaxic.compile(model, ["obs"], key, observation_embedders={"obs": MLPEmbedding(hidden=256)})
    """

    name: ClassVar[str] = "mlp"
    hidden: int = 128

    def build(self, site, d_model: int, loc, scale, *, rngs: nnx.Rngs) -> nnx.Module:
        _positive(site, "MLPEmbedding", "hidden", self.hidden)
        return ObservationMLP(site.size, d_model, self.hidden, loc, scale, rngs=rngs)


class SeriesConv(nnx.Module):
    """1-D convolutions over a standardised series, then an MLP on the pooled feature map.

    The observation's ``size`` values are read as ``channels`` series of ``length`` steps, channel by
    channel (``(channels, length)`` in C order: e.g. prey at every time, then predators). Each layer
    is a same-padded convolution, GELU and an average pool of two steps, so a layer sees twice as far
    as the one before; the final map keeps its time axis (flattened into the MLP), so the embedding
    knows *when* things happen, not only what.

    Example:
        >>> embed = SeriesConvEmbedding(channels=2).build(site, 64, loc, scale, rngs=nnx.Rngs(0))
        >>> embed(jnp.ones((2, 10))).shape
        (64,)
    """

    def __init__(self, channels: int, length: int, config: "SeriesConvEmbedding", d_model: int, loc, scale, *,
                 rngs: nnx.Rngs):
        self.loc = Statistic(jnp.asarray(loc))
        self.scale = Statistic(jnp.asarray(scale))
        self.channels, self.length = channels, length
        widths = [channels] + [config.features] * config.num_layers
        self.convs = nnx.List([nnx.Conv(a, b, kernel_size=(config.kernel_size,), padding="SAME", rngs=rngs)
                               for a, b in zip(widths[:-1], widths[1:])])
        pooled = length
        for _ in range(config.num_layers):
            pooled = math.ceil(pooled / 2)
        self.hidden = nnx.Linear(pooled * widths[-1], config.hidden, rngs=rngs)
        self.out = nnx.Linear(config.hidden, d_model, rngs=rngs)

    def __call__(self, y):
        z = ((y.reshape(-1) - self.loc[...]) / self.scale[...]).reshape(self.channels, self.length).T
        for conv in self.convs:
            z = jax.nn.gelu(conv(z))
            if z.shape[0] % 2:  # an odd length: repeat the last step so the pool keeps it
                z = jnp.concatenate([z, z[-1:]])
            z = z.reshape(z.shape[0] // 2, 2, z.shape[1]).mean(axis=1)
        return self.out(jax.nn.gelu(self.hidden(z.reshape(-1))))


@dataclasses.dataclass(frozen=True)
class SeriesConvEmbedding:
    """Embedder for observations that are time series (:class:`SeriesConv`).

    ``channels``: how many series the observation holds, stored one after the other (its size must
    be a multiple); ``features`` per convolution, ``kernel_size`` steps wide, ``num_layers`` layers
    (each halves the length), then an MLP with ``hidden`` units.

    Example:
        >>> # 3 compartments x 161 days, stored as an array of shape (3, 161)
        >>> jaxic.compile(model, ["obs"], key, observation_embedders={"obs": SeriesConvEmbedding(channels=3)})
    """

    name: ClassVar[str] = "series_conv"
    channels: int = 1
    features: int = 32
    kernel_size: int = 5
    num_layers: int = 3
    hidden: int = 128

    def build(self, site, d_model: int, loc, scale, *, rngs: nnx.Rngs) -> nnx.Module:
        for field in ("channels", "features", "kernel_size", "hidden"):
            _positive(site, "SeriesConvEmbedding", field, getattr(self, field))
        _positive(site, "SeriesConvEmbedding", "num_layers", self.num_layers, minimum=0)
        if site.size % self.channels:
            raise JaxicError(f"observed site '{site.name}' has {site.size} values (shape {site.shape}), not a "
                             f"multiple of SeriesConvEmbedding(channels={self.channels}); give the number of series "
                             "it holds, stored one after the other.")
        return SeriesConv(self.channels, site.size // self.channels, self, d_model, loc, scale, rngs=rngs)


# Embedders selectable by name (``observation_embedders={"obs": "series_conv"}``) and recorded in checkpoints.
EMBEDDERS = {"mlp": MLPEmbedding, "series_conv": SeriesConvEmbedding}


def is_embedder_config(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type) and type(value) in EMBEDDERS.values()


def resolve_embedders(embedders: Mapping[str, Any] | None, observed: Sequence[Any]) -> dict[str, Any]:
    """Validated ``observation_embedders``: per observed site an ``nnx.Module`` or an embedder
    configuration (names are replaced by the configuration with its defaults).

    Example:
        >>> resolve_embedders({"obs": "series_conv"}, spec.observed)
        {'obs': SeriesConvEmbedding(channels=1, ...)}
    """
    if embedders is None:
        return {}
    if not isinstance(embedders, Mapping):
        raise JaxicError(f"observation_embedders must be a dict {{observed site: embedder}}, got "
                         f"{type(embedders).__name__}.")
    names = [getattr(o, "name", o) for o in observed]  # ObservedSites or their names
    resolved = {}
    for site, value in embedders.items():
        if site not in names:
            raise JaxicError(f"observation_embedders names '{site}', which is not an observed site; the observed "
                             f"sites are {names}.")
        if isinstance(value, str):
            if value not in EMBEDDERS:
                raise JaxicError(f"observation_embedders['{site}'] = {value!r} is not a known embedder; choose one "
                                 f"of {sorted(EMBEDDERS)} or pass a configuration such as SeriesConvEmbedding(channels=3).")
            value = EMBEDDERS[value]()
        elif not (isinstance(value, nnx.Module) or is_embedder_config(value)):
            raise JaxicError(f"observation_embedders['{site}'] is a {type(value).__name__}; give an embedder "
                             f"configuration ({', '.join(c.__name__ for c in EMBEDDERS.values())}), its name, or an "
                             "nnx.Module mapping one observation to a (d_model,) vector.")
        resolved[site] = value
    return resolved


def embedder_metadata(embedders: Mapping[str, Any]) -> dict[str, dict]:
    """The configurations among ``embedders`` as checkpoints record them (modules built by hand are not).

    Example:
        >>> embedder_metadata({"obs": SeriesConvEmbedding(channels=2)})["obs"]["type"]
        'series_conv'
    """
    return {site: {"type": value.name, "config": dataclasses.asdict(value)}
            for site, value in embedders.items() if is_embedder_config(value)}


def embedders_from_metadata(recorded: Mapping[str, dict]) -> dict[str, Any]:
    """Inverse of :func:`embedder_metadata`.

    Example:
        >>> embedders_from_metadata({"obs": {"type": "series_conv", "config": {"channels": 2}}})
    """
    out = {}
    for site, entry in recorded.items():
        if entry.get("type") not in EMBEDDERS:
            raise JaxicError(f"observed site '{site}' uses embedder {entry.get('type')!r}, unknown to this jaxic.")
        out[site] = EMBEDDERS[entry["type"]](**entry.get("config", {}))
    return out
