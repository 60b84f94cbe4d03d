"""Offline trace datasets: traces written to disk in shards and streamed into training.

Use them for traces produced elsewhere (a simulator outside JAX), for slow eager
models whose traces are worth reusing, or to train on the same data repeatedly.
A dataset is a folder with ``traces.json`` (the trace spec and shard list) and
``shard-NNNNN.npz`` files (plain arrays, no pickles); every file is written
atomically.

Simulations already made (sbi's ``theta, x``) go in with :func:`write_simulations`.
A writer only writes into a new or empty folder, and each shard's SHA-256 is kept in the
index and checked when the shard is read.

Example:
    >>> write_traces("traces/", model, ["obs"], num_traces=100_000, key=jax.random.key(0))
    >>> data = TraceDataset("traces/")
    >>> tokens, observations = next(data.batches(jax.random.key(1), batch_size=64))
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

from jaxic import validation as checks
from jaxic.errors import CheckpointError, JaxicError, ObservationError, UntraceableModelError
from jaxic.tracing.spec import TraceSpec, derive_trace_spec, run_model, token_mask
from jaxic.tracing.traces import Tokens, sample_joint, trace_to_tokens

_INDEX = "traces.json"


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_new_folder(path: str | os.PathLike) -> Path:
    """``path`` as a folder a new dataset may be written into: absent or empty.

    A dataset's shards and index would replace files already there (another dataset, the user's own).

    Example:
        >>> check_new_folder("traces/")   # CheckpointError if traces/ holds anything
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"'{path}' is a file; a trace dataset is a folder: choose a new folder.")
    held = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if held:
        raise CheckpointError(f"'{path}' already holds {len(held)} entries ({', '.join(held[:3])}"
                              f"{', ...' if len(held) > 3 else ''}); a trace dataset is written into a new or empty "
                              "folder so that nothing there is overwritten: choose another folder.")
    return path


class TraceWriter:
    """Collects traces and writes them to ``path`` in shards of ``shard_size``.

    Example (traces from a simulator outside JAX, described by numpyro distributions):
        >>> with TraceWriter("traces/", spec) as writer:
        ...     for run in simulator_runs:
        ...         writer.add_trace({"n": (dist.Poisson(3.0), run.n), "x": (dist.Normal(0, 1), run.x)},
        ...                          {"obs": run.measurement})
    """

    def __init__(self, path: str | os.PathLike, spec: TraceSpec, shard_size: int = 10_000):
        shard_size = checks.positive_int("shard_size", shard_size)
        self.path, self.spec, self.shard_size = check_new_folder(path), spec, shard_size
        self.path.mkdir(parents=True, exist_ok=True)
        self._shards: list[dict] = []
        self._buffer: list[tuple[Tokens, dict]] = []

    def add(self, tokens: Tokens, observations: Mapping[str, Any]) -> None:
        """Add a batch of traces already in token form (leading batch axis)."""
        tokens = Tokens(*(np.asarray(a) for a in tokens))
        observations = {k: np.asarray(v, np.float32) for k, v in observations.items()}
        for i in range(tokens.value.shape[0]):
            self._buffer.append((Tokens(*(a[i] for a in tokens)), {k: v[i] for k, v in observations.items()}))
            if len(self._buffer) == self.shard_size:
                self._flush()

    def add_trace(self, sites: Mapping[str, tuple[Any, Any]], observations: Mapping[str, Any]) -> None:
        """Add one trace given as ``{site: (numpyro distribution, value)}`` in execution order."""
        from jaxic.tracing.universal import pack_trace

        trace = {name: {"type": "sample", "fn": fn, "value": value, "is_observed": False}
                 for name, (fn, value) in sites.items()}
        trace.update({name: {"type": "sample", "value": value, "is_observed": True, "fn": None}
                      for name, value in observations.items()})
        packed = pack_trace(self.spec, trace) if self.spec.dynamic else None
        if packed is None:
            raise CheckpointError(f"trace with sites {list(sites)} does not fit the dataset's trace spec "
                                  f"({'universal, max_tokens=' + str(self.spec.max_tokens) if self.spec.dynamic else 'fixed layout: use add() with tokens'}); "
                                  "derive the spec with derive_universal_spec from a model with these sites.")
        self.add(jax.tree.map(lambda a: a[None], packed[0]), {k: v[None] for k, v in packed[1].items()})

    def _flush(self) -> None:
        if not self._buffer:
            return
        tokens = Tokens(*(np.stack(a) for a in zip(*(t for t, _ in self._buffer))))
        arrays = {f"tokens/{field}": getattr(tokens, field) for field in Tokens._fields}
        arrays.update({f"obs/{k}": np.stack([o[k] for _, o in self._buffer]) for k in self._buffer[0][1]})
        name = f"shard-{len(self._shards):05d}.npz"
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        content = buffer.getvalue()
        _atomic_write(self.path / name, lambda f: f.write(content))
        self._shards.append({"file": name, "num_traces": len(self._buffer),
                             "sha256": hashlib.sha256(content).hexdigest()})
        self._buffer = []
        self._write_index()

    def _write_index(self) -> None:
        index = {"format": 1, "trace_spec": self.spec.to_json(), "shards": self._shards}
        _atomic_write(self.path / _INDEX, lambda f: json.dump(index, f, indent=1), mode="w")

    def close(self) -> None:
        self._flush()
        self._write_index()

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_traces(path: str | os.PathLike, model: Callable, observed: Sequence[str], num_traces: int,
                 key: jax.Array, shard_size: int = 10_000, spec: TraceSpec | None = None,
                 chunk: int = 4096) -> TraceSpec:
    """Simulate ``num_traces`` joint samples of a NumPyro model and write them as a dataset.

    Jittable models are sampled in compiled, vmapped chunks; universal models eagerly.

    Example:
        >>> spec = write_traces("traces/", model, ["obs"], num_traces=50_000, key=jax.random.key(0))
    """
    from jaxic.tracing.universal import sample_universal

    spec = derive_trace_spec(model, observed) if spec is None else spec
    draw = jax.jit(lambda k, n: sample_joint(spec, model, k, n), static_argnums=1)
    with TraceWriter(path, spec, shard_size) as writer:
        done = 0
        while done < num_traces:
            n = min(chunk, num_traces - done)
            key, k = jax.random.split(key)
            batch = sample_universal(spec, model, k, n) if spec.dynamic else draw(k, n)
            writer.add(*batch)
            done += n
    return spec


