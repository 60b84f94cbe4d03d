"""The functional training step: micro-batched gradients are the mean over their slices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxic
from jaxic import training
from jaxic.models import pedagogical
from jaxic.tracing import ParameterisedModel

TINY = jaxic.TransformerConfig(d_model=16, num_layers=1, num_heads=2, num_components=2)


@pytest.fixture(scope="module")
def compiled():
    return jaxic.compile(pedagogical, observed=["obs"], key=jax.random.key(0), num_steps=0, batch_size=8,
                         validation_size=16, model_kwargs={"M": 3}, network=TINY, progress=False)


def step_for(compiled, microbatch_size):
    return jax.jit(training.build_step(compiled.graphdef, compiled.objective, compiled.optimizer, 8,
                                       compiled.proposal.model, compiled.param_constraints, microbatch_size))


@pytest.mark.slow
def test_a_microbatched_step_averages_the_loss_and_gradient_of_its_slices(compiled):
    state = compiled.state
    steps = {m: step_for(compiled, m).lower(state).compile() for m in (None, 2)}
    _, whole_info = steps[None](state)
    _, info = steps[2](state)

    # By hand: the same step key, split into four slice keys, each slice a batch of 2.
    def loss_of(trainable, key):
        params, model_params = trainable
        network = nnx.merge(compiled.graphdef, params, state.statistics)
        model = ParameterisedModel(compiled.proposal.model, model_params, compiled.param_constraints)
        return compiled.objective.loss(network, model, key, 2, None)[0]

    _, step_key = jax.random.split(state.key)
    loss_and_grad = jax.jit(jax.value_and_grad(loss_of))
    parts = [loss_and_grad((state.params, state.model_params), k) for k in jax.random.split(step_key, 4)]
    grads = jax.tree.map(lambda *g: sum(g) / 4, *[g for _, g in parts])
    np.testing.assert_allclose(info.loss, np.mean([loss for loss, _ in parts]), rtol=1e-5)
    np.testing.assert_allclose(info.grad_norm, float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))),
                               rtol=1e-4)
    assert not np.isclose(info.loss, whole_info.loss)  # the slices drew traces of their own
    # The slices' activations are a quarter of the batch's: XLA plans less scratch memory.
    temp = {m: step.memory_analysis().temp_size_in_bytes for m, step in steps.items()}
    assert temp[2] < temp[None], temp


def test_microbatch_size_must_divide_the_batch():
    with pytest.raises(jaxic.JaxicError, match=r"microbatch_size=3 .*batch_size=8"):
        jaxic.compile(pedagogical, observed=["obs"], key=jax.random.key(0), num_steps=0, batch_size=8,
                      microbatch_size=3, model_kwargs={"M": 1}, network=TINY, progress=False)


@pytest.mark.slow
def test_compile_trains_with_micro_batches_and_keeps_the_setting_in_checkpoints(tmp_path):
    kw = dict(observed=["obs"], key=jax.random.key(0), batch_size=8, validation_size=16,
              model_kwargs={"M": 1}, network=TINY, progress=False)
    compiled = jaxic.compile(pedagogical, num_steps=25, microbatch_size=4, **kw)
    assert compiled.train_config.microbatch_size == 4
    assert np.isfinite(compiled.history["loss"]).all()
    compiled.save(tmp_path / "ckpt")
    loaded = jaxic.load(tmp_path / "ckpt", pedagogical, model_kwargs={"M": 1})
    assert loaded.train_config.microbatch_size == 4
