"""Peer baseline for ``benchmarks/throughput.py``: the pedagogical model in Pyro, trained with CSIS.

Pyro's compiled sequential importance sampling (``pyro.infer.CSIS``, Le et al. 2017) with a
hand-written pyprob-style LSTM guide of the size that ``throughput.py`` matches jaxic's network to:
a 512-wide LSTM cell, a 256-wide observation embedding, 64-wide address and 8-wide
distribution-type embeddings, a 4-wide embedding of the previous value, and a shared proposal
head (two 512-wide hidden layers, read with the address embedding) giving a 10-component
normal mixture (about 2.5 M parameters). The guide is vectorised: model and guide run inside a
``pyro.plate`` of ``num_traces`` traces, so one CSIS "trace" holds a whole training batch
(``training_batch_size=1``, ``num_traces=64``) and every LSTM step is one batched matrix product.

Figures (see :func:`run`):

* **train traces/s**: ``batch * steps / seconds`` of ``CSIS.step`` calls (Adam, learning rate
  1e-3, pyprob's default), the ESS evaluations excluded from the clock;
* **CSIS IS particles/s**: Pyro's own importance sampler (``CSIS.run``, which runs the guide
  and the model once per particle);
* **vectorised IS particles/s**: the same weights computed for all particles in one batched
  guide and model run (not part of Pyro's API; the fastest this guide can sample);
* **ESS/N** at ``obs = 25`` from the vectorised sampler, every ``every`` seconds of training,
  and the training time at which it first passes each threshold;
* **FLOPs/trace** of one training step (``torch.utils.flop_counter``), for the achieved FLOP/s.

Needs the ``bench`` extra (``pip install -e '.[bench]'``: ``pyro-ppl`` and ``torch``).
Run alone: ``python benchmarks/pyro_csis.py --M 2 20 --seconds 30``.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Sequence

OBS_VALUE = 25.0
PRIOR_SCALE = 10.0
NOISE = 0.1


def unavailable_reason() -> str | None:
    """``None`` when pyro-ppl and torch are installed, else why the peer cannot run."""
    import importlib.util

    missing = [name for name, module in (("pyro-ppl", "pyro"), ("torch", "torch"))
               if importlib.util.find_spec(module) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (install the bench extra: pip install -e '.[bench]')"
    return None


def site_names(M: int) -> list[str]:
    return ["x", *(f"nuisance_{i}" for i in range(M)), "y"]


def make_model(M: int):
    """``jaxic.models.pedagogical`` in Pyro, over a plate of ``num_traces`` independent traces."""
    import pyro
    import pyro.distributions as dist
    import torch

    def model(observations=None, num_traces: int = 1):
        obs = None if observations is None else observations.get("obs")
        if obs is not None:
            obs = torch.as_tensor(obs, dtype=torch.float32).expand(num_traces)
        zero = torch.zeros(())
        with pyro.plate("traces", num_traces):
            x = pyro.sample("x", dist.Normal(zero, PRIOR_SCALE))
            for i in range(M):
                pyro.sample(f"nuisance_{i}", dist.Normal(zero, PRIOR_SCALE))
            y = pyro.sample("y", dist.Normal(zero, PRIOR_SCALE))
            pyro.sample("obs", dist.Normal(x**2 + y**2, NOISE), obs=obs)

    return model


def make_guide(M: int, obs_loc: float, obs_scale: float, lstm_dim: int = 512, observe_embedding_dim: int = 256,
               sample_embedding_dim: int = 4, address_embedding_dim: int = 64, type_embedding_dim: int = 8,
               head_hidden: int = 512, num_components: int = 10):
    """A pyprob-style LSTM guide, vectorised over the plate of traces; returns ``(guide, network)``.

    At site ``t`` the LSTM cell reads ``[observation embedding, embedding of the previous value,
    its address and type, address and type of site t]``; the head reads the LSTM output with
    the address of site t and gives a normal mixture in units of the prior scale, initialised
    at the prior (all components N(0, 10)).
    """
    import pyro
    import pyro.distributions as dist
    import torch
    from torch import nn

    names = site_names(M)

    class Network(nn.Module):
        def __init__(self):
            super().__init__()
            self.observe = nn.Sequential(nn.Linear(1, observe_embedding_dim), nn.ReLU(),
                                         nn.Linear(observe_embedding_dim, observe_embedding_dim), nn.ReLU())
            self.address = nn.Embedding(len(names) + 1, address_embedding_dim)  # last row: start of trace
            self.dist_type = nn.Embedding(2, type_embedding_dim)  # 0: Normal, 1: start of trace
            self.sample = nn.Linear(1, sample_embedding_dim)
            site = address_embedding_dim + type_embedding_dim
            self.cell = nn.LSTMCell(observe_embedding_dim + sample_embedding_dim + 2 * site, lstm_dim)
            self.head = nn.Sequential(nn.Linear(lstm_dim + site, head_hidden), nn.ReLU(),
                                      nn.Linear(head_hidden, head_hidden), nn.ReLU(),
                                      nn.Linear(head_hidden, 3 * num_components))
            last = self.head[-1]
            nn.init.normal_(last.weight, std=0.01)
            with torch.no_grad():  # logits 0, means 0, softplus(scale) = 1: the prior
                last.bias.zero_()
                last.bias[2 * num_components:] = math.log(math.e - 1.0)

        def site(self, index: int, batch: int):
            ids = torch.full((batch,), index, dtype=torch.long)
            kind = torch.full((batch,), 1 if index == len(names) else 0, dtype=torch.long)
            return torch.cat([self.address(ids), self.dist_type(kind)], -1)

    network = Network()

    def guide(observations=None, num_traces: int = 1):
        pyro.module("csis_guide", network)
        obs = torch.as_tensor(observations["obs"], dtype=torch.float32).expand(num_traces)
        embedded = network.observe(((obs - obs_loc) / obs_scale)[:, None])
        hidden = (torch.zeros(num_traces, lstm_dim), torch.zeros(num_traces, lstm_dim))
        previous_value = torch.zeros(num_traces)
        previous_site = network.site(len(names), num_traces)
        with pyro.plate("traces", num_traces):
            for t, name in enumerate(names):
                site = network.site(t, num_traces)
                inputs = torch.cat([embedded, network.sample(previous_value[:, None] / PRIOR_SCALE),
                                    previous_site, site], -1)
                hidden = network.cell(inputs, hidden)
                params = network.head(torch.cat([hidden[0], site], -1))
                logits, loc, scale = params.split(num_components, -1)
                scale = nn.functional.softplus(scale) + 1e-3
                proposal = dist.MixtureSameFamily(dist.Categorical(logits=logits),
                                                  dist.Normal(loc * PRIOR_SCALE, scale * PRIOR_SCALE))
                previous_value = pyro.sample(name, proposal)
                previous_site = site

    return guide, network


def effective_fraction(log_weights) -> float:
    """Kish ESS / N of a vector of log weights (float64)."""
    import torch

    log_w = log_weights.double()
    log_w = torch.where(torch.isnan(log_w), torch.full_like(log_w, -math.inf), log_w)
    w = torch.softmax(log_w, 0)
    return float(1.0 / (w**2).sum() / log_w.numel())


def vectorised_log_weights(model, guide, num_particles: int):
    """``log p(x, y) - log q(x | y)`` for ``num_particles`` guide draws at ``obs = 25`` in one batched run."""
    import torch
    from pyro import poutine

    observations = {"obs": torch.tensor(OBS_VALUE)}
    with torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(observations=observations, num_traces=num_particles)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            observations=observations, num_traces=num_particles)
        guide_trace.compute_log_prob()
        model_trace.compute_log_prob()
        total = lambda tr: sum(site["log_prob"] for site in tr.nodes.values() if site["type"] == "sample")
        return total(model_trace) - total(guide_trace)


def run(M: int, seconds: float, batch_size: int = 64, every: float = 5.0, eval_particles: int = 2000,
        csis_particles: int = 200, thresholds: Sequence[float] = (0.1, 0.3), seed: int = 0,
        learning_rate: float = 1e-3) -> dict:
    """Train the CSIS guide for ``seconds`` and measure it (see the module docstring).

    Returns a dict: ``parameters``, ``steps``, ``train_s``, ``train_traces_per_s``,
    ``flops_per_trace``, ``csis_particles_per_s`` (Pyro's sampler, ``csis_particles`` particles),
    ``vectorised_particles_per_s`` (``eval_particles`` particles), ``ess_fraction`` (final, vectorised,
    ``eval_particles``), ``csis_ess_fraction`` (Pyro's sampler), ``time_to`` ({threshold: training
    seconds or None}) and ``curve`` ([training seconds, steps, ESS/N] at each evaluation).
    """
    import pyro
    import torch
    from pyro.infer import CSIS
    from torch.utils.flop_counter import FlopCounterMode

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = make_model(M)
    with torch.no_grad():  # standardise the observation with prior-predictive moments, as jaxic does
        x, y = torch.randn(2, 4096) * PRIOR_SCALE
        obs = x**2 + y**2 + NOISE * torch.randn(4096)
    guide, network = make_guide(M, float(obs.mean()), float(obs.std()))
    parameters = sum(p.numel() for p in network.parameters())
    csis = CSIS(model, guide, pyro.optim.Adam({"lr": learning_rate}), num_inference_samples=csis_particles,
                training_batch_size=1)

    # CSIS unconditions the model: the observed value given here only marks "obs" as observed.
    train = lambda: csis.step(observations={"obs": torch.tensor(OBS_VALUE)}, num_traces=batch_size)
    train()  # creates the parameters and the optimiser state
    with FlopCounterMode(display=False) as counter:
        train()
    flops_per_trace = counter.get_total_flops() / batch_size

    time_to = {th: None for th in thresholds}
    curve, steps, clock = [], 0, 0.0
    while clock < seconds:
        start = time.perf_counter()
        while True:
            train()
            steps += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min(every, seconds - clock):
                break
        clock += elapsed
        ess = effective_fraction(vectorised_log_weights(model, guide, eval_particles))
        curve.append([round(clock, 2), steps, ess])
        for th in thresholds:
            if time_to[th] is None and ess >= th:
                time_to[th] = clock

    start = time.perf_counter()
    log_w = vectorised_log_weights(model, guide, eval_particles)
    vectorised_rate = eval_particles / (time.perf_counter() - start)
    start = time.perf_counter()
    with torch.no_grad():
        posterior = csis.run(observations={"obs": torch.tensor(OBS_VALUE)}, num_traces=1)
    csis_rate = csis_particles / (time.perf_counter() - start)
    return {
        "M": M, "parameters": parameters, "steps": steps, "train_s": clock,
        "train_traces_per_s": batch_size * steps / clock if clock else float("nan"),
        "flops_per_trace": flops_per_trace,
        "csis_particles_per_s": csis_rate, "vectorised_particles_per_s": vectorised_rate,
        "ess_fraction": effective_fraction(log_w),
        "csis_ess_fraction": float(posterior.get_ESS()) / csis_particles,
        "time_to": time_to, "curve": curve,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--M", type=int, nargs="+", default=[2, 20, 50])
    parser.add_argument("--seconds", type=float, default=30.0, help="training seconds per M")
    parser.add_argument("--every", type=float, default=5.0, help="training seconds between ESS evaluations")
    parser.add_argument("--eval-particles", type=int, default=2000)
    parser.add_argument("--csis-particles", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--json", type=str, default=None, help="also write the results (a list) to this file")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"Pyro CSIS peer unavailable: {reason}")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.json:
        from results_io import write_results_json  # the benchmarks' one JSON writer (paths made repo-relative)
    results = []
    for M in args.M:
        r = run(M, args.seconds, batch_size=args.batch_size, every=args.every, eval_particles=args.eval_particles,
                csis_particles=args.csis_particles)
        r["threads"] = torch.get_num_threads()
        results.append(r)
        print(f"Pyro CSIS M={M}: " + ", ".join(f"{k} {v}" for k, v in r.items() if k != "curve"), flush=True)
        if args.json:  # rewritten after each M, so a partial run still leaves its results
            write_results_json(args.json, results)


if __name__ == "__main__":
    main()
