"""jaxic: amortized inference for NumPyro models with transformer proposals.

Example:
    >>> compiled = jaxic.compile(model, observed=["obs"], key=jax.random.key(0), num_steps=3000)
    >>> post = compiled.posterior(jax.random.key(1), {"obs": 25.0}, num_samples=10_000)
    >>> print(post.summary())
"""

from jaxic import callbacks, control_flow, diagnostics, parallel, proposal, validation
from jaxic.api import (CANDIDATE_OPTIONS, COMPACT_CANDIDATE, Candidate, CompiledModel, Selection, TrainConfig,
                       compile, compile_best, load)
from jaxic.callbacks import CSVLogger, TensorBoardLogger, TrainingRecord
from jaxic.control_flow import bounded_while, rejection_sample
from jaxic.errors import (CheckpointError, IndexOutOfRangeError, JaxicError, ModelError, NoLikelihoodError, ObservationError,
                          StallWarning, UnknownSiteError, UnsupportedDistributionError, UntraceableModelError)
from jaxic.export import to_arviz
from jaxic.inference import Posterior, ProposalDraws, predictive
from jaxic.proposal import Proposal, importance_sample
from jaxic.networks import TransformerConfig
from jaxic.tracing import (TraceDataset, TraceSpec, TraceWriter, derive_trace_spec, sample_joint, write_simulations,
                           write_traces)

__version__ = "0.1.0"

__all__ = ["control_flow", "bounded_while", "rejection_sample", "TraceDataset", "TraceWriter", "write_traces",
           "write_simulations",
           "CompiledModel", "TrainConfig", "compile", "load", "compile_best", "Selection", "Candidate",
           "CANDIDATE_OPTIONS", "COMPACT_CANDIDATE", "CheckpointError", "JaxicError", "ModelError", "StallWarning",
           "ObservationError", "NoLikelihoodError", "UnsupportedDistributionError", "IndexOutOfRangeError", "UnknownSiteError",
           "UntraceableModelError",
           "Posterior", "ProposalDraws", "predictive",
           "importance_sample", "TransformerConfig", "TraceSpec", "derive_trace_spec", "sample_joint",
           "diagnostics", "to_arviz", "parallel", "proposal", "Proposal", "validation", "callbacks", "CSVLogger",
           "TensorBoardLogger", "TrainingRecord"]
