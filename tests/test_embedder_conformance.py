"""Shared conformance test: every observation embedder in ``jaxic.networks.EMBEDDERS`` must pass all of these,
plus what the series embedder is for: a posterior read off a whole series, and a checkpoint that rebuilds it.

The protocol (see ``jaxic.networks.embedders``): a frozen configuration with a registry ``name`` whose
``build(site, d_model, loc, scale, *, rngs)`` gives an unbatched module mapping one observation of the site's
shape to ``(d_model,)``, standardising with the given moments.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from flax import nnx

import jaxic
import jaxic.proposal
from jaxic.networks import (EMBEDDERS, MLPEmbedding, SeriesConvEmbedding, TransformerConfig, embedder_metadata,
                            embedders_from_metadata)
from jaxic.tracing import ObservedSite

# Every registered embedder, small. An embedder added to EMBEDDERS must be added here (a test checks it).
EMBEDDERS_UNDER_TEST = {
    "mlp": MLPEmbedding(hidden=16),
    "series_conv": SeriesConvEmbedding(channels=2, features=4, kernel_size=3, num_layers=2, hidden=16),
}
D_MODEL = 8
# (2, 13): two series of an odd length, so pooling meets a leftover step.
SITE = ObservedSite("obs", (2, 13))


def _built(config, loc=None, scale=None, seed=0):
    loc = jnp.linspace(-1.0, 1.0, SITE.size) if loc is None else loc
    scale = jnp.linspace(0.5, 2.0, SITE.size) if scale is None else scale
    return config.build(SITE, D_MODEL, loc, scale, rngs=nnx.Rngs(seed))


def _observations(n, seed=1):
    return jax.random.normal(jax.random.key(seed), (n, *SITE.shape)) * 3.0


def test_every_registered_embedder_is_under_test():
    assert set(EMBEDDERS_UNDER_TEST) == set(EMBEDDERS)
    for name, config in EMBEDDERS_UNDER_TEST.items():
        assert type(config) is EMBEDDERS[name] and config.name == name


@pytest.mark.parametrize("name", list(EMBEDDERS_UNDER_TEST))
def test_one_observation_to_one_finite_token(name):
    embed = _built(EMBEDDERS_UNDER_TEST[name])
    out = embed(_observations(1)[0])
    assert out.shape == (D_MODEL,) and bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("name", list(EMBEDDERS_UNDER_TEST))
def test_jitted_and_vmapped_calls_agree_with_eager_ones(name):
    embed = _built(EMBEDDERS_UNDER_TEST[name])
    ys = _observations(5)
    eager = jnp.stack([embed(y) for y in ys])
    graphdef, state = nnx.split(embed)
    batched = jax.jit(jax.vmap(lambda s, y: nnx.merge(graphdef, s)(y), in_axes=(None, 0)))(state, ys)
    np.testing.assert_allclose(batched, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(EMBEDDERS_UNDER_TEST))
def test_it_standardises_with_the_given_moments(name):
    """Change the data's units (y -> a y + b elementwise) and its moments with them: the token must not move."""
    loc, scale = jnp.linspace(-1.0, 1.0, SITE.size), jnp.linspace(0.5, 2.0, SITE.size)
    a, b = jnp.linspace(10.0, 1000.0, SITE.size), jnp.linspace(-50.0, 50.0, SITE.size)
    plain = _built(EMBEDDERS_UNDER_TEST[name], loc, scale)
    rescaled = _built(EMBEDDERS_UNDER_TEST[name], a * loc + b, a * scale)
    for y in _observations(3):
        moved = (a * y.reshape(-1) + b).reshape(SITE.shape)
        np.testing.assert_allclose(rescaled(moved), plain(y), rtol=1e-3, atol=1e-4)
    assert not np.allclose(plain(_observations(1)[0]), plain(_observations(1, seed=2)[0]), atol=1e-4)


