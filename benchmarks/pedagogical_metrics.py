"""Helpers for benchmarks and notebooks that compare proposal networks under equal budgets.

Used by ``benchmarks/attention_vs_lstm.py`` and ``notebooks/04_attention_vs_lstm.ipynb``
(the pedagogical experiment of *Attention for Inference Compilation*, Harvey et al. 2019).
Public jaxic functions only:

* :func:`train_for`: train a :class:`jaxic.CompiledModel` for a wall-clock budget or a number of
  steps, with the compilation of the training step timed separately;
* :func:`heldout_log_q` / :func:`heldout_loss`: per-token ``log q`` on the compiled model's
  held-out joint samples, and the forward-KL loss restricted to chosen sites;
* :func:`importance_metrics`: ESS/N of importance sampling at fixed observations, over seeds;
* :func:`circle_mass` and :func:`prior_ess_fraction`: checks specific to ``jaxic.models.pedagogical``,
  whose posterior is the ring ``x**2 + y**2 = obs``;
* :func:`plot_sweep`: the three panels of the attention-vs-LSTM figure (needs matplotlib).

Example:
    >>> from benchmarks.pedagogical_metrics import circle_mass, heldout_loss, importance_metrics, train_for
    >>> compiled = jaxic.compile(pedagogical, ["obs"], jax.random.key(0), num_steps=0, model_kwargs={"M": 20},
    ...                          network="lstm", progress=False)
    >>> report = train_for(compiled, seconds=60)          # 60 s of training after a timed warm-up
    >>> heldout_loss(compiled, sites=["x", "y"])          # mean -log q(x, y | obs) on held-out traces
    >>> importance_metrics(compiled, {"obs": 25.0}, 2000, extra=lambda p: circle_mass(p, 25.0))
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

import jaxic.proposal

__all__ = ["train_for", "heldout_log_q", "heldout_loss", "importance_metrics", "circle_mass", "prior_ess_fraction",
           "plot_sweep"]


def train_for(compiled, seconds: float | None = None, steps: int | None = None, *, warmup: bool = True,
              chunk_seconds: float | None = None, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Train ``compiled`` for ``seconds`` of wall-clock time or for ``steps`` optimisation steps.

    Training runs in chunks of ``compiled.train(n, validate=False)`` calls, each followed by one
    :meth:`jaxic.CompiledModel.validation_loss` (the learning curve); ``compiled`` is not
    otherwise changed. With ``warmup`` (default) the first chunk is one compiled call
    (``train_config.steps_per_call`` steps): its time and that of the first held-out evaluation,
    which include tracing and XLA compilation of the training step and of the validation loss,
    are reported as ``compile_s`` and are *not* part of the time budget; its steps count in
    ``steps``. In time mode, chunk sizes then follow the measured step rate: the first timed chunk
    is one ``steps_per_call``, later ones at most double and take about ``chunk_seconds`` (default
    a twentieth of the budget); the last one is sized to end the budget, which is met to within
    half a ``steps_per_call``. Only the ``train`` calls count towards the budget (``train``
    returns once its losses are read, so the clock is honest): held-out evaluations are outside
    it, which matters for long traces, where one evaluation of the 1024 held-out traces costs
    several steps. In step mode ``steps`` is the total, warm-up included, in about 20 chunks.

    For a time budget that does not depend on a planned horizon, compile with ``num_steps=0``:
    the default optimizer then keeps a constant learning rate after its warm-up.

    Returns a dict: ``steps`` (done in this call, warm-up included), ``warmup_steps``,
    ``compile_s`` (wall time of the warm-up chunk and its evaluation), ``train_s`` (training time
    of the rest), ``wall_s`` (their wall time, evaluations included), ``validation_s`` (one
    evaluation), ``traces_per_s`` (``batch_size * (steps - warmup_steps) / train_s``), ``budget``
    (``{"seconds": ...}`` or ``{"steps": ...}``) and ``curve``, a list of ``[seconds, step, held-out
    loss]`` after each chunk (training seconds since the end of the warm-up).

    Example:
        >>> compiled = jaxic.compile(pedagogical, ["obs"], jax.random.key(0), num_steps=0,
        ...                          model_kwargs={"M": 20}, progress=False)
        >>> report = train_for(compiled, seconds=30)
        >>> report["steps"], report["traces_per_s"], report["curve"][-1]
    """
    if (seconds is None) == (steps is None):
        raise ValueError("give exactly one of seconds= and steps=")
    if (seconds is not None and seconds < 0) or (steps is not None and steps < 0):
        raise ValueError("the budget must be >= 0")
    report = {"budget": {"seconds": seconds} if seconds is not None else {"steps": steps}, "steps": 0,
              "warmup_steps": 0, "compile_s": 0.0, "train_s": 0.0, "wall_s": 0.0, "validation_s": 0.0,
              "traces_per_s": float("nan"), "curve": []}
    if steps == 0:
        return report
    per_call = compiled.train_config.steps_per_call
    if warmup:
        n = per_call if steps is None else min(per_call, steps)
        start = clock()
        compiled.train(n, progress=False, validate=False)
        loss = compiled.validation_loss()
        report["compile_s"] = clock() - start
        report["warmup_steps"] = report["steps"] = n
        report["curve"].append([0.0, compiled.step, loss])
    else:
        compiled.validation_loss()  # compiles the evaluation outside the timing below
    start = clock()
    compiled.validation_loss()
    report["validation_s"] = clock() - start
    chunk_steps = max(per_call, math.ceil((steps or 0) / 20 / per_call) * per_call)
    target = chunk_seconds if chunk_seconds is not None else (seconds or 0.0) / 20
    elapsed, wall, rate, last = 0.0, 0.0, None, 0
    while True:
        if steps is not None:
            n = min(chunk_steps, steps - report["steps"])
            if n <= 0:
                break
        else:
            left = seconds - elapsed
            if left <= 0 or (rate is not None and left * rate < per_call / 2):
                break
            if rate is None:
                n = per_call
            else:
                wanted = min(left * rate, max(target * rate, per_call), 2 * last)
                n = max(per_call, int(round(wanted / per_call)) * per_call)
        start = clock()
        compiled.train(n, progress=False, validate=False)
        dt = max(clock() - start, 1e-9)
        loss = compiled.validation_loss()
        wall += clock() - start
        elapsed += dt
        rate, last = n / dt, n
        report["steps"] += n
        report["curve"].append([elapsed, compiled.step, loss])
    report["train_s"], report["wall_s"] = elapsed, wall
    timed = report["steps"] - report["warmup_steps"]
    if elapsed > 0:
        report["traces_per_s"] = compiled.train_config.batch_size * timed / elapsed
    return report


