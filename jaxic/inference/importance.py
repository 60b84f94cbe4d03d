"""Importance sampling with the proposal running alongside the model.

A NumPyro handler intercepts each latent site as the model reaches it, decodes its
tokens from the proposal (incrementally, with a key/value cache), and accumulates
``log q``. After the run, ``log p(x, y)`` comes from the trace, so
``log w = log p(x, y) - log q(x | y)``.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from numpyro import handlers
from numpyro.primitives import Messenger

from jaxic.errors import ModelError
from jaxic.tracing import TraceSpec
from jaxic.tracing.spec import as_tokens, from_tokens, site_mask


class ImportanceSamples(NamedTuple):
    """Particles of one importance-sampling run (leading axes: observations, particles)."""

    samples: dict[str, jax.Array]
    log_weights: jax.Array
    log_joint: jax.Array
    log_proposal: jax.Array


class propose(Messenger):
    """Draw every latent site from the proposal network, given the sites drawn before it.

    Example:
        >>> handler = propose(handlers.condition(model, obs), network, spec, network.init_decode(obs), key)
        >>> trace = handlers.trace(handlers.seed(handler, 0)).get_trace()
        >>> handler.log_q
    """

    def __init__(self, fn, network, spec: TraceSpec, decode_state, key):
        self.network = network
        self.spec = spec
        self.decode_state = decode_state
        self.key = key
        self.log_q = jnp.zeros(())
        self._names = {s.name: a for a, s in enumerate(spec.latents)}
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample" or msg["is_observed"] or msg["value"] is not None:
            return
        name = msg["name"]
        if name not in self._names:
            raise ModelError(
                f"site '{name}' ran at inference but was not seen when the trace spec was derived; "
                "the model must reach the same sites on every run (use handlers.mask for optional sites)."
            )
        address = self._names[name]
        site = self.spec.latents[address]
        dist_type = self.spec.dist_types.index(site.dist_type)
        mask = site_mask(msg["fn"], site.batch_shape).reshape(-1)
        keys = jax.random.split(jax.random.fold_in(self.key, address), site.num_tokens)

        def decode_one(state, inputs):
            key, instance, executed = inputs
            state, value, log_q = self.network.decode(state, key, address, instance, dist_type, executed)
            return state, (value, log_q)

        inputs = (keys, jnp.arange(site.num_tokens), mask)
        if site.num_tokens == 1:  # a length-one scan only adds a loop for XLA to compile
            self.decode_state, outputs = decode_one(self.decode_state, jax.tree.map(lambda a: a[0], inputs))
            values, log_q = jax.tree.map(lambda a: a[None], outputs)
        else:
            self.decode_state, (values, log_q) = jax.lax.scan(decode_one, self.decode_state, inputs)
        value = from_tokens(site, msg["fn"], values)
        _, log_det = as_tokens(site, msg["fn"], value, values.shape[1])
        self.log_q = self.log_q + jnp.sum(jnp.where(mask, log_q - log_det, 0.0))
        msg["value"] = value


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


def importance_sample(network, spec: TraceSpec, model: Callable, key: jax.Array,
                      observations: Mapping[str, jax.Array], num_particles: int) -> ImportanceSamples:
    """Importance sampling for one set of observations; vmapped over particles.

    The observation prefix is encoded once and shared by all particles. Jit it (and
    vmap it over a batch of observations) as :meth:`jaxic.CompiledModel.posterior` does.

    Example:
        >>> result = jax.jit(lambda k, y: importance_sample(net, spec, model, k, y, 1000))(key, {"obs": 25.0})
    """
    observations = {k: jnp.asarray(v, jnp.float32) for k, v in observations.items()}
    prefix_state = network.init_decode(observations)

    def particle(key):
        proposal_key, model_key = jax.random.split(key)
        # condition sits inside propose so observed sites are already fixed when propose sees them.
        conditioned = handlers.condition(handlers.seed(model, model_key), data=observations)
        handler = propose(conditioned, network, spec, prefix_state, proposal_key)
        trace = handlers.trace(handler).get_trace()
        samples = {s.name: trace[s.name]["value"] for s in spec.latents}
        log_p = log_joint(trace)
        return samples, log_p - handler.log_q, log_p, handler.log_q

    samples, log_w, log_p, log_q = jax.vmap(particle)(jax.random.split(key, num_particles))
    # A particle with a non-finite weight (e.g. outside the support) gets zero weight.
    log_w = jnp.where(jnp.isnan(log_w), -jnp.inf, log_w)
    return ImportanceSamples(samples, log_w, log_p, log_q)