@pytest.mark.parametrize("name", list(EMBEDDERS_UNDER_TEST))
def test_checkpoint_metadata_round_trips_and_is_json(name):
    config = EMBEDDERS_UNDER_TEST[name]
    recorded = json.loads(json.dumps(embedder_metadata({"obs": config, "other": nnx.Linear(1, 1, rngs=nnx.Rngs(0))})))
    assert set(recorded) == {"obs"}  # modules built by hand are not recorded
    assert embedders_from_metadata(recorded) == {"obs": config}
    with pytest.raises(jaxic.JaxicError, match=r"observed site 'obs' uses embedder 'nope', unknown to this jaxic"):
        embedders_from_metadata({"obs": {"type": "nope", "config": {}}})


def test_the_series_embedder_knows_when_things_happen():
    """A pulse early and the same pulse late give different tokens: the time axis is not pooled away."""
    embed = _built(SeriesConvEmbedding(channels=2, features=4, kernel_size=3, num_layers=2, hidden=16),
                   jnp.zeros(SITE.size), jnp.ones(SITE.size))
    early = jnp.zeros(SITE.shape).at[:, 1].set(5.0)
    late = jnp.zeros(SITE.shape).at[:, 11].set(5.0)
    assert float(jnp.abs(embed(early) - embed(late)).max()) > 1e-3


# --- behaviour: a posterior read off a whole series ----------------------------------------------------------------
LENGTH = 48


def drift_model():
    """Two series sharing an unknown level: y[c, t] ~ N(mu + c, 1). Posterior: N(sum(y - c) / (2T + 1), 1 / (2T + 1))."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.sample("obs", dist.Normal(mu + jnp.arange(2.0)[:, None], 1.0).expand([2, LENGTH]).to_event(2))


def exact_posterior(obs):
    precision = 1.0 + obs.size
    return float((obs - jnp.arange(2.0)[:, None]).sum() / precision), float(precision ** -0.5)


@pytest.fixture(scope="module")
def series_compiled():
    return jaxic.compile(drift_model, ["obs"], jax.random.key(0), num_steps=1500, progress=False,
                         network=TransformerConfig(d_model=32, num_heads=2, num_layers=1, mlp_ratio=2, obs_hidden=32),
                         observation_embedders={"obs": SeriesConvEmbedding(channels=2, features=8, hidden=32)})


@pytest.mark.slow
def test_raw_draws_match_the_analytic_posterior(series_compiled):
    """Not only IS: the network's own draws must sit on the posterior, which needs the embedder to read every step."""
    for mu_true, seed in ((-1.2, 3), (0.7, 4)):
        obs = mu_true + jnp.arange(2.0)[:, None] + jax.random.normal(jax.random.key(seed), (2, LENGTH))
        mean, sd = exact_posterior(obs)
        draws = np.asarray(series_compiled.sample(jax.random.key(seed), {"obs": obs}, 4000)["mu"])
        assert abs(draws.mean() - mean) < 0.5 * sd, (draws.mean(), mean, sd)
        assert 0.7 < draws.std() / sd < 1.4, (draws.std(), sd)


@pytest.mark.slow
def test_a_checkpoint_rebuilds_the_series_embedder(series_compiled, tmp_path):
    series_compiled.save(tmp_path / "ckpt")
    loaded = jaxic.load(tmp_path / "ckpt", drift_model)
    assert dict(loaded.proposal.observation_embedders) == dict(series_compiled.proposal.observation_embedders)
    obs = jnp.arange(2.0)[:, None] + jnp.zeros((2, LENGTH))
    latents = {"mu": jnp.linspace(-0.5, 0.5, 5)}
    before, _ = jaxic.proposal.log_prob(series_compiled.proposal, latents, {"obs": obs})
    after, _ = jaxic.proposal.log_prob(loaded.proposal, latents, {"obs": obs})
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before))


def test_embedder_fields_are_json_values():
    for config in EMBEDDERS_UNDER_TEST.values():
        assert all(isinstance(v, (int, float, str, bool)) for v in dataclasses.asdict(config).values())
