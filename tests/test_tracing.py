import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions.transforms import biject_to

from jaxic.tracing import derive_trace_spec, from_tokens, sample_joint, trace_to_tokens
from jaxic.tracing.spec import run_model


def mixed_model():
    scale = numpyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with numpyro.plate("items", 3):
        z = numpyro.sample("z", dist.Normal(0.0, scale))
        with handlers.mask(mask=jnp.arange(3) < 2):
            numpyro.sample("flag", dist.Bernoulli(0.3))
    numpyro.sample("weights", dist.Dirichlet(jnp.ones(4)), infer={"jaxic": {"elementwise": False}})
    numpyro.sample("level", dist.DiscreteUniform(2, 5))
    numpyro.sample("obs", dist.Normal(z.sum(), 1.0))


def test_spec_layout_tokens_per_plate_element_events_inside_one_token():
    spec = derive_trace_spec(mixed_model, observed=["obs"])
    assert [s.name for s in spec.latents] == ["scale", "z", "flag", "weights", "level"]
    assert [s.num_tokens for s in spec.latents] == [1, 3, 3, 1, 1]
    assert [s.offset for s in spec.latents] == [0, 1, 4, 7, 8]
    assert spec.num_tokens == 9
    # The 4-simplex is 3 unconstrained numbers inside one token; that is the widest site.
    assert spec.latent("weights").unconstrained_event_shape == (3,)
    assert spec.value_dim == 3
    assert spec.latent("level").num_categories == 4 and spec.latent("level").lower == 2
    layout = spec.token_layout()
    np.testing.assert_array_equal(layout["address"], [0, 1, 1, 1, 2, 2, 2, 3, 4])
    np.testing.assert_array_equal(layout["instance"], [0, 0, 1, 2, 0, 1, 2, 0, 0])
    assert spec.observed[0].shape == ()


def test_tokens_hold_unconstrained_values_masks_and_jacobians():
    spec = derive_trace_spec(mixed_model, observed=["obs"])
    trace = run_model(mixed_model, jax.random.key(7))
    tokens, obs = trace_to_tokens(spec, trace)
    chex.assert_shape(tokens.value, (9, 3))
    np.testing.assert_allclose(tokens.value[0, 0], jnp.log(trace["scale"]["value"]), rtol=1e-6)
    np.testing.assert_array_equal(tokens.mask, [1, 1, 1, 1, 1, 1, 0, 1, 1])
    np.testing.assert_allclose(tokens.value[8, 0], trace["level"]["value"] - 2)
    # log|det J| of exp at u is u.
    np.testing.assert_allclose(tokens.log_jacobian[0], tokens.value[0, 0], rtol=1e-6)
    t = biject_to(dist.Dirichlet(jnp.ones(4)).support)
    u = t.inv(trace["weights"]["value"])
    np.testing.assert_allclose(tokens.log_jacobian[7], t.log_abs_det_jacobian(u, t(u)), rtol=1e-5)
    # Round trip back to model values.
    for site in spec.latents:
        span = tokens.value[site.offset: site.offset + site.num_tokens]
        back = from_tokens(site, trace[site.name]["fn"], span)
        np.testing.assert_allclose(back, trace[site.name]["value"], rtol=1e-5, atol=1e-6)
    assert float(obs["obs"]) == float(trace["obs"]["value"])


def test_sample_joint_runs_the_model_once_under_vmap_and_jit():
    calls = []

    def counted():
        calls.append(1)
        mixed_model()

    spec = derive_trace_spec(counted, observed=["obs"])
    calls.clear()
    draw = jax.jit(lambda k: sample_joint(spec, counted, k, 512))
    tokens, obs = draw(jax.random.key(0))
    draw(jax.random.key(1))
    assert len(calls) == 1  # traced once for all 512 traces and both calls
    chex.assert_shape([tokens.value, tokens.mask, obs["obs"]], [(512, 9, 3), (512, 9), (512,)])
    # Different traces really differ, and the masked flag never runs for element 2.
    assert jnp.unique(tokens.value[:, 0, 0]).size > 500
    assert not tokens.mask[:, 6].any() and tokens.mask[:, 4].all()
    # Frequencies follow the prior: Bernoulli(0.3) flags.
    np.testing.assert_allclose(tokens.value[:, 4, 0].mean(), 0.3, atol=0.07)


