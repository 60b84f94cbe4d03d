"""How much network fits 10,000 simulations? jaxic's default transformer against a compact one on sbibm tasks.

sbibm trains on a fixed set of simulations, and a proposal that fits that set too well draws biased
posteriors (bernoulli_glm_raw: a 100-value observation, raw draws up to 0.9 reference sds off at
10,000 simulations). For each task this trains jaxic twice on the very simulations ``benchmarks/sbibm.py``
uses (same seed, same 10% held out, same steps and early stopping): with its default network and
optimizer, and with ``--compact`` sizes and weight decay. It reports what a user can measure without a
reference posterior, the held-out −log q(theta | x) at the restored step (lower is better: it is the
expected KL to the true posterior up to a constant), and what the reference shows: the raw draws'
mean shift in reference sds and sd ratio, over observations 1-10. No C2ST here (``benchmarks/sbibm.py
--d-model/--obs-hidden/--weight-decay`` scores a configuration with it).

    python benchmarks/sbibm_capacity.py
    python benchmarks/sbibm_capacity.py --tasks bernoulli_glm_raw --compact 32 32 0.05 --no-write
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxic

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_io import PACKAGES, benchmark_parser, environment_lines, publish  # noqa: E402
import sbibm  # noqa: E402
import sbibm_reference as reference  # noqa: E402
from sbibm_tasks import TASKS  # noqa: E402

HEADING = "## Network size for a fixed simulation budget: default against compact (benchmarks/sbibm_capacity.py)"


def held_out_loss(compiled) -> float:
    """The held-out −log q(theta | x) of the parameters early stopping restored."""
    steps, losses = compiled.history["validation_step"], compiled.history["validation_loss"]
    return float(losses[steps.index(compiled.best_step)])


def measure(task, theta, x, args, label: str, folder: Path) -> dict:
    compiled, train_s = sbibm.train_jaxic(task, theta, x, args, folder)
    shifts, widths = [], []
    for k in args.observations:
        obs = {"obs": jnp.asarray(reference.observation(task.name, k), jnp.float32).reshape(task.obs_dim)}
        ref = np.asarray(reference.reference_posterior(task.name, k))
        raw = np.asarray(compiled.sample(jax.random.key(10 + k), obs, args.draws)["theta"])
        fit = sbibm.marginals(raw, ref)
        shifts.append(fit["shift"])
        widths.append(fit["width"])
    shifts, widths = np.abs(np.array(shifts)), np.array(widths)
    row = {"task": task.name, "network": label, "loss": held_out_loss(compiled), "train_s": train_s,
           "trained": f"{compiled.step:,} steps (best {compiled.best_step:,})",
           "shift": (shifts.mean(), shifts.max()), "width": (widths.min(), widths.max())}
    print(f"  {task.name} {label}: held-out -log q {row['loss']:.3f}, {row['trained']}, {train_s:.0f} s, |shift| "
          f"{row['shift'][0]:.2f} / {row['shift'][1]:.2f}, sd ratio {row['width'][0]:.2f}-{row['width'][1]:.2f}",
          flush=True)
    return row


def table(rows: list[dict]) -> list[str]:
    lines = ["| task | network | held-out −log q(θ given x) | raw mean shift, mean / worst (ref. sds) | raw sd ratio, range "
             "| trained | training s |", "|---|---|---:|---|---|---|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['network']} | {r['loss']:.3f} | {r['shift'][0]:.2f} / {r['shift'][1]:.2f} | "
                     f"{r['width'][0]:.2f}-{r['width'][1]:.2f} | {r['trained']} | {r['train_s']:.0f} |")
    return lines


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = benchmark_parser(__doc__, HERE / "RESULTS.md")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--simulations", type=int, default=10_000)
    parser.add_argument("--observations", type=int, nargs="+", default=list(range(1, 11)))
    parser.add_argument("--draws", type=int, default=10_000, help="raw draws per observation")
    compact = jaxic.COMPACT_CANDIDATE
    parser.add_argument("--compact", nargs=3, type=float,
                        default=[compact["network"].d_model, compact["network"].obs_hidden, compact["weight_decay"]],
                        metavar=("D_MODEL", "OBS_HIDDEN", "WEIGHT_DECAY"), help="the compact configuration")
    sbibm.add_training_options(parser)
    args = parser.parse_args(argv)
    d_model, obs_hidden, weight_decay = int(args.compact[0]), int(args.compact[1]), args.compact[2]
    configurations = {"default": {"d_model": None, "obs_hidden": None, "weight_decay": None},
                      f"d_model {d_model}, obs_hidden {obs_hidden}, weight decay {weight_decay:g}":
                          {"d_model": d_model, "obs_hidden": obs_hidden, "weight_decay": weight_decay}}
    environment = environment_lines("sbibm_capacity.py", argv, PACKAGES + ("diffrax",))
    reference.reference_files()
    rows = []
    with tempfile.TemporaryDirectory(prefix="jaxic-capacity-") as scratch:
        for name in args.tasks:
            theta, x = sbibm.simulations_for(TASKS[name], args.simulations, args.seed)
            for i, (label, sizes) in enumerate(configurations.items()):
                run_args = argparse.Namespace(**{**vars(args), **sizes})
                rows.append(measure(TASKS[name], theta, x, run_args, label, Path(scratch) / f"{name}-{i}"))
    body = environment + [
        f"- {args.simulations:,} simulations per task (seed {args.seed}, the set `benchmarks/sbibm.py` trains on), "
        f"10% held out; batch {args.batch_size}, min(max({args.epochs} epochs, {args.min_steps:,} steps), "
        f"{args.max_steps:,} steps), patience {args.patience}, best validated parameters restored. Raw draws: "
        f"{args.draws:,} per observation, observations {args.observations[0]}-{args.observations[-1]}.",
        "", *table(rows)]
    publish(args.output, HEADING, body, write=not args.no_write)


if __name__ == "__main__":
    main()
