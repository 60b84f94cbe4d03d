"""Tracing: NumPyro model executions as padded token sequences.

Jittable models (the masked path) are traced vmapped under jit; models with Python
control flow on sampled values (the universal path) are traced eagerly; traces made
elsewhere come in as offline datasets of shards. Every eager run is bounded in sample sites
and seconds (:mod:`jaxic.tracing.limits`), so a model that never ends raises an error.
"""

from jaxic.tracing.dataset import TraceDataset, TraceWriter, check_new_folder, write_simulations, write_traces
from jaxic.tracing.params import ParameterisedModel, find_model_params
from jaxic.tracing.spec import (DeterministicSite, LatentSite, abstract_trace, ObservedSite, TraceSpec, derive_trace_spec,
                                default_elementwise, deterministic_values, from_tokens, token_mask)
from jaxic.tracing.traces import Tokens, sample_joint, trace_to_tokens
from jaxic.tracing.limits import limit_sites, time_limit, user_frame
from jaxic.tracing.universal import (derive_universal_spec, pack_trace, run_bounded, sample_universal,
                                     stack_deterministic)

__all__ = ["DeterministicSite", "deterministic_values", "stack_deterministic", "LatentSite", "ObservedSite", "TraceSpec", "derive_trace_spec", "from_tokens", "Tokens",
           "default_elementwise", "token_mask",
           "sample_joint", "trace_to_tokens", "TraceDataset", "TraceWriter", "write_traces", "write_simulations", "check_new_folder",
           "derive_universal_spec", "pack_trace", "sample_universal", "ParameterisedModel", "find_model_params", "abstract_trace",
           "limit_sites", "time_limit", "user_frame", "run_bounded"]
