"""The convenience layer: ``jaxic.compile``, :class:`CompiledModel`, ``jaxic.load``, ``jaxic.compile_best``.

A thin shell over the functional core: :mod:`jaxic.proposal` (the proposal and its pure
functions), :mod:`jaxic.training` (pure steps), :mod:`jaxic.loops` (how steps are driven),
:mod:`jaxic.checkpoint` (saving). It adds progress bars, device placement and files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
import types
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxic import checkpoint, loops, parallel, proposal as core, training
from jaxic.callbacks import TrainingRecord
from jaxic import validation as checks
from jaxic.errors import CheckpointError, JaxicError, ModelError, ObservationError
from jaxic.inference import Posterior, ProposalDraws, predictive
from jaxic.networks import (NETWORKS, TransformerConfig, config_from_metadata, embedder_metadata,
                            embedders_from_metadata, resolve_embedders)
from jaxic import objectives
from jaxic.objectives import OBJECTIVES, forward_kl_loss
from jaxic.tracing import TraceDataset, TraceSpec, derive_trace_spec, sample_universal


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How the proposal is trained; saved with checkpoints so a resumed run continues identically."""

    num_steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 3e-3
    validation_size: int = 1024
    statistics_size: int = 4096
    steps_per_call: int = 25
    validation_every: int = 250
    custom_optimizer: bool = False
    microbatch_size: int | None = None
    weight_decay: float = training.DEFAULT_WEIGHT_DECAY  # of the default optimizer (AdamW)


# A dataset whose training traces take at most this much memory is held on the device for training, its batches
# gathered inside the compiled chunk of steps; a larger one is streamed shard by shard, a batch per Python step.
RESIDENT_DATASET_BYTES = 1 << 30
_validation_loss = jax.jit(core.held_out_loss)
_LOSS_LABELS = {"forward_kl": "−log q(x | y)", "elbo": "negative ELBO", "rws": "RWS loss"}
_log_prob = jax.jit(lambda proposal, latents, observations: core.log_prob(proposal, latents, observations)[0])


