"""Compile time, throughput, memory and FLOP efficiency of jaxic's training step and importance sampler,
time to posterior quality, and the Pyro CSIS peer, in one run.

Model: ``jaxic.models.pedagogical`` (x, M nuisance sites, y; ``obs = x**2 + y**2 + noise``
observed), evaluated at ``obs = 25``. Batch of 64 traces per training step throughout.

**Networks** (``--sizes``): ``default`` is jaxic's default ``TransformerConfig()``; ``matched`` is a
transformer matched in parameter count to pyprob's default LSTM network (about 2.6 M parameters:
``d_model=256``, 3 layers, 10 mixture components, 256-wide observation MLP); ``lstm`` is jaxic's own
pyprob-sized LSTM (``LSTMConfig.pyprob_default()``: 512-wide LSTM, 256-wide observation embedding,
10 components). Each is built through ``jaxic.compile(..., num_steps=0)`` (constant learning rate
after the warm-up).

**Throughput table**, per network and M (``--M``):

* **compile s**: tracing, lowering and XLA compilation of the training chunk
  (``CompiledModel.loop.multi_step``: ``steps_per_call`` steps in one ``lax.scan``) and of the
  importance sampler (``jaxic.importance_sample`` on ``compiled.proposal``), compiled ahead of time;
* **micro-batch**: transformers whose batch has more than ``--max-rows`` activation rows (64 traces x
  ``M + 4`` positions: M = 200 here) train in micro-batches (``jaxic.compile(..., microbatch_size=)``,
  gradients averaged over the slices): on a CPU the activations of a tall batch fall out of cache;
* **train traces/s**: ``64 * steps / seconds`` over ``--seconds`` of training after one warm-up chunk;
* **matmul GFLOP/s (% of peak)**: dense matrix-product FLOPs of one training step, counted exactly
  from its jaxpr (``dot_general``; loop bodies times their trip count, the forward, backward and
  optimizer all included), times steps/s, as a percentage of this machine's dense f32 matmul
  rate measured in the same run (the best of jitted n x n products, n in ``--matmul-sizes``,
  before and after the benchmark). XLA's own ``cost_analysis()`` counts a loop body once, so its
  figure for the chunk is one step's (elementwise operations included); it is printed in the log;
* **IS particles/s** and **us/particle**: one ``--particles`` importance-sampling call at ``obs = 25``,
  median of ``--repeats`` calls after a warm-up call;
* **ESS/N**: Kish effective sample size over N of those calls (their mean), after the training above;
* **memory MiB**: XLA's buffer plan of the compiled executables (``memory_analysis()``: arguments +
  outputs + temporaries, training / sampling). On an accelerator the device's peak bytes in use
  (``memory_stats()``, since process start) are printed too; the process's peak RSS is in the log.

**Time to quality** (``--quality-M`` x ``--quality-sizes``: jaxic's default network and ``fast``, the
same with one layer): training in chunks with an ESS/N
evaluation (``--quality-particles`` particles at ``obs = 25``, one fixed key) after every
``--quality-every`` seconds of training; evaluations and compilation are off the training clock.
Reported: the training time at which ESS/N first reaches 0.1 and 0.3 (resolution: one evaluation
interval), ESS/N at the end of ``--quality-seconds``, and effective samples/s (the sampler's
particles/s from the throughput table x final ESS/N). With ``--quality-schedule cosine`` (default)
the learning rate decays over the number of steps expected in the budget (from the table's rate).

**Peer** (``benchmarks/pyro_csis.py``, when ``pyro-ppl`` and ``torch`` are installed: the ``bench``
extra; ``--no-peer`` skips it): Pyro's CSIS with a hand-written vectorised pyprob-style LSTM guide
of matched size, trained for ``--quality-seconds`` at each M of ``--peer-M`` in a subprocess (its
threads never overlap jaxic's), with the same ESS/N evaluations. Ratios jaxic/peer are printed
next to the pyprob and Pyro CSIS reference figures quoted in the issue (measured there, not here).

**Profile** (``--profile-M``, matched network): per-part timing of one training step (joint
sampling, forward, forward + backward, optimizer update, each jitted alone); the **matmul ceiling**:
every distinct matrix product of forward + backward jitted and timed alone at its own shapes (the
rate the step's products reach with nothing else in the way, which is what small or very tall
products cap below the square-matmul peak); and, where ``jax.profiler`` writes a Perfetto trace,
the share of matrix-product kernels in the op time.

Everything is printed and written to the section ``## Throughput (benchmarks/throughput.py)`` of
``benchmarks/RESULTS.md`` (other sections are kept), with the machine, date, versions and command.

Run from the repository root on an otherwise idle machine (about an hour with the defaults on a 2-core CPU):

    python benchmarks/throughput.py
    python benchmarks/throughput.py --M 2 20 --seconds 3 --quality-seconds 10 --no-write   # quick check
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxic
from jaxic import training
from jaxic.diagnostics import ess as kish_ess
from jaxic.models import pedagogical
from jaxic.networks import LSTMConfig, TransformerConfig
from jaxic.objectives import forward_kl_loss
from jaxic.tracing import sample_joint
from flops import dot_flops, matmul_flops, matmul_products
from results_io import environment_lines, publish

HEADING = "## Throughput (benchmarks/throughput.py)"
OBS = 25.0
OBSERVATIONS = {"obs": OBS}
BATCH = 64
THRESHOLDS = (0.1, 0.3)
HERE = Path(__file__).resolve().parent

NETWORKS = {
    "default": TransformerConfig(),
    "matched": TransformerConfig(d_model=256, num_heads=4, num_layers=3, num_components=10, obs_hidden=256),
    "lstm": LSTMConfig.pyprob_default(),
    "fast": TransformerConfig(num_layers=1),
}
DESCRIPTION = {
    "default": "jaxic's default transformer (d_model 64, 2 layers, 8 components)",
    "matched": "transformer matched to pyprob's default LSTM (d_model 256, 3 layers, 4 heads, 10 components, "
               "256-wide observation MLP)",
    "lstm": "jaxic's LSTM at pyprob's default sizes (LSTMConfig.pyprob_default(): 512-wide LSTM, 256-wide "
            "observation embedding, 10 components)",
    "fast": "jaxic's default transformer with one layer instead of two (`TransformerConfig(num_layers=1)`): "
            "about 1.7x the training steps/s, for time-to-quality runs",
}

# Figures quoted in the issue (2-core CPU, batch 64, 180 s of training, obs = 25): not measured here.
REFERENCE = {
    "pyprob": {"train": {2: 412, 20: 105, 50: 46}, "is": {2: 48, 20: 11, 50: 4.4}},
    "Pyro CSIS": {"train": {2: 926, 20: 206}, "is": {2: 124, 20: 25}},
}
REFERENCE_ESS_BOUND = 0.05  # "after 180 s none of them exceeds ESS/N 0.05 at obs = 25"


def timed(fn: Callable[..., Any], *args) -> tuple[Any, float]:
    """``fn(*args)`` and its wall time in seconds, waiting for every output array."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# FLOPs, memory, the machine's matmul rate


