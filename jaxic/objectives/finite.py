"""Non-finite joint draws and data rows: find them, leave them out of the loss, report them.

A single NaN draw (e.g. ``Normal(jnp.log(x + 3), 1)`` with ``x < -3``) must not make a whole
step's loss and gradient NaN. Every objective therefore masks per trace (or per data point):
the bad draw's inputs are replaced by zeros *before* they reach the network (a ``jnp.where``
after the fact would still send NaN through the backward pass), its weight in the loss is zero,
and the loss is the mean over the kept draws. Each objective reports, in its metrics:

* ``"dropped"``: how many draws (joint traces or data points) this step left out;
* ``"dropped_site"``: the site most often at fault, an index into :func:`site_names`
  (latent sites, then observed ones), or -1 when nothing was dropped or no single site is
  to blame (a data point whose importance weights are all non-finite).

Example:
    >>> bad = nonfinite_sites(spec, tokens, observations)        # (B, num_sites) bool
    >>> keep, metrics = drop_summary(bad)
    >>> dropped_site_name(spec, metrics["dropped_site"])
    'y'
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxic.errors import ObservationError
from jaxic.tracing import Tokens, TraceSpec
from jaxic.tracing.spec import run_model, site_mask
from jaxic.tracing.traces import trace_to_tokens
from jaxic.parallel import shard_batch

# Above this share of dropped draws the integrator should warn (see drop_warning).
WARN_FRACTION = 0.01


def site_names(spec: TraceSpec) -> tuple[str, ...]:
    """The sites ``metrics["dropped_site"]`` indexes: latent sites in spec order, then observed ones.

    Example:
        >>> site_names(spec)
        ('x', 'z', 'y')
    """
    return tuple(s.name for s in spec.latents) + tuple(o.name for o in spec.observed)


def dropped_site_name(spec: TraceSpec, index) -> str | None:
    """The site named by ``metrics["dropped_site"]`` (``None`` for -1: nothing dropped or no single site).

    Example:
        >>> dropped_site_name(spec, info.metrics["dropped_site"])
        'y'
    """
    index = int(index)
    names = site_names(spec)
    if index < 0:
        return None
    if index >= len(names):
        raise ValueError(f"dropped_site={index} is out of range for the {len(names)} sites {list(names)}.")
    return names[index]


def drop_warning(spec: TraceSpec, dropped, total: int, dropped_site=None) -> str | None:
    """The warning to give when more than 1% of ``total`` draws were dropped, else ``None``.

    ``dropped``: counts (``metrics["dropped"]`` of one step or summed over steps);
    ``dropped_site``: the matching ``metrics["dropped_site"]`` values (the most frequent named
    one is reported).

    Example:
        >>> message = drop_warning(spec, history["dropped"], total=num_steps * batch_size,
        ...                        dropped_site=history["dropped_site"])
        >>> if message: warnings.warn(message)
    """
    count = int(np.sum(np.asarray(dropped)))
    if total <= 0 or count <= WARN_FRACTION * total:
        return None
    sites = [int(s) for s in np.atleast_1d(np.asarray(dropped_site if dropped_site is not None else -1))
             if int(s) >= 0]
    where = ""
    if sites:
        values, counts = np.unique(sites, return_counts=True)
        where = f" most often at site '{dropped_site_name(spec, values[np.argmax(counts)])}'"
    return (f"{count} of {total} draws ({100 * count / total:.1f}%) were dropped from training because they "
            f"were not finite (NaN or inf){where}. The proposal learns nothing about those draws; make the "
            "model finite there (e.g. guard log/sqrt arguments with jnp.clip or handlers.mask).")


def _any_rows(x: jax.Array, event_ndim: int) -> jax.Array:
    """``x`` reduced with ``any`` over its last ``event_ndim`` axes."""
    return jnp.any(x, axis=tuple(range(x.ndim - event_ndim, x.ndim))) if event_ndim else x


def nonfinite_sites(spec: TraceSpec, tokens: Tokens, observations: Mapping[str, jax.Array],
                    log_density_bad: jax.Array | None = None) -> jax.Array:
    """Per trace, which sites are not finite: ``(..., len(site_names(spec)))`` bool.

    A latent site is bad where an *executed* token has a non-finite value or Jacobian, an
    observed site where any element is non-finite; ``log_density_bad`` (same shape, from
    :func:`sample_joint_checked`) adds sites whose executed log density is not finite.

    Example:
        >>> bad = nonfinite_sites(spec, tokens, observations)   # tokens with a batch axis
    """
    token_bad = tokens.mask & ~(jnp.all(jnp.isfinite(tokens.value), axis=-1) & jnp.isfinite(tokens.log_jacobian))
    at_address = tokens.address[..., None] == jnp.arange(len(spec.latents))
    latent_bad = jnp.any(token_bad[..., None] & at_address, axis=-2)
    observed_bad = [_any_rows(~jnp.isfinite(observations[o.name]), len(o.shape)) for o in spec.observed]
    bad = jnp.concatenate([latent_bad] + [b[..., None] for b in observed_bad], axis=-1)
    return bad if log_density_bad is None else bad | log_density_bad


def drop_summary(bad_sites: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """From ``(B, S)`` bad-site flags: the traces to keep ``(B,)`` and ``{"dropped", "dropped_site"}``.

    ``dropped_site`` is the site that is the first bad one of the most dropped traces (-1: none).

    Example:
        >>> keep, metrics = drop_summary(nonfinite_sites(spec, tokens, observations))
    """
    dropped = jnp.any(bad_sites, axis=-1)
    first = jnp.argmax(bad_sites, axis=-1)
    counts = jnp.sum(jax.nn.one_hot(first, bad_sites.shape[-1], dtype=jnp.int32) * dropped[:, None], axis=0)
    site = jnp.where(jnp.any(dropped), jnp.argmax(counts), -1).astype(jnp.int32)
    return ~dropped, {"dropped": jnp.sum(dropped).astype(jnp.int32), "dropped_site": site}


def clean(tree, keep: jax.Array):
    """Zeros where a trace is dropped (``keep`` False, leading axis) or a value is not finite.

    Zeroed inputs keep the backward pass finite; the loss must still weight these traces zero.
    """
    def one(x):
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            return x
        k = keep.reshape(keep.shape + (1,) * (x.ndim - keep.ndim))
        return jnp.where(k & jnp.isfinite(x), x, jnp.zeros((), x.dtype))

    return jax.tree.map(one, tree)


def clean_tokens(tokens: Tokens, keep: jax.Array) -> Tokens:
    """``tokens`` of the kept traces; values of dropped traces and of skipped sites set to zero
    (a skipped site's value may be NaN and still reach the network multiplied by zero)."""
    executed = tokens.mask & keep[..., None]
    return tokens._replace(value=clean(tokens.value, executed), log_jacobian=clean(tokens.log_jacobian, executed))


def masked_mean(x: jax.Array, keep: jax.Array) -> jax.Array:
    """Mean of ``x`` over the kept entries; NaN when none is kept (the step is then skipped, visibly)."""
    keep = jnp.broadcast_to(keep, x.shape)
    return jnp.sum(jnp.where(keep, x, 0.0)) / jnp.sum(keep)


def _log_density_bad(spec: TraceSpec, trace: dict) -> jax.Array:
    bad = []
    for name in site_names(spec):
        site = trace[name]
        log_prob = site["fn"].log_prob(site["value"])
        executed = jnp.broadcast_to(site_mask(site["fn"], jnp.shape(log_prob)), jnp.shape(log_prob))
        bad.append(jnp.any(executed & ~jnp.isfinite(log_prob)))
    return jnp.stack(bad)


def sample_joint_checked(spec: TraceSpec, model, key: jax.Array, num_traces: int, sharding=None):
    """:func:`jaxic.tracing.sample_joint` (the same draws for the same key) plus, per trace and
    site, whether the executed log density is not finite: ``(tokens, observations, bad)``.

    Example:
        >>> tokens, observations, bad = sample_joint_checked(spec, model, key, 64)
        >>> bad.shape   # (64, len(site_names(spec)))
    """
    def one(k):
        trace = run_model(model, k)
        tokens, observations = trace_to_tokens(spec, trace)
        return tokens, observations, _log_density_bad(spec, trace)

    return jax.vmap(one)(shard_batch(jax.random.split(key, num_traces), sharding))


def data_rows_bad(data: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Per site, which rows of ``data`` (one row per data point) hold a non-finite value."""
    return {name: _any_rows(~jnp.isfinite(jnp.asarray(v)), jnp.ndim(v) - 1) for name, v in data.items()}


def check_data_finite(data: Mapping[str, object]) -> None:
    """Raise :class:`jaxic.ObservationError` naming the site and rows of ``data`` that are not finite.

    Example:
        >>> check_data_finite({"x": np.array([0.5, np.nan, 1.0])})
        Traceback (most recent call last):
        ObservationError: data['x'] has non-finite values (NaN or inf) in 1 row(s): [1]. ...
    """
    for name, value in data.items():
        value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.inexact) or value.ndim == 0:
            continue
        rows = np.flatnonzero(~np.isfinite(value.reshape(value.shape[0], -1)).all(axis=1))
        if rows.size:
            shown = rows[:10].tolist()
            more = f" (and {rows.size - 10} more)" if rows.size > 10 else ""
            raise ObservationError(
                f"data['{name}'] has non-finite values (NaN or inf) in {rows.size} row(s): {shown}{more}. "
                "Remove or impute those rows before compiling (e.g. data = {k: v[keep] for k, v in data.items()} "
                f"with keep = np.isfinite(data['{name}']).all(axis=tuple(range(1, data['{name}'].ndim)))).")
