"""The draw on which numpyro's Binomial sampler never returns under ``vmap`` on CPU (found in
``benchmarks/series_embedder.py``'s daily SIR model), checked in a child process with a time limit:
once with XLA's default optimisation and once with ``--xla_backend_optimization_level=0``.

One element's (key, p), n = 1000, drawn the way ``dist.Binomial(n, p).sample`` draws each element on CPU
(``lax.map`` of numpyro's ``_binomial_dispatch``): it returns at once, while the same call inside
``jax.jit(jax.vmap(...))`` over a batch of one (n batched too, as when a model is vmapped over traces)
never does with jaxlib 0.10.2 on CPU. numpyro runs its
BTRS rejection loop there (mean 132, so not the inversion branch); capping that loop at 50 iterations does not help, and turning off XLA's
backend optimisation does, so the fault is in the compiled loop, not in the algorithm.

    python benchmarks/binomial_stall.py                # one line per configuration, also into RESULTS.md
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_io import benchmark_parser, environment_lines, publish  # noqa: E402

HEADING = "## numpyro's Binomial sampler under vmap: a draw that never returns (benchmarks/binomial_stall.py)"

CHILD = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    from numpyro.distributions.util import _binomial_dispatch
    key = jax.random.wrap_key_data(jnp.array([280508671, 3483495943], jnp.uint32))
    p = jnp.float32(0.13190977)
    # What dist.Binomial(n, p).sample does on CPU for each element: lax.map of _binomial_dispatch.
    n = jnp.int32(1000)
    draw = lambda k, p, n: jax.lax.map(lambda a: _binomial_dispatch(*a), (k[None], p[None], n[None]))[0]
    if sys.argv[1] == "plain":
        print(int(jax.jit(draw)(key, p, n)))
    else:  # n batched too, as when the model is vmapped over traces
        print(int(jax.jit(jax.vmap(draw))(key[None], p[None], n[None])[0]))
""")


def attempt(mode: str, flags: str, seconds: float) -> str:
    env = {**os.environ, "XLA_FLAGS": flags}
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True,
                              timeout=seconds)
    except subprocess.TimeoutExpired:
        return f"no result after {seconds:.0f} s"
    return f"draw {done.stdout.strip()}" if done.returncode == 0 else f"failed: {done.stderr.strip()[-200:]}"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = benchmark_parser(__doc__, HERE / "RESULTS.md")
    parser.add_argument("--seconds", type=float, default=60.0, help="time limit of each attempt")
    args = parser.parse_args(argv)
    lines = ["| call | XLA_FLAGS | result |", "|---|---|---|"]
    for mode in ("plain", "vmap"):
        for flags in ("", "--xla_backend_optimization_level=0"):
            lines.append(f"| {'jit' if mode == 'plain' else 'jit(vmap)'} | {flags or '(default)'} | "
                         f"{attempt(mode, flags, args.seconds)} |")
            print(lines[-1], flush=True)
    body = environment_lines("binomial_stall.py", argv) + [
        "- One element's draw of numpyro's Binomial(1000, p = 0.13190977) on CPU (lax.map of _binomial_dispatch),",
        "  key data [280508671, 3483495943], each attempt in a child process with a time limit.", "", *lines, "",
        "- jaxic's answer: its model runs draw Binomial sites with `jax.random.binomial` (`jaxic.tracing.spec.binomial_draws`),",
        "  and a training chunk stuck in any other sampler gets a `jaxic.StallWarning` (README, \"Nothing hangs\")."]
    publish(args.output, HEADING, body, write=not args.no_write)


if __name__ == "__main__":
    main()
