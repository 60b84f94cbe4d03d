"""Bounds on eager model runs, so that a model that never ends on some draws stops with an error.

Models on the universal path run as plain Python (pilot runs, training traces, importance
sampling). A ``while`` loop that never ends for some draws would hang jaxic; instead every
eager run is bounded twice: :class:`limit_sites` stops it after too many sample sites, and
:func:`time_limit` after too many seconds (for loops that sample nothing). Both raise
:class:`~jaxic.errors.ModelError` naming the model's line where the run was stopped.

Example:
    >>> with time_limit(10.0, "a pilot run"):
    ...     trace = handlers.trace(handlers.seed(limit_sites(model, 500), 0)).get_trace()
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import sys
import sysconfig
import threading
import time
import traceback
import types
import warnings

from jax import monitoring
from numpyro.primitives import Messenger

from jaxic.errors import JaxicError, ModelError

DEFAULT_RUN_TIMEOUT = 10.0
"""Seconds one eager model run may take when no ``run_timeout`` is given (read at each run)."""

PILOT_MIN_SITES = 1000
"""Sample sites a pilot run may always reach before the spec's own bound is known."""

_FIX = ("A model on the universal path must end on every draw: bound the loop (e.g. "
        "jaxic.control_flow.bounded_while, or a maximum number of iterations)")


# --- where the user's code is -------------------------------------------------------------------

def _package_dirs(*names: str) -> tuple[str, ...]:
    dirs = []
    for name in names:
        try:
            found = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if found is not None and found.submodule_search_locations:
            dirs += [os.path.realpath(p) for p in found.submodule_search_locations]
    return tuple(d + os.sep for d in dirs)


_LIBRARY_DIRS = _package_dirs("jax", "jaxlib", "numpyro", "flax", "numpy", "scipy", "optax", "chex")
_JAXIC_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__))) + os.sep
# jaxic's example models are model code like the user's own.
_JAXIC_MODELS_DIR = os.path.join(_JAXIC_DIR, "models") + os.sep
_STDLIB_DIRS = tuple({os.path.realpath(sysconfig.get_paths()[k]) + os.sep for k in ("stdlib", "platstdlib")})


def _is_library(filename: str) -> bool:
    if filename.startswith("<frozen"):
        return True
    path = os.path.realpath(filename)
    if path.startswith(_JAXIC_DIR):
        return not path.startswith(_JAXIC_MODELS_DIR)
    if path.startswith(_LIBRARY_DIRS):
        return True
    installed = f"{os.sep}site-packages{os.sep}" in path or f"{os.sep}dist-packages{os.sep}" in path
    return path.startswith(_STDLIB_DIRS) and not installed


def user_frame(where: BaseException | types.FrameType | None = None) -> str:
    """Where the user's code was, as ``"file:line in function: `code`"``: the innermost
    frame outside jax, numpyro, flax, numpy, the standard library and jaxic's machinery.

    ``where`` is an exception (its traceback is walked), a frame (its stack, e.g. the frame
    a signal interrupted) or None (the caller's stack).

    Example:
        >>> try:
        ...     run_model(model, key)
        ... except Exception as exc:
        ...     print(user_frame(exc))      # model.py:12 in model: `while x > 0:`

    The file is shown relative to the current directory, or else to the ``sys.path`` entry it was
    imported from (``jaxic/models/control_flow.py``), and code of a Jupyter cell as ``<notebook cell>``,
    so messages, logs and saved notebooks do not carry the machine's folders; a file elsewhere keeps
    its full path.
    """
    if isinstance(where, BaseException):
        frames = traceback.extract_tb(where.__traceback__)
    else:
        frames = traceback.extract_stack(where)
    users = [f for f in frames if not _is_library(f.filename)]
    if not users:
        return "a line of the model"
    f = users[-1]
    return f"{_short_path(f.filename)}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`"


