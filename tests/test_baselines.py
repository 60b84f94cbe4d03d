"""The baseline proposals (pyprob-style LSTM, feed-forward): same protocol and guarantees as the transformer."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from flax import nnx
from numpyro import handlers

import jaxic
from jaxic.heads import head_for_site
from jaxic.models import gaussian_unknown_mean, gaussian_unknown_mean_posterior, pedagogical
from jaxic.networks import NETWORKS, LSTMConfig, ProposalStatistics
from jaxic.tracing import derive_trace_spec, trace_to_tokens

# Default sizes throughout: networks of equal sizes share XLA compilations, which dominate the run time.
NAMES = ["lstm", "feedforward"]


def masked_model():
    n = numpyro.sample("n", dist.Categorical(jnp.ones(3) / 3))
    with numpyro.plate("objects", 3):
        with handlers.mask(mask=jnp.arange(3) <= n):
            size = numpyro.sample("size", dist.LogNormal(0.0, 1.0))
    total = jnp.sum(jnp.where(jnp.arange(3) <= n, size, 0.0))
    numpyro.sample("obs", dist.Normal(total, 0.5))


@pytest.fixture(scope="module")
def trained():
    """The LSTM on the pedagogical model (M=4), trained 100 steps."""
    return jaxic.compile(pedagogical, observed=["obs"], key=jax.random.key(0), num_steps=100, model_kwargs={"M": 4},
                         network="lstm", progress=False, validation_size=64)


@pytest.fixture(scope="module", params=NAMES)
def masked(request):
    """An untrained network on a model whose sites execute or not at random (tokens: n, size[0..2])."""
    return request.param, jaxic.compile(masked_model, observed=["obs"], key=jax.random.key(0), num_steps=0,
                                        network=request.param, progress=False, validation_size=64)


def pick(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def teacher_forced_decode(net, obs, tokens):
    """log q of each token from token-by-token decoding with the trace's values given."""
    def step(state, inputs):
        key, address, instance, dist_type, mask, value = inputs
        state, _, log_q = net.decode(state, key, address, instance, dist_type, mask, given=value)
        return state, log_q

    keys = jax.random.split(jax.random.key(0), tokens.mask.shape[0])
    _, log_q = jax.lax.scan(step, net.init_decode(obs), (keys, tokens.address, tokens.instance, tokens.dist_type,
                                                         tokens.mask, tokens.value))
    return jnp.where(tokens.mask, log_q - tokens.log_jacobian, 0.0)


