"""Proposal networks (Flax NNX). The transformer is the default; the LSTM and feed-forward
networks are baselines.

The protocol every entry of ``NETWORKS`` keeps (tests/test_network_conformance.py checks each one;
add a new network there too):

- ``Config.build(spec, stats, rngs, observation_embedders=None)`` returns an unbatched ``nnx.Module``
  whose whole state lives in nnx Variables (checkpoints save ``nnx.split`` state leaves only).
- ``log_prob(observations, tokens)`` gives ``(T,)`` log q of each token given the observations and the
  tokens before it, never later ones nor the token's own value; exactly 0 for tokens that did not
  execute or are drawn from their prior. Skipped tokens are invisible: whatever values they hold, NaN
  included, no output changes.
- ``init_decode(observations)`` and ``decode(state, key, address, instance, dist_type, mask, given=None,
  teacher=None, defensive=None) -> (state, value, log_q)`` propose one token at a time; with the trace's values
  given, ``log_q`` minus the token's log-Jacobian equals ``log_prob`` (rtol 1e-5), and a skipped token gives 0.
  With ``defensive`` (a :class:`Defensive`), ``log_q`` is ``(2,)``: the proposal's and its widened heads'
  (``propose_token`` of the shared base does this).
- Jitted and vmapped calls agree with eager ones.

Observation embedders (per observed site, one observation to one token) have their own protocol and
registry, ``EMBEDDERS``: see :mod:`jaxic.networks.embedders`.
"""

from jaxic.networks.base import Defensive, ProposalNetworkBase, ProposalStatistics, proposal_statistics
from jaxic.networks.embedders import (EMBEDDERS, MLPEmbedding, ObservationMLP, SeriesConv, SeriesConvEmbedding, Statistic,
                                      embedder_metadata, embedders_from_metadata, resolve_embedders)
from jaxic.networks.feedforward import FeedForwardConfig, FeedForwardProposal, FeedForwardState
from jaxic.networks.lstm import LSTMConfig, LSTMProposal, LSTMState, ObservationSummary
from jaxic.networks.transformer import Block, DecodeState, TransformerConfig, TransformerProposal

# Networks selectable by name (``jaxic.compile(..., network="lstm")``) and recorded in checkpoints.
NETWORKS = {"transformer": TransformerConfig, "lstm": LSTMConfig, "feedforward": FeedForwardConfig}


def config_from_metadata(name: str, fields: dict):
    """The network configuration a checkpoint recorded. Fields added after it was written take
    the value that reproduces the network it saved (a config's ``legacy_defaults``), not today's default.

    Example:
        >>> config_from_metadata("transformer", {"d_model": 64})   # next_site_query=False: an older checkpoint
    """
    config_class = NETWORKS[name]
    return config_class(**{**getattr(config_class, "legacy_defaults", {}), **fields})


__all__ = ["NETWORKS", "config_from_metadata", "EMBEDDERS", "MLPEmbedding", "SeriesConv", "SeriesConvEmbedding",
           "embedder_metadata", "embedders_from_metadata", "resolve_embedders", "Defensive", "ObservationMLP", "ProposalNetworkBase", "ProposalStatistics", "Statistic", "proposal_statistics",
           "Block", "DecodeState", "TransformerConfig", "TransformerProposal",
           "LSTMConfig", "LSTMProposal", "LSTMState", "ObservationSummary",
           "FeedForwardConfig", "FeedForwardProposal", "FeedForwardState"]
