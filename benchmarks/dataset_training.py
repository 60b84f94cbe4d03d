"""Training on a fixed set of simulations: the dataset held on the device against streamed batch by batch.

``jaxic.compile(..., dataset=...)`` holds a dataset whose training traces fit in
``jaxic.api.RESIDENT_DATASET_BYTES`` on the device and gathers each step's batch inside the compiled chunk of
steps (``jaxic.loops.ResidentDatasetSteps``); a larger one is streamed shard by shard, one jitted step per
batch from Python (``jaxic.loops.FedSteps``), as every dataset was before. For each sbibm task this trains both
ways on the same simulations (``benchmarks/sbibm.py``'s, seed 0) from the same key, times ``--steps`` steps after
the compiling chunk, and checks that both saw the same batches (equal held-out loss at the end).

    python benchmarks/dataset_training.py
    python benchmarks/dataset_training.py --tasks gaussian_mixture --steps 200 --no-write
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import jax

import jaxic

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_io import PACKAGES, benchmark_parser, environment_lines, publish  # noqa: E402
import sbibm  # noqa: E402
from sbibm_tasks import TASKS  # noqa: E402

HEADING = "## Training on fixed simulations: held on the device against streamed (benchmarks/dataset_training.py)"


def timed(task, folder: Path, args, resident: bool) -> tuple[float, float]:
    """Steps per second after the compiling chunk, and the held-out loss at the end."""
    limit = jaxic.api.RESIDENT_DATASET_BYTES
    jaxic.api.RESIDENT_DATASET_BYTES = limit if resident else -1
    try:
        dataset = jaxic.TraceDataset(folder, holdout=args.simulations // 10)
        compiled = jaxic.compile(task.model, ["obs"], jax.random.key(0), 0, dataset=dataset,
                                 batch_size=args.batch_size, validation_size=args.simulations // 10, progress=False)
    finally:
        jaxic.api.RESIDENT_DATASET_BYTES = limit
    compiled.train(compiled.train_config.steps_per_call, progress=False, validate=False)  # compiles
    start = time.perf_counter()
    compiled.train(args.steps, progress=False, validate=False)
    return args.steps / (time.perf_counter() - start), compiled.validation_loss()


def main(argv=None):
    parser = benchmark_parser(__doc__, HERE / "RESULTS.md")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS),
                        default=["two_moons", "gaussian_mixture", "slcp", "gaussian_linear_uniform", "bernoulli_glm_raw"])
    parser.add_argument("--simulations", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1000, help="timed steps per run")
    args = parser.parse_args(argv)
    environment = environment_lines("dataset_training.py", sys.argv[1:] if argv is None else argv,
                                    PACKAGES + ("diffrax",))
    rows = ["| task | tokens | streamed steps/s | held on the device steps/s | ratio | same held-out loss |",
            "|---|---:|---:|---:|---:|---|"]
    with tempfile.TemporaryDirectory(prefix="jaxic-dataset-training-") as scratch:
        for name in args.tasks:
            task = TASKS[name]
            theta, x = sbibm.simulations_for(task, args.simulations, 0)
            folder = Path(scratch) / name
            spec = jaxic.write_simulations(folder, task.model, {"theta": theta, "obs": x}, ["obs"],
                                           shard_size=len(theta))
            streamed, streamed_loss = timed(task, folder, args, resident=False)
            held, held_loss = timed(task, folder, args, resident=True)
            same = "yes" if abs(held_loss - streamed_loss) <= 1e-4 * max(1.0, abs(streamed_loss)) else \
                f"no ({streamed_loss:.5f} / {held_loss:.5f})"
            rows.append(f"| {name} | {spec.num_tokens} | {streamed:,.0f} | {held:,.0f} | {held / streamed:.2f} | "
                        f"{same} |")
            print(rows[-1], flush=True)
    body = environment + [
        f"- {args.simulations:,} simulations per task (`benchmarks/sbibm.py`'s, seed 0), 10% held out; jaxic's "
        f"default network, batch {args.batch_size}; {args.steps:,} steps timed after the compiling chunk, without "
        "validations; both runs from key 0, so they train on the same batches in the same order.",
        "", *rows]
    publish(args.output, HEADING, body, write=not args.no_write)


if __name__ == "__main__":
    main()
