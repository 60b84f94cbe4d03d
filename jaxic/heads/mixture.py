"""Gaussian-mixture head for continuous sites (in unconstrained, standardised space)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

_MIN_SCALE = 1e-5


@dataclasses.dataclass(frozen=True)
class MixtureHead:
    """K-component diagonal Gaussian mixture over a ``dim``-vector.

    Outputs: K mixture logits, K*dim locations, K*dim pre-softplus scales.

    Example:
        >>> head = MixtureHead(dim=1, num_components=4)
        >>> head.log_prob(jnp.zeros(head.num_params), jnp.zeros(1))
    """

    dim: int
    num_components: int

    @property
    def num_params(self) -> int:
        return self.num_components * (1 + 2 * self.dim)

    @property
    def feature_dim(self) -> int:
        return self.dim

    def _parts(self, params):
        k, d = self.num_components, self.dim
        logits = params[:k]
        loc = params[k : k + k * d].reshape(k, d)
        scale = jax.nn.softplus(params[k + k * d : k + 2 * k * d].reshape(k, d)) + _MIN_SCALE
        return logits, loc, scale

    def distribution(self, params: jax.Array) -> dist.Distribution:
        logits, loc, scale = self._parts(params)
        return dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1))

    def log_prob(self, params, value):
        return self.distribution(params).log_prob(value[: self.dim])

    def sample(self, key, params, width):
        """A draw that is reparameterised in every parameter, mixture weights included.

        The component choice is discrete, so the ELBO's pathwise gradient needs implicit
        reparameterisation (Figurnov et al. 2018): through the distributional transform,
        ``dz_i/dθ = -(dF_i/dθ) / q_i(z_i)`` with ``F_i`` the CDF of dimension ``i`` given the
        earlier ones. The value is the ordinary mixture draw; only its gradient changes.
        """
        z = self.distribution(params).sample(key)
        if self.num_components == 1:
            return jnp.pad(z, (0, width - self.dim))
        logits, loc, scale = self._parts(params)
        z = jax.lax.stop_gradient(z)
        log_weight = jax.nn.log_softmax(logits)
        out = []
        for i in range(self.dim):
            weight = jax.nn.softmax(log_weight)
            standard = (z[i] - loc[:, i]) / scale[:, i]
            cdf = jnp.sum(weight * jax.scipy.special.ndtr(standard))
            pdf = jnp.sum(weight * jnp.exp(-0.5 * standard**2) / (jnp.sqrt(2 * jnp.pi) * scale[:, i]))
            z_i = z[i] - (cdf - jax.lax.stop_gradient(cdf)) / jax.lax.stop_gradient(jnp.maximum(pdf, 1e-30))
            out.append(z_i)
            # Weights of the next dimension given this one (through the reparameterised z_i).
            log_weight = log_weight + dist.Normal(loc[:, i], scale[:, i]).log_prob(z_i)
        return jnp.pad(jnp.stack(out), (0, width - self.dim))

    def widen(self, params, factor):
        """Every component ``factor`` times wider, the weights flattened (logits / factor)."""
        k, d = self.num_components, self.dim
        _, _, scale = self._parts(params)
        wider = scale * factor - _MIN_SCALE
        # Inverse softplus, stable for large scales.
        raw = wider + jnp.log(-jnp.expm1(-wider))
        return jnp.concatenate([params[:k] / factor, params[k : k + k * d], raw.reshape(-1)])

    def features(self, value):
        return value[: self.dim]

    def statistics(self, values, mask):
        u = values[:, : self.dim]
        weight = mask.astype(u.dtype)[:, None]
        count = jnp.maximum(weight.sum(), 1.0)
        loc = (u * weight).sum(0) / count
        std = jnp.sqrt(((u - loc) ** 2 * weight).sum(0) / count)
        # Constant sites get unit scale rather than a division by zero.
        scale = jnp.where(std > 1e-6, std, 1.0)
        k = self.num_components
        # Components spread over the standardised prior (so they start distinct), with a
        # common scale that makes the initial mixture's variance exactly one.
        # Constants (NumPy), so that statistics can run under jit.
        spread = np.linspace(-1.0, 1.0, k) if k > 1 else np.zeros(1)
        # With few components the spread alone would use up the unit variance (k=2: scale 0).
        spread = spread * min(1.0, float(np.sqrt(0.5 / max(np.mean(spread**2), 1e-12))))
        component_scale = float(np.sqrt(1.0 - np.mean(spread**2)))
        base = jnp.concatenate([
            jnp.zeros(k),
            jnp.asarray(np.repeat(spread[:, None], self.dim, axis=1).reshape(-1), jnp.float32),
            jnp.full(k * self.dim, np.log(np.expm1(component_scale)), jnp.float32),
        ])
        pad = values.shape[1] - self.dim
        return jnp.pad(loc, (0, pad)), jnp.pad(scale, (0, pad), constant_values=1.0), base
