"""Proposal networks (Flax NNX). The transformer is the default; the LSTM and feed-forward
networks are baselines."""

from jaxic.networks.base import ObservationMLP, ProposalNetworkBase, ProposalStatistics, Statistic, proposal_statistics
from jaxic.networks.feedforward import FeedForwardConfig, FeedForwardProposal, FeedForwardState
from jaxic.networks.lstm import LSTMConfig, LSTMProposal, LSTMState, ObservationSummary
from jaxic.networks.transformer import Block, DecodeState, TransformerConfig, TransformerProposal

# Networks selectable by name (``jaxic.compile(..., network="lstm")``) and recorded in checkpoints.
NETWORKS = {"transformer": TransformerConfig, "lstm": LSTMConfig, "feedforward": FeedForwardConfig}

__all__ = ["NETWORKS", "ObservationMLP", "ProposalNetworkBase", "ProposalStatistics", "Statistic", "proposal_statistics",
           "Block", "DecodeState", "TransformerConfig", "TransformerProposal",
           "LSTMConfig", "LSTMProposal", "LSTMState", "ObservationSummary",
           "FeedForwardConfig", "FeedForwardProposal", "FeedForwardState"]
