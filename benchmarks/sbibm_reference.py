"""sbibm 1.1.0's stored observations, true parameters and reference posterior draws, read from its wheel.

sbibm ships, for each task and observation k = 1..10, ``sbibm/tasks/<task>/files/num_observation_<k>/``
with ``observation.csv``, ``true_parameters.csv`` and ``reference_posterior_samples.csv.bz2``
(10,000 draws); ``bernoulli_glm_raw`` reads the ``bernoulli_glm`` folder's ``observation_raw.csv``, and
``slcp_distractors`` the ``slcp`` folder's ``observation_distractors.csv`` (its reference posterior is slcp's).
:func:`reference_files` fetches the wheel once with pip into a cache folder (default
``$SBIBM_CACHE`` or ``~/.cache/jaxic/sbibm``) and unzips it; the readers never download.

Example:
    >>> reference_files()                      # once: pip download + unzip
    >>> reference_posterior("two_moons", 1).shape
    (10000, 2)
"""

from __future__ import annotations

import bz2
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from jaxic.errors import IndexOutOfRangeError, JaxicError

__all__ = ["SBIBM_VERSION", "NUM_OBSERVATIONS", "default_cache_dir", "reference_files", "task_folder",
           "observation", "true_parameters", "reference_posterior", "distractor_mixture"]

SBIBM_VERSION = "1.1.0"
NUM_OBSERVATIONS = 10
_UNPACKED = f"sbibm-{SBIBM_VERSION}"
# sbibm task names whose files live in another task's folder, with the observation file they read.
_ALIASES = {"bernoulli_glm_raw": ("bernoulli_glm", "observation_raw.csv"),
            "slcp_distractors": ("slcp", "observation_distractors.csv")}
_DISTRACTORS_CACHE = "slcp_distractors_mixture.npz"


def default_cache_dir() -> Path:
    """``$SBIBM_CACHE`` if set, else ``~/.cache/jaxic/sbibm``.

    Example:
        >>> default_cache_dir().name
        'sbibm'
    """
    return Path(os.environ.get("SBIBM_CACHE", Path.home() / ".cache" / "jaxic" / "sbibm"))


def _pip_command(cache_dir: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", f"sbibm=={SBIBM_VERSION}", "--no-deps", "-d",
            str(cache_dir / "wheel")]


def _missing(path: Path, cache_dir: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"sbibm {SBIBM_VERSION}'s reference file {path} is missing; fetch it with "
        f"benchmarks.sbibm_reference.reference_files({str(cache_dir)!r}), which runs "
        f"`{' '.join(_pip_command(cache_dir))}` and unzips the wheel into {cache_dir / _UNPACKED}.")