# Jitted once here; the proposal's structure is static, so each network structure compiles once.
_per_token_log_q = jax.jit(lambda proposal, tokens, observations: jax.vmap(proposal.network.log_prob)(
    observations, tokens))
_log_prob_tokens = jax.jit(jaxic.proposal.log_prob_tokens)


def _in_batches(compiled, batch_size: int, score: Callable) -> np.ndarray:
    """``score(proposal, tokens, observations)`` over ``compiled.validation`` in batches of ``batch_size`` traces."""
    tokens, observations = compiled.validation
    total = jax.tree.leaves(tokens)[0].shape[0]
    batch_size = max(1, min(batch_size, total))
    proposal = compiled.proposal
    out = []
    for start in range(0, total, batch_size):
        index = np.arange(start, start + batch_size) % total  # the last batch wraps round: one shape, one compile
        batch_tokens, batch_obs = jax.tree.map(lambda a: a[index], (tokens, observations))
        out.append(np.asarray(score(proposal, batch_tokens, batch_obs))[: min(batch_size, total - start)])
    return np.concatenate(out)


def heldout_log_q(compiled, batch_size: int = 256) -> np.ndarray:
    """Per-token ``log q(x_t | x_<t, obs)`` of the held-out joint samples ``compiled.validation``.

    Shape ``(num_traces, num_tokens)``; zero for tokens that did not run or are not proposed.
    Scored by the network of ``compiled.proposal`` (``proposal.network.log_prob``, one trace at
    a time, vmapped), in batches of ``batch_size`` traces.

    Example:
        >>> log_q = heldout_log_q(compiled)                     # (1024, M + 2) for pedagogical(M)
        >>> -log_q.sum(-1).mean()                               # == compiled.validation_loss()
    """
    return _in_batches(compiled, batch_size, _per_token_log_q)


