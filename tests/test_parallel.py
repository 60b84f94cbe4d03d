"""Data parallelism over a device mesh: the same losses, parameters and weights as one device."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import jaxic
from jaxic import parallel
from jaxic.api import objective_metadata
from jaxic.models import pedagogical
from jaxic.objectives import elbo, forward_kl

# Runs in a fresh interpreter: the host platform's device count is fixed when jax starts.
FOUR_DEVICES = textwrap.dedent('''
    import tempfile
    import jax, jax.numpy as jnp, numpy as np
    import numpyro, numpyro.distributions as dist
    import jaxic
    from jaxic.models import pedagogical

    assert jax.device_count() == 4, jax.devices()
    N = 5
    kw = dict(key=jax.random.key(0), num_steps=0, batch_size=8, validation_size=16, progress=False,
              network=jaxic.TransformerConfig(d_model=16, num_layers=1, num_heads=2, num_components=2))

    def close(a, b, rtol=1e-5, atol=0.0):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)

    one = jaxic.compile(pedagogical, observed=["obs"], model_kwargs={"M": 2}, **kw)
    four = jaxic.compile(pedagogical, observed=["obs"], model_kwargs={"M": 2}, devices=4, **kw)
    for leaf in jax.tree.leaves(four.state):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4, leaf.sharding

    # Importance sampling (same parameters), particles split over the devices; two observations at once.
    obs = {"obs": jnp.array([25.0, 4.0])}
    p4 = four.posterior(jax.random.key(1), obs, num_samples=64)
    p1 = one.posterior(jax.random.key(1), obs, num_samples=64)
    close(p4.log_weights, p1.log_weights, atol=1e-3)  # large log p and log q cancel: float32 rounding
    jax.tree.map(lambda a, b: close(a, b, atol=1e-4), p4.samples, p1.samples)
    hlo = four.sampler.lower(four.proposal, None, jax.random.key(1), obs, 64,
                             sharding=four.sharding).compile().as_text()
    assert "num_partitions=4" in hlo.splitlines()[0] and "all-gather" in hlo

    # Forward KL: the same global batch of 8 traces, on one device and split over four.
    one.train(N, progress=False)
    four.train(N, progress=False)
    close(four.history["loss"], one.history["loss"])
    jax.tree.map(lambda a, b: close(a, b, rtol=1e-4, atol=1e-5), four.state.params, one.state.params)
    for leaf in jax.tree.leaves(four.state):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4, leaf.sharding

    # The step is partitioned over the 4 devices and the gradients are all-reduced.
    hlo4 = four.loop.multi_step.lower(four.state, N, None).compile().as_text()
    hlo1 = one.loop.multi_step.lower(one.state, N, None).compile().as_text()
    assert "num_partitions=4" in hlo4.splitlines()[0] and "all-reduce" in hlo4
    assert "all-reduce" not in hlo1

    # Micro-batches of 4 traces, each split over the 4 devices: still the losses of one device.
    micro = dict(kw, microbatch_size=4)
    one_micro = jaxic.compile(pedagogical, observed=["obs"], model_kwargs={"M": 2}, **micro).train(N, progress=False)
    four_micro = jaxic.compile(pedagogical, observed=["obs"], model_kwargs={"M": 2}, devices=4, **micro)
    close(four_micro.train(N, progress=False).history["loss"], one_micro.history["loss"])

    # Clear errors when the work does not split evenly.
    try:
        four.posterior(jax.random.key(1), obs, num_samples=62)
        raise AssertionError("num_samples=62 on 4 devices must fail")
    except jaxic.JaxicError as exc:
        assert "num_samples=62" in str(exc) and "4 devices" in str(exc), exc
    try:
        jaxic.compile(pedagogical, observed=["obs"], model_kwargs={"M": 2}, devices="all", **{**kw, "batch_size": 6})
        raise AssertionError("batch_size=6 on 4 devices must fail")
    except jaxic.JaxicError as exc:
        assert "batch_size=6" in str(exc) and "4 devices" in str(exc), exc

    # Save without the sharding; load back onto the mesh.
    with tempfile.TemporaryDirectory() as folder:
        four.save(folder)
        loaded = jaxic.load(folder, pedagogical, model_kwargs={"M": 2}, devices=4)
    assert all(leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4
               for leaf in jax.tree.leaves(loaded.state))
    jax.tree.map(lambda a, b: close(a, b, rtol=0), loaded.state.params, four.state.params)

    # ELBO with a local plate: minibatches of data points split over the devices.
    def lg(num_data=64):
        theta = numpyro.param("theta", 0.0)
        with numpyro.plate("data", num_data):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("x", dist.Normal(z + theta, 0.5))

    data = {"x": np.asarray(jax.random.normal(jax.random.key(3), (64,))) + 1.0}
    elbo = dict(observed=["x"], objective="elbo", data=data, local_plate="data", **kw)
    e1 = jaxic.compile(lg, **elbo).train(3, progress=False)
    e4 = jaxic.compile(lg, devices=4, **elbo).train(3, progress=False)
    close(e4.history["loss"], e1.history["loss"])
    close(e4.model_params["theta"], e1.model_params["theta"], atol=1e-6)
    print("OK", one.history["loss"][-1], four.history["loss"][-1])
''')


# Two processes ("hosts") with two CPU devices each, joined by jax.distributed: one 4-device mesh.
TWO_HOSTS = textwrap.dedent('''
    import sys
    import jax
    jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    import jax.numpy as jnp, numpy as np
    import jaxic
    from jaxic.models import pedagogical

    assert jax.device_count() == 4 and jax.local_device_count() == 2
    compiled = jaxic.compile(pedagogical, observed=["obs"], model_kwargs={"M": 2}, key=jax.random.key(0),
                             num_steps=0, batch_size=8, validation_size=16, progress=False, devices="all",
                             network=jaxic.TransformerConfig(d_model=16, num_layers=1, num_heads=2, num_components=2))
    post = compiled.posterior(jax.random.key(1), {"obs": jnp.array([25.0, 4.0])}, num_samples=64)
    compiled.checkpoint_to(sys.argv[4], every=2)  # every process saves; the primary writes
    compiled.train(3, progress=False)
    compiled.save(sys.argv[3])
    print("RESULT", repr(compiled.history["loss"]), repr(np.asarray(post.log_weights).tolist()))
''')


@pytest.mark.skipif(not os.environ.get("JAXIC_TEST_MULTIHOST"),
                    reason="about a minute on 2 cores; set JAXIC_TEST_MULTIHOST=1 to run")
def test_two_hosts_match_one_device(tmp_path):
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        address = f"localhost:{probe.getsockname()[1]}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"}
    saved, periodic = tmp_path / "saved", tmp_path / "periodic"
    hosts = [subprocess.Popen([sys.executable, "-c", TWO_HOSTS, address, str(i), str(saved), str(periodic)], env=env,
                              text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outputs = [host.communicate(timeout=600) for host in hosts]
    results = []
    for host, (stdout, stderr) in zip(hosts, outputs):
        assert host.returncode == 0, stdout[-3000:] + stderr[-6000:]
        loss, log_weights = stdout.split("RESULT ")[1].split(" [[")
        results.append((eval(loss), np.asarray(eval("[[" + log_weights))))
    assert results[0][0] == results[1][0]  # every host sees the same replicated values
    np.testing.assert_array_equal(results[0][1], results[1][1])
    single = jaxic.compile(pedagogical, observed=["obs"], model_kwargs={"M": 2}, key=jax.random.key(0),
                           num_steps=0, batch_size=8, validation_size=16, progress=False,
                           network=jaxic.TransformerConfig(d_model=16, num_layers=1, num_heads=2, num_components=2))
    post = single.posterior(jax.random.key(1), {"obs": jax.numpy.array([25.0, 4.0])}, num_samples=64)
    # Large log p and log q cancel in a log weight: compare to float32 rounding of both.
    np.testing.assert_allclose(results[0][1], np.asarray(post.log_weights), rtol=1e-5, atol=1e-3)
    single.train(3, progress=False)
    np.testing.assert_allclose(results[0][0], single.history["loss"], rtol=1e-5)
    # Both processes called save (orbax's barrier): one checkpoint, written once, loadable here.
    loaded = jaxic.load(saved, pedagogical, model_kwargs={"M": 2})
    assert loaded.step == 3 and loaded.history["loss"] == results[0][0]
    assert sorted(os.listdir(periodic)) == ["3", "jaxic.json"]  # one chunk of 3 steps, saved at its end
    resumed = jaxic.load(periodic, pedagogical, model_kwargs={"M": 2})
    jax.tree.map(np.testing.assert_array_equal, resumed.state.params, loaded.state.params)


@pytest.mark.slow
def test_four_devices_match_one_device():
    # Optimisation level 0 only shortens XLA's compile times; both sides run under it.
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"}
    out = subprocess.run([sys.executable, "-c", FOUR_DEVICES], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-3000:] + out.stderr[-6000:]


def test_resolve_devices():
    assert parallel.resolve_devices(None) is None
    assert parallel.resolve_devices("all") == jax.devices()
    assert parallel.resolve_devices(1) == jax.devices()[:1]
    assert parallel.resolve_devices(jax.devices()[:1]) == jax.devices()[:1]
    for bad in ("some", 0, jax.device_count() + 1, [], ["cpu"]):
        with pytest.raises(jaxic.JaxicError, match="devices"):
            parallel.resolve_devices(bad)


def test_mesh_helpers_on_one_device():
    mesh = parallel.data_mesh(jax.devices()[:1])
    assert mesh.axis_names == ("batch",) and mesh.size == 1
    x = np.arange(6.0)
    assert parallel.shard_batch(x, None) is x
    parallel.check_divisible(7, parallel.batch_sharding(mesh), "batch_size")
    parallel.check_divisible(7, None, "batch_size")
    y = jax.jit(lambda v: parallel.shard_batch(v, parallel.batch_sharding(mesh)))(x)
    np.testing.assert_array_equal(np.asarray(y), x)
    assert parallel.replicate({"a": x}, mesh)["a"].sharding.is_fully_replicated


def test_objective_metadata_is_the_factory_and_its_options():
    assert objective_metadata(forward_kl()) == {"name": "forward_kl", "options": {}}
    meta = objective_metadata(elbo(num_particles=3))
    assert json.loads(json.dumps(meta)) == {"name": "elbo", "options": {"num_particles": 3}}
