"""Attention for inference compilation: transformer vs LSTM vs feed-forward proposals over M nuisance sites.

Reproduces the pedagogical experiment of *Attention for Inference Compilation* (Harvey et al.
2019). In ``jaxic.models.pedagogical(M)`` x ~ N(0, 10), then M nuisance sites, then y ~ N(0, 10);
``obs ~ N(x**2 + y**2, 0.1)``. The posterior is the ring ``x**2 + y**2 = obs``: a good proposal
for y must read x, which lies M tokens back. The paper's finding: an LSTM copes with a few
nuisance sites, but from M of about 50 on only the attention-based proposal still finds the ring.

For every (M, network) the proposal is compiled once (``jaxic.compile(..., num_steps=0)``: the
default optimizer then keeps a constant learning rate after its 100-step warm-up, so a time budget
does not depend on a planned horizon) and trained with an equal budget: ``--seconds`` of wall-clock
training (default) or ``--steps`` steps, batch 64, the same learning rate and seed (hence the same
validation set and the same stream of training traces). The first compiled chunk of
``steps_per_call`` = 25 steps traces and compiles the training step: its wall time is reported as
compile time and is outside the time budget (its steps are counted). The held-out loss recorded
after each training chunk (the learning curve in the JSON) is also outside the budget. See
``benchmarks/pedagogical_metrics.py`` (``train_for``).

Figures per (M, network):

* **-log q(x,y)**: held-out forward-KL loss on x and y, the mean over the compiled model's 1024
  held-out joint samples of ``-log q(x | obs) - log q(y | x, nuisance, obs)`` (per-token log q of
  the network, tokens of x and y only); **-log q(trace)**: the same over the whole trace;
* **ESS/N** at obs = 25 (and any other ``--obs``): importance sampling with ``--particles``
  particles, mean over ``--seeds`` seeds; the prior as the proposal gives the floor shown;
* **on ring / y>0**: of the raw (unweighted) proposal draws at obs = 25, the fraction with
  ``|sqrt(x**2 + y**2) - 5| < 0.25`` (an exact posterior draw: about 1.0, the noise being 0.1) and
  the fraction with y > 0 (about 0.5 when q(y | x) finds both solutions ``y = +-sqrt(25 - x**2)``);
* steps done, training traces/s, build and compile times, parameter count.

Outputs: ``benchmarks/results/attention_vs_lstm.json`` (every number, the configuration and the
environment; written after each run, so an interrupted sweep keeps what it finished),
``benchmarks/figures/attention_vs_lstm.png`` (three panels against M) and the section
``## Attention vs LSTM vs feed-forward over nuisance sites (benchmarks/attention_vs_lstm.py)`` of
``benchmarks/RESULTS.md``.

    python benchmarks/attention_vs_lstm.py                                # 18 runs of 120 s of training each
    python benchmarks/attention_vs_lstm.py --matched --seconds 300        # networks of ~120k parameters each
    python benchmarks/attention_vs_lstm.py --M 0 20 --seconds 5 --particles 500 --no-write   # quick check
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import jax

import jaxic
from jaxic import training as jaxic_training
from jaxic.models import pedagogical
from jaxic.networks import NETWORKS, FeedForwardConfig, LSTMConfig, TransformerConfig
from pedagogical_metrics import (circle_mass, heldout_loss, importance_metrics, plot_sweep, prior_ess_fraction,
                                 train_for)
from results_io import environment_lines, publish, repo_relative, write_results_json

HEADING = "## Attention vs LSTM vs feed-forward over nuisance sites (benchmarks/attention_vs_lstm.py)"
HERE = Path(__file__).resolve().parent
RING_OBS = 25.0  # the observation whose raw proposal draws are checked against the ring

# --matched: about 120k parameters each at M = 20 (transformer 120,280; LSTM 120,212; feed-forward 118,168).
# The defaults are transformer 120,280, LSTM 58,892 and feed-forward 65,752 parameters at M = 20.
MATCHED = {"transformer": TransformerConfig(), "lstm": LSTMConfig(lstm_dim=104),
           "feedforward": FeedForwardConfig(hidden_dim=224)}


# The transformer as it was before its attention query learned the next site (ablation).
VARIANTS = {"transformer-previous-query": TransformerConfig(next_site_query=False)}


def network_config(name: str, args: argparse.Namespace):
    if name in VARIANTS:
        config = VARIANTS[name]
        return config if args.transformer_layers is None else dataclasses.replace(config, num_layers=args.transformer_layers)
    config = MATCHED[name] if args.matched else NETWORKS[name]()
    if name == "transformer" and args.transformer_layers is not None:
        config = dataclasses.replace(config, num_layers=args.transformer_layers)
    return config


def optimizer_for(args: argparse.Namespace):
    """Cosine decay over the whole step budget (``--schedule cosine``), else constant after the warm-up."""
    horizon = args.steps if args.schedule == "cosine" else 0
    return jaxic_training.default_optimizer(horizon, args.learning_rate)


def run_one(M: int, name: str, seed: int, args: argparse.Namespace) -> dict:
    """Compile with key ``seed``, train under the budget and score one network on ``pedagogical(M)``."""
    config = network_config(name, args)
    start = time.perf_counter()
    compiled = jaxic.compile(pedagogical, ["obs"], jax.random.key(seed), num_steps=0, model_kwargs={"M": M},
                             network=config, batch_size=args.batch_size, optimizer=optimizer_for(args),
                             progress=False)
    build_s = time.perf_counter() - start
    training = train_for(compiled, seconds=args.seconds, steps=args.steps)
    start = time.perf_counter()
    loss_xy = heldout_loss(compiled, sites=["x", "y"])
    loss_full = heldout_loss(compiled)
    heldout_s = time.perf_counter() - start
    posterior = {}
    for obs in args.obs:
        posterior[str(float(obs))] = importance_metrics(
            compiled, {"obs": obs}, args.particles, seeds=[seed + 1 + i for i in range(args.seeds)],
            extra=lambda post, obs=obs: circle_mass(post, obs, args.tol))
    skipped = len(compiled.history["skipped"])
    return {"M": M, "network": name, "seed": seed,
            "config": {"type": type(config).__name__, **dataclasses.asdict(config)},
            "parameters": compiled.num_parameters, "build_s": build_s, "compile_s": training["compile_s"],
            "train_s": training["train_s"], "train_wall_s": training["wall_s"],
            "validation_s": training["validation_s"], "steps": training["steps"],
            "warmup_steps": training["warmup_steps"],
            "traces_per_s": training["traces_per_s"], "skipped_steps": skipped,
            "heldout_loss_xy": loss_xy, "heldout_loss_full": loss_full, "heldout_s": heldout_s,
            "curve": training["curve"], "posterior": posterior}


# ----------------------------------------------------------------------------------------------
# Reporting


def budget_text(args: argparse.Namespace) -> str:
    if args.steps is not None:
        return f"{args.steps} steps"
    return f"{args.seconds:g} s of training"


def run_seed(run: dict) -> int:
    return run.get("seed", 0)  # runs written before --seed took several keys were all compiled with key 0


def markdown_table(runs: list[dict], obs_values: list[float]) -> list[str]:
    ess = [f"ESS/N obs={obs:g}" for obs in obs_values]
    seeded = len({run_seed(r) for r in runs}) > 1
    columns = ["M", "network", *(["seed"] if seeded else []), "parameters", "steps", "traces/s", "compile s",
               "-log q(x,y)", "-log q(trace)", *ess, "on ring", "y>0"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---:", "---"] + ["---:"] * (len(columns) - 2)) + "|"]
    ring = str(RING_OBS)
    for r in runs:
        post = r["posterior"]
        cells = [str(r["M"]), r["network"], *([str(run_seed(r))] if seeded else []), f"{r['parameters']:,}",
                 f"{r['steps']:,}", f"{r['traces_per_s']:,.0f}",
                 f"{r['build_s'] + r['compile_s']:.1f}", f"{r['heldout_loss_xy']:.2f}", f"{r['heldout_loss_full']:.1f}",
                 *[f"{post[str(float(obs))]['ess_over_n']:.4f}" for obs in obs_values],
                 f"{post[ring]['on_circle']:.2f}" if ring in post else "-",
                 f"{post[ring]['y_positive']:.2f}" if ring in post else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary_lines(runs: list[dict]) -> list[str]:
    """The held-out loss gap of the LSTM and the feed-forward network to the transformer, per M (means over
    training seeds); and, where one network has runs of several seeds at one M, their mean ESS/N."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["M"], r["network"]), []).append(r)
    loss = {k: statistics.mean(r["heldout_loss_xy"] for r in v) for k, v in groups.items()}
    lines = []
    for other in ("lstm", "feedforward"):
        gaps = [f"M={M}: {loss[(M, other)] - loss[(M, 'transformer')]:+.2f}"
                for M in sorted({r["M"] for r in runs}) if (M, other) in loss and (M, "transformer") in loss]
        if gaps:
            lines.append(f"- Held-out -log q(x,y) of {other} minus transformer (nats; > 0: transformer better): "
                         + ", ".join(gaps))
    ring = str(RING_OBS)
    for (M, name), group in sorted(groups.items()):
        ess = [r["posterior"][ring]["ess_over_n"] for r in group if ring in r["posterior"]]
        if len(ess) > 1:
            seeds = ", ".join(str(run_seed(r)) for r in group)
            lines.append(f"- {name} at M={M}, {len(ess)} training seeds ({seeds}): "
                         f"ESS/N at obs={RING_OBS:g} mean {statistics.mean(ess):.3f} (sd {statistics.stdev(ess):.3f}, "
                         f"range {min(ess):.3f}-{max(ess):.3f}); -log q(x,y) mean "
                         f"{statistics.mean(r['heldout_loss_xy'] for r in group):.2f}")
    return lines


