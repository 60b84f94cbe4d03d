"""Weighted posterior samples with the summaries users ask for."""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from jaxic import validation
from jaxic.errors import IndexOutOfRangeError, JaxicError, UnknownSiteError


@functools.partial(jax.jit, static_argnums=2)
def resample_indices(key: jax.Array, log_weights: jax.Array, num: int) -> jax.Array:
    """Multinomial resampling by inverse CDF: ``num`` particle indices per observation set
    (shape ``log_weights.shape[:-1] + (num,)``), in O((num + particles) log particles) time and
    O(num + particles) memory (a categorical draw of ``num`` would build a ``num x particles`` array).

    Example:
        >>> index = resample_indices(jax.random.key(0), post.log_weights, 1000)
    """
    log_weights = jnp.asarray(log_weights)
    flat = log_weights.reshape(-1, log_weights.shape[-1])

    def one(k, lw):
        cdf = jnp.cumsum(jnp.exp(lw - jnp.max(lw)))
        u = jax.random.uniform(k, (num,)) * cdf[-1]
        return jnp.minimum(jnp.searchsorted(cdf, u, side="right"), lw.shape[0] - 1)

    index = jax.vmap(one)(jax.random.split(key, flat.shape[0]), flat)
    return index.reshape(log_weights.shape[:-1] + (num,))


