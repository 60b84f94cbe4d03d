"""Diagnostics in ecosystem form: SBC ranks for ArviZ, simultaneous ECDF bands, TARP and C2ST.

Everything here runs on exact or deliberately wrong posterior draws of a conjugate Gaussian
(no network), so each test is seconds; the compiled-model paths are in test_diagnostics.py.
"""

import re
import sys
import warnings

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest
from scipy import stats

import jaxic
from jaxic.diagnostics import LOG_JOINT, SBCResult, TARPResult, c2st, ecdf_band, tarp
from jaxic.errors import JaxicError, MissingDependencyError
from jaxic.export import SBC_GROUP, sbc_to_arviz

matplotlib.use("Agg")


def conjugate(num_datasets, num_draws, dim, *, scale=1.0, seed=0):
    """theta ~ N(0, I), x ~ N(theta, 0.5^2 I): exact posterior draws, widened by ``scale``."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(num_datasets, dim))
    x = theta + 0.5 * rng.normal(size=(num_datasets, dim))
    mean, sd = x / 1.25, np.sqrt(0.25 / 1.25)
    return mean[:, None] + scale * sd * rng.normal(size=(num_datasets, num_draws, dim)), theta


# --- simultaneous ECDF band -------------------------------------------------------------------

def test_ecdf_band_is_simultaneous_not_pointwise():
    n, level = 100, 0.9
    z, lo, hi = ecdf_band(n, level)
    np.testing.assert_allclose(z, np.arange(1, n) / n)
    assert np.all(lo <= z) and np.all(z <= hi)
    u = np.sort(np.random.default_rng(1).uniform(size=(2000, n)), axis=1)
    ecdf = np.stack([np.searchsorted(row, z, side="right") for row in u]) / n
    outside = np.any((ecdf < lo) | (ecdf > hi), axis=1).mean()
    # The whole curve leaves the band with probability ~ 1 - level ...
    assert 0.06 < outside < 0.16, outside
    # ... a pointwise band of the same level is left by most calibrated curves.
    p_lo, p_hi = stats.binom.ppf([[(1 - level) / 2], [(1 + level) / 2]], n, z) / n
    assert np.any((ecdf < p_lo) | (ecdf > p_hi), axis=1).mean() > 0.5
    with pytest.raises(JaxicError, match="num_ranks"):
        ecdf_band(1)
    with pytest.raises(JaxicError, match="level"):
        ecdf_band(50, 1.0)


def test_sbc_ecdf_plot_draws_the_simultaneous_band_over_finite_ranks():
    u = np.random.default_rng(2).uniform(size=80)
    u[:5] = np.nan  # the site did not run in 5 data sets
    result = SBCResult.from_ranks({"theta": u}, num_draws=50, executed={"theta": ~np.isnan(u)})
    fig = result.plot(kind="ecdf", level=0.9)
    ax = fig.axes[0]
    z, lo, hi = ecdf_band(75, 0.9)
    vertices = {tuple(np.round(v, 9)) for v in ax.collections[0].get_paths()[0].vertices}
    assert {tuple(np.round(v, 9)) for v in np.c_[z, lo - z]} <= vertices
    assert {tuple(np.round(v, 9)) for v in np.c_[z, hi - z]} <= vertices
    line = ax.lines[-1]
    expected = np.searchsorted(np.sort(u[5:]), z, side="right") / 75 - z
    np.testing.assert_allclose(line.get_ydata(), expected)
    assert "simultaneous" in ax.get_legend_handles_labels()[1][0]
    matplotlib.pyplot.close(fig)
    with pytest.raises(JaxicError, match="level"):
        result.plot(kind="ecdf", level=99)


# --- SBC ranks in ArviZ form ----------------------------------------------------------------

def test_sbc_ranks_export_to_prior_sbc_group_that_arviz_plots_reads():
    rng = np.random.default_rng(3)
    ranks = {"mu": rng.uniform(size=60), "x/v": rng.uniform(size=(60, 3)), LOG_JOINT: rng.uniform(size=60)}
    result = SBCResult.from_ranks(ranks, num_draws=20)
    tree = result.to_arviz(dims={"x/v": ["component"]})
    group = tree[SBC_GROUP]
    assert list(tree.children) == ["prior_sbc"]
    assert set(group.data_vars) == {"mu", "x.v", "log_joint"}
    assert group["x.v"].dims == ("chain", "draw", "component") and group["mu"].dims == ("chain", "draw")
    np.testing.assert_array_equal(group["x.v"].values[0], ranks["x/v"])
    np.testing.assert_array_equal(group["log_joint"].values[0], ranks[LOG_JOINT])
    assert group.attrs["num_draws"] == 20 and group.attrs["passed"] == int(result.passed)
    with warnings.catch_warnings():  # arviz-plots 0.8 reads matplotlib.style.core, deprecated in matplotlib 3.11
        warnings.simplefilter("ignore")
        import matplotlib.style.core  # noqa: F401
        arviz_plots = pytest.importorskip("arviz_plots")
    pc = arviz_plots.plot_ecdf_pit(tree, var_names=["mu"], backend="none")
    band = pc.viz["credible_interval"]["mu"].item()
    z, lo, hi = ecdf_band(60, 0.99)  # arviz-plots' default level and simulations: the same band
    np.testing.assert_allclose(band["x"], z)
    np.testing.assert_allclose(band["y_bottom"], lo - z)
    np.testing.assert_allclose(band["y_top"], hi - z)


def test_sbc_export_warns_about_nan_ranks_and_rejects_other_input():
    u = np.random.default_rng(4).uniform(size=(40, 2))
    u[:3, 1] = np.nan
    result = SBCResult.from_ranks({"k": u}, num_draws=10, executed={"k": ~np.isnan(u)})
    with pytest.warns(UserWarning, match=r"'k' in 3 of 40 data sets"):
        tree = sbc_to_arviz(result)
    assert np.isnan(tree[SBC_GROUP]["k"].values[0, :3, 1]).all()
    with pytest.raises(JaxicError, match=r"takes a jaxic.diagnostics.SBCResult .*, not dict"):
        sbc_to_arviz({"k": u})
    with pytest.raises(JaxicError, match=r"\['nope'\]"):
        result.to_arviz(dims={"nope": ["a"]})


# --- TARP -------------------------------------------------------------------------------------

def test_tarp_of_exact_posterior_follows_the_diagonal():
    draws, theta = conjugate(300, 200, 3)
    result = tarp(draws, jax.random.key(0), truth=theta)
    assert isinstance(result, TARPResult) and result.num_datasets == 300 and result.num_draws == 200
    assert result.levels.shape == (31,) and result.coverage[0] == 0.0 and result.coverage[-1] == 1.0
    assert np.max(np.abs(result.coverage - result.levels)) < 0.08
    assert abs(result.atc) < 0.02 and result.passed, result.summary()
    # Sites as a dict flatten to the same vector.
    same = tarp({"a": draws[..., :1], "b": draws[..., 1:]}, jax.random.key(0), truth={"a": theta[:, :1],
                                                                                         "b": theta[:, 1:]})
    np.testing.assert_array_equal(same.coverage, result.coverage)


def test_tarp_detects_overconfident_and_underconfident_posteriors():
    narrow = tarp(*conjugate(300, 200, 3, scale=0.3)[:1], jax.random.key(0), truth=conjugate(300, 200, 3)[1])
    at_90 = narrow.coverage[np.argmin(np.abs(narrow.levels - 0.9))]
    assert at_90 < 0.75 and narrow.atc < -0.05 and not narrow.passed
    assert "too narrow" in narrow.diagnose()
    wide = tarp(*conjugate(300, 200, 3, scale=3.0)[:1], jax.random.key(0), truth=conjugate(300, 200, 3)[1])
    assert wide.atc > 0.05 and not wide.passed and "too wide" in wide.diagnose()
    fig = narrow.plot()
    assert fig.axes[0].get_xlabel() == "credibility level"
    np.testing.assert_allclose(fig.axes[0].lines[-1].get_ydata(), narrow.coverage)
    matplotlib.pyplot.close(fig)


def test_tarp_drops_non_finite_data_sets_and_fails_them_and_checks_inputs():
    draws, theta = conjugate(120, 50, 2)
    draws[7, 3, 0] = np.nan
    result = tarp(draws, jax.random.key(1), truth=theta)
    assert result.num_datasets == 119 and not result.passed
    assert result.problems == ["1 of 120 data sets had a non-finite true value, draw or reference point and were "
                               "left out"]
    with pytest.raises(JaxicError, match="needs truth="):
        tarp(draws, jax.random.key(1))
    with pytest.raises(JaxicError, match=r"draws \(120, 50\)"):
        tarp(draws, jax.random.key(1), truth=theta[:100])
    with pytest.raises(JaxicError, match="distance"):
        tarp(draws, jax.random.key(1), truth=theta, distance="cosine")
    with pytest.raises(JaxicError, match="PRNG key"):
        tarp(draws, 0, truth=theta)
    with pytest.raises(JaxicError, match=r"truth has sites \['a'\] but the draws have \['b'\]"):
        tarp({"b": draws}, jax.random.key(1), truth={"a": theta})


# --- C2ST -------------------------------------------------------------------------------------

def test_c2st_is_chance_for_one_distribution_and_one_for_shifted():
    rng = np.random.default_rng(5)
    # One dimension for the null case: a classifier fitting noise trains longest, and 2-D takes 10x longer.
    assert abs(c2st(rng.normal(size=(200, 1)), rng.normal(size=(200, 1))) - 0.5) < 0.08
    # 3 std in each of 2 dimensions: the Bayes classifier's accuracy is Phi(4.24 / 2) = 0.983.
    assert c2st(rng.normal(size=(200, 2)) + 3.0, rng.normal(size=(200, 2))) > 0.95
    # Dicts of sites flatten in the reference's order; the same data give the same accuracy.
    x, y = rng.normal(size=(60, 2)), rng.normal(size=(60, 2)) + 3.0
    as_dict = c2st({"b": y[:, 1], "a": y[:, :1]}, {"a": x[:, :1], "b": x[:, 1]}, seed=3)
    assert as_dict == c2st(y, x, seed=3)
    # Folds trained in two processes give the very same score.
    assert c2st(y, x, seed=3, n_jobs=2) == as_dict
    # Raw proposal draws are compared as they are (their extra sites dropped), one observation set at a time.
    draws = jaxic.ProposalDraws({"a": jnp.asarray(y[:, :1]), "b": jnp.asarray(y[:, 1]), "extra": jnp.zeros(60)},
                                jnp.zeros(60), jnp.zeros(60), jnp.zeros(60))
    assert c2st(draws, {"a": x[:, :1], "b": x[:, 1]}, seed=3) == as_dict
    batched = jax.tree.map(lambda v: jnp.stack([v, v]), draws)
    with pytest.raises(JaxicError, match=r"draws for 2 observation sets.*draws\[i\]"):
        c2st(batched, {"a": x[:, :1], "b": x[:, 1]})


class WeightedDraws:
    """Stands in for a jaxic.Posterior: particles with importance weights."""

    samples = {"a": np.zeros((10, 2))}
    log_weights = np.zeros(10)


def test_c2st_rejects_bad_input_by_name(monkeypatch):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(50, 2))
    with pytest.raises(JaxicError, match=r"constant in \['b'\]"):
        c2st({"a": x[:, 0], "b": x[:, 1]}, {"a": x[:, 0], "b": np.ones(50)})
    bad = x.copy()
    bad[4, 1] = np.inf
    with pytest.raises(JaxicError, match=r"draws has non-finite values in \['column 1'\]"):
        c2st(bad, x)
    with pytest.raises(JaxicError, match="2 elements per draw and the reference 3"):
        c2st(x, rng.normal(size=(50, 3)))
    with pytest.raises(JaxicError, match="post.resample"):
        c2st(WeightedDraws(), x)
    for n_jobs in (0, 1.5, True, "2"):
        with pytest.raises(JaxicError, match=rf"n_jobs must be None .*got {re.escape(repr(n_jobs))}"):
            c2st(x, x + 1.0, n_jobs=n_jobs)
    monkeypatch.setitem(sys.modules, "sklearn.neural_network", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "jaxic\[test\]"'):
        c2st(x, x + 1.0)


def test_missing_arviz_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "arviz_stats.ecdf_utils", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "jaxic\[arviz\]"'):
        ecdf_band(37, 0.95)  # a size no other test caches
    monkeypatch.setitem(sys.modules, "arviz_base", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "jaxic\[arviz\]"'):
        SBCResult.from_ranks({"theta": np.linspace(0.01, 0.99, 50)}, num_draws=10).to_arviz()
