"""Bad observations and arguments fail up front, by name, before anything is traced or compiled;
latents no head supports say why at compile."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
import numpyro.distributions as dist
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpyro.distributions import constraints

import jaxic
from jaxic import validation
from jaxic.errors import IndexOutOfRangeError, JaxicError, ModelError, ObservationError, UnsupportedDistributionError
from jaxic.networks import MLPEmbedding, SeriesConvEmbedding, TransformerConfig
from jaxic.tracing import ObservedSite

OBSERVED = ["y", "count", "size"]
RUNS = {"model": 0}  # every execution of the model, traced or eager


def model():
    RUNS["model"] += 1
    rate = numpyro.sample("rate", dist.LogNormal(0.0, 0.5))
    numpyro.sample("y", dist.Normal(jnp.log(rate), 1.0).expand([2]).to_event(1))
    numpyro.sample("count", dist.Poisson(rate))
    numpyro.sample("size", dist.Gamma(2.0, rate))


TINY = dict(network=TransformerConfig(d_model=16, num_heads=2, num_layers=1), validation_size=16, progress=False)
GOOD = {"y": [0.1, -0.2], "count": 3, "size": 1.5}


@pytest.fixture(scope="module")
def compiled():
    return jaxic.compile(model, OBSERVED, jax.random.key(0), 0, **TINY)


@pytest.fixture(scope="module")
def batched(compiled):
    obs = {"y": [[0.0, 0.1], [1.0, 1.1], [2.0, 2.1]], "count": [0, 2, 5], "size": [0.5, 1.0, 2.0]}
    return compiled.posterior(jax.random.key(1), obs, num_samples=8)


class CompileCounter:
    """Counts JAX tracing/compilation events (jaxpr tracing, lowering, backend compiles)."""

    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **kwargs):
        if event.startswith("/jax/core/compile/"):
            self.count += 1


@pytest.fixture
def nothing_computed():
    """Asserts that the block it guards neither ran the model nor compiled anything."""
    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    runs = RUNS["model"]
    yield
    jax.monitoring.unregister_event_duration_listener(counter)
    assert RUNS["model"] == runs, "the model ran"
    assert counter.count == 0, "something was traced or compiled"


@pytest.mark.slow
def test_the_guard_sees_a_compiled_call(compiled):
    """Positive control for ``nothing_computed``: a first call with a new size traces and compiles."""
    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    runs = RUNS["model"]
    try:
        post = compiled.posterior(jax.random.key(2), GOOD, num_samples=5)
    finally:
        jax.monitoring.unregister_event_duration_listener(counter)
    assert post.num_samples == 5 and post.batch_shape == ()
    assert RUNS["model"] > runs and counter.count > 0


# ------------------------------------------------------------------------------------------------
# Observations given to posterior

def _with(**changes):
    return {**GOOD, **changes}


BAD_OBSERVATIONS = {
    "list": ([0.1, 3, 1.5], ObservationError, r"must be a dict.*got list.*'y': value, 'count': value"),
    "tuple": ((0.1, 3, 1.5), ObservationError, r"must be a dict.*got tuple"),
    "array": (np.ones(3), ObservationError, r"must be a dict.*got ndarray"),
    "unknown site": ({**GOOD, "z": 1.0}, ObservationError, r"\['z'\] are not observed sites"),
    "non-string site": ({**GOOD, 7: 1.0}, ObservationError, r"\[7\] are not observed sites"),
    "missing site": ({"y": [0.0, 0.0], "count": 1}, ObservationError, r"no observation given for \['size'\]"),
    "string": (_with(size="1.5"), ObservationError, r"site 'size' is '1.5' of type str"),
    "None": (_with(count=None), ObservationError, r"site 'count' is None"),
    "complex": (_with(size=1 + 2j), ObservationError, r"site 'size' is complex \(\(1\+2j\)\)"),
    "object array": (_with(y=np.array([object(), 1.0], dtype=object)), ObservationError,
                     r"site 'y' has dtype object"),
    "dict": (_with(y={"a": 1.0}), ObservationError, r"site 'y' is \{'a': 1.0\} of type dict"),
    "ragged": (_with(y=[[1.0, 2.0], [3.0]]), ObservationError,
               r"site 'y' \(\[\[1.0, 2.0\], \[3.0\]\]\) is not an array"),
    "nan": (_with(y=[0.0, np.nan]), ObservationError, r"site 'y' is not finite: nan at element \[\(1,\)\]"),
    "inf": (_with(size=np.inf), ObservationError, r"site 'size' is not finite: inf"),
    "float32 overflow": (_with(size=1e300), ObservationError, r"site 'size' is not finite after conversion to float32"),
    "nan in a row": ({"y": np.zeros((4, 2)), "count": [1, 2, 3, 4], "size": [1.0, 1.0, np.nan, 1.0]}, ObservationError,
                     r"site 'size' is not finite: nan in row \[2\] of the batch"),
    "negative count": (_with(count=-1), ObservationError, r"site 'count' is outside the support.*-1.0"),
    "fractional count": (_with(count=2.5), ObservationError, r"site 'count' must be integer-valued.*2.5"),
    "zero size": (_with(size=0.0), ObservationError, r"site 'size' is outside the support Positive.*0.0"),
    "negative sizes in rows": ({"y": np.zeros((4, 2)), "count": [1, 2, 3, 4], "size": [1.0, -1.0, 2.0, -3.0]},
                               ObservationError, r"site 'size' is outside the support.*-1.0 in rows \[1, 3\]"),
    "boolean for a continuous site": (_with(y=np.array([True, False])), ObservationError,
                                      r"site 'y' is boolean but the site is continuous"),
    "wrong shape": (_with(y=np.zeros(3)), ObservationError, r"site 'y' has shape \(3,\); expected \(2,\)"),
    "empty batch": ({"y": np.zeros((0, 2)), "count": np.zeros(0), "size": np.zeros(0)}, ObservationError,
                    r"site 'y' is an empty batch"),
    "batches disagree": ({"y": np.zeros((2, 2)), "count": [1, 2, 3], "size": [1.0, 1.0, 1.0]}, ObservationError,
                         r"disagree on the batch.*'y': \(2,\)"),
}


@pytest.mark.parametrize("case", list(BAD_OBSERVATIONS))
def test_bad_observations_fail_before_anything_runs(compiled, nothing_computed, case):
    observations, error, message = BAD_OBSERVATIONS[case]
    with pytest.raises(error, match=message) as info:
        compiled.posterior(jax.random.key(3), observations, num_samples=7)
    assert type(info.value) is error


BAD_POSTERIOR_ARGUMENTS = {
    "int key": (dict(key=0), r"key must be a JAX PRNG key, got 0 of type int \(an int seed is not a key\)"),
    "None key": (dict(key=None), r"key must be a JAX PRNG key, got None"),
    "numpy key": (dict(key=np.zeros(2, np.uint32)), r"key must be a JAX PRNG key, got array"),
    "batch of keys": (dict(key=jax.random.split(jax.random.key(0), 3)), r"key is a batch of keys of shape \(3,\)"),
    "float num_samples": (dict(num_samples=2.5), r"num_samples must be a positive integer, got the float 2.5"),
    "whole float num_samples": (dict(num_samples=1000.0), r"num_samples must be .*float 1000.0.*num_samples=1000"),
    "zero num_samples": (dict(num_samples=0), r"num_samples must be a positive integer, got 0"),
    "bool num_samples": (dict(num_samples=True), r"num_samples must be a positive integer, got the boolean True"),
    "string num_samples": (dict(num_samples="3"), r"num_samples must be a positive integer, got '3' of type str"),
    "defensive share of one": (dict(defensive=1.0), r"defensive=1.0 must be a share of the particles in \[0, 1\)"),
    "negative defensive share": (dict(defensive=-0.1), r"defensive=-0.1 must be a share"),
    "NaN defensive share": (dict(defensive=float("nan")), r"defensive=nan must be a share"),
    "boolean defensive": (dict(defensive=True), r"defensive=True and defensive_scale=3.0 must be numbers"),
    "narrowing defensive_scale": (dict(defensive=0.1, defensive_scale=0.5), r"defensive_scale=0.5 must be a finite widening factor >= 1"),
    "infinite defensive_scale": (dict(defensive=0.1, defensive_scale=float("inf")), r"defensive_scale=inf must be a finite"),
}


@pytest.mark.parametrize("case", list(BAD_POSTERIOR_ARGUMENTS))
def test_bad_posterior_arguments(compiled, nothing_computed, case):
    changes, message = BAD_POSTERIOR_ARGUMENTS[case]
    arguments = {"key": jax.random.key(3), "observations": GOOD, "num_samples": 7, **changes}
    with pytest.raises(JaxicError, match=message) as info:
        compiled.posterior(**arguments)
    assert type(info.value) is JaxicError


def test_legacy_key_gives_the_same_posterior_as_the_typed_key(compiled):
    typed = compiled.posterior(jax.random.key(4), GOOD, num_samples=5)
    legacy = compiled.posterior(jax.random.PRNGKey(4), GOOD, num_samples=5)
    np.testing.assert_array_equal(typed.log_weights, legacy.log_weights)


def test_checked_observations_are_unchanged(compiled):
    """The checks return the same float32 values and batch shape the old in-class check did."""
    values, batch_shape = validation.check_observations(compiled.spec, {"y": [[1, 2]], "count": [3], "size": [0.5]})
    assert batch_shape == (1,)
    np.testing.assert_array_equal(values["y"], np.array([[1.0, 2.0]], np.float32))
    assert values["count"].dtype == jnp.float32 and values["count"].tolist() == [3.0]
    assert validation.check_observations(compiled.spec, GOOD)[1] == ()


# ------------------------------------------------------------------------------------------------
# Supports

def test_observed_supports_keep_only_concrete_supports():
    def m():
        r = numpyro.sample("r", dist.LogNormal(0.0, 1.0))
        numpyro.sample("bounded", dist.Uniform(0.0, 2.0))
        numpyro.sample("dependent", dist.Uniform(0.0, r))
        numpyro.sample("trials", dist.Binomial(10, 0.5))

    supports = validation.observed_supports(m, ["bounded", "dependent", "trials"])
    assert sorted(supports) == ["bounded", "trials"]
    assert float(supports["bounded"].upper_bound) == 2.0 and int(supports["trials"].upper_bound) == 10
    spec = types.SimpleNamespace(observed=(ObservedSite("bounded", ()), ObservedSite("trials", ())))
    with pytest.raises(ObservationError, match=r"site 'trials' is outside the support IntegerInterval.*11.0"):
        validation.check_observations(spec, {"bounded": 1.0, "trials": 11}, supports)
    with pytest.raises(ObservationError, match=r"site 'bounded' is outside the support Interval.*2.5"):
        validation.check_observations(spec, {"bounded": 2.5, "trials": 1}, supports)


def test_observed_supports_of_an_untraceable_model_keep_the_sites_it_reached():
    def m():
        n = numpyro.sample("n", dist.Poisson(2.0))
        numpyro.sample("early", dist.Exponential(1.0))
        if n > 1:  # Python control flow on a sampled value: the abstract run stops here
            numpyro.sample("late", dist.Normal(0.0, 1.0))

    assert list(validation.observed_supports(m, ["early", "late"])) == ["early"]


def test_plate_observations_name_the_row():
    # With a local plate the spec is that of one element: the plate axis has length one.
    spec = types.SimpleNamespace(observed=(ObservedSite("x", (1, 2)),))
    plate = types.SimpleNamespace(name="data")
    values, batch_shape = validation.check_observations(spec, {"x": [1.0, 2.0]}, {"x": constraints.positive}, plate)
    assert batch_shape == () and values["x"].shape == (1, 2)
    values, batch_shape = validation.check_observations(spec, {"x": [[1.0, 2.0]] * 3}, {}, plate)
    assert batch_shape == (3,) and values["x"].shape == (3, 1, 2)
    with pytest.raises(ObservationError, match=r"site 'x' is outside the support Positive.*-1.0 in row \[1\]"):
        validation.check_observations(spec, {"x": [[1.0, 1.0], [1.0, -1.0]]}, {"x": constraints.positive}, plate)
    with pytest.raises(ObservationError, match=r"site 'x' has shape \(3,\); expected \(2,\) for one data point "
                                               r"of plate 'data'"):
        validation.check_observations(spec, {"x": [1.0, 2.0, 3.0]}, {}, plate)


# ------------------------------------------------------------------------------------------------
# compile, load, train

def _compile(**changes):
    arguments = dict(model=model, observed=OBSERVED, key=jax.random.key(0), num_steps=0, **TINY)
    arguments.update(changes)
    return jaxic.compile(**arguments)


BAD_COMPILE_ARGUMENTS = {
    "negative num_steps": (dict(num_steps=-1), r"num_steps must be a non-negative integer, got -1"),
    "float num_steps": (dict(num_steps=2.5), r"num_steps must be .*got the float 2.5"),
    "string num_steps": (dict(num_steps="3"), r"num_steps must be .*got '3' of type str"),
    "zero batch_size": (dict(batch_size=0), r"batch_size must be a positive integer, got 0"),
    "bool batch_size": (dict(batch_size=True), r"batch_size must be .*boolean True"),
    "zero validation_size": (dict(validation_size=0), r"validation_size must be a positive integer, got 0"),
    "float validation_size": (dict(validation_size=1.5), r"validation_size must be .*float 1.5"),
    "zero learning_rate": (dict(learning_rate=0.0), r"learning_rate must be a finite number > 0, got 0.0"),
    "negative learning_rate": (dict(learning_rate=-1), r"learning_rate must be a finite number > 0, got -1.0"),
    "nan learning_rate": (dict(learning_rate=math.nan), r"learning_rate must be a finite number > 0, got nan"),
    "inf learning_rate": (dict(learning_rate=math.inf), r"learning_rate must be a finite number > 0, got inf"),
    "string learning_rate": (dict(learning_rate="0.1"), r"learning_rate must be a positive number, got '0.1'"),
    "negative weight_decay": (dict(weight_decay=-0.1), r"weight_decay must be a finite number >= 0, got -0.1"),
    "string weight_decay": (dict(weight_decay="0.05"), r"weight_decay must be a non-negative number, got '0.05'"),
    "weight_decay with an optimizer": (dict(weight_decay=0.05, optimizer=optax.adam(1e-3)),
                                       r"weight_decay sets the default optimizer's decay, but optimizer= replaces"),
    "zero microbatch_size": (dict(microbatch_size=0), r"microbatch_size must be a positive integer, got 0"),
    "float microbatch_size": (dict(microbatch_size=2.5), r"microbatch_size must be .*float 2.5"),
    "no observed": (dict(observed=[]), r"observed is empty"),
    "int observed": (dict(observed=[1]), r"observed must hold site names \(non-empty strings\), got 1"),
    "repeated observed": (dict(observed=["y", "count", "y"]), r"observed names \['y'\] more than once"),
    "None observed": (dict(observed=None), r"observed must be a list of site names, got None"),
    "int key": (dict(key=0), r"key must be a JAX PRNG key, got 0"),
    "None key": (dict(key=None), r"key must be a JAX PRNG key, got None"),
    "numpy key": (dict(key=np.array([0, 0], np.uint32)), r"key must be a JAX PRNG key, got array"),
    "batch of legacy keys": (dict(key=jax.random.split(jax.random.PRNGKey(0), 2)), r"key is a batch of 2 legacy keys"),
    "None model": (dict(model=None), r"model must be a NumPyro model function, got None"),
    "string model": (dict(model="model"), r"model must be a NumPyro model function, got 'model'"),
    "distribution model": (dict(model=dist.Normal(0.0, 1.0)), r"model must be .*got the distribution"),
    "embedder for an unknown site": (dict(observation_embedders={"z": "mlp"}),
                                     r"observation_embedders names 'z', which is not an observed site; the observed "
                                     r"sites are \['y', 'count', 'size'\]"),
    "unknown embedder name": (dict(observation_embedders={"y": "conv"}),
                              r"observation_embedders\['y'\] = 'conv' is not a known embedder; choose one of"),
    "embedder of the wrong type": (dict(observation_embedders={"y": 3}),
                                   r"observation_embedders\['y'\] is a int; give an embedder configuration"),
    "embedders not a dict": (dict(observation_embedders=["mlp"]), r"observation_embedders must be a dict"),
}


@pytest.mark.parametrize("case", list(BAD_COMPILE_ARGUMENTS))
def test_bad_compile_arguments_fail_before_the_model_runs(case):
    changes, message = BAD_COMPILE_ARGUMENTS[case]
    runs = RUNS["model"]
    with pytest.raises(JaxicError, match=message) as info:
        _compile(**changes)
    assert type(info.value) is JaxicError
    assert RUNS["model"] == runs


@pytest.mark.parametrize("embedder, message", [
    (SeriesConvEmbedding(channels=3), r"observed site 'y' has 2 values \(shape \(2,\)\), not a multiple of "
                                      r"SeriesConvEmbedding\(channels=3\)"),
    (SeriesConvEmbedding(kernel_size=0), r"observed site 'y': SeriesConvEmbedding\(kernel_size=0\) must be an integer >= 1"),
    (SeriesConvEmbedding(num_layers=-1), r"SeriesConvEmbedding\(num_layers=-1\) must be an integer >= 0"),
    (MLPEmbedding(hidden=2.5), r"observed site 'y': MLPEmbedding\(hidden=2.5\) must be an integer >= 1"),
])
def test_embedder_options_that_do_not_fit_the_site_name_it(embedder, message):
    with pytest.raises(JaxicError, match=message):
        _compile(observation_embedders={"y": embedder})


def test_load_checks_the_model_before_the_checkpoint(tmp_path):
    with pytest.raises(JaxicError, match=r"model must be a NumPyro model function, got None") as info:
        jaxic.load(tmp_path / "missing", None)
    assert type(info.value) is JaxicError  # not a CheckpointError: the path was never read


@pytest.mark.parametrize("num_steps, message", [(-1, r"got -1"), (2.5, r"float 2.5"), ("10", r"'10' of type str")])
def test_bad_train_steps(compiled, nothing_computed, num_steps, message):
    step = compiled.step
    with pytest.raises(JaxicError, match=r"num_steps must be a non-negative integer.*" + message):
        compiled.train(num_steps, progress=False)
    assert compiled.step == step


# ------------------------------------------------------------------------------------------------
# Posterior indexing and quantiles

@pytest.mark.parametrize("index, error, message", [
    (3, IndexOutOfRangeError, r"index 3 is out of range for 3 observation sets; use 0 to 2"),
    (-4, IndexOutOfRangeError, r"index -4 is out of range for 3"),
    (np.array([0, 5]), IndexOutOfRangeError, r"index 5 \(in array\(\[0, 5\]\)\) is out of range"),
    (1.5, JaxicError, r"cannot index observation sets with 1.5 of type float"),
    (True, JaxicError, r"index True is a boolean"),
    ("0", JaxicError, r"cannot index observation sets with '0' of type str"),
])
def test_posterior_index_out_of_range(batched, index, error, message):
    with pytest.raises(error, match=message) as info:
        batched[index]
    assert type(info.value) is error
    assert isinstance(info.value, IndexError) == (error is IndexOutOfRangeError)


def test_posterior_indexing_in_range_and_iteration(batched, compiled):
    np.testing.assert_array_equal(batched[-1].log_weights, batched.log_weights[2])
    np.testing.assert_array_equal(batched[np.int64(1)].log_weights, batched.log_weights[1])
    assert batched[1:].batch_shape == (2,) and batched[[0, 2]].batch_shape == (2,)
    # Iteration stops at the end (before, out-of-range indices were clamped: an endless loop).
    assert [p.batch_shape for p in batched] == [(), (), ()]
    single = compiled.posterior(jax.random.key(2), GOOD, num_samples=5)
    with pytest.raises(IndexOutOfRangeError, match=r"single observation set.*got index 0"):
        single[0]


@pytest.mark.parametrize("q, message", [
    (1.5, r"q must lie in \[0, 1\], got 1.5"),
    (-0.1, r"q must lie in \[0, 1\], got -0.1"),
    (math.nan, r"q must lie in \[0, 1\], got nan"),
    ([0.5, 2.0], r"q must lie in \[0, 1\], got 2.0 in \[0.5, 2.0\]"),
    ("0.5", r"q must be a probability in \[0, 1\] or a sequence of them, got '0.5'"),
    ([], r"q must be one probability or a flat, non-empty sequence"),
    (True, r"q must be a probability in \[0, 1\].*got True"),
])
def test_quantile_outside_the_unit_interval(batched, q, message):
    with pytest.raises(JaxicError, match=message) as info:
        batched.quantile("rate", q)
    assert type(info.value) is JaxicError


# ------------------------------------------------------------------------------------------------
# Latents no head supports

def delta_model():
    x = numpyro.sample("x", dist.Delta(1.0))
    numpyro.sample("obs", dist.Normal(x, 1.0))


def improper_model():
    x = numpyro.sample("x", dist.ImproperUniform(constraints.positive, (), ()))
    numpyro.sample("obs", dist.Normal(x, 1.0))


def delta_in_plate_model():
    with numpyro.plate("n", 3):
        x = numpyro.sample("x", dist.Delta(jnp.ones(3)))
        numpyro.sample("obs", dist.Normal(x, 1.0))


def improper_observed_model():
    x = numpyro.sample("x", dist.Normal(0.0, 1.0))
    numpyro.sample("obs", dist.ImproperUniform(constraints.real, (), ()))


@pytest.mark.parametrize("path", ["masked", "universal"])
@pytest.mark.parametrize("latent_model, message", [
    (delta_model, r"site 'x' is a Delta.*a Delta site has no density to propose; .*numpyro.deterministic"),
    (improper_model, r"site 'x' has an improper distribution \(ImproperUniform.*an improper prior cannot be "
                     r"simulated for inference compilation.*give the site a proper prior"),
    (delta_in_plate_model, r"site 'x' is a Delta"),
    (improper_observed_model, r"observed site 'obs' has an improper distribution"),
])
def test_unsupported_latents_say_why(latent_model, message, path):
    with pytest.raises(UnsupportedDistributionError, match=message):
        jaxic.compile(latent_model, ["obs"], jax.random.key(0), 0, path=path, pilot_traces=4, **TINY)


def test_delta_drawn_from_its_prior_is_still_refused():
    def m():
        x = numpyro.sample("x", dist.Delta(1.0), infer={"jaxic": {"propose": False}})
        z = numpyro.sample("z", dist.Normal(x, 1.0))
        numpyro.sample("obs", dist.Normal(z, 1.0))

    with pytest.raises(UnsupportedDistributionError, match=r"site 'x' is a Delta"):
        jaxic.compile(m, ["obs"], jax.random.key(0), 0, **TINY)


# ------------------------------------------------------------------------------------------------
# Fuzzing: only JaxicErrors escape, and valid input passes

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = st.sampled_from([np.bool_, np.int8, np.int32, np.int64, np.uint8, np.uint64, np.float16, np.float32,
                          np.float64, np.complex64])
ARRAYS = hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))  # NaN, inf too
PYTHON_OBJECTS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=3),
                           st.binary(max_size=3), st.complex_numbers(),
                           st.lists(st.one_of(st.floats(), st.integers(), st.text(max_size=2)), max_size=3),
                           st.dictionaries(st.text(max_size=2), st.floats(), max_size=2), st.tuples(st.floats()))
VALUES = st.one_of(ARRAYS, PYTHON_OBJECTS)
OBSERVATIONS = st.one_of(
    st.fixed_dictionaries({"y": VALUES, "count": VALUES, "size": VALUES}),
    st.dictionaries(st.one_of(st.sampled_from(OBSERVED + ["z"]), st.integers()), VALUES, max_size=4),
    PYTHON_OBJECTS, ARRAYS)


def _satisfies_model(values: dict, batch_shape: tuple) -> bool:
    """An independent oracle: finite, y a 2-vector, count a non-negative integer, size positive."""
    y, count, size = (np.asarray(values[k]) for k in OBSERVED)
    return (y.shape == batch_shape + (2,) and count.shape == size.shape == batch_shape
            and np.isfinite(y).all() and (count >= 0).all() and (count % 1 == 0).all() and (size > 0).all()
            and np.isfinite(size).all() and np.isfinite(count).all())


@pytest.fixture(scope="module")
def supports():
    return validation.observed_supports(model, OBSERVED)


def test_supports_of_the_fixture_model(supports):
    assert {k: type(v).__name__ for k, v in supports.items()} == {
        "y": "_Real", "count": "_IntegerNonnegative", "size": "_Positive"}


@FUZZ
@given(observations=OBSERVATIONS)
def test_fuzz_check_observations(compiled, supports, observations):
    try:
        values, batch_shape = validation.check_observations(compiled.spec, observations, supports)
    except JaxicError:
        return
    assert _satisfies_model(values, batch_shape)


@FUZZ
@given(n=st.sampled_from([None, 1, 4]), data=st.data())
def test_fuzz_valid_observations_pass(compiled, supports, n, data):
    shape = () if n is None else (n,)
    floats = dict(allow_nan=False, allow_infinity=False, width=32)
    y = data.draw(hnp.arrays(np.float64, shape + (2,), elements=st.floats(-1e6, 1e6, **floats)))
    count = data.draw(hnp.arrays(data.draw(st.sampled_from([np.int32, np.int64, np.float32])), shape,
                                 elements=st.integers(0, 10_000)))
    tiny, huge = float(np.float32(1e-30)), float(np.float32(1e30))  # bounds float32 can represent
    size = data.draw(hnp.arrays(np.float64, shape, elements=st.floats(tiny, huge, **floats)))
    values, batch_shape = validation.check_observations(compiled.spec, {"y": y, "count": count, "size": size},
                                                        supports)
    assert batch_shape == shape
    np.testing.assert_array_equal(values["count"], count.astype(np.float32))
    np.testing.assert_array_equal(values["size"], size.astype(np.float32))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(observations=st.one_of(
    st.fixed_dictionaries({"y": hnp.arrays(np.float32, (2,), elements=st.floats(-5, 5, width=32)),
                           "count": st.integers(-2, 6), "size": st.floats(-1.0, 3.0)}),
    OBSERVATIONS))
@example(observations=GOOD)  # valid ones must pass (compiled once: same size and batch as `batched`)
@example(observations={"y": np.zeros((3, 2)), "count": [0, 1, 2], "size": [1.0, 2.0, 3.0]})
def test_fuzz_posterior_observations(compiled, observations):
    try:
        post = compiled.posterior(jax.random.key(5), observations, num_samples=8)
    except JaxicError:
        return
    values, batch_shape = validation.check_observations(compiled.spec, observations)
    assert _satisfies_model(values, batch_shape) and post.batch_shape == batch_shape
    assert np.isfinite(np.asarray(post.log_weights)).all()


ANYTHING = st.one_of(PYTHON_OBJECTS, st.integers(-5, 5), st.floats(-5, 5), ARRAYS)


@FUZZ
@given(value=ANYTHING)
def test_fuzz_integer_validators(value):
    integral = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu")
    for validator, minimum in ((validation.positive_int, 1), (validation.nonnegative_int, 0)):
        if integral and int(value) >= minimum:
            assert validator("n", value) == int(value) and type(validator("n", value)) is int
        else:
            with pytest.raises(JaxicError, match=r"\bn\b"):
                validator("n", value)


@FUZZ
@given(value=ANYTHING)
def test_fuzz_positive_float(value):
    number = (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
        isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf")
    if number and math.isfinite(float(value)) and float(value) > 0:
        assert validation.positive_float("rate", value) == float(value)
    else:
        with pytest.raises(JaxicError, match=r"rate"):
            validation.positive_float("rate", value)


@FUZZ
@given(value=st.one_of(ANYTHING, st.integers(0, 2**31).map(jax.random.key),
                       st.integers(0, 2**31).map(jax.random.PRNGKey),
                       st.integers(1, 3).map(lambda n: jax.random.split(jax.random.key(0), n))))
def test_fuzz_prng_key(value):
    valid = isinstance(value, jax.Array) and (
        (jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key) and value.shape == ())
        or (value.dtype == jnp.uint32 and value.shape == (2,)))
    if valid:
        key = validation.prng_key("key", value)
        assert key.shape == () and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    else:
        with pytest.raises(JaxicError, match=r"key"):
            validation.prng_key("key", value)


@FUZZ
@given(value=st.one_of(st.text(max_size=3), st.lists(st.one_of(st.text(max_size=2), st.integers()), max_size=4),
                       st.tuples(st.text(max_size=2), st.text(max_size=2)), PYTHON_OBJECTS))
def test_fuzz_observed_names(value):
    names = [value] if isinstance(value, str) else value
    valid = (isinstance(names, (list, tuple)) and len(names) > 0 and len(set(names)) == len(names)
             and all(isinstance(n, str) and n for n in names))
    if valid:
        assert validation.observed_names(value) == list(names)
    else:
        with pytest.raises(JaxicError, match=r"observed"):
            validation.observed_names(value)


@FUZZ
@given(q=st.one_of(st.floats(), st.lists(st.floats(), max_size=3), PYTHON_OBJECTS))
def test_fuzz_probability(q):
    values = [q] if isinstance(q, (int, float)) else q
    valid = (isinstance(values, (list, tuple)) and len(values) > 0
             and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in values))
    if valid:
        assert validation.probability("q", q) is q
    else:
        with pytest.raises(JaxicError, match=r"\bq\b"):
            validation.probability("q", q)


@FUZZ
@given(index=st.one_of(st.integers(-10, 10), ANYTHING), size=st.integers(1, 6))
def test_fuzz_index_in_range(index, size):
    if isinstance(index, int) and not isinstance(index, bool):
        if -size <= index < size:
            assert validation.index_in_range(index, size) == index % size
        else:
            with pytest.raises(IndexOutOfRangeError, match=rf"index {index} is out of range for {size}"):
                validation.index_in_range(index, size)
        return
    try:
        validation.index_in_range(index, size)
    except JaxicError:
        pass


def branching_in_python():
    if numpyro.sample("switch", dist.Bernoulli(0.5)) > 0:
        numpyro.sample("extra", dist.Normal(0.0, 1.0))
    numpyro.sample("obs", dist.Normal(0.0, 1.0))


def test_defensive_mixture_needs_the_compiled_path():
    compiled = jaxic.compile(branching_in_python, ["obs"], jax.random.key(0), num_steps=0, path="universal",
                             batch_size=8, validation_size=16, pilot_traces=16, progress=False)
    with pytest.raises(JaxicError, match=r"defensive=0.1 needs the compiled \(masked\) path.*path='universal'.*defensive=0.0"):
        compiled.posterior(jax.random.key(0), {"obs": 0.5}, 10, defensive=0.1)


@pytest.mark.parametrize("infer, message", [
    ({"jaxic": {"scale": "sqrt"}}, r"observed site 'obs' has infer=\{'jaxic': \{'scale': 'sqrt'\}\}; it must be one of 'linear', 'log', 'logit'"),
    ({"jaxic": {"propose": False}}, r"observed site 'obs' has unknown jaxic options \['propose'\].*takes 'scale'"),
])
def test_a_bad_observation_scale_option_names_the_site(infer, message):
    def model():
        x = numpyro.sample("x", dist.Normal(0.0, 1.0))
        numpyro.sample("obs", dist.LogNormal(x, 1.0), infer=infer)

    with pytest.raises(ModelError, match=message):
        jaxic.compile(model, ["obs"], jax.random.key(0), num_steps=0, progress=False)


BAD_SELECTIONS = {
    "no candidates": (dict(candidates=[]), r"candidates must be a non-empty list of dicts"),
    "one dict, not a list": (dict(candidates={"weight_decay": 0.1}), r"candidates must be a non-empty list"),
    "a candidate that is no dict": (dict(candidates=[{}, "compact"]), r"candidates\[1\] must be a dict"),
    "a candidate changing the key": (dict(candidates=[{}, {"key": jax.random.key(1)}]),
                                     r"candidates\[1\] sets \['key'\], which a candidate may not change"),
    "a candidate changing the held-out set": (dict(candidates=[{"validation_size": 8}]),
                                              r"candidates\[0\] sets \['validation_size'\]"),
    "checkpoints of several models": (dict(checkpoint_dir="ckpt"), r"does not take checkpoint_dir="),
    "a bad value in a later candidate": (dict(candidates=[{}, {"weight_decay": -1}]),
                                         r"candidates\[1\]\['weight_decay'\] must be a finite number >= 0, "
                                         r"got -1.0"),
}


@pytest.mark.parametrize("case", list(BAD_SELECTIONS))
def test_bad_compile_best_arguments_fail_before_the_model_runs(case):
    changes, message = BAD_SELECTIONS[case]
    runs = RUNS["model"]
    with pytest.raises(JaxicError, match=message):
        jaxic.compile_best(model, OBSERVED, jax.random.key(0), 5, **{**TINY, **changes})
    assert RUNS["model"] == runs
