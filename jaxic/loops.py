"""How training steps are driven, behind one small protocol.

``loop.run(state, num_steps, data) -> (state, info)`` applies ``num_steps`` optimisation
steps and returns their :class:`jaxic.training.TrainInfo` stacked along a leading axis.
:class:`CompiledSteps` draws its traces inside the jitted step (the masked path: many steps
per compiled call); :class:`ResidentDatasetSteps` gathers batches of an offline dataset held on the
device inside the same kind of compiled chunk; :class:`FedSteps` takes batches made outside jit (eager model
runs on the universal path, or the shards of a dataset too large to hold).

Example:
    >>> loop = CompiledSteps(training.build_step(graphdef, objective, optimizer, 64, model), 25)
    >>> state, info = loop.run(state, 25, None)
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from typing import Any, Callable, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxic import training
from jaxic.errors import StallWarning

STALL_WARNING_SECONDS = 60.0
"""A training chunk still running after this many seconds (or 20 times the slowest chunk so far,
when that is longer) gets a :class:`jaxic.StallWarning`."""

COMPILE_STALL_WARNING_SECONDS = 600.0
"""The same for the first chunk, which also compiles the training step."""


class TrainingLoop(Protocol):
    description: str

    def run(self, state: training.TrainState, num_steps: int, data: Any) -> tuple[training.TrainState,
                                                                                  training.TrainInfo]: ...


class CompiledSteps:
    """Up to ``steps_per_call`` steps of a pure ``step`` in one compiled call (a final partial
    chunk reuses the same compilation). ``out_shardings`` places the results (e.g. replicated
    over a device mesh).

    Example:
        >>> loop = CompiledSteps(step, steps_per_call=25)
        >>> state, info = loop.run(state, 10, data)     # info.loss has 10 entries
    """

    description = ""

    def __init__(self, step: Callable, steps_per_call: int, out_shardings: Any = None):
        placement = {} if out_shardings is None else {"out_shardings": out_shardings}
        self.steps_per_call = steps_per_call
        self.multi_step = jax.jit(training.build_multi_step(step, steps_per_call), **placement)

    def compilations(self) -> int:
        """How many times the multi-step has been compiled (one per configuration)."""
        return self.multi_step._cache_size()

    def run(self, state, num_steps, data):
        state, info = self.multi_step(state, num_steps, data)
        return state, jax.tree.map(lambda x: x[:num_steps], info)


class FedSteps:
    """Steps on batches made outside jit: ``next_batch(state)`` returns the step's arguments
    after the state (e.g. ``(tokens, observations)``), derived from the state's key so that a
    resumed run sees the same batches.

    Example:
        >>> loop = FedSteps(training.build_batch_step(graphdef, forward_kl_loss, optimizer),
        ...                 lambda state: sample_universal(spec, model, jax.random.fold_in(state.key, 1), 64))
    """

    def __init__(self, batch_step: Callable, next_batch: Callable, description: str = ""):
        self.step = jax.jit(batch_step)
        self.next_batch = next_batch
        self.description = description

    def compilations(self) -> int:
        """How many times the batch step has been compiled (one for every trace length, by padding)."""
        return self.step._cache_size()

    def run(self, state, num_steps, data):
        infos = []
        for _ in range(num_steps):  # each batch comes from Python (an eager model, files on disk)
            state, info = self.step(state, *self.next_batch(state))
            infos.append(info)
        return state, jax.tree.map(lambda *xs: jnp.stack(xs), *infos)


class ResidentDatasetSteps:
    """Steps on an offline dataset held whole on the device: up to ``steps_per_call`` steps per compiled call,
    each gathering its batch by index inside jit, so no step pays Python dispatch or a host-to-device copy.

    Batches follow one shuffled pass over ``traces`` after another (a pass's last batch runs into the next
    pass), seeded from the training key at the first call.

    Example:
        >>> loop = ResidentDatasetSteps(training.build_batch_step(graphdef, forward_kl_loss, optimizer),
        ...                             dataset.training_traces(), batch_size=64, steps_per_call=25)
        >>> state, info = loop.run(state, 25, None)
    """

    def __init__(self, batch_step: Callable, traces: Any, batch_size: int, steps_per_call: int,
                 description: str = ""):
        self.traces = jax.device_put(traces)
        self.num_traces = int(jax.tree.leaves(traces)[0].shape[0])
        self.batch_size, self.steps_per_call, self.description = batch_size, steps_per_call, description
        self._rng, self._pending = None, np.zeros(0, np.int32)  # shuffling stream, indices not used yet

        def indexed_step(state, indices, traces):
            return batch_step(state, *jax.tree.map(lambda a: a[indices], traces))

        def multi(state, num_active, indices, traces):
            return training.build_indexed_multi_step(lambda s, i: indexed_step(s, indices[i], traces),
                                                     steps_per_call)(state, num_active)

        self.multi_step = jax.jit(multi)

    def compilations(self) -> int:
        """How many times the multi-step has been compiled (one per configuration)."""
        return self.multi_step._cache_size()

    def _indices(self, state, num_steps: int) -> np.ndarray:
        if self._rng is None:  # seeded as dataset_batches seeds TraceDataset.batches: the same passes
            self._rng = np.random.default_rng(np.asarray(jax.random.key_data(jax.random.fold_in(state.key, 1))).ravel())
        need = num_steps * self.batch_size
        while self._pending.size < need:
            self._pending = np.concatenate([self._pending, self._rng.permutation(self.num_traces).astype(np.int32)])
        indices = np.zeros((self.steps_per_call, self.batch_size), np.int32)
        indices[:num_steps] = self._pending[:need].reshape(num_steps, self.batch_size)
        self._pending = self._pending[need:]
        return indices

    def run(self, state, num_steps, data):
        state, info = self.multi_step(state, num_steps, self._indices(state, num_steps), self.traces)
        return state, jax.tree.map(lambda x: x[:num_steps], info)


def dataset_batches(dataset, batch_size: int) -> Callable:
    """``next_batch`` for :class:`FedSteps` over an offline trace dataset: one shuffled pass
    after another, seeded from the training key at the first call."""
    batches: list[Iterator] = []

    def next_batch(state):
        if not batches:
            batches.append(dataset.batches(jax.random.fold_in(state.key, 1), batch_size))
        return next(batches[0])

    return next_batch


@contextlib.contextmanager
def stall_watch(what: str, warn_after: float) -> Iterator[None]:
    """Warn once (a :class:`jaxic.StallWarning` naming ``what``) if the block takes more than
    ``warn_after`` seconds.

    A compiled computation that never ends (a sampler's ``while_loop`` that does not terminate for
    some draw) blocks inside XLA, where Python cannot stop it; a watcher thread at least says so,
    instead of a silent hang.

    Example:
        >>> with stall_watch("training steps 0-24", warn_after=60.0):
        ...     state, info = loop.run(state, 25, None)
        ...     loss = np.asarray(info.loss)
    """
    finished, start = threading.Event(), time.monotonic()

    def watch():
        if not finished.wait(warn_after):
            warnings.warn(
                f"{what} has been running for {time.monotonic() - start:.0f} s, far longer than expected. A compiled "
                "model that never returns is the usual cause: a sampler's while_loop that does not end for some "
                "draw (numpyro's vmapped Binomial sampler does so on CPU, which is why jaxic draws Binomial sites "
                "with jax.random.binomial; XLA_FLAGS=--xla_backend_optimization_level=0 avoided it). To find the "
                "draw, run the model alone "
                "under jax.jit(jax.vmap(...)) over batches of seeds. A compiled computation cannot be interrupted "
                "from Python: if it does not finish, restart the process (in a notebook, the kernel).",
                StallWarning, stacklevel=1)

    threading.Thread(target=watch, name="jaxic-stall-watch", daemon=True).start()
    try:
        yield
    finally:
        finished.set()
