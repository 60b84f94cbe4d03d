"""Importance sampling with the proposal alongside the model."""

from jaxic.inference.importance import (EagerDecoder, Particles,
                                        importance_sample_eager, log_joint, propose, sample_particles)
from jaxic.inference.posterior import Posterior, ProposalDraws, check_weighted, resample_indices
from jaxic.inference.predictive import predictive

__all__ = ["EagerDecoder", "importance_sample_eager", "log_joint",
           "propose", "Posterior", "ProposalDraws", "check_weighted", "resample_indices", "Particles",
           "sample_particles", "predictive"]
