"""Checkpoints that never destroy what jaxic did not write, and that verify what they read.

Layout of a checkpoint folder (format 2), for one-off saves and periodic saving alike::

    path/jaxic.json                   marker: {"format": "jaxic-checkpoint", "format_version": 2, "kind": ...}
    path/<step>/jaxic/arrays/...      the flat array list, written by orbax
    path/<step>/jaxic/metadata.json   the JSON configuration
    path/<step>/jaxic/manifest.json   SHA-256 and size of every file above, plus its own checksum

Steps are written and rotated by orbax's ``CheckpointManager``: a step is built in a temporary
folder and renamed into place only once complete (the manifest included), and older steps are
deleted only after that rename, so a save killed at any moment leaves the previous or the new
step loadable. Readers take the newest step whose manifest verifies; leftovers of a killed save
are skipped by readers and removed by the next save. A one-off save is the same thing with
``max_to_keep=1``.

Several processes (``jax.distributed``): every process calls the same save, as with orbax; the
primary process (``jax.process_index() == 0``) alone writes the folder, markers, manifests and
arrays (the training state is replicated, so it holds every value), and the others wait for it
and raise a :class:`CheckpointError` if it failed. Reads are independent in each process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxic.errors import CheckpointError

FORMAT_VERSION = 2
_FORMAT = "jaxic-checkpoint"
_MARKER = "jaxic.json"
_ITEM = "jaxic"
_ARRAYS = "arrays"
_METADATA = "metadata.json"
_MANIFEST = "manifest.json"
_ORBAX_TMP = ".orbax-checkpoint-tmp"
_SINGLE, _PERIODIC = "checkpoint", "periodic"

__all__ = ["FORMAT_VERSION", "PeriodicCheckpointer", "read_arrays", "read_metadata", "resolve_checkpoint",
           "write_checkpoint"]


# ---------------------------------------------------------------------------------------------
# Ownership: jaxic writes into a folder only when it is new, empty, or a jaxic checkpoint.

def _as_path(path: str | os.PathLike, action: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"cannot {action} {path!r}: a checkpoint path is a str or os.PathLike, got "
                              f"{type(path).__name__}; give a folder name such as 'proposal_ckpt'.")
    if isinstance(path, str) and not path.strip():
        raise CheckpointError(f"cannot {action} an empty path ''; give a folder name such as 'proposal_ckpt'.")
    return Path(path).expanduser().absolute()


def _owned_name(name: str) -> bool:
    """Names jaxic or orbax create directly inside a checkpoint folder."""
    return (name == _MARKER or name.isdigit()
            or (name.split(".", 1)[0].isdigit() and _ORBAX_TMP in name) or name == _ARRAYS)


def _read_marker(path: Path) -> dict | None:
    """The marker of checkpoint folder ``path`` (None when there is none), normalised to format 2 keys."""
    marker = path / _MARKER
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint marker '{marker}' is unreadable ({exc}): the file is corrupted. "
                              f"Restore it from a backup, or delete '{path}' to save afresh.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint marker '{marker}' is corrupted (not a JSON object).")
    if data.get("format_version") == 1 and "format" not in data:  # written by jaxic before checksums
        return {"format_version": 1, "kind": _SINGLE}
    if data.get("format") != _FORMAT or data.get("kind") not in (_SINGLE, _PERIODIC) or \
            not isinstance(data.get("format_version"), int):
        raise CheckpointError(f"'{marker}' is not a valid jaxic checkpoint marker (got {data!r}); the file is "
                              "corrupted or belongs to another program.")
    if data["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint marker '{marker}' says format version {data['format_version']}; this "
                              f"jaxic reads versions 1 to {FORMAT_VERSION}: upgrade jaxic (or the file is corrupted).")
    return data


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(target: Path, obj: Any) -> None:
    """Write, fsync, then ``os.replace``: readers see the old file or the new one, never a mix."""
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(obj, indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)


def _claim(path: str | os.PathLike, kind: str) -> tuple[Path, bool]:
    """Check that jaxic may write a ``kind`` checkpoint at ``path`` and create its marker.

    Returns the absolute path and whether it holds a format-1 checkpoint (whose marker is swapped
    only after the new step is complete). Raises before touching anything otherwise.
    """
    action = "save a checkpoint to" if kind == _SINGLE else "save periodic checkpoints to"
    path = _as_path(path, action)
    fix = f"Nothing was changed. Save into a new or empty folder instead, e.g. '{path / 'jaxic_checkpoint'}'."
    if path.is_symlink():
        raise CheckpointError(f"cannot {action} '{path}': it is a symbolic link (to '{os.readlink(path)}'); jaxic "
                              f"only writes real folders it created. {fix}")
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"cannot {action} '{path}': it is a file, not a jaxic checkpoint folder. {fix}")
    if not path.exists():
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise CheckpointError(f"cannot {action} '{path}': creating the folder failed ({exc}).") from None
        _write_json_atomic(path / _MARKER, {"format": _FORMAT, "format_version": FORMAT_VERSION, "kind": kind})
        return path, False
    entries = sorted(os.scandir(path), key=lambda e: e.name)
    # Half-written markers of a killed first save are jaxic's; removed once the folder is known to be jaxic's.
    stale = [Path(e.path) for e in entries
             if e.name.startswith(f".{_MARKER}.tmp-") and e.is_file(follow_symlinks=False)]
    entries = [e for e in entries if Path(e.path) not in stale]
    if not entries:
        for file in stale:
            file.unlink()
        _write_json_atomic(path / _MARKER, {"format": _FORMAT, "format_version": FORMAT_VERSION, "kind": kind})
        return path, False
    if not (path / _MARKER).is_file():
        shown = ", ".join(repr(e.name) for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise CheckpointError(f"cannot {action} '{path}': it is a folder with other files ({shown}) and not a jaxic "
                              f"checkpoint (no {_MARKER}); jaxic never overwrites or deletes files it did not "
                              f"write. {fix}")
    marker = _read_marker(path)
    foreign = [e.name for e in entries if e.is_symlink() or not _owned_name(e.name)]
    if foreign:
        raise CheckpointError(f"cannot {action} '{path}': the jaxic checkpoint there also holds files jaxic did not "
                              f"write ({', '.join(map(repr, foreign[:3]))}). Move them out of the folder, or "
                              f"save elsewhere; nothing was changed.")
    if marker["kind"] != kind:
        other = "a one-off checkpoint (CompiledModel.save)" if marker["kind"] == _SINGLE else \
            "a periodic checkpoint folder (checkpoint_dir)"
        raise CheckpointError(f"cannot {action} '{path}': it holds {other}, which this save would rotate away. "
                              f"Use another folder; nothing was changed.")
    for file in stale:
        file.unlink()
    return path, marker["format_version"] == 1


# ---------------------------------------------------------------------------------------------
# Several processes: the primary one writes, the others wait at a barrier and learn the outcome.

def _this_process_only() -> ocp.options.MultiprocessingOptions:
    """Orbax options under which this process alone takes part (no barriers with the others)."""
    if jax.process_count() == 1:
        return ocp.options.MultiprocessingOptions()
    return ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                              active_processes={jax.process_index()})


def _on_primary(action, what: str):
    """``action()`` on the primary process only; every process returns once it is done (a barrier),
    and raises if it failed. One process: just ``action()``."""
    if jax.process_count() == 1:
        return action()
    result, failure = None, None
    if jax.process_index() == 0:
        try:
            result = action()
        except Exception as exc:  # re-raised below, after the others have heard of it
            failure = exc
    ok = bool(multihost_utils.broadcast_one_to_all(np.int32(failure is None)))
    if failure is not None:
        raise failure
    if not ok:
        raise CheckpointError(f"{what} failed on the primary process (jax.process_index() == 0); its error says "
                              "why.")
    return result


def _host_arrays(arrays: list) -> list[np.ndarray]:
    """Host copies; an array spread over processes must be replicated (each process holds all of it)."""
    out = []
    for i, a in enumerate(arrays):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            if not a.is_fully_replicated:
                raise CheckpointError(f"array {i} to save is sharded over several processes; jaxic saves replicated "
                                      "training states only (as compile(devices=...) makes them).")
            a = a.addressable_data(0)
        out.append(np.asarray(a))
    return out


# ---------------------------------------------------------------------------------------------
# One step's payload: arrays through orbax, metadata as JSON, a manifest of SHA-256 checksums.

def _sha256(file: Path, sync: bool = False) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        if sync:  # the rename that commits the step must not reach the disk before the data
            os.fsync(f.fileno())
    return digest.hexdigest(), size


def _files_checksum(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _write_payload(directory: Path, arrays: list, metadata_json: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as checkpointer:
        checkpointer.save(directory / _ARRAYS, {f"{i:05d}": a for i, a in enumerate(_host_arrays(arrays))})
        checkpointer.wait_until_finished()
    (directory / _METADATA).write_text(metadata_json)
    files = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest, size = _sha256(file, sync=True)
        files[file.relative_to(directory).as_posix()] = {"sha256": digest, "bytes": size}
    for folder in {p.parent for p in directory.rglob("*")}:
        _fsync_dir(folder)
    manifest = {"format_version": FORMAT_VERSION, "files": files, "files_sha256": _files_checksum(files)}
    with open(directory / _MANIFEST, "w") as f:
        f.write(json.dumps(manifest, indent=1))
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(directory)


def _verify_payload(directory: Path) -> None:
    """Raise ``CheckpointError`` naming the first file that is missing, altered or unexpected."""
    manifest_file = directory / _MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"'{manifest_file}' is missing: this checkpoint step is incomplete or not written by "
                              "jaxic.")
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
        ok = manifest["files_sha256"] == _files_checksum(files) and all(
            isinstance(info["sha256"], str) and isinstance(info["bytes"], int) for info in files.values())
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise CheckpointError(f"'{manifest_file}' is corrupted (unreadable, or its own checksum does not match).")
    for name, info in files.items():
        file = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"'{manifest_file}' lists a file outside its checkpoint ('{name}'): corrupted.")
        if not file.is_file():
            raise CheckpointError(f"checkpoint file '{file}' is missing (deleted after the save).")
        digest, size = _sha256(file)
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint file '{file}' has {size} bytes, {info['bytes']} were written: it was "
                                  "truncated or overwritten.")
        if digest != info["sha256"]:
            raise CheckpointError(f"checkpoint file '{file}' is corrupted: its SHA-256 differs from the one recorded "
                                  "when it was written.")
    for file in sorted((directory / _ARRAYS).rglob("*")):
        if file.is_file() and file.relative_to(directory).as_posix() not in files:
            raise CheckpointError(f"checkpoint file '{file}' was not written by jaxic (not in '{manifest_file}'); "
                                  "remove it.")


@dataclasses.dataclass
class _PayloadSave(ocp.args.CheckpointArgs):
    arrays: list
    metadata_json: str


@dataclasses.dataclass
class _PayloadRestore(ocp.args.CheckpointArgs):
    pass


class _PayloadHandler(ocp.CheckpointHandler):
    """Writes one step's payload inside orbax's temporary step folder, so the manifest is part of the
    atomic commit (orbax renames the step into place only after this returns)."""

    def save(self, directory, args: _PayloadSave):
        _write_payload(Path(directory), args.arrays, args.metadata_json)

    def restore(self, directory, args: _PayloadRestore | None = None):
        _verify_payload(Path(directory))
        return json.loads((Path(directory) / _METADATA).read_text())


ocp.args.register_with_handler(_PayloadHandler, for_save=True)(_PayloadSave)
ocp.args.register_with_handler(_PayloadHandler, for_restore=True)(_PayloadRestore)


def _manager(directory: Path, max_to_keep: int) -> ocp.CheckpointManager:
    # _claim has made the folder; orbax refuses create=True for a subset of processes.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=jax.process_count() == 1,
                                           cleanup_tmp_directories=True,
                                           enable_async_checkpointing=False, save_root_metadata=False,
                                           multiprocessing_options=_this_process_only())
    try:
        return ocp.CheckpointManager(directory, options=options, item_names=(_ITEM,))
    except Exception as exc:  # orbax/tensorstore errors surface with the path named
        raise CheckpointError(f"cannot open checkpoint folder '{directory}': {type(exc).__name__}: {exc}") from None


def _metadata_json(path: str | os.PathLike, metadata: dict) -> str:
    try:
        return json.dumps({"format_version": FORMAT_VERSION, **metadata}, indent=1)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint metadata for '{path}' is not JSON-serialisable ({exc}); nothing was "
                              "written.") from None


def _save_step(manager: ocp.CheckpointManager, directory: Path, step: int, arrays: list, metadata_json: str) -> Path:
    try:
        saved = manager.save(step, args=ocp.args.Composite(**{_ITEM: _PayloadSave(list(arrays), metadata_json)}))
        manager.wait_until_finished()
    except Exception as exc:  # orbax/tensorstore/OS errors surface with the path named
        raise CheckpointError(f"saving step {step} to '{directory}' failed: {type(exc).__name__}: {exc}") from None
    if not saved:
        raise CheckpointError(f"orbax declined to save step {step} to '{directory}' (latest step "
                              f"{manager.latest_step()}).")
    _fsync_dir(directory)
    return directory / str(step)


# ---------------------------------------------------------------------------------------------
# Public API

def write_checkpoint(path: str | os.PathLike, arrays: list[jax.Array], metadata: dict[str, Any]) -> Path:
    """Write ``arrays`` (a flat list) and JSON ``metadata`` to the checkpoint folder ``path``.

    ``path`` must be new, an empty folder, or a jaxic checkpoint (replaced atomically: a save killed
    at any moment leaves the old or the new one loadable); anything else raises ``CheckpointError``
    and is left untouched. Every written file's SHA-256 is recorded and checked when read. With
    several processes, call it from every one: the primary writes, the others wait for it.

    Example:
        >>> write_checkpoint("ckpt", [jnp.zeros(3)], {"note": "demo"})
        PosixPath('/home/me/ckpt')
    """
    metadata_json = _metadata_json(path, metadata)
    target = _as_path(path, "save a checkpoint to")
    _on_primary(lambda: _write_single(path, arrays, metadata_json), f"saving checkpoint '{target}'")
    return target


def _write_single(path, arrays: list, metadata_json: str) -> Path:
    path, legacy = _claim(path, _SINGLE)
    with _manager(path, max_to_keep=1) as manager:
        latest = manager.latest_step()
        _save_step(manager, path, 0 if latest is None else latest + 1, arrays, metadata_json)
    if legacy:  # the new step is complete: switch the marker to format 2, then drop the format-1 arrays
        _write_json_atomic(path / _MARKER, {"format": _FORMAT, "format_version": FORMAT_VERSION, "kind": _SINGLE})
    if (path / _ARRAYS).is_dir():
        shutil.rmtree(path / _ARRAYS)
    return path


class PeriodicCheckpointer:
    """Periodic, rotating checkpoints in ``directory`` through orbax's ``CheckpointManager``.

    Each step is checksummed like :func:`write_checkpoint`; the newest ``max_to_keep`` steps are kept.
    With several processes, every process creates it and calls :meth:`save` (the primary writes).
    ``directory`` must be new, empty, or a periodic jaxic checkpoint folder (whose steps continue).
    :func:`read_metadata` and :func:`read_arrays` accept ``directory`` and read its newest complete step.

    Example:
        >>> with PeriodicCheckpointer("run", max_to_keep=3) as ckpt:
        ...     for step in (100, 200, 300, 400):
        ...         ckpt.save(step, [jnp.full(3, step)], {"step": step})
        >>> read_metadata("run")["step"], sorted(os.listdir("run"))
        (400, ['200', '300', '400', 'jaxic.json'])
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3):
        if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise CheckpointError(f"max_to_keep must be a positive integer, got {max_to_keep!r}.")
        self.directory = _as_path(directory, "save periodic checkpoints to")
        self.max_to_keep = max_to_keep

        def open_manager():
            return _manager(_claim(directory, _PERIODIC)[0], max_to_keep)

        self._manager = _on_primary(open_manager, f"opening checkpoint folder '{self.directory}'")
        self._open = True

    def save(self, step: int, arrays: list[jax.Array], metadata: dict[str, Any]) -> Path:
        """Save ``arrays`` and ``metadata`` as ``step`` (after the latest one); returns the step folder.

        Example:
            >>> ckpt.save(500, [jnp.zeros(3)], {"step": 500})
            PosixPath('/home/me/run/500')
        """
        if not self._open:
            raise CheckpointError(f"PeriodicCheckpointer('{self.directory}') is closed; create a new one.")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise CheckpointError(f"step must be a non-negative integer, got {step!r}.")
        metadata_json = _metadata_json(self.directory, metadata)

        def save():
            latest = self._manager.latest_step()
            if latest is not None and step <= latest:
                raise CheckpointError(f"cannot save step {step} to '{self.directory}': it already holds step "
                                      f"{latest}, and steps must increase. Use a new checkpoint folder, or move the "
                                      "later steps away.")
            return _save_step(self._manager, self.directory, int(step), arrays, metadata_json)

        _on_primary(save, f"saving step {step} to '{self.directory}'")
        return self.directory / str(int(step))

    def all_steps(self) -> list[int]:
        """Steps present in the folder, oldest first (readers skip any that fail verification).

        Example:
            >>> ckpt.all_steps()
            [200, 300, 400]
        """
        return sorted(self._manager.all_steps()) if self._manager is not None else sorted(_steps(self.directory))

    def latest_step(self) -> int | None:
        """The newest step present, or None before the first save (with several processes, the
        primary's answer: call it from every process).

        Example:
            >>> ckpt.latest_step()
            400
        """
        if jax.process_count() > 1:  # the primary's answer, so that every process decides alike
            steps = self.all_steps() if jax.process_index() == 0 else []
            latest = int(multihost_utils.broadcast_one_to_all(np.int32(steps[-1] if steps else -1)))
            return None if latest < 0 else latest
        steps = self.all_steps()
        return steps[-1] if steps else None

    def close(self) -> None:
        """Wait for pending writes and release orbax's resources (idempotent).

        Example:
            >>> ckpt.close()
        """
        if self._manager is not None:
            self._manager.close()
            self._manager = None
        self._open = False

    def __enter__(self) -> PeriodicCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _steps(path: Path) -> list[int]:
    return sorted(int(e.name) for e in os.scandir(path) if e.name.isdigit() and e.is_dir(follow_symlinks=False))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The verified step folder that :func:`read_metadata` and :func:`read_arrays` read for ``path``.

    ``path`` is a checkpoint folder (its newest step that passes verification is taken; newer ones
    that fail are skipped with a warning naming the faulty file) or one step folder inside it (which
    must verify). Resolve once and pass the result to both readers to read one consistent step while
    a training run keeps saving.

    Example:
        >>> resolve_checkpoint("run")
        PosixPath('/home/me/run/400')
    """
    path = _as_path(path, "load a checkpoint from")
    if not path.is_dir():
        state = "is a file" if path.exists() else "does not exist"
        raise CheckpointError(f"'{path}' is not a jaxic checkpoint: it {state}. Save one with "
                              "CompiledModel.save(path).")
    if path.name.isdigit() and (path / _ITEM).is_dir() and _read_marker(path.parent) is not None:
        _verify_payload(path / _ITEM)
        return path
    marker = _read_marker(path)
    if marker is None:
        raise CheckpointError(f"'{path}' is not a jaxic checkpoint: its marker '{path / _MARKER}' is missing. "
                              "Save one with CompiledModel.save(path).")
    if marker["format_version"] == 1:
        warnings.warn(f"checkpoint '{path}' was written by an older jaxic (format 1) without checksums, so it is "
                      "read unverified; save it again to add them.", UserWarning, stacklevel=3)
        return path
    errors = []
    for step in reversed(_steps(path)):
        try:
            _verify_payload(path / str(step) / _ITEM)
        except CheckpointError as exc:
            errors.append((step, exc))
            continue
        for bad, exc in errors:
            warnings.warn(f"skipping step {bad} of checkpoint '{path}', falling back to step {step}: {exc}",
                          UserWarning, stacklevel=3)
        return path / str(step)
    if not errors:
        raise CheckpointError(f"checkpoint '{path}' holds no complete step: its first save was interrupted. "
                              "Save again.")
    older = f" (and no older step of '{path}' verifies either)" if len(errors) > 1 else ""
    raise CheckpointError(f"{errors[0][1]}{older}")


def _legacy(step_dir: Path) -> bool:
    return (step_dir / _MARKER).is_file() and not (step_dir / _ITEM).exists() and \
        _read_marker(step_dir)["format_version"] == 1


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of the checkpoint at ``path`` (see :func:`resolve_checkpoint`), verified.

    Example:
        >>> read_metadata("ckpt")["format_version"]
        2
    """
    step_dir = resolve_checkpoint(path)
    file = step_dir / _MARKER if _legacy(step_dir) else step_dir / _ITEM / _METADATA
    try:
        metadata = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file '{file}' is unreadable: {exc}") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"checkpoint file '{file}' is corrupted (not a JSON object).")
    return metadata