def reference_files(cache_dir: str | Path | None = None, download: bool = True) -> Path:
    """The unpacked sbibm wheel (the folder holding ``sbibm/tasks``), fetched with pip if absent.

    With ``download=False`` a missing cache raises FileNotFoundError (naming the pip command) instead.

    Example:
        >>> (reference_files() / "sbibm" / "tasks" / "sir").is_dir()
        True
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache_dir / _UNPACKED
    if (root / "sbibm" / "tasks").is_dir():
        return root
    if not download:
        raise _missing(root / "sbibm" / "tasks", cache_dir)
    wheels = sorted((cache_dir / "wheel").glob(f"sbibm-{SBIBM_VERSION}-*.whl"))
    if not wheels:
        done = subprocess.run(_pip_command(cache_dir), capture_output=True, text=True)
        wheels = sorted((cache_dir / "wheel").glob(f"sbibm-{SBIBM_VERSION}-*.whl"))
        if done.returncode != 0 or not wheels:
            raise FileNotFoundError(
                f"could not fetch sbibm {SBIBM_VERSION}: `{' '.join(_pip_command(cache_dir))}` exited with "
                f"{done.returncode}: {done.stderr.strip()[-500:]}; run it by hand (or unzip the wheel into "
                f"{root}) and retry.")
    partial = cache_dir / (_UNPACKED + ".partial")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        wheel.extractall(partial)
    # Rename last, so an interrupted unzip never passes for a complete cache.
    partial.rename(root)
    return root


def task_folder(task: str, cache_dir: str | Path | None = None) -> Path:
    """``sbibm/tasks/<task>/files`` in the cache (``bernoulli_glm`` for ``bernoulli_glm_raw``); never downloads.

    Example:
        >>> task_folder("two_moons").name
        'files'
    """
    if not isinstance(task, str) or not task:
        raise JaxicError(f"task must be an sbibm task name such as 'two_moons', got {task!r}.")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    tasks = reference_files(cache, download=False) / "sbibm" / "tasks"
    folder = _ALIASES.get(task, (task, None))[0]
    path = tasks / folder / "files"
    if not path.is_dir():
        known = sorted(p.name for p in tasks.iterdir() if (p / "files").is_dir()) + sorted(_ALIASES)
        raise JaxicError(f"sbibm {SBIBM_VERSION} has no task {task!r} (no folder {path}); known tasks: {known}.")
    return path


def _observation_dir(task: str, k: int, cache_dir) -> Path:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise JaxicError(f"observation number k must be an int in 1..{NUM_OBSERVATIONS}, got {k!r} of type "
                         f"{type(k).__name__}.")
    if not 1 <= k <= NUM_OBSERVATIONS:
        raise IndexOutOfRangeError(f"observation number k={k} is out of range for task {task!r}: sbibm numbers its "
                                   f"observations 1..{NUM_OBSERVATIONS} (1-based).")
    return task_folder(task, cache_dir) / f"num_observation_{int(k)}"


def _read_csv(path: Path, cache_dir) -> np.ndarray:
    if not path.is_file():
        raise _missing(path, Path(cache_dir) if cache_dir is not None else default_cache_dir())
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt") as handle:
        # sbibm writes one header row of column names, then float rows.
        return np.loadtxt(handle, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2)


def observation(task: str, k: int, cache_dir: str | Path | None = None) -> np.ndarray:
    """sbibm's observation ``k`` (1..10) of ``task``, shape (obs_dim,), float32.

    Example:
        >>> observation("sir", 1)
        array([  0.,   1., 352.,  40.,   3.,   0.,   0.,   0.,   0.,   0.], dtype=float32)
    """
    name = _ALIASES.get(task, (task, "observation.csv"))[1] if isinstance(task, str) else None
    return _read_csv(_observation_dir(task, k, cache_dir) / name, cache_dir)[0]


def true_parameters(task: str, k: int, cache_dir: str | Path | None = None) -> np.ndarray:
    """The parameters sbibm simulated observation ``k`` from, shape (theta_dim,), float32.

    Example:
        >>> true_parameters("two_moons", 1)
        array([-0.8176656, -0.5756806], dtype=float32)
    """
    return _read_csv(_observation_dir(task, k, cache_dir) / "true_parameters.csv", cache_dir)[0]


def reference_posterior(task: str, k: int, cache_dir: str | Path | None = None) -> np.ndarray:
    """sbibm's 10,000 reference posterior draws for observation ``k``, shape (10000, theta_dim), float32.

    Example:
        >>> reference_posterior("lotka_volterra", 1).shape
        (10000, 4)
    """
    return _read_csv(_observation_dir(task, k, cache_dir) / "reference_posterior_samples.csv.bz2", cache_dir)


def distractor_mixture(cache_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """The fixed mixture ``slcp_distractors`` draws its 92 distractors from, and the permutation of the 100 values.

    sbibm stores them as pickled torch objects (``sbibm/tasks/slcp/files/gmm.torch``: 20 equally weighted
    multivariate Student-t components with 2 degrees of freedom, and ``permutation_idx.torch``). The first call
    converts them with torch and pyro (the ``bench`` extra) into ``slcp_distractors_mixture.npz`` in the cache
    folder; later calls read that file and need neither. Keys: ``logits`` (20,), ``df`` (20,), ``loc`` (20, 92),
    ``scale_tril`` (20, 92, 92), ``permutation`` (100,): the simulator returns ``concat(slcp data, distractors)``
    indexed by ``permutation``.

    Example:
        >>> distractor_mixture()["loc"].shape
        (20, 92)
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    converted = cache / _DISTRACTORS_CACHE
    if not converted.is_file():
        folder = task_folder("slcp", cache)
        try:
            import pyro  # noqa: F401  (the pickled mixture is a pyro distribution)
            import torch
        except ImportError as exc:
            raise JaxicError(f"slcp_distractors' mixture is stored by sbibm as pickled torch objects in {folder}; "
                             f"converting it once needs torch and pyro-ppl ({exc}). Install the bench extra "
                             "(pip install -e '.[bench]') and run again; afterwards the converted "
                             f"{converted} is read without them.") from exc
        # sbibm's own files from its pinned wheel: the only pickles this project ever loads.
        mixture = torch.load(folder / "gmm.torch", weights_only=False)
        permutation = torch.load(folder / "permutation_idx.torch", weights_only=False)
        student = mixture.component_distribution.base_dist
        arrays = {"logits": mixture.mixture_distribution.logits, "df": student.df, "loc": student.loc,
                  "scale_tril": student.scale_tril}
        arrays = {name: value.detach().numpy().astype(np.float32) for name, value in arrays.items()}
        arrays["permutation"] = permutation.numpy().astype(np.int32)
        partial = converted.with_name(converted.name + ".partial.npz")
        np.savez(partial, **arrays)
        partial.replace(converted)  # renamed last, so a half-written file never passes for the cache
    with np.load(converted) as stored:
        return {name: stored[name] for name in stored.files}
