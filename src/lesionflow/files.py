"""The one atomic write: every file lesionflow writes into a workspace goes through here.

Contract: a reader sees either the old bytes or the new bytes of a file, never a half-written one
(temp file in the same folder, then ``os.replace``, which is atomic on POSIX within one file system).
An unchanged file is left untouched, so its mtime stays and file watchers do not fire.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: Path, *, tmp_name: str | None = None) -> Iterator[Path]:
    """Yield a temp path next to ``path`` for a writer that wants a file name (``save_file(tensors, tmp)``).

    When the block ends normally the temp file is renamed onto ``path``; when it raises, the temp file is
    removed and ``path`` keeps its old bytes. Parent folders are created. The temp name is hidden
    (``.<name>.<pid>.<hex>.tmp``, unique per call, so threads do not collide); ``tmp_name`` overrides it
    where a folder reserves its own prefix for partial files.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(tmp_name or f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (parent folders created)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` atomically unless the file already holds exactly it; True when it was written."""
    if path.exists() and path.read_text() == text:
        return False
    write_bytes_atomic(path, text.encode())
    return True


def json_text(payload: Any) -> str:
    """Deterministic JSON text: sorted keys, two-space indent, trailing newline."""
    return json.dumps(payload, indent=2, sort_keys=True) + "\n"


def write_json(path: Path, payload: Any) -> bool:
    """Deterministic JSON, written atomically; an unchanged file is left untouched."""
    return write_text_if_changed(path, json_text(payload))
