"""jaxic on the SBI benchmark (sbibm 1.1.0 tasks; Lueckmann et al., AISTATS 2021), scored with C2ST.

Tasks: the NumPyro transcriptions in ``benchmarks/sbibm_tasks.py``; observations and 10,000 reference
posterior draws per observation from sbibm's files (``benchmarks/sbibm_reference.py``; fetched on the
first run with ``pip download sbibm==1.1.0 --no-deps``).

For every task and simulation budget (``--simulations``), one set of prior predictive simulations is
drawn and both methods train on exactly that set, holding 10% out for early stopping: jaxic from it as
an offline trace dataset (``jaxic.tracing.write_simulations``; ``--epochs`` passes, at least ``--min-steps``
and at most ``--max-steps`` optimisation steps, stopping after ``--patience`` validations without a
better held-out loss and restoring the best parameters), sbi's NPE as ``append_simulations``. Then, for
each observation in ``--observations``:

* **raw**: ``--draws`` raw proposal draws (``compiled.sample``) against as many reference draws;
* **IS**: ``--draws`` draws resampled from ``--oversample`` times as many importance particles (so that
  repeated particles stay rare: the classifier would otherwise tell the sets apart by memorising points),
  with the particles' ESS/N; not for a task whose observation has no likelihood (``bernoulli_glm``);
* **sbi NPE** (when the ``sbi`` package is installed, ``--peers npe``): sbi's default NPE trained on the
  very same simulations, ``--draws`` samples per observation.

C2ST is ``jaxic.diagnostics.c2st`` (sbibm's protocol: MLP with two hidden layers of 10 x dim, 5-fold
cross-validation, z-scored on the reference). Each (task, budget, method) measured is kept, with its
per-observation rows and the run that made it, in ``--results`` (``benchmarks/results/sbibm.json``), so
that runs of different tasks add up; the table of everything kept goes to stdout and to the section
``## SBI benchmark: C2ST against sbibm's reference posteriors (benchmarks/sbibm.py)`` of
``benchmarks/RESULTS.md``, with the bar chart ``--figure``.

    python benchmarks/sbibm.py                                                # all tasks, 10k and 100k, obs 1-10
    python benchmarks/sbibm.py --tasks two_moons --simulations 10000 --observations 1 2 --draws 2000 --no-write
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

import jaxic
from jaxic.diagnostics import c2st
from jaxic.tracing import TraceDataset, write_simulations

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_io import (PACKAGES, benchmark_parser, environment_lines, publish, repo_relative,  # noqa: E402
                        write_results_json)
import sbibm_reference as reference  # noqa: E402
from sbibm_tasks import TASKS, simulate  # noqa: E402

HEADING = "## SBI benchmark: C2ST against sbibm's reference posteriors (benchmarks/sbibm.py)"


NPE_LABEL = "sbi NPE"
DEFAULT_BATCH_SIZE = 64  # jaxic.compile's; a run with another is kept as its own method
# Groups stored before 2026-11-30 20:00 UTC built NPE without the prior, so its draws outside the prior's support were
# kept; their stored groups carry this name.
NPE_WITHOUT_PRIOR = "sbi NPE (prior not passed)"


def simulations_for(task, simulations: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``simulations`` prior predictive draws (theta, x): the one training set both methods see."""
    key_theta, key_x = jax.random.split(jax.random.key(seed))
    theta = np.asarray(task.prior_sample(key_theta, simulations))
    x = np.asarray(simulate(task, key_x, theta))
    finite = np.isfinite(x).all(axis=1)  # ODE solves that did not finish: sbibm drops them too
    if not finite.all():
        print(f"{task.name}: {int((~finite).sum())} of {simulations} simulations did not finish and are dropped",
              file=sys.stderr)
    return theta[finite], x[finite]


