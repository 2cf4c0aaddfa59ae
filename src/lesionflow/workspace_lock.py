"""An exclusive lock per workspace, held for a whole pipeline run (``lesionflow run`` and every Prefect flow).

Two runs in one workspace would write the same outputs (data/processed, models/, reports/) and both call
``dvc commit``, which takes DVC's own repository lock and fails the loser with "Unable to acquire lock".
So one run owns the workspace at a time: the second one either waits for it (up to a timeout) or refuses
with one line naming the holder (pid, host, start time, what it runs), the lock file and the fix.

How it works, and why:

* ``fcntl.flock(LOCK_EX)`` on ``<workspace>/.lesionflow/lock``. The kernel drops the lock when its holder
  exits, however it exits (SIGKILL, OOM, a node reboot on a local disk), so there is no stale lock to clean
  up and no pid-liveness guessing. On NFS, Linux maps flock onto POSIX byte-range locks, which the NFS lock
  manager shares between hosts.
* The file is never deleted: unlinking a locked file lets a waiter lock the old inode while a newcomer
  creates and locks a new one, and both would run. On release the holder only empties the file.
* The holder writes who it is (JSON) into the file after it has the lock; a reader that catches a half
  written record says "unknown" rather than failing.
* flock conflicts between open files, not processes: a second ``workspace_lock`` in the same process
  (another thread, or a flow called from inside another flow) waits for or refuses the first one like any
  other run. Flows therefore never call each other; they share ``lesionflow.flows.common.run_stages`` instead.
* ``.lesionflow/`` holds a ``.gitignore`` of ``*``, so the lock never shows up in ``git status``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from lesionflow.errors import LesionflowError

LOCK_DIR = ".lesionflow"
LOCK_NAME = "lock"
DEFAULT_POLL_S = 0.25


class WorkspaceLocked(LesionflowError):
    """Another run holds the workspace (the message names it, the lock file and the fix)."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a workspace lock, as written into the lock file."""

    pid: int
    host: str
    started: str  # UTC, ISO 8601 to the second
    purpose: str  # what the holder runs, e.g. "lesionflow run" or "flow lesionflow-pipeline"

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} ({self.purpose}, since {self.started})"


def lock_path(workspace: str | Path) -> Path:
    """The lock file of the workspace rooted at ``workspace``."""
    return Path(workspace).resolve() / LOCK_DIR / LOCK_NAME


def read_holder(path: Path) -> LockHolder | None:
    """The holder recorded in ``path``; None when the file is empty, missing or half written."""
    try:
        data = json.loads(path.read_text())
        return LockHolder(int(data["pid"]), str(data["host"]), str(data["started"]), str(data["purpose"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _open_lock_file(path: Path) -> IO[str]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        ignore = path.parent / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# lesionflow run lock; never committed\n*\n")
        # "a+": create if missing, never truncate on open (the holder's record must survive a waiter's open).
        return open(path, "a+", encoding="utf-8")
    except OSError as err:
        raise LesionflowError(
            f"cannot open the workspace lock file {path} ({err.strerror or type(err).__name__}); "
            "the workspace must be writable by the user running lesionflow"
        ) from None


def _try_lock(handle: IO[str]) -> bool:
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


def _refusal(path: Path, waited_s: float | None) -> WorkspaceLocked:
    holder = read_holder(path)
    who = holder.describe() if holder else "another run (holder not recorded yet)"
    waited = f" after waiting {waited_s:.0f} s" if waited_s is not None else ""
    return WorkspaceLocked(
        f"workspace {path.parent.parent} is in use by {who}{waited}; lock file {path}. "
        "Let that run finish, or rerun with --wait-lock (flows: wait_for_lock=true); "
        "the lock is released by the kernel when that process exits, so there is nothing to delete"
    )


@contextlib.contextmanager
def workspace_lock(
    workspace: str | Path,
    *,
    wait: bool = False,
    timeout_s: float = 0.0,
    purpose: str = "",
    poll_s: float = DEFAULT_POLL_S,
) -> Iterator[LockHolder]:
    """Hold the workspace's exclusive lock for the ``with`` block; yields the holder record written.

    ``wait=False`` refuses at once when another run holds it; ``wait=True`` polls every ``poll_s`` seconds
    for up to ``timeout_s`` seconds (0 or less: forever) and then refuses. Refusal raises
    :class:`WorkspaceLocked` with one line naming the holder and the lock file.
    """
    path = lock_path(workspace)
    if not path.parent.parent.is_dir():
        raise LesionflowError(f"workspace {path.parent.parent} does not exist; pass an existing folder")
    handle = _open_lock_file(path)
    try:
        # Polling with LOCK_NB rather than a blocking flock: a blocking call cannot time out without signals
        # (SIGALRM only works in the main thread, and Prefect may run a flow in another one).
        start = time.monotonic()
        while not _try_lock(handle):
            waited = time.monotonic() - start
            if not wait:
                raise _refusal(path, None)
            if timeout_s > 0 and waited >= timeout_s:
                raise _refusal(path, waited)
            time.sleep(poll_s)
        holder = LockHolder(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=datetime.now(UTC).replace(microsecond=0).isoformat(),
            purpose=purpose or " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv[:3])),
        )
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(asdict(holder), sort_keys=True) + "\n")
        handle.flush()
        try:
            yield holder
        finally:
            # Empty the record before unlocking, so no reader ever sees a finished run as the holder.
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()


def check_unlocked(workspace: str | Path, purpose: str = "") -> None:
    """Refuse at once (:class:`WorkspaceLocked`) when another run holds the workspace; hold nothing afterwards.

    For callers that want to fail fast before a slow start (``lesionflow run`` checks before Prefect starts
    its embedded server); the run itself takes the lock for real.
    """
    with workspace_lock(workspace, wait=False, purpose=purpose or "lock check"):
        pass
