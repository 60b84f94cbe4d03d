"""Fault catalogue: trace datasets (simulations written beforehand, foreign folders, damaged shards,
datasets of another model).

The behaviour they guard: ``write_simulations`` stores exactly the model's own trace for each given
row (decoded back to the same values) and trains a proposal whose importance-sampled posterior is the
analytic one.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import jaxic
from jaxic.errors import CheckpointError, JaxicError, ObservationError
from jaxic.networks import TransformerConfig
from jaxic.tracing import TraceDataset, TraceWriter, from_tokens, write_simulations, write_traces

TINY = TransformerConfig(d_model=16, num_heads=2, num_layers=1, obs_hidden=16)


def box_model():
    """A 3-vector on (-1, 1) (one token per element by default), a count, and a noisy observation."""
    theta = numpyro.sample("theta", dist.Uniform(-jnp.ones(3), jnp.ones(3)).to_event(1))
    k = numpyro.sample("k", dist.Categorical(probs=jnp.array([0.2, 0.3, 0.5])))
    numpyro.sample("obs", dist.Normal(theta + k, 0.1).to_event(1))


def conjugate(scale=0.5):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.sample("obs", dist.Normal(mu, scale))


def box_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    theta = rng.uniform(-0.99, 0.99, (n, 3)).astype(np.float32)
    k = rng.integers(0, 3, n)
    return {"theta": theta, "k": k, "obs": theta + k[:, None] + 0.1 * rng.standard_normal((n, 3)).astype(np.float32)}


def snapshot(folder):
    return {p: (folder / p).read_bytes() for p in sorted(os.listdir(folder))}


def test_simulations_round_trip_exactly_in_order_across_shards_and_padded_chunks(tmp_path):
    rows = box_rows(20)
    spec = write_simulations(tmp_path / "sims", box_model, rows, ["obs"], shard_size=7, chunk=6)
    data = TraceDataset(tmp_path / "sims", holdout=20 - 1)
    assert len(data) == 20 and len(data.shards) == 3 and data.spec == spec
    tokens, obs = data.validation()
    tokens_all = jax.tree.map(lambda *a: np.concatenate(a), tokens, next(data.batches(jax.random.key(0), 1))[0])
    theta_site, k_site = spec.latent("theta"), spec.latent("k")
    fns = {"theta": dist.Uniform(-jnp.ones(3), jnp.ones(3)).to_event(1),
           "k": dist.Categorical(probs=jnp.array([0.2, 0.3, 0.5]))}
    decode = lambda site, t: from_tokens(site, fns[site.name], t[site.positions()])
    theta = np.stack([np.asarray(decode(theta_site, t)) for t in tokens.value])
    k = np.stack([np.asarray(decode(k_site, t)) for t in tokens.value])
    np.testing.assert_allclose(theta.reshape(19, 3), rows["theta"][:19], atol=1e-5)
    np.testing.assert_array_equal(k.reshape(19), rows["k"][:19])
    np.testing.assert_allclose(obs["obs"], rows["obs"][:19], rtol=1e-6)
    assert tokens.mask.all() and tokens_all.value.shape[0] == 20


def test_a_proposal_trained_on_given_simulations_gives_the_analytic_posterior(tmp_path):
    rng = np.random.default_rng(1)
    mu = rng.standard_normal(3000).astype(np.float32)
    write_simulations(tmp_path / "sims", conjugate, {"mu": mu, "obs": mu + 0.5 * rng.standard_normal(3000)}, "obs")
    compiled = jaxic.compile(conjugate, ["obs"], jax.random.key(0), num_steps=300, dataset=tmp_path / "sims",
                             batch_size=64, validation_size=256, network=TINY, progress=False)
    post = compiled.posterior(jax.random.key(1), {"obs": 1.0}, 8000)
    # mu | obs ~ N(0.8 obs, 0.2): precision 1 + 1 / 0.25
    draws = np.asarray(post.resample(jax.random.key(2), 8000)["mu"])
    assert abs(draws.mean() - 0.8) < 0.03 and abs(draws.std() - np.sqrt(0.2)) < 0.03
    assert float(post.ess) / post.num_samples > 0.5


def test_a_dataset_held_on_the_device_trains_on_the_batches_it_would_stream(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    mu = rng.standard_normal(700).astype(np.float32)
    write_simulations(tmp_path / "sims", conjugate, {"mu": mu, "obs": mu + 0.5 * rng.standard_normal(700)}, "obs")
    settings = dict(num_steps=0, dataset=tmp_path / "sims", batch_size=32, validation_size=100, network=TINY,
                    progress=False)
    resident = jaxic.compile(conjugate, ["obs"], jax.random.key(0), **settings)
    assert isinstance(resident.loop, jaxic.loops.ResidentDatasetSteps)
    # 40 steps of 32 cover two passes over the 600 training traces, and end in a partial chunk of steps.
    resident.train(30, progress=False).train(10, progress=False)
    assert resident.loop.compilations() == 1
    monkeypatch.setattr(jaxic.api, "RESIDENT_DATASET_BYTES", 0)  # too large to hold: streamed batch by batch
    streamed = jaxic.compile(conjugate, ["obs"], jax.random.key(0), **settings)
    assert isinstance(streamed.loop, jaxic.loops.FedSteps)
    streamed.train(40, progress=False)
    np.testing.assert_allclose(resident.history["loss"], streamed.history["loss"], rtol=1e-5)
    assert resident.validation_loss() == pytest.approx(streamed.validation_loss(), rel=1e-5)


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("k"), r"lack site\(s\) \['k'\].*drawn from\s+its prior"),
    (lambda r: r.update(z=r["k"]), r"site\(s\) \['z'\] that the model does not sample"),
    (lambda r: r.update(theta=r["theta"][:, :2]), r"simulations\['theta'\] has shape \(8, 2\); site 'theta' has "
                                                   r"shape \(3,\), so it needs shape \(num_simulations, 3\)"),
    (lambda r: r.update(obs=r["obs"][:5]), r"differ in their number of rows"),
    (lambda r: r["theta"].__setitem__((6, 1), 1.5), r"row 6: the value of site 'theta' lies outside"),
    (lambda r: r["k"].__setitem__(3, 7), r"row 3: the value of site 'k' lies outside"),
    (lambda r: r["obs"].__setitem__((2, 0), np.nan), r"row 2: the value of site 'obs' is not finite"),
    (lambda r: r.update(theta=r["theta"].astype(str)), r"must be a numeric array"),
])
def test_bad_simulations_name_site_and_row_and_write_nothing(tmp_path, change, message):
    rows = box_rows(8)
    change(rows)
    with pytest.raises(JaxicError, match=message):
        write_simulations(tmp_path / "sims", box_model, rows, ["obs"], chunk=4)
    assert not (tmp_path / "sims").exists() or not os.listdir(tmp_path / "sims")


def test_a_non_finite_observation_is_an_observation_error(tmp_path):
    rows = box_rows(4)
    rows["obs"][1] = np.inf
    with pytest.raises(ObservationError, match="row 1"):
        write_simulations(tmp_path / "sims", box_model, rows, ["obs"])


@pytest.mark.parametrize("arguments, message", [
    (dict(chunk=0), "chunk must be a positive int"),
    (dict(shard_size=0), "shard_size must be a positive int"),
    (dict(shard_size=True), "shard_size must be a positive int"),
])
def test_bad_write_arguments_are_named(tmp_path, arguments, message):
    with pytest.raises(JaxicError, match=message):
        write_simulations(tmp_path / "sims", box_model, box_rows(4), ["obs"], **arguments)


@pytest.mark.parametrize("write", [
    lambda path, spec: write_simulations(path, box_model, box_rows(4), ["obs"]),
    lambda path, spec: write_traces(path, box_model, ["obs"], 4, jax.random.key(0)),
    lambda path, spec: TraceWriter(path, spec),
])
def test_writers_refuse_a_folder_that_holds_anything_and_leave_it_untouched(tmp_path, write):
    spec = jaxic.derive_trace_spec(box_model, ["obs"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "shard-00000.npz").write_bytes(b"the user's own file")
    before = snapshot(mine)
    with pytest.raises(CheckpointError, match="already holds 1 entries .*shard-00000.npz.*choose another folder"):
        write(mine, spec)
    assert snapshot(mine) == before
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CheckpointError, match="is a file"):
        write(tmp_path / "file", spec)


def test_a_second_dataset_into_the_same_folder_is_refused_and_the_first_survives(tmp_path):
    write_simulations(tmp_path / "sims", box_model, box_rows(6), ["obs"])
    before = snapshot(tmp_path / "sims")
    with pytest.raises(CheckpointError, match="already holds 2 entries"):
        write_simulations(tmp_path / "sims", box_model, box_rows(6, seed=1), ["obs"])
    assert snapshot(tmp_path / "sims") == before


def test_a_damaged_shard_fails_its_checksum_by_name(tmp_path):
    write_simulations(tmp_path / "sims", box_model, box_rows(12), ["obs"], shard_size=6)
    index = json.loads((tmp_path / "sims" / "traces.json").read_text())
    assert all(len(s["sha256"]) == 64 for s in index["shards"])
    shard = tmp_path / "sims" / "shard-00001.npz"
    content = bytearray(shard.read_bytes())
    content[len(content) // 2] ^= 0x01
    shard.write_bytes(bytes(content))
    data = TraceDataset(tmp_path / "sims", holdout=3)
    data.validation()  # shard 0 is intact
    with pytest.raises(CheckpointError, match="shard-00001.npz.*does not match the checksum"):
        for _ in zip(range(4), data.batches(jax.random.key(0), 4)):
            pass


def test_datasets_written_before_checksums_still_load(tmp_path):
    write_simulations(tmp_path / "sims", box_model, box_rows(6), ["obs"])
    index_path = tmp_path / "sims" / "traces.json"
    index = json.loads(index_path.read_text())
    for s in index["shards"]:
        del s["sha256"]
    index_path.write_text(json.dumps(index))
    tokens, obs = TraceDataset(tmp_path / "sims", holdout=5).validation()
    assert tokens.value.shape[0] == 5


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1})])
def test_a_damaged_index_is_a_checkpoint_error_naming_it(tmp_path, content):
    write_simulations(tmp_path / "sims", box_model, box_rows(6), ["obs"])
    (tmp_path / "sims" / "traces.json").write_text(content)
    with pytest.raises(CheckpointError, match="traces.json"):
        TraceDataset(tmp_path / "sims")


def test_a_dataset_of_another_model_is_refused_by_name(tmp_path):
    write_simulations(tmp_path / "sims", box_model, box_rows(40), ["obs"])

    def renamed():
        theta = numpyro.sample("theta", dist.Uniform(-jnp.ones(3), jnp.ones(3)).to_event(1))
        j = numpyro.sample("j", dist.Categorical(probs=jnp.array([0.2, 0.3, 0.5])))
        numpyro.sample("obs", dist.Normal(theta + j, 0.1).to_event(1))

    def wider():
        theta = numpyro.sample("theta", dist.Normal(jnp.zeros(3), 1.0).to_event(1))
        k = numpyro.sample("k", dist.Categorical(probs=jnp.array([0.2, 0.3, 0.5])))
        numpyro.sample("obs", dist.Normal(theta + k, 0.1).to_event(1))

    settings = dict(num_steps=0, dataset=tmp_path / "sims", validation_size=8, network=TINY, progress=False)
    with pytest.raises(JaxicError, match="site 'j' is only in the model"):
        jaxic.compile(renamed, ["obs"], jax.random.key(0), **settings)
    with pytest.raises(JaxicError, match=r"site 'theta' has shape \(3,\) and support .*Real.* in the model but .*Interval"):
        jaxic.compile(wider, ["obs"], jax.random.key(0), **settings)
    with pytest.raises(JaxicError, match="observes \\['obs'\\] but observed=\\['theta'\\]"):
        jaxic.compile(box_model, ["theta"], jax.random.key(0), **settings)
    compiled = jaxic.compile(box_model, ["obs"], jax.random.key(0), **settings)  # its own model is accepted
    assert compiled.path == "dataset"
