"""Diagnostics: SBC tells a trained proposal from an untrained one, coverage, k-hat, report."""

import sys

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest

import jaxic
from jaxic import diagnostics, training
from jaxic.diagnostics import LOG_JOINT, SBCResult
from jaxic.diagnostics.calibration import normalised_ranks
from jaxic.models import gaussian_unknown_mean
from jaxic.plots import plot_training

matplotlib.use("Agg")

TINY = jaxic.TransformerConfig(d_model=32, num_layers=1, num_heads=2, num_components=4)
STEPS = 1500  # the step is cheap (one token); compilation dominates this file's time
OBS = {"obs": jnp.array([1.0, 2.5])}
BUDGET = dict(num_datasets=200, num_samples=100)


@pytest.fixture(scope="module")
def gaussian():
    """One proposal, diagnosed untrained and then trained: the batched sampler compiles once.

    Its optimizer is planned for STEPS although it compiles with none, so the trained
    proposal sees the usual warm-up and cosine decay.
    """
    compiled = jaxic.compile(gaussian_unknown_mean, observed=["obs"], key=jax.random.key(1), num_steps=0,
                             network=TINY, validation_size=256, progress=False,
                             optimizer=training.default_optimizer(STEPS))
    untrained = diagnostics.report(compiled, jax.random.key(10), OBS, num_particles=500, verbose=False, **BUDGET)
    compiled.train(STEPS, progress=False)
    trained = diagnostics.sbc(compiled, jax.random.key(11), **BUDGET)
    return compiled, untrained, trained


@pytest.mark.slow
def test_sbc_passes_when_trained_and_fails_when_untrained(gaussian):
    compiled, untrained, trained = gaussian
    assert trained.ranks["mu"].shape == (200,) and trained.ranks[LOG_JOINT].shape == (200,)
    assert np.all((trained.ranks["mu"] > 0) & (trained.ranks["mu"] < 1))
    assert trained.passed, trained.summary()
    # q ~ prior: the parameter's ranks are uniform (SBC's blind spot), the log density's are not.
    assert not untrained.sbc.passed, untrained.sbc.summary()
    assert LOG_JOINT in untrained.sbc.failing_sites
    assert "ignores the data" in untrained.sbc.diagnose(LOG_JOINT)
    weighted = diagnostics.sbc(compiled, jax.random.key(12), weighted=True, **BUDGET)
    assert weighted.weighted and weighted.passed, weighted.summary()


@pytest.mark.slow
def test_coverage_of_trained_proposal_is_near_nominal(gaussian):
    compiled, _, trained = gaussian
    cov = diagnostics.coverage(trained, levels=(0.5, 0.8, 0.95))
    np.testing.assert_allclose(cov.coverage["mu"], [0.5, 0.8, 0.95], atol=0.1)
    fresh = diagnostics.coverage(compiled, jax.random.key(13), 200, levels=(0.8,))
    assert abs(fresh.coverage["mu"][0] - 0.8) < 0.1 and LOG_JOINT not in fresh.coverage
    assert "80%" in fresh.summary()


def test_rank_histogram_shapes_are_diagnosed():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(400, 1))

    def result(scale=1.0, shift=0.0):
        draws = shift + scale * rng.normal(size=(400, 100, 1))
        u = normalised_ranks(truth, draws, np.ones(draws.shape, bool), rng)[:, 0]
        return SBCResult.from_ranks({"theta": u}, num_draws=100)

    assert result().passed
    assert "too narrow" in result(scale=0.5).diagnose("theta")
    assert "too wide" in result(scale=2.0).diagnose("theta")
    assert "biased high" in result(shift=0.6).diagnose("theta")
    assert "biased low" in result(shift=-0.6).diagnose("theta")
    assert not result(scale=0.5).passed


def test_discrete_ties_are_broken_at_random_and_unexecuted_draws_ignored():
    rng = np.random.default_rng(1)
    probs = np.array([0.6, 0.3, 0.1])
    truth = rng.choice(3, size=(500, 1), p=probs).astype(float)
    draws = rng.choice(3, size=(500, 50, 1), p=probs).astype(float)
    valid = rng.uniform(size=draws.shape) < 0.7
    garbage = np.where(valid, draws, 1e9)  # values of draws where the site did not run
    u = normalised_ranks(truth, garbage, valid, rng)[:, 0]
    assert SBCResult.from_ranks({"k": u}, num_draws=50).passed
    counted = np.sum(draws < truth[:, None], axis=1)[:, 0] / 50  # ranks without tie-breaking are not uniform
    assert not SBCResult.from_ranks({"k": counted}, num_draws=50).passed


