"""Content digests: one notion of "same data" for DVC, Prefect caching and lineage.

Digests are computed from bytes only, never from paths' mtimes. A directory digest covers the sorted
relative paths and the bytes of every regular file below it, so renaming a case changes it and touching
a file does not.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """Digest of a JSON-serialisable object with sorted keys (stable across runs and machines)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def combine_digests(items: Iterable[tuple[str, str]]) -> str:
    """Digest of (name, digest) pairs, order-independent: sorted by name first."""
    h = hashlib.sha256()
    for name, digest in sorted(items):
        h.update(name.encode())
        h.update(b"\0")
        h.update(digest.encode())
        h.update(b"\n")
    return h.hexdigest()


def tree_files(root: Path, *, exclude_prefixes: tuple[str, ...] = (".",)) -> dict[str, Path]:
    """Relative POSIX path -> path of every regular file under ``root``, sorted; hidden entries skipped."""
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(exclude_prefixes) for part in rel.parts) or not path.is_file():
            continue
        out[rel.as_posix()] = path
    return out


def sha256_tree(root: Path, *, exclude_prefixes: tuple[str, ...] = (".",)) -> str:
    """Digest of every regular file under ``root`` (relative path + bytes); hidden entries skipped."""
    files = tree_files(root, exclude_prefixes=exclude_prefixes)
    return combine_digests((rel, sha256_file(path)) for rel, path in files.items())