def heldout_loss(compiled, sites: Sequence[str] | None = None, batch_size: int = 256) -> float:
    """Mean held-out ``-log q`` of the named latent sites (all of them with ``sites=None``).

    The mean runs over ``compiled.validation``'s joint samples; a trace contributes
    ``-sum log q`` over the tokens of ``sites``. With ``sites=None`` this is
    ``-jaxic.proposal.log_prob_tokens(...)`` averaged, the forward-KL training loss on held-out
    data (:meth:`jaxic.CompiledModel.validation_loss`, up to float error).

    Example:
        >>> heldout_loss(compiled, sites=["x", "y"])   # pedagogical: -log q(x, y | obs), nuisance sites left out
        >>> heldout_loss(compiled)                     # the whole trace
    """
    if sites is None:
        return float(-_in_batches(compiled, batch_size, _log_prob_tokens).mean())
    log_q = heldout_log_q(compiled, batch_size)
    tokens, _ = compiled.validation
    addresses = np.asarray([compiled.spec.address_of(name) for name in sites])
    log_q = np.where(np.isin(np.asarray(tokens.address), addresses), log_q, 0.0)
    return float(-log_q.sum(-1).mean())


def importance_metrics(compiled, observations: Mapping[str, Any], num_samples: int,
                       seeds: Sequence[int] = (0, 1, 2), extra: Callable[[Any], Mapping[str, float]] | None = None
                       ) -> dict:
    """ESS/N of importance sampling with ``compiled``'s proposal at one observation set, over seeds.

    One :meth:`jaxic.CompiledModel.posterior` call of ``num_samples`` particles per seed
    (key ``jax.random.key(seed)``). ``extra(posterior) -> {name: float}`` adds figures of
    each posterior; they are averaged over the seeds like ESS/N.

    Returns ``ess_over_n`` (mean), ``ess_over_n_per_seed``, ``log_evidence`` (mean), ``first_call_s``
    (the first call, including compilation of the sampler), ``call_s`` (mean of the other calls; NaN
    with one seed), and the means of the ``extra`` figures (per seed under ``<name>_per_seed``).

    Example:
        >>> importance_metrics(compiled, {"obs": 25.0}, 2000, extra=lambda p: circle_mass(p, 25.0))["ess_over_n"]
    """
    ess, evidence, times, extras = [], [], [], []
    for seed in seeds:
        start = time.perf_counter()
        post = compiled.posterior(jax.random.key(seed), observations, num_samples=num_samples)
        jax.block_until_ready(post.log_weights)
        times.append(time.perf_counter() - start)
        ess.append(float(post.ess) / num_samples)
        evidence.append(float(post.log_evidence))
        if extra is not None:
            extras.append({k: float(v) for k, v in extra(post).items()})
    out = {"ess_over_n": float(np.mean(ess)), "ess_over_n_per_seed": ess, "log_evidence": float(np.mean(evidence)),
           "first_call_s": times[0], "call_s": float(np.mean(times[1:])) if len(times) > 1 else float("nan")}
    for name in (extras[0] if extras else {}):
        values = [e[name] for e in extras]
        out[name] = float(np.mean(values))
        out[f"{name}_per_seed"] = values
    return out


def circle_mass(post, obs: float, tol: float = 0.25, x: str = "x", y: str = "y") -> dict[str, float]:
    """Does the proposal put its mass on the posterior ring ``x**2 + y**2 = obs`` of ``pedagogical``?

    From the *raw* proposal draws (unweighted ``post.samples``, one observation set):

    * ``on_circle``: the fraction with ``|sqrt(x**2 + y**2) - sqrt(obs)| < tol``. With the model's
      observation noise of 0.1 an exact posterior draw is within 0.25 of radius 5 essentially always
      (at ``obs=25``), so this is about 1 for a perfect proposal; a proposal for ``y`` that ignores
      ``x`` (a feed-forward network, or an LSTM that forgot ``x``) lands on it far less often;
    * ``y_positive``: the fraction with ``y > 0``, about 0.5 when ``q(y | x)`` covers both
      solutions ``y = +-sqrt(obs - x**2)``;
    * ``on_circle_weighted``: the importance-weighted ``on_circle`` (about 1 whenever IS works).

    Example:
        >>> post = compiled.posterior(jax.random.key(1), {"obs": 25.0}, num_samples=2000)
        >>> circle_mass(post, 25.0)     # {'on_circle': 0.93, 'y_positive': 0.49, 'on_circle_weighted': 1.0}
    """
    if post.batch_shape:
        raise ValueError("circle_mass takes the posterior of one observation set; index a batched one: post[i]")
    xs, ys = np.asarray(post.samples[x], np.float64), np.asarray(post.samples[y], np.float64)
    on = np.abs(np.hypot(xs, ys) - math.sqrt(obs)) < tol
    weights = np.asarray(post.weights, np.float64)
    return {"on_circle": float(on.mean()), "y_positive": float((ys > 0).mean()),
            "on_circle_weighted": float(np.sum(weights * on))}


