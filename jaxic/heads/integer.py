"""Integer-valued head for unbounded discrete sites (Poisson, Geometric, NegativeBinomial, ...)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

# exp() of these bounds the component means and concentrations: wide enough for counts in the
# hundreds of thousands, narrow enough that lgamma and its gradient stay finite in float32.
_LOG_MEAN_RANGE = (-8.0, 13.0)
_LOG_CONCENTRATION_RANGE = (-4.0, 9.0)


@dataclasses.dataclass(frozen=True)
class IntegerMixtureHead:
    """K-component negative-binomial mixture over ``m = value - lower`` in {0, 1, 2, ...}.

    Outputs: K mixture logits, K log-means, K log-concentrations. Proposals are integers
    and all mass lies on the support. A value is rounded to the nearest non-negative
    integer before scoring (the network only ever feeds integers).

    Example:
        >>> head = IntegerMixtureHead(4)
        >>> head.sample(jax.random.key(0), jnp.zeros(head.num_params), width=1)  # e.g. [3.]
    """

    num_components: int

    @property
    def num_params(self) -> int:
        return 3 * self.num_components

    @property
    def feature_dim(self) -> int:
        return 2

    def distribution(self, params: jax.Array) -> dist.Distribution:
        k = self.num_components
        mean = jnp.exp(jnp.clip(params[k : 2 * k], *_LOG_MEAN_RANGE))
        concentration = jnp.exp(jnp.clip(params[2 * k :], *_LOG_CONCENTRATION_RANGE))
        return dist.MixtureSameFamily(dist.Categorical(logits=params[:k]),
                                      dist.NegativeBinomial2(mean, concentration))

    def widen(self, params, factor):
        """Flatter weights, each component's standard deviation about ``factor`` times larger (its
        overdispersion raised: variance = mean + mean**2 / concentration)."""
        k = self.num_components
        mean = jnp.exp(jnp.clip(params[k : 2 * k], *_LOG_MEAN_RANGE))
        concentration = jnp.exp(jnp.clip(params[2 * k :], *_LOG_CONCENTRATION_RANGE))
        # mean**2 / (factor**2 * (mean + mean**2 / c) - mean), rearranged without the cancellation at factor 1.
        wider = 1.0 / (factor**2 / concentration + (factor**2 - 1.0) / mean)
        return jnp.concatenate([params[:k] / factor, params[k : 2 * k],
                                jnp.clip(jnp.log(wider), *_LOG_CONCENTRATION_RANGE)])

    @staticmethod
    def _count(value):
        return jnp.maximum(jnp.round(value[0]), 0.0)

    def log_prob(self, params, value):
        return self.distribution(params).log_prob(self._count(value))

    def sample(self, key, params, width):
        draw = self.distribution(params).sample(key).astype(jnp.float32)
        return jnp.zeros(width).at[0].set(draw)

    def features(self, value):
        m = self._count(value)
        # log1p spreads small counts; the bounded term keeps very large counts well scaled.
        return jnp.stack([jnp.log1p(m), m / (m + 10.0)])

    def statistics(self, values, mask):
        m = jnp.maximum(jnp.round(values[:, 0]), 0.0)
        weight = mask.astype(m.dtype)
        count = jnp.maximum(weight.sum(), 1.0)
        mean = (m * weight).sum() / count
        var = ((m - mean) ** 2 * weight).sum() / count
        # Moment-matched overdispersion (var = mean + mean^2 / c); near-Poisson data gets a large c.
        concentration = mean**2 / jnp.maximum(var - mean, 1e-3 * (mean + 1.0))
        k = self.num_components
        # Components at means a fraction of a standard deviation apart, so that they start distinct
        # without widening the initial proposal much.
        relative_sd = jnp.minimum(jnp.sqrt(var) / (mean + 0.5), 1.0)
        spread = (jnp.linspace(-1.0, 1.0, k) if k > 1 else jnp.zeros(1)) * 0.3 * relative_sd
        log_means = jnp.log(mean + 0.05) + spread
        base = jnp.concatenate([
            jnp.zeros(k),
            jnp.clip(log_means, *_LOG_MEAN_RANGE),
            jnp.full(k, jnp.clip(jnp.log(concentration + 1e-6), *_LOG_CONCENTRATION_RANGE)),
        ])
        width = values.shape[1]
        return jnp.zeros(width), jnp.ones(width), base
