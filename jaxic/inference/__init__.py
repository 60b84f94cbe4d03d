"""Importance sampling with the proposal alongside the model."""

from jaxic.inference.importance import (EagerDecoder, ImportanceSamples, importance_sample, importance_sample_eager,
                                        log_joint, propose)
from jaxic.inference.posterior import Posterior

__all__ = ["EagerDecoder", "ImportanceSamples", "importance_sample", "importance_sample_eager", "log_joint",
           "propose", "Posterior"]