def marginals(draws: np.ndarray, ref: np.ndarray) -> dict:
    """Per parameter, how the draws' marginal sits against the reference: mean shift in reference sds, and
    sd ratio; which parameter a high C2ST comes from."""
    sd = ref.std(axis=0)
    return {"shift": ((draws.mean(axis=0) - ref.mean(axis=0)) / sd).round(3).tolist(),
            "width": (draws.std(axis=0) / sd).round(3).tolist()}


def network_overrides(args) -> dict:
    """The transformer sizes given on the command line (``--d-model``, ``--obs-hidden``): none by default."""
    sizes = {"d_model": args.d_model, "obs_hidden": args.obs_hidden}
    return {name: value for name, value in sizes.items() if value is not None}


def jaxic_label(args) -> str:
    """``"jaxic"`` with its defaults; a run that changes the network, the weight decay or the batch size is kept
    as its own method, e.g. ``"jaxic (d_model 32, obs_hidden 64, weight decay 0.05)"``."""
    changes = [f"{name} {value}" for name, value in network_overrides(args).items()]
    changes += [] if args.weight_decay is None else [f"weight decay {args.weight_decay:g}"]
    changes += [] if args.batch_size == DEFAULT_BATCH_SIZE else [f"batch {args.batch_size}"]
    changes += ["network chosen by held-out loss"] if args.select else []
    return "jaxic" if not changes else f"jaxic ({', '.join(changes)})"