def prior_ess_fraction(obs: float, num_samples: int, seeds: Sequence[int] = (0, 1, 2), prior_sd: float = 10.0,
                       noise: float = 0.1) -> float:
    """ESS/N of importance sampling ``pedagogical`` with its prior as the proposal (mean over seeds).

    The nuisance sites cancel in the weights, so this does not depend on M: it is the floor
    a learned proposal must beat.

    Example:
        >>> prior_ess_fraction(25.0, 2000)     # about 0.0015
    """
    values = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        x, y = rng.normal(0.0, prior_sd, (2, num_samples))
        log_w = -0.5 * ((obs - x**2 - y**2) / noise) ** 2
        w = np.exp(log_w - log_w.max())
        values.append(float(w.sum() ** 2 / np.sum(w**2)) / num_samples)
    return float(np.mean(values))


# ----------------------------------------------------------------------------------------------
# The attention-vs-LSTM figure

_STYLES = {"transformer": ("C0", "o"), "lstm": ("C1", "s"), "feedforward": ("C2", "^")}


def plot_sweep(runs: Sequence[Mapping], obs: float = 25.0, axes=None, prior_ess: float | None = None,
               title: str | None = None, tol: float = 0.25):
    """Three panels against the number of nuisance sites M, one line per network.

    ``runs``: records with keys ``M``, ``network``, ``heldout_loss_xy`` and ``posterior[str(obs)]``
    holding ``ess_over_n`` and ``on_circle`` (as ``benchmarks/attention_vs_lstm.py`` writes them).
    Panels: held-out ``-log q(x, y | obs)``; ESS/N at ``obs`` (log scale; ``prior_ess`` as a dashed
    floor); the fraction of raw proposal draws on the ring (``tol`` as given to :func:`circle_mass`).
    Several runs of one network at one M (training seeds) are drawn as dots around their mean.
    Returns the figure.

    Example:
        >>> fig = plot_sweep(json.load(open("benchmarks/results/attention_vs_lstm.json"))["runs"])
    """
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if axes is None:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    else:
        fig = axes[0].figure
    key = str(float(obs))
    panels = (lambda r: r["heldout_loss_xy"],
              lambda r: max(r.get("posterior", {}).get(key, {}).get("ess_over_n", np.nan), 1e-6),
              lambda r: r.get("posterior", {}).get(key, {}).get("on_circle", np.nan))
    networks = list(dict.fromkeys(r["network"] for r in runs))
    for name in networks:
        # Several runs at one M (training seeds): the line goes through their mean, each run is a dot.
        by_M: dict[int, list] = {}
        for r in runs:
            if r["network"] == name:
                by_M.setdefault(r["M"], []).append(r)
        M = sorted(by_M)
        color, marker = _STYLES.get(name, (None, "o"))
        for ax, value in zip(axes, panels):
            ax.plot(M, [np.mean([value(r) for r in by_M[m]]) for m in M], color=color, marker=marker, label=name)
            repeated = [(m, value(r)) for m in M if len(by_M[m]) > 1 for r in by_M[m]]
            if repeated:
                ax.scatter(*zip(*repeated), color=color, s=10, alpha=0.5)
    if prior_ess is not None:
        axes[1].axhline(prior_ess, color="grey", ls="--", lw=1, label="prior as proposal")
    axes[0].set(ylabel=r"held-out $-\log q(x, y \mid obs)$", title="forward-KL loss on x and y")
    axes[1].set(ylabel="ESS / N", yscale="log", title=f"importance sampling at obs = {obs:g}")
    axes[2].set(ylabel="fraction of raw proposal draws", ylim=(-0.02, 1.02),
                title=f"on the ring: |r - {math.sqrt(obs):g}| < {tol:g}")
    Ms = sorted({r["M"] for r in runs})
    for ax in axes:
        ax.set_xscale("symlog", linthresh=10, linscale=0.5)
        ax.set_xticks(Ms, [str(m) for m in Ms])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("M (nuisance sites between x and y)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
