"""Progress for every long wait: a bar on stderr, and for training loops periodic log lines (quiet when there is
nothing to show).

- :func:`rich_progress`: a bar over an iterable of work items (cases, futures, samples).
- :func:`step_progress`: a bar over training steps that also logs ``"<label>: step 120/400 loss 0.0312 (31 s)"``
  to the ``lesionflow.progress`` logger every ~10% of the steps and at least every :data:`LOG_EVERY_S` seconds.
  A bar is a live terminal display: a Prefect run (no terminal) shows nothing of it until the end, so the log lines
  are what its run logs show. The label is the loop's default or the one a caller set with :func:`progress_label`
  (train-generator names the method: the generator loop itself does not know it).

Log lines reach Prefect without any Prefect setting: inside a flow or task run, records of ``lesionflow.progress``
are also handed to the handlers of Prefect's ``prefect.extra`` logger (what ``PREFECT_LOGGING_EXTRA_LOGGERS``
attaches at import), and only inside a run, so a CLI or ``dvc repro`` run that imported Prefect gets no "no flow
run" warnings. Outside Prefect the lines go wherever the application's logging sends INFO records (nowhere by
default: the terminal has the bar).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

T = TypeVar("T")

ProgressFactory = Callable[[Iterable[T], str, int], Iterator[T]]

LOG_EVERY_S = 30.0  # a log line at least this often (checked after each step), whatever the step count
LOG_FRACTION = 10  # ... and one every total / LOG_FRACTION steps

_label: ContextVar[str | None] = ContextVar("lesionflow_progress_label", default=None)


class _PrefectRunLogs(logging.Handler):
    """Hands records to Prefect's run-log handlers while this thread runs inside a Prefect flow or task run."""

    def emit(self, record: logging.LogRecord) -> None:
        context = sys.modules.get("prefect.context")  # never imported from here: Prefect is an adapter's concern
        if context is None or (context.FlowRunContext.get() is None and context.TaskRunContext.get() is None):
            return
        # a user who also listed lesionflow in PREFECT_LOGGING_EXTRA_LOGGERS has them attached already: not twice
        attached = {*logging.getLogger("lesionflow").handlers, *log.handlers}
        for handler in logging.getLogger("prefect.extra").handlers:
            if handler not in attached and record.levelno >= handler.level:
                handler.handle(record)


log = logging.getLogger("lesionflow.progress")
if log.level == logging.NOTSET:  # INFO records pass unless the application chose a level for this logger
    log.setLevel(logging.INFO)
log.addHandler(_PrefectRunLogs())


def _bar(*columns: Any) -> Any:
    """A rich Progress on stderr (stdout stays for a command's results)."""
    from rich.console import Console
    from rich.progress import Progress

    return Progress(*columns, console=Console(stderr=True), transient=False)


def rich_progress(items: Iterable[T], description: str, total: int) -> Iterator[T]:
    """A progress bar on stderr (quiet when there is nothing to show)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    if total == 0:
        yield from items
        return
    with _bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


@contextmanager
def progress_label(label: str) -> Iterator[None]:
    """Name the training loops run inside this block (e.g. ``"train-generator lefusion"``) in bars and log lines."""
    token = _label.set(label)
    try:
        yield
    finally:
        _label.reset(token)


class StepProgress:
    """Progress of one training run: call :meth:`update` after every step (1-based ``step``). ``bar`` None =
    quiet: no bar, no line."""

    def __init__(self, label: str, total: int, start: int, bar: Any, clock: Callable[[], float]) -> None:
        self.label, self.total, self.bar, self._clock = label, total, bar, clock
        self._every = max(1, math.ceil(total / LOG_FRACTION))
        self._began = self._last = clock()
        self._task = bar.add_task(label, total=total, completed=start, loss=math.nan, note="") if bar else None

    def update(self, step: int, loss: float, note: str = "") -> None:
        """Record ``step`` done with mean ``loss``; ``note`` (e.g. ``"12.3 patches/s, val dice 0.812"``) is shown
        after the loss in the bar and the log line."""
        if self.bar is None:
            return
        self.bar.update(self._task, completed=step, loss=loss, note=note)
        now = self._clock()
        if step % self._every == 0 or step == self.total or now - self._last >= LOG_EVERY_S:
            self._last = now
            tail = f", {note}" if note else ""
            log.info("%s: step %d/%d loss %.4g (%.0f s)%s", self.label, step, self.total, loss, now - self._began, tail)


@contextmanager
def step_progress(
    default_label: str, total: int, start: int = 0, *, enabled: bool = True, clock: Callable[[], float] = time.monotonic
) -> Iterator[StepProgress]:
    """Progress of steps ``start + 1 .. total``: a bar on stderr and periodic log lines (module docstring).

    Quiet (no bar, no line) when disabled (a DDP rank other than 0), when ``total`` is 0 or nothing is left to do.
    The label is the one set by :func:`progress_label`, else ``default_label``.
    """
    if not enabled or total <= 0 or start >= total:
        yield StepProgress(default_label, total, start, None, clock)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    label = _label.get() or default_label
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4g}"),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
    )
    with _bar(*columns) as bar:
        yield StepProgress(label, total, start, bar, clock)
