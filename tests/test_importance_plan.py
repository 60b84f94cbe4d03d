"""The masked sampler runs the model only where a token's mask or prior-drawn value can change.

Reference: the sampler as it was, running the model before every token (``reference_particles``
below); the new one must give the same particles, bit for bit or to float rounding.
"""

import functools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from flax import nnx
from numpyro import handlers
from numpyro.contrib.control_flow import scan

import jaxic
from jaxic.inference import log_joint, sample_particles
from jaxic.inference.importance import decode_plan, substituted_trace
from jaxic.models import hmm, pedagogical, poisson_branch, random_objects, rejection_model
from jaxic.models.control_flow import pedagogical_plate
from jaxic.networks import TransformerConfig
from jaxic.tracing import trace_to_tokens
from jaxic.tracing.dependence import dependent_outputs
from jaxic.tracing.spec import site_mask

NETWORK = TransformerConfig(d_model=16, num_heads=2, num_layers=1, num_components=2, obs_hidden=16)
PARTICLES = 32


def reference_particles(network, spec, model, key, observations, num_particles):
    """The former sampler: before every token, the whole model runs with the values decoded so far."""
    observations = {k: jnp.asarray(v, jnp.float32) for k, v in observations.items()}
    layout = {k: jnp.asarray(v) for k, v in spec.token_layout().items()}
    prior_token = jnp.asarray([not spec.latents[a].propose for a in spec.token_layout()["address"]])
    has_prior = not all(s.propose for s in spec.latents)
    run = functools.partial(substituted_trace, spec, model, observations)

    def particle(key):
        proposal_key, model_key = jax.random.split(key)

        def decode_one(carry, inputs):
            state, values = carry
            t, key, address, instance, dist_type, teacher = inputs
            tokens, _ = trace_to_tokens(spec, run(model_key, values))
            given = (tokens.value[t], teacher) if has_prior else (None, None)
            state, value, log_q = network.decode(state, key, address, instance, dist_type, tokens.mask[t], *given)
            return (state, values.at[t].set(value)), log_q

        inputs = (jnp.arange(spec.num_tokens), jax.random.split(proposal_key, spec.num_tokens), layout["address"],
                  layout["instance"], layout["dist_type"], prior_token)
        init = (network.init_decode(observations), jnp.zeros((spec.num_tokens, spec.value_dim)))
        (_, values), log_q_tokens = jax.lax.scan(decode_one, init, inputs)
        trace = run(model_key, values)
        tokens, _ = trace_to_tokens(spec, trace)
        proposed = tokens.mask & ~prior_token
        log_q = jnp.sum(jnp.where(proposed, log_q_tokens - tokens.log_jacobian, 0.0))
        log_q = log_q + sum((jnp.sum(trace[s.name]["fn"].log_prob(trace[s.name]["value"]))
                             for s in spec.latents if not s.propose), jnp.zeros(()))
        log_w = log_joint(trace) - log_q
        samples = {s.name: trace[s.name]["value"] for s in spec.latents}
        executed = {s.name: site_mask(trace[s.name]["fn"], s.batch_shape) for s in spec.latents}
        return samples, jnp.where(jnp.isnan(log_w), -jnp.inf, log_w), executed

    return jax.vmap(particle)(jax.random.split(key, num_particles))


def proposal_for(model, observed, **model_kwargs):
    return jaxic.proposal.init(model, observed, jax.random.key(0), network=NETWORK, model_kwargs=model_kwargs,
                               statistics_size=128)


def both_samplers(proposal, observations, key=jax.random.key(3), num_particles=PARTICLES):
    spec, model = proposal.spec, proposal.bound_model

    @jax.jit
    def run(proposal, key, observations):
        new = sample_particles(proposal.network, spec, model, key, observations, num_particles)
        old = reference_particles(proposal.network, spec, model, key, observations, num_particles)
        return (new.samples, new.log_weights, new.executed), old

    return run(proposal, key, observations)