def test_spec_roundtrips_through_json_and_reports_differences():
    spec = derive_trace_spec(mixed_model, observed=["obs"])
    assert type(spec).from_json(spec.to_json()) == spec

    def other():
        numpyro.sample("scale", dist.LogNormal(0.0, 1.0))
        numpyro.sample("obs", dist.Normal(0.0, 1.0))

    diff = spec.describe_difference(derive_trace_spec(other, observed=["obs"]))
    assert "latent site 'z' is only in the checkpoint" in diff


def _binomial_sites():
    p = numpyro.sample("p", dist.Beta(2.0, 5.0))
    numpyro.sample("k", dist.Binomial(1000, p))
    numpyro.sample("v", dist.Binomial(jnp.array([10, 20, 30]), 0.5).to_event(1))
    with numpyro.plate("n", 4):
        numpyro.sample("w", dist.Binomial(50, logits=jnp.zeros(4)))
    numpyro.sample("obs", dist.Binomial(1000, p), obs=300)


def test_model_runs_draw_binomials_without_numpyros_sampler(monkeypatch):
    # numpyro's sampler, vmapped, never returns for rare draws on CPU (benchmarks/binomial_stall.py).
    def refuse(*args, **kwargs):
        raise AssertionError("numpyro's binomial sampler was called")

    monkeypatch.setattr(numpyro.distributions.discrete, "binomial", refuse)
    draws = jax.jit(jax.vmap(lambda k: {n: s["value"] for n, s in run_model(_binomial_sites, k).items()}))(
        jax.random.split(jax.random.key(0), 20_000))
    reference = handlers.trace(handlers.seed(_binomial_sites, 0)).get_trace  # numpyro's dtypes and shapes
    monkeypatch.undo()
    for name, site in reference().items():
        if site["type"] == "sample":
            assert draws[name].dtype == jnp.asarray(site["value"]).dtype and draws[name].shape[1:] == jnp.shape(site["value"])
    # Binomial(1000, p) given p: mean 1000 p, variance 1000 p (1 - p); z-scores over 20,000 draws.
    k, p = np.asarray(draws["k"], np.float64), np.asarray(draws["p"], np.float64)
    z = (k - 1000 * p) / np.sqrt(1000 * p * (1 - p))
    assert abs(z.mean()) < 4 / np.sqrt(len(z)) and abs(z.var() - 1) < 0.05
    np.testing.assert_allclose(np.asarray(draws["v"]).mean(0), [5, 10, 15], rtol=0.02)
    np.testing.assert_allclose(np.asarray(draws["w"]).mean(), 25, rtol=0.01)
    assert (np.asarray(draws["obs"]) == 300).all()  # observed sites keep their value


def test_posterior_predictive_draws_binomials_without_numpyros_sampler(monkeypatch):
    import jaxic

    def refuse(*args, **kwargs):
        raise AssertionError("numpyro's binomial sampler was called")

    def model():
        p = numpyro.sample("p", dist.Beta(1.0, 1.0))
        numpyro.sample("obs", dist.Binomial(100, p))

    monkeypatch.setattr(numpyro.distributions.discrete, "binomial", refuse)
    post = jaxic.Posterior({"p": jnp.array([0.2, 0.7])}, jnp.log(jnp.array([0.75, 0.25])), jnp.zeros(2), jnp.zeros(2))
    obs = np.asarray(jaxic.predictive(model, post, jax.random.key(0), 20_000)["obs"], np.float64)
    # A mixture of Binomial(100, 0.2) and Binomial(100, 0.7) with weights 3/4, 1/4: mean 32.5.
    assert obs.shape == (20_000,) and abs(obs.mean() - 32.5) < 4 * obs.std() / np.sqrt(obs.size)