def read_arrays(path: str | os.PathLike, like: list[jax.Array]) -> list[np.ndarray]:
    """Restore the flat array list of the checkpoint at ``path``, checked against ``like``'s shapes and dtypes.

    Example:
        >>> read_arrays("ckpt", [jnp.zeros(3)])
        [array([0., 0., 0.], dtype=float32)]
    """
    step_dir = resolve_checkpoint(path)
    arrays_dir = step_dir / _ARRAYS if _legacy(step_dir) else step_dir / _ITEM / _ARRAYS
    target = {f"{i:05d}": jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype) for i, a in enumerate(like)}
    try:
        with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as checkpointer:
            stored = checkpointer.metadata(arrays_dir)
            stored = getattr(stored, "item_metadata", stored)
            if len(stored) != len(like):
                raise CheckpointError(f"checkpoint '{step_dir}' holds {len(stored)} arrays but the rebuilt proposal "
                                      f"has {len(like)}: it was written with a different network or optimizer.")
            for name, meta in stored.items():
                if name not in target:
                    raise CheckpointError(f"checkpoint '{step_dir}' holds an unexpected array '{name}'.")
                if tuple(meta.shape) != target[name].shape:
                    raise CheckpointError(f"checkpoint '{step_dir}': array {name} has shape {tuple(meta.shape)}, the "
                                          f"rebuilt proposal expects {target[name].shape} (different network "
                                          "configuration).")
                if np.dtype(meta.dtype) != target[name].dtype:
                    raise CheckpointError(f"checkpoint '{step_dir}': array {name} has dtype {np.dtype(meta.dtype)}, "
                                          f"the rebuilt proposal expects {target[name].dtype}.")
            restored = checkpointer.restore(arrays_dir, target)
    except CheckpointError:
        raise
    except Exception as exc:  # verified files that orbax still rejects, or unverified format-1 files
        raise CheckpointError(f"cannot read the arrays of checkpoint '{arrays_dir}': {type(exc).__name__}: "
                              f"{exc}") from None
    return [np.asarray(restored[f"{i:05d}"]) for i in range(len(like))]
