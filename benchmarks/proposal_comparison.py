"""Transformer, LSTM and feed-forward proposals compared on the circuit fault model and on arth150.

Each network (``jaxic.networks``, default sizes) is compiled with the same key, the same
number of steps and the same batch size, so all three see exactly the same joint traces
in the same order and are scored on the same held-out traces; only the network differs.

**circuit** (``--experiment circuit``; ``jaxic.models.circuit``): the single-fault test cases and
scores of ``benchmarks/circuit_faults.py`` (prior draws with exactly one fault, seed 2026; the top
hypothesis is the most probable fault label under the importance-weighted posterior), per network:

* held-out ``-log q``: mean ``-log q(x | y)`` on the 1,024 validation traces (forward KL up to
  a constant that is the same for every network);
* median ESS/N; top-1 / top-3 accuracy of the most probable fault; mean posterior probability
  of the true fault; overall and on the *identifiable* cases (neither a dead output nor a fault
  that moves the response by less than 2 dB; see circuit_faults.py).

**arth150** (``--experiment arth150``; ``jaxic.models.arth150``, a linear-Gaussian network with an
exact posterior), both variants (``leaves``: 67 observed, 40 latent; ``leaves40``: 40 observed,
67 latent), on ``--datasets`` simulated observation vectors (seed 2027), per network:

* KL(p||q) = E_{x ~ p(x|y)}[log p(x|y) - log q(x|y)], estimated without bias from exact posterior
  draws scored by the network (averaged over datasets, with its Monte Carlo standard error);
  since the exact posterior covariance does not depend on y, the held-out ``-log q`` minus the
  posterior entropy estimates the same average (column "KL from val.");
* ESS/N of importance sampling;
* posterior means and sds from importance sampling against the exact ones: RMSE over latents
  of ``(mean_IS - mean)/sd`` and of ``(sd_IS - sd)/sd`` (exact sd as the unit), averaged over datasets;
* log-evidence error ``log Z_IS - log p(y)`` (mean, and RMSE over datasets).

Outputs: a section per experiment in ``benchmarks/RESULTS.md``, JSON in ``benchmarks/results/``
(``proposal_comparison_<experiment>.json``, with per-case values and validation curves) and a figure
in ``benchmarks/figures/`` (``proposal_comparison_<experiment>.png``).

    python benchmarks/proposal_comparison.py                                   # both experiments
    python benchmarks/proposal_comparison.py --experiment circuit              # 2000 steps per network
    python benchmarks/proposal_comparison.py --experiment arth150              # 1500 steps per network and variant
    python benchmarks/proposal_comparison.py --steps 20 --cases 10 --particles 100 --datasets 4 --no-write  # check
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from numpyro import handlers

import jaxic
from jaxic.models import (arth150, arth150_layout, arth150_log_evidence, arth150_posterior, circuit,
                          exact_posterior_log_prob, exact_posterior_samples, fault_posterior, simulate_arth150,
                          stack_sites, unstack_sites)
from jaxic.models.circuit import WEAK_DB, single_fault_cases
from jaxic.networks import NETWORKS
from jaxic.tracing import Tokens, derive_trace_spec, trace_to_tokens
from results_io import environment_lines, publish, write_results_json

HERE = Path(__file__).resolve().parent
SCRIPT = "proposal_comparison.py"
HEADINGS = {
    "circuit": f"## Proposal networks on the circuit fault model (benchmarks/{SCRIPT} --experiment circuit)",
    "arth150": f"## Proposal networks on arth150 (benchmarks/{SCRIPT} --experiment arth150)",
}
DEFAULTS = {  # per-experiment defaults of the options left at None
    "circuit": {"steps": 2000, "particles": 500, "chunk": 50},
    "arth150": {"steps": 1500, "particles": 1000, "chunk": 10},
}
CASES_SEED, DATASETS_SEED = 2026, 2027
STATISTICS_SIZE = 4096  # jaxic's TrainConfig.statistics_size: a validation set this size reuses its compile
NETWORK_LABELS = {"transformer": "transformer", "lstm": "LSTM", "feedforward": "feed-forward"}


def settings(args, experiment: str) -> tuple[int, int, int]:
    """``(steps, particles, chunk)``: the options given, else the experiment's defaults."""
    given = {"steps": args.steps, "particles": args.particles, "chunk": args.chunk}
    return tuple(given[k] if given[k] is not None else DEFAULTS[experiment][k] for k in ("steps", "particles", "chunk"))


