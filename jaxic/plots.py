"""Matplotlib helpers: weighted pair plots of posteriors and training curves.

They need only matplotlib (``pip install "jaxic[plots]"``), not arviz-plots.

Example:
    >>> jaxic.plots.plot_pair(post, ["x", "y"]).savefig("pair.png")
    >>> jaxic.plots.plot_training(compiled)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.special import softmax

from jaxic.errors import JaxicError, MissingDependencyError


def pyplot():
    """``matplotlib.pyplot``, or a :class:`MissingDependencyError` saying how to install it.

    Example:
        >>> plt = pyplot()
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError('plotting needs matplotlib: pip install "jaxic[plots]"') from None
    return plt


def _variables_from_posterior(post, sites):
    if post.batch_shape:
        raise JaxicError(f"this posterior has batch_shape {post.batch_shape} (one per observation set); "
                         "plot one of them: plot_pair(post[i], ...).")
    weights = np.asarray(post.weights, np.float64)
    out = []
    for name in sites:
        if name not in post.samples:
            raise JaxicError(f"no latent site '{name}'; sites are {sorted(post.samples)}.")
        x = np.asarray(post.samples[name], np.float64)
        ran = np.ones(x.shape, bool)
        if post.executed is not None and name in post.executed:
            m = np.asarray(post.executed[name])
            ran = np.broadcast_to(m.reshape(m.shape + (1,) * (x.ndim - m.ndim)), x.shape)
        x, ran = x.reshape(x.shape[0], -1), ran.reshape(x.shape[0], -1)
        for e in range(x.shape[1]):
            out.append((name if x.shape[1] == 1 else f"{name}[{e}]", x[:, e], ran[:, e]))
    return out, weights


def _variables_from_datatree(tree, sites):
    group = tree["posterior"]
    names = list(group.data_vars)
    if "observation" in group.dims:
        raise JaxicError("this DataTree holds several observation sets; select one first: "
                         "tree.sel(observation=i).")
    weights = None
    if "sample_stats" in tree.children and "log_weight" in tree["sample_stats"].data_vars:
        weights = softmax(np.asarray(tree["sample_stats"]["log_weight"].values, np.float64).reshape(-1))
    out = []
    for name in sites:
        if name not in names:
            raise JaxicError(f"no variable '{name}' in the posterior group; variables are {sorted(names)}.")
        da = group[name].transpose("chain", "draw", ...)
        x = np.asarray(da.values, np.float64)
        x = x.reshape(x.shape[0] * x.shape[1], -1)
        extra = [d for d in da.dims if d not in ("chain", "draw")]
        for e, index in enumerate(np.ndindex(*da.shape[2:])):
            label = name if not extra else f"{name}[{', '.join(map(str, index))}]"
            out.append((label, x[:, e], np.isfinite(x[:, e])))
    if weights is None:
        weights = np.full(out[0][1].shape[0], 1.0 / out[0][1].shape[0]) if out else np.zeros(0)
    return out, weights


