"""Every objective honours the protocol: a finite scalar loss with its declared metrics, one trace
per configuration, ``trains_model`` respected, and the same loss on one device and on four."""

import functools
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import jaxic
from jaxic import objectives, training

OBJECTIVES_UNDER_TEST = [
    objectives.forward_kl(),
    objectives.elbo(num_particles=2),
    objectives.rws(num_particles=4, sleep_weight=0.5),
]
IDS = [f"{o.name}-{o.options}" for o in OBJECTIVES_UNDER_TEST]
TINY = jaxic.TransformerConfig(d_model=16, num_layers=1, num_heads=2, num_components=2)
BATCH = 8


def shifted(scale=0.5):
    """A learnable shift, a continuous and a discrete latent: every gradient path of the objectives."""
    theta = numpyro.param("theta", 0.3)
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    c = numpyro.sample("c", dist.Bernoulli(0.3))
    numpyro.sample("x", dist.Normal(z + theta + 2.0 * c, scale))


DATA = {"x": np.asarray(jax.random.normal(jax.random.key(3), (32,))) + 0.8}


@pytest.fixture(scope="module")
def compiled():
    return jaxic.compile(shifted, observed=["x"], key=jax.random.key(0), num_steps=0, batch_size=BATCH,
                         validation_size=16, network=TINY, progress=False)


def run_steps(compiled, objective, num_steps=2):
    """``num_steps`` jitted steps of ``objective`` from the compiled network, its loss wrapped so that a
    second trace fails."""
    chex.clear_trace_counter()  # the counter is keyed by function, shared across parameterised cases
    counted = objective._replace(loss=chex.assert_max_traces(objective.loss, n=1))
    optimizer = training.guard(training.default_optimizer(10), trains_model=objective.trains_model)
    state = training.init(compiled.state.params, compiled.state.statistics, optimizer, jax.random.key(1),
                          compiled.state.model_params)
    step = jax.jit(training.build_step(compiled.graphdef, counted, optimizer, BATCH, compiled.model,
                                       compiled.param_constraints))
    data = DATA if objective.needs_data else None
    infos = []
    for _ in range(num_steps):
        state, info = step(state, data)
        infos.append(info)
    return state, infos


@pytest.mark.slow
@pytest.mark.parametrize("objective", OBJECTIVES_UNDER_TEST, ids=IDS)
def test_objective_conforms(compiled, objective):
    assert objectives.OBJECTIVES[objective.name](**objective.options).options == objective.options
    assert {"dropped", "dropped_site"} <= set(objective.metrics)
    state, infos = run_steps(compiled, objective)  # two calls, one trace (assert_max_traces)
    for info in infos:
        assert info.loss.shape == () and np.isfinite(info.loss), info.loss
        assert not bool(info.skipped)
        assert set(info.metrics) == set(objective.metrics), (sorted(info.metrics), objective.metrics)
        for name, value in info.metrics.items():
            assert value.shape == () and np.isfinite(value), (name, value)
        assert int(info.metrics["dropped"]) == 0 and int(info.metrics["dropped_site"]) == -1
    assert int(state.step) == 2
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params,
                                           compiled.state.params))
    assert any(changed)
    theta_before = compiled.state.model_params["theta"]
    if objective.trains_model:
        assert float(state.model_params["theta"]) != float(theta_before)
    else:  # no update and no weight decay: bit for bit
        chex.assert_trees_all_equal(state.model_params, compiled.state.model_params)


def second_update(optimizer, grads, params):
    """The optimizer's second update (after one step of warm-up)."""
    state = optimizer.init(params)
    _, state = optimizer.update(grads, state, params)
    return optimizer.update(grads, state, params)[0]


def test_default_optimizer_decays_the_network_only_unless_asked():
    params = ({"w": jnp.ones(3)}, {"theta": jnp.ones(())})
    zero = jax.tree.map(jnp.zeros_like, params)
    for decay_model in (False, True):
        updates = second_update(training.default_optimizer(0, warmup_steps=1, decay_model_params=decay_model),
                                zero, params)
        assert float(updates[0]["w"][0]) < 0.0  # the network's weights decay
        assert (float(updates[1]["theta"]) < 0.0) == decay_model
        guarded = second_update(training.guard(training.default_optimizer(0, warmup_steps=1,
                                                                          decay_model_params=decay_model),
                                               trains_model=False), zero, params)
        assert float(guarded[0]["w"][0]) < 0.0 and float(guarded[1]["theta"]) == 0.0


