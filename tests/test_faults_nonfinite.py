"""Non-finite joint draws and data rows never poison training: they are dropped, counted and named."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from flax import nnx

import jaxic
from jaxic import objectives, training
from jaxic.heads import head_for_site
from jaxic.networks import proposal_statistics
from jaxic.tracing import sample_joint

TINY = jaxic.TransformerConfig(d_model=16, num_layers=1, num_heads=2, num_components=2)
NUM_STEPS, BATCH = 300, 64
OBS = 1.6


def faulty(shift=jnp.log):
    """``Normal(log(x + 3), .)`` is NaN for x < -3: 0.13% of the joint draws."""
    x = numpyro.sample("x", dist.Normal(0.0, 1.0))
    u = numpyro.sample("u", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(shift(x + 3.0) + 0.5 * u, 0.5))


def clean_shift(v):
    return jnp.log(jnp.maximum(v, 1e-6))


def exact_posterior_mean_x(y):
    """On a grid: u integrates out analytically, y | x ~ N(log(x + 3), 0.5^2 + 0.5^2), x > -3."""
    x = np.linspace(-2.999, 6.0, 200_001)
    log_w = dist.Normal(0.0, 1.0).log_prob(x) + dist.Normal(np.log(x + 3.0), np.sqrt(0.5)).log_prob(y)
    w = np.exp(np.asarray(log_w) - np.max(np.asarray(log_w)))
    return float(np.sum(w * x) / np.sum(w))


def train(shift):
    """Compile (statistics, validation set), then NUM_STEPS steps of the functional core in one call."""
    compiled = jaxic.compile(faulty, observed=["y"], key=jax.random.key(0), num_steps=0, batch_size=BATCH,
                             model_kwargs={"shift": shift}, network=TINY, progress=False)
    model = lambda: faulty(shift)
    step = training.build_step(compiled.graphdef, compiled.objective, compiled.optimizer, BATCH, model)
    multi = jax.jit(training.build_multi_step(step, NUM_STEPS))
    compiled.state, infos = multi(compiled.state, NUM_STEPS)
    return compiled, infos


@pytest.fixture(scope="module")
def runs():
    return {"faulty": train(jnp.log), "clean": train(clean_shift)}


def test_statistics_ignore_nonfinite_draws():
    spec = jaxic.derive_trace_spec(faulty, ["y"])
    tokens, observations = jax.jit(lambda k: sample_joint(spec, faulty, k, 4096))(jax.random.key(2))
    assert int(jnp.sum(~jnp.isfinite(observations["y"]))) > 0  # the batch does hold NaN draws
    heads = [head_for_site(s, 2) for s in spec.latents]
    stats = proposal_statistics(spec, heads, tokens, observations)
    chex.assert_tree_all_finite((stats.value_loc, stats.value_scale, stats.base_params, stats.obs_loc, stats.obs_scale))
    finite = jnp.isfinite(observations["y"])
    np.testing.assert_allclose(stats.obs_loc["y"], observations["y"][finite].mean(), rtol=1e-5)
    # A site without a single finite draw falls back to loc 0, scale 1.
    nan_tokens = tokens._replace(value=jnp.full_like(tokens.value, jnp.nan))
    stats = proposal_statistics(spec, heads, nan_tokens, {"y": jnp.full_like(observations["y"], jnp.inf)})
    np.testing.assert_array_equal(stats.value_loc, 0.0)
    np.testing.assert_array_equal(stats.value_scale, 1.0)
    assert float(stats.obs_loc["y"][0]) == 0.0 and float(stats.obs_scale["y"][0]) == 1.0


@pytest.mark.slow
def test_training_drops_nonfinite_draws_and_matches_the_clean_model(runs):
    compiled, infos = runs["faulty"]
    clean, clean_infos = runs["clean"]
    chex.assert_tree_all_finite(compiled.statistics)
    dropped = np.asarray(infos.metrics["dropped"])
    assert dropped.sum() > 0 and not np.asarray(infos.skipped).any()
    assert np.isfinite(np.asarray(infos.loss)).all()
    names = objectives.site_names(compiled.spec)
    sites = {objectives.dropped_site_name(compiled.spec, s) for s in np.asarray(infos.metrics["dropped_site"])}
    assert sites == {None, "y"}, (sites, names)  # y is the site whose value is NaN
    assert int(np.asarray(clean_infos.metrics["dropped"]).sum()) == 0
    # Same quality as the model without NaNs.
    assert abs(compiled.validation_loss() - clean.validation_loss()) < 0.05
    exact = exact_posterior_mean_x(OBS)
    for c in (compiled, clean):
        post = c.posterior(jax.random.key(1), {"y": OBS}, num_samples=4000)
        assert abs(float(post.mean("x")) - exact) < 0.05, (float(post.mean("x")), exact)
    # The warning the integrator gives: silent below 1%, naming the site above.
    assert objectives.drop_warning(compiled.spec, dropped, NUM_STEPS * BATCH, infos.metrics["dropped_site"]) is None
    message = objectives.drop_warning(compiled.spec, [50], 1000, [names.index("y")])
    assert "50 of 1000 draws (5.0%)" in message and "site 'y'" in message


@pytest.mark.slow
def test_forward_kl_loss_is_the_mean_over_finite_traces(runs):
    compiled, _ = runs["faulty"]
    spec, network = compiled.spec, compiled.network
    tokens, observations = jax.jit(lambda k: sample_joint(spec, faulty, k, 16))(jax.random.key(5))
    tokens = tokens._replace(value=tokens.value.at[3, 0, 0].set(jnp.nan))  # latent x of trace 3
    observations = {"y": observations["y"].at[7].set(jnp.inf)}
    graphdef, params, rest = nnx.split(network, nnx.Param, ...)
    # Jitted: eager per-op dispatch of the network is slow.
    loss_of = jax.jit(lambda p, t, o: objectives.forward_kl_loss(nnx.merge(graphdef, p, rest), t, o))
    loss, metrics = loss_of(params, tokens, observations)
    keep = np.ones(16, bool)
    keep[[3, 7]] = False
    expected, _ = loss_of(params, jax.tree.map(lambda a: a[keep], tokens), {"y": observations["y"][keep]})
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert int(metrics["dropped"]) == 2
    assert objectives.dropped_site_name(spec, metrics["dropped_site"]) in {"x", "y"}
    # The dropped traces reach the network as zeros: the gradient stays finite too.
    grads = jax.jit(jax.grad(lambda p: loss_of(p, tokens, observations)[0]))(params)
    chex.assert_tree_all_finite(grads)


def test_a_nan_data_row_is_named_at_compile():
    rows = np.linspace(0.5, 2.5, 20).astype(np.float32)
    rows[7] = np.nan
    with pytest.raises(jaxic.ObservationError, match=r"data\['y'\] has non-finite values .* 1 row\(s\): \[7\]"):
        jaxic.compile(faulty, observed=["y"], key=jax.random.key(0), num_steps=0, objective="elbo",
                      data={"y": rows}, network=TINY, progress=False)
    with pytest.raises(jaxic.ObservationError, match=r"data\['img'\] .* 2 row\(s\): \[0, 2\]"):
        objectives.check_data_finite({"img": np.array([[np.inf, 0.0], [1.0, 2.0], [0.0, np.nan]])})
    objectives.check_data_finite({"img": np.ones((3, 2)), "count": np.arange(3)})  # finite: no error


@pytest.mark.parametrize("objective", [objectives.elbo(num_particles=2), objectives.rws(num_particles=4)],
                         ids=lambda o: o.name)
@pytest.mark.slow
def test_data_objectives_drop_nan_rows_with_finite_gradients(runs, objective):
    compiled, _ = runs["clean"]
    data = {"y": jnp.array([jnp.nan, 1.0, 1.5, 2.0])}  # row 0 is NaN; minibatches draw it with replacement
    optimizer = training.guard(training.default_optimizer(10), trains_model=objective.trains_model)
    state = training.init(compiled.state.params, compiled.state.statistics, optimizer, jax.random.key(1),
                          compiled.state.model_params)
    model = lambda: faulty(clean_shift)
    step = jax.jit(training.build_step(compiled.graphdef, objective, optimizer, 16, model))
    state, info = step(state, data)
    assert not bool(info.skipped) and np.isfinite(float(info.loss)) and np.isfinite(float(info.grad_norm))
    assert 0 < int(info.metrics["dropped"]) < 16
    assert objectives.dropped_site_name(compiled.spec, info.metrics["dropped_site"]) == "y"
    chex.assert_tree_all_finite(state.params)


def test_posterior_warns_with_the_count_of_particles_the_model_fails_on(runs):
    compiled = runs["faulty"][0]
    with pytest.warns(UserWarning, match=r"(\d+) of 4000 particles have a NaN model log density") as caught:
        post = compiled.posterior(jax.random.key(3), {"y": jnp.float32(-1.5)}, 4000)  # pulls x towards -3
    failed = int(np.sum(np.asarray(post.samples["x"]) < -3.0))
    assert failed > 0 and f"{failed} of 4000 particles" in str(caught[0].message)
    assert int(np.sum(np.isnan(np.asarray(post.log_joint)))) == failed
    assert float(np.sum(np.asarray(post.weights)[np.asarray(post.samples["x"]) < -3.0])) == 0.0


def test_posterior_names_the_most_affected_observation_set(runs):
    compiled = runs["faulty"][0]
    with pytest.warns(UserWarning, match=r"particles \(observation set 1 of 2, the most affected\)"):
        compiled.posterior(jax.random.key(3), {"y": jnp.array([OBS, -1.5], jnp.float32)}, 4000)


def test_posterior_and_raw_draws_of_a_model_that_never_fails_do_not_warn(runs):
    compiled = runs["clean"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled.posterior(jax.random.key(3), {"y": jnp.float32(-1.5)}, 4000)
        runs["faulty"][0].sample(jax.random.key(3), {"y": jnp.float32(-1.5)}, 4000)  # raw draws carry no weights
