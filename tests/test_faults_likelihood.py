"""Fault catalogue: simulators observed without a likelihood, and posteriors in which no particle has weight.

A black-box simulator's output (summary statistics of random draws made inside the model) is observed
as a ``Delta``: the proposal learns from it like NPE, so ``compiled.sample`` is the posterior, while
everything that weighs by p(obs | latents) refuses by name instead of returning NaN.
"""

import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import jaxic
from jaxic.errors import NoLikelihoodError, ObservationError
from jaxic.networks import TransformerConfig
from jaxic.tracing import TraceSpec

NOISE = 0.5
TINY = dict(network=TransformerConfig(d_model=16, num_heads=2, num_layers=1, obs_hidden=32), validation_size=64,
            progress=False)


def simulator(obs=None):
    """theta ~ N(0, 1); the simulator adds N(0, NOISE^2) noise it draws itself: p(theta | obs) is
    N(obs / (1 + NOISE^2), NOISE^2 / (1 + NOISE^2)), though the model states no likelihood."""
    theta = numpyro.sample("theta", dist.Normal(0.0, 1.0))
    noisy = theta + NOISE * jax.random.normal(numpyro.prng_key())
    numpyro.sample("obs", dist.Delta(noisy), obs=obs)


@pytest.fixture(scope="module")
def compiled():
    return jaxic.compile(simulator, ["obs"], jax.random.key(0), 1500, batch_size=128, learning_rate=3e-3, **TINY)


def test_the_spec_marks_the_observation_as_without_likelihood_and_keeps_it_in_json(compiled):
    (site,) = compiled.spec.observed
    assert not site.has_likelihood and compiled.spec.likelihood_free == ("obs",)
    again = TraceSpec.from_json(compiled.spec.to_json())
    assert again.likelihood_free == ("obs",)
    # Specs written before the field existed read as having a likelihood.
    raw = json.loads(compiled.spec.to_json())
    del raw["observed"][0]["has_likelihood"]
    assert TraceSpec.from_json(json.dumps(raw)).likelihood_free == ()


def test_a_dataset_written_before_the_field_trains_a_proposal_that_knows_there_is_no_likelihood(tmp_path):
    jaxic.write_traces(tmp_path / "sims", simulator, ["obs"], 200, jax.random.key(0))
    index_file = tmp_path / "sims" / "traces.json"
    index = json.loads(index_file.read_text())
    spec = json.loads(index["trace_spec"])
    del spec["observed"][0]["has_likelihood"]  # as an older jaxic wrote it
    index["trace_spec"] = json.dumps(spec)
    index_file.write_text(json.dumps(index))
    assert jaxic.TraceDataset(tmp_path / "sims").spec.likelihood_free == ()
    from_old = jaxic.compile(simulator, ["obs"], jax.random.key(0), 0, dataset=tmp_path / "sims", **TINY)
    assert from_old.spec.likelihood_free == ("obs",)  # the model says so, not the old file
    with pytest.raises(NoLikelihoodError):
        from_old.posterior(jax.random.key(0), {"obs": 0.3}, 10)


def test_raw_draws_of_a_simulator_without_likelihood_are_its_posterior(compiled):
    observed = jnp.array([-1.0, 0.0, 1.5])
    draws = np.asarray(compiled.sample(jax.random.key(1), {"obs": observed}, 4000)["theta"])
    shrink = 1.0 / (1.0 + NOISE**2)
    np.testing.assert_allclose(draws.mean(axis=1), np.asarray(observed) * shrink, atol=0.12)
    np.testing.assert_allclose(draws.std(axis=1), math.sqrt(NOISE**2 * shrink), rtol=0.2)


def test_everything_that_weighs_by_the_likelihood_refuses_by_name(compiled):
    obs = {"obs": 0.3}
    for call in (lambda: compiled.posterior(jax.random.key(0), obs, 10),
                 lambda: jaxic.importance_sample(compiled.proposal, None, jax.random.key(0), obs, 10),
                 lambda: jaxic.diagnostics.sbc(compiled, jax.random.key(0), 10, 10, weighted=True)):
        with pytest.raises(NoLikelihoodError, match=r"observed site 'obs' is a Delta.*compiled\.sample"):
            call()
    with pytest.raises(NoLikelihoodError, match="objective='elbo'"):
        jaxic.compile(simulator, ["obs"], jax.random.key(0), 0, objective="elbo", data={"obs": jnp.zeros(4)}, **TINY)