def matmul_ceiling(jaxpr, repeats: int = 5) -> list[dict]:
    """Each distinct matrix product of ``jaxpr`` jitted and timed alone at its own shapes (best of
    ``repeats``): what the step's matmuls cost with nothing else in the way. Sorted by total time."""
    rows = []
    for (lhs, rhs, dims, dtype), count in matmul_products(jaxpr).items():
        a = jnp.ones(lhs, dtype)
        b = jnp.ones(rhs, dtype)
        product = jax.jit(lambda a, b, dims=dims: jax.lax.dot_general(a, b, dims))
        jax.block_until_ready(product(a, b))
        best = min(timed(product, a, b)[1] for _ in range(repeats))
        flops = dot_flops(lhs, rhs, dims)
        rows.append({"lhs": lhs, "rhs": rhs, "count": count, "flops": flops * count,
                     "seconds": best * count, "rate": flops / best})
    return sorted(rows, key=lambda r: -r["seconds"])


def executable_bytes(executable) -> int | None:
    """Arguments + outputs + temporaries of XLA's buffer plan (``None`` if the backend gives none)."""
    try:
        m = executable.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def measure_matmul(sizes: list[int], repeats: int) -> dict[int, float]:
    """Best f32 FLOP/s of a jitted ``n x n`` matrix product for each n."""
    rates = {}
    product = jax.jit(jnp.matmul)
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        jax.block_until_ready(product(a, b))
        best = min(timed(product, a, b)[1] for _ in range(repeats))
        rates[n] = 2.0 * n**3 / best
    return rates


# ----------------------------------------------------------------------------------------------
# One network at one M


@dataclasses.dataclass
class Cell:
    """Figures for one network size and one M (see the module docstring)."""

    size: str
    M: int
    microbatch: int  # traces per micro-batch of the training step (BATCH: none)
    parameters: int
    train_compile_s: float
    is_compile_s: float
    steps: int
    train_s: float
    train_traces_per_s: float
    flops_per_step: float  # dense matmul FLOPs (jaxpr count)
    xla_flops_chunk: float  # XLA cost_analysis of the chunk (loop body counted once)
    particles: int
    is_particles_per_s: float
    is_flops_per_particle: float
    ess_fraction: float
    train_bytes: int | None
    is_bytes: int | None
    device_peak: int | None

    @property
    def steps_per_s(self) -> float:
        return self.train_traces_per_s / BATCH

    def train_flops_per_s(self) -> float:
        return self.flops_per_step * self.steps_per_s


def microbatch_for(size: str, M: int, max_rows: int) -> int:
    """Traces per micro-batch of a transformer's training step: the largest divisor of the batch whose
    activations have at most ``max_rows`` rows (traces x ``M + 4`` positions); the whole batch for the
    LSTM (it runs one token at a time: its products have batch rows whatever M is) or ``max_rows=0``."""
    if max_rows <= 0 or isinstance(NETWORKS[size], LSTMConfig):
        return BATCH
    return max([d for d in range(1, BATCH + 1) if BATCH % d == 0 and d * (M + 4) <= max_rows] or [1])


def build(size: str, M: int, optimizer=None, microbatch: int = BATCH) -> jaxic.CompiledModel:
    return jaxic.compile(pedagogical, observed=["obs"], key=jax.random.key(0), num_steps=0, model_kwargs={"M": M},
                         network=NETWORKS[size], optimizer=optimizer, batch_size=BATCH, progress=False,
                         microbatch_size=None if microbatch == BATCH else microbatch)


def compile_trainer(compiled: jaxic.CompiledModel):
    """The training chunk compiled ahead of time: ``(executable, seconds, matmul FLOPs/step, XLA flops)``."""
    chunk = compiled.train_config.steps_per_call
    start = time.perf_counter()
    executable = compiled.loop.multi_step.lower(compiled.state, chunk).compile()
    seconds = time.perf_counter() - start
    flops = matmul_flops(jax.make_jaxpr(compiled.loop.multi_step)(compiled.state, chunk).jaxpr) / chunk
    xla = float((executable.cost_analysis() or {}).get("flops", float("nan")))
    return executable, seconds, flops, xla


