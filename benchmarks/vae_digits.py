"""Amortized variational inference on binarised 8x8 digits: jaxic against a hand-written NumPyro VAE.

Both fit the same generative model (``jaxic.models.vae``: ``z_n ~ N(0, I)``, 64 Bernoulli pixels
from a GELU MLP decoder) to the 1437 training images of ``vae_baseline.load_digits_binary`` and
learn an amortized ``q(z_n | x_n)`` at the same time:

* **NumPyro**: the textbook VAE, ``numpyro.infer.SVI`` with ``Trace_ELBO`` and an MLP encoder guide
  (``vae_numpyro`` / ``vae_guide``), jitted chunks of ``svi.update`` under ``lax.scan``;
* **jaxic**: the plain model ``vae`` with ``jaxic.compile(..., objective="elbo", data=...,
  local_plate="data")``, the proposal network playing the encoder.

Same decoder sizes, latent dimension, minibatch size, optimiser (Adam, constant learning rate) and
wall-clock budget (``--seconds`` each, counted from the start of training, compilation included;
the two run one after the other, never at the same time). Then, on the 360 held-out images, with
the same number of draws ``K`` from each method's ``q(z | x)`` per image:

* **ELBO**: mean over draws of ``log p(x, z) - log q(z | x)`` (the single-particle bound, averaged
  over K draws to cut its noise), then mean over images;
* **log p(x)**: ``logmeanexp`` of the same K log weights (the IWAE bound, importance-sampled
  log-likelihood), mean over images.

Both in nats per image (higher is better). Results are printed and written to the section
``## Amortized VI on binarised digits (benchmarks/vae_digits.py)`` of ``benchmarks/RESULTS.md``.

    python benchmarks/vae_digits.py                                        # 120 s each
    python benchmarks/vae_digits.py --seconds 20 --only numpyro --no-write # quick check of one side
    python benchmarks/vae_digits.py --figure benchmarks/figures/vae_digits.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax

from jaxic.models.vae import vae
from results_io import environment_lines, publish
from vae_baseline import load_digits_binary, matched_inference_network, numpyro_vae_log_weights, train_numpyro_vae

HEADING = "## Amortized VI on binarised digits (benchmarks/vae_digits.py)"
METHODS = ("numpyro", "jaxic")


def count(tree) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))


def run_numpyro(X_train, X_test, args) -> dict:
    """Train the hand-written VAE for ``args.seconds`` and score it on ``X_test``."""
    result = train_numpyro_vae(X_train, jax.random.key(0), seconds=args.seconds, latent_dim=args.latent_dim,
                               hidden=args.hidden, batch_size=args.batch_size, learning_rate=args.lr,
                               optimizer=optax.adam(args.lr), chunk=args.chunk)
    log_w = np.asarray(numpyro_vae_log_weights(result.params, X_test, jax.random.key(1), args.particles,
                                               **result.model_kwargs)).T     # (n, K), like jaxic's
    return {
        "label": "NumPyro SVI (MLP encoder)",
        "encoder_params": count(result.params["encoder$params"]),
        "decoder_params": count(result.params["decoder$params"]),
        "steps": result.num_steps,
        "train_seconds": result.train_seconds,
        "setup_seconds": result.setup_seconds,
        "steps_per_second": result.steps_per_second,
        "loss": result.history["loss"],
        "wall_time": result.history["wall_time"],
        "log_weights": log_w,
    }


def run_jaxic(X_train, X_test, args) -> dict:
    """Train jaxic's amortized VI for ``args.seconds`` and score it on ``X_test``.

    The only place that touches jaxic's API: adapt here if it changes.
    """
    import jaxic

    model_kwargs = {"num_data": X_train.shape[0], "batch_size": args.batch_size, "latent_dim": args.latent_dim,
                    "hidden": tuple(args.hidden)}
    # Matched in size to the hand-written encoder, and Gaussian like it.
    network = matched_inference_network()
    start = time.perf_counter()
    compiled = jaxic.compile(vae, observed=["x"], key=jax.random.key(0), num_steps=args.chunk,
                             model_kwargs=model_kwargs, objective="elbo", data={"x": X_train},
                             local_plate="data", network=network, batch_size=args.batch_size,
                             learning_rate=args.lr, optimizer=optax.adam(args.lr), progress=False)
    first_seconds = time.perf_counter() - start
    marks = [(0, 0.0), (compiled.step, first_seconds)]  # (steps done, seconds since start) after each call
    while marks[-1][1] < args.seconds:
        compiled.train(args.chunk, progress=False)
        marks.append((compiled.step, time.perf_counter() - start))
    train_seconds, steps = marks[-1][1], marks[-1][0]
    steady_steps, steady_seconds = steps - marks[1][0], train_seconds - first_seconds
    # jaxic.compile sets up and trains in one call: estimate its setup time from the later calls' rate
    # (unknown when the budget ran out during the first call).
    if steady_steps:
        rate = steady_steps / steady_seconds
        setup_seconds = max(0.0, first_seconds - marks[1][0] / rate)
    else:
        rate, setup_seconds = steps / train_seconds, float("nan")
    marks[0] = (0, 0.0 if np.isnan(setup_seconds) else setup_seconds)
    # Steps within one call share its duration evenly, as on the NumPyro side.
    wall_time = np.concatenate([np.linspace(t0, t1, s1 - s0 + 1)[1:] for (s0, t0), (s1, t1) in zip(marks, marks[1:])])

    post = compiled.posterior(jax.random.key(1), {"x": X_test}, num_samples=args.particles)
    params = compiled.model_params
    return {
        "label": "jaxic (automatic feed-forward inference network)",
        "encoder_params": compiled.num_parameters,
        "decoder_params": count(params["decoder$params"]),
        "steps": steps,
        "train_seconds": train_seconds,
        "setup_seconds": setup_seconds,
        "steps_per_second": rate,
        "loss": np.asarray(compiled.history["loss"], dtype=float)[:steps],
        "wall_time": wall_time,
        "log_weights": np.asarray(post.log_weights).reshape(X_test.shape[0], args.particles),
    }


def scores(run: dict) -> dict:
    log_w = run["log_weights"]
    k = log_w.shape[-1]
    elbo = log_w.mean(-1)
    log_lik = np.logaddexp.reduce(log_w, axis=-1) - np.log(k)
    tail = max(1, run["loss"].size // 100)
    return {"elbo": elbo.mean(), "elbo_se": elbo.std(ddof=1) / np.sqrt(elbo.size), "log_lik": log_lik.mean(),
            "log_lik_se": log_lik.std(ddof=1) / np.sqrt(log_lik.size), "train_elbo": -np.mean(run["loss"][-tail:])}


def plot_curves(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    lows = []
    for run in runs.values():
        loss = run["loss"]
        window = max(1, min(200, loss.size // 20))
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(run["wall_time"][window - 1:], -smooth, label=run["label"])
        lows.append(np.percentile(-smooth, 2))
    ax.set(xlabel="wall time since start of training (s)", ylabel="training ELBO per image (nats)",
           title="binarised digits: training ELBO (minibatch estimate, smoothed)", ylim=(min(lows) - 2, None))
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"figure written to {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="wall-clock training budget of each method")
    parser.add_argument("--latent-dim", type=int, default=2, help="latent dimension")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 128], help="hidden widths of decoder/encoder")
    parser.add_argument("--batch-size", type=int, default=128, help="images per minibatch")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (both methods)")
    parser.add_argument("--particles", type=int, default=100, help="draws from q per test image")
    parser.add_argument("--chunk", type=int, default=200, help="steps per jitted chunk / jaxic train() call")
    parser.add_argument("--only", choices=METHODS, help="run one method only")
    parser.add_argument("--figure", type=Path, help="also save training ELBO against wall time here (png)")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)

    X_train, _, X_test, _ = load_digits_binary()
    runners = {"numpyro": run_numpyro, "jaxic": run_jaxic}
    runs = {name: runners[name](X_train, X_test, args) for name in METHODS if args.only in (None, name)}
    results = {name: scores(run) for name, run in runs.items()}

    body = environment_lines("vae_digits.py", sys.argv[1:] if argv is None else argv) + [
        f"- Data: binarised scikit-learn digits (8x8, threshold 0.5), {X_train.shape[0]} training and "
        f"{X_test.shape[0]} held-out images (stratified split, seed 0)",
        f"- Model: latent dim {args.latent_dim}, GELU MLP decoder {args.latent_dim}-"
        f"{'-'.join(map(str, args.hidden))}-64 with Bernoulli pixels; minibatch {args.batch_size}, "
        f"Adam lr {args.lr:g} (constant) for both; {args.seconds:g} s of training each, counted from the start "
        "(compilation included), run one after the other",
        f"- Held out: K={args.particles} draws from q(z|x) per image. ELBO: mean of the K log weights; "
        "log p(x): logmeanexp of the same K (IWAE bound). Nats per image, mean over images (+- standard error); "
        "higher is better. Training ELBO: minibatch estimate, mean of the last 1% of steps",
        "",
        "| method | encoder params | decoder params | steps | train s | setup s | steps/s | train ELBO "
        "| held-out ELBO | held-out log p(x) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {run['label']} | {run['encoder_params']:,} | {run['decoder_params']:,} | {run['steps']:,} "
          f"| {run['train_seconds']:.0f} | {run['setup_seconds']:.1f} | {run['steps_per_second']:,.0f} "
          f"| {r['train_elbo']:.2f} | {r['elbo']:.2f} +- {r['elbo_se']:.2f} "
          f"| {r['log_lik']:.2f} +- {r['log_lik_se']:.2f} |"
          for run, r in zip(runs.values(), results.values())],
        "",
        "*setup*: initialisation and compilation before the first step (NumPyro: measured; jaxic: its first call "
        "less its steps at the later rate); *steps/s*: training steps per second, setup excluded. "
        "*encoder params*: the MLP guide (NumPyro) or the proposal network (jaxic).",
    ]
    publish(args.output, HEADING, body, write=not args.no_write)
    if args.figure:
        plot_curves(runs, args.figure)


if __name__ == "__main__":
    main()
