"""Categorical head for finite discrete sites (Bernoulli, Categorical, DiscreteUniform)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpyro.distributions as dist


@dataclasses.dataclass(frozen=True)
class CategoricalHead:
    """Logits over ``num_categories`` values; a token stores the category index.

    Example:
        >>> head = CategoricalHead(3)
        >>> jnp.exp(head.log_prob(jnp.zeros(3), jnp.array([1.0])))  # 1/3
    """

    num_categories: int

    @property
    def num_params(self) -> int:
        return self.num_categories

    @property
    def feature_dim(self) -> int:
        return self.num_categories

    def _index(self, value):
        return jnp.clip(jnp.round(value[0]), 0, self.num_categories - 1).astype(jnp.int32)

    def log_prob(self, params, value):
        return dist.Categorical(logits=params).log_prob(self._index(value))

    def sample(self, key, params, width):
        index = dist.Categorical(logits=params).sample(key).astype(jnp.float32)
        return jnp.zeros(width).at[0].set(index)

    def widen(self, params, factor):
        """Logits at temperature ``factor``: flatter, every category keeps some mass."""
        return params / factor

    def features(self, value):
        return jax.nn.one_hot(self._index(value), self.num_categories)

    def statistics(self, values, mask):
        # Start at the empirical marginal of the joint samples (add-one smoothed).
        index = jnp.clip(jnp.round(values[:, 0]), 0, self.num_categories - 1).astype(jnp.int32)
        counts = (jax.nn.one_hot(index, self.num_categories) * mask[:, None]).sum(0) + 1.0
        width = values.shape[1]
        return jnp.zeros(width), jnp.ones(width), jnp.log(counts / counts.sum())