def test_pareto_khat_separates_good_from_heavy_tailed_weights():
    x = np.random.default_rng(2).normal(size=(3, 8000))  # draws from q = N(0, 1)

    def log_weights(target_sd):
        return -0.5 * (x / target_sd) ** 2 - np.log(target_sd) + 0.5 * x**2

    assert np.all(diagnostics.pareto_khat(log_weights(1.0)) < 0.5)  # q = p: equal weights
    assert np.all(diagnostics.pareto_khat(log_weights(0.8)) < 0.5)  # q wider than p: bounded weights
    heavy = diagnostics.pareto_khat(log_weights(4.0))  # q too narrow: k = 1 - 1/16 in theory
    assert heavy.shape == (3,) and np.all(heavy > 0.7), heavy
    assert isinstance(diagnostics.pareto_khat(log_weights(4.0)[0]), float)
    assert "unreliable" in diagnostics.khat_verdict(float(heavy.max()))
    smoothed, _ = diagnostics.psis(log_weights(4.0))
    np.testing.assert_allclose(np.exp(smoothed).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(diagnostics.ess(log_weights(1.0)), 8000.0)


def test_weight_diagnostics_of_a_posterior(gaussian):
    compiled = gaussian[0]
    post = compiled.posterior(jax.random.key(3), OBS, num_samples=500)
    assert diagnostics.pareto_khat(post) < 0.5
    np.testing.assert_allclose(diagnostics.ess(post), post.ess, rtol=1e-4)


def test_held_out_loss(gaussian):
    compiled = gaussian[0]
    assert diagnostics.held_out_loss(compiled) == pytest.approx(compiled.validation_loss())
    fresh = diagnostics.held_out_loss(compiled, jax.random.key(4), num_traces=1024)  # as report(): one compile
    # Exact posterior: -log q is about the posterior entropy of mu, 1.33 nats.
    assert 1.2 < fresh < 1.5


def test_report_prints_verdicts_and_returns_numbers(gaussian, capsys):
    compiled, untrained, _ = gaussian
    rep = diagnostics.report(compiled, jax.random.key(5), OBS, num_particles=500, **BUDGET)
    printed = capsys.readouterr().out
    assert rep.ok and rep.sbc.passed and rep.khat < 0.5 and 0.5 < rep.ess_fraction <= 1.0
    assert "VERDICT: the proposal looks reliable" in printed and "k̂" in printed and "coverage" in printed
    assert set(rep.coverage.coverage) == {"mu"} and np.isfinite(rep.held_out_loss)
    assert not untrained.ok
    assert "SBC fails for log p(x, y)" in str(untrained) and "do not trust" in str(untrained)


def test_plots_return_figures(gaussian):
    compiled, untrained, trained = gaussian
    for fig in (trained.plot(), untrained.sbc.plot(kind="ecdf"), plot_training(compiled)):
        assert isinstance(fig, matplotlib.figure.Figure) and fig.axes
        matplotlib.pyplot.close(fig)


def test_missing_optional_dependencies_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "arviz_stats.base", None)
    with pytest.raises(jaxic.JaxicError, match=r'pip install "jaxic\[arviz\]"') as info:
        diagnostics.pareto_khat(np.random.default_rng(0).normal(size=100))
    assert isinstance(info.value, ImportError)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(jaxic.JaxicError, match=r'pip install "jaxic\[plots\]"'):
        SBCResult.from_ranks({"theta": np.linspace(0.01, 0.99, 50)}, num_draws=10).plot()


@pytest.mark.slow
def test_tarp_and_arviz_export_of_a_trained_proposal(gaussian):
    compiled, _, trained = gaussian
    result = diagnostics.tarp(compiled, jax.random.key(13), num_datasets=200, num_samples=100)
    assert result.num_datasets == 200 and result.num_draws == 100 and result.passed, result.summary()
    assert abs(result.atc) < 0.05
    with pytest.raises(jaxic.JaxicError, match=r"\['nope'\] are not latent sites"):
        diagnostics.tarp(compiled, jax.random.key(13), sites=["nope"])
    tree = trained.to_arviz()
    np.testing.assert_array_equal(tree["prior_sbc"]["mu"].values[0], trained.ranks["mu"])
    np.testing.assert_array_equal(tree["prior_sbc"]["log_joint"].values[0], trained.ranks[LOG_JOINT])