class CompiledModel:
    """A trained proposal for one model: train more, infer, save. Create it with
    :func:`jaxic.compile` or :func:`jaxic.load`; its pure core is :attr:`proposal`.

    Example:
        >>> compiled = jaxic.compile(model, observed=["obs"], key=jax.random.key(0), num_steps=3000)
        >>> post = compiled.posterior(jax.random.key(1), {"obs": 25.0}, num_samples=10_000)
        >>> compiled.train(1000)          # continue training exactly where it stopped
        >>> compiled.save("proposal_ckpt/")
    """

    def __init__(self, proposal: core.Proposal, objective, optimizer: optax.GradientTransformation,
                 train_config: TrainConfig, loop: loops.TrainingLoop, validation, key: jax.Array, *,
                 model: Callable, model_args: Sequence = (), model_kwargs: Mapping | None = None,
                 data: Mapping | None = None, dataset: TraceDataset | None = None, mesh=None,
                 evaluate: Callable | None = None):
        self.model, self.model_args, self.model_kwargs = model, tuple(model_args), dict(model_kwargs or {})
        self.template, self.objective, self.optimizer, self.loop = proposal, objective, optimizer, loop
        self.train_config, self.dataset, self.mesh, self.compile_key = train_config, dataset, mesh, key
        self.state = training.init(proposal.params, proposal.statistics, optimizer, jax.random.split(key, 4)[3],
                                   proposal.model_params)
        self.validation, self.data = validation, data
        # Data objectives: the objective's own quantity on the current model, with this fixed key.
        self.evaluate, self.validation_key = evaluate, jax.random.split(key, 4)[2]
        if mesh is not None:
            self.state, self.validation, self.data, self.validation_key = parallel.replicate(
                (self.state, validation, data, self.validation_key), mesh)
        self.history: dict[str, list] = {"loss": [], "validation_step": [], "validation_loss": [], "skipped": []}
        self.checkpoint_dir, self.checkpoint_every, self.max_to_keep = None, None, 3
        self._slowest_chunk = None  # seconds; None until a chunk has run here (the first one also compiles)
        self.sharding = None if mesh is None else parallel.batch_sharding(mesh)
        # Read once: observations are checked against them on the host, before anything compiles.
        self.observed_supports = checks.observed_supports(proposal.model, [o.name for o in proposal.spec.observed])
        # Replicated results stay readable on every host of a multi-host mesh.
        self.sampler = jax.jit(core.draw_particles, static_argnums=(1, 4),
                               static_argnames=("sharding", "chunk_size", "defensive", "defensive_scale"),
                               **({} if mesh is None else {"out_shardings": parallel.replicated(mesh)}))

    @property
    def proposal(self) -> core.Proposal:
        """The current proposal (a pytree) for the functions of :mod:`jaxic.proposal`."""
        return self.template.replace(params=self.state.params, statistics=self.state.statistics,
                                     model_params=self.state.model_params)

    spec = property(lambda self: self.template.spec, doc="The model's :class:`jaxic.TraceSpec`.")
    plate = property(lambda self: self.template.plate, doc="The local plate (``local_plate=``), or None.")
    network_config = property(lambda self: self.template.config, doc="The network's configuration.")
    graphdef = property(lambda self: self.template.graphdef, doc="The network's ``nnx`` graph definition.")
    statistics = property(lambda self: self.state.statistics, doc="Non-trainable network state.")
    network = property(lambda self: self.proposal.network, doc="The network as an ``nnx.Module``.")
    bound_model = property(lambda self: self.proposal.bound_model,
                           doc="The model with its arguments and learned parameters bound (one plate element).")
    param_constraints = property(lambda self: dict(self.template.param_constraints))
    step = property(lambda self: int(self.state.step), doc="Optimisation steps taken so far.")
    num_parameters = property(lambda self: self.template.num_parameters)

    @property
    def model_params(self) -> dict[str, Any]:
        """The model's learned parameters (``numpyro.param`` / ``nnx_module`` sites), constrained."""
        return self.proposal.bound_model.constrained()

    @property
    def path(self) -> str:
        """``"masked"`` (jitted, vmapped model runs), ``"universal"`` (eager runs) or ``"dataset"`` (offline traces)."""
        return "dataset" if self.dataset is not None else ("universal" if self.spec.dynamic else "masked")

    def validation_loss(self) -> float:
        """The validation loss that training records: for forward KL, the mean ``-log q(x | y)`` on the
        fixed held-out joint samples; for objectives that train the model on data (``"elbo"``,
        ``"rws"``), the negative ELBO per data point of the current proposal AND current model on
        ``validation_size`` data rows drawn with a fixed key (held-out joint samples drawn from the
        initial model would go stale as the model learns). See :attr:`validation_label`.

        Example:
            >>> compiled.validation_loss()
        """
        if self.evaluate is None:
            return float(_validation_loss(self.proposal, *self.validation))
        if self.data is None:
            raise JaxicError(f"the {self.objective.name} objective is validated on real observations: pass "
                             "data={site: array with one row per data point} to jaxic.compile / jaxic.load.")
        return float(self.evaluate(self.state, self.validation_key, self.data))

    @property
    def loss_label(self) -> str:
        """What ``history["loss"]`` measures, e.g. ``"negative ELBO"`` (for axis labels and logs)."""
        return _LOSS_LABELS.get(self.objective.name, f"{self.objective.name} loss")

    @property
    def validation_label(self) -> str:
        """What ``history["validation_loss"]`` measures (see :meth:`validation_loss`)."""
        return "negative ELBO (current model)" if self.evaluate is not None else "held-out −log q(x | y)"

    @property
    def best_step(self) -> int | None:
        """The step whose parameters the last ``train(..., patience=...)`` restored (None before one)."""
        best = self.history.get("best_step", [])
        return int(best[-1]) if best else None

    def learning_rate(self) -> float | None:
        """The default schedule's learning rate for the next step (None with a custom optimizer).

        Example:
            >>> compiled.learning_rate()
        """
        hyper = training.schedule_hyperparams(self.state.opt_state)
        return None if hyper is None else float(training.warmup_cosine(self.step, **hyper))

    def train(self, num_steps: int | None = None, *, seconds: float | None = None, patience: int | None = None,
              callbacks: Sequence[Callable] | Callable = (), progress: bool = True,
              validate: bool = True) -> "CompiledModel":
        """Run ``num_steps`` more optimisation steps, or as many as fit in ``seconds`` of wall-clock
        time, or whichever is fewer. Interrupting it (Ctrl-C) keeps the state, step and history of
        the last finished chunk in agreement. ``validate=False`` skips the validation loss (every
        ``train_config.validation_every`` steps and at the end).

        ``seconds`` with the default optimizer: the first chunk is compiled and one chunk timed (its
        result discarded), then the number of steps left in the budget is fixed and the
        learning-rate schedule refitted to end (at 5% of the peak) exactly at the last of them. After
        each chunk the steps left are re-estimated from the speed of the last chunks and, when the
        estimate moves by more than a chunk or 2%, the schedule is refitted again (nothing recompiles),
        so the run ends close to ``seconds`` with the rate at its floor. With a custom optimizer the
        budget just stops training.

        ``patience``: stop after that many validations in a row without a new best validation loss,
        and at the end put back the parameters of the best validated step (``best_step``,
        ``history["best_step"]``; the step count, optimizer state and history go on as trained).

        ``callbacks``: each is called after every chunk with a :class:`jaxic.callbacks.TrainingRecord`;
        one that returns ``True`` stops training there (see :mod:`jaxic.callbacks`).

        Example:
            >>> compiled.train(1000)
            >>> compiled.train(seconds=60, patience=5, callbacks=[jaxic.callbacks.CSVLogger("log.csv")])
        """
        if num_steps is None and seconds is None:
            raise JaxicError("train() needs num_steps, seconds, or both; e.g. compiled.train(1000).")
        num_steps = None if num_steps is None else checks.nonnegative_int("num_steps", num_steps)
        seconds = None if seconds is None else checks.positive_float("seconds", seconds)
        if patience is not None:
            patience = checks.positive_int("patience", patience)
            if not validate:
                raise JaxicError("patience counts validations without improvement: it needs validate=True.")
        callbacks = _checked_callbacks(callbacks)
        cfg = self.train_config
        if seconds is None and not cfg.custom_optimizer and num_steps is not None and \
                0 < cfg.num_steps < self.step + num_steps:
            warnings.warn(f"training to step {self.step + num_steps}, past the {cfg.num_steps} steps the learning-rate "
                          "schedule was built for: the rate stays at 5% of its peak from there on. Compile with "
                          "the total num_steps (or num_steps=0 for a constant rate), or train with seconds= "
                          "(which refits the schedule), to avoid this.", stacklevel=2)
        if self.objective.needs_data and self.data is None:
            raise JaxicError(f"the {self.objective.name} objective trains on real observations: pass "
                             "data={site: array with one row per data point} to jaxic.compile / jaxic.load.")
        bar = tqdm(total=num_steps, disable=not progress, desc=f"compiling proposal{self.loop.description}", unit="step")
        with bar, contextlib.ExitStack() as stack:
            saver = None if self.checkpoint_dir is None else stack.enter_context(
                checkpoint.PeriodicCheckpointer(self.checkpoint_dir, self.max_to_keep))
            budget = None
            if seconds is not None and not cfg.custom_optimizer:
                budget = (time.monotonic() + seconds, num_steps)  # the deadline, and the cap on steps if any
                num_steps, seconds = self._fit_schedule(num_steps, seconds, validate), None
                bar.reset(total=num_steps)
            self._train_chunks(num_steps, seconds, validate, bar, saver, patience, callbacks, budget)
        return self

    def _fit_schedule(self, num_steps: int | None, seconds: float, validate: bool) -> int:
        """Steps that fit in ``seconds`` (timed after compiling), with the schedule refitted to end at the last."""
        start, cfg = time.monotonic(), self.train_config
        # Compile, then time one chunk; both results are discarded so the schedule holds from the first step.
        with self._watched_chunk("the first training step"):
            np.asarray(self.loop.run(self.state, 1, self.data)[1].loss)
        timed = time.monotonic()
        with self._watched_chunk("the timed training chunk"):
            np.asarray(self.loop.run(self.state, cfg.steps_per_call, self.data)[1].loss)
        per_step = (time.monotonic() - timed) / cfg.steps_per_call
        if validate:
            self.validation_loss()  # compiles it
            timed = time.monotonic()
            self.validation_loss()
            per_step += (time.monotonic() - timed) / max(cfg.validation_every, 1)
        left = seconds - (time.monotonic() - start)
        fitted = max(int(left / max(per_step, 1e-9)), 0)
        if num_steps is not None:
            fitted = min(fitted, num_steps)
        if fitted == 0:
            warnings.warn(f"the budget of seconds={seconds:g} was spent compiling and timing "
                          f"({time.monotonic() - start:.1f} s): no steps taken. Give more seconds.", stacklevel=3)
            return 0
        self._set_horizon(self.step + fitted, validation_steps=fitted if self.step == 0 else None)
        return fitted

    def _set_horizon(self, horizon: int, validation_steps: int | None = None) -> None:
        """End the learning-rate schedule at step ``horizon`` (a hyperparameter: nothing recompiles);
        ``validation_steps``: validate about 20 times over that many steps."""
        cfg = self.train_config
        opt_state = training.set_num_steps(self.state.opt_state, horizon)
        if self.mesh is not None:
            opt_state = parallel.replicate(opt_state, self.mesh)
        with _interrupts_deferred():
            self.state = self.state._replace(opt_state=opt_state)
            changes = {"num_steps": horizon}
            if validation_steps is not None:  # a fresh run validates about 20 times, as compile(num_steps=...) does
                changes["validation_every"] = max(cfg.steps_per_call, validation_steps // 20)
            self.train_config = dataclasses.replace(cfg, **changes)

    @contextlib.contextmanager
    def _watched_chunk(self, what: str):
        """Run a training chunk under :func:`jaxic.loops.stall_watch`: warned after
        ``loops.STALL_WARNING_SECONDS`` or 20 times the slowest chunk so far, the first chunk (which
        compiles) after ``loops.COMPILE_STALL_WARNING_SECONDS``."""
        if self._slowest_chunk is None:
            warn_after, what = loops.COMPILE_STALL_WARNING_SECONDS, f"{what} (compiling, then running)"
        else:
            warn_after = max(loops.STALL_WARNING_SECONDS, 20 * self._slowest_chunk)
        began = time.monotonic()
        with loops.stall_watch(what, warn_after):
            yield
        # The first chunk's time is mostly compilation: not a measure of how long a chunk runs.
        self._slowest_chunk = 0.0 if self._slowest_chunk is None else \
            max(self._slowest_chunk, time.monotonic() - began)

    def _train_chunks(self, num_steps, seconds, validate, bar, saver, patience=None, callbacks=(),
                      budget=None) -> None:
        cfg, start, done, since_validation, postfix = self.train_config, time.monotonic(), 0, 0, {}
        pace = [(start, 0)]  # (time, steps done) after recent chunks: the speed training actually runs at
        dropped, dropped_sites = 0, []
        best_loss, best_step, best_params, waited = np.inf, None, None, 0
        while (num_steps is None or done < num_steps) and (seconds is None or time.monotonic() - start < seconds):
            active = cfg.steps_per_call if num_steps is None else min(cfg.steps_per_call, num_steps - done)
            first = self.step
            with self._watched_chunk(f"training steps {first}-{first + active - 1}"):
                state, info = self.loop.run(self.state, active, self.data)
                loss, skipped = np.asarray(info.loss), np.asarray(info.skipped)  # waits for the chunk
            metrics = {name: np.asarray(value).tolist() for name, value in info.metrics.items()}
            hyper = training.schedule_hyperparams(state.opt_state)
            rates = None if hyper is None else \
                np.asarray(training.warmup_cosine(np.arange(first, first + active), **hyper)).tolist()
            with _interrupts_deferred():  # state and history change together or not at all
                self.state = state
                self.history["loss"].extend(loss.tolist())
                self.history["skipped"].extend((np.flatnonzero(skipped) + self.step - active).tolist())
                for name, values in metrics.items():  # the objective's own: dropped draws, ELBO, ESS, ...
                    self.history.setdefault(name, []).extend(values)
                if rates is not None:
                    self.history.setdefault("learning_rate", []).extend(rates)
            dropped += int(np.sum(metrics.get("dropped", 0)))
            dropped_sites += metrics.get("dropped_site", [])
            done, since_validation = done + active, since_validation + active
            last = (num_steps is not None and done == num_steps) or \
                (seconds is not None and time.monotonic() - start >= seconds)
            value, stop = None, False
            if validate and (since_validation >= cfg.validation_every or last):
                since_validation = 0
                value = self._record_validation()
                postfix["val"] = f"{value:.3f}"
                if patience is not None:
                    if value < best_loss:  # NaN is never an improvement
                        best_loss, best_step, waited = value, self.step, 0
                        best_params = (self.state.params, self.state.model_params)
                    else:
                        waited += 1
                        stop = waited >= patience
            finite = loss[np.isfinite(loss)]
            postfix["loss"] = f"{finite.mean():.3f}" if finite.size else "nan"
            if self.history["skipped"]:
                postfix["skipped"] = len(self.history["skipped"])
            if dropped:
                postfix["dropped"] = dropped
            bar.set_postfix(postfix, refresh=False)
            bar.update(active)
            if callbacks:
                record = TrainingRecord(self.step, float(finite.mean()) if finite.size else float("nan"), value,
                                        None if rates is None else rates[-1], _chunk_metrics(metrics))
                # Every callback sees the record, even after one asked to stop.
                stop = any([callback(record) is True for callback in callbacks]) or stop
            if stop or last:
                break  # the final save below, after restoring the best parameters
            every = self.checkpoint_every or max(cfg.validation_every, 1)  # None: at each validation
            if saver is not None and self.step // every > (self.step - active) // every:
                saver.save(self.step, _state_arrays(self.state), checkpoint_metadata(self))
            if budget is not None and done < num_steps:
                num_steps = self._refit_to_budget(num_steps, done, pace, budget, bar)
        if validate and done and self.history["validation_step"][-1:] != [self.step]:  # a callback ended it
            value = self._record_validation()
            bar.set_postfix({**postfix, "val": f"{value:.3f}"})
            if patience is not None and value < best_loss:
                best_loss, best_step, best_params = value, self.step, (self.state.params, self.state.model_params)
        if best_params is not None:
            with _interrupts_deferred():
                params, model_params = best_params
                self.state = self.state._replace(params=params, model_params=model_params)
                self.history.setdefault("best_step", []).append(best_step)
        message = objectives.drop_warning(self.spec, dropped, done * cfg.batch_size, dropped_sites)
        if message:
            warnings.warn(message, stacklevel=3)
        if saver is not None and done and saver.latest_step() != self.step:
            saver.save(self.step, _state_arrays(self.state), checkpoint_metadata(self))

    def _refit_to_budget(self, num_steps: int, done: int, pace: list, budget: tuple, bar) -> int:
        """Steps to take in all, re-estimated after a chunk from the speed of the last chunks (the timed chunk
        misses per-chunk overheads, and the machine's load changes); the schedule is refitted when the
        estimate moves by more than a chunk or 2%, so training ends at the budget with the rate at its floor."""
        deadline, cap = budget
        now = time.monotonic()
        pace.append((now, done))
        del pace[:-11]  # the last ten chunks
        then, then_done = pace[0]
        per_step = (now - then) / max(done - then_done, 1)
        # At least one more step, so that the last one is taken at the schedule's floor.
        fits = done + max(int((deadline - now) / max(per_step, 1e-9)), 1)
        if cap is not None:
            fits = min(fits, cap)
        if abs(fits - num_steps) <= max(self.train_config.steps_per_call, 0.02 * num_steps):
            return num_steps
        self._set_horizon(self.step + fits - done)
        bar.total = fits
        bar.refresh()
        return fits

    def _record_validation(self) -> float:
        value = self.validation_loss()
        with _interrupts_deferred():
            self.history["validation_step"].append(self.step)
            self.history["validation_loss"].append(value)
        return value

    # ------------------------------------------------------------------------------------------
    def posterior(self, key: jax.Array, observations: Mapping[str, Any], num_samples: int = 1000, *,
                  defensive: float = 0.0, defensive_scale: float = core.DEFENSIVE_SCALE) -> Posterior:
        """Importance-sampling posterior for one observation set, or for a batch of them at once.

        Give each observed site either its own shape or a leading batch axis of n
        observations: the result then has ``batch_shape == (n,)``. Compiled with ``devices=``,
        the particles are split over the devices (``num_samples`` must divide their number).
        ``defensive=0.05`` draws 5% of the particles from a proposal widened ``defensive_scale`` times
        and weighs all of them against that mixture, so a proposal that is too narrow cannot
        give a few particles all the weight (see :func:`jaxic.proposal.importance_sample`).

        Example:
            >>> post = compiled.posterior(jax.random.key(1), {"obs": jnp.array([4.0, 25.0])}, 1000)
            >>> post[1].ess
        """
        self.spec.check_likelihood("importance sampling (compiled.posterior)")
        post = self._importance(key, observations, num_samples, defensive, defensive_scale)
        _warn_about_weights(post)
        return post

    def proposal_draws(self, key: jax.Array, observations: Mapping[str, Any],
                       num_samples: int = 1000) -> ProposalDraws:
        """The amortized posterior's raw draws ``x ~ q(x | y)`` as a :class:`jaxic.ProposalDraws`: equal
        weights, so ``mean``, ``quantile``, ``resample`` and ``predictive`` are the proposal's own, with the
        draws' ``executed`` masks and log densities. Works for a model whose observation has no likelihood (a
        ``Delta``), where :meth:`posterior` cannot. Batched like :meth:`posterior`.

        Example:
            >>> draws = compiled.proposal_draws(jax.random.key(0), {"obs": 25.0}, 1000)
            >>> draws.mean("x"), draws.executed["x"].shape
            >>> draws.predictive(jax.random.key(1), 500)["obs"]   # posterior predictive of q
        """
        return ProposalDraws.of(self._importance(key, observations, num_samples)).knowing_model(self.predictive_from)

    def _importance(self, key, observations, num_samples, defensive=0.0, defensive_scale=core.DEFENSIVE_SCALE):
        key = checks.prng_key("key", key)
        num_samples = checks.positive_int("num_samples", num_samples)
        defensive, defensive_scale = core.check_defensive(defensive, defensive_scale)
        observations = self.checked_observations(observations)
        if self.spec.dynamic:  # the model is Python: nothing to jit around it
            post = core.draw_particles(self.proposal, None, key, observations, num_samples, defensive=defensive,
                                       defensive_scale=defensive_scale)
        else:
            if self.mesh is not None:
                parallel.check_divisible(num_samples, self.mesh, "num_samples")
                key, observations = parallel.replicate((key, observations), self.mesh)
            chunk = core.plan_particle_chunks(self.template, observations, num_samples)
            post = self.sampler(self.proposal, None, key, observations, num_samples, sharding=self.sharding,
                                chunk_size=chunk, defensive=defensive, defensive_scale=defensive_scale)
        return post.knowing_model(self.predictive_from)  # post.predictive(key, n) runs this model

    def sample(self, key: jax.Array, observations: Mapping[str, Any], num_samples: int = 1000) -> dict[str, jax.Array]:
        """Raw proposal draws ``x ~ q(x | y)`` (no weights), batched like :meth:`posterior`.

        Example:
            >>> compiled.sample(jax.random.key(0), {"obs": 25.0}, 1000)["x"].shape   # (1000,)
        """
        return self._importance(key, observations, num_samples).samples  # no weights: no warning about them

    def predictive(self, key: jax.Array, observations: Mapping[str, Any], num_samples: int = 1000, *,
                   num_particles: int | None = None) -> dict[str, jax.Array]:
        """Posterior predictive draws of the observed and deterministic sites, batched like :meth:`posterior`
        (``num_particles``, default ``num_samples``, importance-sampling particles; see :func:`jaxic.predictive`).
        For a simulator observed without a likelihood (a ``Delta``) there are no weights: the latents are then
        the amortized posterior's raw draws (:meth:`proposal_draws`), as NPE's posterior predictive is.

        Example:
            >>> compiled.predictive(jax.random.key(0), {"obs": jnp.array([4.0, 25.0])}, 500)["obs"].shape  # (2, 500)
        """
        post_key, draw_key = jax.random.split(checks.prng_key("key", key))
        num_particles = num_samples if num_particles is None else num_particles
        post = (self.proposal_draws if self.spec.likelihood_free else self.posterior)(post_key, observations,
                                                                                       num_particles)
        return self.predictive_from(post, draw_key, num_samples)

    def predictive_from(self, post: Posterior, key: jax.Array, num_samples: int = 1000) -> dict[str, jax.Array]:
        """Posterior predictive draws from a posterior of this model (what ``post.predictive`` runs).

        Example:
            >>> compiled.predictive_from(post, jax.random.key(2), 500)["obs"].shape
        """
        if self.plate is None:
            return predictive(self.bound_model, post, key, num_samples)
        axis = len(post.batch_shape) + 1  # the element model keeps its plate axis (length one)
        post = dataclasses.replace(post, samples={s.name: jnp.expand_dims(post.samples[s.name], axis)
                                                  for s in self.spec.latents})
        return {k: v.squeeze(axis) if v.ndim > axis and v.shape[axis] == 1 else v
                for k, v in predictive(self.bound_model, post, key, num_samples).items()}

    def log_prob(self, latents: Mapping[str, Any], observations: Mapping[str, Any]) -> jax.Array:
        """``log q(latents | observations)`` under the proposal, one value per latent set
        (see :func:`jaxic.proposal.log_prob` for the per-site terms).

        Example:
            >>> compiled.log_prob({"x": jnp.zeros(5), "y": jnp.ones(5)}, {"obs": 25.0}).shape   # (5,)
        """
        observations = self.checked_observations(observations)
        for name, value in latents.items() if isinstance(latents, Mapping) else ():
            array = np.asarray(value, dtype=object if isinstance(value, str) else None)
            if array.dtype.kind not in "biuf":
                raise ObservationError(f"latent '{name}' is {value!r} of type {type(value).__name__}; give a number "
                                       "or an array of numbers.")
            if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                raise ObservationError(f"latent '{name}' has non-finite values (NaN or inf); log q is defined for "
                                       "finite values only.")
        if self.spec.dynamic:  # the model is Python: it runs eagerly per latent set
            return core.log_prob(self.proposal, latents, observations)[0]
        return _log_prob(self.proposal, latents, observations)

    def checked_observations(self, observations: Mapping[str, Any]) -> dict[str, jax.Array]:
        """``observations`` as float32 arrays after host-side checks (names, shapes, finite, in the
        support), before anything compiles; :class:`jaxic.ObservationError` names the culprit."""
        checks.check_observations(self.spec, observations, self.observed_supports, self.plate)
        return {k: jnp.asarray(np.asarray(v), jnp.float32) for k, v in observations.items()}

    def checkpoint_to(self, directory: str | os.PathLike, every: int | None = None,
                      max_to_keep: int = 3) -> "CompiledModel":
        """Save a checkpoint every ``every`` steps (None: at each validation, also once ``seconds=``
        has fixed how often that is) while training (and at the end of each :meth:`train`), keeping the newest ``max_to_keep``, through orbax's ``CheckpointManager``.
        ``jaxic.load(directory, model)`` resumes from the newest complete step. A folder holding
        anything but such checkpoints is refused before training starts.

        Example:
            >>> compiled.checkpoint_to("runs/ring", every=500).train(5000)
        """
        every = None if every is None else checks.positive_int("checkpoint_every", every)
        checkpoint.PeriodicCheckpointer(directory, max_to_keep).close()  # refuses a foreign folder now
        self.checkpoint_dir, self.checkpoint_every, self.max_to_keep = directory, every, max_to_keep
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write network, optimizer state, step, PRNG key, trace spec and configuration (atomically).

        Example:
            >>> compiled.save("proposal_ckpt/")
        """
        checkpoint.write_checkpoint(path, _state_arrays(self.state), checkpoint_metadata(self))

def checkpoint_metadata(compiled: CompiledModel) -> dict:
    """What :func:`jaxic.load` needs besides the arrays (JSON): spec, network, training, history."""
    network_name = {v: k for k, v in NETWORKS.items()}[type(compiled.network_config)]
    return {
        "trace_spec": compiled.spec.to_json(),
        "network": {"type": network_name, "config": dataclasses.asdict(compiled.network_config)},
        "observation_embedders": embedder_metadata(dict(compiled.template.observation_embedders)),
        "train_config": dataclasses.asdict(compiled.train_config),
        "objective": objective_metadata(compiled.objective),
        "local_plate": None if compiled.plate is None else dataclasses.asdict(compiled.plate),
        "compile_key": np.asarray(jax.random.key_data(compiled.compile_key)).tolist(),
        "history": {k: [x if isinstance(x, int) else float(x) for x in v] for k, v in compiled.history.items()},
    }


def _warn_about_weights(post: Posterior) -> None:
    """Warn when no particle of an observation set has a finite weight (the posterior there is undefined), and
    when the model's log density is NaN for some particles: importance sampling gives them zero weight, which is
    right only if the model really has no mass there."""
    weighted = np.asarray(jnp.any(jnp.isfinite(post.log_weights), axis=-1)).reshape(-1)
    if not weighted.all():
        empty = np.flatnonzero(~weighted)
        where = f"observation sets {empty[:5].tolist()}{' ...' if empty.size > 5 else ''} ({empty.size} of " \
                f"{weighted.size})" if weighted.size > 1 else "the observation"
        warnings.warn(f"no particle has a finite importance weight for {where}: the model gives the observation zero "
                      f"density (or NaN) at every one of the {post.num_samples} proposal draws, so the posterior, its "
                      "ESS and its evidence are undefined there (NaN). Check that the observation is one the model "
                      "can produce (units, order of the values); otherwise train the proposal longer or draw more "
                      "particles.", stacklevel=3)
    failed = np.asarray(jnp.sum(jnp.isnan(post.log_joint), axis=-1)).reshape(-1)  # per observation set
    if not failed.any():
        return
    worst = int(np.argmax(failed))
    where = f" (observation set {worst} of {failed.size}, the most affected)" if failed.size > 1 else ""
    warnings.warn(f"{int(failed[worst])} of {post.num_samples} particles{where} have a NaN model log density and "
                  "get zero weight: the model returned NaN for their latent values (an ODE solve that did not "
                  "finish, a rate that overflowed, a log of a negative number, ...). The posterior is over the "
                  "other particles: fine for a handful, but if the share is large the model fails in a region "
                  "the posterior reaches; post.log_joint shows which particles (NaN).", stacklevel=3)


@contextlib.contextmanager
def _interrupts_deferred():
    """Hold a Ctrl-C (SIGINT) until the block ends, then raise it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _checked_callbacks(callbacks) -> list[Callable]:
    callbacks = [callbacks] if callable(callbacks) else callbacks
    if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Sequence):
        raise JaxicError(f"callbacks must be a list of functions taking a jaxic.callbacks.TrainingRecord, got "
                         f"{type(callbacks).__name__}; e.g. callbacks=[jaxic.callbacks.CSVLogger('log.csv')].")
    for i, callback in enumerate(callbacks):
        if not callable(callback):
            raise JaxicError(f"callbacks[{i}] is {callback!r} of type {type(callback).__name__}, not callable; give "
                             "functions taking a jaxic.callbacks.TrainingRecord.")
    return list(callbacks)