# What must agree for runs of two commands to share one table.
COMPARABLE = ("steps", "seconds", "schedule", "learning_rate", "batch_size", "matched", "transformer_layers",
              "particles", "seeds", "obs", "tol")


def config_of(args: argparse.Namespace) -> dict:
    """The command's settings as JSON values."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def merged_runs(path: Path, args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """Runs in the JSON at ``path`` that this command does not redo, and the commands that made them."""
    if not path.exists():
        return [], []
    old = json.loads(path.read_text())
    config = config_of(args)
    differ = [k for k in COMPARABLE if old.get("config", {}).get(k) != config.get(k)]
    if differ:
        raise SystemExit(f"--merge: {path} was made with other settings ({', '.join(differ)}); "
                         "rerun without --merge or pass another --json")
    redone = {(M, name, seed) for M in args.M for name in args.networks for seed in args.seed}
    kept = [r for r in old["runs"] if (r["M"], r["network"], run_seed(r)) not in redone]
    commands = old.get("commands") or [line.removeprefix("- Command: ").strip("`")
                                       for line in old.get("environment", []) if line.startswith("- Command: ")]
    return kept, commands


def run_order(run: dict) -> tuple:
    order = ["transformer", "lstm", "feedforward"]
    return run["M"], order.index(run["network"]) if run["network"] in order else len(order), run_seed(run)


def write_figure(path: Path, runs: list[dict], prior_ess: float | None, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        print("matplotlib is not installed (pip install 'jaxic[notebook]'): no figure written")
        return False
    fig = plot_sweep(runs, obs=RING_OBS, prior_ess=prior_ess, title=title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return True


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--M", type=int, nargs="+", default=[0, 10, 20, 50, 100, 200],
                        help="numbers of nuisance sites between x and y")
    parser.add_argument("--networks", nargs="+", default=["transformer", "lstm", "feedforward"],
                        choices=sorted(NETWORKS) + sorted(VARIANTS), help="proposal networks (default sizes unless --matched)")
    parser.add_argument("--matched", action="store_true",
                        help="networks of about 120k parameters each (LSTM lstm_dim=104, feed-forward hidden_dim=224)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=float, default=None,
                        help="wall-clock training budget per run, compilation excluded (default 120 unless --steps)")
    budget.add_argument("--steps", type=int, default=None, help="fixed number of training steps per run instead")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3,
                        help="peak learning rate, reached after a linear warm-up")
    parser.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                        help="constant after a 100-step warm-up, or (with --steps) warm-up and cosine decay to 5%% "
                             "over the step budget: the decay is what gives q(y | x) the precision ESS needs")
    parser.add_argument("--transformer-layers", type=int, default=None,
                        help="transformer depth (default: the network's default, 2)")
    parser.add_argument("--particles", type=int, default=2000, help="importance-sampling particles per posterior")
    parser.add_argument("--seeds", type=int, default=3, help="posterior seeds averaged per observation")
    parser.add_argument("--obs", type=float, nargs="+", default=[RING_OBS],
                        help="observations for ESS/N (the ring check uses obs=25)")
    parser.add_argument("--tol", type=float, default=0.25, help="ring tolerance |r - sqrt(obs)| < tol")
    parser.add_argument("--seed", type=int, nargs="+", default=[0],
                        help="compile keys (network init, validation set, training); several: one run per key, "
                             "and the report gives their mean")
    parser.add_argument("--merge", action="store_true",
                        help="keep the runs already in --json (same budget, schedule and evaluation) that this "
                             "command does not redo, and report them all together")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "attention_vs_lstm.json")
    parser.add_argument("--figure", type=Path, default=HERE / "figures" / "attention_vs_lstm.png")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md",
                        help="markdown file whose section for this benchmark is written or replaced")
    parser.add_argument("--section", default=None,
                        help="write a separate RESULTS.md section titled with this suffix (e.g. for a longer "
                             "transformer-only run; pass --json and --figure paths of its own too)")
    parser.add_argument("--no-write", action="store_true", help="only print: no JSON, figure or RESULTS.md")
    args = parser.parse_args(argv)
    if args.seconds is None and args.steps is None:
        args.seconds = 120.0
    if min(args.M) < 0 or (args.seconds is not None and args.seconds < 0) or \
            (args.steps is not None and args.steps < 1):
        parser.error("--M must be >= 0, --seconds >= 0 and --steps >= 1")
    if args.schedule == "cosine" and args.steps is None:
        parser.error("--schedule cosine needs --steps (the decay is planned over the step budget)")
    if args.particles < 2 or args.seeds < 1 or args.batch_size < 1:
        parser.error("--particles must be >= 2 and --seeds, --batch-size >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    env = environment_lines("attention_vs_lstm.py", argv)
    sizes = "about 120k parameters each (--matched)" if args.matched else "default sizes"
    if args.transformer_layers is not None:
        sizes += f", transformer with {args.transformer_layers} layer(s)"
    schedule = (f"AdamW, warm-up then cosine decay from {args.learning_rate:g} to 5% over the {args.steps} steps"
                if args.schedule == "cosine" else
                f"constant learning rate {args.learning_rate:g} after a 100-step warm-up")

    def setup_line(networks, seeds) -> str:
        return (f"- Model: `jaxic.models.pedagogical(M)`; networks {', '.join(networks)} with {sizes}; "
                f"{budget_text(args)} per run (compilation excluded), batch {args.batch_size}, {schedule}, "
                f"compile key{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; "
                f"{args.particles:,} particles x {args.seeds} seeds per posterior")

    setup = setup_line(args.networks, args.seed)
    prior = {str(float(obs)): prior_ess_fraction(obs, args.particles, range(args.seeds)) for obs in args.obs}
    config = config_of(args)
    kept, earlier = merged_runs(args.json, args) if args.merge else ([], [])
    commands = [*earlier, shlex.join(["python", "benchmarks/attention_vs_lstm.py", *argv])]
    if kept:
        print(f"--merge: keeping {len(kept)} runs of {args.json}", flush=True)
        env = [line for line in env if not line.startswith("- Command: ")] + [
            "- Commands (their runs merged; the date and machine above are the last one's): "
            + "; ".join(f"`{c}`" for c in commands)]
    payload = {"experiment": "attention_vs_lstm", "config": config, "argv": argv, "environment": env, "setup": setup,
               "commands": commands,
               "matched_configs": {k: dataclasses.asdict(v) for k, v in MATCHED.items()},
               "prior_ess_over_n": prior, "runs": list(kept)}
    print(setup, flush=True)
    total = time.perf_counter()
    for M, name, seed in itertools.product(args.M, args.networks, args.seed):
        run = run_one(M, name, seed, args)
        payload["runs"].append(run)
        payload["runs"].sort(key=run_order)
        ring = run["posterior"].get(str(RING_OBS), {})
        ess = ", ".join(f"obs={k}: {v['ess_over_n']:.4f}" for k, v in run["posterior"].items())
        print(f"M={M:>3} {name:>11} seed {seed}: {run['parameters']:,} params, build {run['build_s']:.1f} s, compile "
              f"{run['compile_s']:.1f} s, {run['steps']:,} steps in {run['train_s']:.1f} s "
              f"({run['traces_per_s']:,.0f} traces/s); -log q(x,y) {run['heldout_loss_xy']:.3f}, "
              f"trace {run['heldout_loss_full']:.2f}; ESS/N {ess}; on ring {ring.get('on_circle', math.nan):.2f}, "
              f"y>0 {ring.get('y_positive', math.nan):.2f}", flush=True)
        if not args.no_write:
            write_results_json(args.json, payload)
    payload["total_s"] = time.perf_counter() - total
    runs = payload["runs"]
    setup = payload["setup"] = setup_line(list(dict.fromkeys(r["network"] for r in runs)),
                                          sorted({run_seed(r) for r in runs}))
    print(f"\n(total {payload['total_s']:.0f} s)\n")

    figure_note = []
    if not args.no_write:
        write_results_json(args.json, payload)
        title = f"pedagogical model, {budget_text(args)} per network ({sizes})"
        if write_figure(args.figure, payload["runs"], prior.get(str(RING_OBS)), title):
            figure_note = [f"- Figure: `{repo_relative(args.figure)}`; all numbers: `{repo_relative(args.json)}`"]
            print(f"figure written to {args.figure}")
        print(f"results written to {args.json}")
    prior_text = ", ".join(f"obs={float(k):g}: {v:.4f}" for k, v in prior.items())
    body = env + [setup,
                  f"- Columns: compile s = proposal build + first (compiling) training chunk; -log q = held-out "
                  f"forward-KL loss (1024 joint samples) on x and y / on the whole trace; on ring, y>0 = fractions "
                  f"of raw proposal draws at obs=25 with |r - 5| < {args.tol:g} / with y > 0 (exact posterior: "
                  f"1.0 / 0.5); ESS/N of the prior as proposal: {prior_text}",
                  *figure_note,
                  "- Paper's finding (Harvey et al. 2019): the LSTM copes with a few nuisance sites; from M of "
                  "about 50 on, only attention keeps q(y | x) on the ring.",
                  *summary_lines(payload["runs"]), "", *markdown_table(payload["runs"], args.obs)]
    heading = HEADING if args.section is None else f"{HEADING}: {args.section}"
    publish(args.output, heading, body, write=not args.no_write)


if __name__ == "__main__":
    main()