def compile_sampler(compiled: jaxic.CompiledModel, particles: int):
    """The importance sampler for ``particles`` at ``obs = 25``: ``(call(key), seconds, FLOPs/particle, exe)``."""
    sampler = jax.jit(lambda proposal, key, obs: jaxic.importance_sample(proposal, None, key, obs, particles))
    observations = {"obs": jnp.float32(OBS)}
    proposal = compiled.proposal
    args = lambda key: (proposal, key, observations)
    start = time.perf_counter()
    executable = sampler.lower(*args(jax.random.key(0))).compile()
    seconds = time.perf_counter() - start
    flops = matmul_flops(jax.make_jaxpr(sampler)(*args(jax.random.key(0))).jaxpr) / particles
    return (lambda key: executable(*args(key))), seconds, flops, executable


def particles_for(M: int, particles: int) -> int:
    """Particles per sampling call at M: ``particles`` up to M = 20, then shrinking as ``(24 / (M + 4))**2``
    (the sampler's cost per particle grows about quadratically with the trace length), at least 64."""
    return max(64, min(particles, int(particles * (24 / (M + 4)) ** 2)))


def ess_fraction(log_weights) -> float:
    """Kish ESS / N (``jaxic.diagnostics.ess``), a NaN weight counting as zero; 0 if none is finite."""
    log_w = np.asarray(log_weights, np.float64)
    log_w = np.where(np.isnan(log_w), -np.inf, log_w)
    return float(kish_ess(log_w) / log_w.size) if np.isfinite(log_w).any() else 0.0


def train_chunks(trainer, state, chunk: int, seconds: float):
    """Run whole chunks until ``seconds`` have passed: ``(state, steps, elapsed)``."""
    steps, start = 0, time.perf_counter()
    while True:
        state, _ = jax.block_until_ready(trainer(state, chunk))
        steps += chunk
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return state, steps, elapsed


def benchmark_cell(size: str, M: int, seconds: float, particles: int, repeats: int, max_rows: int) -> Cell:
    start = time.perf_counter()
    microbatch = microbatch_for(size, M, max_rows)
    compiled = build(size, M, microbatch=microbatch)
    chunk = compiled.train_config.steps_per_call
    print(f"[{size} M={M}] built in {time.perf_counter() - start:.1f} s, {compiled.num_parameters:,} parameters, "
          f"micro-batches of {microbatch}", flush=True)
    trainer, train_compile, flops, xla_flops = compile_trainer(compiled)
    (state, _), _ = timed(trainer, compiled.state, chunk)  # warm-up chunk
    state, steps, train_s = train_chunks(trainer, state, chunk, seconds)
    compiled.state = state
    rate = BATCH * steps / train_s
    print(f"[{size} M={M}] train: compile {train_compile:.1f} s, {steps} steps in {train_s:.1f} s = "
          f"{rate:,.0f} traces/s; matmul FLOPs/step {flops / 1e9:.2f} G (XLA cost_analysis of the chunk: "
          f"{xla_flops / 1e9:.2f} G, its loop body once)", flush=True)

    particles = particles_for(M, particles)
    sample, is_compile, is_flops, is_exe = compile_sampler(compiled, particles)
    keys = jax.random.split(jax.random.key(1), repeats + 1)
    timed(sample, keys[0])  # warm-up
    runs = [timed(sample, key) for key in keys[1:]]
    is_rate = particles / statistics.median(t for _, t in runs)
    ess = float(np.mean([ess_fraction(r.log_weights) for r, _ in runs]))
    print(f"[{size} M={M}] IS: compile {is_compile:.1f} s, {particles:,} particles per call, {is_rate:,.0f} "
          f"particles/s, ESS/N {ess:.4f}; "
          f"peak RSS {peak_rss_mib():,.0f} MiB", flush=True)
    return Cell(size, M, microbatch, compiled.num_parameters, train_compile, is_compile, steps, train_s, rate, flops,
                xla_flops, particles, is_rate, is_flops, ess, executable_bytes(trainer), executable_bytes(is_exe),
                device_peak_bytes())


# ----------------------------------------------------------------------------------------------
# Time to quality


@dataclasses.dataclass
class Quality:
    size: str
    M: int
    compile_s: float
    horizon: int  # learning-rate schedule length in steps (0: constant)
    steps: int
    train_s: float
    time_to: dict[float, float | None]
    final_ess: float
    curve: list[tuple[float, int, float]]


def time_to_quality(size: str, M: int, seconds: float, every: float, particles: int, horizon: int,
                    learning_rate: float, max_rows: int) -> Quality:
    optimizer = training.default_optimizer(horizon, learning_rate)  # horizon 0: constant after the warm-up
    compiled = build(size, M, optimizer, microbatch_for(size, M, max_rows))
    chunk = compiled.train_config.steps_per_call
    trainer, compile_s, _, _ = compile_trainer(compiled)
    sample, is_compile, _, _ = compile_sampler(compiled, particles)
    key = jax.random.key(7)  # one key for every evaluation: the curve moves with the network only
    time_to = {th: None for th in THRESHOLDS}
    curve, state, steps, clock = [], compiled.state, 0, 0.0
    while clock < seconds:
        state, done, elapsed = train_chunks(trainer, state, chunk, min(every, seconds - clock))
        steps += done
        clock += elapsed
        compiled.state = state  # the sampler reads compiled.state
        ess = ess_fraction(jax.block_until_ready(sample(key)).log_weights)
        curve.append((round(clock, 2), steps, ess))
        for th in THRESHOLDS:
            if time_to[th] is None and ess >= th:
                time_to[th] = clock
    print(f"[quality {size} M={M}] {steps} steps in {clock:.1f} s, ESS/N {curve[-1][2]:.3f}, time to "
          + ", ".join(f"{th}: {_seconds(t)}" for th, t in time_to.items()) + "; curve (s, steps, ESS/N): "
          + ", ".join(f"({t:.0f}, {n}, {e:.3f})" for t, n, e in curve), flush=True)
    return Quality(size, M, compile_s + is_compile, horizon, steps, clock, time_to, curve[-1][2], curve)


