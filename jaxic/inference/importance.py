"""Importance sampling with the proposal running alongside the model.

Compiled models (the masked path) decode all token positions in one loop; where a site's
mask or prior-drawn value depends on earlier values (read from the jaxpr: :func:`decode_plan`),
the model runs with the values decoded so far substituted to learn it
(:func:`sample_particles`; the public entry point is :func:`jaxic.proposal.importance_sample`). Eagerly run models (the
universal path) use the :class:`propose` handler, which decodes each site as the
model reaches it. Either way ``log w = log p(x, y) - log q(x | y)``.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from numpyro import handlers
from numpyro.primitives import Messenger

from jaxic.errors import ModelError
from jaxic.inference.posterior import Posterior
from jaxic.networks.base import Defensive
from jaxic.parallel import shard_batch
from jaxic.tracing import TraceSpec
from jaxic.tracing.limits import limit_sites, time_limit, time_limit_paused
from jaxic.tracing.dependence import dependent_outputs
from jaxic.tracing.spec import as_tokens, binomial_draws, deterministic_values, from_tokens, site_mask, token_mask
from jaxic.tracing.universal import stack_deterministic
from jaxic.tracing.traces import Tokens, trace_to_tokens


# Widening of the defensive mixture's wide component: three times the proposal's spread.
DEFENSIVE_SCALE = 3.0


def log_joint(trace: dict) -> jax.Array:
    """``log p(x, y)`` of an executed trace (masks and scales applied as NumPyro does)."""
    total = jnp.zeros(())
    for site in trace.values():
        if site["type"] != "sample":
            continue
        log_prob = site["fn"].log_prob(site["value"])
        if site["scale"] is not None:
            log_prob = site["scale"] * log_prob
        total = total + jnp.sum(log_prob)
    return total


class Particles(NamedTuple):
    """Everything the objectives need from proposal draws (leading axis: particles)."""

    samples: dict[str, jax.Array]
    log_weights: jax.Array
    log_joint: jax.Array
    log_proposal: jax.Array
    executed: dict[str, jax.Array]
    # log q of the draws that cannot be reparameterised (discrete tokens), for score-function
    # gradients; differentiable in the network's parameters.
    log_proposal_discrete: jax.Array
    tokens: Tokens


def sample_particles(network, spec: TraceSpec, model: Callable, key: jax.Array,
                     observations: Mapping[str, jax.Array], num_particles: int, sharding=None,
                     chunk_size: int | None = None, defensive: float = 0.0,
                     defensive_scale: float = DEFENSIVE_SCALE) -> Particles:
    """Proposal draws with their weights, tokens and score terms (the proposal decodes the token positions in one compiled loop; compile time does not grow with the number of sites).

    Where a token's executed-mask or prior-drawn value depends on the values decoded before it
    (or on the model's random key), the model runs with those values substituted before the
    token's site, once per site (per time step inside ``scan``); every other token's mask and
    value are fixed and come from one run outside the loop (:func:`decode_plan`). A model
    without such sites runs once per particle.

    Continuous values are reparameterised (gradients flow from ``log_weights`` into the
    network and the model's parameters); discrete ones carry their ``log q`` in
    ``log_proposal_discrete`` for score-function estimators. ``sharding`` (e.g.
    :func:`jaxic.parallel.batch_sharding`) splits the particles over devices. ``chunk_size``
    draws them in chunks of that many (``lax.map``), so memory scales with the chunk.

    ``defensive`` (a share, ``0 <= defensive < 1``): that share of the particles (rounded, at least one)
    is drawn from the proposal with every head widened by ``defensive_scale``
    (:meth:`jaxic.heads.ProposalHead.widen`), and every weight is computed against the mixture
    ``(1 - a) q + a q_wide`` (``a`` the exact share drawn; the balance heuristic of multiple importance
    sampling), which bounds each weight by ``p / (a q_wide)``: a proposal that became too narrow
    late in training can no longer give a few particles all the weight.

    Example:
        >>> particles = sample_particles(network, spec, model, key, {"obs": 1.0}, 16)
        >>> elbo = particles.log_weights.mean()
    """
    observations = {k: jnp.asarray(v, jnp.float32) for k, v in observations.items()}
    prefix_state = network.init_decode(observations)
    layout = spec.token_layout()
    num_tokens, width = spec.num_tokens, spec.value_dim
    prior_token = jnp.asarray(~np.asarray([spec.latents[a].propose for a in layout["address"]]))
    discrete_token = jnp.asarray(np.asarray([spec.latents[a].is_discrete for a in layout["address"]]))
    has_prior_sites = not all(s.propose for s in spec.latents)
    layout = {k: jnp.asarray(v) for k, v in layout.items()}

    def run_model(model_key, values):
        return substituted_trace(spec, model, observations, model_key, values)

    def oracle(model_key, values):
        tokens, _ = trace_to_tokens(spec, run_model(model_key, values))
        return tokens.mask, tokens.value

    plan = decode_plan(spec, model, observations, key)
    # Masks and values that no particle can change: one run, shared by all particles.
    fixed = oracle(jax.random.split(key)[1], jnp.zeros((num_tokens, width)))
    any_dynamic = bool(plan.dynamic.any())

    num_wide = 0 if defensive == 0 else min(num_particles, max(1, round(defensive * num_particles)))
    share = num_wide / num_particles
    mixed = num_wide > 0

    def particle(key, wide):
        proposal_key, model_key = jax.random.split(key)
        mixture = Defensive(jnp.asarray(defensive_scale, jnp.float32), wide) if mixed else None

        def decode_one(carry, inputs):
            state, values, known = carry
            t, key, address, instance, dist_type, teacher, refresh, fixed_t = inputs
            if any_dynamic:
                # refresh depends only on t, which vmap leaves unbatched: a real branch, not a select.
                known = jax.lax.cond(refresh, lambda: oracle(model_key, values), lambda: known)
                mask, value = known[0][t], known[1][t]
            else:
                mask, value = fixed_t
            given = (value, teacher) if has_prior_sites else (None, None)
            state, value, log_q = network.decode(state, key, address, instance, dist_type, mask, *given,
                                                 defensive=mixture)
            return (state, values.at[t].set(value), known), log_q

        # Without dynamic tokens the fixed masks and values stream in with the token; otherwise
        # the latest oracle run rides in the carry (starting from the fixed tokens).
        inputs = (jnp.arange(num_tokens), jax.random.split(proposal_key, num_tokens), layout["address"],
                  layout["instance"], layout["dist_type"], prior_token, jnp.asarray(plan.refresh),
                  None if any_dynamic else fixed)
        init = (prefix_state, jnp.zeros((num_tokens, width)), fixed if any_dynamic else None)
        (_, values, _), log_q_tokens = jax.lax.scan(decode_one, init, inputs)
        trace = run_model(model_key, values)
        tokens, _ = trace_to_tokens(spec, trace)
        proposed = tokens.mask & ~prior_token
        if mixed:  # (T, 2): the proposal's and the widened proposal's log q; weigh against their mixture
            per_component = jnp.sum(jnp.where(proposed[:, None], log_q_tokens - tokens.log_jacobian[:, None], 0.0), 0)
            log_q = jax.nn.logsumexp(per_component + jnp.log(jnp.asarray([1.0 - share, share])))
            log_q_tokens = log_q_tokens[:, 0]
        else:
            log_q = jnp.sum(jnp.where(proposed, log_q_tokens - tokens.log_jacobian, 0.0))
        log_q_discrete = jnp.sum(jnp.where(proposed & discrete_token, log_q_tokens, 0.0))
        # q equals the prior at prior-drawn sites, so their prior cancels in the weight.
        log_q = log_q + sum((jnp.sum(trace[s.name]["fn"].log_prob(trace[s.name]["value"]))
                             for s in spec.latents if not s.propose), jnp.zeros(()))
        log_p = log_joint(trace)
        samples = {s.name: trace[s.name]["value"] for s in spec.latents}
        executed = {s.name: site_mask(trace[s.name]["fn"], s.batch_shape) for s in spec.latents}
        # Deterministic sites of the final run, as Predictive reports them; jitted, every site runs.
        samples.update(deterministic_values(trace, spec))
        executed.update({d.name: jnp.ones(d.shape, bool) for d in spec.deterministic})
        return samples, log_p - log_q, log_p, log_q, executed, log_q_discrete, tokens

    # Sharded keys make XLA run each device's share of the particles.
    keys = shard_batch(jax.random.split(key, num_particles), sharding)
    # The first particles are the wide component's (a fixed count, so the mixture share is exact).
    wide = jnp.arange(num_particles) < num_wide
    if chunk_size is None or chunk_size >= num_particles:
        outputs = jax.vmap(particle)(keys, wide)
    else:
        outputs = jax.lax.map(lambda a: particle(*a), (keys, wide), batch_size=chunk_size)
    samples, log_w, log_p, log_q, executed, log_q_discrete, tokens = outputs
    # A particle with a non-finite weight (e.g. outside the support) gets zero weight.
    log_w = jnp.where(jnp.isnan(log_w), -jnp.inf, log_w)
    return Particles(samples, log_w, log_p, log_q, executed, log_q_discrete, tokens)


def substituted_trace(spec: TraceSpec, model: Callable, observations: Mapping[str, jax.Array],
                      model_key: jax.Array, values: jax.Array) -> dict:
    """One run of ``model`` seeded with ``model_key``, conditioned on ``observations``, with every
    proposed latent site given its token values from ``values`` (``(num_tokens, value_dim)``):
    its trace. Prior-drawn sites draw from their prior.

    Example:
        >>> trace = substituted_trace(spec, model, {"obs": 25.0}, jax.random.key(0), tokens.value)
        >>> trace["x"]["value"]
    """
    conditioned = handlers.condition(handlers.seed(model, model_key), data=observations)
    substituted = handlers.substitute(conditioned, substitute_fn=_token_substitution(spec, values))
    return handlers.trace(binomial_draws(substituted)).get_trace()  # outermost: only sites still without a value


class DecodePlan(NamedTuple):
    """Per token position (``(num_tokens,)`` boolean arrays, known at trace time):

    ``dynamic``: the token's executed-mask, or its value if its site is drawn from the prior, can
    depend on the values decoded before it or on the model's random key, so the model must run
    to learn it; ``refresh``: the model runs before this token (the first token of each dynamic
    site, and of each of its time steps inside ``scan``).
    """

    dynamic: np.ndarray
    refresh: np.ndarray


def decode_plan(spec: TraceSpec, model: Callable, observations: Mapping[str, jax.Array],
                key: jax.Array) -> DecodePlan:
    """Which token positions need the model to run while the proposal decodes (see :class:`DecodePlan`).

    Read from the jaxpr of one substituted run (nothing is computed): a site whose mask and
    prior-drawn value depend neither on the token values nor on the model key (a site without
    ``handlers.mask``, or masked by constants or observations only, and not drawn from its prior)
    is fixed. A site's mask and value cannot depend on its own tokens (the model computes them
    before the site's sample statement), so one run at the site's first token serves all of them.
    ``key`` is a key of the kind the particles use.

    Example:
        >>> plan = decode_plan(spec, model, {"obs": 25.0}, jax.random.key(0))
        >>> plan.dynamic.sum(), plan.refresh.sum()   # tokens with a changing mask, model runs per particle
    """
    width = spec.value_dim

    def site_outputs(model_key, values):
        trace = substituted_trace(spec, model, observations, model_key, values)
        masks = [site_mask(trace[s.name]["fn"], s.batch_shape) for s in spec.latents]
        priors = [as_tokens(s, trace[s.name]["fn"], trace[s.name]["value"], width)[0]
                  for s in spec.latents if not s.propose]
        return masks, priors

    key_type = jax.eval_shape(lambda k: jax.random.split(k)[1], key)
    values_type = jax.ShapeDtypeStruct((spec.num_tokens, width), jnp.float32)
    closed = jax.make_jaxpr(site_outputs)(key_type, values_type)
    flags = dependent_outputs(closed, [True] * len(closed.jaxpr.invars))
    mask_flags, prior_flags = flags[:len(spec.latents)], iter(flags[len(spec.latents):])
    dynamic = np.zeros(spec.num_tokens, bool)
    refresh = np.zeros(spec.num_tokens, bool)
    for site, mask_flag in zip(spec.latents, mask_flags):
        if mask_flag or (not site.propose and next(prior_flags)):
            positions = site.positions()
            dynamic[positions] = True
            steps = positions.reshape(site.scan_length or 1, -1)  # one row per time step
            refresh[steps[:, 0]] = True
    return DecodePlan(dynamic, refresh)


def _token_substitution(spec: TraceSpec, values: jax.Array) -> Callable:
    """A ``substitute_fn`` giving each proposed latent site its decoded token values
    (inside ``scan``, the tokens of the current time step)."""
    sites = {s.name: s for s in spec.latents}

    def substitute_fn(msg):
        if msg["type"] != "sample" or msg["is_observed"]:
            return None
        site = sites.get(msg["name"])
        if site is None:
            raise ModelError(
                f"site '{msg['name']}' ran at inference but was not seen when the trace spec was derived; "
                "the model must reach the same sites on every run (use handlers.mask for optional sites)."
            )
        if not site.propose:
            return None  # drawn from its prior by the seeded model
        tokens = values[site.positions()]
        step = (msg.get("infer") or {}).get("_scan_current_index")
        if site.scan_length and step is not None:
            tokens = tokens.reshape(site.scan_length, site.step_tokens, -1)[step]
            return from_tokens(site.one_step(), msg["fn"], tokens)
        return from_tokens(site, msg["fn"], tokens)

    return substitute_fn


class EagerDecoder:
    """Compiled decoding for the universal path, where the model itself runs eagerly.

    One compilation per site size; the network parameters are arguments, so training
    more does not recompile.

    Example:
        >>> decoder = EagerDecoder(graphdef, spec)
        >>> result = importance_sample_eager(decoder, params, statistics, model, key, {"obs": 1.0}, 1000)
    """

    def __init__(self, graphdef, spec: TraceSpec):
        self.spec = spec

        @jax.jit
        def init(params, statistics, observations):
            return nnx.merge(graphdef, params, statistics).init_decode(observations)

        @functools.partial(jax.jit, static_argnames="teacher")
        def decode(params, statistics, state, keys, address, dist_type, instances, mask, values, teacher):
            network = nnx.merge(graphdef, params, statistics)

            def one(state, inputs):
                key, instance, executed, value = inputs
                state, value, log_q = network.decode(state, key, address, instance, dist_type, executed,
                                                     value if teacher else None)
                return state, (value, log_q)

            return jax.lax.scan(one, state, (keys, instances, mask, values))

        self.init, self.decode = init, decode


class propose(Messenger):
    """Draw every latent site of an eagerly running model from the proposal, given the
    sites drawn before it (the universal path), accumulating ``log_q``.

    Each site calls the compiled ``decoder``. Sites marked
    ``infer={"jaxic": {"propose": False}}`` are drawn from their prior (their values
    still reach later sites through the network).

    Example:
        >>> handler = propose(handlers.condition(model, obs), decoder, params, statistics, state, key)
        >>> trace = handlers.trace(handlers.seed(handler, 0)).get_trace()
        >>> handler.log_q
    """

    def __init__(self, fn, decoder: EagerDecoder, params, statistics, decode_state, key):
        self.decoder, self.params, self.statistics = decoder, params, statistics
        self.spec = decoder.spec
        self.decode_state = decode_state
        self.key = key
        self.log_q = jnp.zeros(())
        self._addresses = {s.name: a for a, s in enumerate(self.spec.latents)}
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] == "control_flow":
            raise ModelError("numpyro.contrib.control_flow (scan, cond) runs under jit; a model on the universal "
                             "path uses Python control flow instead, or write the whole model for the masked path.")
        if msg["type"] != "sample" or msg["is_observed"] or msg["value"] is not None:
            return
        # The run's time limit bounds the model's own code, not the proposal's (compiling) work.
        with time_limit_paused():
            self._propose_site(msg)

    def _propose_site(self, msg):
        name = msg["name"]
        if name not in self._addresses:
            raise ModelError(
                f"site '{name}' ran at inference but was not seen when the trace spec was derived; "
                "the model must reach the same sites on every run (use handlers.mask for optional sites)."
            )
        address = self._addresses[name]
        site = self.spec.latents[address]
        mask = token_mask(site, msg["fn"])
        key = jax.random.fold_in(self.key, address)
        width = self.spec.value_dim
        if site.propose:
            tokens, log_q = self._decode(address, site, key, mask, None)
            value = from_tokens(site, msg["fn"], tokens)
            _, log_det = as_tokens(site, msg["fn"], value, width)
            self.log_q = self.log_q + jnp.sum(jnp.where(mask, log_q - log_det, 0.0))
        else:
            prior_key, decode_key = jax.random.split(key)
            value = msg["fn"](rng_key=prior_key, sample_shape=msg["kwargs"].get("sample_shape", ()))
            tokens, _ = as_tokens(site, msg["fn"], value, width)
            self._decode(address, site, decode_key, mask, tokens)
            # q equals the prior here, so the site's prior cancels in the weight.
            self.log_q = self.log_q + jnp.sum(msg["fn"].log_prob(value))
        msg["value"] = value

    def _decode(self, address, site, key, mask, given):
        """Decode (or, with ``given`` tokens, score and append) the site's tokens one by one."""
        n = site.num_tokens
        teacher = given is not None
        values = given if teacher else jnp.zeros((n, self.spec.value_dim))
        self.decode_state, outputs = self.decoder.decode(
            self.params, self.statistics, self.decode_state, jax.random.split(key, n), address,
            self.spec.dist_types.index(site.dist_type), jnp.arange(n), mask, values, teacher=teacher)
        return outputs


def importance_sample_eager(decoder: EagerDecoder, params, statistics, model: Callable, key: jax.Array,
                            observations: Mapping[str, jax.Array], num_particles: int) -> Posterior:
    """Importance sampling on the universal path: the model runs eagerly, once per particle,
    with the compiled proposal decoding each site as the model reaches it.

    Sites a particle did not reach are zero in ``samples`` and False in ``executed``;
    ``numpyro.deterministic`` sites are reported with the latents, likewise. Each
    particle's run is bounded by the spec's ``site_limit`` and ``timeout``: a run that does not
    end raises a :class:`~jaxic.errors.ModelError` naming the model's line.

    Example:
        >>> result = importance_sample_eager(decoder, params, statistics, model, key, {"obs": 1.0}, 1000)
    """
    spec = decoder.spec
    observations = {k: jnp.asarray(v, jnp.float32) for k, v in observations.items()}
    prefix_state = decoder.init(params, statistics, observations)
    samples = {s.name: [] for s in spec.latents}
    executed = {s.name: [] for s in spec.latents}
    log_ps, log_qs, determ = [], [], []
    for i, particle_key in enumerate(jax.random.split(key, num_particles)):
        proposal_key, model_key = jax.random.split(particle_key)
        during = f"importance sampling, particle {i + 1} of {num_particles}"
        bounded = limit_sites(model, spec.site_limit, during)
        conditioned = handlers.condition(handlers.seed(bounded, model_key), data=observations)
        handler = propose(conditioned, decoder, params, statistics, prefix_state, proposal_key)
        with time_limit(spec.timeout, during):
            trace = handlers.trace(handler).get_trace()
        for site in spec.latents:
            if site.name in trace:
                samples[site.name].append(np.asarray(trace[site.name]["value"]))
                executed[site.name].append(np.asarray(site_mask(trace[site.name]["fn"], site.batch_shape)))
            else:
                samples[site.name].append(None)
                executed[site.name].append(np.zeros(site.batch_shape, bool))
        determ.append({n: np.asarray(m["value"]) for n, m in trace.items() if m["type"] == "deterministic"})
        log_ps.append(float(log_joint(trace)))
        log_qs.append(float(handler.log_q))

    def stack(site, values):
        example = next((v for v in values if v is not None), np.zeros(site.batch_shape, np.float32))
        return jnp.asarray(np.stack([np.zeros_like(example) if v is None else v for v in values]))

    log_p, log_q = jnp.asarray(log_ps, jnp.float32), jnp.asarray(log_qs, jnp.float32)
    log_w = jnp.where(jnp.isnan(log_p - log_q), -jnp.inf, log_p - log_q)
    determ_values, determ_executed = stack_deterministic(determ, spec.deterministic)
    return Posterior({**{s.name: stack(s, samples[s.name]) for s in spec.latents},
                      **{k: jnp.asarray(v) for k, v in determ_values.items()}}, log_w, log_p, log_q,
                     {**{name: jnp.asarray(np.stack(v)) for name, v in executed.items()},
                      **{k: jnp.asarray(v) for k, v in determ_executed.items()}})
