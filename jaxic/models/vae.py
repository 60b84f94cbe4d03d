"""A variational autoencoder on binarised 8x8 digits, and a hand-written NumPyro VAE to compare with.

The generative model is plain NumPyro: for each image ``n`` in a plate ``"data"``,
``z_n ~ N(0, I_d)`` and ``x_n ~ Bernoulli(sigmoid(decoder(z_n)))`` over its 64 pixels, with the
decoder a Flax NNX MLP declared through ``numpyro.contrib.module.nnx_module`` (so its weights are
``numpyro.param`` sites that the inference algorithm learns).

* :func:`vae` is the model as jaxic takes it: ``x`` is *not* observed in the model (jaxic
  conditions it on the data rows) and the plate subsamples ``batch_size`` images (jaxic
  substitutes its own minibatch indices).
* :func:`vae_numpyro` / :func:`vae_guide` are the textbook NumPyro VAE: the same decoder, ``x``
  observed on a minibatch chosen by the plate, and an MLP encoder ``q(z_n | x_n)`` as the guide,
  trained by ``numpyro.infer.SVI`` in :func:`train_numpyro_vae`.

Data: scikit-learn's copy of the UCI optical recognition of handwritten digits test set
(1797 images, 8x8, grey levels 0..16), see :func:`load_digits_binary`.

Example:
    >>> X_train, y_train, X_test, y_test = load_digits_binary()
    >>> result = train_numpyro_vae(X_train, jax.random.key(0), seconds=30)
    >>> elbo = numpyro_vae_heldout_elbo(result.params, X_test, jax.random.key(1)).mean()
    >>> log_lik = numpyro_vae_log_likelihood(result.params, X_test, jax.random.key(2), 100).mean()
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from flax import nnx
from numpyro import handlers
from numpyro.contrib.module import nnx_module
from numpyro.infer import SVI, Trace_ELBO

NUM_PIXELS = 64
IMAGE_SHAPE = (8, 8)
DEFAULT_HIDDEN = (128, 128)
DEFAULT_LATENT_DIM = 2
# Fixed so that every call of the model without an explicit module starts from the same weights.
DECODER_SEED = 0
ENCODER_SEED = 1


def load_digits_binary(test_fraction: float = 0.2, seed: int = 0):
    """Binarised scikit-learn digits split into train and test: ``(X_train, y_train, X_test, y_test)``.

    Each 8x8 image (grey levels 0..16) is scaled to [0, 1] and thresholded at 0.5 (a pixel is 1 when
    its grey level is above 8). The threshold is fixed rather than sampled (no dynamic
    binarisation), so the data and every log-likelihood on it are deterministic. The split is
    stratified by digit and fixed by ``seed``; with the default ``test_fraction`` there are 1437
    training and 360 test images. ``X`` is float32 ``(n, 64)`` in row-major pixel order, ``y``
    int32 digit labels.

    Needs scikit-learn (the data ships inside the package, no download).

    Example:
        >>> X_train, y_train, X_test, y_test = load_digits_binary()
        >>> X_train.shape, X_test.shape
        ((1437, 64), (360, 64))
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # only the VAE example needs it, so it is not a jaxic dependency
        raise ImportError("load_digits_binary needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    X = (digits.data / 16.0 > 0.5).astype(np.float32)
    y = digits.target.astype(np.int32)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_fraction, random_state=seed,
                                                        stratify=y)
    return X_train, y_train, X_test, y_test


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



def matched_inference_network():
    """A jaxic feed-forward inference network the size of the hand-written :class:`Encoder`
    with default sizes (about 25.4 k against 25.3 k parameters) and, like it, a Gaussian
    ``q(z_n | x_n)`` (one mixture component): for like-for-like comparisons.

    Example:
        >>> jaxic.compile(vae, observed=["x"], key=key, objective="elbo", data={"x": X}, local_plate="data",
        ...               network=matched_inference_network(), model_kwargs={"num_data": len(X)})
    """
    from jaxic.networks import FeedForwardConfig

    return FeedForwardConfig(d_model=32, hidden_dim=96, num_layers=1, observe_embedding_dim=32, obs_hidden=128,
                             num_components=1)