def check_weighted(posterior: "Posterior") -> None:
    """Raise :class:`jaxic.JaxicError` if an observation set has no particle with a finite weight:
    resampling (``resample``, predictive draws) needs one. Under ``jit`` the weights are unknown: no check.

    Example:
        >>> check_weighted(post)   # before drawing from it
    """
    log_w = posterior.log_weights
    if isinstance(log_w, jax.core.Tracer):
        return
    dead = np.argwhere(~np.any(np.isfinite(np.asarray(log_w)), axis=-1).reshape(posterior.batch_shape or (1,)))
    if dead.size:
        where = "" if not posterior.batch_shape else f" of observation set {int(dead[0][0])}"
        raise JaxicError(f"every particle{where} has zero (or NaN) importance weight, so there is no posterior to "
                         "draw from; draw more particles, train the proposal longer, or check that the "
                         "observation is possible under the model.")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Posterior:
    """Importance-weighted samples. Leading axes: ``batch_shape`` (one per observation
    set, empty for a single one), then particles. ``samples`` holds the latent sites and the
    ``numpyro.deterministic`` sites, weighted alike.

    Example:
        >>> post = compiled.posterior(key, {"obs": 25.0}, num_samples=10_000)
        >>> post.ess, post.log_evidence, post.mean("x"), post.quantile("x", [0.05, 0.95])
        >>> draws = post.resample(key, 1000)["x"]      # unweighted draws
        >>> many = compiled.posterior(key, {"obs": jnp.array([4.0, 25.0])}); many[1].ess
    """

    samples: dict[str, jax.Array]
    log_weights: jax.Array
    log_joint: jax.Array
    log_proposal: jax.Array
    # Per site and element, whether it ran in each particle (stochastic control flow);
    # summaries of a site are conditional on it having run.
    executed: dict[str, jax.Array] | None = None

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.log_weights.shape[:-1]

    @property
    def num_samples(self) -> int:
        return self.log_weights.shape[-1]

    @property
    def weights(self) -> jax.Array:
        """Normalised importance weights (sum to one over particles)."""
        return jnp.exp(self.log_weights - logsumexp(self.log_weights, axis=-1, keepdims=True))

    @property
    def ess(self) -> jax.Array:
        """Kish effective sample size, ``1 / sum w_i^2``."""
        return 1.0 / jnp.sum(self.weights**2, axis=-1)

    @property
    def log_evidence(self) -> jax.Array:
        """Estimate of ``log p(y)``: log of the mean unnormalised weight."""
        return logsumexp(self.log_weights, axis=-1) - jnp.log(self.num_samples)

    def __getitem__(self, index) -> "Posterior":
        """The posterior of one observation set (or a slice) of a batched posterior: ``post[1]``."""
        if not self.batch_shape:
            raise IndexOutOfRangeError(f"this posterior is for a single observation set; there is nothing to index "
                                       f"(got index {index!r}). Use it directly.")
        index = validation.index_in_range(index, self.batch_shape[0])  # jax would clamp silently
        part = jax.tree.map(lambda a: a[index], self)
        known = self.__dict__.get("_predict")
        return part if known is None else part.knowing_model(known)

    def _weights_for(self, name: str) -> tuple[jax.Array, jax.Array]:
        if name not in self.samples:
            raise UnknownSiteError(f"no latent site '{name}' (nor deterministic site) in this posterior; its sites are "
                                   f"{sorted(self.samples)}.")
        x = self.samples[name]
        extra = x.ndim - self.log_weights.ndim
        w = jnp.broadcast_to(self.weights.reshape(self.weights.shape + (1,) * extra), x.shape)
        if self.executed is not None and name in self.executed:
            w = w * self._executed(name, x.ndim)
            w = w / jnp.sum(w, axis=len(self.batch_shape), keepdims=True)
        return x, w

    def _executed(self, name: str, ndim: int) -> jax.Array:
        ran = self.executed[name]
        return ran.reshape(ran.shape + (1,) * (ndim - ran.ndim))  # event dims of multivariate sites

    def probability_executed(self, name: str) -> jax.Array:
        """Posterior probability that a site (each of its elements) ran."""
        x, _ = self._weights_for(name)
        if self.executed is None or name not in self.executed:
            return jnp.ones(self.batch_shape + x.shape[len(self.batch_shape) + 1:])
        ran = self.executed[name]
        w = self.weights.reshape(self.weights.shape + (1,) * (ran.ndim - self.log_weights.ndim))
        return jnp.sum(w * ran, axis=len(self.batch_shape))

    def mean(self, name: str) -> jax.Array:
        """Posterior mean of a site (per observation set), given that it ran."""
        x, w = self._weights_for(name)
        return jnp.sum(w * x, axis=len(self.batch_shape))

    def std(self, name: str) -> jax.Array:
        """Posterior standard deviation of a site."""
        x, w = self._weights_for(name)
        axis = len(self.batch_shape)
        mean = jnp.sum(w * x, axis=axis, keepdims=True)
        return jnp.sqrt(jnp.sum(w * (x - mean) ** 2, axis=axis))

    def quantile(self, name: str, q: float | Sequence[float]) -> jax.Array:
        """Weighted quantiles of a site; ``q`` becomes the leading axis when it is a sequence."""
        validation.probability("q", q)
        x, w = self._weights_for(name)
        axis = len(self.batch_shape)
        qs = jnp.atleast_1d(jnp.asarray(q, jnp.float32))
        order = jnp.argsort(x, axis=axis)
        xs = jnp.take_along_axis(x, order, axis)
        cw = jnp.cumsum(jnp.take_along_axis(w, order, axis), axis=axis)
        cw = jnp.moveaxis(cw, axis, -1)
        xs = jnp.moveaxis(xs, axis, -1)
        # Midpoint rule: each sample sits at the middle of its weight interval.
        mid = cw - 0.5 * jnp.moveaxis(jnp.take_along_axis(w, order, axis), axis, -1)
        interp = jnp.vectorize(lambda c, v, p: jnp.interp(p, c, v), signature="(n),(n),()->()")
        out = jnp.stack([interp(mid, xs, p) for p in qs])
        return out if np.ndim(q) else out[0]

    def resample(self, key: jax.Array, num: int) -> dict[str, jax.Array]:
        """``num`` unweighted draws per observation set (multinomial resampling); an observation set
        without a particle of finite weight is an error (see :func:`check_weighted`)."""
        check_weighted(self)
        index = resample_indices(key, self.log_weights, num)
        axis = len(self.batch_shape)

        def take(x):
            idx = index.reshape(index.shape + (1,) * (x.ndim - index.ndim))
            return jnp.take_along_axis(x, idx, axis=axis)

        return {name: take(x) for name, x in self.samples.items()}

    def predictive(self, key: jax.Array, num_samples: int = 1000, *, model=None, model_args: Sequence = (),
                   model_kwargs=None) -> dict[str, jax.Array]:
        """Posterior predictive draws of the model's observed and deterministic sites (see
        :func:`jaxic.predictive`), batched like this posterior. A posterior from
        ``compiled.posterior`` knows its model; otherwise (``jaxic.importance_sample``, a result
        of ``jit``) pass ``model=`` and, if it takes them, ``model_args``/``model_kwargs``.

        Example:
            >>> post = compiled.posterior(jax.random.key(1), {"obs": 25.0}, 10_000)
            >>> post.predictive(jax.random.key(2), num_samples=1000)["obs"].shape   # (1000,)
        """
        from jaxic.inference.predictive import predictive  # it builds on this module
        if model is not None:
            return predictive(model, self, key, num_samples, model_args=model_args, model_kwargs=model_kwargs)
        known = self.__dict__.get("_predict")
        if known is None:
            raise JaxicError("this posterior does not know its model (it was not made by compiled.posterior, e.g. "
                             "jaxic.importance_sample or a jitted function returned it): call "
                             "post.predictive(key, num_samples, model=model) or jaxic.predictive(model, post, key, n).")
        return known(self, key, num_samples)

    def knowing_model(self, predict) -> "Posterior":
        """This posterior with ``predict(posterior, key, num_samples)`` as its :meth:`predictive` (what
        ``compiled.posterior`` attaches). Not a pytree leaf: ``jax.tree`` operations drop it.

        Example:
            >>> post = post.knowing_model(lambda p, k, n: jaxic.predictive(model, p, k, n))
        """
        known = dataclasses.replace(self)
        object.__setattr__(known, "_predict", predict)
        return known

    def summary(self, sites: Sequence[str] | None = None, max_elements: int = 6) -> str:
        """A printable table: mean, sd and 5/50/95% quantiles per site, with ESS and evidence."""
        sites = list(self.samples) if sites is None else list(sites)
        lines = []
        for b in np.ndindex(*self.batch_shape):
            pick = lambda a: np.asarray(a)[b] if b else np.asarray(a)
            lines.append((f"observation set {b[0]}: " if b else "") + self._summary_header(pick))
            lines.append(f"{'site':>16} {'mean':>9} {'sd':>9} {'5%':>9} {'50%':>9} {'95%':>9}")
            for name in sites:
                mean, sd = pick(self.mean(name)).reshape(-1), pick(self.std(name)).reshape(-1)
                quant = np.asarray(self.quantile(name, [0.05, 0.5, 0.95]))
                quant = (quant[(slice(None),) + b] if b else quant).reshape(3, -1)
                ran = pick(self.probability_executed(name)).reshape(-1)
                for i in range(min(mean.size, max_elements)):
                    label = name if mean.size == 1 else f"{name}[{i}]"
                    if ran[i] < 0.9995:
                        label = f"{label} (ran {ran[i]:.0%})"
                    lines.append(f"{label:>16} {mean[i]:9.3f} {sd[i]:9.3f} {quant[0, i]:9.3f} {quant[1, i]:9.3f} "
                                 f"{quant[2, i]:9.3f}")
                if mean.size > max_elements:
                    lines.append(f"{'':>16} ... {mean.size - max_elements} more elements")
        return "\n".join(lines)

    def _summary_header(self, pick) -> str:
        return (f"ESS {float(pick(self.ess)):.1f} of {self.num_samples} "
                f"({100 * float(pick(self.ess)) / self.num_samples:.1f}%), "
                f"log evidence {float(pick(self.log_evidence)):.3f}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ProposalDraws(Posterior):
    """Raw draws ``x ~ q(x | y)`` of the amortized posterior, each of equal weight: ``mean``, ``std``,
    ``quantile``, ``resample`` and ``predictive`` describe the proposal itself, not an importance-weighted
    posterior, and ``ess`` is the number of draws. ``log_joint`` and ``log_proposal`` are those of each draw
    (``log_joint`` is -inf for a model whose observation has no likelihood); there is no evidence estimate.
    What :meth:`jaxic.CompiledModel.proposal_draws` returns.

    Example:
        >>> draws = compiled.proposal_draws(jax.random.key(0), {"obs": 25.0}, 1000)
        >>> draws.mean("x"), draws.quantile("x", [0.05, 0.95]), draws.executed["x"].shape
    """

    @classmethod
    def of(cls, particles: Posterior) -> "ProposalDraws":
        """The draws of ``particles`` (a :class:`Posterior`) with their importance weights dropped.

        Example:
            >>> ProposalDraws.of(jaxic.proposal.draw_particles(proposal, None, key, {"obs": 25.0}, 100))
        """
        return cls(particles.samples, jnp.zeros_like(particles.log_weights), particles.log_joint,
                   particles.log_proposal, particles.executed)

    @property
    def log_evidence(self) -> jax.Array:
        raise JaxicError("raw proposal draws carry no importance weights, so they give no estimate of the evidence "
                         "log p(y); importance-sample instead: compiled.posterior(key, observations, n).log_evidence "
                         "(it needs a model with a likelihood).")

    def _summary_header(self, pick) -> str:
        return f"{self.num_samples} raw proposal draws (equal weights, no importance sampling)"
