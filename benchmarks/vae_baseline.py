"""The NumPyro SVI baseline of the VAE experiment, its evaluators, plots and data.

Used by ``benchmarks/vae_digits.py`` and ``notebooks/03_amortized_vi.ipynb``; the models
themselves (:func:`jaxic.models.vae.vae`, ``vae_numpyro``, ``vae_guide``, the encoder and decoder)
are in ``jaxic.models.vae``.

Data: scikit-learn's copy of the UCI optical recognition of handwritten digits test set
(1797 images, 8x8, grey levels 0..16), see :func:`load_digits_binary`.

Example:
    >>> from benchmarks.vae_baseline import (load_digits_binary, numpyro_vae_heldout_elbo,
    ...                                      numpyro_vae_log_likelihood, train_numpyro_vae)
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
import optax
from flax import nnx
from numpyro import handlers
from numpyro.contrib.module import nnx_module
from numpyro.infer import SVI, Trace_ELBO

from jaxic.models.vae import (DEFAULT_HIDDEN, DEFAULT_LATENT_DIM, IMAGE_SHAPE, default_decoder, default_encoder,
                              vae_guide, vae_numpyro)

__all__ = ["load_digits_binary", "matched_inference_network", "hidden_sizes", "NumPyroVAEResult",
           "train_numpyro_vae", "numpyro_vae_log_weights", "numpyro_vae_heldout_elbo", "numpyro_vae_log_likelihood",
           "decode", "encode", "prior_samples", "plot_digits", "plot_reconstructions", "plot_latent"]


def load_digits_binary(test_fraction: float = 0.2, seed: int = 0):
    """Binarised scikit-learn digits split into train and test: ``(X_train, y_train, X_test, y_test)``.

    Each 8x8 image (grey levels 0..16) is scaled to [0, 1] and thresholded at 0.5 (a pixel is 1 when
    its grey level is above 8). The threshold is fixed rather than sampled (no dynamic
    binarisation), so the data and every log-likelihood on it are deterministic. The split is
    stratified by digit and fixed by ``seed``; with the default ``test_fraction`` there are 1437
    training and 360 test images. ``X`` is float32 ``(n, 64)`` in row-major pixel order, ``y``
    int32 digit labels.

    Needs scikit-learn (the data ships inside it, no download).

    Example:
        >>> X_train, y_train, X_test, y_test = load_digits_binary()
        >>> X_train.shape, X_test.shape
        ((1437, 64), (360, 64))
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # only this experiment needs it, so it is not a jaxic dependency
        raise ImportError("load_digits_binary needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    X = (digits.data / 16.0 > 0.5).astype(np.float32)
    y = digits.target.astype(np.int32)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_fraction, random_state=seed,
                                                        stratify=y)
    return X_train, y_train, X_test, y_test


def hidden_sizes(hidden: int | Sequence[int]) -> tuple[int, ...]:
    """Hidden layer sizes as a tuple (hashable: a static argument of the jitted evaluators).

    Example:
        >>> hidden_sizes(128), hidden_sizes([128, 64])
        ((128,), (128, 64))
    """
    return (int(hidden),) if isinstance(hidden, int) else tuple(int(h) for h in hidden)


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
    model_kwargs = {"batch_size": int(batch_size), "latent_dim": int(latent_dim), "hidden": hidden_sizes(hidden)}
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
                                    hidden_sizes(hidden))


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
