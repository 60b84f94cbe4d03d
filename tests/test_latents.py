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
    x = numpyro.sample("x", dist.MultivariateNormal(jnp.zeros(3), COV), infer={"jaxic": {"elementwise": False}})
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
        numpyro.sample("w_joint", dist.Dirichlet(jnp.ones(4)), infer={"jaxic": {"elementwise": False}})
        numpyro.sample("long", dist.Normal(jnp.zeros(20), 1.0).to_event(1))
        numpyro.sample("obs", dist.Normal(0.0, 1.0))

    spec = derive_trace_spec(model, ["obs"])
    heads = {s.name: head_for_site(s, 4) for s in spec.latents}
    assert heads["flag"] == CategoricalHead(2) and heads["hits"] == CategoricalHead(8)
    for name in ("count", "trials", "reads"):
        assert isinstance(heads[name], IntegerMixtureHead), name
    # By default a short vector is proposed element by element; asked to, in one token; a long one in one.
    assert heads["w"] == MixtureHead(1, 4) and spec.latent("w").num_tokens == 3
    assert heads["w_joint"] == MixtureHead(3, 4) and spec.latent("w_joint").num_tokens == 1
    assert heads["long"] == MixtureHead(20, 4) and spec.latent("long").num_tokens == 1


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


# --- one token per element of a vector site ---------------------------------------------------

def elementwise_sites(switch=True):
    with numpyro.plate("pair", 2):
        numpyro.sample("w", dist.Dirichlet(jnp.ones(4)), infer={"jaxic": {"elementwise": True}})
    with numpyro.handlers.mask(mask=switch):
        numpyro.sample("x", dist.MultivariateNormal(jnp.zeros(3), COV), infer={"jaxic": {"elementwise": True}})
    numpyro.sample("v", dist.LogNormal(jnp.zeros(3), 1.0).to_event(1), infer={"jaxic": {"elementwise": False}})
    numpyro.sample("obs", dist.Normal(0.0, 1.0))


def test_elementwise_sites_get_a_token_per_unconstrained_element():
    from jaxic.tracing import trace_to_tokens
    from jaxic.tracing.spec import as_tokens, from_tokens, run_model
    from numpyro.distributions.transforms import biject_to
    spec = derive_trace_spec(elementwise_sites, ["obs"])
    w, x, v = spec.latents
    # A Dirichlet(4) is 3 unconstrained elements, per plate element: 6 tokens of width 1.
    assert (w.num_tokens, w.value_dim, w.elementwise) == (6, 1, True)
    assert (x.num_tokens, x.value_dim) == (3, 1)
    assert (v.num_tokens, v.value_dim, v.elementwise) == (1, 3, False)
    assert spec.num_tokens == 10 and spec.value_dim == 3
    np.testing.assert_array_equal(spec.token_layout()["instance"][:9], [0, 1, 2, 3, 4, 5, 0, 1, 2])
    assert isinstance(head_for_site(w, 8), MixtureHead) and head_for_site(w, 8).dim == 1

    trace = run_model(elementwise_sites, jax.random.key(1))
    tokens, _ = as_tokens(w, trace["w"]["fn"], trace["w"]["value"], 3)
    np.testing.assert_allclose(from_tokens(w, trace["w"]["fn"], tokens), trace["w"]["value"], rtol=1e-5, atol=1e-6)
    # Each event's Jacobian rides on its last token; the sum is the site's.
    transform = biject_to(dist.Dirichlet(jnp.ones(4)).support)
    u = transform.inv(trace["w"]["value"])
    tokens, log_det = trace_to_tokens(spec, trace)[0].value, trace_to_tokens(spec, trace)[0].log_jacobian
    np.testing.assert_allclose(log_det[:6].reshape(2, 3)[:, 2], transform.log_abs_det_jacobian(u, trace["w"]["value"]),
                               rtol=1e-5)
    assert jnp.all(log_det[:6].reshape(2, 3)[:, :2] == 0)
    np.testing.assert_allclose(tokens[:6, 0], u.reshape(-1), rtol=1e-5)
    # A masked vector site masks all of its tokens.
    masked = trace_to_tokens(spec, run_model(lambda: elementwise_sites(False), jax.random.key(1)))[0]
    np.testing.assert_array_equal(masked.mask, [True] * 6 + [False] * 3 + [True])


def test_elementwise_option_must_be_a_boolean():
    def model():
        numpyro.sample("theta", dist.Normal(jnp.zeros(2), 1.0).to_event(1), infer={"jaxic": {"elementwise": "yes"}})
        numpyro.sample("obs", dist.Normal(0.0, 1.0))

    with pytest.raises(jaxic.errors.ModelError, match=r"site 'theta' has infer=.*'elementwise': 'yes'.*True or False"):
        derive_trace_spec(model, ["obs"])

    def typo():
        numpyro.sample("theta", dist.Normal(0.0, 1.0), infer={"jaxic": {"elementwize": True}})
        numpyro.sample("obs", dist.Normal(0.0, 1.0))

    with pytest.raises(jaxic.errors.ModelError, match=r"site 'theta' has unknown jaxic options \['elementwize'\].*'elementwise'"):
        derive_trace_spec(typo, ["obs"])


def neighbour_sum(elementwise=True):
    theta = numpyro.sample("theta", dist.Normal(jnp.zeros(2), 1.0).to_event(1),
                           infer={"jaxic": {"elementwise": elementwise}})
    numpyro.sample("obs", dist.Normal(theta[0] + theta[1], 0.1))


@pytest.mark.slow
@pytest.mark.parametrize("path", ["masked", "universal"])
def test_elementwise_proposal_follows_a_correlated_posterior(path):
    """theta | obs for obs = theta_0 + theta_1 + noise(0.1): correlation -0.99. The second element's
    token sees the first, so raw proposal draws follow the correlation a diagonal head cannot."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = jaxic.compile(neighbour_sum, ["obs"], jax.random.key(0), num_steps=1500 if path == "masked" else 300,
                                 progress=False, validation_size=256, path="auto" if path == "masked" else "universal")
    assert compiled.spec.latent("theta").num_tokens == 2
    precision = jnp.eye(2) + jnp.ones((2, 2)) / 0.01
    cov = jnp.linalg.inv(precision)
    obs = 1.0
    mean = cov @ jnp.full(2, obs / 0.01)
    post = compiled.posterior(jax.random.key(1), {"obs": obs}, 3000 if path == "masked" else 300)
    np.testing.assert_allclose(post.mean("theta"), mean, atol=0.1)
    if path == "masked":
        draws = compiled.sample(jax.random.key(2), {"obs": obs}, 4000)["theta"]
        assert np.corrcoef(np.asarray(draws).T)[0, 1] < -0.9
        np.testing.assert_allclose(np.std(np.asarray(draws), 0), jnp.sqrt(jnp.diag(cov)), rtol=0.25)
        assert post.ess / post.num_samples > 0.3
