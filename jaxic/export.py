"""Export importance-sampling posteriors to ArviZ (an xarray ``DataTree``).

Needs ``pip install "jaxic[arviz]"`` (arviz-base).

Example:
    >>> tree = jaxic.to_arviz(post, jax.random.key(0), model=compiled, observations={"obs": 25.0})
    >>> tree["posterior"]["x"].mean(("chain", "draw"))
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from numpyro import handlers
from scipy.special import logsumexp

from jaxic.diagnostics.weights import ess, resample_indices
from jaxic.errors import JaxicError, MissingDependencyError
from jaxic.inference.posterior import ProposalDraws

BATCH_DIM = "observation"
"""Name of the dimension over observation sets when a batched posterior is exported."""


def _from_dict():
    try:
        from arviz_base import from_dict
    except ImportError:
        raise MissingDependencyError('exporting to ArviZ needs arviz-base: pip install "jaxic[arviz]"') from None
    return from_dict


def _variable_name(site: str) -> str:
    # DataTree forbids '/' in variable names (it separates groups); jaxic's rejection_sample
    # addresses such as "x[0]/v" contain it.
    return site.replace("/", ".")


def _bound_model(model) -> Callable | None:
    if model is None:
        return None
    bound = getattr(model, "bound_model", None)  # a CompiledModel carries its model with arguments bound
    if bound is not None:
        return bound
    if callable(model):
        return model
    raise JaxicError(f"model must be a jaxic.CompiledModel or a model callable with its arguments bound, "
                     f"not {type(model).__name__}.")


def plate_dims(model, key: jax.Array | None = None) -> dict[str, list[str | None]]:
    """Per sample site, the name of the plate over each axis of its value (None where no plate).

    Runs the model once (seeded, eagerly). ``model`` is a :class:`jaxic.CompiledModel` or a
    callable taking no arguments.

    Example:
        >>> plate_dims(functools.partial(pedagogical_plate, M=3))["nuisance"]
        ['nuisance_plate']
    """
    model = _bound_model(model)
    key = jax.random.key(0) if key is None else key
    trace = handlers.trace(handlers.seed(model, key)).get_trace()
    out = {}
    for name, msg in trace.items():
        if msg["type"] != "sample":
            continue
        shape = tuple(np.shape(msg["value"]))
        event_ndim = len(getattr(msg["fn"], "event_shape", ()))
        names: list[str | None] = [None] * len(shape)
        for frame in msg.get("cond_indep_stack", ()):
            axis = len(shape) - event_ndim + frame.dim  # frame.dim counts from the right of the batch dims
            fits = shape[axis] in (frame.size, getattr(frame, "subsample_size", None)) if axis >= 0 else False
            if fits and axis < len(shape) - event_ndim:
                names[axis] = frame.name
        out[name] = names
    return out


def _site_dims(name: str, shape: tuple[int, ...], plates: Mapping[str, list], dims: Mapping[str, Sequence[str]],
               sizes: dict[str, int]) -> list[str]:
    """Dimension names of one variable's own axes; plate names where they fit, ``{site}_dim_{i}`` else."""
    if name in dims:
        given = list(dims[name])
        if len(given) != len(shape):
            raise JaxicError(f"dims['{name}'] names {len(given)} dimensions but the site has shape {shape}.")
        return given
    found = plates.get(name, [])
    out = []
    for i, size in enumerate(shape):
        plate = found[i] if len(found) == len(shape) else None
        # A plate name is a shared dimension: only reuse it at the same length.
        if plate is None or sizes.setdefault(plate, size) != size:
            plate = f"{_variable_name(name)}_dim_{i}"
        out.append(plate)
    return out


