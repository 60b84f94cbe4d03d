"""The arth150 Gaussian network: packaged data, the model against its exact joint, the exact
posterior and evidence against independent formulas, and compilation with jaxic."""

import functools
import json
import math
from importlib import resources

import jax
import numpy as np
import pytest
from numpyro import handlers
from numpyro.infer.util import log_density
from scipy.stats import multivariate_normal

import jaxic
from jaxic.models import (arth150, arth150_joint, arth150_layout, arth150_log_evidence, arth150_posterior,
                          exact_posterior_log_prob, exact_posterior_samples, gaussian_fit, kl_gaussian, load_arth150,
                          simulate_arth150, stack_sites, unstack_sites)

VARIANTS = ("leaves", "leaves40")


def packaged_json():
    return json.loads(resources.files("jaxic.models").joinpath("data/arth150.json").read_text())


def precision_form(variant, y):
    """Posterior by the sparse precision (I - B)^T D^-2 (I - B), never forming the joint covariance."""
    net, layout = load_arth150(), arth150_layout(variant)
    lower = np.eye(net.num_nodes) - net.weight_matrix
    precision = lower.T @ np.diag(net.residual_sds**-2) @ lower
    mean = np.linalg.solve(lower, net.intercepts)
    lat, obs = layout.latent, layout.observed
    post_cov = np.linalg.inv(precision[np.ix_(lat, lat)])
    post_mean = mean[lat] - (y - mean[obs]) @ (post_cov @ precision[np.ix_(lat, obs)]).T
    return post_mean, post_cov


def test_packaged_data_is_the_arth150_network():
    data, net = packaged_json(), load_arth150()
    children = {int(p) for parents in net.parents for p in parents}
    assert net.num_nodes == data["n_nodes"] == 107
    assert sum(len(p) for p in net.parents) == data["n_arcs"] == 150
    assert all(len(p) == len(c) for p, c in zip(net.parents, net.coefficients))
    assert all((p < i).all() for i, p in enumerate(net.parents))  # topological order
    assert list(net.leaves) == sorted(set(range(107)) - children) and len(net.leaves) == data["n_leaves"] == 67
    assert list(net.roots) == [i for i, p in enumerate(net.parents) if len(p) == 0] and len(net.roots) == 7
    np.testing.assert_allclose(net.residual_sds**2, [n["residual_variance"] for n in data["nodes"]], rtol=1e-12)
    for text in ("bnlearn", "Scutari", "Opgen-Rhein", "BMC Systems Biology 1:37", "pgmpy 1.1.2", "MIT"):
        assert text in net.citation
    assert "sha256_of_source_file" in data["source"]


def test_layouts_and_model_sites():
    net = load_arth150()
    for variant, num_observed in (("leaves", 67), ("leaves40", 40)):
        layout = arth150_layout(variant)
        assert list(layout.observed) == list(net.leaves[:num_observed])
        assert len(layout.latent) == 107 - num_observed
        assert sorted(np.concatenate([layout.latent, layout.observed])) == list(range(107))
        trace = handlers.trace(handlers.seed(arth150, 0)).get_trace(variant=variant)
        assert list(trace) == [*layout.latent_sites, "expression"]
        assert trace["expression"]["value"].shape == (num_observed,)
        assert trace["expression"]["fn"].event_shape == (num_observed,)
        x = np.arange(3 * len(layout.latent), dtype=float).reshape(3, -1)
        np.testing.assert_array_equal(stack_sites(variant, unstack_sites(variant, x)), x)
    assert len(arth150_layout("leaves").latent) == 40
    with pytest.raises(ValueError):
        arth150_layout("roots")
    with pytest.raises(ValueError):
        arth150_posterior("leaves", np.zeros(40))


def test_joint_matches_the_model_density_and_monte_carlo():
    mean, cov = arth150_joint()
    layout = arth150_layout("leaves")
    order = np.concatenate([layout.latent, layout.observed])  # the model's order of values

    # The model's log joint is the Gaussian's log density, exactly (up to float32).
    points = mean + np.random.default_rng(0).normal(size=(3, 107)) @ np.linalg.cholesky(cov).T
    for x in points:
        values = unstack_sites("leaves", x[layout.latent]) | {"expression": x[layout.observed]}
        model_log_p = float(log_density(arth150, (), {"variant": "leaves"}, values)[0])
        np.testing.assert_allclose(model_log_p, multivariate_normal(mean, cov).logpdf(x), atol=2e-3)

    # Ancestral draws of the model (vmapped, unjitted: op-by-op over the batch compiles nothing big).
    n = 20_000
    samples = jax.vmap(lambda key: {name: site["value"] for name, site in
                                    handlers.trace(handlers.seed(arth150, key)).get_trace().items()})(
        jax.random.split(jax.random.key(0), n))
    x = np.empty((n, 107))
    x[:, order] = np.concatenate([stack_sites("leaves", samples), samples["expression"]], -1)
    sd = np.sqrt(np.diag(cov))
    np.testing.assert_allclose((x.mean(0) - mean) / sd, 0.0, atol=5 / math.sqrt(n))
    sample_cov = np.cov(x, rowvar=False)
    np.testing.assert_allclose(np.diag(sample_cov) / sd**2, 1.0, atol=5 * math.sqrt(2 / n))
    np.testing.assert_allclose(sample_cov / np.outer(sd, sd), cov / np.outer(sd, sd), atol=6 / math.sqrt(n))


