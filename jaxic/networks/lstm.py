"""Recurrent proposal built like pyprob's inference-compilation LSTM (Le et al., 2017).

At token ``t`` the LSTM reads ``[obs, e(x_prev), e(site_prev), e(site_t)]``: one
embedding of all observations, the value and site of the previous *executed* token
(learned start vectors before the first) and the site about to be proposed. Its
output goes through the shared heads to give ``q(x_t | x_<t, y)``. A skipped
(masked) token leaves the recurrent state and the "previous token" untouched, so
stochastic control flow is handled exactly as by the transformer. One
``jax.lax.scan`` runs a whole trace; :meth:`LSTMProposal.decode` is one step of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxic.networks.base import ProposalNetworkBase, ProposalStatistics
from jaxic.tracing import Tokens, TraceSpec


@dataclasses.dataclass(frozen=True)
class LSTMConfig:
    """Sizes of the LSTM proposal (field names follow pyprob's ``InferenceNetworkLSTM``).

    The defaults are small, like :class:`TransformerConfig`'s; :meth:`pyprob_default`
    gives pyprob's own sizes. ``lstm_dim`` is also the width the heads read, so custom
    observation embedders must output ``(lstm_dim,)`` vectors.

    Example:
        >>> jaxic.compile(model, observed=["obs"], key=key, network=LSTMConfig(lstm_dim=128))
        >>> jaxic.compile(model, observed=["obs"], key=key, network="lstm")   # the defaults
    """

    lstm_dim: int = 64
    lstm_depth: int = 1
    observe_embedding_dim: int = 32
    sample_embedding_dim: int = 4
    address_embedding_dim: int = 16
    distribution_type_embedding_dim: int = 4
    num_components: int = 8
    obs_hidden: int = 128

    @classmethod
    def pyprob_default(cls) -> "LSTMConfig":
        """pyprob's default sizes: a 512-wide single-layer LSTM, 256-wide observation
        embedding, 4-wide sample, 64-wide address and 8-wide distribution-type embeddings,
        10 mixture components (about 2.7 M parameters on ``pedagogical`` with M=20).

        Example:
            >>> jaxic.compile(model, observed=["obs"], key=key, network=LSTMConfig.pyprob_default())
        """
        return cls(lstm_dim=512, lstm_depth=1, observe_embedding_dim=256, sample_embedding_dim=4,
                   address_embedding_dim=64, distribution_type_embedding_dim=8, num_components=10, obs_hidden=256)

    def build(self, spec: TraceSpec, stats: ProposalStatistics, rngs: nnx.Rngs,
              observation_embedders: Mapping[str, Any] | None = None) -> "LSTMProposal":
        return LSTMProposal(spec, stats, self, observation_embedders, rngs=rngs)


class ObservationSummary(nnx.Module):
    """All observed sites as one vector: per-site embeddings, concatenated, then a linear layer.

    Example:
        >>> summary = ObservationSummary(num_observed=2, d_model=64, out_dim=32, rngs=nnx.Rngs(0))
        >>> summary([embed_a(y_a), embed_b(y_b)])   # (32,)
    """

    def __init__(self, num_observed: int, d_model: int, out_dim: int, *, rngs: nnx.Rngs):
        self.out_dim = out_dim
        # A model with nothing observed still gets a (constant) input of the right width.
        self.project = nnx.Linear(num_observed * d_model, out_dim, rngs=rngs) if num_observed else None

    def __call__(self, rows: list[jax.Array]) -> jax.Array:
        if self.project is None:
            return jnp.zeros(self.out_dim)
        return jax.nn.gelu(self.project(jnp.concatenate(rows)))


class LSTMState(NamedTuple):
    """Recurrent state for incremental decoding of one trace."""

    cell: jax.Array  # (depth, lstm_dim) LSTM memory
    hidden: jax.Array  # (depth, lstm_dim) LSTM output
    previous: jax.Array  # embedding of the last executed token's value and site
    observation: jax.Array  # (observe_embedding_dim,)


class LSTMProposal(ProposalNetworkBase):
    """pyprob-style LSTM proposal. Unbatched: vmap it over traces.

    Example:
        >>> net = LSTMConfig().build(spec, stats, nnx.Rngs(0))
        >>> log_q = jax.vmap(net.log_prob)(observations, tokens)   # (B, T)
    """

    def __init__(self, spec: TraceSpec, stats: ProposalStatistics, config: LSTMConfig,
                 observation_embedders: Mapping[str, Any] | None = None, *, rngs: nnx.Rngs):
        super().__init__(spec, stats, config.lstm_dim, config.num_components, config.obs_hidden,
                         observation_embedders, rngs=rngs)
        self.observation_summary = ObservationSummary(self.num_observed, config.lstm_dim,
                                                      config.observe_embedding_dim, rngs=rngs)
        # pyprob's small input embeddings; the base's d_model-wide site embeddings only query the heads.
        table = lambda *shape: nnx.Param(0.02 * jax.random.normal(rngs.params(), shape))
        self.lstm_address_embed = table(len(spec.latents), config.address_embedding_dim)
        self.lstm_instance_embed = table(spec.max_instances, config.address_embedding_dim)
        self.lstm_type_embed = table(len(spec.dist_types), config.distribution_type_embedding_dim)
        self.sample_embed = nnx.Linear(self.feature_width, config.sample_embedding_dim, rngs=rngs)
        site_width = config.address_embedding_dim + config.distribution_type_embedding_dim
        self.previous_width = config.sample_embedding_dim + site_width
        self.start = table(self.previous_width)  # stands in for the "previous token" at t = 0
        inputs = config.observe_embedding_dim + self.previous_width + site_width
        self.cells = nnx.List([nnx.OptimizedLSTMCell(inputs if layer == 0 else config.lstm_dim, config.lstm_dim,
                                                     rngs=rngs) for layer in range(config.lstm_depth)])
        self.lstm_dim, self.lstm_depth = config.lstm_dim, config.lstm_depth

    # --- pieces of one step ---------------------------------------------------------------------
    def _site(self, address, instance, dist_type):
        return jnp.concatenate([self.lstm_address_embed[address] + self.lstm_instance_embed[instance],
                                self.lstm_type_embed[dist_type]])

    def _previous(self, address, instance, dist_type, z):
        return jnp.concatenate([self.sample_embed(self.value_features(address, z)),
                                self._site(address, instance, dist_type)])

    def _observation(self, observations):
        rows = self.embed_observations(observations)
        return self.observation_summary(rows)

    def _run(self, state: LSTMState, address, instance, dist_type):
        """One LSTM step: its output predicts this token (the input does not involve x_t)."""
        x = jnp.concatenate([state.observation, state.previous, self._site(address, instance, dist_type)])
        cells, hiddens = [], []
        for layer, cell in enumerate(self.cells):
            (c, x), _ = cell((state.cell[layer], state.hidden[layer]), x)
            cells.append(c)
            hiddens.append(x)
        return jnp.stack(cells), jnp.stack(hiddens), x

    def _advance(self, state: LSTMState, cells, hiddens, address, instance, dist_type, z, mask):
        """The state after this token; a skipped token leaves it unchanged."""
        stepped = LSTMState(cells, hiddens, self._previous(address, instance, dist_type, z), state.observation)
        return jax.tree.map(lambda new, old: jnp.where(mask, new, old), stepped, state)

    # --- the network protocol -------------------------------------------------------------------
    def init_decode(self, observations: Mapping[str, jax.Array]) -> LSTMState:
        """Embed the observations once; zero LSTM state, start vector as the previous token."""
        zeros = jnp.zeros((self.lstm_depth, self.lstm_dim))
        return LSTMState(zeros, zeros, self.start[...], self._observation(observations))

    def log_prob(self, observations: Mapping[str, jax.Array], tokens: Tokens) -> jax.Array:
        """log q(x_t | x_<t, y) for every token of one trace, 0 where the site did not execute."""
        z = self.standardise_tokens(tokens)

        def step(state, inputs):
            address, instance, dist_type, z_t, mask = inputs
            cells, hiddens, context = self._run(state, address, instance, dist_type)
            return self._advance(state, cells, hiddens, address, instance, dist_type, z_t, mask), context

        _, contexts = jax.lax.scan(step, self.init_decode(observations),
                                   (tokens.address, tokens.instance, tokens.dist_type, z, tokens.mask))
        return self.score_tokens(contexts, tokens, z)

    def decode(self, state: LSTMState, key, address, instance, dist_type, mask, given=None, teacher=None, defensive=None):
        """Propose the next token and advance the LSTM past it.

        Returns ``(state, value, log_q)`` as :meth:`TransformerProposal.decode` does: ``given``
        scores and feeds that token value instead of a draw; a boolean ``teacher`` chooses
        between ``given`` and a draw at run time.
        """
        cells, hiddens, context = self._run(state, address, instance, dist_type)
        z, value, log_q = self.propose_token(key, context, address, instance, dist_type, given, teacher, defensive)
        new_state = self._advance(state, cells, hiddens, address, instance, dist_type, z, mask)
        return new_state, value, jnp.where(mask, log_q, 0.0)