def compile_network(model, observed, name, args, steps, **kwargs):
    """One network trained with the shared key and budget: (compiled model, seconds incl. compilation)."""
    t0 = time.perf_counter()
    compiled = jaxic.compile(model, observed, jax.random.key(0), num_steps=steps, batch_size=args.batch_size,
                             network=NETWORKS[name](), progress=False, **kwargs)
    jax.block_until_ready(compiled.state.params)
    return compiled, time.perf_counter() - t0


def batched_posteriors(compiled, key, site, observations, num_particles, chunk):
    """``compiled.posterior`` over the rows of ``observations``, ``chunk`` rows per call (the last call
    is padded to the same shape, so the sampler compiles once); yields ``(start, rows, posterior)``."""
    total = observations.shape[0]
    chunk = min(chunk, total)
    for start in range(0, total, chunk):
        rows = min(chunk, total - start)
        batch = observations[start:start + chunk]
        if rows < chunk:
            batch = np.concatenate([batch, np.repeat(batch[-1:], chunk - rows, axis=0)])
        post = compiled.posterior(jax.random.fold_in(key, start), {site: jnp.asarray(batch, jnp.float32)},
                                  num_particles)
        jax.block_until_ready(post.log_weights)
        yield start, rows, post


def validation_summary(compiled) -> dict:
    history = compiled.history
    return {"validation_loss": float(history["validation_loss"][-1]),
            "validation_curve": {"step": list(map(int, history["validation_step"])),
                                 "loss": list(map(float, history["validation_loss"]))},
            "skipped_steps": len(history["skipped"]), "parameters": compiled.num_parameters}


# ----------------------------------------------------------------------------------------------
# circuit

def circuit_scores(labels, ranked, ess, groups) -> dict:
    """top-1, top-3, mean p(true) and median ESS/N for all cases and per group."""
    out = {}
    for group in ("all", "identifiable", "weak", "dead output"):
        idx = np.arange(len(labels)) if group == "all" else np.flatnonzero(groups == group)
        if not idx.size:
            continue
        out[group] = {"n": int(idx.size),
                      "top1": float(np.mean([next(iter(ranked[i])) == labels[i] for i in idx])),
                      "top3": float(np.mean([labels[i] in list(ranked[i])[:3] for i in idx])),
                      "p_true": float(np.mean([ranked[i].get(labels[i], 0.0) for i in idx])),
                      "median_ess_fraction": float(np.median(ess[idx]))}
    return out