def train_jaxic(task, theta: np.ndarray, x: np.ndarray, args, folder: Path):
    """jaxic defaults (or the sizes and weight decay in ``args``, or with ``--select`` the better of
    :func:`jaxic.compile_best`'s candidates) trained on the fixed simulations, 10% held out for early stopping as
    sbi does: ``(compiled, training seconds)`` (with ``--select``, the seconds of every candidate)."""
    simulations = len(theta)
    holdout = max(simulations // 10, 1)
    per_epoch = max((simulations - holdout) // args.batch_size, 1)
    steps = min(max(args.epochs * per_epoch, args.min_steps), args.max_steps)
    start = time.perf_counter()
    write_simulations(folder, task.model, {"theta": theta, "obs": x}, ["obs"], shard_size=len(theta))
    dataset = TraceDataset(folder, holdout=holdout)
    sizes = network_overrides(args)
    common = dict(dataset=dataset, batch_size=args.batch_size, validation_size=holdout, patience=args.patience,
                  progress=False)
    if args.select:
        selection = jaxic.compile_best(task.model, ["obs"], jax.random.key(args.seed), steps, **common)
        print(f"{task.name}, {simulations:,} simulations, network chosen by held-out loss:\n{selection.summary()}",
              file=sys.stderr, flush=True)
        return selection.compiled, time.perf_counter() - start
    compiled = jaxic.compile(task.model, ["obs"], jax.random.key(args.seed), steps,
                             network=jaxic.TransformerConfig(**sizes) if sizes else None,
                             weight_decay=args.weight_decay, **common)
    return compiled, time.perf_counter() - start


def jaxic_runs(task, theta: np.ndarray, x: np.ndarray, args, folder: Path) -> list[dict]:
    """:func:`train_jaxic`, then raw and importance-resampled draws scored per observation (raw only for a
    task whose observation has no likelihood)."""
    simulations = len(theta)
    compiled, train_s = train_jaxic(task, theta, x, args, folder)
    rows = []
    for k in args.observations:
        obs = {"obs": jnp.asarray(reference.observation(task.name, k), jnp.float32).reshape(task.obs_dim)}
        ref = np.asarray(reference.reference_posterior(task.name, k))[: args.draws]
        start = time.perf_counter()
        raw = np.asarray(compiled.sample(jax.random.key(10 + k), obs, args.draws)["theta"])
        weighted = {"c2st_is": float("nan"), "ess_fraction": float("nan")}
        if task.has_likelihood:  # otherwise importance sampling has no p(obs | theta) to weigh with
            post = compiled.posterior(jax.random.key(20 + k), obs, args.draws * args.oversample)
            resampled = np.asarray(post.resample(jax.random.key(30 + k), args.draws)["theta"])
            weighted = {"c2st_is": c2st(resampled, ref, n_jobs=args.c2st_jobs),
                        "ess_fraction": float(post.ess) / post.num_samples, "is": marginals(resampled, ref)}
        sample_s = time.perf_counter() - start
        rows.append(report({"task": task.name, "simulations": simulations, "observation": k,
                            "method": jaxic_label(args), "train_s": train_s, "sample_s": sample_s,
                            "steps": compiled.step, "best_step": compiled.best_step,
                            "c2st_raw": c2st(raw, ref, n_jobs=args.c2st_jobs), "raw": marginals(raw, ref),
                            **weighted}))
    return rows


def torch_prior(prior: dist.Distribution):
    """The task's NumPyro prior as the torch distribution sbi takes (``NPE(prior=...)``): with it sbi
    rejects posterior draws outside the prior's support, as an sbi user's NPE does.

    Example:
        >>> torch_prior(TASKS["two_moons"].prior())   # sbi's BoxUniform on (-1, 1)^2
    """
    import torch
    from sbi.utils import BoxUniform

    as_tensor = lambda a: torch.as_tensor(np.array(a, np.float32))
    if isinstance(prior, dist.MultivariateNormal):
        return torch.distributions.MultivariateNormal(as_tensor(prior.loc), as_tensor(prior.covariance_matrix))
    base = prior.base_dist if isinstance(prior, dist.Independent) else None
    if isinstance(base, dist.Uniform):
        return BoxUniform(as_tensor(base.low), as_tensor(base.high))
    if isinstance(base, dist.LogNormal):
        return torch.distributions.Independent(torch.distributions.LogNormal(as_tensor(base.loc),
                                                                             as_tensor(base.scale)), 1)
    if isinstance(base, dist.Normal):
        return torch.distributions.Independent(torch.distributions.Normal(as_tensor(base.loc),
                                                                          as_tensor(base.scale)), 1)
    raise ValueError(f"no torch prior for {prior!r}: add its case to torch_prior")


def npe_runs(task, theta: np.ndarray, x: np.ndarray, args, folder: Path) -> list[dict]:
    """sbi's NPE (default density estimator and training loop) on the same simulations; its TensorBoard
    log goes to ``folder`` (by default sbi writes ``sbi-logs/`` into the working directory)."""
    import torch
    from sbi.inference import NPE
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    inference = NPE(prior=torch_prior(task.prior()), show_progress_bars=False,
                    summary_writer=SummaryWriter(log_dir=str(folder)))
    inference.append_simulations(torch.as_tensor(theta, dtype=torch.float32), torch.as_tensor(x, dtype=torch.float32))
    estimator = inference.train(show_train_summary=False)
    posterior = inference.build_posterior(estimator)
    train_s = time.perf_counter() - start
    epochs = inference.summary["epochs_trained"][-1] if "epochs_trained" in inference.summary else None
    rows = []
    for k in args.observations:
        ref = np.asarray(reference.reference_posterior(task.name, k))[: args.draws]
        start = time.perf_counter()
        obs = torch.as_tensor(np.asarray(reference.observation(task.name, k), np.float32).reshape(1, -1))
        draws = posterior.sample((args.draws,), x=obs, show_progress_bars=False).numpy()
        sample_s = time.perf_counter() - start
        # The share of the flow's own draws that sbi rejects for leaving the prior's support (what an NPE
        # built without the prior would have kept).
        unrejected = posterior.sample((args.draws,), x=obs, show_progress_bars=False, reject_outside_prior=False)
        outside = 1.0 - float(posterior.prior.support.check(unrejected).float().mean())
        rows.append(report({"task": task.name, "simulations": len(theta), "observation": k, "method": NPE_LABEL,
                            "train_s": train_s, "sample_s": sample_s, "steps": epochs,
                            "c2st_raw": c2st(draws, ref, n_jobs=args.c2st_jobs), "c2st_is": float("nan"),
                            "ess_fraction": float("nan"), "outside_prior": outside,
                            "raw": marginals(draws, ref)}))
    return rows


def report(row: dict) -> dict:
    """Print one observation's scores as soon as they are measured (a group's table comes at its end); which
    observation and which parameter a high C2ST comes from."""
    leak = f", draws outside the prior {row['outside_prior']:.4f}" if "outside_prior" in row else ""
    print(f"  {row['task']} {row['simulations']:,} {row['method']} observation {row['observation']}: C2ST raw "
          f"{row['c2st_raw']:.3f}, after IS {row['c2st_is']:.3f}, ESS/N {row['ess_fraction']:.4f}{leak}; raw "
          f"shift {row['raw']['shift']}, width {row['raw']['width']}", flush=True)
    return row


def trained(row: dict) -> str:
    """How long the method trained: jaxic's steps (and the restored best), sbi's epochs."""
    if row["method"].startswith("jaxic"):
        return f"{row['steps']:,} steps (best {row['best_step']:,})"
    return "-" if row["steps"] is None else f"{row['steps']} epochs"


def summarise(rows: list[dict], run: dict) -> list[dict]:
    """Per task, simulation budget and method, what the table and the figure show: C2ST raw and after IS
    as (mean, worst) over the observations (NaN: not scored), ESS/N, times; with ``run`` (date, command)
    and the per-observation ``rows`` themselves."""
    groups = []
    for key in dict.fromkeys((r["task"], r["simulations"], r["method"]) for r in rows):
        rs = [r for r in rows if (r["task"], r["simulations"], r["method"]) == key]
        scores = {score: [float(np.mean([r[score] for r in rs])), float(np.max([r[score] for r in rs]))]
                  for score in ("c2st_raw", "c2st_is")}
        groups.append({"task": key[0], "simulations": key[1], "method": key[2],
                       "observations": [r["observation"] for r in rs], **scores,
                       "ess_fraction": float(np.mean([r["ess_fraction"] for r in rs])),
                       "train_s": rs[0]["train_s"], "trained": trained(rs[0]),
                       "sample_s": float(np.mean([r["sample_s"] for r in rs])), "run": run, "rows": rs})
    return groups


def merge(stored: list[dict], new: list[dict]) -> list[dict]:
    """``stored`` groups with those of ``new`` put in place of the same (task, budget, method), or
    appended; ordered by task, budget and method."""
    key = lambda g: (g["task"], g["simulations"], g["method"])
    fresh = {key(g): g for g in new}
    kept = [g for g in stored if key(g) not in fresh] + list(fresh.values())
    order = list(TASKS)
    return sorted(kept, key=lambda g: (order.index(g["task"]) if g["task"] in order else len(order), *key(g)[1:]))


def load_groups(path: Path) -> list[dict]:
    """The groups stored by earlier runs (none if ``path`` does not exist)."""
    return json.loads(path.read_text())["groups"] if path.exists() else []


def table(groups: list[dict]) -> list[str]:
    """The markdown table of ``groups``, and below it the runs the rows come from, numbered in the order they
    ran (a new run takes the next number, so notes that cite a run by number stay right)."""
    runs = sorted(dict.fromkeys((g["run"]["date"], g["run"]["command"]) for g in groups))
    cell = lambda pair: "-" if not np.isfinite(pair[0]) else f"{pair[0]:.3f} / {pair[1]:.3f}"
    lines = ["| task | simulations | method | observations | C2ST raw mean / worst | C2ST after IS mean / worst | "
             "ESS/N mean | training s | trained | sampling s per observation | run |",
             "|---|---:|---|---:|---|---|---:|---:|---|---:|---:|"]
    for g in groups:
        ess = "-" if not np.isfinite(g["ess_fraction"]) else f"{g['ess_fraction']:.3f}"
        run = runs.index((g["run"]["date"], g["run"]["command"])) + 1
        lines.append(f"| {g['task']} | {g['simulations']:,} | {g['method']} | {len(g['observations'])} | "
                     f"{cell(g['c2st_raw'])} | {cell(g['c2st_is'])} | {ess} | {g['train_s']:.0f} | {g['trained']} | "
                     f"{g['sample_s']:.1f} | {run} |")
    details = {(g["run"]["date"], g["run"]["command"]): g["run"] for g in groups}
    lines += ["", "Runs:"] + [f"{i}. {date}: `{command}` ({details[date, command].get('machine', '?')}; "
                              f"{details[date, command].get('versions', '?')})" for i, (date, command) in enumerate(runs, 1)]
    return lines


def figure(groups: list[dict], path: Path) -> None:
    """Bars of mean C2ST per task and budget (sbi NPE, jaxic raw, jaxic after IS); ticks mark the worst observation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(dict.fromkeys((g["task"], g["simulations"]) for g in groups))
    series = [((NPE_LABEL, NPE_WITHOUT_PRIOR), "c2st_raw", "sbi NPE (hatched: prior not passed)"),
              (("jaxic",), "c2st_raw", "jaxic raw"), (("jaxic",), "c2st_is", "jaxic after IS")]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(pairs)), 3.6))
    width = 0.8 / len(series)
    for j, (method, score, label) in enumerate(series):
        xs, means, worsts, hatches = [], [], [], []
        for i, pair in enumerate(pairs):
            match = [g for name in method for g in groups if (g["task"], g["simulations"]) == pair and g["method"] == name]
            if match and np.isfinite(match[0][score][0]):
                xs.append(i + (j - 1) * width)
                means.append(match[0][score][0])
                worsts.append(match[0][score][1])
                hatches.append("//" if match[0]["method"] == NPE_WITHOUT_PRIOR else "")
        bars = ax.bar(xs, np.array(means) - 0.5, width, bottom=0.5, label=label)
        for bar, hatch in zip(bars, hatches):
            bar.set_hatch(hatch)
        ax.plot(xs, worsts, "k_", ms=10)
    ax.axhline(0.55, color="grey", ls="--", lw=1)
    ax.set_xticks(range(len(pairs)), [f"{t}\n{n:,}" for t, n in pairs], fontsize=8)
    ax.set(ylabel="C2ST (0.5 = indistinguishable)", ylim=(0.45, 1.0),
           title="sbibm: mean over observations (bars), worst observation (ticks)")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_training_options(parser) -> None:
    """How jaxic trains on the simulations (shared with ``benchmarks/sbibm_capacity.py``)."""
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--epochs", type=int, default=40, help="jaxic: passes over the simulations at most")
    parser.add_argument("--min-steps", type=int, default=5000, help="jaxic: optimisation steps at least")
    parser.add_argument("--max-steps", type=int, default=60_000, help="jaxic: optimisation steps at most")
    parser.add_argument("--patience", type=int, default=6,
                        help="jaxic: validations (20 per run) without a better held-out loss before stopping")
    parser.add_argument("--d-model", type=int, default=None, help="jaxic: transformer width (default: jaxic's)")
    parser.add_argument("--obs-hidden", type=int, default=None,
                        help="jaxic: hidden width of the observation embedder (default: jaxic's)")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="jaxic: AdamW weight decay of its default optimizer (default: jaxic's, 1e-4)")
    parser.add_argument("--select", action="store_true",
                        help="jaxic: train jaxic.compile_best's candidates (its defaults and jaxic.COMPACT_CANDIDATE) "
                             "and keep the one with the lower held-out loss; kept as its own method")
    parser.add_argument("--seed", type=int, default=0)


def parse_args(argv):
    parser = benchmark_parser(__doc__, HERE / "RESULTS.md")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--simulations", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--observations", type=int, nargs="+", default=list(range(1, 11)))
    parser.add_argument("--draws", type=int, default=10_000, help="draws compared with the reference")
    parser.add_argument("--oversample", type=int, default=20, help="IS particles per resampled draw")
    add_training_options(parser)
    parser.add_argument("--peers", nargs="*", default=["npe"], choices=["npe"])
    parser.add_argument("--no-jaxic", action="store_true",
                        help="run the peers only (on the same seeded simulations as a run with jaxic)")
    parser.add_argument("--c2st-jobs", type=int, default=-1,
                        help="C2ST folds trained at once (-1: one per core; the score does not depend on it)")
    parser.add_argument("--render", action="store_true",
                        help="run nothing: write the table and figure of what --results holds")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "sbibm.json",
                        help="the measured groups, kept across runs (not read or written with --no-write)")
    parser.add_argument("--figure", type=Path, default=HERE / "figures" / "sbibm_c2st.png",
                        help="where the C2ST bar chart goes (not written with --no-write)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    reference.reference_files()  # downloads sbibm's files once
    peers = args.peers if importlib.util.find_spec("sbi") is not None else []
    if args.peers and not peers:
        print("sbi is not installed (pip install sbi): running jaxic only", file=sys.stderr)
    peer_note = ", ".join(peers) if peers else ("none (sbi not installed)" if args.peers else "none")
    environment = environment_lines("sbibm.py", argv, PACKAGES + ("diffrax", "scikit-learn") +
                                    (("sbi", "torch") if peers else ()))
    machine, date, versions, command = (line.split(": ", 1)[1] for line in environment)
    run = {"date": date, "command": command.strip("`"), "machine": machine, "versions": versions}
    groups = [] if args.no_write else load_groups(args.results)
    with tempfile.TemporaryDirectory(prefix="jaxic-sbibm-") as scratch:
        for name in [] if args.render else args.tasks:
            for simulations in args.simulations:
                theta, x = simulations_for(TASKS[name], simulations, args.seed)
                rows = [] if args.no_jaxic else jaxic_runs(TASKS[name], theta, x, args,
                                                           Path(scratch) / f"{name}-{simulations}")
                if "npe" in peers:
                    rows += npe_runs(TASKS[name], theta, x, args, Path(scratch) / f"{name}-{simulations}-sbi-logs")
                new = summarise(rows, run)
                print("\n".join(table(new)[2:-3]), flush=True)
                groups = merge(groups, new)
                if not args.no_write:  # after every budget, so a run stopped later keeps what it measured
                    write_results_json(args.results, {"groups": groups})
    if args.render:
        environment = [f"- Rendered {run['date']} from `{repo_relative(args.results)}`; machines, dates and "
                       "versions are those of the runs listed under the table."]
    body = environment + [
        f"- Protocol: both methods train on the same simulations (prior predictive draws, seed {args.seed}), "
        f"10% held out for early stopping. jaxic: its defaults, batch size {args.batch_size}, "
        f"min(max({args.epochs} epochs, {args.min_steps:,} steps), {args.max_steps:,} steps), patience {args.patience} "
        f"validations, best validated parameters restored; sbi: NPE(prior=the task's prior) with its default "
        f"estimator and training loop, so that draws outside the prior's support are rejected as sbi does "
        f"(\"{NPE_WITHOUT_PRIOR}\": earlier runs without it). {args.draws:,} draws per observation against as many reference draws; IS draws resampled from "
        f"{args.oversample}x as many particles; C2ST = jaxic.diagnostics.c2st (sbibm's classifier and folds)"
        + ("." if args.render else f"; peers in this run: {peer_note}."),
        f"- The table holds every (task, budget, method) measured so far (`{repo_relative(args.results)}`); a run "
        "replaces the rows it measures." + ("" if args.render else " The machine, date and versions above are this "
                                            "run's."), "", *table(groups)]
    if not args.no_write:
        figure(groups, args.figure)
        body.append(f"\n- Figure: `{repo_relative(args.figure)}`")
    publish(args.output, HEADING, body, write=not args.no_write)


if __name__ == "__main__":
    main()
