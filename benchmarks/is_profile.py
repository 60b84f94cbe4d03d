"""Where the masked importance sampler's time goes, per trace length: what limits IS particles/s.

Model: ``jaxic.models.pedagogical(M)`` at obs = 25, jaxic's default transformer (untrained: the cost does
not depend on the weights). For each M, ``--particles`` particles, each variant jitted, warmed up and timed
as the median of ``--repeats`` calls:

* **sampler**: ``jaxic.proposal.importance_sample`` (decoding, model run, weights);
* **decoding**: the network's ``decode`` over all token positions, vmapped over particles (no model);
* **heads only**: the same loop without the transformer blocks (site/value embeddings and proposal heads);
* **attention reads** and **block matmuls**: the two halves of the blocks' per-token work at the
  default sizes (d_model 64, 4 heads, 2 layers, MLP x4), as synthetic loops over the same number of
  tokens and cache length: single-query attention against each particle's key/value cache, and the
  query/key/value, output and MLP projections.

The table goes to stdout and to the section
``## Importance sampling profile: where the time goes (benchmarks/is_profile.py)`` of ``benchmarks/RESULTS.md``.

    python benchmarks/is_profile.py                      # M = 2, 20, 50, 200; 2,000 particles
    python benchmarks/is_profile.py --M 20 --no-write    # quick look
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import jaxic
import jaxic.proposal
from jaxic.models import pedagogical

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_io import benchmark_parser, environment_lines, publish  # noqa: E402

HEADING = "## Importance sampling profile: where the time goes (benchmarks/is_profile.py)"
OBSERVATIONS = {"obs": 25.0}


def timed(fn, *args, repeats: int) -> float:
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_loop(proposal, key, num_particles: int, blocks: bool):
    """Every token position decoded for ``num_particles`` particles (``blocks=False``: heads only)."""
    network = nnx.merge(proposal.graphdef, proposal.params, proposal.statistics)
    layout = {k: jnp.asarray(v) for k, v in proposal.spec.token_layout().items()}
    num_tokens = proposal.spec.num_tokens
    start = network.init_decode({k: jnp.asarray(v, jnp.float32) for k, v in OBSERVATIONS.items()})

    def particle(key):
        def step(state, inputs):
            token_key, address, instance, dist_type = inputs
            if blocks:
                state, _, log_q = network.decode(state, token_key, address, instance, dist_type, True)
                return state, log_q
            z, _, log_q = network.propose_token(token_key, state.pending, address, instance, dist_type)
            return state._replace(pending=network.content(address, instance, dist_type, z, True)), log_q

        inputs = (jax.random.split(key, num_tokens), layout["address"], layout["instance"], layout["dist_type"])
        return jax.lax.scan(step, start, inputs)[1].sum()

    return jax.vmap(particle)(jax.random.split(key, num_particles))


def synthetic_halves(num_particles: int, num_tokens: int, cache_length: int, config) -> tuple:
    """(attention reads, block matmuls) loops at the transformer's sizes."""
    d, heads, layers = config.d_model, config.num_heads, config.num_layers
    key = jax.random.key(0)
    x = 0.1 * jax.random.normal(key, (num_particles, d))
    cache = jax.random.normal(key, (num_particles, heads, cache_length, d // heads))
    weights = [0.1 * jax.random.normal(key, shape) for shape in
               [(d, 3 * d), (d, d), (d, config.mlp_ratio * d), (config.mlp_ratio * d, d)]]

    def attention(x, keys, values):
        def step(carry, t):
            x, keys, values = carry
            for _ in range(layers):
                q = x.reshape(num_particles, heads, d // heads)
                keys = jax.lax.dynamic_update_index_in_dim(keys, q[:, :, None], t, 2)
                values = jax.lax.dynamic_update_index_in_dim(values, q[:, :, None], t, 2)
                scores = jnp.einsum("nhd,nhsd->nhs", q, keys)
                w = jax.nn.softmax(jnp.where(jnp.arange(cache_length) <= t, scores, -jnp.inf), -1)
                x = x + jnp.einsum("nhs,nhsd->nhd", w, values).reshape(num_particles, d)
            return (x, keys, values), None

        return jax.lax.scan(step, (x, keys, values), jnp.arange(num_tokens))[0][0]

    def matmuls(x):
        w_qkv, w_out, w_in, w_mlp = weights

        def step(x, _):
            for _ in range(layers):
                x = x + (x @ w_qkv)[:, :d] @ w_out
                x = x + jax.nn.gelu(x @ w_in) @ w_mlp
            return x, None

        return jax.lax.scan(step, x, None, length=num_tokens)[0]

    return (attention, (x, cache, cache)), (matmuls, (x,))


def profile(M: int, args) -> dict:
    compiled = jaxic.compile(pedagogical, ["obs"], jax.random.key(0), num_steps=0, model_kwargs={"M": M},
                             progress=False)
    proposal, key, n = compiled.proposal, jax.random.key(1), args.particles
    row = {"M": M, "tokens": proposal.spec.num_tokens}
    row["sampler"] = timed(lambda p, k: jaxic.proposal.importance_sample(p, None, k, OBSERVATIONS, n).log_weights,
                           proposal, key, repeats=args.repeats)
    row["decoding"] = timed(lambda p, k: decode_loop(p, k, n, True), proposal, key, repeats=args.repeats)
    row["heads"] = timed(lambda p, k: decode_loop(p, k, n, False), proposal, key, repeats=args.repeats)
    cache_length = len(proposal.spec.observed) + 1 + proposal.spec.num_tokens
    (attention, a_args), (matmuls, m_args) = synthetic_halves(n, proposal.spec.num_tokens, cache_length,
                                                              proposal.config)
    row["attention"] = timed(attention, *a_args, repeats=args.repeats)
    row["matmuls"] = timed(matmuls, *m_args, repeats=args.repeats)
    return row


def table(rows: list[dict], particles: int) -> list[str]:
    lines = ["| M | tokens | sampler particles/s | sampler ms | decoding ms | heads only ms | attention reads ms | "
             "block matmuls ms | attention share of decoding |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = lambda key: f"{1e3 * r[key]:,.0f}"
        lines.append(f"| {r['M']} | {r['tokens']} | {particles / r['sampler']:,.0f} | {ms('sampler')} | "
                     f"{ms('decoding')} | {ms('heads')} | {ms('attention')} | {ms('matmuls')} | "
                     f"{r['attention'] / r['decoding']:.0%} |")
    return lines


def parse_args(argv):
    parser = benchmark_parser(__doc__, HERE / "RESULTS.md")
    parser.add_argument("--M", type=int, nargs="+", default=[2, 20, 50, 200])
    parser.add_argument("--particles", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    rows = []
    for M in args.M:
        rows.append(profile(M, args))
        print(table(rows[-1:], args.particles)[2], flush=True)
    body = environment_lines("is_profile.py", argv) + [
        f"- {args.particles:,} particles per call, median of {args.repeats} jitted calls after a warm-up; "
        "untrained default transformer. Decoding = the network's token loop alone; attention reads and block "
        "matmuls = synthetic loops with the blocks' shapes (their sum approximates decoding minus heads).",
        "", *table(rows, args.particles)]
    publish(args.output, HEADING, body, write=not args.no_write)


if __name__ == "__main__":
    main()