def run_circuit(args, networks: list[str]) -> dict:
    steps, particles, chunk = settings(args, "circuit")
    chunk = min(chunk, args.cases)
    cases, labels, groups = single_fault_cases(jax.random.key(CASES_SEED), args.cases)
    responses = cases["response"]
    results = {}
    for name in networks:
        compiled, train_seconds = compile_network(circuit, ["response"], name, args, steps)
        ranked, ess = [], []
        t0 = time.perf_counter()
        for _, rows, post in batched_posteriors(compiled, jax.random.key(1), "response", responses, particles, chunk):
            samples = jax.tree.map(np.asarray, post.samples)
            weights = np.asarray(post.weights)
            for i in range(rows):
                ranked.append(fault_posterior({k: v[i] for k, v in samples.items()}, weights[i]))
            ess.extend((np.asarray(post.ess)[:rows] / particles).tolist())
        is_seconds = time.perf_counter() - t0
        ess = np.asarray(ess)
        results[name] = {**validation_summary(compiled), "train_seconds": train_seconds, "is_seconds": is_seconds,
                         "scores": circuit_scores(labels, ranked, ess, groups),
                         "per_case": {"ess_fraction": ess.tolist(),
                                      "p_true": [ranked[i].get(labels[i], 0.0) for i in range(len(labels))],
                                      "top_label": [next(iter(r)) for r in ranked]}}
        s = results[name]["scores"]["all"]
        print(f"[circuit] {name}: train {train_seconds:.0f} s, IS {is_seconds:.0f} s, held-out -log q "
              f"{results[name]['validation_loss']:.2f}, top-1 {s['top1']:.2f}, "
              f"median ESS/N {s['median_ess_fraction']:.3f}",
              flush=True)
    return {"experiment": "circuit", "steps": steps, "batch_size": args.batch_size, "particles": particles,
            "chunk": chunk, "cases": args.cases, "cases_seed": CASES_SEED, "labels": labels,
            "groups": groups.tolist(), "networks": results}


def circuit_body(report: dict) -> list[str]:
    rows = []
    for name, r in report["networks"].items():
        a, i = r["scores"]["all"], r["scores"].get("identifiable")
        ident = (f"{i['top1']:.2f} | {i['top3']:.2f} | {i['p_true']:.2f} | {i['median_ess_fraction']:.3f}"
                 if i else "- | - | - | -")
        rows.append(f"| {NETWORK_LABELS[name]} | {r['parameters']:,} | {r['train_seconds']:.0f} | "
                    f"{r['is_seconds']:.0f} | "
                    f"{r['validation_loss']:.2f} | {a['median_ess_fraction']:.3f} | "
                    f"{a['top1']:.2f} | {a['top3']:.2f} | "
                    f"{a['p_true']:.2f} | {ident} |")
    groups = np.asarray(report["groups"])
    counts = ", ".join(f"{g} {int(np.sum(groups == g))}" for g in ("identifiable", "weak", "dead output"))
    return [
        f"- Training: each network with its default sizes, {report['steps']} steps of batch {report['batch_size']}, "
        "compile key 0 (identical training traces and validation set for all); time includes compilation",
        f"- Test set: {report['cases']} prior draws with exactly one fault (seed {report['cases_seed']}; {counts}), "
        f"{report['particles']} particles each, {report['chunk']} cases per batched posterior call "
        "(IS time includes compiling the sampler)",
        "",
        "| network | parameters | train s | IS s | held-out -log q | ESS/N | top-1 | top-3 | p(true) "
        "| ident. top-1 | ident. top-3 | ident. p(true) | ident. ESS/N |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "ESS/N: median over cases; p(true): mean posterior probability of the true fault label; *ident.*: the "
        "identifiable cases (not a dead output, and the fault moves the noise-free response by at least "
        f"{WEAK_DB:g} dB); held-out -log q: mean over the 1,024 validation traces (lower is better; the forward KL "
        "up to a constant shared by all networks).",
    ]


def circuit_figure(report: dict, path: Path) -> None:
    plt = _pyplot()
    names = list(report["networks"])
    labels = [NETWORK_LABELS[n] for n in names]
    nets = report["networks"]
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.6))
    for n, label in zip(names, labels):
        curve = nets[n]["validation_curve"]
        axes[0].plot(curve["step"], curve["loss"], marker=".", label=label)
    axes[0].set(xlabel="training step")
    axes[0].set_title("held-out -log q (lower is better)", fontsize=9)
    axes[0].legend(fontsize=7)
    panels = [("median_ess_fraction", "median ESS/N"), ("top1", "top-1 accuracy"), ("top3", "top-3 accuracy"),
              ("p_true", "mean p(true fault)")]
    groups = [g for g in ("all", "identifiable") if all(g in nets[n]["scores"] for n in names)]
    for ax, (key, title) in zip(axes[1:], panels):
        _bars(ax, labels, [[nets[n]["scores"][g][key] for n in names] for g in groups], groups, title)
    fig.suptitle(f"circuit faults: {report['steps']} training steps per network, {report['cases']} single-fault cases, "
                 f"{report['particles']} particles", fontsize=10)
    _save(fig, path)


