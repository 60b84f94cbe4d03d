"""Models that never end on some draws stop with a ModelError naming their line, within seconds; compiled
training chunks that run far longer than expected (a sampler stuck in XLA) get a StallWarning naming their steps."""

import inspect
import json
import signal
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers

import jaxic
from jaxic.errors import JaxicError, ModelError
from jaxic.tracing import TraceSpec, derive_universal_spec, limits, sample_universal
from jaxic.tracing.limits import limit_sites, time_limit, user_frame

TIMEOUT = 3.0  # seconds per eager run in these tests (the default is 10)
SMALL = jaxic.networks.FeedForwardConfig(d_model=16, hidden_dim=16, num_layers=1, observe_embedding_dim=16,
                                         num_components=2, obs_hidden=16)


def line_of(function, marker: str) -> str:
    """``file.py:line`` of the line of ``function`` that carries ``marker``."""
    lines, first = inspect.getsourcelines(function)
    index = next(i for i, text in enumerate(lines) if marker in text)
    return f"test_faults_hangs.py:{first + index}"


def samples_forever_sometimes():
    stop = numpyro.sample("stop", dist.Bernoulli(0.8))
    x = numpyro.sample("x", dist.Normal(0.0, 1.0))
    i = 0
    while stop == 0:
        numpyro.sample(f"step_{i}", dist.Normal(0.0, 1.0))  # loops here
        i += 1
    numpyro.sample("obs", dist.Normal(x, 1.0))


def idles_forever_sometimes():
    x = numpyro.sample("x", dist.Normal(0.0, 1.0))
    if x > 1.0:
        while True: pass  # loops here  # noqa: E701
    numpyro.sample("obs", dist.Normal(x, 1.0))


def loops_at_inference():
    x = numpyro.sample("x", dist.Normal(0.0, 1.0))
    y = numpyro.sample("obs", dist.Normal(x, 1.0))
    if x > 0.0:  # Python control flow on a sampled value: the universal path
        numpyro.sample("z", dist.Normal(x, 1.0))
    # Never in training (30 sd out), whenever the data say so at inference.
    if y > 30.0:
        while True: pass  # idles here  # noqa: E701
    i = 0
    while y < -30.0:
        numpyro.factor(f"penalty_{i}", 0.0)  # factors here
        i += 1


@pytest.fixture
def short_timeout(monkeypatch):
    # The default applies wherever no run_timeout was given, so jaxic.compile picks it up.
    monkeypatch.setattr(limits, "DEFAULT_RUN_TIMEOUT", TIMEOUT)


def compile_universal(model, **kwargs):
    # Tiny budgets: these models fail (or are checked) long before training matters.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return jaxic.compile(model, ["obs"], jax.random.key(0), num_steps=0, path="universal", batch_size=8,
                             validation_size=16, pilot_traces=64, progress=False, **kwargs)


def test_compile_stops_a_sampling_loop_at_its_line(short_timeout):
    start = time.monotonic()
    with pytest.raises(ModelError) as info:
        compile_universal(samples_forever_sometimes)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert line_of(samples_forever_sometimes, "loops here") in message, message
    assert f"max_sites_per_run={limits.PILOT_MIN_SITES}" in message and "pilot run" in message
    assert "bounded_while" in message
    assert elapsed < 15.0, elapsed


def test_compile_stops_an_idle_loop_at_its_line(short_timeout):
    start = time.monotonic()
    with pytest.raises(ModelError) as info:
        compile_universal(idles_forever_sometimes)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert line_of(idles_forever_sometimes, "loops here") in message, message
    assert f"run_timeout={TIMEOUT:g} s" in message and "pilot run" in message and "bounded_while" in message
    assert TIMEOUT <= elapsed < TIMEOUT + 12.0, elapsed