def assert_same_particles(new, old, spec):
    (samples, log_w, executed), (old_samples, old_log_w, old_executed) = new, old
    for site in spec.latents:
        np.testing.assert_array_equal(executed[site.name], old_executed[site.name], err_msg=site.name)
        if site.is_discrete:
            np.testing.assert_array_equal(samples[site.name], old_samples[site.name], err_msg=site.name)
        else:
            np.testing.assert_allclose(samples[site.name], old_samples[site.name], rtol=1e-5, atol=1e-6,
                                       err_msg=site.name)
    finite = np.isfinite(old_log_w)
    np.testing.assert_array_equal(np.isfinite(log_w), finite)
    np.testing.assert_allclose(np.asarray(log_w)[finite], np.asarray(old_log_w)[finite], rtol=1e-5, atol=1e-4)
    assert finite.sum() > 0


# --- models ---------------------------------------------------------------------------------

def prior_drawn(noise: float = 0.5):
    """A prior-drawn site between proposed ones (its parameters depend on a proposed value), a
    prior-drawn constant, and a mask that depends on the prior draw."""
    x = numpyro.sample("x", dist.Normal(0.0, 2.0))
    u = numpyro.sample("u", dist.Normal(jnp.full(3, x), 1.0), infer={"jaxic": {"propose": False}})
    c = numpyro.sample("c", dist.Delta(jnp.asarray(1.5)), infer={"jaxic": {"propose": False}})
    with handlers.mask(mask=u[0] > 0):
        z = numpyro.sample("z", dist.Normal(c * u.sum(), 1.0))
    numpyro.sample("obs", dist.Normal(x + z, noise))


def scan_masked(num_steps: int = 4):
    """Inside ``scan``: a prior-drawn walk ``w``, a proposed ``z`` executed while the walk is positive."""

    def step(w_prev, t):
        w = numpyro.sample("w", dist.Normal(w_prev, 1.0), infer={"jaxic": {"propose": False}})
        with handlers.mask(mask=w > 0):
            z = numpyro.sample("z", dist.Normal(w, 1.0))
        numpyro.sample("y", dist.Normal(jnp.where(w > 0, z, 0.0), 0.5))
        return w, None

    scan(step, jnp.zeros(()), jnp.arange(num_steps))


CASES = {
    "pedagogical": (pedagogical, ["obs"], {"M": 3}, {"obs": 25.0}),
    "plate": (pedagogical_plate, ["obs"], {"M": 4}, {"obs": 25.0}),
    "poisson_branch": (poisson_branch, ["obs"], {}, {"obs": 4.0}),
    "random_objects": (random_objects, ["obs", "count_signal"], {}, {"obs": 3.0, "count_signal": 2.2}),
    "rejection": (rejection_model, ["obs"], {"max_attempts": 4}, {"obs": 0.7}),
    "prior_drawn": (prior_drawn, ["obs"], {}, {"obs": 1.0}),
    "hmm": (hmm, ["y"], {"num_steps": 4}, {"y": jnp.array([-1.4, 0.1, 1.5, 1.2])}),
    "scan_masked": (scan_masked, ["y"], {}, {"y": jnp.array([0.3, -0.5, 1.0, 2.0])}),
}

# Tokens whose mask or prior-drawn value can change (dynamic) and those before which the model runs.
EXPECTED_PLAN = {
    "pedagogical": ([0] * 5, [0] * 5),
    "plate": ([0] * 6, [0] * 6),
    "poisson_branch": ([0, 1, 1], [0, 1, 1]),  # n; a and b masked by n
    "random_objects": ([0, 1, 1, 1, 1], [0, 1, 0, 0, 0]),  # n; the plate of 4 positions runs the model once
    "rejection": None,  # checked below: every attempt after the first is masked by the earlier ones
    "prior_drawn": ([0, 1, 1, 1, 0, 1], [0, 1, 0, 0, 0, 1]),  # x; u (3, prior); c (a constant); z (masked by u)
    "hmm": ([0] * 4, [0] * 4),
    "scan_masked": ([1] * 8, [1] * 8),  # time-major w_t, z_t: each its own site at each step
}