def _chunk_metrics(metrics: dict[str, list]) -> dict[str, float]:
    """The objective's metrics over one chunk: counts summed, the rest averaged over finite values."""
    out = {}
    for name, values in metrics.items():
        if name == "dropped_site":  # a site index, meaningless as an average
            continue
        array = np.asarray(values, np.float64)
        finite = array[np.isfinite(array)]
        out[name] = float(finite.sum() if name == "dropped" else finite.mean()) if finite.size else float("nan")
    return out


def _state_arrays(state: training.TrainState) -> list[jax.Array]:
    return jax.tree.leaves(state._replace(key=jax.random.key_data(state.key)))


def _state_from_arrays(like: training.TrainState, arrays: list) -> training.TrainState:
    state = jax.tree.unflatten(jax.tree.structure(like._replace(key=jax.random.key_data(like.key))),
                               [jnp.asarray(a) for a in arrays])
    return state._replace(key=jax.random.wrap_key_data(state.key))


def objective_metadata(objective: objectives.Objective) -> dict:
    """An objective's name and options, as saved in checkpoints (``OBJECTIVES[name](**options)`` rebuilds it)."""
    return {"name": objective.name, "options": dict(objective.options)}


def _assemble(model, model_args, model_kwargs, observed, key, network, train_config: TrainConfig, optimizer,
              observation_embedders, path: str = "auto", dataset: TraceDataset | None = None,
              spec: TraceSpec | None = None, pilot_traces: int = 256, max_tokens: int | None = None,
              objective=None, data: Mapping | None = None, local_plate: str | None = None,
              devices: Any = None, **limits) -> CompiledModel:
    """Proposal, objective, optimizer, training loop and validation set of a compiled model."""
    objective = objectives.resolve(objective)
    if objective.needs_data and (dataset is not None or path == "universal"):
        raise JaxicError(f"the {objective.name} objective runs the proposal alongside the model on real "
                         "data, which needs the masked path: no dataset=, no path='universal'.")
    devices = parallel.resolve_devices(devices)
    proposal = core.init(model, observed, key, network=network, model_args=model_args, model_kwargs=model_kwargs,
                         path="masked" if objective.needs_data else path, local_plate=local_plate, data=data,
                         observation_embedders=observation_embedders, statistics_size=train_config.statistics_size,
                         pilot_traces=pilot_traces, max_tokens=max_tokens, spec=spec, dataset=dataset, **limits)
    if objective.needs_data:
        proposal.spec.check_likelihood(f"objective='{objective.name}'")
    data = core.check_data(data, proposal.spec, proposal.plate)
    mesh = None if devices is None else parallel.data_mesh(devices)
    dynamic = dataset is not None or proposal.spec.dynamic
    if mesh is not None:
        if dynamic:
            raise JaxicError(f"devices= trains on several devices on the masked path only; this model takes the "
                             f"{'dataset' if dataset is not None else 'universal'} path. Drop devices= (or make the "
                             "model jit: see jaxic.control_flow).")
        parallel.check_divisible(train_config.batch_size, mesh, "batch_size")
        if train_config.microbatch_size is not None:
            parallel.check_divisible(train_config.microbatch_size, mesh, "microbatch_size")
    optimizer = training.guard(optimizer if optimizer is not None else
                               training.default_optimizer(train_config.num_steps, train_config.learning_rate,
                                                          weight_decay=train_config.weight_decay),
                               trains_model=objective.trains_model)
    validation_key = jax.random.split(key, 4)[2]
    if dataset is not None:
        validation = dataset.validation()
    elif proposal.spec.dynamic:
        validation = sample_universal(proposal.spec, proposal.bound_model, validation_key, train_config.validation_size)
    else:
        validation = core.joint_draws(proposal, validation_key, train_config.validation_size)
    if dynamic:
        if train_config.microbatch_size is not None:
            raise JaxicError(f"microbatch_size works on the masked path only; this model takes the "
                             f"{'dataset' if dataset is not None else 'universal'} path. Drop microbatch_size "
                             "(or lower batch_size).")
        spec, bound, size = proposal.spec, proposal.bound_model, train_config.batch_size
        batch_step = training.build_batch_step(proposal.graphdef, forward_kl_loss, optimizer)
        resident = None
        if dataset is not None and dataset.training_bytes() <= RESIDENT_DATASET_BYTES:
            resident = dataset.training_traces()
        description = f" ({'dataset' if dataset is not None else 'universal'} path)"
        if resident is not None:
            loop = loops.ResidentDatasetSteps(batch_step, resident, size, train_config.steps_per_call, description)
        else:
            next_batch = loops.dataset_batches(dataset, size) if dataset is not None else (
                lambda state: sample_universal(spec, bound, jax.random.fold_in(state.key, 1), size))
            loop = loops.FedSteps(batch_step, next_batch, description)
    else:
        # The objective picks plate elements itself (data objectives) or trains on one element.
        step = training.build_step(proposal.graphdef, objective, optimizer, train_config.batch_size,
                                   core.bind(model, model_args, model_kwargs), dict(proposal.param_constraints),
                                   train_config.microbatch_size, plate=proposal.plate,
                                   sharding=None if mesh is None else parallel.batch_sharding(mesh))
        loop = loops.CompiledSteps(step, train_config.steps_per_call,
                                   None if mesh is None else parallel.replicated(mesh))
    evaluate = None
    if objective.needs_data:  # validated on the current model: see CompiledModel.validation_loss
        evaluate = jax.jit(training.build_evaluation(
            proposal.graphdef, objectives.elbo(), train_config.validation_size,
            core.bind(model, model_args, model_kwargs), dict(proposal.param_constraints), plate=proposal.plate))
    return CompiledModel(proposal, objective, optimizer, train_config, loop, jax.tree.map(jnp.asarray, validation),
                         key, model=model, model_args=model_args, model_kwargs=model_kwargs, data=data,
                         dataset=dataset, mesh=mesh, evaluate=evaluate)


