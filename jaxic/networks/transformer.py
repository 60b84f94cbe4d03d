"""Causal pre-norm transformer proposal (attention for inference compilation).

Sequence: ``[obs_1 .. obs_P, BOS, c_1 .. c_T]`` where ``c_t`` is the content of
latent token ``t`` (site embedding + value embedding). Observation tokens see each
other; BOS sees them; ``c_t`` sees the prefix and executed tokens ``c_s, s <= t``. The
distribution of ``x_t`` is read from the output at the position just before
``c_t``, combined with a query embedding of site ``t``, so it depends on
``y`` and ``x_<t`` only. Skipped (masked) tokens are invisible to attention.

The input at that position also carries an embedding of site ``t`` (``next_site_query``):
the attention that gathers what token ``t`` needs then knows which site it is gathering for.
Without it the attention query is formed before the next site is known, and must serve every
site that could come next (at M = 200 nuisance sites it could not).
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
class TransformerConfig:
    """Sizes of the transformer proposal. The defaults train well in about a minute on a laptop CPU;
    scale ``d_model``/``num_layers`` up for GPUs.

    Example:
        >>> jaxic.compile(model, observed=["obs"], network=TransformerConfig(d_model=256, num_layers=6))
    """

    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 2
    mlp_ratio: int = 4
    num_components: int = 8
    obs_hidden: int = 128
    # Add the embedding of the site about to be proposed to the input its context is read from.
    next_site_query: bool = True

    # Saved configurations from before a field existed load with the behaviour they were trained with.
    legacy_defaults = {"next_site_query": False}

    def build(self, spec: TraceSpec, stats: ProposalStatistics, rngs: nnx.Rngs,
              observation_embedders: Mapping[str, Any] | None = None) -> "TransformerProposal":
        return TransformerProposal(spec, stats, self, observation_embedders, rngs=rngs)


class DecodeState(NamedTuple):
    """Key/value cache for incremental decoding of one trace."""

    # Per layer, (H, S, Dh): a token's update and the single-query attention touch the cache in place.
    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array  # (S,) bool: position holds an executed token
    position: jax.Array  # int32: next position to fill
    # (d,): input of the next position to fill (BOS or the last token's content), not yet in the cache:
    # it is completed with the next site's embedding once that site is known.
    pending: jax.Array
    pending_valid: jax.Array  # bool: whether the pending position holds an executed token (BOS: yes)


class Block(nnx.Module):
    """Pre-norm transformer block; attention through ``jax.nn.dot_product_attention``."""

    def __init__(self, d_model: int, num_heads: int, mlp_ratio: int, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.norm_attention = nnx.LayerNorm(d_model, rngs=rngs)
        self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs)
        self.attention_out = nnx.Linear(d_model, d_model, rngs=rngs)
        self.norm_mlp = nnx.LayerNorm(d_model, rngs=rngs)
        self.mlp_in = nnx.Linear(d_model, mlp_ratio * d_model, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_ratio * d_model, d_model, rngs=rngs)

    def _qkv(self, x):
        s, d = x.shape
        q, k, v = jnp.split(self.qkv(self.norm_attention(x)), 3, axis=-1)
        shape = (s, self.num_heads, d // self.num_heads)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def _finish(self, x, q, k, v, mask):
        attended = jax.nn.dot_product_attention(q[None], k[None], v[None], mask=mask[None, None])[0]
        return self._attention_and_mlp(x, attended)

    def _attention_and_mlp(self, x, attended):
        """Residual attention output, then the residual MLP (shared by the full-sequence and one-token paths)."""
        x = x + self.attention_out(attended.reshape(x.shape))
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm_mlp(x))))

    def __call__(self, x, mask):
        """Whole sequence ``x (S, d)`` with boolean ``mask (S, S)``; also returns keys and values."""
        q, k, v = self._qkv(x)
        return self._finish(x, q, k, v, mask), k, v

    def step(self, x, key_cache, value_cache, valid, position):
        """One token ``x (d,)`` at ``position``, attending to the cache (``(H, S, Dh)`` per layer).

        One query against a cache is two small contractions; ``dot_product_attention`` would
        transpose the whole cache at every token (most of the decoding time, measured).
        """
        q, k, v = self._qkv(x[None])
        key_cache = jax.lax.dynamic_update_index_in_dim(key_cache, k[0][:, None, :], position, 1)
        value_cache = jax.lax.dynamic_update_index_in_dim(value_cache, v[0][:, None, :], position, 1)
        mask = valid & (jnp.arange(valid.shape[0]) <= position)
        scores = jnp.einsum("hd,hsd->hs", q[0], key_cache) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
        weights = jax.nn.softmax(jnp.where(mask[None], scores, -jnp.inf), axis=-1)
        attended = jnp.einsum("hs,hsd->hd", weights, value_cache)
        return self._attention_and_mlp(x, attended), key_cache, value_cache


class TransformerProposal(ProposalNetworkBase):
    """The default proposal network. Unbatched: vmap it over traces.

    Example:
        >>> net = TransformerConfig().build(spec, stats, nnx.Rngs(0))
        >>> log_q = jax.vmap(net.log_prob)(observations, tokens)   # (B, T)
    """

    def __init__(self, spec: TraceSpec, stats: ProposalStatistics, config: TransformerConfig,
                 observation_embedders: Mapping[str, Any] | None = None, *, rngs: nnx.Rngs):
        super().__init__(spec, stats, config.d_model, config.num_components, config.obs_hidden,
                         observation_embedders, rngs=rngs)
        self.blocks = nnx.List([Block(config.d_model, config.num_heads, config.mlp_ratio, rngs=rngs)
                                for _ in range(config.num_layers)])
        self.value_embed = nnx.Linear(self.feature_width, config.d_model, rngs=rngs)
        # Per-address gain on the value embedding: without it every site's value enters along the same
        # directions, so a token can only ignore irrelevant values through near-one-hot attention (which
        # the pedagogical model needs ever sharper as nuisance sites are added: ESS/N at M = 20 after
        # 8000 steps went from 0.12 to 0.33 with the gain).
        self.value_gain = nnx.Param(jnp.ones((len(spec.latents), config.d_model)))
        self.next_site_query = config.next_site_query
        if config.next_site_query:
            self.next_site_embed = nnx.Linear(config.d_model, config.d_model, rngs=rngs)

    def announce(self, x, address, instance, dist_type):
        """``x`` (the input whose output predicts the next token) plus the next token's site embedding."""
        if not self.next_site_query:
            return x
        return x + self.next_site_embed(self.site_embedding(address, instance, dist_type))

    def content(self, address, instance, dist_type, z, mask):
        """What a latent token contributes to later tokens; values of skipped sites are hidden.

        A select rather than ``mask * value``: a skipped token's value may be garbage (NaN while decoding
        a given value), and ``0 * NaN`` would reach every later token through the attention weights' matmul.
        """
        value = self.value_gain[...][address] * self.value_embed(self.value_features(address, z))
        return self.site_embedding(address, instance, dist_type) + jnp.where(mask, value, 0.0)

    def _contexts(self, observations, tokens: Tokens, z):
        content = jax.vmap(self.content)(tokens.address, tokens.instance, tokens.dist_type, z,
                                         tokens.mask[:, None])
        prefix = self.prefix(observations)
        p = prefix.shape[0] - 1  # index of BOS
        x = jnp.concatenate([prefix, content])
        # Position p + t (BOS or token t - 1) predicts token t: it learns which site t is.
        reading = jax.vmap(self.announce)(x[p : p + tokens.mask.shape[0]], tokens.address, tokens.instance,
                                          tokens.dist_type)
        x = x.at[p : p + tokens.mask.shape[0]].set(reading)
        valid = jnp.concatenate([jnp.ones(p + 1, bool), tokens.mask])
        index = jnp.arange(x.shape[0])
        # Observation tokens see each other (not BOS, which carries the first site: decoding runs them
        # before that site is known); BOS and the latent tokens see everything before them.
        mask = valid[None, :] & (index[None, :] <= jnp.maximum(index[:, None], p - 1))
        for block in self.blocks:
            x, _, _ = block(x, mask)
        return x[p : p + tokens.mask.shape[0]]

    def log_prob(self, observations: Mapping[str, jax.Array], tokens: Tokens) -> jax.Array:
        """log q(x_t | x_<t, y) for every token of one trace, 0 where the site did not execute."""
        z = self.standardise_tokens(tokens)
        return self.score_tokens(self._contexts(observations, tokens, z), tokens, z)

    def init_decode(self, observations: Mapping[str, jax.Array]) -> DecodeState:
        """Run the observations once and return the cache for :meth:`decode` (BOS is left pending)."""
        prefix = self.prefix(observations)
        x, bos = prefix[:-1], prefix[-1]
        p = x.shape[0]  # BOS will be filled at position p
        total = p + 1 + self.spec.num_tokens
        keys, values = [], []
        for block in self.blocks:
            x, k, v = block(x, jnp.ones((p, p), bool))
            pad = ((0, 0), (0, total - p), (0, 0))
            keys.append(jnp.pad(k.transpose(1, 0, 2), pad))
            values.append(jnp.pad(v.transpose(1, 0, 2), pad))
        valid = jnp.zeros(total, bool).at[:p].set(True)
        return DecodeState(tuple(keys), tuple(values), valid, jnp.asarray(p, jnp.int32), bos, jnp.asarray(True))

    def decode(self, state: DecodeState, key, address, instance, dist_type, mask, given=None, teacher=None, defensive=None):
        """Propose the next token and append it to the cache.

        Returns ``(state, value, log_q)``: the token value in unconstrained space and
        its log-density there (add the Jacobian of ``biject_to`` for the model value).
        With ``given`` (a token value), that value is scored and appended instead of a draw;
        a boolean array ``teacher`` chooses between ``given`` and a draw at run time; with
        ``defensive`` (:class:`jaxic.networks.Defensive`) ``log_q`` is ``(2,)``, see
        :meth:`propose_token`.
        """
        # The pending input (BOS or the previous token) learns which site comes next, enters the cache,
        # and its output is the context that proposes this token.
        x = self.announce(state.pending, address, instance, dist_type)
        valid = state.valid.at[state.position].set(state.pending_valid)
        keys, values = [], []
        for layer, block in enumerate(self.blocks):
            x, k, v = block.step(x, state.keys[layer], state.values[layer], valid, state.position)
            keys.append(k)
            values.append(v)
        z, value, log_q = self.propose_token(key, x, address, instance, dist_type, given, teacher, defensive)
        new_state = DecodeState(tuple(keys), tuple(values), valid, state.position + 1,
                                self.content(address, instance, dist_type, z, mask), jnp.asarray(mask, bool))
        return new_state, value, jnp.where(mask, log_q, 0.0)
