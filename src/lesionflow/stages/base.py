"""What every stage returns, and how its summary is written."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lesionflow import __version__

T = TypeVar("T")

# The code version in every cache key. Bump the suffix when a stage's output bytes change for the
# same inputs and params, so caches (Prefect, our manifests) are invalidated.
CODE_VERSION = f"{__version__}+stages.1"


@dataclass(frozen=True)
class Finding:
    """One rejected case or dataset-level failure: what, a stable code, and the one-line detail."""

    subject: str  # case id, or "dataset"
    code: str
    detail: str

    def line(self) -> str:
        return f"{self.subject}: {self.detail} [{self.code}]"


@dataclass(frozen=True)
class StageResult:
    """A stage's outcome: small and JSON-ready (references and digests, never arrays)."""

    stage: str
    ok: bool
    summary: dict[str, Any]
    outputs: dict[str, str] = field(default_factory=dict)  # name -> workspace-relative path
    findings: tuple[Finding, ...] = ()  # rejected cases and dataset-level failures, for the console and logs
    cached: bool = False  # True when the stage did no work: its recorded state matched (lesionflow.caching)

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "ok": self.ok,
            "summary": self.summary,
            "outputs": self.outputs,
            "findings": [asdict(f) for f in self.findings],
            "cached": self.cached,
        }


def write_text_if_changed(path: Path, text: str) -> bool:
    """Write atomically (temp file + rename) unless the file already holds exactly ``text``."""
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


def write_json(path: Path, payload: Any) -> None:
    """Deterministic JSON (sorted keys, trailing newline); an unchanged file is left untouched."""
    write_text_if_changed(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


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