@pytest.fixture(scope="module")
def loops_later():
    """The model trains fine: it loops only for observations far outside the prior."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(limits, "DEFAULT_RUN_TIMEOUT", TIMEOUT)
        return compile_universal(loops_at_inference, network=SMALL)


@pytest.mark.slow
def test_posterior_stops_an_idle_loop_at_its_line(loops_later, short_timeout):
    assert loops_later.path == "universal" and loops_later.spec.timeout == TIMEOUT
    post = loops_later.posterior(jax.random.key(1), {"obs": 1.0}, 8)  # fine where the loops do not run
    assert np.isfinite(np.asarray(post.log_weights)).all()
    handler = signal.getsignal(signal.SIGALRM)
    start = time.monotonic()
    with pytest.raises(ModelError) as info:
        loops_later.posterior(jax.random.key(1), {"obs": 50.0}, 8)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert line_of(loops_at_inference, "idles here") in message, message
    assert "importance sampling, particle 1 of 8" in message and f"run_timeout={TIMEOUT:g} s" in message
    assert TIMEOUT <= elapsed < TIMEOUT + 8.0, elapsed
    # The alarm is gone afterwards: the previous handler is back and no timer is left running.
    assert signal.getsignal(signal.SIGALRM) is handler
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_posterior_stops_a_site_loop_at_its_line(loops_later):
    # Pilots reach 2 or 3 sample sites: the bound is 4 x 3 + 100.
    assert loops_later.spec.max_sites_per_run == 112 and loops_later.spec.site_limit == 112
    start = time.monotonic()
    with pytest.raises(ModelError) as info:
        loops_later.posterior(jax.random.key(1), {"obs": -50.0}, 8)
    message = str(info.value)
    assert line_of(loops_at_inference, "factors here") in message, message
    assert "max_sites_per_run=112" in message and "importance sampling, particle 1 of 8" in message
    assert time.monotonic() - start < 8.0


def test_bounds_are_settable_and_stored_in_the_spec():
    with pytest.raises(ModelError, match="max_sites_per_run=1 .*pilot run 1 of 8") as info:
        derive_universal_spec(loops_at_inference, ["obs"], jax.random.key(0), 8, max_sites_per_run=1)
    assert line_of(loops_at_inference, '"obs"') in str(info.value)
    spec = derive_universal_spec(loops_at_inference, ["obs"], jax.random.key(0), 8,
                                 max_sites_per_run=50, run_timeout=2.5)
    assert (spec.site_limit, spec.timeout) == (50, 2.5)
    again = TraceSpec.from_json(spec.to_json())
    assert (again.max_sites_per_run, again.run_timeout) == (50, 2.5) and again == spec
    assert derive_universal_spec(loops_at_inference, ["obs"], jax.random.key(0), 8,
                                 run_timeout=0).timeout is None
    with pytest.raises(JaxicError, match="run_timeout must be"):
        derive_universal_spec(loops_at_inference, ["obs"], jax.random.key(0), 8, run_timeout=-1)
    with pytest.raises(JaxicError, match="max_sites_per_run must be"):
        derive_universal_spec(loops_at_inference, ["obs"], jax.random.key(0), 8, max_sites_per_run=0)


def test_specs_saved_before_the_bounds_still_load():
    spec = derive_universal_spec(loops_at_inference, ["obs"], jax.random.key(0), 8)
    saved = json.loads(spec.to_json())
    del saved["max_sites_per_run"], saved["run_timeout"]
    loaded = TraceSpec.from_json(json.dumps(saved))
    assert loaded == spec and loaded.max_sites_per_run is None and loaded.run_timeout is None
    # Derived from the layout instead: 4 x (max_tokens + observed sites) + 100.
    assert loaded.site_limit == 4 * (spec.max_tokens + 1) + 100
    assert loaded.timeout == limits.DEFAULT_RUN_TIMEOUT == 10.0


def test_training_traces_are_bounded_by_the_spec():
    spec = derive_universal_spec(loops_at_inference, ["obs"], jax.random.key(0), 8,
                                 max_sites_per_run=3)
    assert spec.site_limit == 3

    def longer():  # the same sites, and one factor more than the spec allows
        loops_at_inference()
        for i in range(2):
            numpyro.factor(f"extra_{i}", 0.0)  # one too many

    with pytest.raises(ModelError, match="drawing joint samples") as info:
        sample_universal(spec, longer, jax.random.key(1), 4)
    assert line_of(longer, "one too many") in str(info.value)


def test_time_limit_restores_the_previous_handler_and_timer():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        with time_limit(5.0):
            assert signal.getitimer(signal.ITIMER_REAL)[0] <= 5.0
        left = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 25.0 < left <= 30.0 and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_time_limit_warns_once_off_the_main_thread():
    # The only test that runs a limit off the main thread: the one warning of the process is its own.
    caught, timers = [], []

    def work():
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            for _ in range(2):
                with time_limit(1.0):
                    timers.append(signal.getitimer(signal.ITIMER_REAL))
        caught.extend(records)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert len(caught) == 1 and "no time limit" in str(caught[0].message)
    assert timers == [(0.0, 0.0)] * 2


def test_model_code_that_swallows_exceptions_is_still_stopped():
    def stubborn():
        numpyro.sample("x", dist.Normal(0.0, 1.0))
        while True:
            try:
                time.sleep(0.01)  # keeps going
            except Exception:
                pass

    start = time.monotonic()
    with pytest.raises(ModelError, match="run_timeout=0.5 s") as info:
        with time_limit(0.5, "a test run"):
            handlers.trace(handlers.seed(limit_sites(stubborn, 10), 0)).get_trace()
    assert line_of(stubborn, "keeps going") in str(info.value) and time.monotonic() - start < 5.0


def test_user_frame_skips_library_frames():
    def model():
        numpyro.sample("x", dist.Normal(0.0, float("nan")), rng_key=jax.random.key(0))  # fails here

    with numpyro.validation_enabled():
        try:
            model()
        except ValueError as exc:
            where = user_frame(exc)
    assert line_of(model, "fails here") in where and "numpyro" not in where.split(":")[0]


def test_jax_compilation_does_not_count_against_the_limit():
    def long_to_compile(x):
        for i in range(400):  # unrolled: hundreds of operations to trace, lower and compile
            x = jnp.sin(x) * 1.0001 + i
        return x

    start = time.monotonic()
    with time_limit(0.1, "a test run"):
        value = jax.jit(long_to_compile)(jnp.ones(3))
    assert time.monotonic() - start > 0.1 and np.isfinite(np.asarray(value)).all()


# --- compiled computations that run far too long -------------------------------------------------

def _busy(x, iterations: int, size: int = 256):
    """``x`` again after ``iterations`` matrix products that depend on it: a compiled computation that
    takes a while (a stand-in for a sampler stuck in its loop)."""
    start = jnp.full((size, size), 1.0 / size) * jnp.tanh(x)
    product = jax.lax.fori_loop(0, iterations, lambda i, a: jnp.tanh(a @ a + 0.1), start)
    return x + 0.0 * product[0, 0]


def test_a_computation_that_runs_too_long_is_reported_once():
    busy = jax.jit(lambda x: _busy(x, 3000))
    busy(jnp.float32(1.0)).block_until_ready()  # compiled outside the watch
    with pytest.warns(jaxic.StallWarning) as caught:
        with jaxic.loops.stall_watch("the test computation", warn_after=0.1):
            value = busy(jnp.float32(1.0)).block_until_ready()
    stalls = [w for w in caught if issubclass(w.category, jaxic.StallWarning)]
    assert len(stalls) == 1 and "the test computation has been running for" in str(stalls[0].message)
    assert "while_loop" in str(stalls[0].message) and "restart the process" in str(stalls[0].message)
    np.testing.assert_allclose(np.asarray(value), 1.0)


def test_a_computation_that_finishes_in_time_is_not_reported():
    with warnings.catch_warnings():
        warnings.simplefilter("error", jaxic.StallWarning)
        with jaxic.loops.stall_watch("the test computation", warn_after=0.5):
            jnp.ones(3).block_until_ready()
        time.sleep(0.7)  # the watcher has stopped: nothing is reported after the block either


def _cheap_model():
    x = numpyro.sample("x", dist.Normal(0.0, 1.0))
    numpyro.sample("obs", dist.Normal(x, 1.0))


def _slow_model():
    """Every model run (one per batch of traces) takes 50 ms: a chunk lasts well past the thresholds below."""
    def pause(x):
        time.sleep(0.05)
        return np.asarray(x)

    x = numpyro.sample("x", dist.Normal(0.0, 1.0))
    x = jax.pure_callback(pause, jax.ShapeDtypeStruct(jnp.shape(x), jnp.float32), x, vmap_method="broadcast_all")
    numpyro.sample("obs", dist.Normal(x, 1.0))


def test_training_chunks_are_watched_naming_their_steps(monkeypatch):
    # Thresholds far below a chunk's time, so that every chunk counts as stalled.
    monkeypatch.setattr(jaxic.loops, "COMPILE_STALL_WARNING_SECONDS", 0.01)
    monkeypatch.setattr(jaxic.loops, "STALL_WARNING_SECONDS", 0.01)
    compiled = jaxic.compile(_slow_model, ["obs"], jax.random.key(0), num_steps=0, batch_size=4,
                             validation_size=4, network=SMALL, progress=False)
    with pytest.warns(jaxic.StallWarning, match=r"training steps 0-2 \(compiling, then running\) has been running"):
        compiled.train(3, progress=False)
    with pytest.warns(jaxic.StallWarning, match=r"training steps 3-5 has been running"):
        compiled.train(3, progress=False)
    assert compiled.step == 6  # a report does not stop a chunk that finishes


def test_training_at_normal_speed_is_not_reported():
    with warnings.catch_warnings():
        warnings.simplefilter("error", jaxic.StallWarning)
        compiled = jaxic.compile(_cheap_model, ["obs"], jax.random.key(0), num_steps=60, batch_size=4,
                                 validation_size=4, network=SMALL, progress=False)
        compiled.train(seconds=2, progress=False)
