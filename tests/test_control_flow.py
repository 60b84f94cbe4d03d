"""Stochastic control flow: masked (jitted) and universal (eager) paths against exact posteriors."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.contrib.control_flow import cond

import jaxic
from jaxic.models import (hmm, hmm_posterior, poisson_branch, poisson_branch_posterior, poisson_branch_universal,
                          random_objects, random_objects_posterior, rejection_model, rejection_posterior)
from jaxic.tracing import TraceDataset, write_traces


def compile_quietly(model, observed, steps, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return jaxic.compile(model, observed, jax.random.key(0), num_steps=steps, progress=False,
                             validation_size=256, **kwargs)


@pytest.mark.slow
def test_hmm_in_scan_matches_forward_backward():
    compiled = compile_quietly(hmm, ["y"], 400)
    # Time-major layout: the proposal decodes z_t when the scan reaches step t.
    assert compiled.spec.latent("z").scan_length == 6
    for y in (jnp.array([-1.4, -1.6, 0.1, 1.5, 1.7, 1.2]), jnp.array([1.6, -1.5, 0.0, 0.2, -0.1, 2.5])):
        post = compiled.posterior(jax.random.key(1), {"y": y}, 4000)
        exact = hmm_posterior(y)
        marginals = jnp.stack([(post.samples["z"] == k).astype(jnp.float32).T @ post.weights for k in range(3)], -1)
        np.testing.assert_allclose(marginals, exact["marginals"], atol=0.04)
        np.testing.assert_allclose(post.log_evidence, exact["log_evidence"], atol=0.05)
        assert post.ess / post.num_samples > 0.3


@pytest.mark.slow
def test_cond_branches_match_enumeration():
    def model():
        b = numpyro.sample("b", dist.Bernoulli(0.3))
        x = cond(b == 1, lambda _: numpyro.sample("x", dist.Normal(3.0, 1.0)),
                 lambda _: numpyro.sample("x", dist.Normal(-3.0, 1.0)), None)
        numpyro.sample("obs", dist.Normal(x, 1.0))

    compiled = compile_quietly(model, ["obs"], 300)
    obs = jnp.array([-1.0, 0.5, 2.0])
    post = compiled.posterior(jax.random.key(1), {"obs": obs}, 3000)
    evidence = lambda m, p: p * jnp.exp(dist.Normal(m, 2.0**0.5).log_prob(obs))
    exact = evidence(3.0, 0.3) / (evidence(3.0, 0.3) + evidence(-3.0, 0.7))
    np.testing.assert_allclose(post.mean("b"), exact, atol=0.02)


@pytest.fixture(scope="module")
def poisson_masked():
    return compile_quietly(poisson_branch, ["obs"], 500)


@pytest.mark.slow
@pytest.mark.parametrize("obs", [4.0, -1.5])
def test_poisson_branch_masked_matches_exact(poisson_masked, obs):
    post = poisson_masked.posterior(jax.random.key(1), {"obs": obs}, 4000)
    exact = poisson_branch_posterior(obs)
    n = post.samples["n"]
    # Integer proposals on the support only.
    assert jnp.all(n >= 0) and jnp.all(n == jnp.round(n))
    np.testing.assert_allclose(post.probability_executed("a"), exact["p_branch"], atol=0.02)
    np.testing.assert_allclose(post.mean("n"), jnp.sum(jnp.arange(exact["n_probs"].shape[0]) * exact["n_probs"]),
                               atol=0.08)
    branch = "a" if exact["p_branch"] > 0.5 else "b"
    np.testing.assert_allclose(post.mean(branch), exact[f"{branch}_mean"], atol=0.06)
    np.testing.assert_allclose(post.std(branch), exact[f"{branch}_sd"], rtol=0.1)


@pytest.mark.slow
def test_universal_path_python_if_matches_masked_and_exact(poisson_masked):
    with pytest.warns(UserWarning, match="universal path"):
        compiled = jaxic.compile(poisson_branch_universal, ["obs"], jax.random.key(0), num_steps=150,
                                 validation_size=128, progress=False)
    assert compiled.path == "universal"
    obs = 4.0
    eager = compiled.posterior(jax.random.key(2), {"obs": obs}, 600)
    masked = poisson_masked.posterior(jax.random.key(2), {"obs": obs}, 4000)
    exact = poisson_branch_posterior(obs)
    n_mean = jnp.sum(jnp.arange(exact["n_probs"].shape[0]) * exact["n_probs"])
    for post in (eager, masked):
        np.testing.assert_allclose(post.mean("n"), n_mean, atol=0.15)
        np.testing.assert_allclose(post.probability_executed("a"), exact["p_branch"], atol=0.03)
        np.testing.assert_allclose(post.mean("a"), exact["a_mean"], atol=0.1)
    # One compile for all trace lengths: the eager traces are packed to one padded shape.
    assert compiled.loop.compilations() == 1


@pytest.mark.slow
def test_rejection_loop_matches_exact():
    compiled = compile_quietly(rejection_model, ["obs"], 500)
    post = compiled.posterior(jax.random.key(1), {"obs": 0.3}, 4000)
    exact = rejection_posterior(0.3)
    # The accepted value is the last attempt that ran.
    ran = jnp.stack([post.samples[f"x[{i}]/v"] for i in range(12)], -1)
    executed = jnp.stack([post.executed[f"x[{i}]/v"] for i in range(12)], -1)
    accepted = jnp.take_along_axis(ran, executed.sum(-1, keepdims=True) - 1, -1)[:, 0]
    np.testing.assert_allclose(jnp.sum(post.weights * accepted), exact["x_mean"], atol=0.04)
    attempts = executed.sum(-1)
    for k in (1, 2, 3):
        np.testing.assert_allclose(jnp.sum(post.weights * (attempts == k)), exact["attempt_probs"][k - 1], atol=0.03)


@pytest.mark.slow
def test_random_number_of_objects_matches_exact():
    compiled = compile_quietly(random_objects, ["obs", "count_signal"], 500)
    post = compiled.posterior(jax.random.key(1), {"obs": 3.0, "count_signal": 2.2}, 4000)
    exact = random_objects_posterior(3.0, 2.2)
    n_probs = jnp.stack([jnp.sum(post.weights * (post.samples["n"] == k)) for k in range(exact["n_probs"].shape[0])])
    np.testing.assert_allclose(n_probs, exact["n_probs"], atol=0.03)
    total = jnp.sum(post.samples["position"] * post.executed["position"], -1)
    np.testing.assert_allclose(jnp.sum(post.weights * total), exact["total_mean"], atol=0.1)


@pytest.mark.slow
def test_variable_length_traces_train_in_one_compile():
    """Traces with 1 to 13 executed sites share one padded layout and one compiled step."""
    compiled = compile_quietly(rejection_model, ["obs"], 0)  # constant learning rate: train freely below
    lengths = compiled.validation[0].mask.sum(-1)
    assert int(lengths.min()) < int(lengths.max())
    compiled.train(50, progress=False)
    compiled.train(50, progress=False)
    assert compiled.loop.compilations() == 1


@pytest.mark.slow
def test_prior_only_sites_skip_the_network():
    def model():
        u = numpyro.sample("u", dist.Normal(0.0, 1.0), infer={"jaxic": {"propose": False}})
        x = numpyro.sample("x", dist.Normal(u, 1.0))
        numpyro.sample("obs", dist.Normal(x, 0.5))

    compiled = compile_quietly(model, ["obs"], 200)
    assert not compiled.spec.latent("u").propose
    post = compiled.posterior(jax.random.key(1), {"obs": 2.0}, 4000)
    # q(u) is the prior, so log q - log p of u cancels: weights depend on x only.
    np.testing.assert_allclose(post.resample(jax.random.key(2), 20000)["u"].mean(), 2.0 / 2.25, atol=0.05)
    tokens, observations = compiled.validation
    log_q = jax.vmap(compiled.network.log_prob)(observations, tokens)
    assert jnp.all(log_q[:, compiled.spec.latent("u").offset] == 0.0)


@pytest.mark.slow
def test_offline_dataset_in_shards_trains(tmp_path):
    spec = write_traces(tmp_path / "traces", poisson_branch, ["obs"], num_traces=3000, key=jax.random.key(5),
                        shard_size=1000)
    data = TraceDataset(tmp_path / "traces", holdout=256)
    assert len(data) == 3000 and len(data.shards) == 3 and data.spec == spec
    batches = data.batches(jax.random.key(0), 64)
    first = next(batches)
    chex.assert_shape(first[0].value, (64, spec.num_tokens, spec.value_dim))
    compiled = jaxic.compile(poisson_branch, ["obs"], jax.random.key(0), num_steps=300, dataset=data,
                             validation_size=256, progress=False)
    assert compiled.path == "dataset"
    assert compiled.history["validation_loss"][-1] < compiled.history["validation_loss"][0] - 0.3
    post = compiled.posterior(jax.random.key(1), {"obs": 4.0}, 2000)
    np.testing.assert_allclose(post.probability_executed("a"), poisson_branch_posterior(4.0)["p_branch"], atol=0.03)
