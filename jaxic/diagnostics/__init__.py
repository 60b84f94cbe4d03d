"""Is the proposal good enough? Held-out loss, simulation-based calibration (with
simultaneous ECDF bands and ArviZ export), coverage, TARP, C2ST, and Pareto k-hat / ESS of
the importance weights, with a one-call report.

Example:
    >>> rep = jaxic.diagnostics.report(compiled, jax.random.key(0), observations={"obs": 25.0})
    >>> jaxic.diagnostics.sbc(compiled, jax.random.key(1), num_datasets=500).plot()
    >>> jaxic.diagnostics.pareto_khat(compiled.posterior(key, {"obs": 25.0}))
    >>> jaxic.diagnostics.tarp(compiled, jax.random.key(2), num_datasets=300).plot()
"""

from jaxic.diagnostics.c2st import c2st
from jaxic.diagnostics.calibration import LOG_JOINT, CoverageResult, SBCResult, coverage, ecdf_band, sbc, simulate
from jaxic.diagnostics.report import DiagnosticReport, held_out_loss, report
from jaxic.diagnostics.tarp import TARPResult, tarp
from jaxic.diagnostics.weights import KHAT_GOOD, KHAT_OK, ess, khat_verdict, pareto_khat, psis, resample_indices

__all__ = ["LOG_JOINT", "CoverageResult", "SBCResult", "coverage", "ecdf_band", "sbc", "simulate", "TARPResult",
           "tarp", "c2st", "DiagnosticReport",
           "held_out_loss", "report", "KHAT_GOOD", "KHAT_OK", "ess", "khat_verdict", "pareto_khat", "psis",
           "resample_indices"]
