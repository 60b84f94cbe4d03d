"""Atomic, pickle-free checkpoints: arrays through orbax, configuration as JSON."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxic.errors import CheckpointError

FORMAT_VERSION = 1
_METADATA = "jaxic.json"
_ARRAYS = "arrays"


def write_checkpoint(path: str | os.PathLike, arrays: list[jax.Array], metadata: dict[str, Any]) -> Path:
    """Write ``arrays`` (a flat list) and JSON ``metadata`` to ``path`` atomically.

    Everything goes to a temporary sibling folder first and is renamed into place, so an
    interrupted save never leaves a half-written checkpoint behind (an old one survives).
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / _ARRAYS, {f"{i:05d}": np.asarray(a) for i, a in enumerate(arrays)})
            checkpointer.wait_until_finished()
        (tmp / _METADATA).write_text(json.dumps({"format_version": FORMAT_VERSION, **metadata}, indent=1))
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, with a clear error when it is not one."""
    path = Path(path).absolute()
    meta_file = path / _METADATA
    if not meta_file.is_file() or not (path / _ARRAYS).exists():
        raise CheckpointError(f"'{path}' is not a jaxic checkpoint (expected {_METADATA} and {_ARRAYS}/ inside); "
                              "save one with CompiledModel.save(path).")
    metadata = json.loads(meta_file.read_text())
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{path}' has format version {metadata.get('format_version')}, "
                              f"this jaxic reads version {FORMAT_VERSION}.")
    return metadata


def read_arrays(path: str | os.PathLike, like: list[jax.Array]) -> list[np.ndarray]:
    """Restore the flat array list, checking it against the shapes of ``like``."""
    path = Path(path).absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(path / _ARRAYS)
        stored = getattr(stored, "item_metadata", stored)
        if len(stored) != len(like):
            raise CheckpointError(f"checkpoint '{path}' holds {len(stored)} arrays but the rebuilt proposal has "
                                  f"{len(like)}: it was written with a different network or optimizer.")
        target = {f"{i:05d}": jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype) for i, a in enumerate(like)}
        for name, meta in stored.items():
            if tuple(meta.shape) != target[name].shape:
                raise CheckpointError(f"checkpoint '{path}': array {name} has shape {tuple(meta.shape)}, the rebuilt "
                                      f"proposal expects {target[name].shape} (different network configuration).")
        restored = checkpointer.restore(path / _ARRAYS, target)
    return [restored[f"{i:05d}"] for i in range(len(like))]
