"""Proposal heads: map network outputs to a distribution over one token's value.

Every head implements :class:`ProposalHead` and passes the shared conformance test
in ``tests/test_heads.py`` (normalised log-prob, sampling consistent with log-prob,
jit and vmap). Heads work in standardised token space: the network subtracts the
per-site location and divides by the per-site scale of the joint samples before a
head sees a value, so that every head starts near the prior.
"""

from jaxic.heads.base import ProposalHead, head_for_site, heads_for
from jaxic.heads.categorical import CategoricalHead
from jaxic.heads.integer import IntegerMixtureHead
from jaxic.heads.mixture import MixtureHead

__all__ = ["ProposalHead", "head_for_site", "heads_for", "CategoricalHead", "IntegerMixtureHead", "MixtureHead"]
