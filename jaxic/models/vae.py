"""A variational autoencoder on binarised 8x8 digits: the models.

The generative model is plain NumPyro: for each image ``n`` in a plate ``"data"``,
``z_n ~ N(0, I_d)`` and ``x_n ~ Bernoulli(sigmoid(decoder(z_n)))`` over its 64 pixels, with the
decoder a Flax NNX MLP declared through ``numpyro.contrib.module.nnx_module`` (so its weights are
``numpyro.param`` sites that the inference algorithm learns).

* :func:`vae` is the model as jaxic takes it: ``x`` is *not* observed in the model (jaxic
  conditions it on the data rows) and the plate subsamples ``batch_size`` images (jaxic
  substitutes its own minibatch indices).
* :func:`vae_numpyro` / :func:`vae_guide` are the textbook NumPyro VAE: the same decoder, ``x``
  observed on a minibatch chosen by the plate, and an MLP encoder ``q(z_n | x_n)`` as the guide.

The data loader, the NumPyro SVI baseline, its evaluators and the plots live with the experiment
in ``benchmarks/vae_baseline.py``.

Example:
    >>> compiled = jaxic.compile(vae, observed=["x"], key=jax.random.key(0), objective="elbo",
    ...                          model_kwargs={"num_data": len(X), "batch_size": 128},
    ...                          data={"x": X}, local_plate="data")
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from flax import nnx
from numpyro.contrib.module import nnx_module

NUM_PIXELS = 64
IMAGE_SHAPE = (8, 8)
DEFAULT_HIDDEN = (128, 128)
DEFAULT_LATENT_DIM = 2
# Fixed so that every call of the model without an explicit module starts from the same weights.
DECODER_SEED = 0
ENCODER_SEED = 1


def _hidden_sizes(hidden: int | Sequence[int]) -> tuple[int, ...]:
    return (int(hidden),) if isinstance(hidden, int) else tuple(int(h) for h in hidden)


class _MLP(nnx.Module):
    # Layers are named attributes (not an nnx.List) so the parameter dict has string keys only,
    # which keeps it friendly to checkpointing and printing.
    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, *, rngs: nnx.Rngs):
        dims = (in_dim, *hidden)
        self.num_hidden = len(hidden)
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            setattr(self, f"layer{i}", nnx.Linear(a, b, rngs=rngs))
        self.out = nnx.Linear(dims[-1], out_dim, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        for i in range(self.num_hidden):
            h = nnx.gelu(getattr(self, f"layer{i}")(h))
        return self.out(h)


class Decoder(_MLP):
    """MLP from a latent code to 64 Bernoulli logits: ``latent_dim -> hidden... -> 64`` with GELU.

    Example:
        >>> decoder = Decoder(latent_dim=2, hidden=(128, 128), rngs=nnx.Rngs(0))
        >>> decoder(jnp.zeros((5, 2))).shape
        (5, 64)
    """

    def __init__(self, latent_dim: int = DEFAULT_LATENT_DIM, hidden: int | Sequence[int] = DEFAULT_HIDDEN,
                 out_dim: int = NUM_PIXELS, *, rngs: nnx.Rngs):
        self.latent_dim = latent_dim
        super().__init__(latent_dim, _hidden_sizes(hidden), out_dim, rngs=rngs)


class Encoder(_MLP):
    """MLP from an image to a diagonal Gaussian over the latent code: returns ``(loc, scale)``.

    ``64 -> hidden... -> 2 * latent_dim``; the scale is a softplus plus a small floor so that
    it never collapses to zero.

    Example:
        >>> loc, scale = Encoder(latent_dim=2, rngs=nnx.Rngs(1))(jnp.zeros((5, 64)))
        >>> loc.shape, scale.shape
        ((5, 2), (5, 2))
    """

    def __init__(self, latent_dim: int = DEFAULT_LATENT_DIM, hidden: int | Sequence[int] = DEFAULT_HIDDEN,
                 in_dim: int = NUM_PIXELS, *, rngs: nnx.Rngs):
        self.latent_dim = latent_dim
        super().__init__(in_dim, _hidden_sizes(hidden), 2 * latent_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = super().__call__(x)
        loc, raw_scale = jnp.split(out, 2, axis=-1)
        return loc, jax.nn.softplus(raw_scale) + 1e-3


@functools.lru_cache(maxsize=None)
def _default_module(kind: str, latent_dim: int, hidden: tuple[int, ...]) -> nnx.Module:
    # The model may first run under jit: initialise eagerly so no tracer is cached. Caching is
    # safe because nnx_module splits the module and never writes to it.
    with jax.ensure_compile_time_eval():
        if kind == "decoder":
            return Decoder(latent_dim, hidden, rngs=nnx.Rngs(DECODER_SEED))
        return Encoder(latent_dim, hidden, rngs=nnx.Rngs(ENCODER_SEED))


def default_decoder(latent_dim: int = DEFAULT_LATENT_DIM, hidden: int | Sequence[int] = DEFAULT_HIDDEN) -> Decoder:
    """The decoder the models use when none is passed (fixed seed, shared between calls).

    Example:
        >>> default_decoder(2, (128, 128)) is default_decoder(2, (128, 128))
        True
    """
    return _default_module("decoder", int(latent_dim), _hidden_sizes(hidden))


def default_encoder(latent_dim: int = DEFAULT_LATENT_DIM, hidden: int | Sequence[int] = DEFAULT_HIDDEN) -> Encoder:
    """The encoder :func:`vae_guide` uses when none is passed (fixed seed, shared between calls).

    Example:
        >>> loc, scale = default_encoder(2)(jnp.zeros((1, 64)))
    """
    return _default_module("encoder", int(latent_dim), _hidden_sizes(hidden))


def _latent_prior(latent_dim: int) -> dist.Distribution:
    return dist.Normal(0.0, 1.0).expand([latent_dim]).to_event(1)


def vae(num_data: int, batch_size: int | None = None, latent_dim: int = DEFAULT_LATENT_DIM,
        hidden: int | Sequence[int] = DEFAULT_HIDDEN, decoder: nnx.Module | None = None):
    """The VAE's generative model for jaxic: ``z_n ~ N(0, I)``, ``x_n ~ Bernoulli(logits=decoder(z_n))``.

    ``x`` is not observed here: jaxic conditions it on the rows of the data and substitutes the
    plate's subsample indices with its own minibatch. The decoder's weights are the
    ``numpyro.param`` site ``"decoder$params"`` (declared by ``nnx_module``); ``decoder`` defaults
    to :func:`default_decoder` and must take ``latent_dim`` inputs.

    Example:
        >>> compiled = jaxic.compile(vae, observed=["x"], key=jax.random.key(0), objective="elbo",
        ...                          model_kwargs={"num_data": len(X_train), "batch_size": 128},
        ...                          data={"x": X_train}, local_plate="data")
    """
    decode = nnx_module("decoder", decoder if decoder is not None else default_decoder(latent_dim, hidden))
    with numpyro.plate("data", num_data, subsample_size=batch_size):
        z = numpyro.sample("z", _latent_prior(latent_dim))
        numpyro.sample("x", dist.Bernoulli(logits=decode(z)).to_event(1))


def vae_numpyro(x: jax.Array, batch_size: int | None = None, latent_dim: int = DEFAULT_LATENT_DIM,
                hidden: int | Sequence[int] = DEFAULT_HIDDEN, decoder: nnx.Module | None = None,
                encoder: nnx.Module | None = None):
    """:func:`vae` for plain NumPyro SVI: all images ``x`` (n, 64) are passed and the plate picks the minibatch.

    The plate's subsampling scales the likelihood by ``n / batch_size``, so the ELBO is an unbiased
    estimate of the full-data ELBO. ``encoder`` is unused (it keeps the signature equal to
    :func:`vae_guide`'s, as SVI passes both the same arguments).

    Example:
        >>> svi = SVI(vae_numpyro, vae_guide, optax.adam(1e-3), Trace_ELBO())
        >>> state = svi.init(jax.random.key(0), X_train, batch_size=128)
    """
    del encoder
    decode = nnx_module("decoder", decoder if decoder is not None else default_decoder(latent_dim, hidden))
    with numpyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
        z = numpyro.sample("z", _latent_prior(latent_dim))
        numpyro.sample("x", dist.Bernoulli(logits=decode(z)).to_event(1), obs=x[idx])


def vae_guide(x: jax.Array, batch_size: int | None = None, latent_dim: int = DEFAULT_LATENT_DIM,
              hidden: int | Sequence[int] = DEFAULT_HIDDEN, decoder: nnx.Module | None = None,
              encoder: nnx.Module | None = None):
    """Amortized guide ``q(z_n | x_n) = N(loc(x_n), diag scale(x_n)^2)`` from an MLP encoder (``"encoder$params"``).

    Uses the same plate as :func:`vae_numpyro`, so SVI replays the same minibatch in the model.

    Example:
        >>> svi = SVI(vae_numpyro, vae_guide, optax.adam(1e-3), Trace_ELBO())
    """
    del decoder
    encode = nnx_module("encoder", encoder if encoder is not None else default_encoder(latent_dim, hidden))
    with numpyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
        loc, scale = encode(x[idx])
        numpyro.sample("z", dist.Normal(loc, scale).to_event(1))


__all__ = ["Decoder", "Encoder", "default_decoder", "default_encoder", "vae", "vae_numpyro", "vae_guide",
           "NUM_PIXELS", "IMAGE_SHAPE", "DEFAULT_HIDDEN", "DEFAULT_LATENT_DIM"]
