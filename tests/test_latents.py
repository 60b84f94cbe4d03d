"""Every kind of latent: multivariate, simplex, finite and unbounded discrete, against exact posteriors."""

import warnings
import pytest

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.control_flow import scan

import jaxic
from jaxic.heads import CategoricalHead, IntegerMixtureHead, MixtureHead, head_for_site
from jaxic.tracing import derive_trace_spec, sample_joint


def compile_quietly(model, observed, steps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return jaxic.compile(model, observed, jax.random.key(0), num_steps=steps, progress=False,
                             validation_size=256)


COV = jnp.array([[2.0, 0.8, 0.0], [0.8, 1.0, -0.3], [0.0, -0.3, 0.5]])


def gaussian_vector():
    x = numpyro.sample("x", dist.MultivariateNormal(jnp.zeros(3), COV))
    numpyro.sample("obs", dist.MultivariateNormal(x, 0.25 * jnp.eye(3)))


def dirichlet_counts():
    p = numpyro.sample("p", dist.Dirichlet(jnp.array([1.0, 2.0, 3.0])))
    numpyro.sample("counts", dist.Multinomial(20, p))


@pytest.mark.slow
def test_multivariate_normal_in_one_token_matches_conjugate_posterior():
    compiled = compile_quietly(gaussian_vector, ["obs"], 600)
    assert compiled.spec.latent("x").num_tokens == 1 and compiled.spec.value_dim == 3
    obs = jnp.array([1.0, -0.5, 0.8])
    post = compiled.posterior(jax.random.key(1), {"obs": obs}, 4000)
    precision = jnp.linalg.inv(COV) + 4.0 * jnp.eye(3)
    cov = jnp.linalg.inv(precision)
    np.testing.assert_allclose(post.mean("x"), cov @ (4.0 * obs), atol=0.04)
    np.testing.assert_allclose(post.std("x"), jnp.sqrt(jnp.diag(cov)), rtol=0.1)
    assert post.ess / post.num_samples > 0.3


@pytest.mark.slow
def test_dirichlet_simplex_matches_conjugate_posterior():
    compiled = compile_quietly(dirichlet_counts, ["counts"], 600)
    counts = jnp.array([2.0, 12.0, 6.0])
    post = compiled.posterior(jax.random.key(1), {"counts": counts}, 4000)
    alpha = jnp.array([1.0, 2.0, 3.0]) + counts
    np.testing.assert_allclose(post.mean("p"), alpha / alpha.sum(), atol=0.015)
    np.testing.assert_allclose(post.mean("p").sum(), 1.0, atol=1e-5)


def test_each_support_gets_its_head():
    def model():
        numpyro.sample("flag", dist.Bernoulli(0.5))
        numpyro.sample("hits", dist.Binomial(7, 0.3))
        numpyro.sample("count", dist.Poisson(4.0))
        numpyro.sample("trials", dist.Geometric(0.2))
        numpyro.sample("reads", dist.NegativeBinomial2(30.0, 2.0))
        numpyro.sample("w", dist.Dirichlet(jnp.ones(4)))
        numpyro.sample("obs", dist.Normal(0.0, 1.0))

    spec = derive_trace_spec(model, ["obs"])
    heads = {s.name: head_for_site(s, 4) for s in spec.latents}
    assert heads["flag"] == CategoricalHead(2) and heads["hits"] == CategoricalHead(8)
    for name in ("count", "trials", "reads"):
        assert isinstance(heads[name], IntegerMixtureHead), name
    assert heads["w"] == MixtureHead(3, 4)


@pytest.mark.slow
def test_poisson_latent_proposals_are_integers_and_match_the_exact_posterior():
    def model():
        n = numpyro.sample("n", dist.Poisson(6.0))
        numpyro.sample("obs", dist.Normal(n, 1.5))

    compiled = compile_quietly(model, ["obs"], 500)
    post = compiled.posterior(jax.random.key(1), {"obs": 11.0}, 4000)
    n = post.samples["n"]
    assert jnp.all(n >= 0) and jnp.all(n == jnp.round(n))
    grid = jnp.arange(80)
    log_post = dist.Poisson(6.0).log_prob(grid) + dist.Normal(grid, 1.5).log_prob(11.0)
    exact = jax.nn.softmax(log_post)
    np.testing.assert_allclose(post.mean("n"), jnp.sum(grid * exact), atol=0.1)
    np.testing.assert_allclose(post.std("n"), jnp.sqrt(jnp.sum(grid**2 * exact) - jnp.sum(grid * exact) ** 2),
                               rtol=0.1)
    assert post.ess / post.num_samples > 0.5


def test_scan_sites_are_laid_out_time_major():
    def model():
        def step(carry, _):
            a = numpyro.sample("a", dist.Normal(carry, 1.0))
            b = numpyro.sample("b", dist.Normal(a, 1.0).expand([2]).to_event(0))
            numpyro.sample("y", dist.Normal(b.sum(), 1.0))
            return a, None

        scan(step, 0.0, None, length=3)

    spec = derive_trace_spec(model, ["y"])
    a, b = spec.latent("a"), spec.latent("b")
    assert (a.scan_length, a.stride, b.stride) == (3, 3, 3)
    np.testing.assert_array_equal(a.positions(), [0, 3, 6])
    np.testing.assert_array_equal(b.positions(), [1, 2, 4, 5, 7, 8])
    tokens, _ = sample_joint(spec, model, jax.random.key(0), 1)
    layout = spec.token_layout()
    np.testing.assert_array_equal(layout["address"], [0, 1, 1] * 3)
    np.testing.assert_array_equal(layout["instance"], [0, 0, 1, 1, 2, 3, 2, 4, 5])
    assert tokens.value.shape == (1, 9, 1)
