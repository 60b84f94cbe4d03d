"""sbibm's ten simulation-based-inference benchmark tasks as NumPyro models, transcribed from sbibm 1.1.0's
task definitions (``sbibm/tasks/<task>/task.py``).

Reference: J.-M. Lueckmann, J. Boelts, D. S. Greenberg, P. J. Goncalves and J. H. Macke,
"Benchmarking Simulation-Based Inference", AISTATS 2021 (sbibm 1.1.0).

Every model has exactly two sample sites: ``theta``, one vector of sbibm's parameter dimension whose
columns follow sbibm's reference CSVs, and ``obs``, the observation in sbibm's shape. Each model takes
``obs=None`` (numpyro conditions on it when given) and is also usable with ``observed=["obs"]``.

* ``two_moons``: theta ~ U(-1, 1)^2; obs = (r cos a + 0.25 - |z0|, r sin a + z1) with
  a ~ U(-pi/2, pi/2), r ~ N(0.1, 0.01), z = R(-pi/4) theta. The two nuisances are integrated out
  exactly in :class:`TwoMoonsLikelihood` (sbibm's own ``_likelihood`` omits the polar Jacobian 1/r).
* ``gaussian_linear_uniform``: theta ~ U(-1, 1)^10; obs ~ N(theta, 0.1 I) (covariance 0.1, so the
  standard deviation is sqrt(0.1): sbibm passes ``precision_matrix = inverse(0.1 I)``).
* ``bernoulli_glm_raw``: theta ~ N(0, B^-1) (sbibm's smoothness precision B); obs ~ Bernoulli(sigmoid(X theta))
  for the 100 time bins, X sbibm's fixed design matrix (offset column, then 9 lags of a white-noise
  stimulus drawn by ``numpy.random.RandomState(42)``: reproduced bit for bit, see :func:`bernoulli_glm_design`).
* ``bernoulli_glm``: the same spikes seen only through their 10 summary statistics X^T y (the spike count and 9
  spike-triggered sums). The spikes are drawn inside the model and the summary observed as a ``Delta``, as a
  black-box simulator is written: it has no likelihood (``Task.has_likelihood`` False), so only jaxic's raw
  draws are scored, and importance sampling refuses it (``jaxic.NoLikelihoodError``).
* ``sir``: theta = (beta, gamma) ~ LogNormal((log 0.4, log 0.125), (0.5, 0.2)); the SIR ODE with
  N = 1e6, (S, I, R)(0) = (N - 1, 1, 0); obs ~ Binomial(1000, I(t)/N) at t = 0, 17, ..., 153 days
  (sbibm saves daily on [0, 160] and keeps every 17th point).
* ``gaussian_linear``: theta ~ N(0, 0.1 I) on R^10; obs ~ N(theta, 0.1 I) (covariances, as above); the
  posterior is N(obs / 2, 0.05 I).
* ``gaussian_mixture``: theta ~ U(-10, 10)^2; obs ~ 0.5 N(theta, I) + 0.5 N(theta, 0.01 I), one mixture
  index for the whole vector (summed out in the likelihood).
* ``slcp``: theta ~ U(-3, 3)^5; obs = 4 draws of N((theta0, theta1), S) flattened to 8 values, S with
  standard deviations theta2^2, theta3^2 and correlation tanh(theta4), plus 1e-6 on the diagonal.
* ``slcp_distractors``: slcp with its 8 values among 92 distractors from a fixed mixture of 20 multivariate
  Student-t components (2 degrees of freedom), the 100 values permuted as sbibm does; the mixture and the
  permutation are sbibm's own (:func:`benchmarks.sbibm_reference.distractor_mixture`).
* ``lotka_volterra``: theta = (alpha, beta, gamma, delta) ~ LogNormal((-0.125, -3, -0.125, -3), 0.5);
  the predator-prey ODE with (x, y)(0) = (30, 1); obs ~ LogNormal(log clip(u, 1e-10, 1e4), 0.1) at
  t = 0, 2.1, ..., 18.9 (sbibm saves every 0.1 on [0, 20] and keeps every 21st point), ordered
  prey at the 10 times, then predators at the 10 times.

ODEs: sbibm solves them with DifferentialEquations.jl's Tsit5 at reltol = abstol = 1e-8 in float64.
Here diffrax's Tsit5 with a PID step-size controller runs in the working precision (float32 unless
x64 is enabled), so rtol = 1e-6; atol = 1e-12 on the SIR population fractions S/N, I/N, R/N (1e-6
people: float32 cannot hold 1e6 people to 1e-8) and atol = 1e-8 on the Lotka-Volterra populations,
as sbibm. Against float64 DOP853 at rtol 1e-12, over 50 prior draws each, the saved I/N is off by at
most 4e-7 (abs) and the Lotka-Volterra values by at most 4e-4 (relative): far below the observation
noise. Over 2000 prior draws the solves took at most 152 (SIR) and 390 (Lotka-Volterra) steps.
Each solve stops at the last saved time (``t1`` = 153 and 18.9 days; sbibm integrates on to 160 and
20, which cannot change the earlier saved values) and gets at most ``MAX_STEPS`` = 4096 steps. A
solve that does not finish (some Lotka-Volterra draws from the prior's tail blow up) gives NaN for
every saved value, as sbibm marks such draws NaN and drops them: jaxic's training leaves such traces
out and counts them, and ``benchmarks/sbibm.py`` drops them from the simulations both methods see.

Example:
    >>> task = TASKS["sir"]
    >>> x = simulate(task, jax.random.key(0), jnp.array([0.6, 0.19]))
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.util import validate_sample

__all__ = ["Task", "TASKS", "TwoMoonsLikelihood", "SLCPLikelihood", "simulate", "log_likelihood",
           "two_moons", "two_moons_prior", "gaussian_linear_uniform", "gaussian_linear_uniform_prior",
           "bernoulli_glm", "bernoulli_glm_raw", "bernoulli_glm_prior", "bernoulli_glm_design", "bernoulli_glm_prior_precision",
           "bernoulli_glm_summary", "sir", "sir_prior", "sir_infected_fraction", "lotka_volterra",
           "lotka_volterra_prior", "lotka_volterra_solution", "gaussian_linear", "gaussian_linear_prior",
           "gaussian_mixture", "gaussian_mixture_prior", "gaussian_mixture_likelihood", "slcp", "slcp_prior",
           "SLCPDistractorsLikelihood", "slcp_distractors"]

RTOL = 1e-6
SIR_ATOL = 1e-12
LV_ATOL = 1e-8
MAX_STEPS = 4096


# ----------------------------------------------------------------------------------------------
# two_moons


class TwoMoonsLikelihood(dist.Distribution):
    """sbibm's two-moons simulator as a density on R^2, the nuisances a, r integrated out exactly.

    With p = obs + (|z0|, -z1), u = p0 - 0.25, v = p1, polar coordinates (r, a) of (u, v) give
    p(obs | theta) = N(r; 0.1, 0.01) / (pi r) for u > 0, else 0 (a ~ U(-pi/2, pi/2); the mass of
    r < 0, about 1e-23, is neglected).

    Example:
        >>> TwoMoonsLikelihood(jnp.zeros(2)).sample(jax.random.key(0)).shape
        (2,)
    """

    arg_constraints = {"theta": constraints.real_vector}
    support = constraints.real_vector
    reparametrized_params = ["theta"]
    A_HALF_WIDTH = math.pi / 2.0
    BASE_OFFSET = 0.25
    R_LOC = 0.1
    R_SCALE = 0.01

    def __init__(self, theta, *, validate_args=None):
        self.theta = jnp.asarray(theta)
        super().__init__(batch_shape=jnp.shape(self.theta)[:-1], event_shape=(2,), validate_args=validate_args)

    def _shift(self):
        # sbibm rotates theta by -pi/4: z0 = (t0 + t1)/sqrt2, z1 = (t1 - t0)/sqrt2.
        c, s = math.cos(-math.pi / 4.0), math.sin(-math.pi / 4.0)
        t0, t1 = self.theta[..., 0], self.theta[..., 1]
        z0 = c * t0 - s * t1
        z1 = s * t0 + c * t1
        return jnp.stack([-jnp.abs(z0), z1], axis=-1)

    def sample(self, key, sample_shape=()):
        shape = tuple(sample_shape) + tuple(self.batch_shape)
        key_a, key_r = jax.random.split(key)
        a = jax.random.uniform(key_a, shape, minval=-self.A_HALF_WIDTH, maxval=self.A_HALF_WIDTH)
        r = self.R_LOC + self.R_SCALE * jax.random.normal(key_r, shape)
        p = jnp.stack([jnp.cos(a) * r + self.BASE_OFFSET, jnp.sin(a) * r], axis=-1)
        return p + self._shift()

    @validate_sample
    def log_prob(self, value):
        p = value - self._shift()
        u = p[..., 0] - self.BASE_OFFSET
        v = p[..., 1]
        r = jnp.hypot(u, v)
        log_r = -0.5 * ((r - self.R_LOC) / self.R_SCALE) ** 2 - 0.5 * jnp.log(2.0 * math.pi * self.R_SCALE**2)
        log_p = log_r - jnp.log(math.pi) - jnp.log(jnp.where(r > 0.0, r, 1.0))
        return jnp.where((u > 0.0) & (r > 0.0), log_p, -jnp.inf)


def two_moons_prior() -> dist.Distribution:
    """U(-1, 1)^2, the prior of ``two_moons``'s theta.

    Example:
        >>> two_moons_prior().event_shape
        (2,)
    """
    return dist.Uniform(-jnp.ones(2), jnp.ones(2)).to_event(1)


def two_moons(obs=None):
    """sbibm's ``two_moons``: theta ~ U(-1, 1)^2, obs ~ :class:`TwoMoonsLikelihood` (theta).

    Example:
        >>> jaxic.compile(two_moons, observed=["obs"], key=key)
    """
    theta = numpyro.sample("theta", two_moons_prior())
    numpyro.sample("obs", TwoMoonsLikelihood(theta), obs=obs)


# ----------------------------------------------------------------------------------------------
# gaussian_linear_uniform

GLU_DIM = 10
GLU_NOISE_VARIANCE = 0.1


def gaussian_linear_uniform_prior() -> dist.Distribution:
    """U(-1, 1)^10, the prior of ``gaussian_linear_uniform``'s theta.

    Example:
        >>> gaussian_linear_uniform_prior().event_shape
        (10,)
    """
    return dist.Uniform(-jnp.ones(GLU_DIM), jnp.ones(GLU_DIM)).to_event(1)


def gaussian_linear_uniform(obs=None):
    """sbibm's ``gaussian_linear_uniform``: theta ~ U(-1, 1)^10, obs ~ N(theta, 0.1 I) (variance 0.1).

    Example:
        >>> jaxic.compile(gaussian_linear_uniform, observed=["obs"], key=key)
    """
    theta = numpyro.sample("theta", gaussian_linear_uniform_prior())
    numpyro.sample("obs", dist.Normal(theta, math.sqrt(GLU_NOISE_VARIANCE)).to_event(1), obs=obs)


# ----------------------------------------------------------------------------------------------
# bernoulli_glm_raw

GLM_BINS = 100
GLM_DIM = 10
GLM_STIMULUS_SEED = 42


def bernoulli_glm_design() -> np.ndarray:
    """sbibm's fixed (100, 10) design matrix: a column of ones, then the stimulus lagged by 0..8 bins.

    The stimulus is ``RandomState(42).randn(100)`` in float32, as sbibm's ``_setup`` draws it; this
    reproduces sbibm's stored ``files/design_matrix.pt`` exactly.

    Example:
        >>> bernoulli_glm_design().shape
        (100, 10)
    """
    stimulus = np.random.RandomState(GLM_STIMULUS_SEED).randn(GLM_BINS).astype(np.float32)
    design = np.zeros((GLM_BINS, GLM_DIM), dtype=np.float32)
    design[:, 0] = 1.0
    for lag in range(GLM_DIM - 1):
        design[lag:, lag + 1] = stimulus[:GLM_BINS - lag]
    return design


def bernoulli_glm_prior_precision() -> np.ndarray:
    """sbibm's prior precision B: 0.5 for the offset; F^T F for the filter, F = D D + diag(sqrt(i/9)),
    D the first-difference matrix (penalised second differences keep the filter smooth).

    Example:
        >>> bernoulli_glm_prior_precision()[0, 0]
        0.5
    """
    m = GLM_DIM - 1
    d = np.eye(m) - np.eye(m, k=-1)
    f = d @ d + np.diag(np.sqrt(np.arange(m) / m))
    precision = np.zeros((GLM_DIM, GLM_DIM))
    precision[0, 0] = 0.5
    precision[1:, 1:] = f.T @ f
    return precision.astype(np.float32)


def bernoulli_glm_summary(spikes) -> np.ndarray:
    """sbibm's ``bernoulli_glm`` summary of raw spikes: the spike count and the 9 spike-triggered sums,
    i.e. X^T y (its torch ``conv1d`` computes the same sums).

    Example:
        >>> bernoulli_glm_summary(np.zeros(100)).shape
        (10,)
    """
    return np.asarray(spikes, dtype=np.float64) @ bernoulli_glm_design().astype(np.float64)


def bernoulli_glm_prior() -> dist.Distribution:
    """N(0, B^-1) with B :func:`bernoulli_glm_prior_precision`, the prior of ``bernoulli_glm_raw``'s theta.

    Example:
        >>> bernoulli_glm_prior().event_shape
        (10,)
    """
    return dist.MultivariateNormal(jnp.zeros(GLM_DIM), precision_matrix=jnp.asarray(bernoulli_glm_prior_precision()))


def bernoulli_glm_raw(obs=None):
    """sbibm's ``bernoulli_glm_raw``: theta ~ N(0, B^-1), obs ~ Bernoulli(sigmoid(X theta)), 100 bins.

    Example:
        >>> jaxic.compile(bernoulli_glm_raw, observed=["obs"], key=key)
    """
    design = jnp.asarray(bernoulli_glm_design())
    theta = numpyro.sample("theta", bernoulli_glm_prior())
    numpyro.sample("obs", dist.Bernoulli(logits=design @ theta).to_event(1), obs=obs)


def bernoulli_glm(obs=None):
    """sbibm's ``bernoulli_glm``: :func:`bernoulli_glm_raw`'s spikes seen only through their summary
    X^T y (:func:`bernoulli_glm_summary`: the spike count and 9 spike-triggered sums).

    Written as a simulator is: the spikes are drawn inside it (``numpyro.prng_key()``) and the summary is
    observed as a ``Delta``, so the observation has no likelihood. jaxic's amortized draws
    (``compiled.sample``) are scored; importance sampling needs p(obs | theta) and refuses.

    Example:
        >>> jaxic.compile(bernoulli_glm, observed=["obs"], key=key).sample(key, {"obs": summary}, 1000)
    """
    design = jnp.asarray(bernoulli_glm_design())
    theta = numpyro.sample("theta", bernoulli_glm_prior())
    spikes = jax.random.bernoulli(numpyro.prng_key(), jax.nn.sigmoid(design @ theta))
    numpyro.sample("obs", dist.Delta(spikes.astype(jnp.float32) @ design, event_dim=1), obs=obs)


# ----------------------------------------------------------------------------------------------
# ODE tasks


def _solve(vector_field, y0, args, ts, atol):
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field), diffrax.Tsit5(), t0=0.0, t1=ts[-1], dt0=None, y0=y0, args=args,
        saveat=diffrax.SaveAt(ts=ts), stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=atol),
        max_steps=MAX_STEPS, throw=False)
    return jnp.where(solution.result == diffrax.RESULTS.successful, solution.ys, jnp.nan)


SIR_POPULATION = 1e6
SIR_TOTAL_COUNT = 1000
SIR_TIMES = np.arange(0.0, 161.0, 17.0)  # sbibm: daily saves on [0, 160], every 17th kept


def _sir_field(t, y, theta):
    s, i, _ = y
    beta, gamma = theta[0], theta[1]
    infection = beta * s * i
    return jnp.stack([-infection, infection - gamma * i, gamma * i])


def sir_infected_fraction(theta, times=SIR_TIMES) -> jax.Array:
    """I(t)/N of sbibm's SIR ODE at ``times`` (default sbibm's t = 0, 17, ..., 153 days) for
    theta = (beta, gamma); vmap for a batch.

    Example:
        >>> sir_infected_fraction(jnp.array([0.4, 0.125])).shape
        (10,)
    """
    y0 = jnp.array([(SIR_POPULATION - 1.0) / SIR_POPULATION, 1.0 / SIR_POPULATION, 0.0])
    return _solve(_sir_field, y0, jnp.asarray(theta), jnp.asarray(times, dtype=y0.dtype), SIR_ATOL)[:, 1]


def sir_prior() -> dist.Distribution:
    """LogNormal((log 0.4, log 0.125), (0.5, 0.2)), the prior of ``sir``'s theta = (beta, gamma).

    Example:
        >>> sir_prior().event_shape
        (2,)
    """
    return dist.LogNormal(jnp.array([math.log(0.4), math.log(0.125)]), jnp.array([0.5, 0.2])).to_event(1)


def sir(obs=None):
    """sbibm's ``sir``: theta = (beta, gamma) log-normal, obs ~ Binomial(1000, I(t)/N) at 10 times.

    Example:
        >>> jaxic.compile(sir, observed=["obs"], key=key)
    """
    theta = numpyro.sample("theta", sir_prior())
    probs = jnp.clip(sir_infected_fraction(theta), 0.0, 1.0)
    numpyro.sample("obs", dist.Binomial(SIR_TOTAL_COUNT, probs=probs).to_event(1), obs=obs)


LV_INITIAL = (30.0, 1.0)
LV_TIMES = np.arange(10) * 2.1  # sbibm: saves every 0.1 on [0, 20], every 21st kept
LV_NOISE = 0.1


def _lv_field(t, y, theta):
    x, z = y
    alpha, beta, gamma, delta = theta[0], theta[1], theta[2], theta[3]
    return jnp.stack([alpha * x - beta * x * z, -gamma * z + delta * x * z])


def lotka_volterra_solution(theta, times=LV_TIMES) -> jax.Array:
    """(prey at every time, then predators at every time) of sbibm's Lotka-Volterra ODE at ``times``
    (default sbibm's 10 times: shape (20,)).

    Example:
        >>> lotka_volterra_solution(jnp.array([0.7, 0.1, 0.9, 0.1])).shape
        (20,)
    """
    y0 = jnp.array(LV_INITIAL)
    ys = _solve(_lv_field, y0, jnp.asarray(theta), jnp.asarray(times, dtype=y0.dtype), LV_ATOL)
    return ys.T.reshape(-1)


def lotka_volterra_prior() -> dist.Distribution:
    """LogNormal((-0.125, -3, -0.125, -3), 0.5), the prior of ``lotka_volterra``'s (alpha, beta, gamma, delta).

    Example:
        >>> lotka_volterra_prior().event_shape
        (4,)
    """
    return dist.LogNormal(jnp.array([-0.125, -3.0, -0.125, -3.0]), 0.5 * jnp.ones(4)).to_event(1)


def lotka_volterra(obs=None):
    """sbibm's ``lotka_volterra``: 4 log-normal rates, obs ~ LogNormal(log clip(u, 1e-10, 1e4), 0.1), 20 values.

    Example:
        >>> jaxic.compile(lotka_volterra, observed=["obs"], key=key)
    """
    theta = numpyro.sample("theta", lotka_volterra_prior())
    u = jnp.clip(lotka_volterra_solution(theta), 1e-10, 1e4)
    numpyro.sample("obs", dist.LogNormal(jnp.log(u), LV_NOISE).to_event(1), obs=obs)


# ----------------------------------------------------------------------------------------------
# gaussian_linear

GL_DIM = 10
GL_PRIOR_VARIANCE = 0.1
GL_NOISE_VARIANCE = 0.1


def gaussian_linear_prior() -> dist.Distribution:
    """N(0, 0.1 I) on R^10 (covariance 0.1: sbibm passes ``precision_matrix = inverse(0.1 I)``), the prior
    of ``gaussian_linear``'s theta.

    Example:
        >>> gaussian_linear_prior().event_shape
        (10,)
    """
    return dist.Normal(jnp.zeros(GL_DIM), math.sqrt(GL_PRIOR_VARIANCE)).to_event(1)


def gaussian_linear(obs=None):
    """sbibm's ``gaussian_linear``: theta ~ N(0, 0.1 I), obs ~ N(theta, 0.1 I); the posterior is
    N(obs / 2, 0.05 I).

    Example:
        >>> jaxic.compile(gaussian_linear, observed=["obs"], key=key)
    """
    theta = numpyro.sample("theta", gaussian_linear_prior())
    numpyro.sample("obs", dist.Normal(theta, math.sqrt(GL_NOISE_VARIANCE)).to_event(1), obs=obs)


# ----------------------------------------------------------------------------------------------
# gaussian_mixture

GM_DIM = 2
GM_PRIOR_BOUND = 10.0
GM_SCALES = (1.0, 0.1)
GM_WEIGHTS = (0.5, 0.5)


def gaussian_mixture_prior() -> dist.Distribution:
    """U(-10, 10)^2, the prior of ``gaussian_mixture``'s theta.

    Example:
        >>> gaussian_mixture_prior().event_shape
        (2,)
    """
    return dist.Uniform(-GM_PRIOR_BOUND * jnp.ones(GM_DIM), GM_PRIOR_BOUND * jnp.ones(GM_DIM)).to_event(1)


def gaussian_mixture_likelihood(theta) -> dist.Distribution:
    """sbibm's simulator as a density: one mixture index per draw picks N(theta, I) or N(theta, 0.01 I)
    for the whole vector, with probability 1/2 each (the index is summed out).

    Example:
        >>> gaussian_mixture_likelihood(jnp.zeros(2)).event_shape
        (2,)
    """
    theta = jnp.asarray(theta)
    scales = jnp.asarray(GM_SCALES)[:, None] * jnp.ones_like(theta)[..., None, :]
    components = dist.Normal(theta[..., None, :] * jnp.ones((len(GM_SCALES), 1)), scales).to_event(1)
    return dist.MixtureSameFamily(dist.Categorical(probs=jnp.asarray(GM_WEIGHTS)), components)


def gaussian_mixture(obs=None):
    """sbibm's ``gaussian_mixture``: theta ~ U(-10, 10)^2, obs ~ 0.5 N(theta, I) + 0.5 N(theta, 0.01 I).

    Example:
        >>> jaxic.compile(gaussian_mixture, observed=["obs"], key=key)
    """
    theta = numpyro.sample("theta", gaussian_mixture_prior())
    numpyro.sample("obs", gaussian_mixture_likelihood(theta), obs=obs)


# ----------------------------------------------------------------------------------------------
# slcp

SLCP_DIM = 5
SLCP_PRIOR_BOUND = 3.0
SLCP_NUM_DATA = 4
SLCP_DIAGONAL_EPS = 1e-6


class SLCPLikelihood(dist.Distribution):
    """sbibm's ``slcp`` simulator: 4 independent draws of a 2-D Gaussian, flattened to 8 values
    (x1_1, x1_2, x2_1, ...) as sbibm stores them.

    Mean (theta0, theta1); with s1 = theta2^2, s2 = theta3^2, rho = tanh(theta4), the covariance is
    [[s1^2 + 1e-6, rho s1 s2], [rho s1 s2, s2^2 + 1e-6]] (sbibm squares the squared scales, so the
    standard deviations are theta2^2 and theta3^2).

    Example:
        >>> SLCPLikelihood(jnp.ones(5)).sample(jax.random.key(0)).shape
        (8,)
    """

    arg_constraints = {"theta": constraints.real_vector}
    support = constraints.real_vector
    reparametrized_params = ["theta"]

    def __init__(self, theta, *, validate_args=None):
        self.theta = jnp.asarray(theta)
        super().__init__(batch_shape=jnp.shape(self.theta)[:-1], event_shape=(2 * SLCP_NUM_DATA,),
                         validate_args=validate_args)

    def _gaussian(self) -> dist.MultivariateNormal:
        t = self.theta
        s1, s2, rho = t[..., 2] ** 2, t[..., 3] ** 2, jnp.tanh(t[..., 4])
        off = rho * s1 * s2
        covariance = jnp.stack([jnp.stack([s1**2 + SLCP_DIAGONAL_EPS, off], -1),
                                jnp.stack([off, s2**2 + SLCP_DIAGONAL_EPS], -1)], -2)
        return dist.MultivariateNormal(t[..., :2], covariance_matrix=covariance)

    def sample(self, key, sample_shape=()):
        draws = self._gaussian().sample(key, tuple(sample_shape) + (SLCP_NUM_DATA,))
        draws = jnp.moveaxis(draws, len(sample_shape), -2)  # (..., 4, 2): the 4 draws next to their 2 values
        return draws.reshape(draws.shape[:-2] + (2 * SLCP_NUM_DATA,))

    @validate_sample
    def log_prob(self, value):
        value = jnp.broadcast_to(value, jnp.broadcast_shapes(value.shape, self.batch_shape + self.event_shape))
        pairs = value.reshape(value.shape[:-1] + (SLCP_NUM_DATA, 2))
        return self._gaussian().log_prob(jnp.moveaxis(pairs, -2, 0)).sum(0)  # the 4 draws in front, then summed


def slcp_prior() -> dist.Distribution:
    """U(-3, 3)^5, the prior of ``slcp``'s theta.

    Example:
        >>> slcp_prior().event_shape
        (5,)
    """
    return dist.Uniform(-SLCP_PRIOR_BOUND * jnp.ones(SLCP_DIM), SLCP_PRIOR_BOUND * jnp.ones(SLCP_DIM)).to_event(1)


def slcp(obs=None):
    """sbibm's ``slcp`` ("simple likelihood, complex posterior"): theta ~ U(-3, 3)^5, obs = 4 draws of a
    2-D Gaussian whose mean, scales and correlation are theta (:class:`SLCPLikelihood`).

    Example:
        >>> jaxic.compile(slcp, observed=["obs"], key=key)
    """
    theta = numpyro.sample("theta", slcp_prior())
    numpyro.sample("obs", SLCPLikelihood(theta), obs=obs)


# ----------------------------------------------------------------------------------------------
# slcp_distractors

SLCP_DISTRACTORS_DATA = 100


class SLCPDistractorsLikelihood(dist.Distribution):
    """sbibm's ``slcp_distractors`` simulator: slcp's 8 values and 92 distractors that do not depend on theta,
    drawn from a fixed mixture of multivariate Student-t components, the 100 values then permuted.

    ``mixture``: the arrays of :func:`benchmarks.sbibm_reference.distractor_mixture` (``logits``, ``df``,
    ``loc``, ``scale_tril``, ``permutation``). The density is slcp's times the mixture's, so the posterior is
    slcp's and sbibm reuses slcp's reference draws.

    Example:
        >>> SLCPDistractorsLikelihood(jnp.ones(5), mixture).sample(jax.random.key(0)).shape
        (100,)
    """

    arg_constraints = {"theta": constraints.real_vector}
    support = constraints.real_vector
    reparametrized_params = ["theta"]

    def __init__(self, theta, mixture: dict, *, validate_args=None):
        self.theta = jnp.asarray(theta)
        self.permutation = jnp.asarray(mixture["permutation"])
        self.data_slots = self.permutation < 2 * SLCP_NUM_DATA  # where the simulator put slcp's values
        # sbibm's factors have negative entries on their diagonals; flipping those columns' signs gives the same
        # covariance L L^T (and the same Student-t law) with the positive diagonal numpyro's constraint wants.
        scale_tril = jnp.asarray(mixture["scale_tril"])
        scale_tril = scale_tril * jnp.sign(jnp.diagonal(scale_tril, axis1=-2, axis2=-1))[..., None, :]
        self.distractors = dist.MixtureSameFamily(
            dist.Categorical(logits=jnp.asarray(mixture["logits"])),
            dist.MultivariateStudentT(jnp.asarray(mixture["df"]), jnp.asarray(mixture["loc"]), scale_tril))
        super().__init__(batch_shape=jnp.shape(self.theta)[:-1], event_shape=(int(self.permutation.shape[0]),),
                         validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        key_data, key_noise = jax.random.split(key)
        data = SLCPLikelihood(self.theta).sample(key_data, sample_shape)
        noise = self.distractors.sample(key_noise, data.shape[:-1])
        return jnp.concatenate([data, noise.astype(data.dtype)], axis=-1)[..., self.permutation]

    @validate_sample
    def log_prob(self, value):
        unpermuted = jnp.zeros_like(value).at[..., self.permutation].set(value)
        data, noise = unpermuted[..., :2 * SLCP_NUM_DATA], unpermuted[..., 2 * SLCP_NUM_DATA:]
        return SLCPLikelihood(self.theta).log_prob(data) + self.distractors.log_prob(noise)


@functools.cache
def _sbibm_distractor_mixture() -> dict:
    try:
        from benchmarks import sbibm_reference
    except ImportError:  # run as a script from benchmarks/, which puts its own folder on sys.path
        import sbibm_reference
    return sbibm_reference.distractor_mixture()


def slcp_distractors(obs=None):
    """sbibm's ``slcp_distractors``: slcp's prior and likelihood, its 8 values hidden among 92 distractors
    (:class:`SLCPDistractorsLikelihood`, with sbibm's mixture and permutation read from its files).

    Example:
        >>> jaxic.compile(slcp_distractors, observed=["obs"], key=key)
    """
    theta = numpyro.sample("theta", slcp_prior())
    numpyro.sample("obs", SLCPDistractorsLikelihood(theta, _sbibm_distractor_mixture()), obs=obs)


# ----------------------------------------------------------------------------------------------
# Registry and helpers


@dataclass(frozen=True)
class Task:
    """One sbibm task (``name`` as sbibm names it): its NumPyro ``model(obs=None)``, parameter and data
    dimensions, and ``prior()``, the distribution of the model's ``theta`` site.

    Example:
        >>> TASKS["two_moons"].theta_dim
        2
    """

    name: str
    model: Callable
    theta_dim: int
    obs_dim: int
    prior: Callable[[], dist.Distribution]
    has_likelihood: bool = True  # False: the observation is a simulator's output (a Delta), only simulate() draws it

    def prior_sample(self, key: jax.Array, num_samples: int) -> jax.Array:
        """``num_samples`` draws of theta from the prior, shape (num_samples, theta_dim).

        Example:
            >>> TASKS["sir"].prior_sample(jax.random.key(0), 5).shape
            (5, 2)
        """
        return self.prior().sample(key, (num_samples,))


TASKS: dict[str, Task] = {
    "two_moons": Task("two_moons", two_moons, 2, 2, two_moons_prior),
    "gaussian_linear_uniform": Task("gaussian_linear_uniform", gaussian_linear_uniform, GLU_DIM, GLU_DIM,
                                    gaussian_linear_uniform_prior),
    "bernoulli_glm": Task("bernoulli_glm", bernoulli_glm, GLM_DIM, GLM_DIM, bernoulli_glm_prior, has_likelihood=False),
    "bernoulli_glm_raw": Task("bernoulli_glm_raw", bernoulli_glm_raw, GLM_DIM, GLM_BINS, bernoulli_glm_prior),
    "sir": Task("sir", sir, 2, 10, sir_prior),
    "lotka_volterra": Task("lotka_volterra", lotka_volterra, 4, 20, lotka_volterra_prior),
    "gaussian_linear": Task("gaussian_linear", gaussian_linear, GL_DIM, GL_DIM, gaussian_linear_prior),
    "gaussian_mixture": Task("gaussian_mixture", gaussian_mixture, GM_DIM, GM_DIM, gaussian_mixture_prior),
    "slcp": Task("slcp", slcp, SLCP_DIM, 2 * SLCP_NUM_DATA, slcp_prior),
    "slcp_distractors": Task("slcp_distractors", slcp_distractors, SLCP_DIM, SLCP_DISTRACTORS_DATA, slcp_prior),
}


def _obs_distribution(task: Task, theta, key=0):
    conditioned = numpyro.handlers.condition(task.model, {"theta": theta})
    trace = numpyro.handlers.trace(numpyro.handlers.seed(conditioned, key)).get_trace()
    return trace["obs"]["fn"]


def simulate(task: Task, key: jax.Array, theta) -> jax.Array:
    """Draw obs given theta: one draw for theta of shape (theta_dim,), one per row for (n, theta_dim).

    Example:
        >>> simulate(TASKS["two_moons"], jax.random.key(0), jnp.zeros((3, 2))).shape
        (3, 2)
    """
    theta = jnp.asarray(theta)
    if theta.ndim == 2:
        return jax.vmap(lambda k, t: simulate(task, k, t))(jax.random.split(key, theta.shape[0]), theta)
    if not task.has_likelihood:  # the simulator draws inside the model: its Delta holds this key's output
        return _obs_distribution(task, theta, key).sample(key)
    return _obs_distribution(task, theta).sample(key)


def log_likelihood(task: Task, theta, obs) -> jax.Array:
    """log p(obs | theta) of the task's observation model; theta (theta_dim,) or a batch (n, theta_dim).

    Example:
        >>> log_likelihood(TASKS["gaussian_linear_uniform"], jnp.zeros(10), jnp.zeros(10)).shape
        ()
    """
    if not task.has_likelihood:
        raise ValueError(f"{task.name}'s observation is a simulator's output with no likelihood")
    theta = jnp.asarray(theta)
    obs = jnp.asarray(obs)
    if theta.ndim == 2:
        return jax.vmap(lambda t: log_likelihood(task, t, obs))(theta)
    return _obs_distribution(task, theta).log_prob(obs)