# ----------------------------------------------------------------------------------------------
# Profile of one training step


def profile_step(M: int, repeats: int = 7, peak: float | None = None, max_rows: int = 0) -> list[str]:
    """Per-part timings of the matched network's training step at M; a few lines of findings.

    The whole step (one compiled chunk, per step) and its parts, each jitted alone, are timed
    in turns (``repeats`` rounds, medians), so that a change of machine load hits them alike.
    """
    compiled = build("matched", M)
    state = compiled.state
    chunk = compiled.train_config.steps_per_call
    trainer, _, f_step, _ = compile_trainer(compiled)

    draw = jax.jit(lambda key: sample_joint(compiled.spec, compiled.bound_model, key, BATCH))
    tokens, observations = draw(jax.random.key(1))

    def loss(trainable, stats, tokens, observations):
        return forward_kl_loss(nnx.merge(compiled.graphdef, trainable[0], stats), tokens, observations)[0]

    trainable = (state.params, state.model_params)
    args = (trainable, state.statistics, tokens, observations)
    forward = jax.jit(loss)
    both = jax.jit(jax.value_and_grad(loss))
    _, grads = both(*args)
    update = jax.jit(compiled.optimizer.update)
    microbatch = microbatch_for("matched", M, max_rows)
    sliced = {}
    if microbatch < BATCH:  # the step as the throughput table runs it, next to the whole-batch step
        sliced_trainer = compile_trainer(build("matched", M, microbatch=microbatch))[0]
        sliced = {"sliced": (lambda: sliced_trainer(state, chunk), chunk)}
    parts = {**sliced, "step": (lambda: trainer(state, chunk), chunk), "draw": (lambda: draw(jax.random.key(1)), 1),
             "forward": (lambda: forward(*args), 1), "both": (lambda: both(*args), 1),
             "update": (lambda: update(grads, state.opt_state, trainable), 1)}
    times = {name: [] for name in parts}
    for name, (fn, _) in parts.items():
        jax.block_until_ready(fn())  # compile / warm up
    for _ in range(repeats):
        for name, (fn, per) in parts.items():
            times[name].append(timed(fn)[1] / per)
    t = {name: 1e3 * statistics.median(v) for name, v in times.items()}
    f_fwd = matmul_flops(jax.make_jaxpr(loss)(*args).jaxpr)
    f_both = matmul_flops(jax.make_jaxpr(jax.value_and_grad(loss))(*args).jaxpr)
    rate = lambda flops, ms: f"{flops / ms / 1e6:,.0f} GFLOP/s"
    lines = [
        f"Profile, matched network, M = {M}, batch {BATCH}: a training step takes {t['step']:.0f} ms "
        f"({rate(f_step, t['step'])} of matmul FLOPs). Jitted alone: joint sampling {t['draw']:.1f} ms, the "
        f"network's forward pass {t['forward']:.0f} ms ({rate(f_fwd, t['forward'])}), forward + backward "
        f"{t['both']:.0f} ms ({rate(f_both, t['both'])}; the backward alone "
        f"{rate(f_both - f_fwd, max(t['both'] - t['forward'], 1e-6))}), the AdamW update {t['update']:.1f} ms."]
    ceiling = matmul_ceiling(jax.make_jaxpr(jax.value_and_grad(loss))(*args).jaxpr)
    c_flops, c_time = sum(r["flops"] for r in ceiling), sum(r["seconds"] for r in ceiling)
    slowest = "; ".join(f"{'x'.join(map(str, r['lhs']))} . {'x'.join(map(str, r['rhs']))} x{r['count']}: "
                        f"{1e3 * r['seconds']:.0f} ms at {r['rate'] / 1e9:,.0f} GFLOP/s" for r in ceiling[:3])
    lines.append(
        f"Ceiling: the {len(ceiling)} distinct matrix products of forward + backward, each jitted and timed alone "
        f"at its own shapes, take {1e3 * c_time:.0f} ms together ({c_flops / c_time / 1e9:,.0f} GFLOP/s"
        + (f", {100 * c_flops / c_time / peak:.0f}% of the square-matmul peak" if peak else "")
        + f"); forward + backward run at {100 * c_time / (t['both'] / 1e3):.0f}% of that. Slowest: {slowest}.")
    if sliced:
        lines.append(f"In micro-batches of {microbatch} traces (`microbatch_size`, as in the throughput table) the "
                     f"step takes {t['sliced']:.0f} ms ({rate(f_step, t['sliced'])}).")
    split = op_split(both, args)
    if split:
        lines.append(f"Of XLA's op time in forward + backward, matrix-product kernels take {100 * split['matmul']:.0f}%, "
                     f"copies/transposes/concatenations {100 * split['movement']:.0f}%, elementwise work (GELU, layer "
                     f"norm, softmax) {100 * split['other']:.0f}%.")
    particles = particles_for(M, 1000)
    sample, _, is_flops, _ = compile_sampler(compiled, particles)
    jax.block_until_ready(sample(jax.random.key(2)))
    t_is = 1e3 * statistics.median(timed(sample, jax.random.key(2))[1] for _ in range(3))
    split = op_split(sample, (jax.random.key(3),))
    if split:
        lines.append(
            f"Importance sampling ({particles:,} particles, {t_is / particles * 1e3:,.0f} us each, "
            f"{is_flops * particles / t_is / 1e6:,.0f} GFLOP/s of matmul FLOPs): matrix products take "
            f"{100 * split['matmul']:.0f}% of the op time, copies/transposes/concatenations/slices "
            f"{100 * split['movement']:.0f}%, the rest {100 * split['other']:.0f}%."
            + (" The copies are of the key/value cache: `TransformerProposal.decode` stacks the per-layer caches "
               "into one array and slices it apart again at every token, and `jax.nn.dot_product_attention` "
               "transposes the whole cache at every call, so each decoded token moves the full cache several times "
               "(a cost quadratic in the trace length)." if split["movement"] > 0.3 else ""))
    return lines