def test_observed_sites_are_seen_on_the_scale_of_their_support():
    from jaxic.tracing import ObservedSite, TraceSpec
    from jaxic.tracing.spec import observation_scale

    scale = lambda fn, **infer: observation_scale("obs", {"fn": fn, "infer": infer})
    assert scale(dist.LogNormal(jnp.zeros(3), 1.0).to_event(1)) == "log"
    assert scale(dist.Gamma(2.0, 1.0)) == "log"
    assert scale(dist.Beta(2.0, 2.0)) == "logit"
    for linear in (dist.Normal(0.0, 1.0), dist.Poisson(3.0), dist.Binomial(10, 0.5), dist.Uniform(0.0, 5.0)):
        assert scale(linear) == "linear"
    assert scale(dist.Gamma(2.0, 1.0), jaxic={"scale": "linear"}) == "linear"  # the site's own choice wins
    np.testing.assert_allclose(ObservedSite("o", (3,), "log").features(jnp.array([1.0, 10.0, 0.0])),
                               [0.0, np.log(10.0), np.log(np.finfo(np.float32).tiny)], rtol=1e-6)
    np.testing.assert_allclose(ObservedSite("o", (2,), "logit").features(jnp.array([0.5, 0.75])), [0.0, np.log(3.0)],
                               rtol=1e-6)
    assert np.isfinite(ObservedSite("o", (2,), "logit").features(jnp.array([0.0, 1.0]))).all()

    def model():
        x = numpyro.sample("x", dist.Normal(0.0, 1.0))
        numpyro.sample("counts", dist.Poisson(jnp.exp(x)))
        numpyro.sample("sizes", dist.LogNormal(x, 2.0).expand([4]).to_event(1))

    spec = derive_trace_spec(model, ["counts", "sizes"])
    assert [(o.name, o.scale) for o in spec.observed] == [("counts", "linear"), ("sizes", "log")]
    assert TraceSpec.from_json(spec.to_json()) == spec
    old = json.loads(spec.to_json())  # a spec saved before observations had a scale
    for o in old["observed"]:
        del o["scale"]
    assert [o.scale for o in TraceSpec.from_json(json.dumps(old)).observed] == ["linear", "linear"]


def test_observation_moments_are_taken_on_the_sites_scale():
    from jaxic.heads import head_for_site
    from jaxic.networks import proposal_statistics

    def model():
        x = numpyro.sample("x", dist.Normal(0.0, 1.0))
        numpyro.sample("sizes", dist.LogNormal(x, 2.0).expand([3]).to_event(1))

    spec = derive_trace_spec(model, ["sizes"])
    tokens, observations = sample_joint(spec, model, jax.random.key(0), 8192)
    stats = proposal_statistics(spec, [head_for_site(s, 4) for s in spec.latents], tokens, observations)
    # log sizes ~ N(0, 1 + 4): moments of the log, not of values spanning orders of magnitude.
    np.testing.assert_allclose(np.asarray(stats.obs_loc["sizes"]), 0.0, atol=0.15)
    np.testing.assert_allclose(np.asarray(stats.obs_scale["sizes"]), np.sqrt(5.0), rtol=0.1)


def test_a_checkpoints_observation_scale_is_not_a_model_difference():
    import dataclasses
    from jaxic.tracing import ObservedSite

    def model():
        x = numpyro.sample("x", dist.Normal(0.0, 1.0))
        numpyro.sample("sizes", dist.LogNormal(x, 2.0))

    spec = derive_trace_spec(model, ["sizes"])
    saved_before_scales = dataclasses.replace(spec, observed=(ObservedSite("sizes", ()),))
    assert spec.observed[0].scale == "log" and saved_before_scales.describe_difference(spec) == ""
    renamed = dataclasses.replace(spec, observed=(ObservedSite("other", (), "log"),))
    assert "observed sites differ" in renamed.describe_difference(spec)
