"""Real data for the objectives that need it: minibatches of observation sets or of a plate."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
from numpyro import handlers

from jaxic.objectives.finite import clean, data_rows_bad
from jaxic.parallel import shard_batch


@dataclasses.dataclass(frozen=True)
class LocalPlate:
    """Amortization over the data points of a plate: ``q(z | x) = prod_n q(z_n | x_n)``.

    The proposal is compiled for one element of the plate (the model with the plate's
    indices substituted by a single index and its log-density scaled by ``1 / size``), so
    training and inference cost the same for any plate size, and minibatches of the plate
    are just batches of elements.

    Example:
        >>> plate = LocalPlate("data", size=1797)
        >>> one = plate.element_model(model, jnp.asarray(5))   # log p(x_5, z_5), unscaled
    """

    name: str
    size: int

    def element_model(self, model: Callable, index) -> Callable:
        substituted = handlers.scale(handlers.substitute(model, data={self.name: jnp.reshape(index, (1,))}),
                                     scale=1.0 / self.size)

        def element(*args, **kwargs):
            # A model written with subsample_size=B warns that one index is not B: intended here.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="subsample_size does not match")
                return substituted(*args, **kwargs)

        return element

    @staticmethod
    def element_observations(row: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """One data point's observations with the plate axis (length one) put back."""
        return {name: value[None] for name, value in row.items()}


def per_datum(fn: Callable, model: Callable, data: Mapping[str, jax.Array], key: jax.Array, batch_size: int,
              plate: LocalPlate | None, sharding=None):
    """``fn(model_for_datum, observations, key)`` vmapped over a random minibatch of data points.

    Data points are rows of ``data`` (observation sets, or elements of ``plate``); the
    minibatch is drawn with replacement from ``key``. ``sharding`` (e.g.
    :func:`jaxic.parallel.batch_sharding`) splits the minibatch over devices. Returns
    ``(outputs, rows_bad)``: ``rows_bad[site]`` is ``(batch_size,)`` True where that row of
    ``data`` is not finite; such rows reach ``fn`` as zeros, and the caller must weight them zero.

    Example:
        >>> out, rows_bad = per_datum(lambda m, obs, k: obs["x"].sum(), model, {"x": rows}, key, 8, None)
    """
    index_key, key = jax.random.split(key)
    num_data = jax.tree.leaves(data)[0].shape[0]
    # Sharded indices and keys make XLA run each device's share of the minibatch.
    index = shard_batch(jax.random.randint(index_key, (batch_size,), 0, num_data), sharding)
    rows = {name: jnp.asarray(value)[index] for name, value in data.items()}
    rows_bad = data_rows_bad(rows)
    # Zeros, not NaN, enter the model: a NaN row would make the gradient NaN even with zero weight.
    rows = clean(rows, jnp.ones((batch_size,), bool))

    def one(i, row, k):
        if plate is None:
            return fn(model, row, k)
        return fn(plate.element_model(model, i), plate.element_observations(row), k)

    return jax.vmap(one)(index, rows, shard_batch(jax.random.split(key, batch_size), sharding)), rows_bad