def test_raw_draws_have_equal_weights_no_evidence_and_the_simulators_predictive(compiled):
    observed = jnp.array([-1.0, 1.5])
    draws = compiled.proposal_draws(jax.random.key(4), {"obs": observed}, 3000)
    assert isinstance(draws, jaxic.ProposalDraws) and draws.batch_shape == (2,)
    theta = np.asarray(draws.samples["theta"])
    np.testing.assert_allclose(draws.mean("theta"), theta.mean(axis=1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(draws.std("theta"), theta.std(axis=1), rtol=1e-3)
    np.testing.assert_allclose(draws.ess, 3000.0, rtol=1e-5)
    assert np.isneginf(np.asarray(draws.log_joint)).all()  # a Delta's density: what the weights would have been
    with pytest.raises(jaxic.JaxicError, match="no estimate of the evidence"):
        draws.log_evidence
    with pytest.raises(jaxic.JaxicError, match="no importance weights to diagnose"):
        jaxic.diagnostics.pareto_khat(draws)  # equal weights would read as a perfect proposal
    one = draws[1]
    assert isinstance(one, jaxic.ProposalDraws) and one.summary().startswith("3000 raw proposal draws")
    assert one.resample(jax.random.key(0), 5)["theta"].shape == (5,)
    # The simulator's own posterior predictive: obs' = theta + N(0, NOISE^2) with theta from the posterior.
    shrink = 1.0 / (1.0 + NOISE**2)
    predicted = np.asarray(compiled.predictive(jax.random.key(5), {"obs": observed}, 4000)["obs"])
    np.testing.assert_allclose(predicted.mean(axis=1), np.asarray(observed) * shrink, atol=0.1)
    np.testing.assert_allclose(predicted.std(axis=1), math.sqrt(NOISE**2 * shrink + NOISE**2), rtol=0.15)
    tree = jaxic.to_arviz(one)
    attrs = tree.posterior.attrs
    assert attrs["importance_weighted"] == 0 and "log_evidence" not in attrs and "ess" not in attrs
    np.testing.assert_array_equal(np.asarray(tree.posterior["theta"]).reshape(-1), theta[1])  # as drawn, no repeats


def test_sbc_and_the_report_check_raw_draws_of_a_simulator_without_likelihood(compiled):
    result = jaxic.diagnostics.sbc(compiled, jax.random.key(2), 60, 30)
    assert not result.weighted and set(result.ranks) == {"theta"}  # no log-density rank without a likelihood
    assert result.passed
    rep = jaxic.diagnostics.report(compiled, jax.random.key(3), {"obs": 0.3}, num_datasets=20, num_samples=20,
                                   verbose=False)
    assert rep.khat is None and rep.num_particles == 0
    assert any("no importance weights" in v and "'obs' has no likelihood" in v for v in rep.verdicts)


def test_a_deterministic_site_named_as_observed_gets_the_delta_recipe():
    def model(obs=None):
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0))
        numpyro.deterministic("obs", theta + jax.random.normal(numpyro.prng_key()))

    with pytest.raises(ObservationError, match=r"'obs' is a numpyro.deterministic site.*dist\.Delta"):
        jaxic.compile(model, ["obs"], jax.random.key(0), 0, **TINY)


def test_a_posterior_with_no_weighted_particle_warns_and_says_which_observation():
    def model(obs=None):
        x = numpyro.sample("x", dist.Uniform(0.0, 1.0))
        y = numpyro.sample("obs", dist.Normal(x, 1.0), obs=obs)
        # A detector that never records above 2: zero density there, whatever x (older numpyro versions do not
        # give a Uniform's log density -inf outside its support, so the zero is written out).
        numpyro.factor("detector", jnp.where(y > 2.0, -jnp.inf, 0.0))

    compiled = jaxic.compile(model, ["obs"], jax.random.key(0), 0, **TINY)
    with pytest.warns(UserWarning, match=r"no particle has a finite importance weight for observation sets \[1\] "
                                         r"\(1 of 2\)"):
        post = compiled.posterior(jax.random.key(0), {"obs": jnp.array([0.5, 2.5])}, 50)
    ess = np.asarray(post.ess)
    assert np.isfinite(ess[0]) and np.isnan(ess[1])
    with pytest.raises(jaxic.JaxicError, match="every particle of observation set 1 has zero"):
        post.resample(jax.random.key(1), 10)  # resampling by weight would pick garbage there
    assert post[0].resample(jax.random.key(1), 10)["x"].shape == (10,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every set has weight: no warning
        compiled.posterior(jax.random.key(0), {"obs": jnp.array([0.5, 1.9])}, 50)
