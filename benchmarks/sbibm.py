"""jaxic on the SBI benchmark (sbibm 1.1.0 tasks; Lueckmann et al., AISTATS 2021), scored with C2ST.

Tasks: the NumPyro transcriptions in ``benchmarks/sbibm_tasks.py``; observations and 10,000 reference
posterior draws per observation from sbibm's files (``benchmarks/sbibm_reference.py``; fetched on the
first run with ``pip download sbibm==1.1.0 --no-deps``).

For every task and simulation budget (``--simulations``: training steps x batch size, jaxic's defaults
otherwise), one proposal is compiled and then, for each observation in ``--observations``:

* **raw**: ``--draws`` raw proposal draws (``compiled.sample``) against as many reference draws;
* **IS**: ``--draws`` draws resampled from ``--oversample`` times as many importance particles (so that
  repeated particles stay rare: the classifier would otherwise tell the sets apart by memorising points),
  with the particles' ESS/N;
* **sbi NPE** (when the ``sbi`` package is installed, ``--peers npe``): sbi's default NPE trained on the
  very same simulations (the jaxic run's training draws are regenerated from the model with the same
  number of simulations), ``--draws`` samples per observation.

C2ST is ``jaxic.diagnostics.c2st`` (sbibm's protocol: MLP with two hidden layers of 10 x dim, 5-fold
cross-validation, z-scored on the reference). The table goes to stdout and to the section
``## SBI benchmark: C2ST against sbibm's reference posteriors (benchmarks/sbibm.py)`` of
``benchmarks/RESULTS.md``.

    python benchmarks/sbibm.py                                                # all tasks, 10k and 100k, obs 1-10
    python benchmarks/sbibm.py --tasks two_moons --simulations 10000 --observations 1 2 --draws 2000 --no-write
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxic
from jaxic.diagnostics import c2st

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_io import benchmark_parser, environment_lines, publish  # noqa: E402
import sbibm_reference as reference  # noqa: E402
from sbibm_tasks import TASKS  # noqa: E402

HEADING = "## SBI benchmark: C2ST against sbibm's reference posteriors (benchmarks/sbibm.py)"


def jaxic_runs(task, simulations: int, args) -> list[dict]:
    steps = max(simulations // args.batch_size, 1)
    start = time.perf_counter()
    compiled = jaxic.compile(task.model, ["obs"], jax.random.key(args.seed), num_steps=steps,
                             batch_size=args.batch_size, progress=False)
    train_s = time.perf_counter() - start
    rows = []
    for k in args.observations:
        obs = {"obs": jnp.asarray(reference.observation(task.name, k), jnp.float32).reshape(task.obs_dim)}
        ref = np.asarray(reference.reference_posterior(task.name, k))[: args.draws]
        start = time.perf_counter()
        raw = np.asarray(compiled.sample(jax.random.key(10 + k), obs, args.draws)["theta"])
        post = compiled.posterior(jax.random.key(20 + k), obs, args.draws * args.oversample)
        resampled = np.asarray(post.resample(jax.random.key(30 + k), args.draws)["theta"])
        sample_s = time.perf_counter() - start
        rows.append({"task": task.name, "simulations": steps * args.batch_size, "observation": k,
                     "method": "jaxic", "train_s": train_s, "sample_s": sample_s,
                     "c2st_raw": c2st(raw, ref), "c2st_is": c2st(resampled, ref),
                     "ess_fraction": float(post.ess) / post.num_samples})
    return rows


def npe_runs(task, simulations: int, args) -> list[dict]:
    """sbi's NPE (default density estimator and training loop) on ``simulations`` prior predictive draws."""
    import torch
    from sbi.inference import NPE

    key_theta, key_x = jax.random.split(jax.random.key(args.seed))
    from sbibm_tasks import simulate
    theta = task.prior_sample(key_theta, simulations)
    x = simulate(task, key_x, theta)
    start = time.perf_counter()
    inference = NPE()
    inference.append_simulations(torch.as_tensor(np.asarray(theta)), torch.as_tensor(np.asarray(x, np.float32)))
    estimator = inference.train(show_train_summary=False)
    posterior = inference.build_posterior(estimator)
    train_s = time.perf_counter() - start
    rows = []
    for k in args.observations:
        ref = np.asarray(reference.reference_posterior(task.name, k))[: args.draws]
        start = time.perf_counter()
        obs = torch.as_tensor(np.asarray(reference.observation(task.name, k), np.float32).reshape(1, -1))
        draws = posterior.sample((args.draws,), x=obs, show_progress_bars=False).numpy()
        rows.append({"task": task.name, "simulations": simulations, "observation": k, "method": "sbi NPE",
                     "train_s": train_s, "sample_s": time.perf_counter() - start,
                     "c2st_raw": c2st(draws, ref), "c2st_is": float("nan"), "ess_fraction": float("nan")})
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = ["| task | simulations | method | observations | C2ST raw mean / worst | C2ST after IS mean / worst | "
             "ESS/N mean | training s | sampling s per observation |", "|---|---:|---|---:|---|---|---:|---:|---:|"]
    groups = dict.fromkeys((r["task"], r["simulations"], r["method"]) for r in rows)
    for task, simulations, method in groups:
        rs = [r for r in rows if (r["task"], r["simulations"], r["method"]) == (task, simulations, method)]
        cell = lambda key: (f"{statistics.mean(r[key] for r in rs):.3f} / {max(r[key] for r in rs):.3f}"
                            if np.isfinite(rs[0][key]) else "-")
        ess = statistics.mean(r["ess_fraction"] for r in rs)
        lines.append(f"| {task} | {simulations:,} | {method} | {len(rs)} | {cell('c2st_raw')} | {cell('c2st_is')} | "
                     f"{'-' if not np.isfinite(ess) else f'{ess:.3f}'} | {rs[0]['train_s']:.0f} | "
                     f"{statistics.mean(r['sample_s'] for r in rs):.1f} |")
    return lines


def parse_args(argv):
    parser = benchmark_parser(__doc__, HERE / "RESULTS.md")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--simulations", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--observations", type=int, nargs="+", default=list(range(1, 11)))
    parser.add_argument("--draws", type=int, default=10_000, help="draws compared with the reference")
    parser.add_argument("--oversample", type=int, default=20, help="IS particles per resampled draw")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peers", nargs="*", default=["npe"], choices=["npe"])
    return parser.parse_args(argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    reference.reference_files()  # downloads sbibm's files once
    peers = args.peers if importlib.util.find_spec("sbi") is not None else []
    if args.peers and not peers:
        print("sbi is not installed (pip install sbi): running jaxic only", file=sys.stderr)
    rows = []
    for name in args.tasks:
        for simulations in args.simulations:
            new = jaxic_runs(TASKS[name], simulations, args)
            if "npe" in peers:
                new += npe_runs(TASKS[name], simulations, args)
            rows += new
            print("\n".join(table(new)[2:]), flush=True)
    body = environment_lines("sbibm.py", argv) + [
        f"- Protocol: jaxic defaults with batch size {args.batch_size} (simulations = steps x batch size); "
        f"{args.draws:,} draws per observation against as many reference draws; IS draws resampled from "
        f"{args.oversample}x as many particles; C2ST = jaxic.diagnostics.c2st (sbibm's classifier and folds); "
        f"peers: {', '.join(peers) or 'none (sbi not installed)'}.", "", *table(rows)]
    publish(args.output, HEADING, body, write=not args.no_write)


if __name__ == "__main__":
    main()
