"""Simulation-based calibration (SBC) and expected coverage of a compiled proposal.

SBC (Talts et al. 2018): draw ``(x*, y)`` from the joint, infer ``x`` from ``y``, and
find the rank of each true value ``x*`` among the posterior draws. If the draws come
from the exact posterior, the ranks are uniform; the shape of their histogram says how
the proposal is wrong. Ranks are also taken of the joint log density ``log p(x, y)``
(Modrák et al. 2023): parameter ranks alone cannot tell a proposal that ignores the
data (q = prior) from a perfect one, the log density's ranks can.

Example:
    >>> result = sbc(compiled, jax.random.key(0), num_datasets=200)
    >>> result.passed, result.failing_sites
    >>> print(result.summary()); result.plot()
    >>> coverage(result).coverage["mu"]        # at levels (0.5, 0.8, 0.95)
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from jaxic.diagnostics.weights import resample_indices
from jaxic.errors import JaxicError, MissingDependencyError
from jaxic.inference.importance import log_joint
from jaxic.tracing.params import ParameterisedModel
from jaxic.tracing.spec import run_model, site_mask
from jaxic.tracing.universal import run_bounded

LOG_JOINT = "log p(x, y)"
"""Key of the joint-log-density test quantity in :attr:`SBCResult.ranks`."""

_simulators: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


# --- simulation ---------------------------------------------------------------------------------

def simulate(compiled, key: jax.Array, num_datasets: int) -> tuple[dict, dict, dict, np.ndarray]:
    """Joint draws from the compiled model: true latents, which of their elements ran,
    observations and ``log p(x, y)``, each with a leading ``num_datasets`` axis (NumPy).

    Example:
        >>> truth, executed, observations, log_p = simulate(compiled, jax.random.key(0), 200)
        >>> post = compiled.posterior(key, observations, num_samples=100)   # one call for all
    """
    if compiled.spec.dynamic:
        return _simulate_eager(compiled, key, num_datasets)
    if compiled not in _simulators:
        # Not the compiled model itself: the cache is keyed weakly by it.
        spec, bound, constraints = compiled.spec, compiled.proposal.model, compiled.param_constraints
        # With local amortization a dataset is one element of the plate: drop its (length-one) axis.
        squeeze = (lambda x: x[0]) if compiled.plate is not None else (lambda x: x)

        def one(model_params, k):
            trace = run_model(ParameterisedModel(bound, model_params, constraints), k)
            truth = {s.name: squeeze(trace[s.name]["value"]) for s in spec.latents}
            ran = {s.name: squeeze(site_mask(trace[s.name]["fn"], s.batch_shape)) for s in spec.latents}
            obs = {o.name: squeeze(jnp.asarray(trace[o.name]["value"], jnp.float32)) for o in spec.observed}
            return truth, ran, obs, log_joint(trace)

        # The number of datasets is static: jit caches one compilation per budget. The model's
        # learnable parameters are an argument, so training more does not recompile.
        _simulators[compiled] = jax.jit(
            lambda m, k, n: jax.vmap(functools.partial(one, m))(jax.random.split(k, n)), static_argnums=2)
    out = _simulators[compiled](compiled.state.model_params, key, int(num_datasets))
    return jax.tree.map(np.asarray, out)


def _batch_ndim(compiled, name: str) -> int:
    """Plate dimensions of a site as users see it (a local plate's element axis is dropped)."""
    return len(compiled.spec.latent(name).batch_shape) - (compiled.plate is not None)


def _simulate_eager(compiled, key, num_datasets):
    """Universal path: the model is Python, so one eager run per dataset; runs that do not
    fit the spec (unknown address, too long) are redrawn, as in training."""
    spec = compiled.spec
    shapes = {s.name: s.batch_shape + s.event_shape for s in spec.latents}
    truth = {n: [] for n in shapes}
    ran = {n: [] for n in shapes}
    obs = {o.name: [] for o in spec.observed}
    log_p = []
    observed = {o.name for o in spec.observed}
    for k in jax.random.split(key, 4 * num_datasets):
        trace = run_bounded(compiled.bound_model, k, spec.site_limit, spec.timeout,
                            "simulating data sets for diagnostics")
        latent = [n for n, m in trace.items() if m["type"] == "sample" and n not in observed and not m["is_observed"]]
        if any(n not in shapes for n in latent) or sum(spec.latent(n).num_tokens for n in latent) > spec.num_tokens:
            continue
        for s in spec.latents:
            if s.name in trace:
                truth[s.name].append(np.asarray(trace[s.name]["value"]))
                ran[s.name].append(np.asarray(site_mask(trace[s.name]["fn"], s.batch_shape)))
            else:
                truth[s.name].append(np.zeros(shapes[s.name], np.float32))
                ran[s.name].append(np.zeros(s.batch_shape, bool))
        for name in obs:
            obs[name].append(np.asarray(trace[name]["value"], np.float32))
        log_p.append(float(log_joint(trace)))
        if len(log_p) == num_datasets:
            break
    if len(log_p) < num_datasets:
        raise JaxicError(f"only {len(log_p)} of {4 * num_datasets} model runs fit the proposal's trace spec; "
                         "compile with a larger max_tokens.")
    stack = lambda d: {k: np.stack(v) for k, v in d.items()}
    return stack(truth), stack(ran), stack(obs), np.asarray(log_p)


# --- ranks ------------------------------------------------------------------------------------

def normalised_ranks(truth, draws, valid, rng) -> np.ndarray:
    """Rank of ``truth`` (n, E) among ``draws`` (n, L, E) where ``valid``, as a number in (0, 1).

    With ``k`` draws below the truth out of ``L`` (ties broken at random), ``(k + U) / (L + 1)``
    with ``U ~ Uniform(0, 1)`` is exactly Uniform(0, 1) under calibration, whatever ``L``
    is, so datasets with different numbers of usable draws pool and KS tests apply.

    Example:
        >>> u = normalised_ranks(truth, draws, np.ones(draws.shape, bool), np.random.default_rng(0))
    """
    with np.errstate(invalid="ignore"):
        valid = valid & ~np.isnan(draws)
        less = np.sum((draws < truth[:, None]) & valid, axis=1)
        equal = np.sum((draws == truth[:, None]) & valid, axis=1)
    count = np.sum(valid, axis=1)
    return (less + rng.uniform(size=less.shape) * (equal + 1)) / (count + 1)


def _uniformity(u: np.ndarray, num_bins: int) -> tuple[float, float]:
    """p-values of a chi-square test on ``num_bins`` equal bins and of a KS test (NaN: too few ranks)."""
    u = u[np.isfinite(u)]
    if u.size < 5:
        return np.nan, np.nan
    p_ks = stats.kstest(u, "uniform").pvalue
    if u.size < 5 * num_bins:  # chi-square needs ~5 expected per bin
        return np.nan, float(p_ks)
    counts = np.histogram(u, bins=num_bins, range=(0.0, 1.0))[0]
    return float(stats.chisquare(counts).pvalue), float(p_ks)


def _shape(u: np.ndarray, quantity: str) -> str:
    """Name the departure from uniformity whose z-score is largest: bias or dispersion."""
    u = u[np.isfinite(u)]
    n = u.size
    if n < 5:
        return "too few simulated runs to tell"
    z_bias = (u.mean() - 0.5) / np.sqrt(1.0 / (12.0 * n))
    z_tails = (np.mean((u < 0.25) | (u > 0.75)) - 0.5) / np.sqrt(0.25 / n)
    if quantity == LOG_JOINT:
        if z_bias > 0:
            return ("proposal draws have lower joint density than the truth: q is too wide or ignores the data "
                    "(ranks pile up high)")
        return "proposal draws have higher joint density than the truth: q is too narrow (ranks pile up low)"
    if abs(z_bias) >= abs(z_tails):
        if z_bias > 0:
            return "q is biased low: true values mostly lie above the draws (ranks skewed high)"
        return "q is biased high: true values mostly lie below the draws (ranks skewed low)"
    if z_tails > 0:
        return "q is too narrow (overconfident): true values often fall outside the draws (∪-shaped ranks)"
    return "q is too wide (overdispersed): true values sit too centrally among the draws (∩-shaped ranks)"


@dataclasses.dataclass(frozen=True)
class SBCResult:
    """Normalised SBC ranks and uniformity tests, per site and element.

    ``ranks[site]`` has shape ``(num_datasets, *site_shape)`` with values in (0, 1) (NaN
    where the site did not run in that simulated trace, or where its rank is unusable);
    ``ranks[LOG_JOINT]`` holds the ranks of ``log p(x, y)``. Each element is tested for
    uniformity by a chi-square test on ``num_bins`` bins and a Kolmogorov-Smirnov test;
    ``p_values`` combines the two (Bonferroni, ``2 min(p_chi2, p_ks)``). ``passed`` holds at
    family-wise level ``alpha`` with a Bonferroni correction over every tested element of
    every site, and only when nothing was non-finite: ``invalid[site]`` marks the data sets
    and elements where the site ran but the proposal's draws were NaN or infinite (their
    ranks are left out of the tests, and :attr:`problems` says how many there were).

    Example:
        >>> result = sbc(compiled, key)
        >>> result.passed, result.p_values["mu"], result.diagnose("mu")
        >>> fig = result.plot(kind="ecdf")
    """

    ranks: dict[str, np.ndarray]
    chi2_p_values: dict[str, np.ndarray]
    ks_p_values: dict[str, np.ndarray]
    num_draws: int
    num_bins: int
    weighted: bool
    alpha: float
    num_degenerate: int = 0  # weighted only: datasets where no particle had a finite weight
    # Per test quantity, (num_datasets, *shape): True where it ran but its rank is unusable (non-finite draws).
    invalid: dict[str, np.ndarray] | None = None
    num_nan_density: int = 0  # datasets where some particle had a NaN log p(x, y) or log q(x | y)

    @classmethod
    def from_ranks(cls, ranks: dict[str, np.ndarray], num_draws: int, *, weighted: bool = False,
                   alpha: float = 0.01, num_bins: int | None = None, num_degenerate: int = 0,
                   executed: dict[str, np.ndarray] | None = None, invalid: dict[str, np.ndarray] | None = None,
                   num_nan_density: int = 0) -> "SBCResult":
        """Test normalised ranks (``(num_datasets, *shape)`` arrays in (0, 1)) computed
        elsewhere, e.g. by your own simulations.

        A NaN (or infinite) rank is a failure (the proposal gave no usable draw there) unless
        ``executed[site]`` (a boolean array of the ranks' shape) is False there: the site did
        not run in that data set, and its rank is missing. ``invalid[site]`` marks further
        ranks as unusable (e.g. computed among draws some of which were NaN).

        Example:
            >>> result = SBCResult.from_ranks({"theta": u}, num_draws=100)
            >>> SBCResult.from_ranks({"k": u}, 100, executed={"k": ran})     # NaN where not ran: missing
        """
        ranks = {k: np.asarray(v, np.float64) for k, v in ranks.items()}
        num_datasets = next(iter(ranks.values())).shape[0]
        num_bins = int(np.clip(num_datasets // 10, 4, 20)) if num_bins is None else int(num_bins)
        executed, invalid = executed or {}, invalid or {}
        unknown = (set(executed) | set(invalid)) - set(ranks)
        if unknown:
            raise JaxicError(f"executed/invalid name {sorted(unknown)}, which have no ranks; ranks are given for "
                             f"{sorted(ranks)}.")
        chi2, ks, bad = {}, {}, {}
        for name, r in ranks.items():
            ran = np.broadcast_to(np.asarray(executed.get(name, True), bool), r.shape)
            bad[name] = ran & (~np.isfinite(r) | np.broadcast_to(np.asarray(invalid.get(name, False), bool), r.shape))
            r = ranks[name] = np.where(bad[name], np.nan, r)  # left out of the tests, counted in ``problems``
            flat = r.reshape(num_datasets, -1)
            tests = np.array([_uniformity(flat[:, e], num_bins) for e in range(flat.shape[1])]).reshape(-1, 2)
            chi2[name] = tests[:, 0].reshape(r.shape[1:])
            ks[name] = tests[:, 1].reshape(r.shape[1:])
        return cls(ranks=ranks, chi2_p_values=chi2, ks_p_values=ks, num_draws=int(num_draws), num_bins=num_bins,
                   weighted=bool(weighted), alpha=float(alpha), num_degenerate=int(num_degenerate), invalid=bad,
                   num_nan_density=int(num_nan_density))

    @property
    def num_datasets(self) -> int:
        return next(iter(self.ranks.values())).shape[0]

    @property
    def p_values(self) -> dict[str, np.ndarray]:
        """Per element: ``min(1, 2 min(p_chi2, p_ks))`` (the KS p alone where chi-square had too few ranks)."""
        out = {}
        for name in self.ranks:
            chi2, ks = self.chi2_p_values[name], self.ks_p_values[name]
            both = np.minimum(1.0, 2.0 * np.fmin(chi2, ks))
            out[name] = np.where(np.isnan(chi2), ks, both)
        return out

    @property
    def num_tests(self) -> int:
        return int(sum(np.sum(np.isfinite(p)) for p in self.p_values.values()))

    @property
    def adjusted_p_values(self) -> dict[str, np.ndarray]:
        """Bonferroni-adjusted per-element p-values (``p * num_tests``, capped at 1)."""
        m = max(self.num_tests, 1)
        return {k: np.minimum(1.0, p * m) for k, p in self.p_values.items()}

    def num_invalid(self, name: str) -> int:
        """Data sets in which the site ran but the proposal's draws (or the rank) were not finite.

        Example:
            >>> result.num_invalid("mu")          # 0 for a healthy proposal
        """
        if self.invalid is None or name not in self.invalid:
            return 0
        return int(np.any(self.invalid[name].reshape(self.num_datasets, -1), axis=1).sum())

    def site_passed(self, name: str) -> bool:
        p = self.adjusted_p_values[name]
        return bool(np.all(np.isnan(p) | (p >= self.alpha))) and self.num_invalid(name) == 0

    @property
    def failing_sites(self) -> list[str]:
        return [name for name in self.ranks if not self.site_passed(name)]

    @property
    def problems(self) -> list[str]:
        """Why SBC fails whatever the rank histograms look like: non-finite draws, ranks or
        densities, datasets without a finite weight, nothing left to test.

        Example:
            >>> result.problems
            ["37 of 200 data sets gave non-finite proposal draws for site 'x'"]
        """
        n, out = self.num_datasets, []
        for name in self.ranks:
            k = self.num_invalid(name)
            if k and name == LOG_JOINT:
                out.append(f"{k} of {n} data sets gave a NaN log p(x, y) for their truth or proposal draws")
            elif k:
                out.append(f"{k} of {n} data sets gave non-finite proposal draws for site '{name}'")
        if self.num_nan_density:
            out.append(f"{self.num_nan_density} of {n} data sets had particles with a NaN log q(x | y) or "
                       "log p(x, y)")
        if self.num_degenerate:
            out.append(f"{self.num_degenerate} of {n} data sets had no particle with a finite weight")
        if self.num_tests == 0:
            out.append("no rank could be tested: no element had finite ranks in at least 5 data sets")
        return out

    @property
    def passed(self) -> bool:
        """True when no element's ranks depart from uniform at family-wise level ``alpha`` and
        nothing was non-finite (see :attr:`problems`)."""
        return not self.failing_sites and not self.problems

    def diagnose(self, name: str) -> str:
        """How the ranks of a site's least uniform element depart from uniform (or that its
        proposal draws were not finite).

        Example:
            >>> result.diagnose("mu")
            'q is too narrow (overconfident): true values often fall outside the draws (∪-shaped ranks)'
        """
        k = self.num_invalid(name)
        if k:
            what = "a NaN log p(x, y)" if name == LOG_JOINT else "non-finite proposal draws"
            return (f"{k} of {self.num_datasets} data sets gave {what}: the proposal (or the model) computes NaN/inf "
                    "there; check the training loss, the network's parameters and the observations")
        p = self.p_values[name].reshape(-1)
        u = self.ranks[name].reshape(self.num_datasets, -1)
        worst = int(np.nanargmin(p)) if np.isfinite(p).any() else 0
        return _shape(u[:, worst], name)

    def summary(self) -> str:
        """A short table: per site the smallest adjusted p-value and the verdict.

        Example:
            >>> print(sbc(compiled, key).summary())
        """
        kind = "importance-resampled draws" if self.weighted else "raw proposal draws"
        lines = [f"SBC over {self.num_datasets} simulated datasets, ranks among {self.num_draws} {kind}: "
                 f"{'PASSED' if self.passed else 'FAILED'} (family-wise level {self.alpha}, "
                 f"Bonferroni over {self.num_tests} tests)"]
        lines += [f"  FAILED: {problem}" for problem in self.problems]
        for name, p in self.adjusted_p_values.items():
            shown = f"{np.nanmin(p):.3g}" if np.isfinite(p).any() else "n/a"
            verdict = "ok" if self.site_passed(name) else "FAIL: " + self.diagnose(name)
            lines.append(f"  {name:>16}  min adj. p {shown:>9}  {verdict}")
        return "\n".join(lines)

    def to_arviz(self, *, dims: dict[str, Sequence[str]] | None = None, coords: dict | None = None):
        """The ranks as an ArviZ ``DataTree`` with a ``prior_sbc`` group, as arviz-plots'
        ``plot_ecdf_pit`` reads it (see :func:`jaxic.export.sbc_to_arviz`).

        Example:
            >>> tree = result.to_arviz()
            >>> arviz_plots.plot_ecdf_pit(tree)          # arviz-plots' own PIT-ECDF plot
        """
        from jaxic.export import sbc_to_arviz  # export imports this package: import when called

        return sbc_to_arviz(self, dims=dims, coords=coords)

    def plot(self, sites: Sequence[str] | None = None, kind: str = "hist", max_elements: int = 4,
             level: float = 0.99):
        """Rank histograms with the pointwise binomial band of each bin (``kind="hist"``), or
        the ECDF of the ranks minus the uniform CDF with a SIMULTANEOUS band
        (``kind="ecdf"``, :func:`ecdf_band`: a calibrated proposal's whole curve stays inside
        with probability ``level``). Returns the figure.

        Example:
            >>> result.plot(["mu", LOG_JOINT], kind="ecdf").savefig("sbc.png")
        """
        from jaxic.plots import pyplot

        plt = pyplot()
        if kind not in ("hist", "ecdf"):
            raise JaxicError(f"kind must be 'hist' or 'ecdf', got {kind!r}.")
        if not 0.0 < level < 1.0:
            raise JaxicError(f"level must lie strictly between 0 and 1, got {level!r}.")
        panels = []
        for name in (list(self.ranks) if sites is None else list(sites)):
            if name not in self.ranks:
                raise JaxicError(f"no SBC ranks for '{name}'; available: {sorted(self.ranks)}.")
            u = self.ranks[name].reshape(self.num_datasets, -1)
            for e in range(min(u.shape[1], max_elements)):
                panels.append((name if u.shape[1] == 1 else f"{name}[{e}]", u[:, e], self.site_passed(name)))
        cols = min(len(panels), 3)
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
        for ax, (label, u, ok) in zip(axes.flat, panels):
            u = u[np.isfinite(u)]
            n = u.size
            colour = "tab:blue" if ok else "tab:red"
            if kind == "hist":
                lo, hi = stats.binom.ppf([(1 - level) / 2, (1 + level) / 2], n, 1.0 / self.num_bins)
                ax.axhspan(lo, hi, color="0.85", zorder=0, label=f"{level:.0%} band (per bin)")
                ax.axhline(n / self.num_bins, color="0.5", lw=0.8)
                ax.hist(u, bins=self.num_bins, range=(0, 1), color=colour, alpha=0.8)
                ax.set_ylabel("count")
            elif n >= 2:
                z, lo, hi = ecdf_band(n, level)
                ecdf = np.searchsorted(np.sort(u), z, side="right") / n
                ax.fill_between(z, lo - z, hi - z, color="0.85", label=f"{level:.0%} band (simultaneous)")
                ax.axhline(0.0, color="0.5", lw=0.8)
                ax.step(z, ecdf - z, where="post", color=colour)
                ax.set_ylabel("ECDF − uniform")
            else:
                ax.text(0.5, 0.5, f"{n} finite rank(s): no ECDF", ha="center", va="center", transform=ax.transAxes)
            ax.set_xlabel("normalised rank")
            ax.set_title(label + ("" if ok else " (fails)"), fontsize=10)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        fig.tight_layout()
        return fig


@functools.lru_cache(maxsize=64)
def _ecdf_band(num_ranks: int, level: float, num_simulations: int, seed: int):
    try:
        from arviz_stats.ecdf_utils import ecdf_pit
    except ImportError:
        raise MissingDependencyError('simultaneous ECDF bands need arviz-stats: pip install "jaxic[arviz]"') from None
    # The band depends on the number of ranks only; arviz-plots passes the same placeholder values.
    z, _, lower, upper = ecdf_pit(np.linspace(0.0, 1.0, num_ranks), level, num_simulations,
                                  rng=np.random.default_rng(seed))
    out = tuple(np.asarray(a, np.float64) for a in (z, lower, upper))
    for a in out:
        a.flags.writeable = False  # cached: callers share these arrays
    return out


def ecdf_band(num_ranks: int, level: float = 0.99, *, num_simulations: int = 1000,
              seed: int = 214) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Simultaneous ``level`` band for the ECDF of ``num_ranks`` Uniform(0, 1) ranks.

    Returns ``(points, lower, upper)``: at ``points = (1, ..., n - 1) / n`` the ECDF of
    calibrated ranks lies in ``[lower, upper]`` at EVERY point at once with probability
    about ``level`` (Säilynoja, Bürkner and Vehtari 2022, simulation method with
    ``num_simulations`` draws, computed by arviz-stats' ``ecdf_pit``). The defaults give the
    band arviz-plots' ``plot_ecdf_pit`` draws. A pointwise band of the same level is far
    narrower and is left by a calibrated proposal's curve most of the time.

    Example:
        >>> z, lo, hi = ecdf_band(200, 0.99)
        >>> inside = np.all((lo <= ecdf) & (ecdf <= hi))   # ecdf of 200 ranks at z
    """
    if int(num_ranks) != num_ranks or num_ranks < 2:
        raise JaxicError(f"num_ranks must be an integer >= 2 (the number of ranks in the ECDF), got {num_ranks!r}.")
    if not 0.0 < level < 1.0:
        raise JaxicError(f"level must lie strictly between 0 and 1, got {level!r}.")
    if int(num_simulations) != num_simulations or num_simulations < 1:
        raise JaxicError(f"num_simulations must be a positive integer, got {num_simulations!r}.")
    return _ecdf_band(int(num_ranks), float(level), int(num_simulations), int(seed))


def sbc(compiled, key: jax.Array, num_datasets: int = 200, num_samples: int = 100,
        sites: Sequence[str] | None = None, weighted: bool = False, alpha: float = 0.01,
        num_bins: int | None = None, log_density: bool = True) -> SBCResult:
    """Simulation-based calibration of a compiled proposal.

    Simulates ``num_datasets`` joint draws, infers all of them in ONE batched call
    (:meth:`~jaxic.CompiledModel.proposal_draws`, or :meth:`~jaxic.CompiledModel.posterior` when
    ``weighted``) with ``num_samples`` particles each, and
    ranks every true latent element among the draws (ties, as for discrete sites, broken
    at random; elements that did not run in the simulated trace are left out, and draws
    count only where the element ran).

    Args:
        weighted: ``False`` ranks among the raw proposal draws, testing q itself (what to
            check before trusting it); ``True`` ranks among importance-resampled draws,
            testing the importance-sampling posterior.
        alpha: family-wise level of :attr:`SBCResult.passed` (Bonferroni over all elements).
        num_bins: bins of the chi-square test and histograms (default ``num_datasets // 10``,
            between 4 and 20).
        log_density: also rank ``log p(x, y)`` (key :data:`LOG_JOINT`), which catches a
            proposal that ignores the data (skipped for a model whose observation has no likelihood).

    Example:
        >>> result = jaxic.diagnostics.sbc(compiled, jax.random.key(0), num_datasets=200)
        >>> print(result.summary())
    """
    names = [s.name for s in compiled.spec.latents]
    sites = names if sites is None else list(sites)
    unknown = [s for s in sites if s not in names]
    if unknown:
        raise JaxicError(f"{unknown} are not latent sites of this proposal; its latent sites are {names}.")
    if num_datasets < 5 or num_samples < 1:
        raise JaxicError(f"SBC needs num_datasets >= 5 and num_samples >= 1, got {num_datasets}, {num_samples}.")
    sim_key, post_key, resample_key, jitter_key = jax.random.split(key, 4)
    if weighted:
        compiled.spec.check_likelihood("SBC with weighted=True")
    # A model without a likelihood has no log p(x, y) of its draws to rank.
    log_density = log_density and not compiled.spec.likelihood_free
    truth, ran, observations, true_log_p = simulate(compiled, sim_key, num_datasets)
    post = (compiled.posterior if weighted else compiled.proposal_draws)(post_key, observations, num_samples)
    samples = {name: np.asarray(post.samples[name]) for name in sites}
    executed = {name: np.asarray(post.executed[name]) if post.executed is not None and name in post.executed
                else np.ones(samples[name].shape[:2 + _batch_ndim(compiled, name)], bool)
                for name in sites}
    draw_log_p = np.asarray(post.log_joint)
    # A NaN density is never a property of a good proposal (IS gives such particles zero weight).
    num_nan_density = int(np.any(np.isnan(draw_log_p) | np.isnan(np.asarray(post.log_proposal)), axis=-1).sum())
    usable = np.ones(draw_log_p.shape, bool)
    num_degenerate = 0
    if weighted:
        log_w = np.asarray(post.log_weights)
        degenerate = ~np.isfinite(log_w).any(axis=-1)
        num_degenerate = int(degenerate.sum())
        index = resample_indices(resample_key, log_w, num_samples)
        take = lambda x: np.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)
        samples = {k: take(v) for k, v in samples.items()}
        executed = {k: take(v) for k, v in executed.items()}
        draw_log_p = take(draw_log_p)
        usable = np.broadcast_to(~degenerate[:, None], draw_log_p.shape)
    rng = np.random.default_rng(np.asarray(jax.random.bits(jitter_key, (4,), jnp.uint32)))

    ranks, ran_in, invalid = {}, {}, {}
    for name in sites:
        shape = truth[name].shape[1:]
        event_shape = shape[_batch_ndim(compiled, name):]
        # Masks cover the batch (plate) dims; every event element of a multivariate site shares one.
        per_element = lambda m: np.broadcast_to(m.reshape(m.shape + (1,) * len(event_shape)), m.shape + event_shape)
        draws_ok = per_element(executed[name]) & usable.reshape(usable.shape + (1,) * len(shape))
        true_ok = per_element(ran[name]) & usable.any(axis=1).reshape((-1,) + (1,) * len(shape))
        true_values = truth[name].reshape(num_datasets, -1).astype(np.float64)
        draws = samples[name].reshape(num_datasets, num_samples, -1).astype(np.float64)
        draws_ok = draws_ok.reshape(num_datasets, num_samples, -1)
        u = normalised_ranks(true_values, draws, draws_ok, rng)
        ranks[name] = np.where(true_ok, u.reshape(true_ok.shape), np.nan)
        # A rank among draws some of which were NaN/inf (or of a non-finite truth) says nothing.
        broken = np.any(draws_ok & ~np.isfinite(draws), axis=1) | ~np.isfinite(true_values)
        ran_in[name], invalid[name] = true_ok, broken.reshape(true_ok.shape)
    if log_density:
        u = normalised_ranks(true_log_p[:, None].astype(np.float64), draw_log_p[..., None].astype(np.float64),
                             usable[..., None], rng)[:, 0]
        ranks[LOG_JOINT] = np.where(usable.any(axis=1), u, np.nan)
        ran_in[LOG_JOINT] = usable.any(axis=1)
        invalid[LOG_JOINT] = np.any(usable & np.isnan(draw_log_p), axis=1) | np.isnan(true_log_p)

    return SBCResult.from_ranks(ranks, num_samples, weighted=weighted, alpha=alpha, num_bins=num_bins,
                                num_degenerate=num_degenerate, executed=ran_in, invalid=invalid,
                                num_nan_density=num_nan_density)


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    # An element that never ran has no coverage: NaN, without numpy's empty-slice warning.
    count = np.sum(~np.isnan(x), axis=axis)
    total = np.nansum(x, axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# --- coverage ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CoverageResult:
    """Expected coverage of central credible intervals: per site and level, the fraction of
    simulated true values inside the level-``a`` central interval of the draws.

    ``coverage[site]`` has one entry per level (averaged over the site's elements);
    ``per_element[site]`` has shape ``(len(levels), *site_shape)``. Nominal coverage is
    ``levels``; ``standard_error`` is the binomial standard error of a calibrated proposal.

    Example:
        >>> cov = coverage(compiled, key, num_datasets=200)
        >>> cov.coverage["mu"], cov.levels
    """

    levels: np.ndarray
    coverage: dict[str, np.ndarray]
    per_element: dict[str, np.ndarray]
    num_datasets: int
    invalid: dict[str, int] = dataclasses.field(default_factory=dict)  # data sets with non-finite draws, per site

    @property
    def standard_error(self) -> np.ndarray:
        return np.sqrt(self.levels * (1.0 - self.levels) / self.num_datasets)

    @property
    def problems(self) -> list[str]:
        """Why the coverage cannot be read: NaN coverage, or data sets whose draws were not finite.

        Example:
            >>> cov.problems
            ["coverage of site 'x' is NaN: no data set gave it a finite rank"]
        """
        out = []
        for name, c in self.coverage.items():
            if self.invalid.get(name, 0):
                out.append(f"{self.invalid[name]} of {self.num_datasets} data sets gave non-finite proposal draws "
                           f"for site '{name}'")
            if np.isnan(c).any():
                out.append(f"coverage of site '{name}' is NaN: no data set gave it a finite rank (it never ran, or "
                           "its proposal draws were not finite)")
        return out

    @property
    def passed(self) -> bool:
        """False when some coverage is NaN or rests on non-finite draws (see :attr:`problems`).
        How far finite coverage is from nominal is judged against :attr:`standard_error`."""
        return not self.problems

    def summary(self) -> str:
        head = "".join(f"{f'{a:.0%}':>8}" for a in self.levels)
        lines = [f"coverage of central intervals ({self.num_datasets} datasets, ±{self.standard_error.max():.2f} "
                 f"s.e.):" + ("" if self.passed else " FAILED")]
        lines += [f"  FAILED: {problem}" for problem in self.problems]
        lines.append(f"  {'site':>16}{head}")
        for name, c in self.coverage.items():
            lines.append(f"  {name:>16}" + "".join(f"{x:8.2f}" for x in c))
        return "\n".join(lines)


def coverage(compiled_or_sbc, key: jax.Array | None = None, num_datasets: int = 200,
             levels: Sequence[float] = (0.5, 0.8, 0.95), *, num_samples: int = 100,
             sites: Sequence[str] | None = None, weighted: bool = False) -> CoverageResult:
    """Expected coverage of central credible intervals, from SBC ranks.

    The level-``a`` central interval covers the true value when its normalised rank lies
    in ``[(1 - a) / 2, (1 + a) / 2]``. Pass a compiled model (runs :func:`sbc` with the
    given budget) or an :class:`SBCResult` to reuse its ranks. NaN coverage, or ranks
    from non-finite proposal draws, make the result's ``passed`` False (``problems`` says why).

    Example:
        >>> cov = jaxic.diagnostics.coverage(compiled, jax.random.key(0), levels=(0.5, 0.9))
        >>> cov = jaxic.diagnostics.coverage(sbc_result)       # no new simulations
    """
    levels = np.asarray(levels, np.float64)
    if np.any((levels <= 0) | (levels >= 1)):
        raise JaxicError(f"coverage levels must lie strictly between 0 and 1, got {levels.tolist()}.")
    if isinstance(compiled_or_sbc, SBCResult):
        result = compiled_or_sbc
    else:
        if key is None:
            raise JaxicError("coverage of a compiled model needs a PRNG key for its simulations.")
        result = sbc(compiled_or_sbc, key, num_datasets, num_samples, sites=sites, weighted=weighted,
                     log_density=False)
    per_element, mean = {}, {}
    for name, u in result.ranks.items():
        if name == LOG_JOINT or (sites is not None and name not in sites):
            continue
        lo = (1.0 - levels) / 2
        lo = lo.reshape((-1,) + (1,) * u.ndim)
        inside = ((u >= lo) & (u <= 1.0 - lo)).astype(np.float64)
        inside = np.where(np.isnan(u), np.nan, inside)
        per_element[name] = _nanmean(inside, axis=1)
        mean[name] = _nanmean(inside.reshape(len(levels), -1), axis=1)
    return CoverageResult(levels=levels, coverage=mean, per_element=per_element, num_datasets=result.num_datasets,
                          invalid={name: result.num_invalid(name) for name in mean if result.num_invalid(name)})