MOVEMENT = ("copy", "concatenate", "transpose", "slice", "dynamic-update-slice", "broadcast", "pad", "gather")


def op_split(fn, args) -> dict[str, float] | None:
    """Shares of XLA's op time of ``fn(*args)`` by kernel kind, from a ``jax.profiler`` Perfetto trace:
    ``matmul`` (matrix-product kernels), ``movement`` (copies, transposes, concatenations, slices,
    broadcasts), ``other`` (elementwise and reductions). ``None`` where the profiler gives no trace."""
    try:
        with tempfile.TemporaryDirectory() as folder:
            with jax.profiler.trace(folder, create_perfetto_trace=True):
                for _ in range(2):
                    jax.block_until_ready(fn(*args))
            paths = list(Path(folder).rglob("perfetto_trace.json.gz"))
            if not paths:
                return None
            with gzip.open(paths[0]) as f:
                events = json.load(f)
    except Exception as exc:  # noqa: BLE001 - the profiler is optional here
        print(f"(no op-level profile: {exc})")
        return None
    events = events["traceEvents"] if isinstance(events, dict) else events
    shares = {"matmul": 0.0, "movement": 0.0, "other": 0.0}
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith(("$", "Thunk", "Slinky", "PjitFunction", "Common", "Parse")):
            continue
        ops = re.sub(r"\.\d+$", "", name).removesuffix("_fusion").removeprefix("wrapped_").split("_")
        if ops[0] in ("ynn", "xnn", "dot", "onednn", "gemm") or "dot" in ops:
            shares["matmul"] += e.get("dur", 0.0)
        elif any(op in MOVEMENT for op in ops if op != "bitcast"):
            shares["movement"] += e.get("dur", 0.0)
        else:
            shares["other"] += e.get("dur", 0.0)
    total = sum(shares.values())
    return {k: v / total for k, v in shares.items()} if total else None


# ----------------------------------------------------------------------------------------------
# Peer


def run_peer(args) -> tuple[list[dict], str | None]:
    """Pyro CSIS results per M of ``--peer-M`` (in a subprocess), or why there are none."""
    if args.no_peer:
        return [], "skipped (--no-peer)"
    sys.path.insert(0, str(HERE))
    import pyro_csis

    reason = pyro_csis.unavailable_reason()
    if reason:
        return [], reason
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "peer.json"
        command = [sys.executable, str(HERE / "pyro_csis.py"), "--M", *map(str, args.peer_M), "--seconds",
                   str(args.quality_seconds), "--every", str(args.quality_every), "--eval-particles",
                   str(args.quality_particles), "--csis-particles", str(args.peer_particles), "--batch-size",
                   str(BATCH), "--json", str(out)]
        if args.peer_threads:
            command += ["--threads", str(args.peer_threads)]
        print("peer: " + " ".join(command[1:]), flush=True)
        done = subprocess.run(command, cwd=HERE.parent)
        results = json.loads(out.read_text()) if out.exists() else []
    if done.returncode != 0:
        return results, f"the peer exited with status {done.returncode}"
    for r in results:
        r["time_to"] = {float(k): v for k, v in r["time_to"].items()}
    return results, None


# ----------------------------------------------------------------------------------------------
# Reporting


def _seconds(t: float | None) -> str:
    return "not reached" if t is None else f"{t:.0f} s"


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f}"


def _rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}" if x >= 10 else f"{x:,.1f}"


def _ratio(a: float | None, b: float | None, prefix: str = "") -> str:
    if a is None or not b or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{prefix}{a / b:,.1f}x"


def table(columns: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(columns) + " |", "|" + "|".join("---:" for _ in columns) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows])


def find(cells: list[Cell], size: str, M: int) -> Cell | None:
    return next((c for c in cells if c.size == size and c.M == M), None)


def throughput_table(cells: list[Cell], peak: float) -> list[str]:
    columns = ["network", "M", "micro-batch", "parameters", "compile s (train / IS)", "train traces/s",
               "matmul GFLOP/s (% of peak)", "IS particles/s", "us/particle", "ESS/N", "memory MiB (train / IS)"]
    rows = [[c.size, str(c.M), "-" if c.microbatch == BATCH else str(c.microbatch), f"{c.parameters:,}",
             f"{c.train_compile_s:.1f} / {c.is_compile_s:.1f}",
             _rate(c.train_traces_per_s),
             f"{c.train_flops_per_s() / 1e9:,.1f} ({100 * c.train_flops_per_s() / peak:.0f}%)",
             _rate(c.is_particles_per_s), f"{1e6 / c.is_particles_per_s:,.1f}", f"{c.ess_fraction:.4f}",
             f"{_mib(c.train_bytes)} / {_mib(c.is_bytes)}"] for c in cells]
    return table(columns, rows)


def cost_table(cells: list[Cell]) -> list[str]:
    columns = ["network", "M", "steps timed", "matmul MFLOPs/trace", "IS particles per call",
               "IS matmul MFLOPs/particle", "IS matmul GFLOP/s"]
    rows = [[c.size, str(c.M), f"{c.steps:,} in {c.train_s:.0f} s", f"{c.flops_per_step / BATCH / 1e6:,.1f}",
             f"{c.particles:,}", f"{c.is_flops_per_particle / 1e6:,.2f}",
             f"{c.is_flops_per_particle * c.is_particles_per_s / 1e9:,.1f}"] for c in cells]
    return table(columns, rows)


