"""Content digests: one notion of "same data" for DVC, Prefect caching and lineage.

Digests are computed from bytes only, never from paths' mtimes (a file's stamps only decide whether this process
may reuse the digest it computed from the same file's bytes before). A directory digest covers the sorted
relative paths and the bytes of every regular file below it, so renaming a case changes it and touching
a file does not.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


# Digests of files this process has read, by the file's identity and change stamps. ctime cannot be set by a
# user (unlike mtime), so any write, rename-over or metadata change makes a new key and the bytes are read again;
# the digest itself is always of the bytes. A file changed in the last _RACY_NS is never remembered: timestamps
# are coarse (a jiffy on many kernels), so two writes that close could share stamps ("racy git"). A study checks
# the same stores' cache state in every cell: without this each check re-reads every chunk of every synthetic store.
_FILE_DIGESTS: dict[tuple[int, int, int, int, int], str] = {}
_MAX_REMEMBERED = 500_000
_RACY_NS = 2_000_000_000


def sha256_file(path: Path) -> str:
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    known = _FILE_DIGESTS.get(key)
    if known is not None:
        return known
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
        if len(_FILE_DIGESTS) >= _MAX_REMEMBERED:
            _FILE_DIGESTS.clear()
        _FILE_DIGESTS[key] = digest
    return digest


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