@dataclasses.dataclass
class NumPyroVAEResult:
    """What :func:`train_numpyro_vae` returns.

    Attributes:
        params: the learned parameters (``"decoder$params"``, ``"encoder$params"``).
        history: per step, ``"loss"`` (negative ELBO per training image, the minibatch estimate)
            and ``"wall_time"`` (seconds since training started, interpolated within a chunk).
        num_steps: optimisation steps taken.
        train_seconds: wall time of all training, initialisation and compilation included.
        setup_seconds: wall time of initialisation and compilation, before the first step.
        steps_per_second: training rate, setup excluded.
        model_kwargs: the sizes, to pass to the evaluation and plotting helpers.
    """

    params: dict
    history: dict
    num_steps: int
    train_seconds: float
    setup_seconds: float
    steps_per_second: float
    model_kwargs: dict


def train_numpyro_vae(X_train, key: jax.Array, *, seconds: float | None = None, num_steps: int | None = None,
                      latent_dim: int = DEFAULT_LATENT_DIM, hidden: int | Sequence[int] = DEFAULT_HIDDEN,
                      batch_size: int = 128, learning_rate: float = 1e-3, chunk: int = 200,
                      optimizer: optax.GradientTransformation | None = None) -> NumPyroVAEResult:
    """Train the hand-written VAE (:func:`vae_numpyro` + :func:`vae_guide`) with NumPyro SVI on minibatches.

    Runs jitted chunks of ``chunk`` steps (a ``lax.scan`` over ``svi.update``) until ``seconds`` of wall
    time have passed, counted from the start and including initialisation and compilation (the
    last chunk may overrun by its duration), or until ``num_steps`` steps. One of the two is
    required; with both, whichever comes first. The optimiser defaults to
    ``optax.adam(learning_rate)``.

    Example:
        >>> result = train_numpyro_vae(X_train, jax.random.key(0), seconds=60, batch_size=128)
        >>> result.steps_per_second, result.history["loss"][-1]
    """
    if seconds is None and num_steps is None:
        raise ValueError("give seconds, num_steps or both")
    chunk = chunk if num_steps is None else max(1, min(chunk, num_steps))
    model_kwargs = {"batch_size": int(batch_size), "latent_dim": int(latent_dim), "hidden": _hidden_sizes(hidden)}
    svi = SVI(vae_numpyro, vae_guide, optimizer or optax.adam(learning_rate), Trace_ELBO())
    X = jnp.asarray(X_train, jnp.float32)
    num_data = X.shape[0]

    @functools.partial(jax.jit, static_argnums=2)
    def run_chunk(state, X, length):
        def step(state, _):
            return svi.update(state, X, **model_kwargs)
        return jax.lax.scan(step, state, None, length=length)

    start = time.perf_counter()
    state = svi.init(key, X, **model_kwargs)
    # Compile ahead of time so the clock can tell setup (init, compilation) from training.
    full_chunk = run_chunk.lower(state, X, chunk).compile()
    setup_seconds = time.perf_counter() - start
    losses, times, steps, chunk_start = [], [], 0, setup_seconds
    # At least one chunk, even when setup alone used up the budget.
    while seconds is None or chunk_start < seconds or not losses:
        length = chunk if num_steps is None else min(chunk, num_steps - steps)
        if length <= 0:
            break
        state, loss = full_chunk(state, X) if length == chunk else run_chunk(state, X, length)
        loss = np.asarray(loss)  # blocks, so the clock below is honest
        now = time.perf_counter() - start
        losses.append(loss / num_data)
        times.append(np.linspace(chunk_start, now, length + 1)[1:])
        steps += length
        chunk_start = now
    train_seconds = time.perf_counter() - start
    return NumPyroVAEResult(params=svi.get_params(state),
                            history={"loss": np.concatenate(losses), "wall_time": np.concatenate(times)},
                            num_steps=steps, train_seconds=train_seconds, setup_seconds=setup_seconds,
                            steps_per_second=steps / max(train_seconds - setup_seconds, 1e-9),
                            model_kwargs={k: v for k, v in model_kwargs.items() if k != "batch_size"})