@dataclasses.dataclass
class Comparison:
    """jaxic against the peers at one M (``None``: not measured / no figure)."""

    M: int
    train: float | None  # matched network, traces/s
    csis_train: float | None  # measured
    csis_train_ref: float | None
    pyprob_train_ref: float | None
    sample: float | None  # matched network, particles/s
    peer_sample: float | None  # best of pyprob (quoted), Pyro CSIS (quoted) and CSIS.run (measured)
    peer_sample_name: str
    vectorised_sample: float | None  # the hand-written batched sampler of the CSIS guide
    effective: float | None  # default network: particles/s x ESS/N after the quality run
    peer_effective: float | None  # best peer, quoted peers at their ESS/N bound
    peer_effective_bound: bool  # True when the best is a quoted peer's upper bound
    vectorised_effective: float | None
    time_to: dict | None
    csis_time_to: dict | None


def compare(M: int, cells: list[Cell], qualities: list[Quality], measured: dict[int, dict]) -> Comparison:
    m, d = find(cells, "matched", M), find(cells, "default", M)
    q = next((q for q in qualities if q.M == M and q.size == "default"), None)
    r = measured.get(M)
    samplers = [(REFERENCE[name]["is"][M], f"{name} (quoted)") for name in REFERENCE if M in REFERENCE[name]["is"]]
    effective = [(rate * REFERENCE_ESS_BOUND, True) for rate, _ in samplers]
    if r:
        samplers.append((r["csis_particles_per_s"], "CSIS.run (measured)"))
        effective.append((r["csis_particles_per_s"] * r["csis_ess_fraction"], False))
    best = max(samplers, default=(None, "none"))
    best_effective = max(effective, default=(None, False))
    return Comparison(
        M, m.train_traces_per_s if m else None, r["train_traces_per_s"] if r else None,
        REFERENCE["Pyro CSIS"]["train"].get(M), REFERENCE["pyprob"]["train"].get(M),
        m.is_particles_per_s if m else None, best[0], best[1], r["vectorised_particles_per_s"] if r else None,
        d.is_particles_per_s * q.final_ess if d and q else None, best_effective[0], best_effective[1],
        r["vectorised_particles_per_s"] * r["ess_fraction"] if r else None,
        q.time_to if q else None, r["time_to"] if r else None)


def report(args, cells, matmul_rates, qualities, peer, peer_reason, profile_lines) -> list[str]:
    peak = args.peak
    before, after = matmul_rates
    lines = [f"- Batch {BATCH} traces per training step; observation `obs = {OBS:g}`; training budget "
             f"{args.seconds:g} s per row (after compilation and one warm-up chunk); up to {args.particles:,} "
             f"particles per importance-sampling call (fewer for M > 20), median of {args.repeats} calls.",
             f"- Dense f32 matmul rate of this machine (jitted n x n products, best of {args.matmul_repeats}, "
             "before / after the benchmark): "
             + ", ".join(f"n={n}: {before[n] / 1e9:,.0f} / {after[n] / 1e9:,.0f}" for n in before)
             + f" GFLOP/s. Percentages are of the best, {peak / 1e9:,.0f} GFLOP/s.",
             "- Networks: " + "; ".join(f"`{s}`: {DESCRIPTION[s]}" for s in args.sizes) + "."]
    device_peaks = [c.device_peak for c in cells if c.device_peak is not None]
    lines.append("- Memory: XLA's buffer plan of each compiled executable (`memory_analysis()`: arguments + outputs "
                 "+ temporaries)" + (f"; device peak bytes in use over the run: {max(device_peaks) / 2**20:,.0f} MiB"
                                     if device_peaks else "; no device memory statistics on CPU")
                 + f"; process peak RSS at the end: {peak_rss_mib():,.0f} MiB.")
    if cells:
        lines += ["", "### Throughput", ""] + throughput_table(cells, peak)
        lines += ["", "Matmul FLOPs are counted from each step's jaxpr (forward, backward and optimizer; a scan counts "
                  "its length times). XLA's `cost_analysis()` of the compiled chunk counts the loop body once, i.e. "
                  "one step (its figure is in the log).", ""]
        lines += cost_table(cells)

    if qualities:
        lines += ["", f"### Time to quality ({args.quality_seconds:g} s of training)", ""]
        columns = ["network", "M", "learning rate (schedule steps)", "steps", "time to ESS/N 0.1", "time to ESS/N 0.3",
                   f"ESS/N at {args.quality_seconds:g} s", "effective samples/s"]
        rows = []
        for q in qualities:
            cell = find(cells, q.size, q.M)
            rows.append([q.size, str(q.M), f"cosine ({q.horizon:,})" if q.horizon else "constant", f"{q.steps:,}",
                         _seconds(q.time_to[0.1]), _seconds(q.time_to[0.3]), f"{q.final_ess:.3f}",
                         _rate(cell.is_particles_per_s * q.final_ess) if cell else "n/a"])
        lines += table(columns, rows)
        lines += ["", "ESS/N during training (training seconds: ESS/N):", ""]
        lines += [f"- {q.size}, M = {q.M}: " + ", ".join(f"{t:.0f}: {e:.3f}" for t, _, e in q.curve) for q in qualities]
        lines += ["", f"ESS/N from {args.quality_particles:,} particles (one fixed key) after every "
                  f"{args.quality_every:g} s of training; times are training time (compilation and evaluations "
                  "excluded), to one evaluation interval. Effective samples/s: the network's particles/s "
                  "(throughput table) x the final ESS/N. The learning rate decays over the steps expected in the "
                  "budget (the table's steps/s x the budget), which is what brings q(y | x) to the precision "
                  "that ESS needs: most of the gain comes in the last third of the schedule."]

    lines += ["", "### Against the peers", ""] + peer_section(args, cells, qualities, peer, peer_reason)
    if profile_lines:
        lines += ["", "### Where the time goes", ""] + profile_lines
    return lines


