"""The transformer proposal: what it conditions on, and the sampler scoring as log_prob does (the generic
protocol checks, causality and masking included, are in test_network_conformance.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers

import jaxic
from jaxic.models import pedagogical
from jaxic.tracing import trace_to_tokens

# Every test here needs a trained or compiled network: the slow tier.
pytestmark = pytest.mark.slow


def masked_model():
    n = numpyro.sample("n", dist.Categorical(jnp.ones(3) / 3))
    with numpyro.plate("objects", 3):
        with handlers.mask(mask=jnp.arange(3) <= n):
            size = numpyro.sample("size", dist.LogNormal(0.0, 1.0))
    total = jnp.sum(jnp.where(jnp.arange(3) <= n, size, 0.0))
    numpyro.sample("obs", dist.Normal(total, 0.5))


@pytest.fixture(scope="module")
def compiled():
    return jaxic.compile(pedagogical, observed=["obs"], key=jax.random.key(0), num_steps=30,
                         model_kwargs={"M": 4}, progress=False)


@pytest.fixture(scope="module")
def compiled_masked():
    return jaxic.compile(masked_model, observed=["obs"], key=jax.random.key(0), num_steps=30, progress=False)


def one_trace(compiled, i=0):
    tokens, obs = compiled.validation
    return jax.tree.map(lambda a: a[i], tokens), jax.tree.map(lambda a: a[i], obs)


def test_every_later_proposal_sees_a_changed_latent(compiled):
    """The transformer conditions on x_<t (that it conditions on nothing later is checked for every network
    in test_network_conformance.py)."""
    net = compiled.network
    tokens, obs = one_trace(compiled)
    base = net.log_prob(obs, tokens)
    for t in range(tokens.value.shape[0] - 1):
        changed = tokens._replace(value=tokens.value.at[t, 0].add(3.0))
        assert not np.allclose(net.log_prob(obs, changed)[t + 1:], base[t + 1:]), t


def test_a_zero_value_gain_hides_that_sites_values_from_later_tokens(compiled):
    """The per-address value gain is how the transformer learns to ignore a site's value (the
    pedagogical model's nuisance sites) without needing near-one-hot attention."""
    net = compiled.network
    tokens, obs = one_trace(compiled)
    nuisance = compiled.spec.address_of("nuisance_1")
    t = int(np.flatnonzero(np.asarray(tokens.address) == nuisance)[0])
    changed = tokens._replace(value=tokens.value.at[t, 0].add(3.0))
    base = net.log_prob(obs, tokens)
    assert not np.allclose(net.log_prob(obs, changed)[t + 1:], base[t + 1:])
    gain = net.value_gain[...]
    try:
        net.value_gain[...] = gain.at[nuisance].set(0.0)
        hidden, hidden_changed = net.log_prob(obs, tokens), net.log_prob(obs, changed)
    finally:
        net.value_gain[...] = gain
    np.testing.assert_allclose(hidden_changed[t + 1:], hidden[t + 1:], rtol=1e-6, atol=1e-6)


def test_proposal_depends_on_the_observation(compiled):
    net = compiled.network
    tokens, obs = one_trace(compiled)
    assert not np.allclose(net.log_prob({"obs": obs["obs"] + 50.0}, tokens), net.log_prob(obs, tokens))


@pytest.mark.parametrize("which", ["compiled", "compiled_masked"])
def test_incremental_decoding_matches_the_full_sequence(which, request):
    compiled = request.getfixturevalue(which)
    net = compiled.network
    _, obs = one_trace(compiled, 3)
    result = jaxic.importance_sample(compiled.proposal, None, jax.random.key(5), obs, 6)
    for i in range(6):
        latents = {k: v[i] for k, v in result.samples.items()}
        trace = handlers.trace(handlers.substitute(handlers.seed(compiled.bound_model, 0), data={**latents, **obs}))
        tokens, _ = trace_to_tokens(compiled.spec, trace.get_trace())
        np.testing.assert_allclose(net.log_prob(obs, tokens).sum(), result.log_proposal[i], rtol=1e-5, atol=1e-4)