# ----------------------------------------------------------------------------------------------
# arth150

def exact_tokens(spec, variant: str, latents: np.ndarray) -> Tokens:
    """Latent vectors ``(n, num_latents)`` (``arth150_layout(variant).latent_sites`` order) as the proposal's
    tokens ``(n, T, ...)``: every latent site is one real-valued scalar token, so its unconstrained value is the
    value itself (no Jacobian) and every token ran."""
    sites = arth150_layout(variant).latent_sites
    if any(s.num_tokens != 1 or s.value_dim != 1 or s.is_discrete or s.support != "Real()"
           for s in spec.latents):
        raise ValueError("arth150 tokens: expected one real scalar token per latent site")
    layout = spec.token_layout()
    n, num_tokens = latents.shape[0], spec.num_tokens
    value = np.zeros((n, num_tokens, 1), np.float32)
    value[:, [s.offset for s in spec.latents], 0] = latents[:, [sites.index(s.name) for s in spec.latents]]
    tile = lambda a: jnp.asarray(np.broadcast_to(a, (n, num_tokens)))
    return Tokens(address=tile(layout["address"]), instance=tile(layout["instance"]),
                  dist_type=tile(layout["dist_type"]), value=jnp.asarray(value),
                  mask=jnp.ones((n, num_tokens), bool), log_jacobian=jnp.zeros((n, num_tokens), jnp.float32))


def check_exact_tokens(spec, variant: str, latents: np.ndarray, observed: np.ndarray) -> None:
    """:func:`exact_tokens` must agree with jaxic's own tokenisation of a substituted model trace."""
    model = functools.partial(arth150, variant=variant)
    values = {k: jnp.asarray(v, jnp.float32) for k, v in unstack_sites(variant, latents).items()}
    values["expression"] = jnp.asarray(observed, jnp.float32)
    trace = handlers.trace(handlers.substitute(handlers.seed(model, jax.random.key(0)), data=values)).get_trace()
    reference, _ = trace_to_tokens(spec, trace)
    ours = jax.tree.map(lambda a: a[0], exact_tokens(spec, variant, latents[None]))
    for field in Tokens._fields:
        if not np.allclose(np.asarray(getattr(ours, field)), np.asarray(getattr(reference, field)), atol=1e-6):
            raise AssertionError(f"exact_tokens disagrees with trace_to_tokens on field {field}")


def make_log_q(compiled):
    """jitted ``(observation, tokens) -> sum_t log q`` for draws ``tokens`` (leading axis) of one dataset."""
    graphdef = compiled.graphdef

    def log_q(params, statistics, observation, tokens):
        network = nnx.merge(graphdef, params, statistics)
        per_token = jax.vmap(network.log_prob, in_axes=(None, 0))({"expression": observation}, tokens)
        return per_token.sum(-1)

    run = jax.jit(log_q)
    return lambda observation, tokens: run(compiled.state.params, compiled.statistics,
                                           jnp.asarray(observation, jnp.float32), tokens)


def posterior_entropy(variant: str) -> float:
    """Entropy of the exact posterior (the same for every observation vector)."""
    cov = arth150_posterior(variant, np.zeros(len(arth150_layout(variant).observed)))[1]
    return float(0.5 * np.linalg.slogdet(2 * np.pi * np.e * cov)[1])