def peer_section(args, cells, qualities, peer, peer_reason) -> list[str]:
    lines = []
    if peer_reason:
        lines += [f"Pyro CSIS peer not run: {peer_reason}. Ratios use the figures quoted in the issue only.", ""]
    measured = {r["M"]: r for r in peer}
    if measured:
        r0 = next(iter(measured.values()))
        lines.append(f"Pyro CSIS measured in this run (`benchmarks/pyro_csis.py`): vectorised pyprob-style LSTM guide, "
                     f"{r0['parameters']:,} parameters at M = {r0['M']}, batch {BATCH}, Adam 1e-3, "
                     f"{args.quality_seconds:g} s of training per M, {r0.get('threads')} torch thread(s). "
                     "*CSIS.run*: Pyro's importance sampler (guide and model run once per particle; "
                     f"{args.peer_particles} particles); *vectorised*: the same weights for "
                     f"{args.quality_particles:,} particles in one batched guide and model run (not Pyro's API).")
        lines.append("")
        columns = ["M", "train traces/s", "matmul MFLOPs/trace", "GFLOP/s", "CSIS.run particles/s",
                   "vectorised particles/s", "ESS/N at end", "time to 0.1", "time to 0.3"]
        rows = [[str(M), _rate(r["train_traces_per_s"]), f"{r['flops_per_trace'] / 1e6:,.1f}",
                 f"{r['flops_per_trace'] * r['train_traces_per_s'] / 1e9:,.1f}", _rate(r["csis_particles_per_s"]),
                 _rate(r["vectorised_particles_per_s"]), f"{r['ess_fraction']:.4f}",
                 _seconds(r["time_to"].get(0.1)), _seconds(r["time_to"].get(0.3))] for M, r in measured.items()]
        lines += table(columns, rows) + [""]
    Ms = sorted(set(args.M) | set(args.quality_M))
    comparisons = [compare(M, cells, qualities, measured) for M in Ms]
    lines += ["Ratios jaxic / peer. *quoted*: the issue's figures for pyprob and Pyro CSIS (2-core CPU, batch 64, "
              "180 s of training), not measured here; *measured*: Pyro CSIS in this run.", ""]
    columns = ["M", "matched train traces/s", "/ CSIS measured", "/ CSIS quoted", "/ pyprob quoted",
               "matched IS particles/s", "/ best peer IS", "/ vectorised guide IS",
               "default effective samples/s", "/ best peer", "/ vectorised guide"]
    rows = [[str(c.M), _rate(c.train), _ratio(c.train, c.csis_train), _ratio(c.train, c.csis_train_ref),
             _ratio(c.train, c.pyprob_train_ref), _rate(c.sample),
             _ratio(c.sample, c.peer_sample) + (f" ({c.peer_sample_name})" if c.sample and c.peer_sample else ""),
             _ratio(c.sample, c.vectorised_sample), _rate(c.effective),
             _ratio(c.effective, c.peer_effective, ">= " if c.peer_effective_bound else ""),
             _ratio(c.effective, c.vectorised_effective)] for c in comparisons]
    lines += table(columns, rows)
    lines += ["", "Best peer IS: the fastest of the quoted pyprob and Pyro CSIS samplers and the measured `CSIS.run`. "
              f"Peer effective samples/s: particles/s x ESS/N, with ESS/N = {REFERENCE_ESS_BOUND} for the quoted peers "
              "(the issue: none exceeds it after 180 s), so a ratio to them is a lower bound (>=). "
              "A ratio shows n/a where either side was not measured."]
    lines += ["", "Targets, read from this run:", ""]
    lines += targets(args, cells, qualities, comparisons) or ["- none measurable: no matched-network or quality rows."]
    return lines


