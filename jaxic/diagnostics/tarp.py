"""TARP: expected coverage of random-reference credible regions (Lemos et al. 2023).

For each simulated data set, draw a random reference point ``r`` and find the fraction
``f`` of posterior draws closer to ``r`` than the true parameter is. The ball around ``r``
through the truth is then a credible region of level ``f``; a calibrated posterior puts the
truth inside the level-``a`` region a fraction ``a`` of the time, i.e. ``f ~ Uniform(0, 1)``,
for every ``a`` at once. Unlike per-element SBC this looks at all parameters jointly, and
with random references it is a necessary and sufficient test of calibration. Here, as in
sbi, the references do not depend on the data, so a proposal that ignores the data
(q = prior) still passes: SBC's ``log p(x, y)`` ranks catch that one.

Example:
    >>> result = jaxic.diagnostics.tarp(compiled, jax.random.key(0), num_datasets=300)
    >>> result.atc, result.ks_p_value, result.passed
    >>> result.plot()
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from jaxic.diagnostics.calibration import normalised_ranks, simulate
from jaxic.diagnostics.weights import resample_indices
from jaxic.errors import JaxicError


@dataclasses.dataclass(frozen=True)
class TARPResult:
    """Expected coverage probability (ECP) against credibility level.

    ``coverage[i]`` is the fraction of data sets whose truth lies in the level-``levels[i]``
    region; a calibrated posterior gives the diagonal. ``credibility[j]`` is ``f`` for data
    set ``j``: the rank of the truth's distance to the reference among the draws' distances,
    in (0, 1), jittered like SBC ranks so that it is exactly uniform under calibration.

    Pass/fail statistics: :attr:`atc` (area between the curve and the diagonal over levels
    above 0.5, as sbi's ``check_tarp``: near 0 when calibrated, negative when the posterior
    is too narrow, positive when too wide) and :attr:`ks_p_value` (a one-sample
    Kolmogorov-Smirnov test of ``credibility`` against Uniform(0, 1); sbi instead compares
    the curve's values with the levels as two samples, which is not a calibrated test).

    Example:
        >>> result = tarp(draws, jax.random.key(0), truth=theta)
        >>> result.passed, result.atc, result.diagnose()
    """

    levels: np.ndarray
    coverage: np.ndarray
    credibility: np.ndarray
    num_draws: int
    alpha: float = 0.01
    num_dropped: int = 0  # data sets left out: non-finite truth, draw or reference

    @property
    def num_datasets(self) -> int:
        return int(self.credibility.size)

    @property
    def atc(self) -> float:
        """Area between ECP and the diagonal over levels at or above the middle of the grid."""
        mid = self.levels.size // 2
        step = self.levels[1] - self.levels[0]
        return float(np.sum(self.coverage[mid:] - self.levels[mid:]) * step)

    @property
    def ks_p_value(self) -> float:
        return float(stats.kstest(self.credibility, "uniform").pvalue)

    @property
    def problems(self) -> list[str]:
        """Why the test cannot pass whatever the curve: data sets left out for non-finite values.

        Example:
            >>> result.problems
            ['12 of 200 data sets had a non-finite true value, draw or reference point and were left out']
        """
        if not self.num_dropped:
            return []
        total = self.num_datasets + self.num_dropped
        return [f"{self.num_dropped} of {total} data sets had a non-finite true value, draw or reference point "
                "and were left out"]

    @property
    def passed(self) -> bool:
        """The KS test does not reject uniformity at level ``alpha`` and nothing was dropped."""
        return self.ks_p_value >= self.alpha and not self.problems

    def diagnose(self) -> str:
        """What the curve says, in words.

        Example:
            >>> result.diagnose()
            'the posterior is too narrow (overconfident): regions cover the truth less often than their level'
        """
        if self.passed:
            return "coverage matches credibility: no evidence of miscalibration"
        if self.problems:
            return "; ".join(self.problems)
        # A biased posterior can bend the curve either way (Lemos et al., fig. 2): SBC per site tells which.
        if self.atc < 0:
            return ("the posterior is too narrow (overconfident), or biased: regions cover the truth less often than "
                    "their level")
        return ("the posterior is too wide (underconfident), or biased: regions cover the truth more often than their "
                "level")

    def summary(self) -> str:
        """One line with the verdict and the statistics.

        Example:
            >>> print(result.summary())
        """
        verdict = "PASSED" if self.passed else "FAILED"
        return (f"TARP over {self.num_datasets} data sets, {self.num_draws} draws each: {verdict} "
                f"(ATC {self.atc:+.3f}, KS p {self.ks_p_value:.3g} at level {self.alpha}): {self.diagnose()}")

    def plot(self, level: float = 0.99, ax=None):
        """Expected coverage against credibility level, the diagonal, and the simultaneous
        ``level`` band of a calibrated posterior's curve (:func:`ecdf_band`). Returns the figure.

        Example:
            >>> result.plot().savefig("tarp.png")
        """
        from jaxic.diagnostics.calibration import ecdf_band
        from jaxic.plots import pyplot

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(3.8, 3.6)) if ax is None else (ax.figure, ax)
        z, lo, hi = ecdf_band(self.num_datasets, level)
        ax.fill_between(z, lo, hi, color="0.85", label=f"{level:.0%} band (simultaneous)")
        ax.plot([0, 1], [0, 1], color="0.5", lw=0.8, ls="--")
        ax.plot(self.levels, self.coverage, color="tab:blue" if self.passed else "tab:red", label="TARP")
        ax.set_xlabel("credibility level")
        ax.set_ylabel("expected coverage")
        ax.set_title(f"ATC {self.atc:+.3f}, KS p {self.ks_p_value:.2g}", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        return fig


def _flatten(value, name: str, lead: int, order: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """``(*lead axes, D)`` float array from an array or a dict of sites (concatenated in ``order``)."""
    if isinstance(value, Mapping):
        keys = list(value) if order is None else list(order)
        if set(keys) != set(value):
            raise JaxicError(f"{name} has sites {sorted(value)} but the draws have {sorted(keys)}; give the same sites.")
        parts = [np.asarray(value[k], np.float64) for k in keys]
        for k, p in zip(keys, parts):
            if p.ndim < lead:
                raise JaxicError(f"{name}['{k}'] has shape {p.shape}; it needs {lead} leading axes.")
        return np.concatenate([p.reshape(p.shape[:lead] + (-1,)) for p in parts], axis=-1), keys
    x = np.asarray(value, np.float64)
    if x.ndim < lead:
        raise JaxicError(f"{name} has shape {x.shape}; it needs {lead} leading axes.")
    return x.reshape(x.shape[:lead] + (-1,)), []


def _from_compiled(compiled, key, num_datasets, num_samples, sites, weighted):
    """Truth ``(n, D)`` and proposal draws ``(n, L, D)`` for ``num_datasets`` simulated data sets."""
    names = [s.name for s in compiled.spec.latents]
    sites = names if sites is None else list(sites)
    unknown = [s for s in sites if s not in names]
    if unknown:
        raise JaxicError(f"{unknown} are not latent sites of this proposal; its latent sites are {names}.")
    sim_key, post_key, resample_key = jax.random.split(key, 3)
    if weighted:
        compiled.spec.check_likelihood("TARP with weighted=True")
    truth, ran, observations, _ = simulate(compiled, sim_key, num_datasets)
    post = (compiled.posterior if weighted else compiled.proposal_draws)(post_key, observations, num_samples)
    samples = {name: np.asarray(post.samples[name]) for name in sites}
    for name in sites:
        skipped = int(np.sum(~np.all(ran[name].reshape(num_datasets, -1), axis=1)))
        executed = post.executed.get(name) if post.executed is not None else None
        if skipped or (executed is not None and not np.all(executed)):
            raise JaxicError(f"TARP compares parameter vectors of one fixed length, but site '{name}' does not run "
                             f"in every trace (stochastic control flow; {skipped} of {num_datasets} simulated data "
                             "sets lack it); pass sites= without it.")
    if weighted:
        index = resample_indices(resample_key, np.asarray(post.log_weights), num_samples)
        samples = {k: np.take_along_axis(v, index.reshape(index.shape + (1,) * (v.ndim - 2)), axis=1)
                   for k, v in samples.items()}
    draws, _ = _flatten(samples, "draws", 2, order=sites)
    theta, _ = _flatten({k: truth[k] for k in sites}, "truth", 1, order=sites)
    return theta, draws, sites


def tarp(compiled_or_draws, key: jax.Array, num_datasets: int = 200, *, truth=None, num_samples: int = 100,
         sites: Sequence[str] | None = None, weighted: bool = False, references: Any = None,
         num_bins: int | None = None, distance: str = "l2", normalize: bool = True,
         alpha: float = 0.01) -> TARPResult:
    """TARP expected coverage of a compiled proposal, or of given posterior draws.

    With a compiled model, simulates ``num_datasets`` joint draws and infers them in one
    batched call with ``num_samples`` proposal draws each (``weighted=True``: importance-
    resampled draws), as :func:`sbc` does. Otherwise ``compiled_or_draws`` holds draws of
    shape ``(num_datasets, num_samples, *shape)`` (an array, or a dict of sites) and ``truth``
    the true values ``(num_datasets, *shape)`` in the same form; sites are flattened and
    concatenated into one parameter vector.

    Each data set gets a reference point drawn with ``key`` uniformly in the box spanned by
    the true values (or ``references``, shape ``(num_datasets, D)`` in the flattened layout,
    or a dict of sites). With ``normalize`` every coordinate is first rescaled by the
    truths' range, as sbi does, so that no parameter dominates the ``distance`` (``"l2"``
    or ``"l1"``). Coverage is evaluated at ``num_bins + 1`` levels from 0 to 1 (default
    ``num_bins = max(num_datasets // 10, 4)``). Data sets with a non-finite truth, draw or
    reference are left out and make the result fail (``problems``).

    Example:
        >>> result = jaxic.diagnostics.tarp(compiled, jax.random.key(0), num_datasets=300)
        >>> result = jaxic.diagnostics.tarp(draws, jax.random.key(0), truth=theta)   # (n, L, D), (n, D)
        >>> print(result.summary()); result.plot()
    """
    if not isinstance(key, jax.Array):
        raise JaxicError("tarp needs a PRNG key (jax.random.key(0)) for its reference points and rank jitter.")
    if distance not in ("l2", "l1"):
        raise JaxicError(f"distance must be 'l2' or 'l1', got {distance!r}.")
    if not 0.0 < alpha < 1.0:
        raise JaxicError(f"alpha must lie strictly between 0 and 1, got {alpha!r}.")
    is_compiled = hasattr(compiled_or_draws, "spec") and hasattr(compiled_or_draws, "posterior")
    ref_key, sim_key, jitter_key = jax.random.split(key, 3)
    if is_compiled:
        if truth is not None:
            raise JaxicError("truth is given with the draws; with a compiled model, tarp simulates the truths itself.")
        if num_datasets < 5 or num_samples < 1:
            raise JaxicError(f"TARP needs num_datasets >= 5 and num_samples >= 1, got {num_datasets}, {num_samples}.")
        theta, draws, order = _from_compiled(compiled_or_draws, sim_key, int(num_datasets), int(num_samples), sites,
                                             weighted)
    else:
        if truth is None:
            raise JaxicError("tarp of posterior draws needs truth=: the true values, one per data set.")
        if sites is not None or weighted:
            raise JaxicError("sites= and weighted= apply to a compiled model; select sites in the draws instead.")
        if isinstance(truth, Mapping) != isinstance(compiled_or_draws, Mapping):
            raise JaxicError("give draws and truth in the same form: both arrays or both dicts of sites.")
        draws, order = _flatten(compiled_or_draws, "draws", 2)
        theta, _ = _flatten(truth, "truth", 1, order=order or None)
        if draws.shape[0] != theta.shape[0] or draws.shape[2] != theta.shape[1]:
            raise JaxicError(f"draws {draws.shape[:2]} + ({draws.shape[2]} elements) and truth ({theta.shape[0]} "
                             f"data sets, {theta.shape[1]} elements) disagree: draws need shape (num_datasets, "
                             "num_samples, *shape) and truth (num_datasets, *shape).")
    n, num_draws, dim = draws.shape
    if references is None:
        finite = np.all(np.isfinite(theta), axis=1)
        if not finite.any():
            raise JaxicError("no data set has a finite true value: cannot place reference points.")
        lo, hi = theta[finite].min(axis=0), theta[finite].max(axis=0)
        refs = np.asarray(jax.random.uniform(ref_key, (n, dim), jnp.float32), np.float64) * (hi - lo) + lo
    else:
        if isinstance(references, Mapping) and not order:
            raise JaxicError("references is a dict of sites but the draws are one array; give references as an "
                             f"array of shape {theta.shape}.")
        refs, _ = _flatten(references, "references", 1, order=order if isinstance(references, Mapping) else None)
        if refs.shape != theta.shape:
            raise JaxicError(f"references have shape {refs.shape}; they need one point per data set in the "
                             f"flattened layout, shape {theta.shape}.")
    ok = np.all(np.isfinite(theta), axis=1) & np.all(np.isfinite(draws), axis=(1, 2)) & np.all(np.isfinite(refs), 1)
    if ok.sum() < 2:
        raise JaxicError(f"only {int(ok.sum())} of {n} data sets have finite true values, draws and references; "
                         "TARP needs at least 2.")
    theta, draws, refs = theta[ok], draws[ok], refs[ok]
    if normalize:
        lo, hi = theta.min(axis=0), theta.max(axis=0)
        scale = np.where(hi > lo, hi - lo, 1.0)  # a constant coordinate is left unscaled
        theta, draws, refs = (theta - lo) / scale, (draws - lo) / scale, (refs - lo) / scale
    order_ = 2 if distance == "l2" else 1
    draw_dist = np.linalg.norm(draws - refs[:, None], ord=order_, axis=-1)
    true_dist = np.linalg.norm(theta - refs, ord=order_, axis=-1)
    rng = np.random.default_rng(np.asarray(jax.random.bits(jitter_key, (4,), jnp.uint32)))
    f = normalised_ranks(true_dist[:, None], draw_dist[..., None], np.ones(draw_dist.shape + (1,), bool), rng)[:, 0]
    num_bins = max(f.size // 10, 4) if num_bins is None else int(num_bins)
    if num_bins < 1:
        raise JaxicError(f"num_bins must be positive, got {num_bins}.")
    levels = np.linspace(0.0, 1.0, num_bins + 1)
    coverage = np.mean(f[:, None] < levels[None], axis=0)
    return TARPResult(levels=levels, coverage=coverage, credibility=f, num_draws=int(num_draws),
                      alpha=float(alpha), num_dropped=int(n - ok.sum()))