def plot_pair(posterior, sites: Sequence[str] | None = None, *, bins: int = 40, max_variables: int = 8,
              figsize: tuple[float, float] | None = None):
    """Weighted pair plot: histograms on the diagonal, 2-d histograms below it.

    Takes a single-observation :class:`jaxic.Posterior` (importance weights are used as
    they are: no resampling noise) or a DataTree from :func:`jaxic.to_arviz` (weighted
    by its ``sample_stats.log_weight`` when present). Elements of multi-element sites
    become separate variables (at most ``max_variables`` in all). Returns the figure.

    Example:
        >>> fig = plot_pair(post, ["x", "y"])
        >>> fig = plot_pair(jaxic.to_arviz(post, resample=False), ["x", "y"])
    """
    plt = pyplot()
    if hasattr(posterior, "samples") and hasattr(posterior, "log_weights"):
        sites = list(posterior.samples) if sites is None else list(sites)
        variables, weights = _variables_from_posterior(posterior, sites)
    elif hasattr(posterior, "children") and "posterior" in posterior.children:
        sites = list(posterior["posterior"].data_vars) if sites is None else list(sites)
        variables, weights = _variables_from_datatree(posterior, sites)
    else:
        raise JaxicError(f"plot_pair takes a jaxic.Posterior or an ArviZ DataTree, not {type(posterior).__name__}.")
    if not variables:
        raise JaxicError("nothing to plot: no sites selected.")
    variables = variables[:max_variables]
    n = len(variables)
    size = figsize or (2.2 * n + 0.6, 2.2 * n + 0.6)
    fig, axes = plt.subplots(n, n, figsize=size, squeeze=False)
    for i, (label_i, xi, ran_i) in enumerate(variables):
        for j, (label_j, xj, ran_j) in enumerate(variables):
            ax = axes[i, j]
            if j > i:
                ax.set_visible(False)
                continue
            # An element that did not run in a particle has no value there: zero weight.
            ok = ran_i & ran_j & np.isfinite(xi) & np.isfinite(xj)
            w = np.where(ok, weights, 0.0)
            if w.sum() <= 0:
                continue
            if i == j:
                ax.hist(xi[ok], bins=bins, weights=w[ok], color="tab:blue", alpha=0.8, density=True)
                ax.set_yticks([])
            else:
                ax.hist2d(xj[ok], xi[ok], bins=bins, weights=w[ok], cmap="Blues")
            if i == n - 1:
                ax.set_xlabel(label_j)
            if j == 0 and i > 0:
                ax.set_ylabel(label_i)
    fig.tight_layout()
    return fig


def _moving_average(x: np.ndarray, window: int) -> np.ndarray:
    # NaN-aware (skipped steps record non-finite losses); edges average what they have.
    finite = np.isfinite(x)
    kernel = np.ones(window)
    total = np.convolve(np.where(finite, x, 0.0), kernel, mode="same")
    count = np.convolve(finite.astype(float), kernel, mode="same")
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def plot_training(compiled, window: int | None = None, *, figsize: tuple[float, float] = (6.0, 3.5)):
    """Training loss per step (raw and smoothed over ``window`` steps) and the validation
    loss, labelled with what they measure (``compiled.loss_label``, ``compiled.validation_label``:
    ``-log q(x | y)`` for forward KL; the negative ELBO of the current model for the ELBO, whose
    validation is a negative ELBO too, and for RWS). Returns the figure.

    Example:
        >>> jaxic.plots.plot_training(compiled).savefig("training.png")
    """
    plt = pyplot()
    loss = np.asarray(compiled.history.get("loss", []), np.float64)
    if loss.size == 0:
        raise JaxicError("no training history: this proposal has not been trained yet (compiled.train(n)).")
    window = max(1, loss.size // 50) if window is None else max(1, int(window))
    steps = np.arange(1, loss.size + 1)
    fig, ax = plt.subplots(figsize=figsize)
    ax.plot(steps, np.where(np.isfinite(loss), loss, np.nan), color="tab:blue", alpha=0.25, lw=0.8,
            label=f"training: {compiled.loss_label}")
    ax.plot(steps, _moving_average(loss, window), color="tab:blue", lw=1.6, label=f"smoothed ({window} steps)")
    val_steps, val = compiled.history.get("validation_step", []), compiled.history.get("validation_loss", [])
    if val:
        ax.plot(val_steps, val, "o-", color="tab:orange", ms=3.5, lw=1.2, label=f"validation: {compiled.validation_label}")
    finite = loss[np.isfinite(loss)]
    if finite.size > 10:  # early losses dwarf the rest: clip the view to where training is
        low, high = np.percentile(finite, [0.5, 99.0])
        if val:
            low, high = min(low, min(val)), max(high, max(val))
        ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    ax.set_xlabel("step")
    same = compiled.validation_label.startswith(compiled.loss_label) or compiled.validation_label.endswith(
        compiled.loss_label)
    ax.set_ylabel(compiled.loss_label if same or not val else f"{compiled.loss_label} · {compiled.validation_label}")
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig
