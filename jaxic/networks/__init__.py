"""Proposal networks (Flax NNX). The transformer is the default."""

from jaxic.networks.base import ObservationMLP, ProposalNetworkBase, ProposalStatistics, Statistic, proposal_statistics
from jaxic.networks.transformer import Block, DecodeState, TransformerConfig, TransformerProposal

__all__ = ["ObservationMLP", "ProposalNetworkBase", "ProposalStatistics", "Statistic", "proposal_statistics",
           "Block", "DecodeState", "TransformerConfig", "TransformerProposal"]