@functools.partial(jax.jit, static_argnames=("num_particles", "latent_dim", "hidden"))
def _numpyro_vae_log_weights(params, X, key, num_particles, latent_dim, hidden):
    def one(key):
        guide = handlers.seed(handlers.substitute(vae_guide, data=params), key)
        guide_trace = handlers.trace(guide).get_trace(X, None, latent_dim, hidden)
        model = handlers.replay(handlers.substitute(vae_numpyro, data=params), guide_trace)
        model_trace = handlers.trace(model).get_trace(X, None, latent_dim, hidden)
        # Per-image terms (the event dims are already summed), not the summed log density.
        z = guide_trace["z"]["value"]
        log_q = guide_trace["z"]["fn"].log_prob(z)
        log_p = model_trace["z"]["fn"].log_prob(z) + model_trace["x"]["fn"].log_prob(model_trace["x"]["value"])
        return log_p - log_q
    return jax.lax.map(one, jax.random.split(key, num_particles))


def numpyro_vae_log_weights(params: Mapping, X, key: jax.Array, num_particles: int = 1,
                            latent_dim: int = DEFAULT_LATENT_DIM,
                            hidden: int | Sequence[int] = DEFAULT_HIDDEN) -> jax.Array:
    """Importance log weights ``log p(x_n, z) - log q(z | x_n)`` with ``z ~ q(z | x_n)``: shape ``(K, n)``.

    Example:
        >>> log_w = numpyro_vae_log_weights(result.params, X_test, jax.random.key(1), 100)
    """
    return _numpyro_vae_log_weights(params, jnp.asarray(X, jnp.float32), key, int(num_particles), int(latent_dim),
                                    _hidden_sizes(hidden))


def numpyro_vae_heldout_elbo(params: Mapping, X, key: jax.Array, num_particles: int = 1,
                             latent_dim: int = DEFAULT_LATENT_DIM,
                             hidden: int | Sequence[int] = DEFAULT_HIDDEN) -> jax.Array:
    """ELBO of each image ``(n,)`` under the hand-written VAE, averaged over ``num_particles`` draws from q.

    Example:
        >>> numpyro_vae_heldout_elbo(result.params, X_test, jax.random.key(1)).mean()   # nats per image
    """
    return numpyro_vae_log_weights(params, X, key, num_particles, latent_dim, hidden).mean(0)


def numpyro_vae_log_likelihood(params: Mapping, X, key: jax.Array, num_particles: int = 100,
                               latent_dim: int = DEFAULT_LATENT_DIM,
                               hidden: int | Sequence[int] = DEFAULT_HIDDEN) -> jax.Array:
    """Importance-sampled ``log p(x_n)`` of each image ``(n,)``: ``logmeanexp`` of K log weights (the IWAE bound).

    A lower bound in expectation that tightens as ``num_particles`` grows; with one particle it
    is the ELBO.

    Example:
        >>> numpyro_vae_log_likelihood(result.params, X_test, jax.random.key(2), 100).mean()
    """
    log_w = numpyro_vae_log_weights(params, X, key, num_particles, latent_dim, hidden)
    return jax.nn.logsumexp(log_w, axis=0) - math.log(num_particles)


def _apply(name: str, module: nnx.Module, params: Mapping, *args):
    # nnx_module reads its weights from the param site, so substituting the learned ones applies them.
    with handlers.substitute(data=dict(params)):
        return nnx_module(name, module)(*args)


def decode(params: Mapping, z, latent_dim: int = DEFAULT_LATENT_DIM, hidden: int | Sequence[int] = DEFAULT_HIDDEN,
           decoder: nnx.Module | None = None) -> jax.Array:
    """Pixel probabilities ``sigmoid(decoder(z))`` ``(..., 64)`` under learned ``params`` (jaxic's or NumPyro's).

    ``params`` needs the ``"decoder$params"`` entry, as in ``compiled.model_params`` or
    ``NumPyroVAEResult.params``.

    Example:
        >>> probs = decode(compiled.model_params, jnp.zeros((1, 2)))
    """
    module = decoder if decoder is not None else default_decoder(latent_dim, hidden)
    return jax.nn.sigmoid(_apply("decoder", module, params, jnp.asarray(z, jnp.float32)))


