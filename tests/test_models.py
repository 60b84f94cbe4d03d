"""Example models: exact posteriors against brute force and prior importance sampling,
masked/universal twins against each other, and the circuit benchmark's stated facts."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from numpyro.distributions import MaskedDistribution
from numpyro.infer.util import log_density

from jaxic.models import (COMPONENTS, FREQUENCIES_HZ, circuit, circuit_response, fault_label, fault_posterior, hmm,
                          hmm_posterior, hmm_unrolled, latent_response, pedagogical, pedagogical_plate, poisson_branch,
                          poisson_branch_posterior, poisson_branch_universal, random_objects,
                          random_objects_posterior, random_objects_universal, rejection_model,
                          rejection_model_universal, rejection_posterior)

NUM_PRIOR_DRAWS = 200_000


def prior_importance(model, data, key, num=NUM_PRIOR_DRAWS, **kwargs):
    """Self-normalised importance sampling with the prior as proposal: latents and weights."""
    def one(k):
        trace = handlers.trace(handlers.seed(handlers.condition(model, data), k)).get_trace(**kwargs)
        log_w = sum(trace[name]["fn"].log_prob(trace[name]["value"]).sum() for name in data)
        return {name: site["value"] for name, site in trace.items() if site["type"] == "sample"}, log_w

    samples, log_w = jax.jit(jax.vmap(one))(jax.random.split(key, num))
    log_w = np.asarray(log_w, np.float64)
    weights = np.exp(log_w - log_w.max())
    return {k: np.asarray(v) for k, v in samples.items()}, weights / weights.sum()


def assert_weighted_mean(values, weights, expected, where=None, sigmas=5.0, slack=2e-3):
    """The weighted mean of ``values`` (over draws where ``where`` holds) is ``expected``
    within ``sigmas`` Monte Carlo standard errors (delta method for self-normalised IS)."""
    values = np.asarray(values, np.float64)
    w = weights if where is None else weights * where
    w = w / w.sum()
    mean = np.sum(w * values)
    se = math.sqrt(np.sum(w**2 * (values - mean) ** 2))
    assert abs(mean - expected) <= sigmas * se + slack, f"estimate {mean:.4f} vs exact {expected:.4f} (se {se:.4f})"


def executed(site):
    """Whether a traced site ran: the product of every ``handlers.mask`` around it."""
    mask, fn = jnp.ones(site["fn"].batch_shape, bool), site["fn"]
    while isinstance(fn, MaskedDistribution):
        mask, fn = mask & fn._mask, fn.base_dist
    return np.asarray(mask)


def eager_draws(model, num, **kwargs):
    return [{name: site["value"] for name, site in
             handlers.trace(handlers.seed(model, i)).get_trace(**kwargs).items() if site["type"] == "sample"}
            for i in range(num)]


def joint(model, values, **kwargs):
    return float(log_density(model, (), kwargs, values)[0])


# --- exact posteriors -----------------------------------------------------------------------

@pytest.mark.parametrize("obs", [1.0, 9.0])
def test_poisson_branch_posterior_matches_prior_importance_sampling(obs):
    samples, w = prior_importance(poisson_branch, {"obs": obs}, jax.random.key(0))
    exact = poisson_branch_posterior(obs)
    n, upper = samples["n"], samples["n"] > 2
    np.testing.assert_allclose(exact["n_probs"].sum(), 1.0, rtol=1e-9)
    assert_weighted_mean(upper, w, exact["p_branch"])
    assert_weighted_mean(n, w, np.sum(np.arange(61) * exact["n_probs"]))
    for k in range(6):
        assert_weighted_mean(n == k, w, exact["n_probs"][k])
    for branch, ran in (("a", upper), ("b", ~upper)):
        if np.sum(w * ran) > 0.05:  # enough posterior mass for a conditional estimate
            mean, sd = exact[f"{branch}_mean"], exact[f"{branch}_sd"]
            assert_weighted_mean(samples[branch], w, mean, where=ran)
            assert_weighted_mean((samples[branch] - mean) ** 2, w, sd**2, where=ran)


@pytest.mark.parametrize("obs, count_signal", [(3.0, 2.2), (-9.0, 4.6)])
def test_random_objects_posterior_matches_prior_importance_sampling(obs, count_signal):
    samples, w = prior_importance(random_objects, {"obs": obs, "count_signal": count_signal}, jax.random.key(1))
    exact = random_objects_posterior(obs, count_signal)
    exists = np.arange(4) < samples["n"][:, None]
    total = np.sum(np.where(exists, samples["position"], 0.0), -1)
    for k in range(5):
        assert_weighted_mean(samples["n"] == k, w, exact["n_probs"][k])
    assert_weighted_mean(total, w, exact["total_mean"], slack=0.01)
    assert_weighted_mean((total - exact["total_mean"]) ** 2, w, exact["total_sd"] ** 2, slack=0.02)


@pytest.mark.parametrize("obs", [0.3, -1.5])
def test_rejection_posterior_matches_prior_importance_sampling(obs):
    samples, w = prior_importance(rejection_model, {"obs": obs}, jax.random.key(2))
    exact = rejection_posterior(obs)
    ran = np.stack([samples[f"x[{i}]/v"] for i in range(12)], -1)
    attempts = np.where((ran > 0).any(-1), np.argmax(ran > 0, -1) + 1, 12)
    x = np.take_along_axis(ran, attempts[:, None] - 1, -1)[:, 0]
    np.testing.assert_allclose(exact["attempt_probs"].sum(), 1.0, rtol=1e-9)
    assert_weighted_mean(x, w, exact["x_mean"])
    assert_weighted_mean((x - exact["x_mean"]) ** 2, w, exact["x_sd"] ** 2)
    for k in (1, 2, 3, 12):
        assert_weighted_mean(attempts == k, w, exact["attempt_probs"][k - 1])
    if obs == 0.3:  # given acceptance, the number of attempts keeps its prior
        np.testing.assert_allclose(exact["attempt_probs"][:4], 0.5 ** np.arange(1, 5), rtol=1e-3)


@pytest.mark.parametrize("kwargs", [{}, {"num_states": 2, "init_probs": [0.9, 0.1],
                                         "transition": [[0.6, 0.4], [0.05, 0.95]], "means": [0.5, -1.0],
                                         "sd": 1.3}])
def test_hmm_forward_backward_matches_enumeration_of_the_model(kwargs):
    """Brute force sums numpyro's own log joint of ``hmm`` (and ``hmm_unrolled``) over all paths."""
    num_states = kwargs.get("num_states", 3)
    paths = jnp.array(list(itertools.product(range(num_states), repeat=4)))
    scan_joint = jax.jit(jax.vmap(lambda z, y: log_density(hmm, (4,), kwargs, {"z": z, "y": y})[0], (0, None)))
    unrolled_joint = jax.jit(jax.vmap(lambda z, y: log_density(hmm_unrolled, (4,), kwargs, {"y": y} | {
        f"z_{t}": z[t] for t in range(4)})[0], (0, None)))
    for y in (jnp.array([-1.4, -1.6, 0.1, 1.5]), jnp.array([2.5, -0.3, -2.0, 0.4])):
        scanned, unrolled = scan_joint(paths, y), unrolled_joint(paths, y)
        np.testing.assert_allclose(scanned, unrolled, rtol=1e-5)
        exact = hmm_posterior(y, **kwargs)
        np.testing.assert_allclose(exact["log_evidence"], jax.scipy.special.logsumexp(scanned), rtol=1e-5)
        posterior = np.asarray(jax.nn.softmax(scanned))
        marginals = np.stack([(posterior[:, None] * (np.asarray(paths) == k)).sum(0) for k in range(num_states)], -1)
        np.testing.assert_allclose(exact["marginals"], marginals, atol=1e-5)