@pytest.mark.parametrize("variant", VARIANTS)
def test_posterior_and_evidence_match_independent_formulas(variant):
    layout = arth150_layout(variant)
    latents, observed = simulate_arth150(jax.random.key(1), variant, 4)
    mean, cov = arth150_posterior(variant, observed)
    assert mean.shape == (4, len(layout.latent)) and cov.shape == (len(layout.latent),) * 2
    for y, m in zip(observed, mean):
        precision_mean, precision_cov = precision_form(variant, y)
        np.testing.assert_allclose(m, precision_mean, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(cov, precision_cov, rtol=1e-8, atol=1e-11)
        np.testing.assert_allclose(arth150_posterior(variant, y)[0], m, rtol=1e-12)

    joint_mean, joint_cov = arth150_joint()
    marginal = multivariate_normal(joint_mean[layout.observed], joint_cov[np.ix_(layout.observed, layout.observed)])
    log_evidence = arth150_log_evidence(variant, observed)
    np.testing.assert_allclose(log_evidence, marginal.logpdf(observed), rtol=1e-10)
    np.testing.assert_allclose(arth150_log_evidence(variant, observed[0]), log_evidence[0], rtol=1e-12)

    # Bayes' rule on the model's own log joint: log p(y) = log p(x, y) - log p(x | y), for any x.
    x = exact_posterior_samples(variant, observed[0], jax.random.key(2), 2)
    np.testing.assert_allclose(exact_posterior_log_prob(variant, observed[0], x),
                               multivariate_normal(mean[0], cov).logpdf(x), rtol=1e-10)
    for xi in list(x) + [latents[0]]:
        values = unstack_sites(variant, xi) | {"expression": observed[0]}
        log_joint = float(log_density(arth150, (), {"variant": variant}, values)[0])
        np.testing.assert_allclose(log_joint - exact_posterior_log_prob(variant, observed[0], xi), log_evidence[0],
                                   atol=2e-3)


def test_exact_posterior_samples_and_simulation_have_the_right_moments():
    n = 20_000
    latents, observed = simulate_arth150(jax.random.key(3), "leaves40", 3)
    assert latents.shape == (3, 67) and observed.shape == (3, 40)
    draws = exact_posterior_samples("leaves40", observed, jax.random.key(4), n)
    assert draws.shape == (3, n, 67)
    mean, cov = arth150_posterior("leaves40", observed)
    sd = np.sqrt(np.diag(cov))
    np.testing.assert_allclose((draws.mean(1) - mean) / sd, 0.0, atol=5 / math.sqrt(n))
    np.testing.assert_allclose(np.cov(draws[1], rowvar=False) / np.outer(sd, sd), cov / np.outer(sd, sd),
                               atol=6 / math.sqrt(n))
    assert exact_posterior_log_prob("leaves40", observed, draws[:, :5]).shape == (3, 5)

    joint_mean, joint_cov = arth150_joint()
    layout = arth150_layout("leaves40")
    latents, observed = simulate_arth150(jax.random.key(5), "leaves40", n)
    joint_sd = np.sqrt(np.diag(joint_cov))
    np.testing.assert_allclose((latents.mean(0) - joint_mean[layout.latent]) / joint_sd[layout.latent], 0.0,
                               atol=5 / math.sqrt(n))
    np.testing.assert_allclose(observed.std(0) / joint_sd[layout.observed], 1.0, atol=5 * math.sqrt(0.5 / n))


def test_kl_gaussian_and_gaussian_fit():
    rng = np.random.default_rng(0)
    root = rng.normal(size=(5, 5))
    cov, mean = root @ root.T + np.eye(5), rng.normal(size=5)
    assert abs(kl_gaussian(mean, cov, mean, cov)) < 1e-10
    # KL(N(0, 1) || N(1, 2^2)) = log 2 + (1 + 1) / 8 - 1/2; independent dimensions add up.
    one_d = math.log(2.0) + 2.0 / 8.0 - 0.5
    np.testing.assert_allclose(kl_gaussian([0.0], [[1.0]], [1.0], [[4.0]]), one_d, rtol=1e-12)
    np.testing.assert_allclose(kl_gaussian(np.zeros(3), np.eye(3), np.ones(3), 4 * np.eye(3)), 3 * one_d, rtol=1e-12)
    other = rng.normal(size=(5, 5))
    cov_q, mean_q = other @ other.T + np.eye(5), rng.normal(size=5)
    brute = 0.5 * (np.trace(np.linalg.solve(cov_q, cov)) + (mean_q - mean) @ np.linalg.solve(cov_q, mean_q - mean)
                   - 5 + np.linalg.slogdet(cov_q)[1] - np.linalg.slogdet(cov)[1])
    np.testing.assert_allclose(kl_gaussian(mean, cov, mean_q, cov_q), brute, rtol=1e-10)

    x = rng.normal(size=(50, 3))
    fit_mean, fit_cov = gaussian_fit(x)
    np.testing.assert_allclose(fit_cov, np.cov(x, rowvar=False), rtol=1e-12)
    weights = np.r_[np.ones(20), np.zeros(30)] * 7.0  # unnormalised: only the first 20 draws count
    weighted_mean, weighted_cov = gaussian_fit(x, weights)
    np.testing.assert_allclose(weighted_mean, x[:20].mean(0), rtol=1e-12)
    np.testing.assert_allclose(weighted_cov, np.cov(x[:20], rowvar=False, ddof=0), rtol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_trace_spec_has_one_token_per_latent_node(variant):
    layout = arth150_layout(variant)
    spec = jaxic.derive_trace_spec(functools.partial(arth150, variant=variant), ["expression"])
    assert [s.name for s in spec.latents] == list(layout.latent_sites) and spec.num_tokens == len(layout.latent)
    assert all(s.propose and s.dist_type == "Normal" and s.event_shape == () for s in spec.latents)
    assert [(o.name, o.shape) for o in spec.observed] == [("expression", (len(layout.observed),))]