def to_arviz(posterior, key: jax.Array | None = None, num_draws: int | None = None, resample: bool = True,
             sites: Sequence[str] | None = None, *, model=None, observations: Mapping[str, Any] | None = None,
             dims: Mapping[str, Sequence[str]] | None = None, coords: Mapping[str, Any] | None = None):
    """An ArviZ ``DataTree`` of a :class:`jaxic.Posterior`.

    Groups:

    * ``posterior``: one chain; ``resample=True`` (default) gives ``num_draws`` (default: the
      number of particles) unweighted draws by multinomial resampling with ``key`` (default
      ``jax.random.key(0)``), ready for any ArviZ function; ``resample=False`` gives the raw
      particles, whose weights are then in ``sample_stats``.
    * ``sample_stats``: ``log_joint`` and ``log_proposal`` of each draw, and with
      ``resample=False`` also ``log_weight``, the normalised log importance weights
      (``exp`` sums to 1 over draws).
    * ``observed_data``: the ``observations`` if given.

    Raw proposal draws (:class:`jaxic.ProposalDraws`, from ``compiled.proposal_draws``) are exported
    as they are, with no resampling, no weights and no evidence in the attributes.

    Site dimensions take the names of the model's plates when ``model`` (a
    :class:`jaxic.CompiledModel` or a bound model callable) is given, otherwise
    ``{site}_dim_{i}``; ``dims`` overrides per site. A batched posterior (one per
    observation set) gets an extra ``observation`` dimension after ``draw``, each set with
    its own draws; export a single one with ``post[i]``. Elements that did not run in a
    particle (stochastic control flow) are NaN. ``'/'`` in site names becomes ``'.'``
    (DataTree reserves ``'/'``).

    Example:
        >>> tree = jaxic.to_arviz(post, jax.random.key(0), model=compiled, observations={"obs": 25.0})
        >>> weighted = jaxic.to_arviz(post, resample=False)        # particles + sample_stats.log_weight
    """
    from_dict = _from_dict()
    if not (hasattr(posterior, "samples") and hasattr(posterior, "log_weights")):
        raise JaxicError(f"to_arviz takes a jaxic.Posterior, not {type(posterior).__name__}.")
    batch_shape = tuple(posterior.batch_shape)
    if len(batch_shape) > 1:
        raise JaxicError(f"posterior batch_shape {batch_shape} has more than one axis; export slices of it.")
    sites = list(posterior.samples) if sites is None else list(sites)
    unknown = [s for s in sites if s not in posterior.samples]
    if unknown:
        raise JaxicError(f"{unknown} are not latent sites of this posterior; its sites are "
                         f"{sorted(posterior.samples)}.")
    renamed = {_variable_name(s) for s in sites}
    if len(renamed) != len(sites):
        raise JaxicError("site names collide once '/' is replaced by '.'; export fewer sites.")
    dims = dict(dims or {})
    plates = plate_dims(model) if model is not None else {}
    nb = len(batch_shape)
    num_particles = posterior.num_samples
    log_w = np.asarray(posterior.log_weights, np.float64)
    executed = posterior.executed or {}
    raw = isinstance(posterior, ProposalDraws)  # already unweighted: resampling would only add repeats
    if raw and num_draws is not None and num_draws != num_particles:
        raise JaxicError(f"num_draws={num_draws}: raw proposal draws are exported as they are (all "
                         f"{num_particles}); draw that many with compiled.proposal_draws(key, observations, "
                         f"{num_draws}).")
    if resample and not raw:
        num_draws = num_particles if num_draws is None else int(num_draws)
        index = resample_indices(jax.random.key(0) if key is None else key, log_w, num_draws)
        take = lambda x: np.take_along_axis(np.asarray(x), index.reshape(index.shape + (1,) * (np.ndim(x) - nb - 1)),
                                            axis=nb)
    elif num_draws is not None and num_draws != num_particles:
        raise JaxicError("num_draws applies to resampled draws; with resample=False every particle is exported.")
    else:
        take = np.asarray
    stats = {"log_joint": take(posterior.log_joint), "log_proposal": take(posterior.log_proposal)}
    if not resample and not raw:
        stats["log_weight"] = log_w - logsumexp(log_w, axis=-1, keepdims=True)

    # Arrays arrive as (batch..., draw, *site); ArviZ wants (chain, draw, [observation], *site).
    to_layout = lambda x: np.moveaxis(x, nb, 0)[None] if nb else x[None]
    sizes: dict[str, int] = {}
    data: dict[str, dict] = {"posterior": {}, "sample_stats": {}}
    var_dims: dict[str, list[str]] = {}
    lead = [BATCH_DIM] if nb else []
    for name in sites:
        x = take(posterior.samples[name])
        if name in executed:
            ran = take(executed[name])
            ran = ran.reshape(ran.shape + (1,) * (x.ndim - ran.ndim))
            if not ran.all():
                x = np.where(ran, x.astype(np.result_type(x.dtype, np.float32)), np.nan)
        var = _variable_name(name)
        data["posterior"][var] = to_layout(x)
        var_dims[var] = lead + _site_dims(name, x.shape[nb + 1:], plates, dims, sizes)
    for k, v in stats.items():
        data["sample_stats"][k] = to_layout(v)
        var_dims[k] = list(lead)
    if observations is not None:
        data["observed_data"] = {}
        for name, value in observations.items():
            value = np.asarray(value)
            var = _variable_name(name)
            own = value.shape[nb:] if nb and value.shape[:1] == batch_shape else value.shape
            data["observed_data"][var] = value
            var_dims[var] = (lead if value.ndim > len(own) else []) + _site_dims(name, own, plates, dims, sizes)
    attrs = {"posterior": {"inference_library": "jaxic", "num_particles": int(num_particles),
                           "resampled": int(bool(resample) and not raw), "importance_weighted": int(not raw)}}
    if not raw:
        attrs["posterior"].update(ess=np.asarray(ess(log_w)).tolist(),
                                  log_evidence=(logsumexp(log_w, axis=-1) - np.log(num_particles)).tolist())
    return from_dict(data, dims=var_dims, coords=dict(coords or {}), attrs=attrs)