def test_hmm_sites_have_a_time_axis():
    trace = handlers.trace(handlers.seed(hmm, 0)).get_trace()
    assert trace["z"]["value"].shape == (6,) and trace["y"]["value"].shape == (6,)
    # Sticky defaults: the posterior is informative but not degenerate.
    marginals = hmm_posterior(jnp.array([-1.4, -1.6, 0.1, 1.5, 1.7, 1.2]))["marginals"]
    assert marginals.shape == (6, 3) and marginals.max(-1).max() > 0.9 and marginals.max(-1).min() < 0.6


# --- masked and universal twins -------------------------------------------------------------

def test_poisson_branch_twins_have_the_same_joint_and_executed_sites():
    branches = set()
    for values in eager_draws(poisson_branch_universal, 12):
        branch = "a" if "a" in values else "b"
        branches.add(branch)
        filled = {"a": 17.0, "b": -9.0} | values  # arbitrary values for the site that did not run
        np.testing.assert_allclose(joint(poisson_branch, filled), joint(poisson_branch_universal, values), rtol=1e-5)
        trace = handlers.trace(handlers.substitute(poisson_branch, filled)).get_trace()
        ran = {name for name in ("a", "b") if executed(trace[name])}
        assert ran == {branch}
    assert branches == {"a", "b"}


