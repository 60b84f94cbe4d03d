"""Data parallelism with ``jax.sharding``: a 1-D device mesh, batch split, parameters replicated.

The training step and importance sampling stay single-program code. The per-trace
PRNG keys (and the indices of a data minibatch) are constrained to ``P("batch")``
right before the ``vmap`` that consumes them; XLA's SPMD partitioner then runs each
device's share of the traces and all-reduces the batch means and the gradients. The
parameters and optimizer state are replicated on every device.

Across hosts, call ``jax.distributed.initialize()`` on every host first: ``jax.devices()``
(the default here) then lists every device of every host.

Example:
    >>> mesh = data_mesh()                               # every device, axis "batch"
    >>> step = build_step(graphdef, forward_kl(), optimizer, 64, model, sharding=batch_sharding(mesh))
    >>> state = replicate(state, mesh)
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxic.errors import JaxicError

AXIS = "batch"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"batch"`` over ``devices`` (default: ``jax.devices()``, all hosts).

    Example:
        >>> mesh = data_mesh(jax.devices()[:4])
        >>> mesh.size
        4
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise JaxicError("devices is empty: give at least one device (e.g. devices=jax.devices()).")
    return Mesh(np.asarray(devices), (AXIS,))


def resolve_devices(devices: Any) -> list[jax.Device] | None:
    """``devices=`` of :func:`jaxic.compile` as a list of devices (``None``: single-device, as usual).

    ``"all"`` is every device of every host; an int ``n`` the first ``n`` of them; or a list of devices.

    Example:
        >>> resolve_devices(2)
        [CpuDevice(id=0), CpuDevice(id=1)]
    """
    if devices is None:
        return None
    available = jax.devices()
    if isinstance(devices, str):
        if devices != "all":
            raise JaxicError(f"devices must be None, 'all', a number of devices or a list of devices, got {devices!r}.")
        return list(available)
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= devices <= len(available):
            raise JaxicError(f"devices={devices} but {len(available)} device(s) are available "
                             f"({available[0].platform}); ask for between 1 and {len(available)}.")
        return list(available[:devices])
    devices = list(devices)
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
        raise JaxicError(f"devices must be None, 'all', a number of devices or a non-empty list of jax devices, "
                         f"got {devices!r}.")
    return devices


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the mesh's ``"batch"`` axis (traces, data points, particles).

    Example:
        >>> keys = shard_batch(jax.random.split(key, 64), batch_sharding(mesh))
    """
    return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh (parameters, optimizer state, data).

    Example:
        >>> params = jax.device_put(params, replicated(mesh))
    """
    return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array of ``tree`` copied onto every device of ``mesh``.

    Across hosts every host must pass the same values (as the same script with the same keys does).

    Example:
        >>> state = replicate(state, mesh)
    """
    sharding = replicated(mesh)
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    # A mesh spanning hosts accepts only host-local values (numpy), not arrays committed to a local device.
    def put(x):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        return jax.device_put(np.asarray(x), sharding)

    return jax.tree.map(put, tree)


def shard_batch(x: Any, sharding: NamedSharding | None) -> Any:
    """Constrain the leading axis of ``x`` (inside jit) to ``sharding``; identity for ``None``.

    Example:
        >>> keys = shard_batch(jax.random.split(key, n), sharding)
        >>> out = jax.vmap(one)(keys)      # each device runs its share of the n calls
    """
    if sharding is None:
        return x
    return jax.lax.with_sharding_constraint(x, sharding)


def check_divisible(size: int, sharding: NamedSharding | Mesh | None, argument: str) -> None:
    """Raise a :class:`jaxic.JaxicError` unless ``size`` splits evenly over the mesh's devices.

    Example:
        >>> check_divisible(64, sharding, "batch_size")
    """
    if sharding is None:
        return
    mesh = sharding if isinstance(sharding, Mesh) else sharding.mesh
    count = mesh.size
    if size % count:
        lower, upper = (size // count) * count, -(-size // count) * count
        raise JaxicError(f"{argument}={size} does not divide evenly over the {count} devices of the mesh; "
                         f"use a multiple of {count} (e.g. {upper}" + (f" or {lower}" if lower else "") + ").")