def _short_path(filename: str) -> str:
    if not os.path.isabs(filename):
        return filename
    path = os.path.realpath(filename)
    if os.path.basename(os.path.dirname(path)).startswith("ipykernel_"):
        return "<notebook cell>"  # Jupyter's per-kernel temporary file for a cell's code
    # The current directory first, then the deepest import root holding the file.
    bases = [os.getcwd(), *sorted((p or os.getcwd() for p in sys.path), key=len, reverse=True)]
    for base in bases:
        base = os.path.realpath(base)
        if os.path.isdir(base) and path.startswith(base.rstrip(os.sep) + os.sep):
            return os.path.relpath(path, base)
    # A package installed in editable mode is imported through a finder, not a sys.path entry:
    # its root is the folder above the outermost package (folders with an __init__.py) holding the file.
    root = os.path.dirname(path)
    while os.path.isfile(os.path.join(root, "__init__.py")):
        root = os.path.dirname(root)
    if root != os.path.dirname(path):
        return os.path.relpath(path, root)
    return filename


# --- a bound on the number of sample sites ------------------------------------------------------

class limit_sites(Messenger):
    """Count a run's sample sites and raise :class:`~jaxic.errors.ModelError` once more than
    ``max_sites`` have run, naming the model's line that reached the bound.

    Wrap the model itself (innermost), so that every sample message reaches the count.
    ``during`` says in the message what jaxic was doing (e.g. ``"importance sampling"``).

    Example:
        >>> bounded = limit_sites(model, max_sites=500)
        >>> trace = handlers.trace(handlers.seed(bounded, 0)).get_trace()
        >>> bounded.count                     # sample sites of the last run
    """

    def __init__(self, fn=None, max_sites: int = PILOT_MIN_SITES, during: str = "an eager model run"):
        if int(max_sites) < 1:
            raise JaxicError(f"max_sites_per_run must be a positive number of sample sites, got {max_sites}.")
        self.max_sites = int(max_sites)
        self.during = during
        self.count = 0
        super().__init__(fn)

    def __enter__(self):
        self.count = 0
        return super().__enter__()

    def process_message(self, msg):
        if msg["type"] != "sample":
            return
        self.count += 1
        if self.count > self.max_sites:
            raise ModelError(
                f"the model reached more than max_sites_per_run={self.max_sites} sample sites in one run "
                f"({self.during}) and was stopped at {user_frame()}. {_FIX}, or, if runs this long are "
                "intended, raise the bound (jaxic.compile(..., max_sites_per_run=...)).")


# --- a bound on the wall-clock time -------------------------------------------------------------

class _Stopped(BaseException):
    """Raised by the alarm inside the model; a BaseException so that the model's own
    ``except Exception`` cannot swallow it. Never leaves :func:`time_limit`."""

    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


# JAX compiles every new operation the first time it runs, eagerly too: a model's first run
# can spend seconds there. That time (and time jaxic pauses the clock for) is not the model's.
_COMPILE_EVENTS = frozenset({"/jax/core/compile/jaxpr_trace_duration",
                             "/jax/core/compile/jaxpr_to_mlir_module_duration",
                             "/jax/core/compile/backend_compile_duration"})
# Where JAX traces, lowers and compiles (the window before it reports a compilation's duration).
_COMPILER_FILES = tuple(os.path.join("jax", "_src", *f) for f in (("compiler.py",), ("interpreters", "mlir.py")))
_COMPILER_FUNCTIONS = frozenset({"_trace_for_jit", "_cached_lowering_to_hlo", "_cached_compilation"})
# Past this much wall-clock time (a multiple of the limit, or a minute more), even compiling is no excuse.
_SLACK, _SLACK_SECONDS = 10, 60.0