@pytest.mark.slow
def test_trains_model_false_keeps_model_params_whatever_the_optimizer(compiled):
    # AdamW decaying everything, not guarded: the step itself must still leave the model alone.
    unguarded = training.default_optimizer(0, warmup_steps=1, decay_model_params=True)
    state = training.init(compiled.state.params, compiled.state.statistics, unguarded, jax.random.key(1),
                          compiled.state.model_params)
    step = jax.jit(training.build_step(compiled.graphdef, objectives.forward_kl(), unguarded, BATCH, compiled.model,
                                       compiled.param_constraints))
    for _ in range(3):
        state, info = step(state)
    assert np.isfinite(float(info.loss))
    chex.assert_trees_all_equal(state.model_params, compiled.state.model_params)


def test_resolve_names_instances_and_rejects_the_rest():
    assert objectives.resolve(None).name == "forward_kl"
    assert objectives.resolve("rws").options == {"num_particles": 10, "sleep_weight": 0.0}
    custom = objectives.elbo(num_particles=3)
    assert objectives.resolve(custom) is custom
    with pytest.raises(jaxic.JaxicError, match="unknown objective 'elbow'"):
        objectives.resolve("elbow")
    with pytest.raises(jaxic.JaxicError, match="objective must be a name"):
        objectives.resolve(functools.partial(objectives.elbo))
    with pytest.raises(jaxic.JaxicError, match=r"elbo\(num_particles=0\)"):
        objectives.elbo(num_particles=0)
    with pytest.raises(jaxic.JaxicError, match=r"rws\(sleep_weight=-1\)"):
        objectives.rws(sleep_weight=-1)


@pytest.mark.slow
def test_idle_steps_of_a_chunk_have_the_step_structure(compiled):
    objective = objectives.elbo(num_particles=2)
    optimizer = training.guard(training.default_optimizer(10))
    state = training.init(compiled.state.params, compiled.state.statistics, optimizer, jax.random.key(1),
                          compiled.state.model_params)
    multi = jax.jit(training.build_multi_step(
        training.build_step(compiled.graphdef, objective, optimizer, BATCH, compiled.model,
                            compiled.param_constraints), chunk=3))
    state, infos = multi(state, 2, DATA)
    assert int(state.step) == 2
    assert set(infos.metrics) == set(objective.metrics)
    assert np.isfinite(np.asarray(infos.loss[:2])).all() and np.isnan(float(infos.loss[2]))
    np.testing.assert_array_equal(np.asarray(infos.metrics["dropped"]), [0, 0, -1])
    assert np.isnan(float(infos.metrics["elbo"][2])) and not bool(infos.skipped[2])


FOUR_DEVICES = textwrap.dedent('''
    import sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, "tests")
    import jaxic
    from jaxic import objectives, parallel, training
    from test_objectives_conformance import BATCH, DATA, OBJECTIVES_UNDER_TEST, TINY, shifted

    assert jax.device_count() == 4, jax.devices()
    compiled = jaxic.compile(shifted, observed=["x"], key=jax.random.key(0), num_steps=0, batch_size=BATCH,
                             validation_size=16, network=TINY, progress=False)
    mesh = parallel.data_mesh()
    for objective in OBJECTIVES_UNDER_TEST:
        optimizer = training.guard(training.default_optimizer(10), trains_model=objective.trains_model)
        state = training.init(compiled.state.params, compiled.state.statistics, optimizer, jax.random.key(1),
                              compiled.state.model_params)
        data = DATA if objective.needs_data else None
        results = []
        for sharding in (None, parallel.batch_sharding(mesh)):
            s, d = (state, data) if sharding is None else parallel.replicate((state, data), mesh)
            step = jax.jit(training.build_step(compiled.graphdef, objective, optimizer, BATCH, compiled.model,
                                               compiled.param_constraints, sharding=sharding))
            s, info = step(s, d)
            results.append((float(info.loss), {k: float(v) for k, v in info.metrics.items()},
                            float(s.model_params["theta"])))
        (loss1, metrics1, theta1), (loss4, metrics4, theta4) = results
        np.testing.assert_allclose(loss4, loss1, rtol=1e-5, atol=1e-5, err_msg=objective.name)
        for k in metrics1:
            np.testing.assert_allclose(metrics4[k], metrics1[k], rtol=1e-4, atol=1e-4, err_msg=objective.name + k)
        np.testing.assert_allclose(theta4, theta1, rtol=1e-6, atol=1e-7, err_msg=objective.name)
        print(objective.name, loss1, loss4)
    print("OK")
''')


@pytest.mark.slow
def test_same_loss_on_one_and_four_devices():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(filter(None, [
               os.getcwd(), os.environ.get("PYTHONPATH")])),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"}
    out = subprocess.run([sys.executable, "-c", FOUR_DEVICES], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-3000:] + out.stderr[-6000:]
