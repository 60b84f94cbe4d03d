"""Importance sampling with the proposal alongside the model."""

from jaxic.inference.importance import ImportanceSamples, importance_sample, log_joint, propose
from jaxic.inference.posterior import Posterior

__all__ = ["ImportanceSamples", "importance_sample", "log_joint", "propose", "Posterior"]
