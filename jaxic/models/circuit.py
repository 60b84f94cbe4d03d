"""The electric-circuit fault benchmark (a reconstruction).

"Attention for Inference Compilation" evaluates proposals on a model of faults in an
electric circuit observed at 40 frequencies. That model was never published in full, so
this module is a **reconstruction** to a fixed specification: a 1 V AC source feeds a
6-section RLC low-pass ladder through a source resistance ``Rs``; the output is read
across a load ``RL``::

    V_s --Rs--+--R1--L1--+--R2--L2--+-- ... --R6--L6--+------ V_out   (C_k and RL shunt to ground)

Each of the 20 components is healthy (within tolerance), open, shorted, or drifted up
or down, so a trace holds 2 to 4 latent choices per component, discrete and continuous
mixed under stochastic control flow. About 48% of prior draws contain a fault.

Example:
    >>> compiled = jaxic.compile(circuit, observed=["response"], key=jax.random.key(0))
    >>> post = compiled.posterior(jax.random.key(1), {"response": measured_db})
    >>> fault_posterior(post.samples, post.weights)   # {"healthy": 0.8, "C3 drift down": 0.15, ...}
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers

# (name, kind, nominal value in ohm/henry/farad, placement); ladder order = sampling order.
COMPONENTS: tuple[tuple[str, str, float, str], ...] = (
    ("Rs", "R", 50.0, "series"),
    *[c for k in range(1, 7) for c in (
        (f"R{k}", "R", 10.0, "series"),
        (f"L{k}", "L", 10e-3, "series"),
        (f"C{k}", "C", 100e-9, "shunt"),
    )],
    ("RL", "R", 1000.0, "shunt"),
)
FREQUENCIES_HZ: np.ndarray = np.geomspace(100.0, 15_000.0, 40)
FAULT_PROBABILITY = {"R": 0.02, "L": 0.04, "C": 0.04}
MODES = ("open", "short", "drift")
OPEN, SHORT, DRIFT = 0, 1, 2
MODE_PROBS = (0.25, 0.25, 0.5)
DRIFT_RANGE = (math.log(1.2), math.log(5.0))
TOLERANCE_SD = 0.02
NOISE_DB = 0.5
# Large enough to act as open/short, small enough that 1/Z and the products stay in float32.
OPEN_OHM, SHORT_OHM = 1e6, 1e-6
FLOOR_DB = -100.0


def _impedance(kind: str, value: jax.Array, omega: jax.Array) -> jax.Array:
    value = jnp.asarray(value, jnp.float32)[..., None]
    if kind == "R":
        return (value + 0.0 * omega).astype(jnp.complex64)
    if kind == "L":
        return 1j * omega * value
    return 1.0 / (1j * omega * value)


def circuit_response(values: Mapping[str, jax.Array],
                     modes: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """Noise-free output level in dB at :data:`FREQUENCIES_HZ`, floored at -100 dB.

    ``values`` maps every component name to its value (ohm, henry or farad); ``modes``
    optionally maps names to a mode (0 open, 1 short, 2 use the value). Entries may share
    any leading batch shape; the result has shape ``batch + (40,)``. Jittable.

    Example:
        >>> nominal = {name: value for name, _, value, _ in COMPONENTS}
        >>> circuit_response(nominal)[0]                      # about -0.9 dB at 100 Hz
        >>> circuit_response(nominal, {"L3": 0})              # L3 open
    """
    omega = jnp.asarray(2 * np.pi * FREQUENCIES_HZ, jnp.float32)
    batch = jnp.broadcast_shapes(*(jnp.shape(values[name]) for name, *_ in COMPONENTS))
    one = jnp.ones(batch + omega.shape, jnp.complex64)
    m11, m12, m21, m22 = one, 0 * one, 0 * one, one
    log10_scale = jnp.zeros(batch + omega.shape, jnp.float32)
    for name, kind, _, placement in COMPONENTS:
        z = _impedance(kind, values[name], omega)
        if modes is not None and name in modes:
            mode = jnp.asarray(modes[name])[..., None]
            z = jnp.where(mode == OPEN, OPEN_OHM, jnp.where(mode == SHORT, SHORT_OHM, z)).astype(jnp.complex64)
        if placement == "series":  # M @ [[1, Z], [0, 1]]
            m12, m22 = m11 * z + m12, m21 * z + m22
        else:  # M @ [[1, 0], [1/Z, 1]]
            m11, m21 = m11 + m12 / z, m21 + m22 / z
        # Several opens/shorts multiply 1e6 factors and would overflow float32: keep M
        # normalised and carry its scale in log space (H only needs |M_11|).
        scale = jnp.maximum(jnp.max(jnp.abs(jnp.stack([m11, m12, m21, m22])), axis=0), 1e-30)
        m11, m12, m21, m22 = m11 / scale, m12 / scale, m21 / scale, m22 / scale
        log10_scale = log10_scale + jnp.log10(scale)
    # |H| = 1 / |M_11|; the tiny constant keeps log10 finite when M_11 vanishes.
    db = -20.0 * (jnp.log10(jnp.abs(m11) + 1e-30) + log10_scale)
    return jnp.maximum(db, FLOOR_DB)


def circuit(noise_db: float = NOISE_DB):
    """The fault model, written with masks so that it jits and vmaps.

    Per component, in ladder order: ``{c}_faulty``; if faulty ``{c}_mode`` (0 open,
    1 short, 2 drift) and, for a drift, ``{c}_drift_up`` and ``{c}_drift_mag`` (log
    factor); if healthy ``{c}_tol`` (log factor). Every potential site is sampled, under
    a mask saying whether it ran. Observed: ``response`` (dB at 40 frequencies).

    Example:
        >>> compiled = jaxic.compile(circuit, observed=["response"], key=jax.random.key(0), num_steps=4000)
    """
    latents = {}
    for name, kind, _, _ in COMPONENTS:
        faulty = jnp.asarray(numpyro.sample(f"{name}_faulty", dist.Bernoulli(FAULT_PROBABILITY[kind]))).astype(bool)
        with handlers.mask(mask=faulty):
            mode = numpyro.sample(f"{name}_mode", dist.Categorical(jnp.asarray(MODE_PROBS)))
        with handlers.mask(mask=faulty & (mode == DRIFT)):
            up = numpyro.sample(f"{name}_drift_up", dist.Bernoulli(0.5))
            magnitude = numpyro.sample(f"{name}_drift_mag", dist.Uniform(*DRIFT_RANGE))
        with handlers.mask(mask=~faulty):
            tol = numpyro.sample(f"{name}_tol", dist.Normal(0.0, TOLERANCE_SD))
        latents.update({f"{name}_faulty": faulty, f"{name}_mode": mode, f"{name}_drift_up": up,
                        f"{name}_drift_mag": magnitude, f"{name}_tol": tol})
    numpyro.sample("response", dist.Normal(latent_response(latents), noise_db).to_event(1))


def latent_response(latents: Mapping[str, jax.Array]) -> jax.Array:
    """Noise-free response (dB) of the circuit described by the model's latent sites.

    ``latents`` maps the model's site names to values with any common leading shape
    (e.g. posterior samples); sites that did not run may hold anything. Jittable.

    Example:
        >>> draws = post.resample(jax.random.key(0), 200)
        >>> latent_response(draws).shape          # (200, 40): posterior predictive curves
    """
    values, modes = {}, {}
    for name, _, nominal, _ in COMPONENTS:
        faulty = jnp.asarray(latents[f"{name}_faulty"]).astype(bool)
        drifting = faulty & (jnp.asarray(latents[f"{name}_mode"]) == DRIFT)
        magnitude = latents[f"{name}_drift_mag"]
        drift = jnp.where(jnp.asarray(latents[f"{name}_drift_up"]) == 1, magnitude, -magnitude)
        # Sites that did not run hold arbitrary values (any proposal's): select only what ran.
        log_factor = jnp.where(drifting, drift, jnp.where(faulty, 0.0, latents[f"{name}_tol"]))
        values[name] = nominal * jnp.exp(log_factor)
        modes[name] = jnp.where(faulty, latents[f"{name}_mode"], DRIFT)
    return circuit_response(values, modes)


def fault_label(values: Mapping[str, jax.Array]) -> list | str:
    """Fault hypothesis as text: ``"healthy"``, ``"L3 open"``, ``"C2 drift down"``, or
    several faults in ladder order joined with ``" + "``.

    ``values`` maps site names to latent values with a common leading shape (e.g.
    particles); a string is returned for unbatched values, else (nested) lists.

    Example:
        >>> fault_label(post.samples)[:3]          # ['healthy', 'healthy', 'C4 drift up']
        >>> fault_label({"L3_faulty": 1, "L3_mode": 0, ...})   # 'L3 open'
    """
    shape = np.shape(values[f"{COMPONENTS[0][0]}_faulty"])
    labels = np.full(shape, "", dtype=object)
    for name, *_ in COMPONENTS:
        faulty = np.asarray(values[f"{name}_faulty"]).astype(bool)
        if not faulty.any():
            continue  # the other sites of a healthy component may be absent or arbitrary
        mode = np.asarray(values[f"{name}_mode"])
        up = np.asarray(values.get(f"{name}_drift_up", np.zeros(shape))).astype(bool)
        kind = np.where(mode == OPEN, "open", np.where(mode == SHORT, "short",
                                                        np.where(up, "drift up", "drift down")))
        text = np.char.add(f"{name} ", kind.astype(str)).astype(object)
        joined = np.where(labels == "", text, labels + " + " + text)
        labels = np.where(faulty, joined, labels)
    labels = np.where(labels == "", "healthy", labels)
    return str(labels) if labels.ndim == 0 else labels.astype(str).tolist()


def fault_posterior(samples: Mapping[str, jax.Array], weights: jax.Array,
                    top: int | None = None) -> dict[str, float]:
    """Posterior probability of each fault hypothesis, most probable first.

    ``samples`` are one observation set's particles (leading axis) and ``weights`` their
    importance weights (normalised here); ``top`` keeps only the most probable ones.

    Example:
        >>> fault_posterior(post.samples, post.weights, top=3)
        {'L2 drift down': 0.91, 'L2 drift down + R4 short': 0.05, 'healthy': 0.02}
    """
    labels = fault_label(samples)
    weights = np.asarray(weights, np.float64).reshape(-1)
    if len(labels) != weights.shape[0]:
        raise ValueError(f"{len(labels)} samples but {weights.shape[0]} weights")
    totals: dict[str, float] = {}
    for label, w in zip(labels, weights / weights.sum()):
        totals[label] = totals.get(label, 0.0) + float(w)
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    return dict(ranked[:top] if top else ranked)


WEAK_DB = 2.0  # a fault that moves the noise-free response by less than this is hard to see in 1 dB noise


def single_fault_cases(key: jax.Array, num_cases: int) -> tuple[dict, list, np.ndarray]:
    """Prior draws with exactly one faulty component, for benchmarks: ``(values of every
    site, true fault labels, groups)``. Groups: ``"dead output"`` (the response sits at the
    -100 dB floor, so the shunt shorts cannot be told apart), ``"weak"`` (moves the response
    by less than :data:`WEAK_DB`) and ``"identifiable"``.

    Example:
        >>> cases, labels, groups = single_fault_cases(jax.random.key(2026), 200)
        >>> responses = cases["response"]
    """
    from numpyro.infer import Predictive

    draws = Predictive(circuit, num_samples=max(8 * num_cases, 2000))(key)
    num_faulty = sum(np.asarray(draws[f"{name}_faulty"]) for name, *_ in COMPONENTS)
    chosen = np.flatnonzero(num_faulty == 1)[:num_cases]
    if chosen.size < num_cases:
        raise ValueError(f"only {chosen.size} single-fault draws among the prior draws; ask for fewer cases")
    cases = {k: np.asarray(v)[chosen] for k, v in draws.items()}
    clean = np.asarray(latent_response(cases))
    nominal = np.asarray(circuit_response({name: v for name, _, v, _ in COMPONENTS}))
    dead = np.all(clean <= FLOOR_DB + 0.5, axis=-1)
    weak = np.max(np.abs(clean - nominal), axis=-1) < WEAK_DB
    groups = np.where(dead, "dead output", np.where(weak, "weak", "identifiable"))
    return cases, fault_label(cases), groups
