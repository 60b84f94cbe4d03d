"""Proposal networks (Flax NNX). The transformer is the default."""

from jaxic.networks.base import ObservationMLP, ProposalNetworkBase, ProposalStatistics, Statistic, proposal_statistics
from jaxic.networks.transformer import Block, DecodeState, TransformerConfig, TransformerProposal

# Networks selectable by name (``jaxic.compile(..., network="lstm")``) and recorded in checkpoints.
NETWORKS = {"transformer": TransformerConfig}

__all__ = ["NETWORKS", "ObservationMLP", "ProposalNetworkBase", "ProposalStatistics", "Statistic", "proposal_statistics",
           "Block", "DecodeState", "TransformerConfig", "TransformerProposal"]
