"""Shared conformance test: every proposal head must pass all of these."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxic.heads import CategoricalHead, MixtureHead

WIDTH = 3
HEADS = [MixtureHead(1, 1), MixtureHead(1, 4), MixtureHead(2, 3), CategoricalHead(2), CategoricalHead(5)]


def random_params(head, seed=0):
    return 1.5 * jax.random.normal(jax.random.key(seed), (head.num_params,))


def support_grid(head):
    """Points and cell volumes covering (numerically) all of the head's mass."""
    if isinstance(head, CategoricalHead):
        values = jnp.zeros((head.num_categories, WIDTH)).at[:, 0].set(jnp.arange(head.num_categories))
        return values, jnp.ones(head.num_categories)
    axis = jnp.linspace(-10, 10, 2001 if head.dim == 1 else 601)
    cell = (axis[1] - axis[0]) ** head.dim
    mesh = jnp.stack(jnp.meshgrid(*([axis] * head.dim), indexing="ij"), -1).reshape(-1, head.dim)
    return jnp.pad(mesh, ((0, 0), (0, WIDTH - head.dim))), jnp.full(mesh.shape[0], cell)


@pytest.mark.parametrize("head", HEADS, ids=repr)
def test_log_prob_normalises(head):
    params = random_params(head)
    values, volume = support_grid(head)
    total = jnp.sum(jnp.exp(jax.vmap(head.log_prob, (None, 0))(params, values)) * volume)
    np.testing.assert_allclose(total, 1.0, atol=2e-3)


@pytest.mark.parametrize("head", HEADS, ids=repr)
def test_sampling_matches_log_prob(head):
    params = random_params(head, seed=1)
    draws = jax.vmap(head.sample, (0, None, None))(jax.random.split(jax.random.key(2), 40_000), params, WIDTH)
    chex.assert_shape(draws, (40_000, WIDTH))
    values, volume = support_grid(head)
    prob = jnp.exp(jax.vmap(head.log_prob, (None, 0))(params, values)) * volume
    # First and second moments of every used coordinate agree with the density.
    used = 1 if isinstance(head, CategoricalHead) else head.dim
    for d in range(used):
        mean = jnp.sum(prob * values[:, d])
        var = jnp.sum(prob * (values[:, d] - mean) ** 2)
        np.testing.assert_allclose(draws[:, d].mean(), mean, atol=4 * jnp.sqrt(var / 40_000) + 1e-3)
        np.testing.assert_allclose(draws[:, d].var(), var, rtol=0.05, atol=1e-3)
    # Padding stays zero.
    assert jnp.all(draws[:, used:] == 0)


@pytest.mark.parametrize("head", HEADS, ids=repr)
def test_jit_and_vmap_agree_with_eager(head):
    params = jnp.stack([random_params(head, s) for s in range(4)])
    values = jax.vmap(head.sample, (0, 0, None))(jax.random.split(jax.random.key(3), 4), params, WIDTH)
    eager = jnp.stack([head.log_prob(p, v) for p, v in zip(params, values)])
    batched = jax.jit(jax.vmap(head.log_prob))(params, values)
    np.testing.assert_allclose(batched, eager, rtol=1e-5, atol=1e-5)
    chex.assert_shape(jax.vmap(head.features)(values), (4, head.feature_dim))
    assert hash(head) == hash(type(head)(*[getattr(head, f) for f in head.__dataclass_fields__]))


@pytest.mark.parametrize("head", HEADS, ids=repr)
def test_statistics_start_near_the_data(head):
    key = jax.random.key(4)
    if isinstance(head, CategoricalHead):
        index = jax.random.categorical(key, jnp.log(jnp.arange(1.0, head.num_categories + 1)), shape=(5000,))
        values = jnp.zeros((5000, WIDTH)).at[:, 0].set(index)
    else:
        values = jnp.pad(3.0 + 2.0 * jax.random.normal(key, (5000, head.dim)), ((0, 0), (0, WIDTH - head.dim)))
    loc, scale, base = head.statistics(values, jnp.ones(5000, bool))
    chex.assert_shape([loc, scale, base], [(WIDTH,), (WIDTH,), (head.num_params,)])
    z = (values - loc) / scale
    log_q = jax.vmap(head.log_prob, (None, 0))(base, z) - jnp.log(scale).sum()
    if isinstance(head, CategoricalHead):
        freq = jnp.bincount(index, length=head.num_categories) / 5000
        np.testing.assert_allclose(jnp.exp(base - jax.nn.logsumexp(base)), freq, atol=0.01)
    else:
        # The initial proposal is about as good as a Gaussian fit of the data (within 0.3 nats per dim).
        gaussian_nll = head.dim * (0.5 * jnp.log(2 * jnp.pi * 4.0) + 0.5)
        assert -log_q.mean() < gaussian_nll + 0.3 * head.dim
