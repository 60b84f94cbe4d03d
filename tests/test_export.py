"""ArviZ export round trips, plate dimension names, and weighted pair plots."""

import functools
import sys

import jax
import matplotlib
import numpy as np
import pytest
from scipy.special import logsumexp

import jaxic
from jaxic.export import plate_dims
from jaxic.models import pedagogical_plate
from jaxic.plots import plot_pair

matplotlib.use("Agg")

M = 3
MODEL = functools.partial(pedagogical_plate, M=M)


def fake_posterior(batch=(), particles=40, seed=0):
    """A Posterior shaped like pedagogical_plate's, without training a network (NumPy: no compiles)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(size=batch + (particles,) + shape).astype(np.float32)
    nuisance_ran = np.ones(batch + (particles, M), bool)
    nuisance_ran[..., :5, 0] = False
    ran = np.ones(batch + (particles,), bool)
    return jaxic.Posterior(samples={"x": normal(), "nuisance": normal(M), "y": normal()}, log_weights=normal(),
                           log_joint=np.zeros(batch + (particles,)), log_proposal=np.zeros(batch + (particles,)),
                           executed={"x": ran, "nuisance": nuisance_ran, "y": ran})


def test_plates_name_dimensions():
    assert plate_dims(MODEL) == {"x": [], "nuisance": ["nuisance_plate"], "y": [], "obs": []}


def test_resampled_export_with_plates_and_observations():
    post = fake_posterior()
    tree = jaxic.to_arviz(post, jax.random.key(1), num_draws=25, model=MODEL, observations={"obs": 25.0})
    posterior = tree["posterior"]
    assert set(posterior.data_vars) == {"x", "nuisance", "y"}
    assert posterior["nuisance"].dims == ("chain", "draw", "nuisance_plate")
    assert posterior["nuisance"].shape == (1, 25, M) and posterior["x"].shape == (1, 25)
    # Every resampled draw is one of the particles.
    assert np.isin(posterior["x"].values, np.asarray(post.samples["x"])).all()
    assert "log_weight" not in tree["sample_stats"].data_vars
    assert float(tree["observed_data"]["obs"]) == 25.0
    # Elements that did not run in a particle are missing, not zero.
    ran = np.isin(posterior["x"].values[0], np.asarray(post.samples["x"])[5:])
    assert np.isnan(posterior["nuisance"].values[0, ~ran, 0]).all()
    assert np.isfinite(posterior["nuisance"].values[0, ran]).all()


def test_weighted_export_keeps_particles_and_normalised_log_weights():
    post = fake_posterior(particles=60)
    tree = jaxic.to_arviz(post, resample=False, dims={"nuisance": ["noise"]})
    assert tree["posterior"]["x"].shape == (1, 60) and tree["posterior"]["nuisance"].dims[-1] == "noise"
    np.testing.assert_allclose(tree["posterior"]["y"].values[0], post.samples["y"])
    log_w = tree["sample_stats"]["log_weight"].values
    np.testing.assert_allclose(logsumexp(log_w), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.sum(np.exp(log_w) * tree["posterior"]["y"].values), post.mean("y"), rtol=1e-5)
    assert tree["posterior"]["nuisance"].dims[2:] == ("noise",)
    assert tree["posterior"].attrs["resampled"] == 0
    with pytest.raises(jaxic.JaxicError, match="resample"):
        jaxic.to_arviz(post, resample=False, num_draws=10)


def test_batched_posterior_gets_an_observation_dimension():
    post = fake_posterior(batch=(2,))
    obs = {"obs": np.array([4.0, 25.0])}
    tree = jaxic.to_arviz(post, jax.random.key(2), model=MODEL, observations=obs)
    assert tree["posterior"]["nuisance"].dims == ("chain", "draw", "observation", "nuisance_plate")
    assert tree["posterior"]["x"].shape == (1, 40, 2)
    assert tree["sample_stats"]["log_joint"].dims == ("chain", "draw", "observation")
    np.testing.assert_allclose(tree["observed_data"]["obs"].values, [4.0, 25.0])
    assert tree["posterior"]["x"].dims == ("chain", "draw", "observation")
    for i in range(2):  # each observation set is resampled from its own particles
        assert np.isin(tree["posterior"]["x"].values[0, :, i], np.asarray(post.samples["x"][i])).all()


def test_slashes_in_site_names_and_unknown_sites():
    post = jaxic.Posterior(samples={"x[0]/v": np.arange(5.0)}, log_weights=np.zeros(5),
                           log_joint=np.zeros(5), log_proposal=np.zeros(5))
    assert "x[0].v" in jaxic.to_arviz(post)["posterior"].data_vars
    with pytest.raises(jaxic.JaxicError, match="not latent sites"):
        jaxic.to_arviz(post, sites=["z"])


@pytest.mark.slow
def test_round_trip_from_a_compiled_model():
    tiny = jaxic.TransformerConfig(d_model=32, num_layers=1, num_heads=2, num_components=4)
    compiled = jaxic.compile(MODEL, observed=["obs"], key=jax.random.key(0), num_steps=0, network=tiny,
                             validation_size=64, progress=False)
    post = compiled.posterior(jax.random.key(1), {"obs": 25.0}, num_samples=64)
    tree = jaxic.to_arviz(post, jax.random.key(2), model=compiled, observations={"obs": 25.0})
    assert {s.name for s in compiled.spec.latents} == set(tree["posterior"].data_vars)
    assert tree["posterior"]["nuisance"].dims == ("chain", "draw", "nuisance_plate")
    assert tree["posterior"]["nuisance"].shape == (1, 64, M)
    weighted = jaxic.to_arviz(post, resample=False, model=compiled)
    assert weighted["sample_stats"]["log_weight"].shape == (1, 64)
    fig = plot_pair(weighted, ["x", "y"])
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 3
    matplotlib.pyplot.close(fig)


def test_plot_pair_takes_posteriors_and_trees():
    post = fake_posterior(particles=200)
    for source in (post, jaxic.to_arviz(post, resample=False)):
        fig = plot_pair(source, ["x", "nuisance"])
        assert len([ax for ax in fig.axes if ax.get_visible()]) == 10  # 4 variables: 4 + 6 panels
        matplotlib.pyplot.close(fig)
    with pytest.raises(jaxic.JaxicError, match=r"post\[i\]"):
        plot_pair(fake_posterior(batch=(2,)), ["x"])


def test_missing_arviz_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "arviz_base", None)
    with pytest.raises(jaxic.JaxicError, match=r'pip install "jaxic\[arviz\]"'):
        jaxic.to_arviz(fake_posterior())