def write_simulations(path: str | os.PathLike, model: Callable, simulations: Mapping[str, Any],
                      observed: Sequence[str], *, model_args: Sequence = (), model_kwargs: Mapping | None = None,
                      spec: TraceSpec | None = None, shard_size: int = 10_000, chunk: int = 4096) -> TraceSpec:
    """Write simulations made beforehand (sbi's ``theta, x``) as a trace dataset of ``model``.

    ``simulations`` maps every latent site and every observed site of the model to an array with
    one row per simulation. Each row is one execution of the model conditioned on those values
    (vmapped and jitted, ``chunk`` rows at a time), so the dataset holds exactly the model's tokens
    and trains with ``jaxic.compile(model, observed, key, dataset=path)``. Rows are checked first:
    a missing or unknown site, a row of the wrong shape, a value outside its site's support or a
    non-finite value is an error that names the site and the row.

    Example:
        >>> theta, x = prior.sample(key, (10_000,)), simulator(theta)      # made elsewhere
        >>> write_simulations("sims/", model, {"theta": theta, "obs": x}, observed=["obs"])
        >>> compiled = jaxic.compile(model, ["obs"], jax.random.key(0), dataset="sims/", num_steps=5000)
    """
    from jaxic.proposal import bind

    check_new_folder(path)
    chunk = checks.positive_int("chunk", chunk)
    bound = bind(checks.model_callable(model), model_args, model_kwargs)
    observed = checks.observed_names(observed)
    if spec is None:
        try:
            spec = derive_trace_spec(bound, observed)
        except UntraceableModelError as exc:
            raise UntraceableModelError(f"{exc} write_simulations conditions the model under jit; for a model with "
                                        "Python control flow write each trace with TraceWriter.add_trace.") from None
    if spec.dynamic:
        raise JaxicError("write_simulations needs a fixed token layout (a jittable model); for a universal-path "
                         "spec write each trace with TraceWriter(path, spec).add_trace.")
    rows = _simulation_rows(spec, simulations)
    num = next(iter(rows.values())).shape[0]
    size = min(chunk, num)

    def one(values):
        trace = run_model(handlers.condition(bound, values), jax.random.key(0))
        tokens, obs = trace_to_tokens(spec, trace)
        bad = []
        for site in spec.latents:
            msg = trace[site.name]
            ran = jnp.any(token_mask(site, msg["fn"]))
            inside = jnp.all(msg["fn"].support(msg["value"])) & jnp.all(jnp.isfinite(msg["value"]))
            bad.append(ran & ~inside)
        bad += [~jnp.all(jnp.isfinite(obs[o.name])) for o in spec.observed]
        return (tokens, obs), jnp.stack(bad)

    trace_rows = jax.jit(jax.vmap(one))  # one compile: the last chunk is padded to ``size`` rows
    names = [s.name for s in spec.latents] + [o.name for o in spec.observed]
    chunks = []
    for begin in range(0, num, size):  # every row is checked before anything is written
        part = {k: v[begin:begin + size] for k, v in rows.items()}
        n = min(size, num - begin)
        if n < size:
            part = {k: np.concatenate([v, np.repeat(v[:1], size - n, axis=0)]) for k, v in part.items()}
        batch, bad = jax.device_get(trace_rows(part))
        chunks.append(jax.tree.map(lambda a: a[:n], batch))
        bad = np.asarray(bad)[:n]
        if bad.any():
            row, which = map(int, np.argwhere(bad)[0])
            is_observed = which >= len(spec.latents)
            what = "is not finite" if is_observed else "lies outside the site's support or is not finite"
            error = ObservationError if is_observed else JaxicError
            raise error(f"simulation row {begin + row}: the value of site '{names[which]}' {what} "
                        f"({int(bad[:, which].sum())} of rows {begin}-{begin + n - 1} alike). Drop those rows "
                        "(sbi drops non-finite simulations too) or fix the simulator; nothing was written.")
    with TraceWriter(path, spec, shard_size) as writer:
        for batch in chunks:
            writer.add(*batch)
    return spec


