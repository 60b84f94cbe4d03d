"""Offline trace datasets: traces written to disk in shards and streamed into training.

Use them for traces produced elsewhere (a simulator outside JAX), for slow eager
models whose traces are worth reusing, or to train on the same data repeatedly.
A dataset is a folder with ``traces.json`` (the trace spec and shard list) and
``shard-NNNNN.npz`` files (plain arrays, no pickles); every file is written
atomically.

Example:
    >>> write_traces("traces/", model, ["obs"], num_traces=100_000, key=jax.random.key(0))
    >>> data = TraceDataset("traces/")
    >>> tokens, observations = next(data.batches(jax.random.key(1), batch_size=64))
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from jaxic.errors import CheckpointError
from jaxic.tracing.spec import TraceSpec, derive_trace_spec
from jaxic.tracing.traces import Tokens, sample_joint

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


class TraceWriter:
    """Collects traces and writes them to ``path`` in shards of ``shard_size``.

    Example (traces from a simulator outside JAX, described by numpyro distributions):
        >>> with TraceWriter("traces/", spec) as writer:
        ...     for run in simulator_runs:
        ...         writer.add_trace({"n": (dist.Poisson(3.0), run.n), "x": (dist.Normal(0, 1), run.x)},
        ...                          {"obs": run.measurement})
    """

    def __init__(self, path: str | os.PathLike, spec: TraceSpec, shard_size: int = 10_000):
        self.path, self.spec, self.shard_size = Path(path), spec, shard_size
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
        _atomic_write(self.path / name, lambda f: np.savez(f, **arrays))
        self._shards.append({"file": name, "num_traces": len(self._buffer)})
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
                                  "write one with jaxic.tracing.write_traces or TraceWriter.") from None
        self.spec = TraceSpec.from_json(index["trace_spec"])
        self.shards = [(self.path / s["file"], int(s["num_traces"])) for s in index["shards"]]
        self.holdout = holdout
        if holdout >= len(self):
            raise CheckpointError(f"dataset '{self.path}' holds {len(self)} traces; holdout={holdout} leaves "
                                  "none to train on.")

    def __len__(self) -> int:
        return sum(n for _, n in self.shards)

    def _load(self, shard: int) -> tuple[Tokens, dict[str, np.ndarray]]:
        path, _ = self.shards[shard]
        try:
            with np.load(path, allow_pickle=False) as data:
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