def test_random_objects_twins_have_the_same_joint():
    counts = set()
    for values in eager_draws(random_objects_universal, 12):
        n = int(values["n"])
        counts.add(n)
        position = jnp.array([float(values[f"position_{k}"]) if k < n else 5.0 + k for k in range(4)])
        masked = {"n": values["n"], "position": position, "obs": values["obs"], "count_signal": values["count_signal"]}
        np.testing.assert_allclose(joint(random_objects, masked), joint(random_objects_universal, values), rtol=1e-5)
        trace = handlers.trace(handlers.substitute(random_objects, masked)).get_trace()
        np.testing.assert_array_equal(executed(trace["position"]), np.arange(4) < n)
    assert len(counts) >= 3


def test_rejection_twins_have_the_same_joint_and_executed_sites():
    attempts_seen = set()
    for values in eager_draws(rejection_model_universal, 16, max_attempts=3):
        attempts = sum(name.startswith("x[") for name in values)
        attempts_seen.add(attempts)
        filled = {f"x[{i}]/v": -3.0 for i in range(3)} | values
        np.testing.assert_allclose(joint(rejection_model, filled, max_attempts=3),
                                   joint(rejection_model_universal, values, max_attempts=3), rtol=1e-5)
        trace = handlers.trace(handlers.substitute(rejection_model, filled)).get_trace(max_attempts=3)
        assert [bool(executed(trace[f"x[{i}]/v"])) for i in range(3)] == [i < attempts for i in range(3)]
    assert {1, 2, 3} <= attempts_seen  # 3 includes the case where every attempt failed


def test_pedagogical_plate_is_pedagogical():
    values = eager_draws(pedagogical, 1, M=5)[0]
    plated = {"x": values["x"], "y": values["y"], "obs": values["obs"],
              "nuisance": jnp.stack([values[f"nuisance_{i}"] for i in range(5)])}
    np.testing.assert_allclose(joint(pedagogical_plate, plated, M=5), joint(pedagogical, values, M=5), rtol=1e-6)


def _observed_under_jit(model, site, **kwargs):
    run = lambda k: handlers.trace(handlers.seed(model, k)).get_trace(**kwargs)[site]["value"]
    return jax.jit(run)(jax.random.key(0))


@pytest.mark.parametrize("model, site, shape", [(pedagogical_plate, "obs", ()), (poisson_branch, "obs", ()),
                                                (random_objects, "count_signal", ()), (hmm, "y", (6,)),
                                                (hmm_unrolled, "y", (6,)), (rejection_model, "obs", ())])
def test_masked_models_jit(model, site, shape):
    value = _observed_under_jit(model, site)
    assert value.shape == shape and bool(jnp.all(jnp.isfinite(value)))


@pytest.mark.parametrize("model", [poisson_branch_universal, random_objects_universal, rejection_model_universal])
def test_universal_models_are_eager_only(model):
    with pytest.raises(jax.errors.ConcretizationTypeError):
        _observed_under_jit(model, "obs")


# --- the circuit ----------------------------------------------------------------------------

NOMINAL = {name: value for name, _, value, _ in COMPONENTS}


def test_circuit_nominal_response():
    assert len(COMPONENTS) == 20 and FREQUENCIES_HZ.shape == (40,)
    db = np.asarray(circuit_response(NOMINAL))
    assert db.dtype == np.float32 and db.shape == (40,)
    np.testing.assert_allclose(db[0], -0.9, atol=0.1)
    passband = db[FREQUENCIES_HZ < 9_000]
    assert passband.min() > -4.0 and 2.0 < passband.max() < 6.0  # a few dB of ripple
    np.testing.assert_allclose(db[np.argmin(abs(FREQUENCIES_HZ - 10_200))], -29.0, atol=1.5)
    assert db[-1] == -100.0 and (db[:-1] > -100.0).all()


def test_circuit_response_stays_finite_for_opens_and_shorts():
    # Worst cases for float32: every open/short multiplies the ABCD entries by ~1e6.
    blocked = {name: 0 if placement == "series" else 1 for name, _, _, placement in COMPONENTS}
    bypassed = {name: 1 if placement == "series" else 0 for name, _, _, placement in COMPONENTS}
    np.testing.assert_array_equal(circuit_response(NOMINAL, blocked), -100.0)
    np.testing.assert_allclose(circuit_response(NOMINAL, bypassed), 0.0, atol=1e-3)
    # Batched values broadcast: one response per row.
    batched = NOMINAL | {"C3": jnp.array([100e-9, 200e-9])}
    assert circuit_response(batched, {"L2": jnp.array([2, 0])}).shape == (2, 40)