def encode(params: Mapping, X, latent_dim: int = DEFAULT_LATENT_DIM, hidden: int | Sequence[int] = DEFAULT_HIDDEN,
           encoder: nnx.Module | None = None) -> tuple[jax.Array, jax.Array]:
    """``(loc, scale)`` of the hand-written guide's ``q(z | x)`` for each image, each ``(n, latent_dim)``.

    Example:
        >>> loc, _ = encode(result.params, X_test)
    """
    module = encoder if encoder is not None else default_encoder(latent_dim, hidden)
    return _apply("encoder", module, params, jnp.asarray(X, jnp.float32))


def prior_samples(params: Mapping, key: jax.Array, num: int, latent_dim: int = DEFAULT_LATENT_DIM,
                  hidden: int | Sequence[int] = DEFAULT_HIDDEN) -> jax.Array:
    """Pixel probabilities ``(num, 64)`` of ``num`` codes drawn from the prior ``N(0, I)`` and decoded.

    Showing probabilities rather than binary draws makes the learned shapes easier to read.

    Example:
        >>> plot_digits(prior_samples(compiled.model_params, jax.random.key(3), 32))
    """
    z = jax.random.normal(key, (num, latent_dim))
    return decode(params, z, latent_dim, hidden)


def plot_digits(images, ncols: int = 16, ax=None, title: str | None = None):
    """Tile ``(n, 64)`` images (values in [0, 1]) into one grid image on ``ax``; returns the axes.

    Example:
        >>> plot_digits(X_test[:32], ncols=16, title="test images")
    """
    import matplotlib.pyplot as plt

    images = np.asarray(images).reshape(-1, *IMAGE_SHAPE)
    n = images.shape[0]
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    h, w = IMAGE_SHAPE
    # One pixel of padding between digits, drawn mid-grey so binary digits stay distinguishable.
    grid = np.full((nrows * (h + 1) - 1, ncols * (w + 1) - 1), 0.5)
    for i, image in enumerate(images):
        r, c = divmod(i, ncols)
        grid[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = image
    if ax is None:
        _, ax = plt.subplots(figsize=(0.45 * ncols + 0.5, 0.45 * nrows + 0.6))
    ax.imshow(grid, cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def plot_reconstructions(X, reconstructions, num: int = 16, axes=None, title: str = "reconstructions"):
    """Originals (top row) above their reconstructions (bottom row) for the first ``num`` images.

    Example:
        >>> recon = decode(result.params, encode(result.params, X_test)[0])
        >>> plot_reconstructions(X_test, recon)
    """
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(2, 1, figsize=(0.45 * num + 0.5, 1.9))
    plot_digits(np.asarray(X)[:num], ncols=num, ax=axes[0], title=f"{title}: data")
    plot_digits(np.asarray(reconstructions)[:num], ncols=num, ax=axes[1], title=f"{title}: reconstruction")
    return axes


def plot_latent(latents, labels, ax=None, title: str = "latent means by digit"):
    """Scatter of 2-d latent codes (the first two coordinates) coloured by digit label.

    Example:
        >>> loc, _ = encode(result.params, X_test)
        >>> plot_latent(loc, y_test)
    """
    import matplotlib.pyplot as plt

    latents, labels = np.asarray(latents), np.asarray(labels)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4.3))
    points = ax.scatter(latents[:, 0], latents[:, 1], c=labels, cmap="tab10", vmin=-0.5, vmax=9.5, s=8)
    ax.figure.colorbar(points, ax=ax, ticks=range(10), label="digit")
    ax.set(xlabel="$z_1$", ylabel="$z_2$", title=title)
    return ax


__all__ = ["matched_inference_network", "load_digits_binary", "Decoder", "Encoder", "default_decoder", "default_encoder", "vae", "vae_numpyro",
           "vae_guide", "NumPyroVAEResult", "train_numpyro_vae", "numpyro_vae_log_weights",
           "numpyro_vae_heldout_elbo", "numpyro_vae_log_likelihood", "decode", "encode", "prior_samples",
           "plot_digits", "plot_reconstructions", "plot_latent"]
