"""Parts every proposal network shares: site embeddings, observation embeddings,
per-site standardisation and the proposal heads.

A concrete network (the transformer, later baselines) only decides how the context
``h_t`` that predicts token ``t`` is computed from the observations and ``x_<t``.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxic.heads import ProposalHead, heads_for
from jaxic.networks.embedders import ObservationMLP, Statistic, resolve_embedders
from jaxic.tracing import TraceSpec, Tokens


class Defensive(NamedTuple):
    """One particle's part in a defensive mixture: the widening factor of the mixture's wide
    component (:meth:`jaxic.heads.ProposalHead.widen`) and whether this particle is drawn from it."""

    scale: jax.Array
    chosen: jax.Array


@dataclasses.dataclass(frozen=True)
class ProposalStatistics:
    """Moments of joint samples used to standardise inputs and start heads at the prior."""

    value_loc: jax.Array  # (A, D) per address
    value_scale: jax.Array  # (A, D)
    base_params: jax.Array  # (A, P_max)
    obs_loc: dict[str, jax.Array]  # flattened observation moments per observed site
    obs_scale: dict[str, jax.Array]


def proposal_statistics(spec: TraceSpec, heads: list[ProposalHead], tokens: Tokens,
                        observations: Mapping[str, jax.Array]) -> ProposalStatistics:
    """Per-site moments of a batch of joint samples (``tokens`` with a leading batch axis).

    Only finite draws count: a trace with a non-finite executed token or observation is left
    out, and a site with no finite draw gets loc 0 and scale 1, so the result is always finite.

    Example:
        >>> tokens, observations = sample_joint(spec, model, key, 4096)
        >>> stats = proposal_statistics(spec, [head_for_site(s, 8) for s in spec.latents], tokens, observations)
    """
    width = spec.value_dim
    max_params = max(h.num_params for h in heads)
    executed_ok = jnp.all(jnp.isfinite(tokens.value), axis=-1) & jnp.isfinite(tokens.log_jacobian)
    trace_ok = jnp.all(executed_ok | ~tokens.mask, axis=-1)
    rows = {o.name: o.features(observations[o.name]).reshape(observations[o.name].shape[0], -1) for o in spec.observed}
    rows_ok = jnp.ones(next(iter(rows.values())).shape[:1] if rows else (0,), bool)
    for flat in rows.values():
        rows_ok = rows_ok & jnp.all(jnp.isfinite(flat), axis=-1)
    if rows and rows_ok.shape == trace_ok.shape:  # joint draws: a trace counts only if all of it is finite
        trace_ok = rows_ok = trace_ok & rows_ok
    usable = tokens.mask & trace_ok[:, None] & executed_ok
    values = jnp.where(usable[..., None], tokens.value, 0.0).reshape(-1, width)
    locs, scales, bases = [], [], []
    for address, head in enumerate(heads):
        # Select by address rather than position: universal traces place a site anywhere.
        mask = (usable & (tokens.address == address)).reshape(-1)
        loc, scale, base = head.statistics(values, mask)
        locs.append(loc)
        scales.append(scale)
        bases.append(jnp.pad(base, (0, max_params - base.shape[0])))
    obs_loc, obs_scale = {}, {}
    # Observation moments may come from real data rows (fewer or more than the traces).
    weight = rows_ok.astype(jnp.float32)[:, None]
    count = jnp.maximum(weight.sum(), 1.0)
    for o in spec.observed:
        flat = jnp.where(rows_ok[:, None], rows[o.name], 0.0)
        mean = (flat * weight).sum(0) / count
        std = jnp.sqrt(((flat - mean) ** 2 * weight).sum(0) / count)
        obs_loc[o.name] = _finite_or(mean, 0.0)
        obs_scale[o.name] = jnp.where(jnp.isfinite(std) & (std > 1e-6), std, 1.0)
    value_scale = jnp.stack(scales)
    return ProposalStatistics(_finite_or(jnp.stack(locs), 0.0),
                              jnp.where(jnp.isfinite(value_scale) & (value_scale > 0), value_scale, 1.0),
                              _finite_or(jnp.stack(bases), 0.0), obs_loc, obs_scale)


def _finite_or(x: jax.Array, fallback: float) -> jax.Array:
    """``x`` with non-finite entries (e.g. moments overflowing float32) replaced by ``fallback``."""
    return jnp.where(jnp.isfinite(x), x, fallback)


class ProposalNetworkBase(nnx.Module):
    """Embeddings, standardisation and heads shared by all proposal networks."""

    def __init__(self, spec: TraceSpec, stats: ProposalStatistics, d_model: int, num_components: int,
                 obs_hidden: int, observation_embedders: Mapping[str, nnx.Module] | None, *, rngs: nnx.Rngs):
        heads = heads_for(spec, num_components)
        groups = list(dict.fromkeys(heads))
        self.spec = spec
        self.width = spec.value_dim
        self.num_observed = len(spec.observed)
        self.groups = tuple(groups)
        self.group_of_address = tuple(groups.index(h) for h in heads)
        self.proposed_address = tuple(s.propose for s in spec.latents)
        self.feature_width = max(h.feature_dim for h in groups)

        self.value_loc = Statistic(stats.value_loc)
        self.value_scale = Statistic(stats.value_scale)
        self.base_params = Statistic(stats.base_params)

        custom = resolve_embedders(observation_embedders, spec.observed)

        def embedder(o):
            chosen = custom.get(o.name)
            if isinstance(chosen, nnx.Module):
                return chosen
            loc, scale = stats.obs_loc[o.name], stats.obs_scale[o.name]
            if chosen is not None:
                return chosen.build(o, d_model, loc, scale, rngs=rngs)
            return ObservationMLP(o.size, d_model, obs_hidden, loc, scale, rngs=rngs)

        self.observation_embedders = nnx.List([embedder(o) for o in spec.observed])
        # Plain tables indexed with scalars (nnx.Embed mis-broadcasts scalar ids for one-row tables).
        table = lambda *shape: nnx.Param(0.02 * jax.random.normal(rngs.params(), shape))
        self.observed_site_embed = table(self.num_observed, d_model)
        self.bos = table(d_model)
        self.address_embed = table(len(spec.latents), d_model)
        self.instance_embed = table(spec.max_instances, d_model)
        self.type_embed = table(len(spec.dist_types), d_model)
        self.query_embed = nnx.Linear(d_model, d_model, rngs=rngs)
        self.head_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.head_trunk = nnx.Linear(d_model, d_model, rngs=rngs)
        small = nnx.initializers.normal(0.01)
        self.head_out = nnx.List([nnx.Linear(d_model, h.num_params, kernel_init=small, rngs=rngs) for h in groups])

    # --- token pieces -------------------------------------------------------------------------
    def site_embedding(self, address, instance, dist_type):
        return self.address_embed[address] + self.instance_embed[instance] + self.type_embed[dist_type]

    def standardise(self, address, value):
        return (value - self.value_loc[...][address]) / self.value_scale[...][address]

    def standardise_tokens(self, tokens: Tokens):
        """Standardised values ``(T, D)`` of one trace's tokens, 0 for tokens that did not execute: whatever
        a skipped token holds (NaN from an offline dataset included) reaches no output and no gradient.

        Example:
            >>> z = net.standardise_tokens(tokens)   # then score_tokens(contexts, tokens, z)
        """
        z = jax.vmap(self.standardise)(tokens.address, tokens.value)
        return jnp.where(tokens.mask[:, None], z, 0.0)

    def log_standardiser(self, address):
        """log|d value / d z| of the standardisation (padded dims have scale 1)."""
        return jnp.log(self.value_scale[...][address]).sum()

    def is_proposed(self, address):
        """False for sites drawn from their prior (they are context, not trained)."""
        return jnp.asarray(np.asarray(self.proposed_address, bool))[address]

    def _group(self, address):
        return jnp.asarray(np.asarray(self.group_of_address, np.int32))[address]

    def value_features(self, address, z):
        """A token's standardised value as its head's features, padded to a common width."""
        return jnp.stack([jnp.pad(h.features(z), (0, self.feature_width - h.feature_dim))
                          for h in self.groups])[self._group(address)]

    def embed_observations(self, observations: Mapping[str, jax.Array]) -> list[jax.Array]:
        """One ``(d,)`` embedding per observed site, of its values on the site's scale (log, logit or as is)."""
        return [embed(o.features(observations[o.name]))
                for embed, o in zip(self.observation_embedders, self.spec.observed)]

    def prefix(self, observations: Mapping[str, jax.Array]):
        """Observation tokens followed by a begin-of-trace token: ``(P + 1, d)``."""
        rows = self.embed_observations(observations)
        obs = jnp.stack(rows) + self.observed_site_embed[...] if rows else jnp.zeros((0, self.bos.shape[0]))
        return jnp.concatenate([obs, self.bos[...][None]])

    # --- heads --------------------------------------------------------------------------------
    def head_input(self, context, address, instance, dist_type):
        query = self.query_embed(self.site_embedding(address, instance, dist_type))
        return jax.nn.gelu(self.head_trunk(self.head_norm(context) + query))

    def _head_params(self, head_in, address, g, head, widen=None):
        params = self.head_out[g](head_in) + self.base_params[...][address, : head.num_params]
        return params if widen is None else head.widen(params, widen)

    def head_log_prob(self, head_in, address, z, widen=None):
        """log q(z) in standardised space for the head of this address (``widen``: of its widened
        distribution, see :meth:`jaxic.heads.ProposalHead.widen`)."""
        lps = [h.log_prob(self._head_params(head_in, address, g, h, widen), z) for g, h in enumerate(self.groups)]
        return jnp.stack(lps)[self._group(address)]

    def head_sample(self, key, head_in, address, widen=None):
        draws = [h.sample(key, self._head_params(head_in, address, g, h, widen), self.width)
                 for g, h in enumerate(self.groups)]
        return jnp.stack(draws)[self._group(address)]

    # --- shared by every network's log_prob and decode -----------------------------------------
    def score_tokens(self, contexts, tokens: Tokens, z):
        """Whole-trace ``log q`` from the context before each token (``z``: standardised values);
        0 where the site did not execute or is drawn from its prior."""
        head_in = jax.vmap(self.head_input)(contexts, tokens.address, tokens.instance, tokens.dist_type)
        log_q = (jax.vmap(self.head_log_prob)(head_in, tokens.address, z)
                 - jax.vmap(self.log_standardiser)(tokens.address) - tokens.log_jacobian)
        return jnp.where(tokens.mask & self.is_proposed(tokens.address), log_q, 0.0)

    def propose_token(self, key, context, address, instance, dist_type, given=None, teacher=None,
                      defensive: "Defensive | None" = None):
        """One token from the context before it: ``(z, value, log_q)`` with ``z`` standardised.

        ``given`` (a token value) is scored instead of a draw; a boolean array ``teacher``
        chooses between ``given`` and a draw at run time. With ``defensive``, the draw comes from the
        widened head when ``defensive.chosen``, and ``log_q`` is ``(2,)``: under the head and under
        its widened version (the two components of a defensive mixture).
        """
        head_in = self.head_input(context, address, instance, dist_type)
        draw_widen = None if defensive is None else jnp.where(defensive.chosen, defensive.scale, 1.0)
        if given is None:
            z = self.head_sample(key, head_in, address, draw_widen)
        elif teacher is None:
            z = self.standardise(address, given)
        else:
            z = jnp.where(teacher, self.standardise(address, given), self.head_sample(key, head_in, address, draw_widen))
        log_q = self.head_log_prob(head_in, address, z)
        if defensive is not None:
            log_q = jnp.stack([log_q, self.head_log_prob(head_in, address, z, defensive.scale)])
        log_q = log_q - self.log_standardiser(address)
        value = z * self.value_scale[...][address] + self.value_loc[...][address]
        return z, value, log_q