def _simulation_rows(spec: TraceSpec, simulations: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The simulations as arrays, one row each, checked against the spec's sites by name and shape."""
    if not isinstance(simulations, Mapping):
        raise JaxicError(f"simulations must map site names to arrays (one row per simulation), got "
                         f"{type(simulations).__name__}.")
    shapes = {s.name: s.batch_shape + s.event_shape for s in spec.latents}
    shapes.update({o.name: o.shape for o in spec.observed})
    missing = [n for n in shapes if n not in simulations]
    if missing:
        raise JaxicError(f"simulations lack site(s) {missing}: give a value per simulation for every latent and "
                         f"observed site of the model ({sorted(shapes)}); a missing latent would be drawn from "
                         "its prior instead of the simulated value.")
    unknown = [n for n in simulations if n not in shapes]
    if unknown:
        raise JaxicError(f"simulations name site(s) {unknown} that the model does not sample; its sites are "
                         f"{sorted(shapes)}.")
    rows, lengths = {}, {}
    for name, want in shapes.items():
        value = np.asarray(simulations[name])
        if not (np.issubdtype(value.dtype, np.number) or value.dtype == bool):
            raise JaxicError(f"simulations['{name}'] must be a numeric array, got dtype {value.dtype}.")
        if value.ndim == 0 or value.shape[1:] != want:
            need = "(num_simulations" + "".join(f", {d}" for d in want) + ")"
            raise JaxicError(f"simulations['{name}'] has shape {value.shape}; site '{name}' has shape {want}, so "
                             f"it needs shape {need}: one row per simulation.")
        rows[name], lengths[name] = value, value.shape[0]
    if len(set(lengths.values())) > 1:
        raise JaxicError(f"simulations differ in their number of rows: {lengths}; every site needs one row per "
                         "simulation.")
    if next(iter(lengths.values())) == 0:
        raise JaxicError("simulations hold no rows.")
    return rows


class TraceDataset:
    """A trace dataset on disk, streamed shard by shard.

    The first ``holdout`` traces are kept out of :meth:`batches` and returned by
    :meth:`validation` (a fixed held-out set).

    Example:
        >>> data = TraceDataset("traces/", holdout=1024)
        >>> for step, (tokens, observations) in zip(range(1000), data.batches(jax.random.key(0), 64)): ...
    """

    def __init__(self, path: str | os.PathLike, holdout: int = 0):
        self.path = Path(path)
        try:
            index = json.loads((self.path / _INDEX).read_text())
        except FileNotFoundError:
            raise CheckpointError(f"'{self.path}' is not a jaxic trace dataset (no {_INDEX}); "
                                  "write one with jaxic.tracing.write_traces, write_simulations or TraceWriter.") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read '{self.path / _INDEX}' of trace dataset '{self.path}' ({exc}); "
                                  "the dataset is damaged: write it again.") from None
        try:
            self.spec = TraceSpec.from_json(index["trace_spec"])
            self.shards = [(self.path / s["file"], int(s["num_traces"])) for s in index["shards"]]
            self._checksums = {self.path / s["file"]: s.get("sha256") for s in index["shards"]}
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"'{self.path / _INDEX}' is not a jaxic trace dataset index (missing or bad "
                                  f"{exc}); write the dataset again.") from None
        self.holdout = holdout
        if holdout >= len(self):
            raise CheckpointError(f"dataset '{self.path}' holds {len(self)} traces; holdout={holdout} leaves "
                                  "none to train on.")

    def __len__(self) -> int:
        return sum(n for _, n in self.shards)

    def _load(self, shard: int) -> tuple[Tokens, dict[str, np.ndarray]]:
        path, _ = self.shards[shard]
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"cannot read shard '{path}' of trace dataset '{self.path}': {exc}") from None
        expected = self._checksums.get(path)  # datasets written before checksums have none
        if expected is not None and hashlib.sha256(content).hexdigest() != expected:
            raise CheckpointError(f"shard '{path}' of trace dataset '{self.path}' does not match the checksum "
                                  f"in {_INDEX}: it changed or is damaged since it was written; write the "
                                  "dataset again.")
        try:
            with np.load(io.BytesIO(content), allow_pickle=False) as data:
                tokens = Tokens(*(data[f"tokens/{field}"] for field in Tokens._fields))
                observations = {k[4:]: data[k] for k in data.files if k.startswith("obs/")}
        except (OSError, KeyError, ValueError) as exc:
            raise CheckpointError(f"cannot read shard '{path}' of trace dataset '{self.path}': {exc}") from None
        return tokens, observations

    def _training_start(self, shard: int) -> int:
        """First trace of a shard that is not held out."""
        before = sum(n for _, n in self.shards[:shard])
        return min(max(self.holdout - before, 0), self.shards[shard][1])

    def validation(self) -> tuple[Tokens, dict[str, np.ndarray]]:
        """The first ``holdout`` traces."""
        parts, need = [], self.holdout
        for shard in range(len(self.shards)):
            if need <= 0:
                break
            batch = self._load(shard)
            parts.append(jax.tree.map(lambda a: a[:need], batch))
            need -= parts[-1][0].value.shape[0]
        return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)

    def training_bytes(self) -> int:
        """About how many bytes the traces that are not held out take in memory (from the shard files' sizes).

        Example:
            >>> TraceDataset("sims/", holdout=1000).training_bytes() < 2**30
            True
        """
        total = sum(path.stat().st_size for path, _ in self.shards)
        return int(total * (len(self) - self.holdout) / max(len(self), 1))

    def training_traces(self) -> tuple[Tokens, dict[str, np.ndarray]] | None:
        """Every trace that is not held out, in one ``(tokens, observations)`` pair of arrays; ``None`` when the
        shards' traces differ in shape (universal traces padded per shard), which only :meth:`batches` streams.

        Example:
            >>> tokens, observations = TraceDataset("sims/", holdout=1000).training_traces()
        """
        parts = []
        for shard in range(len(self.shards)):
            start = self._training_start(shard)
            if start < self.shards[shard][1]:
                parts.append(jax.tree.map(lambda a: a[start:], self._load(shard)))
        shapes = {tuple(a.shape[1:] for a in jax.tree.leaves(part)) for part in parts}
        if len(shapes) != 1:
            return None
        return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)

    def batches(self, key: jax.Array, batch_size: int) -> Iterator[tuple[Tokens, dict[str, np.ndarray]]]:
        """Endless shuffled batches: shards in random order, traces shuffled within each shard."""
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
        carry = None
        while True:
            for shard in rng.permutation(len(self.shards)):
                start = self._training_start(shard)
                if start == self.shards[shard][1]:
                    continue
                batch = jax.tree.map(lambda a: a[start:], self._load(shard))  # one shard in memory at a time
                order = rng.permutation(batch[0].value.shape[0])
                batch = jax.tree.map(lambda a: a[order], batch)
                if carry is not None:
                    batch = jax.tree.map(lambda a, b: np.concatenate([a, b]), carry, batch)
                n = batch[0].value.shape[0]
                for begin in range(0, n - batch_size + 1, batch_size):
                    yield jax.tree.map(lambda a: a[begin:begin + batch_size], batch)
                rest = n - n % batch_size
                carry = jax.tree.map(lambda a: a[rest:], batch) if n % batch_size else None
