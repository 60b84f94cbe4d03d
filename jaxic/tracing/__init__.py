"""Tracing: NumPyro model executions as padded token sequences."""

from jaxic.tracing.spec import LatentSite, ObservedSite, TraceSpec, derive_trace_spec, from_tokens
from jaxic.tracing.traces import Tokens, sample_joint, trace_to_tokens

__all__ = ["LatentSite", "ObservedSite", "TraceSpec", "derive_trace_spec", "from_tokens", "Tokens",
           "sample_joint", "trace_to_tokens"]