# The fast tier keeps one model of each kind (static, masked by a draw, scan); the rest run in the whole suite.
FAST_CASES = {"pedagogical", "poisson_branch", "hmm"}


@pytest.fixture(scope="module", params=[name if name in FAST_CASES else pytest.param(name, marks=pytest.mark.slow)
                                        for name in CASES])
def case(request):
    model, observed, kwargs, observations = CASES[request.param]
    return request.param, proposal_for(model, observed, **kwargs), observations


def test_decode_plan_is_exact(case):
    name, proposal, observations = case
    plan = decode_plan(proposal.spec, proposal.bound_model, observations, jax.random.key(0))
    if name == "rejection":
        first = proposal.spec.latents[0].num_tokens
        assert not plan.dynamic[:first].any() and plan.dynamic[first:].all()
        return
    dynamic, refresh = EXPECTED_PLAN[name]
    np.testing.assert_array_equal(plan.dynamic, np.asarray(dynamic, bool))
    np.testing.assert_array_equal(plan.refresh, np.asarray(refresh, bool))


def test_particles_match_the_former_sampler(case):
    name, proposal, observations = case
    new, old = both_samplers(proposal, observations)
    assert_same_particles(new, old, proposal.spec)


@pytest.mark.slow
def test_chunked_particles_match_one_call():
    proposal = proposal_for(random_objects, ["obs", "count_signal"])
    observations = {"obs": 3.0, "count_signal": 2.2}
    run = lambda chunk: jax.jit(lambda p, k: sample_particles(p.network, p.spec, p.bound_model, k, observations, 16,
                                                               chunk_size=chunk).log_weights)(proposal,
                                                                                              jax.random.key(5))
    np.testing.assert_allclose(run(4), run(None), rtol=1e-6)


# --- how often the model runs ----------------------------------------------------------------

MARKER = "jaxic_test_model_run"


def marked(model):
    """``model`` with one named call per run, to count its runs in a jaxpr."""

    def tag(key):
        return jax.random.key_data(key).sum()

    tag.__name__ = MARKER
    tag = jax.jit(tag)

    def run(**kwargs):
        model(**kwargs)
        numpyro.deterministic("marker", tag(numpyro.prng_key()))  # a traced operand: the call stays in the jaxpr

    return run


def runs_per_call(closed_jaxpr) -> int:
    """Model runs in a jaxpr: marker calls, times the trip count of every enclosing loop."""

    def count(jaxpr, weight):
        total = 0
        for eqn in jaxpr.eqns:
            if eqn.params.get("name") == MARKER:
                total += weight
            inner = weight * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                total += count(sub, inner)
        return total

    return count(closed_jaxpr.jaxpr, 1)


def sampler_jaxpr(sampler, model, M):
    proposal = proposal_for(marked(model), ["obs"], M=M)
    return jax.make_jaxpr(lambda p, k: sampler(p.network, p.spec, p.bound_model, k, {"obs": 25.0}, 4)[1])(
        proposal, jax.random.key(0))


@pytest.mark.slow
def test_model_without_dynamic_sites_runs_a_fixed_number_of_times():
    new = [runs_per_call(sampler_jaxpr(sample_particles, pedagogical, M)) for M in (2, 12)]
    old = [runs_per_call(sampler_jaxpr(reference_particles, pedagogical, M)) for M in (2, 12)]
    # One run shared by all particles (fixed masks) and one per particle (the final trace).
    assert new == [2, 2]
    # The former sampler ran the model before each of the M + 2 tokens, then once more.
    assert old == [5, 15]


