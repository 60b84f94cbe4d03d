"""Training callbacks: one :class:`TrainingRecord` per chunk of steps, and ready-made writers.

``compiled.train(..., callbacks=[fn])`` (and ``jaxic.compile(..., callbacks=...)``) calls each
``fn(record)`` after every chunk of ``TrainConfig.steps_per_call`` steps. A callback that
returns ``True`` stops training after that chunk (the state, step and history stay in
agreement, as after Ctrl-C); anything else it returns is ignored, and an exception it raises
propagates out of ``train``.

Example:
    >>> log = jaxic.callbacks.CSVLogger("runs/ring.csv")
    >>> compiled.train(1000, callbacks=[log, lambda r: r.loss < 0.5])   # stop once the loss is below 0.5
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import NamedTuple

from jaxic.errors import JaxicError, MissingDependencyError

__all__ = ["TrainingRecord", "CSVLogger", "TensorBoardLogger"]

_FIXED = ("step", "loss", "validation_loss", "learning_rate")


class TrainingRecord(NamedTuple):
    """One chunk of training, as callbacks see it.

    ``step``: optimisation steps taken so far; ``loss``: mean training loss of the chunk's finite
    steps (NaN if none); ``validation_loss``: measured at the end of this chunk, else None;
    ``learning_rate``: the default schedule's rate at the chunk's last step (None with a custom
    optimizer); ``metrics``: the objective's metrics averaged over the chunk (``dropped`` summed).

    Example:
        >>> TrainingRecord(step=25, loss=1.2, validation_loss=None, learning_rate=3e-3, metrics={"dropped": 0.0})
    """

    step: int
    loss: float
    validation_loss: float | None
    learning_rate: float | None
    metrics: dict


def _cell(value) -> str:
    return "" if value is None else repr(float(value)) if isinstance(value, float) else str(value)


class CSVLogger:
    """Append one row per :class:`TrainingRecord` to the CSV file ``path``: columns ``step, loss,
    validation_loss, learning_rate`` and then the objective's metrics (empty cell: no value).

    A new or empty file gets the header; an existing file is continued only when it starts with
    such a header (a file of an earlier run), never overwritten: any other file raises a
    :class:`jaxic.JaxicError` naming it.

    Example:
        >>> compiled.train(1000, callbacks=[jaxic.callbacks.CSVLogger("runs/ring.csv")])
    """

    def __init__(self, path: str | os.PathLike):
        if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
            raise JaxicError(f"CSVLogger(path={path!r}): give a file name such as 'training.csv'.")
        self.path = Path(path).expanduser().absolute()
        self.columns: list[str] | None = None
        if self.path.is_dir():
            raise JaxicError(f"CSVLogger: '{self.path}' is a folder; give a file name such as "
                             f"'{self.path / 'training.csv'}'.")
        if self.path.exists():
            try:
                with open(self.path, newline="") as f:
                    first = next(csv.reader(f), None)
            except (OSError, UnicodeDecodeError, csv.Error) as exc:
                raise JaxicError(f"CSVLogger: cannot read the existing file '{self.path}' ({exc}); jaxic appends "
                                 "only to its own logs. Choose a new file name.") from None
            if first is not None:
                if tuple(first[:len(_FIXED)]) != _FIXED:
                    raise JaxicError(f"CSVLogger: '{self.path}' exists and is not a jaxic training log (its first "
                                     f"line is {','.join(first)[:80]!r}); jaxic never overwrites files it did not "
                                     "write. Choose a new file name, or move that file away.")
                self.columns = first

    def __call__(self, record: TrainingRecord) -> None:
        metrics = sorted(record.metrics)
        if self.columns is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.columns = [*_FIXED, *metrics]
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerow(self.columns)
        elif self.columns[len(_FIXED):] != metrics:
            raise JaxicError(f"CSVLogger: '{self.path}' has the metric columns {self.columns[len(_FIXED):]}, but this "
                             f"training reports {metrics} (another objective); log to a new file.")
        row = [record.step, record.loss, record.validation_loss, record.learning_rate,
               *(record.metrics[name] for name in metrics)]
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_cell(v) for v in row])


class TensorBoardLogger:
    """Write each :class:`TrainingRecord` as TensorBoard scalars through ``tensorboardX``
    (``pip install "jaxic[tensorboard]"``): ``train/loss``, ``train/learning_rate``,
    ``validation/loss`` and ``metrics/<name>``, at the record's step. Each logger writes a new event
    file in ``logdir`` (existing files are left alone) and flushes after every record; ``close()``
    it (or use it as a context manager) when done.

    Example:
        >>> with jaxic.callbacks.TensorBoardLogger("runs/ring") as tb:
        ...     compiled.train(1000, callbacks=[tb])
    """

    def __init__(self, logdir: str | os.PathLike):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise MissingDependencyError('TensorBoardLogger needs tensorboardX: pip install "jaxic[tensorboard]"') \
                from None
        if not isinstance(logdir, (str, os.PathLike)) or not str(logdir).strip():
            raise JaxicError(f"TensorBoardLogger(logdir={logdir!r}): give a folder name such as 'runs/ring'.")
        self.logdir = Path(logdir).expanduser().absolute()
        if self.logdir.exists() and not self.logdir.is_dir():
            raise JaxicError(f"TensorBoardLogger: '{self.logdir}' is a file, not a folder; jaxic never overwrites "
                             "files it did not write. Give a folder name.")
        self.writer = SummaryWriter(str(self.logdir))

    def __call__(self, record: TrainingRecord) -> None:
        if self.writer is None:
            raise JaxicError(f"TensorBoardLogger('{self.logdir}') is closed; create a new one.")
        scalars = {"train/loss": record.loss, "train/learning_rate": record.learning_rate,
                   "validation/loss": record.validation_loss,
                   **{f"metrics/{name}": value for name, value in record.metrics.items()}}
        for tag, value in scalars.items():
            if value is not None:  # no validation in this chunk, or no schedule (a custom optimizer)
                self.writer.add_scalar(tag, float(value), record.step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file (idempotent).

        Example:
            >>> tb.close()
        """
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
