import chex
import jax
import pytest

import jaxic
from jaxic.models import pedagogical


def make(num_steps=40, M=2):
    return jaxic.compile(pedagogical, observed=["obs"], key=jax.random.key(0), num_steps=num_steps,
                         model_kwargs={"M": M}, progress=False, validation_size=64)


@pytest.mark.slow
def test_save_load_roundtrip_gives_identical_posteriors(tmp_path):
    compiled = make()
    compiled.save(tmp_path / "ckpt")
    again = jaxic.load(tmp_path / "ckpt", pedagogical, model_kwargs={"M": 2})
    a = compiled.posterior(jax.random.key(1), {"obs": 25.0}, num_samples=200)
    b = again.posterior(jax.random.key(1), {"obs": 25.0}, num_samples=200)
    chex.assert_trees_all_close(a, b)
    assert again.step == compiled.step and again.history == compiled.history
    assert again.validation_loss() == pytest.approx(compiled.validation_loss())


@pytest.mark.slow
def test_resumed_training_continues_exactly(tmp_path):
    straight = make(num_steps=0).train(80, progress=False)
    interrupted = make(num_steps=0).train(40, progress=False)
    interrupted.save(tmp_path / "ckpt")
    resumed = jaxic.load(tmp_path / "ckpt", pedagogical, model_kwargs={"M": 2}).train(40, progress=False)
    # Same keys, optimizer state and warm-up position: bit-for-bit the uninterrupted run.
    chex.assert_trees_all_equal(resumed.state.params, straight.state.params)
    chex.assert_trees_all_equal(resumed.state.opt_state, straight.state.opt_state)
    assert resumed.history["loss"] == straight.history["loss"]


@pytest.mark.slow
def test_loading_for_a_different_model_is_a_clear_error(tmp_path):
    make().save(tmp_path / "ckpt")
    with pytest.raises(jaxic.CheckpointError, match="nuisance_2' is only in the model"):
        jaxic.load(tmp_path / "ckpt", pedagogical, model_kwargs={"M": 3})
    with pytest.raises(jaxic.CheckpointError, match="not a jaxic checkpoint"):
        jaxic.load(tmp_path, pedagogical, model_kwargs={"M": 2})


@pytest.mark.slow
def test_save_overwrites_atomically_and_is_not_pickled(tmp_path):
    compiled = make()
    compiled.save(tmp_path / "ckpt")
    with pytest.warns(UserWarning, match="past the 40 steps"):  # training on past the schedule's horizon
        compiled.train(25, progress=False)
    compiled.save(tmp_path / "ckpt")  # replaces the old checkpoint in one rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    files = [p for p in (tmp_path / "ckpt").rglob("*") if p.is_file()]
    assert not any(p.suffix in {".pkl", ".pickle"} for p in files)
    again = jaxic.load(tmp_path / "ckpt", pedagogical, model_kwargs={"M": 2})
    assert again.step == compiled.step
