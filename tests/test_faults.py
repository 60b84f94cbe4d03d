"""Fault catalogue: interrupted training, time budgets, huge posteriors.

The other parts of the catalogue: bad inputs (test_faults_inputs.py), checkpoints
(test_faults_checkpoint.py), non-finite draws (test_faults_nonfinite.py), hanging models
(test_faults_hangs.py), diagnostics on NaN (test_faults_diagnostics.py), trace datasets and given
simulations (test_faults_datasets.py), observations without a likelihood and posteriors without a weighted
particle (test_faults_likelihood.py).
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import chex
import numpy as np
import jax
import pytest

import jaxic
from jaxic.models import pedagogical
from jaxic.networks import TransformerConfig

TINY = TransformerConfig(d_model=16, num_heads=2, num_layers=1, obs_hidden=16)
SETTINGS = dict(observed=["obs"], num_steps=0, batch_size=8, validation_size=16, model_kwargs={"M": 2}, network=TINY,
                progress=False)

CHILD = textwrap.dedent("""
    import signal, sys, jax, jaxic
    # A process started in the background inherits an ignored SIGINT; a terminal or Jupyter has this handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from jaxic.models import pedagogical
    from jaxic.networks import TransformerConfig
    compiled = jaxic.compile(pedagogical, key=jax.random.key(0), observed=["obs"], num_steps=0, batch_size=8,
                             validation_size=16, model_kwargs={"M": 2},
                             network=TransformerConfig(d_model=16, num_heads=2, num_layers=1, obs_hidden=16),
                             progress=False)
    compiled.train(25, progress=False)
    print("training", flush=True)
    try:
        compiled.train(10**7, progress=False)
    except KeyboardInterrupt:
        pass
    history = compiled.history
    assert len(history["loss"]) == compiled.step, (len(history["loss"]), compiled.step)
    assert history["validation_step"][-1] <= compiled.step
    compiled.save(sys.argv[1])
    print("saved", compiled.step, flush=True)
""")


VERIFY = textwrap.dedent("""
    import sys, jax, jaxic, numpy as np
    from jaxic.models import pedagogical
    from jaxic.networks import TransformerConfig
    resumed = jaxic.load(sys.argv[1], pedagogical, model_kwargs={"M": 2})
    stopped = resumed.step
    assert len(resumed.history["loss"]) == stopped
    resumed.train(50, progress=False)
    straight = jaxic.compile(pedagogical, key=jax.random.key(0), observed=["obs"], num_steps=0, batch_size=8,
                             validation_size=16, model_kwargs={"M": 2},
                             network=TransformerConfig(d_model=16, num_heads=2, num_layers=1, obs_hidden=16),
                             progress=False).train(stopped + 50, progress=False)
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(resumed.state.params),
                                                     jax.tree.leaves(straight.state.params)))
    print(stopped, same, resumed.history["loss"] == straight.history["loss"], flush=True)
""")


def run_python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow
def test_ctrl_c_mid_training_then_save_and_load_resumes_bit_for_bit(tmp_path):
    child = run_python(CHILD, str(tmp_path / "ckpt"))
    try:
        assert child.stdout.readline().strip() == "training", child.stderr.read()
        time.sleep(2.0)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=300)
    finally:
        child.kill()
    assert child.returncode == 0, err
    stopped = int(out.split()[-1])
    assert stopped >= 25 and stopped % 25 == 0  # whole chunks only
    # Resumed and uninterrupted runs side by side in one fresh process (same XLA setup for both).
    verify = run_python(VERIFY, str(tmp_path / "ckpt"))
    out, err = verify.communicate(timeout=600)
    assert verify.returncode == 0, err
    assert out.split() == [str(stopped), "True", "True"], out


@pytest.mark.slow
def test_train_needs_a_budget_and_honours_seconds():
    compiled = jaxic.compile(pedagogical, key=jax.random.key(0), **SETTINGS)
    with pytest.raises(jaxic.JaxicError, match="num_steps, seconds"):
        compiled.train()
    compiled.train(25)  # compiled once outside the budget below
    start = time.monotonic()
    compiled.train(seconds=1.0)
    assert time.monotonic() - start < 1.0 + 5.0  # the budget ends the loop (one chunk may overrun it)
    assert compiled.step > 25 and len(compiled.history["loss"]) == compiled.step
    assert compiled.history["validation_step"][-1] == compiled.step


@pytest.mark.slow
def test_periodic_checkpoints_keep_the_newest_and_load_resumes_from_the_latest(tmp_path):
    run = tmp_path / "run"
    compiled = jaxic.compile(pedagogical, key=jax.random.key(0), checkpoint_dir=run, checkpoint_every=25,
                             max_to_keep=2, **{**SETTINGS, "num_steps": 0}).train(100, progress=False)
    assert sorted(p.name for p in run.iterdir()) == ["100", "75", "jaxic.json"]
    again = jaxic.load(run, pedagogical, model_kwargs={"M": 2})
    assert again.step == 100 and again.history == compiled.history
    chex.assert_trees_all_equal(again.state.params, compiled.state.params)


def test_a_checkpoint_dir_with_user_files_is_refused_before_training(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(jaxic.CheckpointError, match=str(tmp_path)):
        jaxic.compile(pedagogical, key=jax.random.key(0), checkpoint_dir=tmp_path, **SETTINGS)
    assert (tmp_path / "notes.txt").read_text() == "mine" and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(jaxic.JaxicError, match="checkpoint_every needs checkpoint_dir"):
        jaxic.compile(pedagogical, key=jax.random.key(0), checkpoint_every=10, **SETTINGS)


@pytest.mark.slow
def test_training_warns_when_over_one_percent_of_draws_are_dropped_and_names_the_site():
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    def model():  # y is NaN whenever x > 2: about 2.3% of the joint draws
        x = numpyro.sample("x", dist.Normal(0.0, 1.0))
        y = numpyro.sample("y", dist.Normal(jnp.log(2.0 - x), 1.0))
        numpyro.sample("obs", dist.Normal(y, 1.0))

    with pytest.warns(UserWarning, match=r"were dropped from training because they were not finite.*'y'"):
        compiled = jaxic.compile(model, observed=["obs"], key=jax.random.key(0), num_steps=50, batch_size=32,
                                 validation_size=64, network=TINY, progress=False)
    dropped = sum(compiled.history["dropped"])
    assert 0.01 * 50 * 32 < dropped < 0.05 * 50 * 32 and len(compiled.history["dropped"]) == compiled.step
    assert not compiled.history["skipped"] and all(map(np.isfinite, compiled.history["validation_loss"]))


def test_paths_latents_and_site_names_of_the_wrong_kind_are_named(tmp_path):
    compiled = jaxic.compile(pedagogical, key=jax.random.key(0), **SETTINGS)
    for path in (None, 3):
        with pytest.raises(jaxic.CheckpointError, match="str or os.PathLike"):
            compiled.save(path)
    latents = {"x": 1.0, "y": 2.0, "nuisance_0": 0.0, "nuisance_1": 0.0}
    with pytest.raises(jaxic.ObservationError, match="latent 'x' is 'a' of type str"):
        compiled.log_prob({**latents, "x": "a"}, {"obs": 5.0})
    with pytest.raises(jaxic.ObservationError, match="latent 'y' has non-finite values"):
        compiled.log_prob({**latents, "y": float("nan")}, {"obs": 5.0})
    post = compiled.posterior(jax.random.key(1), {"obs": 5.0}, 8)
    with pytest.raises(jaxic.UnknownSiteError, match="no latent site 'z'.*'nuisance_0'"):
        post.mean("z")
    assert list(tmp_path.iterdir()) == []
