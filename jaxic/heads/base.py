"""The head protocol and the rule that picks a head for a latent site."""

from __future__ import annotations

import functools

from typing import Protocol

import jax

from jaxic.tracing.spec import LatentSite


class ProposalHead(Protocol):
    """A family of proposal distributions for one token.

    Heads are frozen dataclasses (hashable, static under jit); sites whose heads compare
    equal share one output projection of the network.

    Attributes:
        num_params: how many network outputs parameterise one token's distribution.
        feature_dim: width of :meth:`features`, the value embedding fed back to the network.
    """

    num_params: int
    feature_dim: int

    def log_prob(self, params: jax.Array, value: jax.Array) -> jax.Array:
        """Log-density (or mass) of a standardised token ``value`` (padded) under ``params``."""

    def sample(self, key: jax.Array, params: jax.Array, width: int) -> jax.Array:
        """One standardised token value, padded with zeros to ``width``."""

    def features(self, value: jax.Array) -> jax.Array:
        """Fixed-width features of a standardised token value, for the network's input."""

    def widen(self, params: jax.Array, factor: jax.Array) -> jax.Array:
        """Parameters of a wider member of the family (``factor >= 1``; 1 leaves the distribution
        unchanged): the defensive component of importance sampling, which must put mass wherever
        the proposal is too confident."""

    def statistics(self, values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """From joint-sample token values ``(N, width)`` of one site: ``(loc, scale, base_params)``.

        ``loc``/``scale`` standardise the value; ``base_params`` are added to the network
        output so that a freshly initialised proposal is close to the prior.
        """


def head_for_site(site: LatentSite, num_components: int) -> ProposalHead:
    """The default head for a site: categorical logits for finite discrete supports, a
    negative-binomial mixture for unbounded integer ones, a Gaussian mixture in
    unconstrained space for continuous ones.

    Example:
        >>> head_for_site(spec.latent("x"), num_components=8)
        MixtureHead(dim=1, num_components=8)
    """
    from jaxic.heads.categorical import CategoricalHead
    from jaxic.heads.integer import IntegerMixtureHead
    from jaxic.heads.mixture import MixtureHead

    if site.is_discrete and site.num_categories == 0:  # unbounded: Poisson, Geometric, ...
        return IntegerMixtureHead(num_components)
    if site.is_discrete:
        return CategoricalHead(site.num_categories)
    return MixtureHead(site.value_dim, num_components)


@functools.lru_cache(maxsize=64)
def heads_for(spec, num_components: int) -> tuple[ProposalHead, ...]:
    """The heads of every latent site of ``spec``, in address order: chosen once per spec and
    size, so the statistics and the network that uses them agree.

    Example:
        >>> heads_for(spec, num_components=8)[spec.address_of("x")]
    """
    return tuple(head_for_site(site, num_components) for site in spec.latents)