def check_decoding_matches_the_whole_trace(compiled, model, num_particles=8):
    net = compiled.network
    tokens, observations = compiled.validation
    # Teacher forcing over whole traces (batched and jitted, as training runs it) against step-by-step decoding.
    full = jax.jit(jax.vmap(net.log_prob))(observations, tokens)
    stepped = jax.jit(jax.vmap(lambda o, t: teacher_forced_decode(net, o, t)))(observations, tokens)
    np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5)
    # Particles drawn by the sampler are scored by log_prob as the sampler scored them.
    obs = pick(observations, 3)
    post = compiled.posterior(jax.random.key(5), obs, num_samples=num_particles)

    def score(latents):
        trace = handlers.trace(handlers.substitute(handlers.seed(model, 0), data={**latents, **obs})).get_trace()
        return net.log_prob(obs, trace_to_tokens(compiled.spec, trace)[0]).sum()

    np.testing.assert_allclose(jax.jit(jax.vmap(score))(post.samples), post.log_proposal, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_lstm_decoding_matches_the_whole_trace(trained):
    check_decoding_matches_the_whole_trace(trained, functools.partial(pedagogical, M=4), num_particles=200)


@pytest.mark.slow
def test_decoding_matches_the_whole_trace_with_skipped_sites(masked):
    _, compiled = masked
    check_decoding_matches_the_whole_trace(compiled, masked_model)


@pytest.mark.slow
def test_names_select_the_baselines(masked):
    name, compiled = masked
    assert type(compiled.network_config) is NETWORKS[name]
    # Checkpoints record the config as JSON and rebuild it by name.
    config = json.loads(json.dumps(dataclasses.asdict(compiled.network_config)))
    assert NETWORKS[name](**config) == compiled.network_config
    with pytest.raises(jaxic.JaxicError, match="'feedforward', 'lstm', 'transformer'"):
        jaxic.compile(masked_model, observed=["obs"], key=jax.random.key(0), num_steps=0, network="rnn")


def test_decoding_a_skipped_token_leaves_the_state_as_it_was(masked):
    """The baselines carry no per-position cache: a skipped token changes nothing at all (that it is invisible
    to every network's log q is checked in test_network_conformance.py)."""
    _, compiled = masked
    net = compiled.network
    tokens, observations = compiled.validation
    tokens, obs = pick(tokens, 0), pick(observations, 0)

    @jax.jit
    def skip(obs, tokens):
        state = net.init_decode(obs)
        return state, net.decode(state, jax.random.key(0), tokens.address[1], tokens.instance[1],
                                 tokens.dist_type[1], False, given=tokens.value[1])[0]

    jax.tree.map(np.testing.assert_array_equal, *skip(obs, tokens))


@pytest.mark.parametrize("masked", ["feedforward"], indirect=True)
def test_feedforward_ignores_earlier_latents(masked):
    _, compiled = masked
    tokens, observations = compiled.validation
    i = int(np.flatnonzero(np.asarray(tokens.mask).all(1))[0])  # every site ran
    tokens, obs = pick(tokens, i), pick(observations, i)
    log_prob = jax.jit(compiled.network.log_prob)
    base = log_prob(obs, tokens)
    for t, new in [(0, (tokens.value[0, 0] + 1) % 3), (1, tokens.value[1, 0] + 3.0), (2, tokens.value[2, 0] + 3.0)]:
        log_q = log_prob(obs, tokens._replace(value=tokens.value.at[t, 0].set(new)))
        assert log_q[t] != base[t]
        np.testing.assert_array_equal(np.delete(log_q, t), np.delete(base, t))
    assert not np.allclose(log_prob({"obs": obs["obs"] + 5.0}, tokens), base)


@pytest.mark.slow
def test_lstm_conditions_on_earlier_latents_and_the_observation(trained):
    """Unlike the feed-forward baseline, every later proposal sees a changed latent (that nothing earlier
    does is checked for every network in test_network_conformance.py)."""
    net = trained.network
    tokens, observations = trained.validation
    tokens, obs = pick(tokens, 0), pick(observations, 0)
    log_prob = jax.jit(net.log_prob)
    base = log_prob(obs, tokens)
    for t in range(tokens.value.shape[0] - 1):
        log_q = log_prob(obs, tokens._replace(value=tokens.value.at[t, 0].add(3.0)))
        assert not np.allclose(log_q[t + 1:], base[t + 1:]), t
    assert not np.allclose(log_prob({"obs": obs["obs"] + 50.0}, tokens), base)


@pytest.mark.slow
def test_lstm_trains_and_infers(trained):
    loss = np.asarray(trained.history["loss"])
    assert loss[-20:].mean() < loss[:20].mean() - 0.3, (loss[:20].mean(), loss[-20:].mean())
    assert trained.history["validation_loss"][-1] < trained.history["validation_loss"][0]
    post = trained.posterior(jax.random.key(5), {"obs": 25.0}, num_samples=200)  # compiled by the decode test
    assert post.samples["y"].shape == (200,) and np.isfinite(float(post.ess)) and float(post.ess) > 1.0


@pytest.mark.slow
def test_save_and_load_reproduce_the_proposal(trained, tmp_path):
    trained.save(tmp_path / "ckpt")
    again = jaxic.load(tmp_path / "ckpt", pedagogical, model_kwargs={"M": 4})
    assert again.network_config == trained.network_config and again.step == trained.step
    tokens, observations = trained.validation
    log_prob = lambda compiled: jax.jit(jax.vmap(compiled.network.log_prob))(observations, tokens)
    np.testing.assert_array_equal(log_prob(again), log_prob(trained))


@pytest.mark.slow
def test_lstm_recovers_the_gaussian_posterior_mean():
    compiled = jaxic.compile(gaussian_unknown_mean, observed=["obs"], key=jax.random.key(0), num_steps=100,
                             network="lstm", progress=False, validation_size=64)
    obs = jnp.array([[2.0, 3.0], [-1.0, 0.5]])
    post = compiled.posterior(jax.random.key(1), {"obs": obs}, num_samples=2000)
    mean, sd = gaussian_unknown_mean_posterior(obs)
    np.testing.assert_allclose(post.mean("mu"), mean, atol=0.1 * sd)
    assert jnp.all(post.ess / post.num_samples > 0.9), post.ess


def test_pyprob_sized_lstm_has_pyprobs_parameter_count():
    spec = derive_trace_spec(functools.partial(pedagogical, M=20), ["obs"])
    config = LSTMConfig.pyprob_default()
    num_params = max(head_for_site(s, config.num_components).num_params for s in spec.latents)
    # Shapes only: nothing is sampled or initialised.
    zeros = lambda *shape: jnp.zeros(shape)
    stats = ProposalStatistics(zeros(len(spec.latents), spec.value_dim), zeros(len(spec.latents), spec.value_dim),
                               zeros(len(spec.latents), num_params), {"obs": zeros(1)}, {"obs": zeros(1)})
    net = nnx.eval_shape(lambda: config.build(spec, stats, nnx.Rngs(0)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(net, nnx.Param)))
    assert 2.3e6 < count < 2.9e6, count