def compile(model: Callable, observed: Sequence[str], key: jax.Array, num_steps: int | None = None, *,
            model_args: Sequence = (), model_kwargs: Mapping | None = None,
            network: Any = None, optimizer: optax.GradientTransformation | None = None,
            batch_size: int = 64, learning_rate: float = 3e-3, weight_decay: float | None = None,
            validation_size: int = 1024, microbatch_size: int | None = None,
            observation_embedders: Mapping[str, Any] | None = None,
            path: str = "auto", dataset: TraceDataset | str | os.PathLike | None = None,
            pilot_traces: int = 256, max_tokens: int | None = None, objective: Any = None,
            data: Mapping[str, Any] | None = None, local_plate: str | None = None,
            progress: bool = True, devices: Any = None, checkpoint_dir: str | os.PathLike | None = None,
            checkpoint_every: int | None = None, max_to_keep: int = 3, max_sites_per_run: int | None = None,
            run_timeout: float | None = None, seconds: float | None = None, patience: int | None = None,
            callbacks: Sequence[Callable] | Callable = ()) -> CompiledModel:
    """Compile an amortized proposal (an inference network) for a NumPyro model.

    By default it trains by inference compilation (forward KL on fresh joint samples, no
    data needed). With ``objective="elbo"`` or ``"rws"`` it trains on real ``data`` and also
    learns the model's own parameters (``numpyro.param``, ``numpyro.contrib.module``).

    Args:
        model: a plain generative NumPyro model.
        observed: names of the sites that will be observed (simulated during training).
        key: PRNG key for initialisation, statistics, validation set and training.
        num_steps: optimisation steps (each draws ``batch_size`` fresh joint traces); default 2000, or
            as many as ``seconds`` allows.
        seconds, patience, callbacks: a wall-clock budget (the learning-rate schedule is fitted to the
            steps it allows), early stopping and per-chunk callbacks: see :meth:`CompiledModel.train`.
        model_args, model_kwargs: fixed arguments of the model.
        network: network configuration (default :class:`jaxic.networks.TransformerConfig`; with a
            ``local_plate`` whose element has one latent token, :class:`jaxic.networks.FeedForwardConfig`), or the
            name of one in ``jaxic.networks.NETWORKS`` with default sizes (``"transformer"``, ``"lstm"``,
            ``"feedforward"``).
        optimizer: an optax optimizer (default AdamW, warm-up and cosine decay). Non-finite
            steps are always skipped and counted in ``history["skipped"]``.
        weight_decay: the default optimizer's AdamW weight decay on the network's weights (default 1e-4;
            larger values, e.g. 0.05, keep a network from overfitting a fixed ``dataset``). Recorded in checkpoints.
        microbatch_size: masked path: process each batch in slices of this many traces (a divisor of
            ``batch_size``) and average their gradients: memory and, on CPUs, cache use scale with the
            slice (for long traces: see :func:`jaxic.training.build_step`).
        observation_embedders: per observed site, an embedder configuration from ``jaxic.networks.EMBEDDERS``
            (e.g. ``jaxic.networks.SeriesConvEmbedding(channels=3)`` for time series; recorded in checkpoints),
            its name (``"series_conv"``), or an ``nnx.Module`` mapping the observation to a ``(d_model,)`` vector
            (default: an MLP on the standardised, flattened value).
        path: ``"masked"`` runs the model vmapped under jit (stochastic control flow written with
            ``handlers.mask``, ``cond``, ``scan``); ``"universal"`` runs it eagerly, for Python control
            flow on sampled values; ``"auto"`` (default) takes the masked path when the model jits
            and says so when it falls back to the universal one.
        dataset: train on an offline :class:`jaxic.tracing.TraceDataset` (or its folder) instead of
            fresh joint samples; its first ``validation_size`` traces are held out.
        pilot_traces, max_tokens: universal path only: eager runs that discover the addresses, and
            the longest trace (in tokens) the proposal handles (default: 25% above the pilots').
        max_sites_per_run, run_timeout: universal path only: an eager model run that reaches more sample
            sites (default: 4x the longest pilot run + 100) or runs longer than ``run_timeout`` seconds
            (default 10; 0 turns it off) stops with a :class:`jaxic.ModelError` naming the model's line.
        objective: ``"forward_kl"`` (default), ``"elbo"`` (amortized variational inference; reparameterised
            and score-function gradients), ``"rws"`` (reweighted wake-sleep), or an instance from
            ``jaxic.objectives`` with options, e.g. ``jaxic.objectives.elbo(num_particles=4)``.
        data: for ``"elbo"``/``"rws"``: per observed site an array with one row per data point
            (each step uses a random minibatch of ``batch_size`` rows).
        local_plate: name of a plate holding every site of the model (one data point each): the
            proposal is ``q(z | x) = prod_n q(z_n | x_n)``, compiled for one element, so any plate size
            (and subsampled plates) cost the same. ``data`` rows are then the plate's elements.
        devices: data parallelism (masked path): ``None`` (default) trains on one device; ``"all"``
            (every device of every host, after ``jax.distributed.initialize()`` on each host), a
            number of devices, or a list of devices splits each batch (traces, data points) and
            the posterior's particles over a 1-D mesh, with parameters replicated. ``batch_size``
            must divide evenly over the devices; the loss is that of one device on the same batch.
        checkpoint_dir, checkpoint_every, max_to_keep: save a checkpoint into ``checkpoint_dir`` every
            ``checkpoint_every`` steps (default: at each validation) and at the end, keeping the newest
            ``max_to_keep`` (orbax's ``CheckpointManager``); ``jaxic.load(checkpoint_dir, model)`` resumes from
            the newest complete one. See :meth:`CompiledModel.checkpoint_to`.

    Example:
        >>> compiled = jaxic.compile(model, observed=["obs"], key=jax.random.key(0), num_steps=3000,
        ...                          model_kwargs={"M": 20})
        >>> compiled.posterior(jax.random.key(1), {"obs": 25.0}, num_samples=10_000).ess
    """
    model = checks.model_callable(model)
    observed = checks.observed_names(observed)
    key = checks.prng_key("key", key)
    if seconds is not None:
        seconds = checks.positive_float("seconds", seconds)
    num_steps = (2000 if seconds is None else 0) if num_steps is None else checks.nonnegative_int("num_steps",
                                                                                                   num_steps)
    batch_size = checks.positive_int("batch_size", batch_size)
    validation_size = checks.positive_int("validation_size", validation_size)
    learning_rate = checks.positive_float("learning_rate", learning_rate)
    if weight_decay is not None:
        weight_decay = checks.nonnegative_float("weight_decay", weight_decay)
        if optimizer is not None:
            raise JaxicError("weight_decay sets the default optimizer's decay, but optimizer= replaces that optimizer; "
                             "set the decay in your optimizer (e.g. optax.adamw(..., weight_decay=0.05)) or drop "
                             "optimizer=.")
    if microbatch_size is not None:
        microbatch_size = checks.positive_int("microbatch_size", microbatch_size)
    if isinstance(network, str):
        if network not in NETWORKS:
            raise JaxicError(f"unknown network {network!r}; choose one of {sorted(NETWORKS)} or pass a "
                             "configuration such as jaxic.networks.LSTMConfig(lstm_dim=128).")
        network = NETWORKS[network]()
    training.num_microbatches(batch_size, microbatch_size)  # fail before tracing the model
    observation_embedders = resolve_embedders(observation_embedders, observed)
    train_config = TrainConfig(num_steps=num_steps, batch_size=batch_size, learning_rate=learning_rate,
                               validation_size=validation_size, custom_optimizer=optimizer is not None,
                               microbatch_size=microbatch_size,
                               weight_decay=TrainConfig.weight_decay if weight_decay is None else weight_decay,
                               validation_every=max(TrainConfig.steps_per_call, num_steps // 20))
    if dataset is not None and not isinstance(dataset, TraceDataset):
        dataset = TraceDataset(dataset, holdout=validation_size)
    # Unsupported latents (Delta, improper priors) fail by name at the first model run, on every path.
    with checks.SupportedLatents(observed):
        compiled = _assemble(model, model_args, model_kwargs, observed, key, network, train_config, optimizer,
                             observation_embedders, path, dataset, pilot_traces=pilot_traces,
                             max_tokens=max_tokens, objective=objective, data=data, local_plate=local_plate,
                             devices=devices, max_sites_per_run=max_sites_per_run, run_timeout=run_timeout)
    if checkpoint_dir is not None:
        compiled.checkpoint_to(checkpoint_dir, checkpoint_every, max_to_keep)
    elif checkpoint_every is not None:
        raise JaxicError("checkpoint_every needs checkpoint_dir: the folder to save into.")
    return compiled.train(num_steps if seconds is None or num_steps else None, seconds=seconds, patience=patience,
                          callbacks=callbacks, progress=progress)


# What a candidate of compile_best may change: the network and how it is optimised, never what the held-out loss is
# measured on (model, observations, key, dataset, validation size, objective).
CANDIDATE_OPTIONS = ("network", "weight_decay", "learning_rate", "batch_size", "microbatch_size", "optimizer",
                     "observation_embedders")
COMPACT_CANDIDATE = types.MappingProxyType({"network": TransformerConfig(d_model=32, obs_hidden=32),
                                            "weight_decay": 0.05})
DEFAULT_CANDIDATES = ({}, COMPACT_CANDIDATE)


class Candidate(NamedTuple):
    """One configuration :func:`compile_best` trained: its options, held-out loss, restored step, steps and seconds.

    Example:
        >>> [c.validation_loss for c in selection.candidates]
    """
    options: Mapping[str, Any]
    validation_loss: float
    best_step: int | None
    steps: int
    seconds: float


class Selection(NamedTuple):
    """What :func:`compile_best` returns: the chosen ``compiled`` model, its index ``chosen`` in ``candidates``, and
    every candidate's :class:`Candidate` record.

    Example:
        >>> selection = jaxic.compile_best(model, ["obs"], key, 5000, dataset=dataset, patience=6)
        >>> print(selection.summary())
    """
    compiled: CompiledModel
    chosen: int
    candidates: tuple[Candidate, ...]

    def summary(self) -> str:
        """One line per candidate: options, held-out loss, restored step, seconds; the chosen one marked ``*``.

        Example:
            >>> print(selection.summary())
        """
        lines = []
        for i, c in enumerate(self.candidates):
            options = ", ".join(f"{k}={v!r}" for k, v in c.options.items()) or "defaults"
            best = "" if c.best_step is None else f" (best step {c.best_step})"
            lines.append(f"{'*' if i == self.chosen else ' '} {options}: held-out loss {c.validation_loss:.4f} after "
                         f"{c.steps} steps{best}, {c.seconds:.0f} s")
        return "\n".join(lines)


def compile_best(model: Callable, observed: Sequence[str], key: jax.Array, num_steps: int | None = None, *,
                 candidates: Sequence[Mapping[str, Any]] = DEFAULT_CANDIDATES, **options) -> Selection:
    """:func:`compile` once per candidate configuration and keep the one with the lowest held-out loss.

    Every candidate trains with the same ``key`` and arguments (``options``, the keyword arguments of
    :func:`compile`), changed only by its own entries (any of ``CANDIDATE_OPTIONS``: network, weight decay,
    learning rate, batch size, optimizer, observation embedders), so all are scored on the same held-out traces
    (:meth:`CompiledModel.validation_loss`, after ``patience`` restored the best step). The default candidates
    are jaxic's defaults and ``COMPACT_CANDIDATE`` (width 32, a 32-wide observation MLP, weight decay 0.05):
    on a fixed ``dataset`` of a few thousand simulations of a long observation the default network can
    overfit, and which size fits is task-dependent (benchmarks/RESULTS.md, "Network size for a fixed simulation
    budget"). Training costs the sum of the candidates'; ties go to the earlier candidate.

    Example:
        >>> selection = jaxic.compile_best(model, ["obs"], jax.random.key(0), 5000, dataset="sims/", patience=6)
        >>> print(selection.summary())            # which network won, by how much
        >>> posterior = selection.compiled.posterior(jax.random.key(1), {"obs": x}, 10_000)
    """
    if isinstance(candidates, (str, bytes, Mapping)) or not isinstance(candidates, Sequence) or not candidates:
        raise JaxicError(f"candidates must be a non-empty list of dicts of compile options, got {candidates!r}; e.g. "
                         "candidates=[{}, {'network': jaxic.TransformerConfig(d_model=32)}].")
    for i, candidate in enumerate(candidates):
        if not isinstance(candidate, Mapping):
            raise JaxicError(f"candidates[{i}] must be a dict of compile options, got {candidate!r}.")
        unknown = sorted(set(candidate) - set(CANDIDATE_OPTIONS))
        if unknown:
            raise JaxicError(f"candidates[{i}] sets {unknown}, which a candidate may not change: all candidates are "
                             f"scored on the same held-out traces, so they differ only in {list(CANDIDATE_OPTIONS)}. "
                             "Pass the other arguments once, to compile_best itself.")
        # Checked here too, so that a bad value in a later candidate fails before the earlier ones train.
        for name, check in (("weight_decay", checks.nonnegative_float), ("learning_rate", checks.positive_float),
                            ("batch_size", checks.positive_int), ("microbatch_size", checks.positive_int)):
            if candidate.get(name) is not None:
                check(f"candidates[{i}]['{name}']", candidate[name])
    for name in ("checkpoint_dir", "checkpoint_every"):
        if options.get(name) is not None:
            raise JaxicError(f"compile_best trains several models, so it does not take {name}=; save the chosen one "
                             "with selection.compiled.save(path) or selection.compiled.checkpoint_to(folder).")
    records, best, chosen = [], None, None
    for i, candidate in enumerate(candidates):
        start = time.perf_counter()
        compiled = compile(model, observed, key, num_steps, **{**options, **candidate})
        loss = compiled.validation_loss()
        records.append(Candidate(dict(candidate), loss, compiled.best_step, compiled.step,
                                 time.perf_counter() - start))
        if np.isfinite(loss) and (best is None or loss < records[chosen].validation_loss):
            best, chosen = compiled, i
    if best is None:
        raise JaxicError("no candidate reached a finite held-out loss "
                         f"({', '.join(f'{r.validation_loss}' for r in records)}): see each one's history['loss'], "
                         "or lower the learning rate.")
    return Selection(best, chosen, tuple(records))


def load(path: str | os.PathLike, model: Callable, *, model_args: Sequence = (), model_kwargs: Mapping | None = None,
         optimizer: optax.GradientTransformation | None = None,
         observation_embedders: Mapping[str, Any] | None = None,
         dataset: TraceDataset | str | os.PathLike | None = None,
         data: Mapping[str, Any] | None = None, devices: Any = None) -> CompiledModel:
    """Load a proposal saved with :meth:`CompiledModel.save` for ``model``.

    The model's trace spec must match the saved one; training continues exactly as
    the uninterrupted run would have. The model's learned parameters come back too;
    ``data`` is needed only to train further with an objective that reads data;
    ``devices`` as in :func:`compile` (a runtime choice, not saved).

    Example:
        >>> compiled = jaxic.load("proposal_ckpt/", model, model_kwargs={"M": 20})
    """
    model = checks.model_callable(model)
    path = checkpoint.resolve_checkpoint(path)  # one verified step, also while a run is still saving
    metadata = checkpoint.read_metadata(path)
    saved_spec = TraceSpec.from_json(metadata["trace_spec"])
    observed = [o.name for o in saved_spec.observed]
    bound = core.bind(model, model_args, model_kwargs)
    local = (metadata.get("local_plate") or {}).get("name")
    try:
        if local is not None:
            bound = core.local_plate_of(bound, local, observed).element_model(bound, 0)
        if saved_spec.dynamic:  # addresses were discovered by pilot runs: check that fresh runs fit
            spec = saved_spec
            sample_universal(spec, bound, jax.random.key(0), 4)
        else:
            spec = derive_trace_spec(bound, observed, elementwise=core.PLATE_ELEMENTWISE if local is not None else None)
    except (ObservationError, ModelError) as exc:
        raise CheckpointError(f"checkpoint '{path}' does not fit this model: {exc}") from None
    difference = saved_spec.describe_difference(spec)
    if difference:
        raise CheckpointError(f"checkpoint '{path}' was written for a different model:\n{difference}\n"
                              "Pass the same model and model_args/model_kwargs it was compiled with.")
    network_meta = metadata["network"]
    if network_meta["type"] not in NETWORKS:
        raise CheckpointError(f"checkpoint '{path}' uses network '{network_meta['type']}', unknown to this jaxic.")
    network_config = config_from_metadata(network_meta["type"], network_meta["config"])
    train_config = TrainConfig(**metadata["train_config"])
    if train_config.custom_optimizer and optimizer is None:
        raise CheckpointError(f"checkpoint '{path}' was trained with a custom optimizer; pass the same "
                              "optimizer to jaxic.load(..., optimizer=...) to restore its state.")
    # Rebuild with the original key (same validation set); statistics are restored, so few traces suffice.
    compile_key = jax.random.wrap_key_data(jnp.asarray(metadata["compile_key"], jnp.uint32))
    if dataset is not None and not isinstance(dataset, TraceDataset):
        dataset = TraceDataset(dataset, holdout=train_config.validation_size)
    objective_meta = metadata.get("objective", {"name": "forward_kl", "options": {}})
    objective = OBJECTIVES[objective_meta["name"]](**objective_meta["options"])
    # Embedders chosen by configuration are rebuilt from the checkpoint; modules built by hand come from the caller.
    observation_embedders = {**embedders_from_metadata(metadata.get("observation_embedders", {})),
                             **dict(observation_embedders or {})}
    compiled = _assemble(model, model_args, model_kwargs, observed, compile_key, network_config,
                         dataclasses.replace(train_config, statistics_size=16), optimizer, observation_embedders,
                         dataset=dataset, spec=saved_spec if saved_spec.dynamic else None, objective=objective,
                         data=data, local_plate=local, devices=devices)
    compiled.train_config = train_config
    state = _state_from_arrays(compiled.state, checkpoint.read_arrays(path, _state_arrays(compiled.state)))
    compiled.state = state if compiled.mesh is None else parallel.replicate(state, compiled.mesh)
    compiled.history = {k: list(v) for k, v in metadata["history"].items()}
    return compiled
