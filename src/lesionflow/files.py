"""The one atomic write: every file lesionflow writes into a workspace goes through here.

Contract: a reader sees either the old bytes or the new bytes of a file, never a half-written one
(temp file in the same folder, then ``os.replace``, which is atomic on POSIX within one file system).
An unchanged file is left untouched, so its mtime stays and file watchers do not fire.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lesionflow.errors import LesionflowError

# errno -> what to do about it, for the file-system errors a user can fix (everything else is a bug or a network
# error, and keeps its own handling).
_FIXES = {
    errno.EACCES: "make it writable (chmod / chown) or run from a workspace you own",
    errno.EPERM: "make it writable (chattr -i for an immutable file, chmod / chown) or use another workspace",
    errno.EROFS: "the file system is mounted read-only; remount it read-write or use a workspace elsewhere",
    errno.ENOSPC: "the disk is full; free space there (or move the workspace) and run again",
    errno.EDQUOT: "the disk quota is used up; free space there (or move the workspace) and run again",
    errno.EFBIG: "the file size limit was reached (ulimit -f); raise it and run again",
}


class FileSystemError(LesionflowError):
    """A read or write the file system refused (permissions, read-only, full disk): one line, path and fix."""


def file_system_error(error: OSError) -> FileSystemError | None:
    """The one-line error for a file-system failure a user can fix; None for any other OSError.

    ``PermissionError`` (read-only ``data/processed``, ``chattr +i``), ``ENOSPC`` / ``EFBIG`` (full disk, file size
    limit) and ``EROFS`` name the path (``filename``, and ``filename2`` for a rename) and what to do. Writes go
    through :func:`atomic_path`, so such a failure leaves the old file and no temp file behind.
    """
    fix = _FIXES.get(error.errno or 0)
    if fix is None:
        return None
    paths = " -> ".join(str(p) for p in (error.filename, error.filename2) if p is not None)
    code = errno.errorcode.get(error.errno or 0, str(error.errno))
    reason = error.strerror or os.strerror(error.errno or 0)
    what = f"cannot access {paths}" if paths else "a file operation failed"
    return FileSystemError(f"{what}: {reason} [{code}]; {fix}")


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
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        # write() failures (a full disk: ENOSPC, a file size limit: EFBIG) carry no file name; give them the
        # destination so the one-line message (file_system_error) can name it. OSError(errno, ...) keeps the subclass.
        raise OSError(error.errno, error.strerror, str(path)) from error
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
