"""Shared conformance test: every proposal head must pass all of these."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

from jaxic.heads import CategoricalHead, IntegerMixtureHead, MixtureHead

WIDTH = 3
HEADS = [MixtureHead(1, 1), MixtureHead(1, 2), MixtureHead(1, 4), MixtureHead(2, 3), CategoricalHead(2), CategoricalHead(5),
         IntegerMixtureHead(1), IntegerMixtureHead(4)]
DISCRETE = (CategoricalHead, IntegerMixtureHead)
MAX_COUNT = 3000  # the random test parameters put all but a negligible mass below this


def random_params(head, seed=0):
    params = 1.5 * jax.random.normal(jax.random.key(seed), (head.num_params,))
    if isinstance(head, IntegerMixtureHead):  # means around e^2, modest overdispersion: the grid holds the mass
        params = params.at[head.num_components: 2 * head.num_components].add(2.0)
        params = params.at[2 * head.num_components:].add(2.0)
    return params


def support_grid(head):
    """Points and cell volumes covering (numerically) all of the head's mass."""
    if isinstance(head, CategoricalHead):
        values = jnp.zeros((head.num_categories, WIDTH)).at[:, 0].set(jnp.arange(head.num_categories))
        return values, jnp.ones(head.num_categories)
    if isinstance(head, IntegerMixtureHead):
        values = jnp.zeros((MAX_COUNT, WIDTH)).at[:, 0].set(jnp.arange(MAX_COUNT))
        return values, jnp.ones(MAX_COUNT)
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


@pytest.mark.slow
@pytest.mark.parametrize("head", HEADS, ids=repr)
def test_sampling_matches_log_prob(head):
    params = random_params(head, seed=1)
    draws = jax.vmap(head.sample, (0, None, None))(jax.random.split(jax.random.key(2), 40_000), params, WIDTH)
    chex.assert_shape(draws, (40_000, WIDTH))
    values, volume = support_grid(head)
    prob = jnp.exp(jax.vmap(head.log_prob, (None, 0))(params, values)) * volume
    # First and second moments of every used coordinate agree with the density.
    used = 1 if isinstance(head, DISCRETE) else head.dim
    for d in range(used):
        mean = jnp.sum(prob * values[:, d])
        var = jnp.sum(prob * (values[:, d] - mean) ** 2)
        np.testing.assert_allclose(draws[:, d].mean(), mean, atol=4 * jnp.sqrt(var / 40_000) + 1e-3)
        np.testing.assert_allclose(draws[:, d].var(), var, rtol=0.05, atol=1e-3)
    # Padding stays zero.
    assert jnp.all(draws[:, used:] == 0)


@pytest.mark.slow
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
    elif isinstance(head, IntegerMixtureHead):
        counts = dist.NegativeBinomial2(12.0, 3.0).sample(key, (5000,)).astype(jnp.float32)
        values = jnp.zeros((5000, WIDTH)).at[:, 0].set(counts)
    else:
        values = jnp.pad(3.0 + 2.0 * jax.random.normal(key, (5000, head.dim)), ((0, 0), (0, WIDTH - head.dim)))
    loc, scale, base = head.statistics(values, jnp.ones(5000, bool))
    chex.assert_shape([loc, scale, base], [(WIDTH,), (WIDTH,), (head.num_params,)])
    z = (values - loc) / scale
    log_q = jax.vmap(head.log_prob, (None, 0))(base, z) - jnp.log(scale).sum()
    if isinstance(head, CategoricalHead):
        freq = jnp.bincount(index, length=head.num_categories) / 5000
        np.testing.assert_allclose(jnp.exp(base - jax.nn.logsumexp(base)), freq, atol=0.01)
    elif isinstance(head, IntegerMixtureHead):
        # The initial proposal is about as good as the true negative binomial (within 0.1 nats).
        exact_nll = -dist.NegativeBinomial2(12.0, 3.0).log_prob(counts).mean()
        assert -log_q.mean() < exact_nll + 0.1
    else:
        # The initial proposal is about as good as a Gaussian fit of the data (within 0.3 nats per dim).
        gaussian_nll = head.dim * (0.5 * jnp.log(2 * jnp.pi * 4.0) + 0.5)
        assert -log_q.mean() < gaussian_nll + 0.3 * head.dim


