"""One call that checks a compiled proposal and says what to do about it.

Example:
    >>> rep = jaxic.diagnostics.report(compiled, jax.random.key(0), observations={"obs": 25.0})
    >>> rep.ok, rep.sbc.passed, rep.khat
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from jaxic.diagnostics.calibration import CoverageResult, SBCResult, coverage, sbc
from jaxic.diagnostics.weights import KHAT_OK, ess, khat_verdict, pareto_khat
from jaxic.proposal import held_out_loss as _proposal_held_out_loss, joint_draws


def held_out_loss(compiled, key: jax.Array | None = None, num_traces: int = 1024) -> float:
    """Mean ``-log q(x | y)`` over held-out joint samples (lower is better).

    Without ``key``: the fixed validation set drawn at compile time (as
    :meth:`~jaxic.CompiledModel.validation_loss`); for objectives that train the model (whose
    validation loss is a negative ELBO), ``num_traces`` joint samples of the current model drawn
    with the compile-time validation key. With ``key``: ``num_traces`` fresh joint samples, which
    the proposal has never seen even on the dataset path.

    Example:
        >>> held_out_loss(compiled), held_out_loss(compiled, jax.random.key(7), num_traces=4096)
    """
    if key is None:
        if not compiled.objective.needs_data:
            return compiled.validation_loss()
        key = compiled.validation_key  # the model moves: draw from it as it is now
    proposal = compiled.proposal
    tokens, observations = joint_draws(proposal, key, int(num_traces))
    return float(_held_out_loss(proposal, tokens, observations))


_held_out_loss = jax.jit(_proposal_held_out_loss)


@dataclasses.dataclass(frozen=True)
class DiagnosticReport:
    """Everything :func:`report` measured, and its verdicts (``str(report)`` prints them).

    ``khat``, ``ess`` and ``ess_fraction`` are None without observations, and arrays with
    one entry per observation set for a batch of them. ``ok`` is True when SBC passed, the
    coverage is finite, the held-out losses are finite and every k-hat is below 0.7 (a NaN
    anywhere is a failure).

    Example:
        >>> rep = report(compiled, key, {"obs": 25.0}, verbose=False)
        >>> rep.ok, rep.verdicts, rep.coverage.coverage
    """

    validation_loss: float
    held_out_loss: float
    sbc: SBCResult
    coverage: CoverageResult
    khat: Any = None
    ess: Any = None
    ess_fraction: Any = None
    num_particles: int = 0
    verdicts: tuple[str, ...] = ()
    ok: bool = False
    training_note: str = ""

    def __str__(self) -> str:
        lines = ["jaxic proposal report", "=" * 21,
                 f"held-out loss  -log q(x|y): {self.held_out_loss:.4f} fresh traces, "
                 f"{self.validation_loss:.4f} validation set"]
        if self.training_note:
            lines.append(self.training_note)
        lines += [self.sbc.summary(), self.coverage.summary()]
        if self.khat is not None:
            khat, frac = np.atleast_1d(self.khat), np.atleast_1d(self.ess_fraction)
            if khat.size > 5:  # many observation sets: a summary and the worst few
                lines.append(f"{khat.size} observation sets: k̂ median {np.median(khat):.2f}, "
                             f"{np.mean(khat > KHAT_OK):.1%} above {KHAT_OK}; ESS/N median {np.median(frac):.1%}; "
                             "worst:")
            shown = np.argsort(-khat)[:5] if khat.size > 5 else range(khat.size)
            for i in shown:
                label = "" if np.ndim(self.khat) == 0 else f"observation set {i}: "
                lines.append(f"{label}k̂ {khat[i]:.2f}, ESS {frac[i] * self.num_particles:.0f} of "
                             f"{self.num_particles} particles ({frac[i]:.1%})")
        lines.append("")
        lines += [f"- {v}" for v in self.verdicts]
        lines.append("VERDICT: " + ("the proposal looks reliable for these checks." if self.ok else
                                    "do not trust the proposal yet (see above)."))
        return "\n".join(lines)


def _training_note(compiled) -> str:
    losses = compiled.history.get("validation_loss", [])
    steps = compiled.history.get("validation_step", [])
    if len(losses) < 2:
        return ""
    drop = losses[-2] - losses[-1]
    # Still falling by a few hundredths of a nat per evaluation: more steps will pay off.
    if drop > 0.02:
        return (f"validation loss still falling ({losses[-2]:.3f} -> {losses[-1]:.3f} between steps {steps[-2]} "
                f"and {steps[-1]}): training longer will likely improve the proposal.")
    return ""


def report(compiled, key: jax.Array, observations: Mapping[str, Any] | None = None, *,
           num_datasets: int = 100, num_samples: int = 100, num_particles: int = 1000,
           levels: Sequence[float] = (0.5, 0.8, 0.95), weighted: bool = False, alpha: float = 0.01,
           num_traces: int = 1024, verbose: bool = True) -> DiagnosticReport:
    """Check a compiled proposal: held-out loss, SBC, coverage and, given observations,
    ESS and Pareto k-hat of the posterior there (not for a model whose observation has no
    likelihood). Prints a readable report with verdicts (unless ``verbose=False``) and returns
    the numbers.

    The SBC budget (``num_datasets`` x ``num_samples``) is small by default: a pass is
    weak evidence, a failure is strong. ``observations`` may carry a leading batch axis.

    Example:
        >>> rep = jaxic.diagnostics.report(compiled, jax.random.key(0), {"obs": 25.0})
        >>> if not rep.ok: compiled.train(2000)
    """
    sbc_key, loss_key, post_key = jax.random.split(key, 3)
    sbc_result = sbc(compiled, sbc_key, num_datasets, num_samples, weighted=weighted, alpha=alpha)
    cov = coverage(sbc_result, levels=levels)
    verdicts = []
    if sbc_result.passed:
        verdicts.append(f"SBC passed on {sbc_result.num_datasets} simulated datasets: no miscalibration of "
                        "the proposal detected at this budget.")
    verdicts += [f"SBC FAILED: {problem}." for problem in sbc_result.problems]
    for name in sbc_result.failing_sites:
        if not sbc_result.num_invalid(name):  # non-finite draws are reported above
            verdicts.append(f"SBC fails for {name}: {sbc_result.diagnose(name)} — train longer or use a bigger "
                            "network.")
    if sbc_result.num_degenerate:
        verdicts.append(f"{sbc_result.num_degenerate} simulated datasets got no particle with a finite weight — "
                        "the proposal misses the posterior there.")
    verdicts += [f"coverage FAILED: {problem}." for problem in cov.problems]
    se = cov.standard_error
    for name, c in cov.coverage.items():
        off = [f"{a:.0%} intervals cover {x:.0%}" for a, x, s in zip(cov.levels, c, se) if abs(x - a) > 3 * s]
        if off:
            verdicts.append(f"coverage of {name} is off: " + ", ".join(off) + ".")
    khat = ess_value = ess_fraction = None
    weights_ok = True
    if observations is not None and compiled.spec.likelihood_free:
        names = ", ".join(repr(n) for n in compiled.spec.likelihood_free)
        verdicts.append(f"no importance weights at the observations: observed site {names} has no likelihood (a "
                        "Delta); the raw draws (compiled.sample) are the posterior, and SBC and coverage above check "
                        "them.")
    elif observations is not None:
        post = compiled.posterior(post_key, observations, num_samples=num_particles)
        khat, ess_value = pareto_khat(post), ess(post)
        ess_fraction = ess_value / post.num_samples
        undefined = np.isnan(np.atleast_1d(khat))
        worst = float(np.nanmax(khat)) if (~undefined).any() else float("nan")  # -inf: equal weights
        verdicts.append(("worst observation set: " if np.ndim(khat) else "") + khat_verdict(worst))
        if undefined.any() and not undefined.all():
            verdicts.append(f"k̂ undefined for {int(undefined.sum())} of {undefined.size} observation sets: no "
                            "particle has a finite weight there, or some weights are NaN.")
        fractions = np.atleast_1d(ess_fraction)
        if np.isfinite(fractions).any() and np.nanmin(fractions) < 0.01:
            verdicts.append(f"ESS is only {np.nanmin(fractions):.2%} of the particles: estimates rest on a few "
                            "particles — use more particles or train longer.")
        weights_ok = bool(np.all(np.asarray(khat) < KHAT_OK))  # NaN k-hat fails too
    validation = compiled.validation_loss()
    fresh = held_out_loss(compiled, loss_key, num_traces)
    losses_ok = bool(np.isfinite(validation) and np.isfinite(fresh))
    if not losses_ok:
        verdicts.append(f"held-out loss is not finite ({fresh} on fresh traces, {validation} on the validation "
                        "set): the proposal computes NaN/inf log q — check the training loss and the network's "
                        "parameters.")
    ok = sbc_result.passed and cov.passed and weights_ok and losses_ok
    rep = DiagnosticReport(validation_loss=validation, held_out_loss=fresh, sbc=sbc_result,
                           coverage=cov, khat=khat, ess=ess_value, ess_fraction=ess_fraction,
                           num_particles=num_particles if khat is not None else 0,
                           verdicts=tuple(verdicts), ok=ok, training_note=_training_note(compiled))
    if verbose:
        print(rep)
    return rep