class _Clock:
    """The model's own time in the running :func:`time_limit`: wall-clock time less JAX
    compilations and paused stretches."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.monotonic()
        self.excluded = 0.0
        self.paused = False
        self.live = True

    def used(self) -> float:
        return time.monotonic() - self.start - self.excluded


_clock: _Clock | None = None  # the running limit (there is at most one: SIGALRM is process-wide)
_listening = threading.Event()
_warned = threading.Event()


def _on_duration(event: str, duration: float, **_) -> None:
    clock = _clock
    if clock is not None and not clock.paused and event in _COMPILE_EVENTS:
        clock.excluded += duration


def _compiling(frame) -> bool:
    # The alarm lands between bytecodes: right after a compilation, before JAX reports its duration.
    while frame is not None:
        code = frame.f_code
        if code.co_name in _COMPILER_FUNCTIONS or code.co_filename.endswith(_COMPILER_FILES):
            return True
        frame = frame.f_back
    return False


def _on_alarm(signum, frame) -> None:
    clock = _clock
    if clock is None or not clock.live:
        return
    used = clock.used()
    if time.monotonic() - clock.start < max(_SLACK * clock.seconds, clock.seconds + _SLACK_SECONDS):
        if used < clock.seconds:
            signal.setitimer(signal.ITIMER_REAL, max(clock.seconds - used, 1e-3))
            return
        if _compiling(frame):
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            return
    clock.live = False  # fire once: the model may catch what it can and carry on
    raise _Stopped(user_frame(frame))


def _timer_usable() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def time_limit(seconds: float | None, during: str = "an eager model run"):
    """Stop the code inside after ``seconds`` with a :class:`~jaxic.errors.ModelError` naming
    the model's line it was running.

    The seconds are wall-clock time less the time JAX spends compiling (a model's first run
    compiles each new operation) and less :func:`time_limit_paused` stretches. Uses
    ``SIGALRM`` (``signal.setitimer``), so it works in the main thread of a POSIX process;
    elsewhere it warns once and sets no limit. The previous ``SIGALRM`` handler and timer
    are restored afterwards. ``seconds`` of None, 0 or ``inf`` set no limit; a limit inside
    another one is left to the outer one.

    Example:
        >>> with time_limit(10.0, "a pilot run"):
        ...     trace = run_model(model, key)
    """
    global _clock
    if seconds is None or not 0 < seconds < float("inf") or _clock is not None:
        yield
        return
    if not _timer_usable():
        if not _warned.is_set():
            _warned.set()
            warnings.warn("jaxic: eager model runs have no time limit (run_timeout) here: it needs SIGALRM in the "
                          "main thread. A model that loops forever without sampling will hang; only "
                          "max_sites_per_run bounds the runs.", RuntimeWarning, stacklevel=3)
        yield
        return
    if not _listening.is_set():
        _listening.set()
        monitoring.register_event_duration_secs_listener(_on_duration)
    previous_handler = signal.signal(signal.SIGALRM, _on_alarm)
    clock = _clock = _Clock(float(seconds))
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, clock.seconds)
    try:
        yield
    except _Stopped as stop:
        raise ModelError(f"one run of the model took longer than run_timeout={seconds:g} s ({during}) and was "
                         f"stopped at {stop.where}. {_FIX}, or, if runs this long are intended, raise the "
                         "limit (jaxic.compile(..., run_timeout=...)).") from None
    finally:
        clock.live = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        _clock = None
        if previous_handler is not None:  # None: installed outside Python, and left in place by signal()
            signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:  # an outer timer keeps running (and fires at once if it is overdue)
            left = previous_delay - (time.monotonic() - clock.start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), previous_interval)


@contextlib.contextmanager
def time_limit_paused():
    """Stop the clock of the enclosing :func:`time_limit` (e.g. while jaxic itself decodes
    inside a model run), restarting it with the time that was left.

    Example:
        >>> with time_limit_paused():
        ...     tokens = decoder.decode(...)
    """
    clock = _clock
    if clock is None or clock.paused or not _timer_usable():
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, 0)
    clock.paused, start = True, time.monotonic()
    try:
        yield
    finally:
        clock.paused = False
        clock.excluded += time.monotonic() - start
        if clock.live and _clock is clock:
            signal.setitimer(signal.ITIMER_REAL, max(clock.seconds - clock.used(), 1e-3))


def resolve_timeout(run_timeout: float | None) -> float | None:
    """Seconds an eager run may take: :data:`DEFAULT_RUN_TIMEOUT` for None, no limit for 0 or ``inf``.

    Example:
        >>> resolve_timeout(None), resolve_timeout(0)      # (10.0, None)
    """
    if run_timeout is None:
        return DEFAULT_RUN_TIMEOUT
    run_timeout = float(run_timeout)
    if run_timeout < 0 or run_timeout != run_timeout:
        raise JaxicError(f"run_timeout must be a number of seconds >= 0 (0 or inf: no limit), got {run_timeout}.")
    return run_timeout if 0 < run_timeout < float("inf") else None