@pytest.mark.slow
def test_integer_head_proposes_non_negative_integers_and_handles_large_counts():
    head = IntegerMixtureHead(4)
    params = 0.5 * random_params(head, seed=5)  # components wide enough for the grid to resolve
    draws = jax.vmap(head.sample, (0, None, None))(jax.random.split(jax.random.key(6), 5000), params, 1)[:, 0]
    assert jnp.all(draws >= 0) and jnp.all(draws == jnp.round(draws))
    # Fitted to counts around 500, scores stay finite and so do their gradients.
    counts = dist.Poisson(500.0).sample(jax.random.key(7), (2000,)).astype(jnp.float32)
    values = jnp.zeros((2000, 1)).at[:, 0].set(counts)
    _, _, base = head.statistics(values, jnp.ones(2000, bool))
    log_q = jax.vmap(head.log_prob, (None, 0))(base, values)
    assert jnp.all(jnp.isfinite(log_q)) and -log_q.mean() < -dist.Poisson(500.0).log_prob(counts).mean() + 0.1
    grad = jax.grad(lambda p: jax.vmap(head.log_prob, (None, 0))(p, values).mean())(base)
    assert jnp.all(jnp.isfinite(grad))
    # Off-support inputs are rounded onto the support rather than producing NaNs.
    np.testing.assert_allclose(head.log_prob(base, jnp.array([-3.0])), head.log_prob(base, jnp.array([0.0])))


@pytest.mark.slow
@pytest.mark.parametrize("head", [h for h in HEADS if not isinstance(h, DISCRETE)], ids=repr)
def test_continuous_samples_are_reparameterised_in_every_parameter(head):
    """The ELBO's pathwise gradient: d/dθ E_q[f(z)] through the draws equals the exact
    derivative of the density-weighted integral (mixture weights included)."""
    params = 0.5 * random_params(head, seed=5)  # components wide enough for the grid to resolve
    f = lambda z: jnp.sum(jnp.sin(z[: head.dim]) + 0.5 * z[: head.dim] ** 2)
    keys = jax.random.split(jax.random.key(6), 100_000)
    pathwise = jax.grad(lambda p: jnp.mean(jax.vmap(lambda k: f(head.sample(k, p, WIDTH)))(keys)))(params)
    values, volume = support_grid(head)
    exact = jax.grad(lambda p: jnp.sum(jnp.exp(jax.vmap(head.log_prob, (None, 0))(p, values))
                                       * jax.vmap(f)(values) * volume))(params)
    np.testing.assert_allclose(pathwise, exact, atol=0.03 * float(jnp.abs(exact).max()) + 0.01)


@pytest.mark.parametrize("head", HEADS, ids=repr)
def test_widen_keeps_the_family_and_spreads_it(head):
    """The defensive component: factor 1 is the head itself; a wider one is a normalised member of
    the family, nowhere much less likely, that gains mass where the head has least (bounding the weights there)."""
    params = random_params(head, seed=8)
    if not isinstance(head, DISCRETE):  # components narrow enough that twice as wide stays on the grid
        params = 0.25 * params
    values, volume = support_grid(head)
    log_q = jax.vmap(head.log_prob, (None, 0))(params, values)
    same = jax.vmap(head.log_prob, (None, 0))(head.widen(params, jnp.asarray(1.0)), values)
    np.testing.assert_allclose(same, log_q, rtol=1e-5, atol=1e-5)
    wide = jax.jit(jax.vmap(head.log_prob, (None, 0)))(head.widen(params, jnp.asarray(2.0)), values)
    assert jnp.all(jnp.isfinite(head.widen(params, jnp.asarray(2.0))))
    np.testing.assert_allclose(jnp.sum(jnp.exp(wide) * volume), 1.0, atol=2e-3)
    # Nowhere much less likely (the mixture's weights stay near the proposal's where it is good)...
    assert jnp.max(log_q - wide) < jnp.log(10.0)
    # ...and far more likely where the head puts least mass.
    least = jnp.argmin(log_q)
    assert wide[least] > log_q[least] + 0.1
    chex.assert_shape(head.widen(params, jnp.asarray(2.0)), (head.num_params,))
