"""Which files a stage really opens for reading, held against what it declares (the stage registry).

An audit hook (PEP 578: the ``open`` event of builtins.open, io.open and os.open) records every file opened for
reading in this process while a stage runs; each file is mapped to the catalog artifact with the longest
matching path. A stage may read what it declares it reads or writes (and anything inside those); scratch
(``data/cache``) and its own report folder (its cache record, its summary) are its own business.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lesionflow.catalog.artifacts import ARTIFACTS, Artifact, stage_report_dir
from lesionflow.params import Params
from lesionflow.stages.spec import StageSpec
from lesionflow.workspace import Workspace

_RECORDING: list[set[Path]] = []


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event != "open" or not _RECORDING:
        return
    path, mode, flags = (*tuple(args), None, None, None)[:3]
    if not isinstance(path, (str, os.PathLike)):
        return  # a file descriptor
    if mode is not None:
        reading = "r" in str(mode) and "+" not in str(mode)
    else:
        reading = flags is not None and (int(flags) & os.O_ACCMODE) == os.O_RDONLY
    if reading:
        _RECORDING[-1].add(Path(os.fspath(path)).absolute())


_installed = False


@contextmanager
def opened_for_reading() -> Iterator[set[Path]]:
    """The files this process opens for reading inside the block (absolute paths)."""
    global _installed
    if not _installed:
        sys.addaudithook(_hook)  # hooks cannot be removed: one for the whole session, idle outside blocks
        _installed = True
    seen: set[Path] = set()
    _RECORDING.append(seen)
    try:
        yield seen
    finally:
        _RECORDING.pop()


def artifact_of(path: Path, ws: Workspace) -> Artifact | None:
    """The catalog artifact holding ``path`` (longest path match), or None."""
    best: Artifact | None = None
    for artifact in ARTIFACTS.values():
        if artifact.param_key is not None:
            continue
        root = artifact.at(ws)
        if (path == root or root in path.parents) and (best is None or len(artifact.path) > len(best.path)):
            best = artifact
    return best


def _located(artifact: Artifact, ws: Workspace, params: Params) -> Path | None:
    if artifact.param_key is None:
        return artifact.at(ws)
    node: Any = params
    for part in artifact.param_key.split("."):
        node = getattr(node, part)
    value = str(node).strip()
    return None if not value or "://" in value else ws.path(value).absolute()


def undeclared_reads(spec: StageSpec, opened: set[Path], ws: Workspace, params: Params) -> dict[str, set[str]]:
    """Files ``spec``'s stage opened that its declaration does not cover, by artifact name ("?" for none)."""
    located = [_located(a, ws, params) for a in (*spec.reads, *spec.writes)]
    roots = [p for p in located if p is not None]
    own = stage_report_dir(ws, spec.name)
    out: dict[str, set[str]] = {}
    for path in opened:
        if ws.root not in path.parents or ws.cache in path.parents or own in path.parents:
            continue
        if path.name in ("params.yaml", "dvc.yaml", "dvc.lock") and path.parent == ws.root:
            continue
        if any(path == r or r in path.parents for r in roots):
            continue
        artifact = artifact_of(path, ws)
        out.setdefault(artifact.name if artifact else "?", set()).add(str(path.relative_to(ws.root)))
    return out