def run_arth150_variant(args, networks: list[str], variant: str) -> dict:
    steps, particles, chunk = settings(args, "arth150")
    true_latents, observed = simulate_arth150(jax.random.key(DATASETS_SEED), variant, args.datasets)
    exact_mean, exact_cov = arth150_posterior(variant, observed)
    exact_sd = np.sqrt(np.diag(exact_cov))
    log_evidence = arth150_log_evidence(variant, observed)
    draws = exact_posterior_samples(variant, observed, jax.random.key(DATASETS_SEED + 1), args.exact_samples)
    log_p = exact_posterior_log_prob(variant, observed, draws)  # (datasets, exact_samples)
    entropy = posterior_entropy(variant)
    spec = derive_trace_spec(functools.partial(arth150, variant=variant), ["expression"])
    check_exact_tokens(spec, variant, true_latents[0], observed[0])  # before spending time on training
    results = {}
    for name in networks:
        compiled, train_seconds = compile_network(arth150, ["expression"], name, args, steps,
                                                  model_kwargs={"variant": variant}, validation_size=STATISTICS_SIZE)
        if compiled.spec != spec:
            raise AssertionError("the compiled proposal's trace spec differs from derive_trace_spec's")
        t0 = time.perf_counter()
        log_q_fn = make_log_q(compiled)
        gaps = np.stack([log_p[d] - np.asarray(log_q_fn(observed[d], exact_tokens(compiled.spec, variant, draws[d])),
                                               np.float64) for d in range(args.datasets)])  # (datasets, draws)
        kl = gaps.mean(-1)
        kl_se = gaps.std(-1, ddof=1) / np.sqrt(gaps.shape[-1]) if gaps.shape[-1] > 1 else np.full(len(kl), np.nan)
        kl_seconds = time.perf_counter() - t0
        ess, log_z, mean_err, sd_err = [], [], [], []
        t0 = time.perf_counter()
        posteriors = batched_posteriors(compiled, jax.random.key(1), "expression", observed, particles, chunk)
        for start, rows, post in posteriors:
            x = stack_sites(variant, post.samples)[:rows]  # (rows, particles, latents)
            w = np.asarray(post.weights, np.float64)[:rows]
            w = w / w.sum(-1, keepdims=True)
            mean = np.einsum("np,npl->nl", w, x)
            sd = np.sqrt(np.einsum("np,npl->nl", w, (x - mean[:, None]) ** 2))
            truth = exact_mean[start:start + rows]
            mean_err.extend(np.sqrt(np.mean(((mean - truth) / exact_sd) ** 2, -1)).tolist())
            sd_err.extend(np.sqrt(np.mean(((sd - exact_sd) / exact_sd) ** 2, -1)).tolist())
            ess.extend((np.asarray(post.ess)[:rows] / particles).tolist())
            log_z.extend(np.asarray(post.log_evidence, np.float64)[:rows].tolist())
        is_seconds = time.perf_counter() - t0
        log_z_error = np.asarray(log_z) - log_evidence
        summary = validation_summary(compiled)
        results[name] = {
            **summary, "train_seconds": train_seconds, "kl_seconds": kl_seconds, "is_seconds": is_seconds,
            "kl": float(kl.mean()),
            # Standard error of the mean over datasets (spread of KL between datasets plus the draws' own noise).
            "kl_se": float(kl.std(ddof=1) / np.sqrt(kl.size)) if kl.size > 1 else float(kl_se[0]),
            "kl_from_validation": summary["validation_loss"] - entropy,
            "median_ess_fraction": float(np.median(ess)), "mean_ess_fraction": float(np.mean(ess)),
            "mean_rmse_sd_units": float(np.mean(mean_err)), "sd_rmse_relative": float(np.mean(sd_err)),
            "log_z_error_mean": float(log_z_error.mean()), "log_z_error_rmse": float(np.sqrt(np.mean(log_z_error**2))),
            "per_dataset": {"kl": kl.tolist(), "kl_draws_se": kl_se.tolist(), "ess_fraction": list(ess),
                            "mean_rmse_sd_units": mean_err, "sd_rmse_relative": sd_err,
                            "log_z_error": log_z_error.tolist()},
        }
        r = results[name]
        print(f"[arth150 {variant}] {name}: train {train_seconds:.0f} s, "
              f"KL eval {kl_seconds:.0f} s, IS {is_seconds:.0f} s;"
              f" KL {r['kl']:.2f} (from val. {r['kl_from_validation']:.2f}), "
              f"median ESS/N {r['median_ess_fraction']:.3f}, "
              f"mean RMSE {r['mean_rmse_sd_units']:.3f}, log Z error {r['log_z_error_mean']:+.2f}", flush=True)
    layout = arth150_layout(variant)
    return {"variant": variant, "num_latent": len(layout.latent), "num_observed": len(layout.observed),
            "posterior_entropy": entropy, "networks": results}


