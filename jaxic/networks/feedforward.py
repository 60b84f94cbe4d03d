"""Feed-forward proposal: every site is proposed from the observations alone.

``q(x_t | y)`` comes from an MLP on ``[obs, e(site_t)]`` through the shared heads, so
the proposal is a product of independent per-site distributions (a mean-field
amortized proposal). It ignores earlier latents by construction, which makes it the
baseline that shows what conditioning on ``x_<t`` buys.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxic.networks.base import ProposalNetworkBase, ProposalStatistics
from jaxic.networks.lstm import ObservationSummary
from jaxic.tracing import Tokens, TraceSpec


@dataclasses.dataclass(frozen=True)
class FeedForwardConfig:
    """Sizes of the feed-forward proposal: ``num_layers`` hidden layers of width ``hidden_dim``.

    Example:
        >>> jaxic.compile(model, observed=["obs"], key=key, network=FeedForwardConfig(hidden_dim=256))
        >>> jaxic.compile(model, observed=["obs"], key=key, network="feedforward")   # the defaults
    """

    d_model: int = 64
    hidden_dim: int = 128
    num_layers: int = 2
    observe_embedding_dim: int = 64
    num_components: int = 8
    obs_hidden: int = 128

    def build(self, spec: TraceSpec, stats: ProposalStatistics, rngs: nnx.Rngs,
              observation_embedders: Mapping[str, Any] | None = None) -> "FeedForwardProposal":
        return FeedForwardProposal(spec, stats, self, observation_embedders, rngs=rngs)


class FeedForwardState(NamedTuple):
    """Decoding state: only the observation embedding (nothing is carried between tokens)."""

    observation: jax.Array  # (observe_embedding_dim,)


class FeedForwardProposal(ProposalNetworkBase):
    """Proposal without dependence on earlier latents. Unbatched: vmap it over traces.

    Example:
        >>> net = FeedForwardConfig().build(spec, stats, nnx.Rngs(0))
        >>> log_q = jax.vmap(net.log_prob)(observations, tokens)   # (B, T)
    """

    def __init__(self, spec: TraceSpec, stats: ProposalStatistics, config: FeedForwardConfig,
                 observation_embedders: Mapping[str, Any] | None = None, *, rngs: nnx.Rngs):
        super().__init__(spec, stats, config.d_model, config.num_components, config.obs_hidden,
                         observation_embedders, rngs=rngs)
        self.observation_summary = ObservationSummary(self.num_observed, config.d_model,
                                                      config.observe_embedding_dim, rngs=rngs)
        widths = [config.observe_embedding_dim + config.d_model] + [config.hidden_dim] * config.num_layers
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.out = nnx.Linear(widths[-1], config.d_model, rngs=rngs)

    def _context(self, observation, address, instance, dist_type):
        x = jnp.concatenate([observation, self.site_embedding(address, instance, dist_type)])
        for layer in self.layers:
            x = jax.nn.gelu(layer(x))
        return self.out(x)

    def init_decode(self, observations: Mapping[str, jax.Array]) -> FeedForwardState:
        """Embed the observations once for :meth:`decode`."""
        rows = self.embed_observations(observations)
        return FeedForwardState(self.observation_summary(rows))

    def log_prob(self, observations: Mapping[str, jax.Array], tokens: Tokens) -> jax.Array:
        """log q(x_t | y) for every token of one trace, 0 where the site did not execute."""
        observation = self.init_decode(observations).observation
        z = self.standardise_tokens(tokens)
        contexts = jax.vmap(self._context, in_axes=(None, 0, 0, 0))(observation, tokens.address, tokens.instance,
                                                                     tokens.dist_type)
        return self.score_tokens(contexts, tokens, z)

    def decode(self, state: FeedForwardState, key, address, instance, dist_type, mask, given=None, teacher=None, defensive=None):
        """Propose the next token; ``(state, value, log_q)`` as :meth:`TransformerProposal.decode`
        returns (the state never changes: earlier tokens do not matter here).
        """
        context = self._context(state.observation, address, instance, dist_type)
        _, value, log_q = self.propose_token(key, context, address, instance, dist_type, given, teacher, defensive)
        return state, value, jnp.where(mask, log_q, 0.0)
