"""numpyro.deterministic sites in posteriors (masked and universal paths) and posterior predictive draws."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import jaxic
from jaxic import proposal as core
from jaxic.errors import JaxicError
from jaxic.networks import TransformerConfig
from jaxic.tracing import DeterministicSite, TraceSpec, derive_trace_spec, stack_deterministic
from jaxic.tracing.universal import derive_universal_spec

TINY = TransformerConfig(d_model=16, num_heads=2, num_layers=1, obs_hidden=16)
MAX_FLIPS = 6


def shifted():
    """b ~ Bernoulli(0.3), x ~ N(0, 1), mu = x + 2b, obs ~ N(mu, 1): exact posterior by enumerating b."""
    b = numpyro.sample("b", dist.Bernoulli(0.3))
    x = numpyro.sample("x", dist.Normal(0.0, 1.0))
    mu = numpyro.deterministic("mu", x + 2.0 * b)
    numpyro.sample("obs", dist.Normal(mu, 1.0))


def shifted_exact(y):
    """P(b=1 | y), E[mu | y] and Var[mu | y]: given b, obs ~ N(2b, 2) and mu | b, y ~ N(y/2 + b, 1/2)."""
    like = lambda b, prior: prior * np.exp(-((y - 2.0 * b) ** 2) / 4.0)
    p1 = like(1, 0.3) / (like(1, 0.3) + like(0, 0.7))
    return p1, y / 2.0 + p1, 0.5 + p1 * (1.0 - p1)


def flips():
    """Coin flips until heads (at most MAX_FLIPS): a Python loop, so the universal path."""
    n = 0
    while True:
        heads = numpyro.sample(f"c_{n}", dist.Bernoulli(0.5))
        n += 1
        if int(heads) == 1 or n == MAX_FLIPS:
            break
    numpyro.deterministic("count", n)
    if n > 1:  # reached by some runs only
        numpyro.deterministic("extra", 2.0 * n)
    numpyro.sample("obs", dist.Normal(float(n), 1.0))


def flips_exact(y):
    """Posterior of the number of flips given obs = y, by enumeration."""
    k = np.arange(1, MAX_FLIPS + 1)
    prior = np.where(k < MAX_FLIPS, 0.5**k, 0.5 ** (MAX_FLIPS - 1))
    post = prior * np.exp(-((y - k) ** 2) / 2.0)
    return k, post / post.sum()


@pytest.fixture(scope="module")
def compiled():
    # Untrained (heads at the prior): importance weights make the posterior exact in the limit.
    return jaxic.compile(shifted, ["obs"], jax.random.key(0), num_steps=0, network=TINY, validation_size=64,
                         progress=False)


@pytest.fixture(scope="module")
def universal():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the universal-path notice
        proposal = core.init(flips, ["obs"], jax.random.key(0), network=TINY, statistics_size=64,
                             path="universal", pilot_traces=32)
    return proposal, core.importance_sample(proposal, None, jax.random.key(1), {"obs": 2.0}, 300)


def test_spec_records_deterministic_sites_outside_its_identity():
    spec = derive_trace_spec(shifted, ["obs"])
    assert spec.deterministic == (DeterministicSite("mu", ()),)
    again = TraceSpec.from_json(spec.to_json())
    assert again.deterministic == spec.deterministic
    # No tokens: checkpoints written before deterministic sites were recorded still fit the model.
    assert dataclasses.replace(spec, deterministic=()) == spec


def test_masked_deterministic_sites_are_weighted_like_latents(compiled):
    ys = np.array([1.5, -1.0])
    post = compiled.posterior(jax.random.key(1), {"obs": jnp.asarray(ys)}, 4000)
    x, b, mu = post.samples["x"], post.samples["b"], post.samples["mu"]
    assert mu.shape == (2, 4000)
    np.testing.assert_array_equal(mu, x + 2.0 * b)  # the final run's value, particle by particle
    assert bool(jnp.all(post.executed["mu"]))
    p1, mean, var = shifted_exact(ys)
    np.testing.assert_allclose(post.mean("mu"), mean, atol=0.06)
    np.testing.assert_allclose(post.std("mu") ** 2, var, rtol=0.1)
    assert "mu" in post.summary()
    single = post[0]
    draws = single.resample(jax.random.key(2), 500)  # resampled jointly with the latents
    np.testing.assert_array_equal(draws["mu"], draws["x"] + 2.0 * draws["b"])
    tree = jaxic.to_arviz(single, jax.random.key(3), num_draws=300)
    group = tree["posterior"]
    np.testing.assert_allclose(group["mu"].values, group["x"].values + 2.0 * group["b"].values, rtol=1e-6)
    raw = compiled.sample(jax.random.key(4), {"obs": jnp.asarray(ys)}, 4000)  # raw draws (jaxic.proposal.sample)
    np.testing.assert_array_equal(raw["mu"], raw["x"] + 2.0 * raw["b"])


@pytest.mark.slow
def test_universal_deterministic_sites_per_particle(universal):
    proposal, post = universal
    assert [d.name for d in proposal.spec.deterministic] == ["count", "extra"]
    ran = np.stack([np.asarray(post.executed[f"c_{i}"]) for i in range(MAX_FLIPS)], -1)
    count = np.asarray(post.samples["count"])
    np.testing.assert_array_equal(count, ran.sum(-1))  # each particle's own run
    assert set(np.unique(count)) > {1, 2}
    np.testing.assert_array_equal(post.executed["extra"], count > 1)
    extra = np.asarray(post.samples["extra"])
    np.testing.assert_array_equal(extra, np.where(count > 1, 2.0 * count, 0.0))  # placeholder where absent
    k, exact = flips_exact(2.0)
    np.testing.assert_allclose(post.mean("count"), k @ exact, atol=0.15)
    np.testing.assert_allclose(post.probability_executed("extra"), exact[1:].sum(), atol=0.06)
    np.testing.assert_allclose(post.mean("extra"), 2.0 * k[1:] @ exact[1:] / exact[1:].sum(), atol=0.3)
    exported = jaxic.to_arviz(post, resample=False)["posterior"]["extra"].values.reshape(-1)
    np.testing.assert_array_equal(np.isnan(exported), count == 1)
    # Samples as a whole (deterministic sites included) can be scored, as Predictive's output can.
    total, _ = core.log_prob(proposal, {k: v[:2] for k, v in post.samples.items()}, {"obs": 2.0})
    assert total.shape == (2,) and bool(jnp.all(jnp.isfinite(total)))


def test_shape_changing_deterministic_site_is_a_named_model_error():
    def varying():
        n = 0
        while int(numpyro.sample(f"c_{n}", dist.Bernoulli(0.5))) == 0 and n < 4:
            n += 1
        numpyro.deterministic("history", jnp.zeros(n + 1))
        numpyro.sample("obs", dist.Normal(float(n), 1.0))

    with pytest.raises(jaxic.ModelError, match=r"deterministic site 'history' has shape \(\d,\) in one run .*pad"):
        derive_universal_spec(varying, ["obs"], jax.random.key(0), num_traces=32)
    # At inference, against the shape the pilot runs recorded.
    with pytest.raises(jaxic.ModelError, match=r"deterministic site 'v' has shape \(2,\) in one run and \(3,\)"):
        stack_deterministic([{"v": np.zeros(3)}], (DeterministicSite("v", (2,)),))


def conjugate(shift=0.0):
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    numpyro.deterministic("twice", 2.0 * mu + shift)
    numpyro.sample("obs", dist.Normal(mu, 1.0))


def prior_posterior(ys, num=20_000):
    """Importance sampling with the prior as proposal, by hand: weights are the likelihoods."""
    mu = 2.0 * jax.random.normal(jax.random.key(5), (num,))
    log_lik = dist.Normal(mu, 1.0).log_prob(jnp.asarray(ys)[:, None])
    log_prior = dist.Normal(0.0, 2.0).log_prob(mu)
    return jaxic.Posterior({"mu": jnp.broadcast_to(mu, log_lik.shape)}, log_lik, log_lik + log_prior,
                           jnp.broadcast_to(log_prior, log_lik.shape))


def test_predictive_of_a_new_observation_is_the_analytic_one():
    ys = np.array([1.0, -2.5])
    post = prior_posterior(ys)
    draws = jaxic.predictive(conjugate, post, jax.random.key(6), 20_000)
    assert set(draws) == {"obs", "twice"} and draws["obs"].shape == (2, 20_000)
    # Posterior N(0.8 y, 0.8) (prior variance 4, noise variance 1); a new observation adds the noise.
    np.testing.assert_allclose(draws["obs"].mean(-1), 0.8 * ys, atol=0.05)
    np.testing.assert_allclose(draws["obs"].var(-1), 0.8 + 1.0, rtol=0.05)
    np.testing.assert_allclose(draws["twice"].mean(-1), 1.6 * ys, atol=0.06)
    # The method form, with the model's arguments: the same draws (same key), shifted.
    method = post.predictive(jax.random.key(6), num_samples=20_000, model=conjugate, model_kwargs={"shift": 10.0})
    np.testing.assert_allclose(method["twice"], draws["twice"] + 10.0, rtol=1e-6)
    # A posterior made by hand does not know its model: the error says what to pass.
    with pytest.raises(JaxicError, match="model=model"):
        post.predictive(jax.random.key(6), 10)


def test_compiled_predictive_matches_the_exact_mixture(compiled):
    ys = np.array([1.5, -1.0])
    draws = compiled.predictive(jax.random.key(7), {"obs": jnp.asarray(ys)}, 4000)
    # A posterior from compiled.posterior knows its model, also after indexing (the same draws as predictive_from).
    post = compiled.posterior(jax.random.key(8), {"obs": jnp.asarray(ys)}, 500)
    np.testing.assert_array_equal(post[1].predictive(jax.random.key(9), 30)["obs"],
                                  compiled.predictive_from(post[1], jax.random.key(9), 30)["obs"])
    assert set(draws) == {"obs", "mu"} and draws["obs"].shape == (2, 4000)
    _, mean, var = shifted_exact(ys)
    np.testing.assert_allclose(draws["mu"].mean(-1), mean, atol=0.08)
    np.testing.assert_allclose(draws["obs"].var(-1), var + 1.0, rtol=0.1)


@pytest.mark.slow
def test_predictive_on_the_universal_path_recomputes_deterministic_sites(universal):
    _, post = universal
    with pytest.warns(UserWarning, match=r"site 'extra' did not run in \d+ of 40"):
        draws = jaxic.predictive(flips, post, jax.random.key(8), 40)
    count, extra = np.asarray(draws["count"]), np.asarray(draws["extra"])
    assert draws["obs"].shape == (40,) and set(np.unique(count)) <= set(range(1, MAX_FLIPS + 1))
    np.testing.assert_array_equal(np.isnan(extra), count == 1)
    np.testing.assert_array_equal(extra[count > 1], 2.0 * count[count > 1])


def test_predictive_validates_its_arguments():
    post = prior_posterior(np.array([1.0]), num=8)
    with pytest.raises(jaxic.JaxicError, match="num_samples"):
        jaxic.predictive(conjugate, post, jax.random.key(0), 0)
    with pytest.raises(jaxic.JaxicError, match="key must be a JAX PRNG key"):
        jaxic.predictive(conjugate, post, 0, 10)
    with pytest.raises(jaxic.JaxicError, match="posterior must be a jaxic.Posterior.*dict"):
        jaxic.predictive(conjugate, post.samples, jax.random.key(0), 10)
    dead = dataclasses.replace(post, log_weights=jnp.full_like(post.log_weights, -jnp.inf))
    with pytest.raises(jaxic.JaxicError, match="every particle of observation set 0 has zero"):
        jaxic.predictive(conjugate, dead, jax.random.key(0), 10)