@pytest.fixture(scope="module")
def circuit_prior():
    def draw(k):
        trace = handlers.trace(handlers.seed(circuit, k)).get_trace()
        latents = {name: site["value"] for name, site in trace.items() if name != "response"}
        return latents, trace["response"]["fn"].base_dist.loc, trace["response"]["value"]

    return jax.jit(jax.vmap(draw))(jax.random.split(jax.random.key(3), 20_000))


@pytest.mark.slow
def test_circuit_prior_fault_and_floor_fractions(circuit_prior):
    latents, clean, noisy = circuit_prior
    num = clean.shape[0]
    assert bool(jnp.all(jnp.isfinite(noisy))) and noisy.shape == (num, 40)
    faulty = np.stack([latents[f"{name}_faulty"] for name, *_ in COMPONENTS], -1).astype(bool)
    p_fault = 1 - 0.98**8 * 0.96**12  # 8 resistors, 6 L, 6 C: 0.479
    assert abs(faulty.any(-1).mean() - p_fault) < 4 * math.sqrt(p_fault * (1 - p_fault) / num)
    # Blocking faults: an open in a series element or a short in a shunt element.
    mode = np.stack([latents[f"{name}_mode"] for name, *_ in COMPONENTS], -1)
    series = np.array([placement == "series" for *_, placement in COMPONENTS])
    blocking = (faulty & np.where(series, mode == 0, mode == 1)).any(-1)
    p_block = 1 - np.prod([1 - 0.25 * {"R": 0.02, "L": 0.04, "C": 0.04}[kind] for _, kind, *_ in COMPONENTS])
    sd = math.sqrt(p_block * (1 - p_block) / num)
    assert abs(blocking.mean() - p_block) < 4 * sd and abs(p_block - 0.15) < 0.005
    # The nominal circuit reaches the -100 dB floor only at 15 kHz; blocking faults reach it lower down.
    floor_below_top = (np.asarray(clean)[:, :-1] <= -100.0).any(-1)
    assert floor_below_top[blocking].all()
    assert abs(floor_below_top.mean() - 0.15) < 4 * sd + 0.005
    # The public helper recomputes the model's noise-free response from its latents.
    np.testing.assert_allclose(latent_response({k: v[:500] for k, v in latents.items()}), clean[:500], atol=1e-3)


def test_circuit_ignores_values_of_sites_that_did_not_run():
    healthy = {f"{name}_faulty": 0 for name, *_ in COMPONENTS} | {f"{name}_tol": 0.01 for name, *_ in COMPONENTS}
    junk = {f"{name}_{var}": value for name, *_ in COMPONENTS
            for var, value in (("mode", 0), ("drift_up", 1), ("drift_mag", 1e30))}
    # C2 drifts down: its tol (which did not run) must not matter either.
    drift = {"C2_faulty": 1, "C2_mode": 2, "C2_drift_up": 0, "C2_drift_mag": math.log(2.0), "C2_tol": 5.0}

    def clean_response(values):
        trace = handlers.trace(handlers.seed(handlers.substitute(circuit, values), 0)).get_trace()
        return np.asarray(trace["response"]["fn"].base_dist.loc)

    expected = {name: value * math.exp(0.01) for name, value in NOMINAL.items()}
    np.testing.assert_allclose(clean_response(healthy | junk), circuit_response(expected), atol=1e-3)
    np.testing.assert_allclose(clean_response(healthy | junk | drift),
                               circuit_response(expected | {"C2": 50e-9}), atol=1e-3)


def test_fault_label_and_posterior():
    healthy = {f"{name}_{var}": 0 for name, *_ in COMPONENTS for var in ("faulty", "mode", "drift_up")}
    assert fault_label(healthy) == "healthy"
    assert fault_label(healthy | {"L3_faulty": 1, "L3_mode": 0}) == "L3 open"
    assert fault_label(healthy | {"C2_faulty": 1, "C2_mode": 2, "C2_drift_up": 0}) == "C2 drift down"
    batch = {name: np.zeros(3, int) for name in healthy}
    batch["R1_faulty"] = np.array([0, 1, 1])
    batch["R1_mode"] = np.array([2, 1, 1])
    batch["C2_faulty"] = np.array([0, 0, 1])
    batch["C2_mode"] = np.array([0, 2, 2])
    batch["C2_drift_up"] = np.array([0, 1, 1])
    labels = fault_label(batch)
    assert labels == ["healthy", "R1 short", "R1 short + C2 drift up"]
    post = fault_posterior(batch, np.array([1.0, 5.0, 2.0]))
    assert list(post) == ["R1 short", "R1 short + C2 drift up", "healthy"]
    np.testing.assert_allclose(list(post.values()), [5 / 8, 2 / 8, 1 / 8])
    assert list(fault_posterior(batch, np.array([1.0, 5.0, 2.0]), top=1)) == ["R1 short"]