def targets(args, cells, qualities, comparisons: list[Comparison]) -> list[str]:
    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    out = []
    for c in comparisons:
        if c.M < 20 or c.train is None:
            continue
        csis, source = (c.csis_train, "measured") if c.csis_train else (c.csis_train_ref, "quoted")
        parts = [f"matched training {c.train:,.0f} traces/s"]
        if csis:
            parts.append(f">= Pyro CSIS ({source}, {csis:,.0f}): {verdict(c.train >= csis)}")
        if c.pyprob_train_ref:
            parts.append(f">= 2x pyprob (quoted, 2 x {c.pyprob_train_ref}): "
                         f"{verdict(c.train >= 2 * c.pyprob_train_ref)}")
        out.append(f"- M = {c.M}: " + "; ".join(parts))
    matched = [c for c in cells if c.size == "matched"]
    if matched:
        out.append("- Matched training at >= 50% of the matmul peak: " + "; ".join(
            f"M = {c.M}: {100 * c.train_flops_per_s() / args.peak:.0f}% "
            f"{verdict(c.train_flops_per_s() >= 0.5 * args.peak)}" for c in matched))
    sampled = [c for c in comparisons if c.sample and c.peer_sample]
    if sampled:
        out.append("- Matched importance sampling >= 10x the best peer: " + "; ".join(
            f"M = {c.M}: {c.sample / c.peer_sample:,.1f}x {verdict(c.sample >= 10 * c.peer_sample)}"
            + (f" (vs the vectorised guide {c.sample / c.vectorised_sample:,.1f}x)" if c.vectorised_sample else "")
            for c in sampled))
    effective = [c for c in comparisons if c.effective is not None and c.peer_effective]
    if effective:
        out.append("- Default network effective samples/s >= 100x the best peer: " + "; ".join(
            f"M = {c.M}: {'>= ' if c.peer_effective_bound else ''}{c.effective / c.peer_effective:,.0f}x "
            f"{verdict(c.effective >= 100 * c.peer_effective)}" for c in effective))
    csis_time_to = {c.M: c.csis_time_to for c in comparisons}
    if qualities:
        out.append("- Time to ESS/N 0.1 / 0.3, jaxic vs Pyro CSIS: " + "; ".join(
            f"{q.size} M = {q.M}: {' / '.join(_seconds(q.time_to[t]) for t in THRESHOLDS)} vs "
            + (" / ".join(_seconds(csis_time_to[q.M].get(t)) for t in THRESHOLDS) if csis_time_to.get(q.M)
               else "not run") for q in qualities))
    for q in (q for q in qualities if q.M == 50):
        t = q.time_to[0.3]
        out.append(f"- ESS/N 0.3 at M = 50 within 180 s of training ({q.size} network): "
                   f"{verdict(t is not None and t <= 180)} ({_seconds(t)} in a {args.quality_seconds:g} s budget)")
    return out


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--M", type=int, nargs="+", default=[2, 20, 50, 200], help="numbers of nuisance sites")
    parser.add_argument("--sizes", nargs="+", default=["default", "matched", "lstm"], choices=list(NETWORKS),
                        help="networks for the throughput table")
    parser.add_argument("--seconds", type=float, default=60.0, help="training seconds per throughput row")
    parser.add_argument("--particles", type=int, default=10_000,
                        help="importance-sampling particles per call up to M = 20 (fewer beyond: see particles_for)")
    parser.add_argument("--repeats", type=int, default=3, help="timed sampling calls (the median is reported)")
    parser.add_argument("--quality-M", type=int, nargs="*", default=[2, 20, 50],
                        help="M values of the time-to-quality runs (jaxic's networks and the peer)")
    parser.add_argument("--quality-sizes", nargs="+", default=["default", "fast"], choices=list(NETWORKS),
                        help="networks of the time-to-quality runs (a throughput row is measured for any missing)")
    parser.add_argument("--quality-seconds", type=float, default=180.0, help="training budget of each quality run")
    parser.add_argument("--quality-every", type=float, default=10.0, help="training seconds between ESS evaluations")
    parser.add_argument("--quality-particles", type=int, default=2000, help="particles per ESS evaluation")
    parser.add_argument("--quality-schedule", choices=["cosine", "constant"], default="cosine",
                        help="learning rate of the quality runs: cosine decay over the expected steps, or constant")
    parser.add_argument("--quality-learning-rate", type=float, default=3e-3,
                        help="peak learning rate of the quality runs (jaxic's default)")
    parser.add_argument("--no-peer", action="store_true", help="skip the Pyro CSIS peer")
    parser.add_argument("--peer-M", type=int, nargs="*", default=None,
                        help="M values of the peer's runs (default: those of --quality-M)")
    parser.add_argument("--peer-particles", type=int, default=200, help="particles of the timed CSIS.run call")
    parser.add_argument("--peer-threads", type=int, default=None, help="torch threads of the peer (default: torch's)")
    parser.add_argument("--max-rows", type=int, default=4096,
                        help="transformers train in micro-batches of at most this many activation rows (traces x "
                             "positions; 0: whole batches): on CPUs, tall activations fall out of cache")
    parser.add_argument("--profile-M", type=int, nargs="*", default=[2, 20, 200],
                        help="Ms of the profile (matched network); none skips it")
    parser.add_argument("--matmul-sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--matmul-repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md",
                        help="markdown file whose throughput section is written or replaced")
    parser.add_argument("--section", default=None,
                        help="write a separate RESULTS.md section titled with this suffix (e.g. for a run of a few "
                             "cells and profiles that should not replace the full run's section)")
    parser.add_argument("--no-write", action="store_true", help="only print the results")
    args = parser.parse_args(argv)
    if args.peer_M is None:
        args.peer_M = list(args.quality_M)
    if min(args.M + (args.quality_M or [0])) < 0 or args.seconds <= 0 or args.particles < 1 or args.repeats < 1:
        parser.error("--M must be >= 0, --seconds > 0 and --particles, --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    start = time.perf_counter()
    before = measure_matmul(args.matmul_sizes, args.matmul_repeats)
    print("matmul GFLOP/s: " + ", ".join(f"n={n}: {r / 1e9:,.0f}" for n, r in before.items()), flush=True)

    cells = [benchmark_cell(size, M, args.seconds, args.particles, args.repeats, args.max_rows)
             for size in args.sizes for M in args.M]
    qualities = []
    for size in args.quality_sizes:
        for M in args.quality_M:
            cell = find(cells, size, M)
            if cell is None:  # the schedule's horizon needs this network's step rate
                cell = benchmark_cell(size, M, min(args.seconds, 10.0), args.particles, args.repeats, args.max_rows)
                cells.append(cell)
            horizon = int(cell.steps_per_s * args.quality_seconds) if args.quality_schedule == "cosine" else 0
            qualities.append(time_to_quality(size, M, args.quality_seconds, args.quality_every,
                                             args.quality_particles, horizon, args.quality_learning_rate,
                                             args.max_rows))
    profile_lines = []
    for M in args.profile_M:
        # Long traces: fewer timing rounds (a round runs two 25-step chunks, about a minute at M = 200).
        lines = profile_step(M, repeats=7 if M <= 50 else 3, peak=max(before.values()), max_rows=args.max_rows)
        print("\n".join(lines), flush=True)
        profile_lines += [*lines, ""]
    after = measure_matmul(args.matmul_sizes, args.matmul_repeats)
    peer, peer_reason = run_peer(args)
    args.peak = max([*before.values(), *after.values()])
    body = environment_lines("throughput.py", argv) + report(args, cells, (before, after), qualities, peer,
                                                             peer_reason, profile_lines)
    print(f"\n(total {time.perf_counter() - start:.1f} s)\n")
    heading = HEADING if args.section is None else f"{HEADING}: {args.section}"
    publish(args.output, heading, body, write=not args.no_write)


if __name__ == "__main__":
    main()
