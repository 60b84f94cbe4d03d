"""Shared conformance test: every proposal network in ``jaxic.networks.NETWORKS`` must pass all of these.

The protocol (see ``jaxic.networks``): ``Config.build(spec, stats, rngs, observation_embedders)`` gives an
unbatched ``nnx.Module`` with ``log_prob(observations, tokens) -> (T,)`` (log q of each token given the
observations and the tokens before it; 0 for tokens that did not execute or are drawn from their prior),
``init_decode(observations) -> state`` and ``decode(state, key, address, instance, dist_type, mask, given=None,
teacher=None) -> (state, value, log_q)`` (one token at a time; ``log_q`` without the token's log-Jacobian).

Each ``check_*`` is a plain function that raises ``AssertionError`` naming the trace, token and site at fault;
the parametrised tests run every check on every network x model, and deliberately broken transformers (defined
here only) show that each check can fail. Networks are built untrained, with tiny sizes and random but fixed
parameters (perturbed away from the near-prior initialisation, so that contexts visibly move the heads).
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from flax import nnx
from numpyro import handlers

from jaxic.checkpoint import read_arrays, write_checkpoint
from jaxic.heads import head_for_site
from jaxic.networks import (NETWORKS, Defensive, FeedForwardConfig, LSTMConfig, ProposalStatistics,
                            TransformerConfig, TransformerProposal, proposal_statistics)
from jaxic.tracing import derive_trace_spec, sample_joint

# Every test here needs a trained or compiled network: the slow tier.
pytestmark = pytest.mark.slow

# Every registered network, tiny. A network added to NETWORKS must be added here (a test checks it).
NETWORKS_UNDER_TEST = {
    "transformer": TransformerConfig(d_model=16, num_heads=2, num_layers=2, mlp_ratio=2, num_components=2,
                                     obs_hidden=16),
    "lstm": LSTMConfig(lstm_dim=16, lstm_depth=1, observe_embedding_dim=8, sample_embedding_dim=4,
                       address_embedding_dim=8, distribution_type_embedding_dim=4, num_components=2, obs_hidden=16),
    "feedforward": FeedForwardConfig(d_model=16, hidden_dim=16, num_layers=1, observe_embedding_dim=8,
                                     num_components=2, obs_hidden=16),
}
RTOL = ATOL = 1e-5
# jit(vmap) against eager: XLA reassociates float32 sums differently for a batch, and the random heads' narrow
# components magnify that to a few 1e-5 (seen: 3e-5 on a log q of -1.49), far below what a wrong batching gives.
EAGER_ATOL = 1e-4
GARBAGE = (1e4, np.nan)  # values written into tokens that did not execute
# The checks' programs run once on a handful of traces: compile them without XLA's costly optimisations (a third
# of the compile time; every bit-exact comparison is between two runs of one program).
QUICK = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# --- models -----------------------------------------------------------------------------------------
def chain_model():
    """Several latents (continuous, two-dimensional simplex, categorical, positive, prior-only), each
    depending on earlier ones, so token order matters. (Unbounded counts are left out: their head's
    negative-binomial sampler alone would double the decoding programs' compile time.)"""
    a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    k = numpyro.sample("k", dist.Categorical(probs=jnp.array([0.2, 0.3, 0.5])))
    b = numpyro.sample("b", dist.Normal(a + k, 1.0))
    # One token for the simplex (a vector inside a token); element-by-element tokens are plain scalar tokens.
    w = numpyro.sample("w", dist.Dirichlet(jnp.ones(3)), infer={"jaxic": {"elementwise": False}})
    u = numpyro.sample("u", dist.Normal(b, 1.0), infer={"jaxic": {"propose": False}})
    s = numpyro.sample("s", dist.LogNormal(0.0, 0.5))
    numpyro.sample("obs", dist.Normal(jnp.stack([a + b, w[0] + u]), s))


def masked_model():
    """Objects 1 and 2 of the plate execute only when ``n`` is large enough; a site after them always does
    (tokens: n, size[0..2], noise), so skipped tokens have executed ones after them."""
    n = numpyro.sample("n", dist.Categorical(jnp.ones(3) / 3))
    with numpyro.plate("objects", 3):
        with handlers.mask(mask=jnp.arange(3) <= n):
            size = numpyro.sample("size", dist.LogNormal(0.0, 1.0))
    noise = numpyro.sample("noise", dist.HalfNormal(1.0))
    total = jnp.sum(jnp.where(jnp.arange(3) <= n, size, 0.0))
    numpyro.sample("obs", dist.Normal(total, 0.5 + noise))


MODELS = {"chain": chain_model, "masked": masked_model}


@dataclasses.dataclass(frozen=True)
class Setup:
    """A model's spec, the statistics networks are built from, and a few traces to check on."""

    spec: object
    stats: ProposalStatistics
    tokens: object  # Tokens with a leading batch axis
    observations: dict


@functools.lru_cache(maxsize=None)
def make_setup(model_name, seed=0):
    model = MODELS[model_name]
    spec = derive_trace_spec(model, ["obs"])
    # As many traces as tokens: check_causal's batches (one row per token) then reuse the same compilations.
    num_checked = spec.num_tokens
    tokens, observations = jax.jit(lambda k: sample_joint(spec, model, k, 128))(jax.random.key(seed))
    # Every network takes the same statistics; the heads only decide their layout.
    heads = [head_for_site(s, 2) for s in spec.latents]
    stats = ProposalStatistics(*jax.jit(lambda t, o: dataclasses.astuple(proposal_statistics(spec, heads, t, o)))(
        tokens, observations))
    mask = np.asarray(tokens.mask)
    # Traces with every site executed first, then ones with skipped sites (the masked model has both).
    order = np.concatenate([np.flatnonzero(mask.all(1)), np.flatnonzero(~mask.all(1))])
    chosen = np.concatenate([order[:num_checked - 1], order[-1:]])
    return Setup(spec, stats, jax.tree.map(lambda a: a[chosen], tokens),
                 jax.tree.map(lambda a: a[chosen], observations))


def build(factory, setup, seed=0):
    """``factory(spec, stats, rngs)`` with its parameters perturbed (random but fixed by ``seed``): heads start
    near the prior, where contexts barely move them; the perturbation makes every dependence visible.
    Eager on purpose: later builds of the same shapes reuse the per-operation compilations."""
    network = factory(setup.spec, setup.stats, nnx.Rngs(seed))
    params = nnx.state(network, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(1000 + seed)
    noisy = [jnp.asarray(np.asarray(p) + 0.3 * rng.standard_normal(p.shape).astype(p.dtype)) for p in leaves]
    nnx.update(network, jax.tree.unflatten(treedef, noisy))
    return network


def config_factory(config):
    return lambda spec, stats, rngs: config.build(spec, stats, rngs)


# --- compiled programs shared by the checks (compilation dominates the run time) ---------------------------
def decode_trace(network, observations, tokens, key, teacher):
    """Decode one trace token by token, each token's value ``given`` and ``teacher`` choosing between it and a
    draw. Returns the token values and log q in ``log_prob``'s convention."""
    num_tokens = tokens.mask.shape[0]

    def step(state, inputs):
        key, address, instance, dist_type, mask, value, force = inputs
        state, value, log_q = network.decode(state, key, address, instance, dist_type, mask, given=value,
                                             teacher=force)
        return state, (value, log_q)

    _, (values, log_q) = jax.lax.scan(step, network.init_decode(observations), (
        jax.random.split(key, num_tokens), tokens.address, tokens.instance, tokens.dist_type, tokens.mask,
        tokens.value, teacher))
    return values, jnp.where(scored(network, tokens), log_q - tokens.log_jacobian, 0.0)


def scored(network, tokens):
    """Tokens with a nonzero log q: executed and proposed (prior-only sites are not)."""
    proposed = jnp.asarray([site.propose for site in network.spec.latents])
    return tokens.mask & proposed[tokens.address]


@functools.lru_cache(maxsize=None)
def compiled_programs(graphdef):
    """Vmapped, jitted ``log_prob`` and decoding for every network of this structure (the state is an
    argument, so a rebuilt network of the same class and sizes reuses the compilation)."""
    net = lambda state: nnx.merge(graphdef, state)
    log_prob = jax.jit(jax.vmap(lambda s, o, t: net(s).log_prob(o, t), (None, 0, 0)), compiler_options=QUICK)
    decode = jax.jit(jax.vmap(lambda s, o, t, k, f: decode_trace(net(s), o, t, k, f), (None, 0, 0, 0, 0)),
                     compiler_options=QUICK)
    return log_prob, decode


def programs(network):
    """``log_prob(observations, tokens)`` and ``decode(observations, tokens, keys, teacher)`` of ``network``
    over a batch of traces, as numpy arrays."""
    graphdef, state = nnx.split(network)
    log_prob, decode = compiled_programs(graphdef)
    return types.SimpleNamespace(log_prob=lambda o, t: np.asarray(log_prob(state, o, t)),
                                 decode=lambda o, t, k, f: tuple(map(np.asarray, decode(state, o, t, k, f))))


def teacher_forced(network, observations, tokens):
    """log q of every token from decoding with all values given."""
    num_traces, num_tokens = tokens.mask.shape
    keys = jax.random.split(jax.random.key(0), num_traces)
    return programs(network).decode(observations, tokens, keys, jnp.ones((num_traces, num_tokens), bool))[1]


def pick(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def repeat(tree, n):
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), tree)


def describe(network, tokens, t):
    site = network.spec.latents[int(tokens.address[t])]
    return f"token {t} (site '{site.name}', instance {int(tokens.instance[t])})"


def changed_value(network, tokens, t):
    """A different, valid value for token ``t`` of one trace."""
    site = network.spec.latents[int(tokens.address[t])]
    value = tokens.value[t]
    if site.is_discrete:
        new = (value[0] + 1) % site.num_categories if site.num_categories else value[0] + 1
        return value.at[0].set(new)
    return value.at[: site.value_dim].add(1.5)


# --- the checks -------------------------------------------------------------------------------------------
def check_causal(network, observations, tokens):
    """log q of token t depends on the observations and tokens before t only.

    (1) Changing the value of executed token t leaves log q of every token before t bit-identical.
    (2) Context independence: the density of token t does not depend on x_t itself. Token t is drawn by
    ``decode`` after teacher-forcing the tokens before it (so the draw cannot have been seen), and the whole-trace
    ``log_prob`` of the trace holding that draw must give token t the log q ``decode`` gave it. A network that
    conditions on observations only passes trivially.

    Example:
        >>> check_causal(net, observations, tokens)   # a batch of traces; raises AssertionError on a violation
    """
    run = programs(network)
    num_traces, num_tokens = tokens.mask.shape
    diagonal = np.arange(num_tokens)
    for i in range(num_traces):
        one = pick(tokens, i)
        obs, trace = repeat(pick(observations, i), num_tokens), repeat(one, num_tokens)
        executed = np.flatnonzero(np.asarray(one.mask))
        # Row t changes token t. The comparison is row against row of the same program: bit-exact.
        base = run.log_prob(obs, trace)
        changed = trace.value
        for t in executed:
            changed = changed.at[t, t].set(changed_value(network, one, t))
        log_q = run.log_prob(obs, trace._replace(value=changed))
        for t in executed:
            moved = np.flatnonzero(log_q[t, :t] != base[t, :t])
            if moved.size:
                s = moved[0]
                raise AssertionError(
                    f"{type(network).__name__}, trace {i}: changing the value of {describe(network, one, t)} "
                    f"changed log q of the earlier {describe(network, one, s)} from {base[t, s]!r} to "
                    f"{log_q[t, s]!r}; a token's proposal may depend only on the observations and the tokens "
                    "before it.")
        # Row t forces the tokens before t and draws token t (and later ones).
        teacher = diagonal[None, :] < diagonal[:, None]
        values, decoded = run.decode(obs, trace, jax.random.split(jax.random.key(i), num_tokens), teacher)
        drawn = trace.value.at[diagonal, diagonal].set(values[diagonal, diagonal])
        whole = run.log_prob(obs, trace._replace(value=drawn))
        for t in np.flatnonzero(np.asarray(scored(network, one))):
            if not np.isclose(whole[t, t], decoded[t, t], rtol=RTOL, atol=ATOL):
                raise AssertionError(
                    f"{type(network).__name__}, trace {i}: the density of {describe(network, one, t)} depends on "
                    f"its own value: at the value {np.asarray(drawn[t, t])} drawn after the tokens before it, "
                    f"log_prob of the whole trace gives {whole[t, t]!r} but the context before the token gives "
                    f"{decoded[t, t]!r} (the context of token t must not include x_t).")


def check_masked_invisible(network, observations, tokens):
    """Tokens that did not execute are invisible: their log q is exactly 0, and garbage values in them (huge,
    NaN) change no log q, neither of ``log_prob`` nor of teacher-forced ``decode``.

    Example:
        >>> check_masked_invisible(net, observations, tokens)   # needs at least one non-executed token
    """
    mask = np.asarray(tokens.mask)
    assert not mask.all(), "check_masked_invisible needs traces with at least one non-executed token"
    run = programs(network)
    not_scored = ~np.asarray(scored(network, tokens))
    filled = [tokens._replace(value=jnp.where(tokens.mask[..., None], tokens.value, garbage)) for garbage in GARBAGE]
    # log_prob first: a network failing there is reported before its decoding is compiled.
    for what, score in (("log_prob", run.log_prob), ("decode", lambda o, t: teacher_forced(network, o, t))):
        base = score(observations, tokens)
        bad = np.argwhere(not_scored & (base != 0.0))
        if bad.size:
            i, t = bad[0]
            raise AssertionError(f"{type(network).__name__}, trace {i}: {what} gives the non-executed or prior-only "
                                 f"{describe(network, pick(tokens, i), t)} log q {base[i, t]!r}, not 0.")
        for garbage, garbage_tokens in zip(GARBAGE, filled):
            after = score(observations, garbage_tokens)
            bad = np.argwhere(base != after)
            if bad.size:
                i, t = bad[0]
                raise AssertionError(
                    f"{type(network).__name__}, trace {i}: writing {garbage} into the non-executed tokens changed "
                    f"{what}'s log q of {describe(network, pick(tokens, i), t)} from {base[i, t]!r} to "
                    f"{after[i, t]!r}; tokens that did not execute must be invisible.")


def check_incremental_decoding_matches_log_prob(network, observations, tokens):
    """Token-by-token ``decode`` with the trace's values ``given`` scores every token as whole-trace
    ``log_prob`` does (rtol 1e-5), the log-Jacobian subtracted and non-executed tokens at 0.

    Example:
        >>> check_incremental_decoding_matches_log_prob(net, observations, tokens)
    """
    whole = programs(network).log_prob(observations, tokens)
    stepped = teacher_forced(network, observations, tokens)
    bad = np.argwhere(~np.isclose(stepped, whole, rtol=RTOL, atol=ATOL))
    if bad.size:
        i, t = bad[0]
        raise AssertionError(f"{type(network).__name__}, trace {i}: decode with the value given scores "
                             f"{describe(network, pick(tokens, i), t)} {stepped[i, t]!r}, log_prob of the whole trace "
                             f"{whole[i, t]!r} (rtol {RTOL}).")


def check_defensive_decoding(network, observations, tokens):
    """With ``defensive``, ``decode`` scores each given token under the head and under its widened head:
    ``log_q`` is ``(2,)``, its first entry the plain score, its second equal to it for a widening of one
    and different for a real widening (executed, proposed tokens), both 0 where the token did not run.

    Example:
        >>> check_defensive_decoding(net, observations, tokens)
    """
    graphdef, state = nnx.split(network)

    def scores(scale, observations, tokens):
        net = nnx.merge(graphdef, state)
        defensive = Defensive(jnp.asarray(scale, jnp.float32), jnp.asarray(False))

        def step(decode_state, inputs):
            key, address, instance, dist_type, mask, value = inputs
            decode_state, _, log_q = net.decode(decode_state, key, address, instance, dist_type, mask, given=value,
                                                defensive=defensive)
            return decode_state, log_q

        keys = jax.random.split(jax.random.key(0), tokens.mask.shape[0])
        return jax.lax.scan(step, net.init_decode(observations), (keys, tokens.address, tokens.instance,
                                                                  tokens.dist_type, tokens.mask, tokens.value))[1]

    run = jax.jit(jax.vmap(scores, (None, 0, 0)), static_argnums=0, compiler_options=QUICK)
    plain = teacher_forced(network, observations, tokens)
    shown = np.asarray(scored(network, tokens))
    for scale in (1.0, 3.0):
        both = np.asarray(run(scale, observations, tokens))
        assert both.shape == tokens.mask.shape + (2,), both.shape
        first = np.where(shown, both[..., 0] - np.asarray(tokens.log_jacobian), 0.0)
        np.testing.assert_allclose(first, plain, rtol=RTOL, atol=ATOL)
        assert np.all(both[~np.asarray(tokens.mask)] == 0.0)
        if scale == 1.0:
            np.testing.assert_allclose(both[..., 1], both[..., 0], rtol=RTOL, atol=ATOL)
        else:
            assert np.any(np.abs(both[..., 1] - both[..., 0])[shown] > 1e-3), "the widened head scores alike"


def eager_decode(network, observations, tokens, key, teacher):
    """``decode_trace`` stepped through in Python, one eager ``decode`` per token. ``teacher``: a boolean per
    token, or True (every value given, no ``teacher`` argument) or False (every token drawn, no ``given``)."""
    state = network.init_decode(observations)
    keys = jax.random.split(key, tokens.mask.shape[0])
    values, log_q = [], []
    for t in range(tokens.mask.shape[0]):
        if teacher is True:
            options = dict(given=tokens.value[t])
        elif teacher is False:
            options = {}
        else:
            options = dict(given=tokens.value[t], teacher=teacher[t])
        state, value, lq = network.decode(state, keys[t], tokens.address[t], tokens.instance[t],
                                          tokens.dist_type[t], tokens.mask[t], **options)
        values.append(value)
        log_q.append(lq)
    return np.stack(values), np.where(scored(network, tokens), np.stack(log_q) - tokens.log_jacobian, 0.0)


def check_jit_vmap_match_eager(network, observations, tokens):
    """Jitted and vmapped ``log_prob`` and ``decode`` agree with eager, one-trace calls (rtol 1e-5, atol 1e-4),
    with ``decode`` drawing every token, teacher-forcing every token (``given`` alone) and alternating the two
    (``given`` and ``teacher``).

    Example:
        >>> check_jit_vmap_match_eager(net, observations, tokens)
    """
    run = programs(network)
    num_traces, num_tokens = tokens.mask.shape
    keys = jax.random.split(jax.random.key(7), num_traces)
    alternate = jnp.arange(num_tokens) % 2 == 1
    batched, eager = {"log_prob": run.log_prob(observations, tokens)}, {}
    for name, teacher in (("drawing", False), ("given", True), ("alternating", alternate)):
        values, log_q = run.decode(observations, tokens, keys, jnp.broadcast_to(teacher, (num_traces, num_tokens)))
        batched[f"decode {name}: value"], batched[f"decode {name}: log q"] = values, log_q
    # Eager calls compile every operation on their own: one trace (the first of the vmapped batch) suffices.
    i = 0
    obs, trace = pick(observations, i), pick(tokens, i)
    eager["log_prob"] = np.asarray(network.log_prob(obs, trace))
    for name, teacher in (("drawing", False), ("given", True), ("alternating", alternate)):
        eager[f"decode {name}: value"], eager[f"decode {name}: log q"] = eager_decode(network, obs, trace, keys[i],
                                                                                      teacher)
    for name, reference in eager.items():
        got = batched[name][i]
        bad = np.argwhere(~np.isclose(got, reference, rtol=RTOL, atol=EAGER_ATOL))
        if bad.size:
            t = bad[0][0]
            raise AssertionError(f"{type(network).__name__}, trace {i}: jit(vmap({name})) gives "
                                 f"{got[t]!r} for {describe(network, trace, t)}, eager {reference[t]!r}.")


def check_save_load_bit_exact(network, rebuild, observations, tokens, directory):
    """The ``nnx.split`` state of ``network`` written with ``write_checkpoint`` and read back with
    ``read_arrays`` into a fresh build (``rebuild()``: same class and sizes, other parameters) reproduces every
    state leaf and ``log_prob`` bit for bit.

    Example:
        >>> check_save_load_bit_exact(net, lambda: config.build(spec, stats, nnx.Rngs(1)), obs, tokens, tmp_path)
    """
    name = type(network).__name__
    leaves = jax.tree.leaves(nnx.split(network)[1])
    path = write_checkpoint(directory / "network", leaves, {"network": name})
    fresh = rebuild()
    assert type(fresh) is type(network), f"rebuild() gave a {type(fresh).__name__}, not a {name}"
    original = programs(network).log_prob(observations, tokens)
    assert not np.array_equal(programs(fresh).log_prob(observations, tokens), original), (
        f"{name}: rebuild() already reproduces the saved network's log_prob, so the round trip proves nothing; "
        "build it from another seed.")
    state = nnx.split(fresh)[1]
    restored = read_arrays(path, jax.tree.leaves(state))
    nnx.update(fresh, jax.tree.unflatten(jax.tree.structure(state), [jnp.asarray(a) for a in restored]))
    for index, (saved, back) in enumerate(zip(leaves, jax.tree.leaves(nnx.split(fresh)[1]))):
        assert np.array_equal(np.asarray(saved), np.asarray(back)), f"{name}: state leaf {index} changed on the way"
    after = programs(fresh).log_prob(observations, tokens)
    bad = np.argwhere(original != after)
    if bad.size:
        i, t = bad[0]
        raise AssertionError(f"{name}, trace {i}: after save and load, log q of "
                             f"{describe(network, pick(tokens, i), t)} is {after[i, t]!r}, not {original[i, t]!r} "
                             "(state outside the nnx Variables is lost by checkpoints).")


# --- fixtures and the conformance matrix -------------------------------------------------------------------
@pytest.fixture(scope="module", params=list(MODELS))
def setup(request):
    return request.param, make_setup(request.param)


@pytest.fixture(scope="module", params=list(NETWORKS_UNDER_TEST))
def network(request, setup):
    name, data = setup
    config = NETWORKS_UNDER_TEST[request.param]
    return build(config_factory(config), data), config, data


def test_every_registered_network_is_under_test():
    assert set(NETWORKS_UNDER_TEST) == set(NETWORKS)
    for name, config in NETWORKS_UNDER_TEST.items():
        assert type(config) is NETWORKS[name], name


def hide_tokens(tokens, positions):
    """The same traces with the tokens at ``positions`` marked as not executed."""
    return tokens._replace(mask=tokens.mask.at[:, positions].set(False))


@pytest.mark.parametrize("check", [check_causal, check_incremental_decoding_matches_log_prob,
                                   check_jit_vmap_match_eager, check_masked_invisible, check_defensive_decoding],
                         ids=lambda c: c.__name__)
def test_network_conforms(check, network):
    net, _, data = network
    tokens = data.tokens
    if check is check_masked_invisible and np.asarray(tokens.mask).all():
        tokens = hide_tokens(tokens, [1, 3])  # the chain model runs every site: hide some
    check(net, data.observations, tokens)


def test_network_survives_save_and_load(network, tmp_path):
    net, config, data = network
    check_save_load_bit_exact(net, lambda: build(config_factory(config), data, seed=1), data.observations,
                              data.tokens, tmp_path)


# --- broken networks: each check must catch its defect -----------------------------------------------------
def transformer_log_prob(net, observations, tokens, *, lookahead=0, hide_skipped=True):
    """``TransformerProposal.log_prob`` rebuilt from its public pieces, with the defects the broken networks
    below need: ``lookahead`` extra positions visible to attention; skipped tokens visible unless hidden."""
    if hide_skipped:
        z, visible = net.standardise_tokens(tokens), tokens.mask
    else:  # the values skipped tokens hold, and every token visible
        z, visible = jax.vmap(net.standardise)(tokens.address, tokens.value), jnp.ones_like(tokens.mask)
    content = jax.vmap(net.content)(tokens.address, tokens.instance, tokens.dist_type, z, visible[:, None])
    prefix = net.prefix(observations)
    bos = prefix.shape[0] - 1
    x = jnp.concatenate([prefix, content])
    reading = jax.vmap(net.announce)(x[bos: bos + tokens.mask.shape[0]], tokens.address, tokens.instance,
                                     tokens.dist_type)
    x = x.at[bos: bos + tokens.mask.shape[0]].set(reading)
    valid = jnp.concatenate([jnp.ones(bos + 1, bool), visible])
    index = jnp.arange(x.shape[0])
    attend = valid[None, :] & (index[None, :] <= jnp.maximum(index[:, None] + lookahead, bos - 1))
    for block in net.blocks:
        x, _, _ = block(x, attend)
    return net.score_tokens(x[bos: bos + tokens.mask.shape[0]], tokens, z)


class OwnTokenPeekingTransformer(TransformerProposal):
    """Attention lets each position see the next one, so token t's context holds x_t itself."""

    def log_prob(self, observations, tokens):
        return transformer_log_prob(self, observations, tokens, lookahead=1)


class NextTokenPeekingTransformer(TransformerProposal):
    """Attention reaches two positions ahead: token t's context holds x_t and x_{t+1}."""

    def log_prob(self, observations, tokens):
        return transformer_log_prob(self, observations, tokens, lookahead=2)


class LeakyTransformer(TransformerProposal):
    """Tokens that did not execute stay visible, values included, to the tokens after them."""

    def log_prob(self, observations, tokens):
        return transformer_log_prob(self, observations, tokens, hide_skipped=False)


class UnsavedStateTransformer(TransformerProposal):
    """Keeps a random offset in a plain attribute, outside the nnx state that checkpoints hold."""

    def __init__(self, *args, offset, **kwargs):
        super().__init__(*args, **kwargs)
        self.offset = offset

    def log_prob(self, observations, tokens):
        return super().log_prob(observations, tokens) + jnp.where(tokens.mask, self.offset, 0.0)


@pytest.fixture(scope="module")
def masked_setup():
    return make_setup("masked")


def broken(cls, setup, seed=0, **options):
    config = NETWORKS_UNDER_TEST["transformer"]
    return build(lambda spec, stats, rngs: cls(spec, stats, config, rngs=rngs, **options), setup, seed)


def test_the_rebuilt_transformer_log_prob_is_the_real_one(masked_setup):
    """The broken networks differ from the real transformer by their defect only."""
    net = build(config_factory(NETWORKS_UNDER_TEST["transformer"]), masked_setup)
    graphdef, state = nnx.split(net)
    rebuilt = jax.jit(jax.vmap(lambda s, o, t: transformer_log_prob(nnx.merge(graphdef, s), o, t), (None, 0, 0)),
                      compiler_options=QUICK)
    np.testing.assert_array_equal(rebuilt(state, masked_setup.observations, masked_setup.tokens),
                                  programs(net).log_prob(masked_setup.observations, masked_setup.tokens))


def test_a_network_seeing_its_own_token_fails_the_causal_and_decoding_checks(masked_setup):
    net = broken(OwnTokenPeekingTransformer, masked_setup)
    data = masked_setup
    # Two layers widen a one-position peek to two, so the first violation found may be a later token's value.
    with pytest.raises(AssertionError, match=r"OwnTokenPeekingTransformer, trace 0: (the density of token 0 \(site "
                                             r"'n', instance 0\) depends on its own value|changing the value of token 1 "
                                             r"\(site 'size', instance 0\) changed log q of the earlier token 0)"):
        check_causal(net, data.observations, data.tokens)
    with pytest.raises(AssertionError, match="decode with the value given scores token 0"):
        check_incremental_decoding_matches_log_prob(net, data.observations, data.tokens)
    check_masked_invisible(net, data.observations, data.tokens)  # its defect is not about skipped tokens


def test_a_network_seeing_the_next_token_fails_the_causal_check(masked_setup):
    net = broken(NextTokenPeekingTransformer, masked_setup)
    with pytest.raises(AssertionError, match=r"trace 0: changing the value of token 1 \(site 'size', instance 0\) "
                                             r"changed log q of the earlier token 0 \(site 'n', instance 0\)"):
        check_causal(net, masked_setup.observations, masked_setup.tokens)


def test_a_network_leaking_skipped_tokens_fails_the_masking_check(masked_setup):
    net = broken(LeakyTransformer, masked_setup)
    data = masked_setup
    with pytest.raises(AssertionError, match=r"LeakyTransformer, trace 4: writing 10000.0 into the non-executed "
                                             r"tokens changed log_prob's log q of token 4 \(site 'noise'"):
        check_masked_invisible(net, data.observations, data.tokens)


def test_a_network_with_state_outside_nnx_fails_the_checkpoint_check(masked_setup, tmp_path):
    data = masked_setup
    net = broken(UnsavedStateTransformer, data, offset=0.5)
    # Its offset would be drawn at build time like any initialiser: a fresh build draws another.
    with pytest.raises(AssertionError, match=r"UnsavedStateTransformer, trace 0: after save and load, log q of "
                                             r"token 0 \(site 'n', instance 0\)"):
        check_save_load_bit_exact(net, lambda: broken(UnsavedStateTransformer, data, seed=1, offset=-0.5),
                                  data.observations, data.tokens, tmp_path)
    # Rebuilding the very same parameters would prove nothing: the check refuses it.
    with pytest.raises(AssertionError, match=r"rebuild\(\) already reproduces"):
        check_save_load_bit_exact(net, lambda: broken(UnsavedStateTransformer, data, offset=0.5),
                                  data.observations, data.tokens, tmp_path)


def test_checkpoint_configs_from_before_the_next_site_query_load_without_it():
    """A transformer saved before ``next_site_query`` existed was trained without it: loading its
    recorded fields must rebuild that network (same parameter tree), while new configs get the query."""
    from jaxic.networks import config_from_metadata

    old = config_from_metadata("transformer", {"d_model": 16, "num_heads": 2, "num_layers": 1})
    assert old.next_site_query is False
    assert config_from_metadata("transformer", dataclasses.asdict(TransformerConfig())).next_site_query is True
    assert TransformerConfig().next_site_query is True
    assert config_from_metadata("lstm", {}) == LSTMConfig()