def test_dynamic_site_runs_the_model_once_per_site():
    calls = []

    def counted():
        jax.debug.callback(lambda: calls.append(1))
        random_objects()

    proposal = proposal_for(counted, ["obs", "count_signal"])
    observations = {"obs": 3.0, "count_signal": 2.2}
    calls.clear()  # the runs that derived the spec and the statistics
    jax.block_until_ready(jax.jit(lambda p, k: sample_particles(p.network, p.spec, p.bound_model, k, observations,
                                                                1).log_weights)(proposal, jax.random.key(0)))
    # The fixed run, one run before the plate of positions (not one per position), the final trace.
    assert len(calls) == 3


# --- dependence ------------------------------------------------------------------------------

def test_dependent_outputs_follows_loops_and_branches():
    def f(a, b):
        def body(carry, _):
            first, second = carry
            return (second, a), first  # a reaches `first` only after two steps

        (first, second), ys = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(())), None, length=3)
        (held,), _ = jax.lax.scan(lambda c, _: ((c[0],), None), (jnp.ones(()),), None, length=3)
        picked = jax.lax.cond(b > 0, lambda x: jnp.ones(()), lambda x: jnp.zeros(()), a)  # a is unused
        mixed = jax.lax.cond(b > 0, lambda x: x, lambda x: jnp.zeros(()), a)
        loop = jax.lax.while_loop(lambda c: c < a, lambda c: c + 1.0, 0.0)
        from_a, from_b = jax.jit(lambda x, y: (x * 2.0, y + 1.0))(a, b)
        return first, ys, held, picked, mixed, loop, from_a, from_b, jnp.ones(2) * 3.0

    closed = jax.make_jaxpr(f)(1.0, 2.0)
    assert dependent_outputs(closed, [True, False]) == [True, True, False, False, True, True, True, False, False]
    assert dependent_outputs(closed, [False, True]) == [False, False, False, True, True, False, False, True, False]
    with pytest.raises(ValueError, match="2 inputs, got 1 flags"):
        dependent_outputs(closed, [True])


def conds_in_scans(jaxpr, in_scan=False) -> int:
    found = 0
    for eqn in jaxpr.eqns:
        found += eqn.primitive.name == "cond" and in_scan
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += conds_in_scans(sub, in_scan or eqn.primitive.name == "scan")
    return found


@pytest.mark.slow
def test_the_model_runs_in_a_branch_not_a_select_under_vmap():
    def sampler_conds(model, observed, observations):
        proposal = proposal_for(model, observed)
        closed = jax.make_jaxpr(lambda p, k: sample_particles(p.network, p.spec, p.bound_model, k, observations,
                                                              8).log_weights)(proposal, jax.random.key(0))
        return conds_in_scans(closed.jaxpr)

    fixed = sampler_conds(pedagogical, ["obs"], {"obs": 25.0})
    dynamic = sampler_conds(random_objects, ["obs", "count_signal"], {"obs": 3.0, "count_signal": 2.2})
    # The refresh predicate depends on the token position only: vmap over particles keeps the branch.
    assert dynamic == fixed + 1


@pytest.mark.slow
def test_gradients_match_the_former_sampler():
    model, observed, kwargs, observations = CASES["prior_drawn"]
    proposal = proposal_for(model, observed, **kwargs)
    spec, bound = proposal.spec, proposal.bound_model

    def objective(sampler, params):
        network = nnx.merge(proposal.graphdef, params, proposal.statistics)
        log_w = sampler(network, spec, bound, jax.random.key(4), observations, 16)[1]
        return jnp.mean(jnp.where(jnp.isfinite(log_w), log_w, 0.0))

    grads = jax.jit(lambda p: (jax.grad(functools.partial(objective, sample_particles))(p),
                               jax.grad(functools.partial(objective, reference_particles))(p)))(proposal.params)
    new, old = jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])
    assert any(np.abs(g).max() > 0 for g in old)
    for a, b in zip(new, old):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