def run_arth150(args, networks: list[str]) -> dict:
    steps, particles, chunk = settings(args, "arth150")
    chunk = min(chunk, args.datasets)
    return {"experiment": "arth150", "steps": steps, "batch_size": args.batch_size, "particles": particles,
            "chunk": chunk, "datasets": args.datasets, "datasets_seed": DATASETS_SEED,
            "exact_samples": args.exact_samples,
            "variants": {v: run_arth150_variant(args, networks, v) for v in args.variants}}


def arth150_body(report: dict) -> list[str]:
    lines = [
        f"- Training: each network with its default sizes, {report['steps']} steps of batch {report['batch_size']}, "
        f"compile key 0 (identical training traces and {STATISTICS_SIZE:,} validation traces for all); time includes "
        "compilation",
        f"- Test set per variant: {report['datasets']} simulated observation vectors (seed {report['datasets_seed']}); "
        f"KL from {report['exact_samples']:,} exact posterior draws per dataset; importance sampling with "
        f"{report['particles']:,} particles, {report['chunk']} datasets per batched call (IS time includes compiling "
        "the sampler)",
    ]
    for variant, v in report["variants"].items():
        lines += ["", f"**{variant}** ({v['num_observed']} observed, {v['num_latent']} latent):", "",
                  "| network | parameters | train s | IS s | KL(p‖q) | KL from val. | median ESS/N | mean RMSE | "
                  "sd RMSE | log Z error | log Z RMSE |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in v["networks"].items():
            lines.append(f"| {NETWORK_LABELS[name]} | {r['parameters']:,} | {r['train_seconds']:.0f} | "
                         f"{r['is_seconds']:.0f} | {r['kl']:.2f} ± {r['kl_se']:.2f} | {r['kl_from_validation']:.2f} | "
                         f"{r['median_ess_fraction']:.3f} | {r['mean_rmse_sd_units']:.3f} | "
                         f"{r['sd_rmse_relative']:.3f} | "
                         f"{r['log_z_error_mean']:+.2f} | {r['log_z_error_rmse']:.2f} |")
    lines += ["",
              "KL(p‖q): nats, mean over datasets ± its standard error (between datasets); *KL from val.*: held-out "
              "-log q minus the exact posterior entropy (the same average KL, estimated on joint draws instead); "
              "mean RMSE: RMSE over latents of (IS mean - exact mean) / exact sd; sd RMSE: RMSE of "
              "(IS sd - exact sd) / exact sd; "
              "log Z error: mean of log Z_IS - log p(y) (negative: importance sampling underestimates the evidence on "
              "average); both RMSE columns averaged over datasets."]
    return lines


def arth150_figure(report: dict, path: Path) -> None:
    plt = _pyplot()
    variants = list(report["variants"])
    panels = [("kl", "KL(p||q) (nats)"), ("median_ess_fraction", "median ESS/N"),
              ("mean_rmse_sd_units", "mean RMSE (exact sd units)"), ("sd_rmse_relative", "sd RMSE (relative)"),
              ("log_z_error_rmse", "log Z RMSE (nats)")]
    fig, axes = plt.subplots(len(variants), len(panels), figsize=(17, 3.4 * len(variants)), squeeze=False)
    for row, variant in zip(axes, variants):
        nets = report["variants"][variant]["networks"]
        names = list(nets)
        for ax, (key, title) in zip(row, panels):
            errors = [nets[n]["kl_se"] for n in names] if key == "kl" else None
            _bars(ax, [NETWORK_LABELS[n] for n in names], [[nets[n][key] for n in names]], None,
                  f"{variant}: {title}", errors=errors)
    fig.suptitle(f"arth150: {report['steps']} training steps per network, {report['datasets']} datasets, "
                 f"{report['particles']} particles", fontsize=10)
    _save(fig, path)


# ----------------------------------------------------------------------------------------------
# figures

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _bars(ax, labels, series, legend, title, errors=None):
    """Grouped bars: ``series`` is a list of value lists (one bar per label in each)."""
    width = 0.8 / len(series)
    x = np.arange(len(labels))
    for k, values in enumerate(series):
        colours = [f"C{i}" for i in range(len(labels))] if legend is None else f"C{k}"  # one colour per network
        bars = ax.bar(x + (k - (len(series) - 1) / 2) * width, values, width, color=colours,
                      yerr=errors if k == 0 else None, capsize=3, label=None if legend is None else legend[k])
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.axhline(0.0, color="black", lw=0.5)
    if legend is not None:
        ax.legend(fontsize=7)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    print(f"figure written to {path}")


# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--experiment", choices=("circuit", "arth150", "all"), default="all")
    parser.add_argument("--networks", nargs="+", choices=list(NETWORKS), default=list(NETWORKS),
                        help="networks to compare (default sizes of each)")
    parser.add_argument("--steps", type=int, help="training steps per network (default: circuit 2000, arth150 1500)")
    parser.add_argument("--batch-size", type=int, default=128, help="traces per training step")
    parser.add_argument("--particles", type=int, help="importance samples per case/dataset (circuit 500, arth150 1000)")
    parser.add_argument("--chunk", type=int, help="cases/datasets per batched posterior call (circuit 50, arth150 10)")
    parser.add_argument("--cases", type=int, default=200, help="circuit: single-fault test cases")
    parser.add_argument("--datasets", type=int, default=50, help="arth150: simulated observation vectors per variant")
    parser.add_argument("--exact-samples", type=int, default=1000,
                        help="arth150: exact posterior draws per dataset (KL)")
    parser.add_argument("--variants", nargs="+", choices=("leaves", "leaves40"), default=["leaves", "leaves40"])
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md", help="markdown file for the sections")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results", help="folder for the JSON results")
    parser.add_argument("--figures-dir", type=Path, default=HERE / "figures", help="folder for the figures")
    parser.add_argument("--no-write", action="store_true", help="print only: no RESULTS.md section, JSON or figure")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv

    experiments = {"circuit": (run_circuit, circuit_body, circuit_figure),
                   "arth150": (run_arth150, arth150_body, arth150_figure)}
    chosen = list(experiments) if args.experiment == "all" else [args.experiment]
    for experiment in chosen:
        run, body, figure = experiments[experiment]
        t0 = time.perf_counter()
        report = run(args, args.networks)
        report["seconds"] = time.perf_counter() - t0
        environment = environment_lines(SCRIPT, argv)
        report["environment"] = environment
        lines = environment + body(report) + ["", f"Total wall time of the experiment: {report['seconds']:.0f} s."]
        publish(args.output, HEADINGS[experiment], lines, write=not args.no_write)
        if not args.no_write:
            json_path = write_results_json(args.results_dir / f"proposal_comparison_{experiment}.json", report)
            print(f"results written to {json_path}")
            figure(report, args.figures_dir / f"proposal_comparison_{experiment}.png")


if __name__ == "__main__":
    main()