SBC_GROUP = "prior_sbc"
"""Group of :func:`sbc_to_arviz`'s ``DataTree``: the group arviz-plots' ``plot_ecdf_pit`` reads by default."""


def sbc_to_arviz(result, *, dims: Mapping[str, Sequence[str]] | None = None, coords: Mapping[str, Any] | None = None):
    """An ArviZ ``DataTree`` of SBC ranks (a :class:`jaxic.diagnostics.SBCResult`).

    One group, ``prior_sbc``, holding per site its normalised ranks in (0, 1) with
    dimensions ``(chain, draw, *site dims)``: one chain, one draw per simulated data set,
    the layout arviz-plots' ``plot_ecdf_pit`` (default group ``prior_sbc``, sample dims
    ``chain`` and ``draw``) and arviz-stats' ``ecdf`` with ``pit=True`` read. The ranks of
    ``log p(x, y)`` are the variable ``log_joint``; ``'/'`` in site names becomes ``'.'``.
    Site dimensions are ``{site}_dim_{i}`` unless ``dims`` names them. The group's attributes
    carry ``num_draws``, ``weighted``, ``alpha``, ``passed`` and ``failing_sites``.

    A rank is NaN where the site did not run in that data set or its draws were not
    finite; ArviZ's ECDF counts a NaN as larger than every point, so such ranks bend its
    curve: a warning names the sites that have them (select the finite ones, or plot with
    ``result.plot(kind="ecdf")``, which leaves them out).

    Example:
        >>> tree = jaxic.export.sbc_to_arviz(jaxic.diagnostics.sbc(compiled, jax.random.key(0)))
        >>> arviz_plots.plot_ecdf_pit(tree)
    """
    from jaxic.diagnostics.calibration import LOG_JOINT, SBCResult

    if not isinstance(result, SBCResult):
        raise JaxicError(f"sbc_to_arviz takes a jaxic.diagnostics.SBCResult (from sbc() or SBCResult.from_ranks), "
                         f"not {type(result).__name__}.")
    from_dict = _from_dict()
    names = {name: "log_joint" if name == LOG_JOINT else _variable_name(name) for name in result.ranks}
    if len(set(names.values())) != len(names):
        raise JaxicError(f"SBC variable names collide in ArviZ form (LOG_JOINT becomes 'log_joint', '/' becomes "
                         f"'.'): {sorted(names)}; rename the site or build the result without log_density.")
    dims = dict(dims or {})
    unknown = set(dims) - set(result.ranks) - set(names.values())
    if unknown:
        raise JaxicError(f"dims names {sorted(unknown)}, which have no SBC ranks; ranks are given for "
                         f"{sorted(result.ranks)}.")
    group, var_dims, sizes, missing = {}, {}, {}, []
    for name, u in result.ranks.items():
        var = names[name]
        group[var] = np.asarray(u, np.float64)[None]
        given = {k: dims[k] for k in (name, var) if k in dims}
        var_dims[var] = _site_dims(name, u.shape[1:], {}, {name: next(iter(given.values()))} if given else {}, sizes)
        bad = int(np.any(np.isnan(u).reshape(u.shape[0], -1), axis=1).sum())
        if bad:
            missing.append(f"'{name}' in {bad} of {result.num_datasets}")
    if missing:
        import warnings

        warnings.warn(f"SBC ranks are NaN (site not run, or non-finite draws) for {', '.join(missing)} data sets; "
                      "ArviZ's ECDF counts NaN above every point, so its PIT-ECDF plot of these variables is biased "
                      "low: select the finite ranks first, or use result.plot(kind='ecdf').", stacklevel=2)
    attrs = {SBC_GROUP: {"inference_library": "jaxic", "num_draws": int(result.num_draws),
                         "weighted": int(result.weighted), "alpha": float(result.alpha),
                         "passed": int(result.passed), "failing_sites": list(result.failing_sites)}}
    return from_dict({SBC_GROUP: group}, dims=var_dims, coords=dict(coords or {}), attrs=attrs)
