"""Diagnostics never pass on NaN: non-finite ranks, weights, draws or losses are failures that say why."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxic
from jaxic import diagnostics
from jaxic.diagnostics import LOG_JOINT, SBCResult
from jaxic.errors import JaxicError
from jaxic.models import gaussian_unknown_mean

TINY = jaxic.TransformerConfig(d_model=16, num_layers=1, num_heads=1, num_components=2)
OBS = {"obs": jnp.array([1.0, 2.5])}


def uniform_ranks(n=200, seed=0):
    return np.random.default_rng(seed).uniform(size=n)


def test_uniform_ranks_pass_as_a_baseline():
    result = SBCResult.from_ranks({"x": uniform_ranks()}, num_draws=100)
    assert result.passed and result.problems == [] and "PASSED" in result.summary()


def test_nan_ranks_fail_and_say_how_many():
    ranks = uniform_ranks()
    ranks[:37] = np.nan
    result = SBCResult.from_ranks({"x": ranks}, num_draws=100)
    assert not result.passed and result.failing_sites == ["x"] and result.num_invalid("x") == 37
    summary = result.summary()
    assert "FAILED: 37 of 200 data sets gave non-finite proposal draws for site 'x'" in summary, summary
    assert "PASSED" not in summary
    assert "37 of 200 data sets gave non-finite proposal draws" in result.diagnose("x")
    # The remaining 163 ranks are still tested (and uniform): only the NaNs fail.
    assert result.num_tests == 1 and np.isfinite(result.p_values["x"]).all()


def test_infinite_ranks_fail_too():
    ranks = uniform_ranks()
    ranks[5] = np.inf
    result = SBCResult.from_ranks({"x": ranks}, num_draws=100)
    assert not result.passed and result.num_invalid("x") == 1 and np.isnan(result.ranks["x"][5])


def test_all_nan_ranks_fail_with_nothing_tested():
    result = SBCResult.from_ranks({"x": np.full(200, np.nan)}, num_draws=100)
    assert not result.passed and result.num_tests == 0
    assert result.problems == ["200 of 200 data sets gave non-finite proposal draws for site 'x'",
                               "no rank could be tested: no element had finite ranks in at least 5 data sets"]
    assert result.summary().splitlines()[0].endswith("FAILED (family-wise level 0.01, Bonferroni over 0 tests)")


def test_nan_where_the_site_did_not_run_is_missing_not_a_failure():
    ranks = uniform_ranks()
    ran = np.ones(200, bool)
    ran[:50] = False
    ranks[~ran] = np.nan
    assert SBCResult.from_ranks({"x": ranks}, 100, executed={"x": ran}).passed
    ranks[60] = np.nan  # but here the site ran
    result = SBCResult.from_ranks({"x": ranks}, 100, executed={"x": ran})
    assert not result.passed and result.num_invalid("x") == 1
    invalid = SBCResult.from_ranks({"x": uniform_ranks()}, 100, invalid={"x": np.arange(200) < 3})
    assert not invalid.passed and invalid.num_invalid("x") == 3 and np.isnan(invalid.ranks["x"][:3]).all()
    with pytest.raises(JaxicError, match=r"\['y'\]"):
        SBCResult.from_ranks({"x": ranks}, 100, executed={"y": ran})


def test_nan_log_density_and_degenerate_weights_fail():
    nan_density = SBCResult.from_ranks({"x": uniform_ranks()}, 100, num_nan_density=4)
    assert not nan_density.passed
    assert nan_density.problems == ["4 of 200 data sets had particles with a NaN log q(x | y) or log p(x, y)"]
    degenerate = SBCResult.from_ranks({"x": uniform_ranks()}, 100, weighted=True, num_degenerate=2)
    assert not degenerate.passed and "2 of 200 data sets had no particle with a finite weight" in degenerate.summary()
    log_joint = uniform_ranks()
    log_joint[:3] = np.nan
    result = SBCResult.from_ranks({"x": uniform_ranks(), LOG_JOINT: log_joint}, 100)
    assert result.failing_sites == [LOG_JOINT]
    assert "3 of 200 data sets gave a NaN log p(x, y)" in result.summary()


def test_coverage_with_nan_ranks_fails():
    ranks = uniform_ranks()
    ranks[:37] = np.nan
    cov = diagnostics.coverage(SBCResult.from_ranks({"x": ranks}, 100), levels=(0.5, 0.9))
    assert not cov.passed and cov.invalid == {"x": 37}
    assert cov.problems == ["37 of 200 data sets gave non-finite proposal draws for site 'x'"]
    assert "FAILED: 37 of 200 data sets" in cov.summary()
    empty = diagnostics.coverage(SBCResult.from_ranks({"x": np.full(200, np.nan)}, 100), levels=(0.5,))
    assert not empty.passed and np.isnan(empty.coverage["x"]).all()
    assert "coverage of site 'x' is NaN" in empty.summary()
    fine = diagnostics.coverage(SBCResult.from_ranks({"x": uniform_ranks()}, 100), levels=(0.5,))
    assert fine.passed and fine.problems == [] and "FAILED" not in fine.summary()


def test_nan_or_all_zero_weights_have_undefined_khat():
    rng = np.random.default_rng(3)
    log_w = rng.normal(size=(3, 500))
    log_w[1, 7] = np.nan
    log_w[2] = -np.inf
    khat = diagnostics.pareto_khat(log_w)
    assert np.isfinite(khat[0]) and np.isnan(khat[1:]).all()
    ess = diagnostics.ess(log_w)
    assert np.isfinite(ess[0]) and np.isnan(ess[1:]).all()
    assert "some weights are NaN" in diagnostics.khat_verdict(float(khat[1]))


@pytest.fixture(scope="module")
def broken():
    """A compiled proposal whose parameters are all NaN (set through the public ``state``;
    jaxic has no public parameter setter), diagnosed once."""
    compiled = jaxic.compile(gaussian_unknown_mean, ["obs"], jax.random.key(0), num_steps=0, network=TINY,
                             validation_size=64, progress=False)
    nan_params = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), compiled.state.params)
    compiled.state = compiled.state._replace(params=nan_params)
    rep = diagnostics.report(compiled, jax.random.key(1), OBS, num_datasets=20, num_samples=10, num_particles=50,
                             num_traces=64, verbose=False)
    return compiled, rep


@pytest.mark.slow
def test_sbc_of_an_all_nan_proposal_fails(broken):
    _, rep = broken
    result = rep.sbc
    assert not result.passed and result.num_invalid("mu") == 20 and result.num_nan_density == 20
    summary = result.summary()
    assert "FAILED: 20 of 20 data sets gave non-finite proposal draws for site 'mu'" in summary, summary
    assert "PASSED" not in summary
    assert not rep.coverage.passed and rep.coverage.invalid == {"mu": 20}


@pytest.mark.slow
def test_report_of_an_all_nan_proposal_is_not_ok(broken):
    _, rep = broken
    assert not rep.ok
    assert np.isnan(rep.held_out_loss) and np.isnan(rep.validation_loss) and np.isnan(rep.khat)
    text = str(rep)
    assert "SBC FAILED: 20 of 20 data sets gave non-finite proposal draws for site 'mu'." in text
    assert "coverage FAILED: 20 of 20 data sets gave non-finite proposal draws for site 'mu'." in text
    assert "held-out loss is not finite" in text and "k̂ undefined" in text
    assert "do not trust the proposal" in text and "looks reliable" not in text and "SBC passed" not in text
