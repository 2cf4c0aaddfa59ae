"""Progress bars on stderr for every long wait (quiet when there is nothing to show)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

ProgressFactory = Callable[[Iterable[T], str, int], Iterator[T]]


def rich_progress(items: Iterable[T], description: str, total: int) -> Iterator[T]:
    """A progress bar on stderr (quiet when there is nothing to show)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if total == 0:
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
