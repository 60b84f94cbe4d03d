"""Classifier two-sample test (C2ST) between posterior draws and reference draws.

The protocol of the sbibm benchmark (Lueckmann et al. 2021): z-score both samples with the
reference's mean and standard deviation, train scikit-learn's ``MLPClassifier`` (ReLU, two
hidden layers of ``10 * dim`` units, Adam, up to 10000 iterations) to tell them apart, and
report its mean held-out accuracy over ``n_folds`` shuffled cross-validation folds.
0.5: indistinguishable; 1.0: disjoint.

Example:
    >>> jaxic.diagnostics.c2st(post.resample(key, 1000), reference_draws)
    0.51
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from jaxic.errors import JaxicError, MissingDependencyError
from jaxic.inference.posterior import ProposalDraws


def _sklearn():
    try:
        from sklearn.model_selection import StratifiedKFold, cross_val_score
        from sklearn.neural_network import MLPClassifier
    except ImportError:
        raise MissingDependencyError('c2st needs scikit-learn: pip install "jaxic[test]" (or scikit-learn '
                                     'itself)') from None
    return MLPClassifier, StratifiedKFold, cross_val_score


def _as_matrix(x: Any, name: str, order: Sequence[str] | None) -> tuple[np.ndarray, list[str], list[str]]:
    """``(num_draws, D)`` from an array ``(num_draws, *shape)`` or a dict of sites, its sites and column labels."""
    if isinstance(x, ProposalDraws):  # unweighted already: compare the draws themselves
        if x.batch_shape:
            raise JaxicError(f"{name} holds draws for {x.batch_shape[0]} observation sets; compare one set at a "
                             f"time: {name}[i].")
        x = x.samples if order is None else {k: x.samples[k] for k in order if k in x.samples}
    if hasattr(x, "log_weights") and hasattr(x, "samples"):
        raise JaxicError(f"{name} is a weighted jaxic.Posterior; C2ST compares unweighted draws: pass "
                         "post.resample(key, num) (a dict of sites).")
    if isinstance(x, Mapping):
        keys = list(x) if order is None else list(order)
        if set(keys) != set(x):
            raise JaxicError(f"{name} has sites {sorted(x)} but the reference has {sorted(keys)}; "
                             "give the same sites.")
        parts = [np.asarray(x[k], np.float64) for k in keys]
        lengths = {k: p.shape[0] if p.ndim else None for k, p in zip(keys, parts)}
        if None in lengths.values() or len(set(lengths.values())) != 1:
            raise JaxicError(f"{name}'s sites need one leading draw axis of the same length; got {lengths}.")
        cols, labels = [], []
        for k, p in zip(keys, parts):
            flat = p.reshape(p.shape[0], -1)
            cols.append(flat)
            labels += [k] if flat.shape[1] == 1 else [f"{k}[{i}]" for i in range(flat.shape[1])]
        return np.concatenate(cols, axis=1), keys, labels
    a = np.asarray(x, np.float64)
    if a.ndim == 0:
        raise JaxicError(f"{name} is a scalar; give draws with a leading draw axis, shape (num_draws, *shape).")
    a = a.reshape(a.shape[0], -1)
    return a, [], [f"column {i}" for i in range(a.shape[1])]


def c2st(draws: Any, reference: Any, *, seed: int = 0, n_folds: int = 5, n_jobs: int | None = None) -> float:
    """Cross-validated accuracy of a classifier telling ``draws`` from ``reference``.

    ``draws`` and ``reference`` are unweighted samples: arrays ``(num_draws, *shape)``,
    dicts of sites with such arrays (flattened and concatenated in the reference's site
    order) or raw proposal draws (:class:`jaxic.ProposalDraws` of one observation set, its
    sites that the reference has); their sizes may differ. Follows sbibm's protocol (see the
    module docstring) with stratified ``n_folds``-fold cross-validation shuffled by ``seed`` (also the
    classifier's seed). ``n_jobs`` trains that many folds at once in separate processes
    (scikit-learn's convention: ``None`` one, ``-1`` one per core); each fold's classifier is
    seeded alike, so the score does not depend on it. Needs scikit-learn.

    Example:
        >>> acc = jaxic.diagnostics.c2st(post.resample(jax.random.key(0), 1000), {"mu": exact_draws})
        >>> acc < 0.55          # close to chance: the posterior matches the reference
        >>> jaxic.diagnostics.c2st(draws, reference_draws, n_jobs=-1)   # folds on every core
    """
    if int(n_folds) != n_folds or n_folds < 2:
        raise JaxicError(f"n_folds must be an integer >= 2, got {n_folds!r}.")
    if n_jobs is not None and (isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs == 0):
        raise JaxicError(f"n_jobs must be None (one process), a positive number of processes or -1 (one per core), "
                         f"got {n_jobs!r}.")
    as_sites = lambda x: isinstance(x, (Mapping, ProposalDraws))
    if as_sites(draws) != as_sites(reference):
        raise JaxicError("give draws and reference in the same form: both arrays or both dicts of sites.")
    ref, order, labels = _as_matrix(reference, "reference", None)
    x, _, _ = _as_matrix(draws, "draws", order or None)
    if x.shape[1] != ref.shape[1]:
        raise JaxicError(f"draws have {x.shape[1]} elements per draw and the reference {ref.shape[1]}; "
                         "they must describe the same parameters.")
    for name, a in (("draws", x), ("reference", ref)):
        if a.shape[0] < n_folds:
            raise JaxicError(f"{name} has {a.shape[0]} draws; {n_folds}-fold cross-validation needs at least "
                             f"{n_folds} of each.")
        bad = ~np.all(np.isfinite(a), axis=0)
        if bad.any():
            raise JaxicError(f"{name} has non-finite values in {[labels[i] for i in np.flatnonzero(bad)]}; "
                             "drop those draws first.")
    mean, std = ref.mean(axis=0), ref.std(axis=0, ddof=1)
    constant = std == 0
    if constant.any():
        raise JaxicError(f"the reference is constant in {[labels[i] for i in np.flatnonzero(constant)]}: it cannot "
                         "be z-scored; leave those elements out.")
    ref, x = (ref - mean) / std, (x - mean) / std
    MLPClassifier, StratifiedKFold, cross_val_score = _sklearn()
    dim = ref.shape[1]
    classifier = MLPClassifier(activation="relu", hidden_layer_sizes=(10 * dim, 10 * dim), max_iter=10000,
                               solver="adam", random_state=seed)
    data = np.concatenate([ref, x])
    target = np.concatenate([np.zeros(ref.shape[0]), np.ones(x.shape[0])])
    folds = StratifiedKFold(n_splits=int(n_folds), shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(classifier, data, target, cv=folds, scoring="accuracy",
                                         n_jobs=None if n_jobs is None else int(n_jobs))))
