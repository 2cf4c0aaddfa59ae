"""A copied or moved workspace keeps its embedded MLflow store working in the new place, not the old one.

The embedded store (``<workspace>/mlruns/mlflow.db`` + ``mlruns/artifacts``) records absolute locations: each
experiment's ``file://`` artifact root, each run's artifact URI, logged-model locations, dataset sources and the
``lesionflow.workspace`` tag. MLflow has no API to move them, so a copied workspace would read its models from --
and write new runs into -- the original. Before a session opens the embedded store, :func:`relocate_embedded_store`
finds the workspace the store was last used in (from the experiments' artifact roots, which end in
``mlruns/artifacts``) and, when that is not the store's own workspace, rewrites every text cell naming the old
workspace (the path itself, or below it; plain and URL-quoted forms) to the new one, in one transaction.

Only the embedded layout is touched: a store elsewhere, a server or an ``s3://`` artifact root is left alone.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from urllib.parse import unquote, urlsplit

# The embedded store's layout (tracking.py imports these: one definition, no import cycle)
EMBEDDED_DIR = "mlruns"
EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "artifacts"


def _workspace_of(artifact_location: str) -> Path | None:
    """``/old/ws`` for ``file:///old/ws/mlruns/artifacts``; None for any other location."""
    parts = urlsplit(artifact_location or "")
    if parts.scheme != "file":
        return None
    path = Path(unquote(parts.path))
    if path.name != EMBEDDED_ARTIFACTS or path.parent.name != EMBEDDED_DIR:
        return None
    return path.parent.parent


def _text_columns(con: sqlite3.Connection) -> list[tuple[str, str]]:
    tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    out = []
    for table in tables:
        for _cid, column, kind, *_ in con.execute(f'PRAGMA table_info("{table}")'):
            if not kind or any(word in kind.upper() for word in ("CHAR", "TEXT", "CLOB")):
                out.append((table, column))
    return out


def _rewrites(old: Path, new: Path) -> list[tuple[str, str]]:
    """Where a path of the old workspace appears in a cell: at its start, after ``file://``, or opening a JSON
    string; plain and URL-quoted. Anchored this way, ``/data/old/ws`` is not mistaken for ``/old/ws``."""
    plain = (str(old) + "/", str(new) + "/")
    quoted = (old.as_uri()[len("file://") :] + "/", new.as_uri()[len("file://") :] + "/")
    out = []
    for before, after in {plain, quoted}:
        out += [("file://" + before, "file://" + after), ('"' + before, '"' + after)]
    return out


def _starts(con: sqlite3.Connection, table: str, column: str, old: Path, new: Path) -> None:
    """Cells that start with the old workspace's path (a run's artifact URI is a path in some MLflow tables)."""
    prefix = str(old) + "/"
    con.execute(
        f'UPDATE "{table}" SET "{column}" = ? || substr("{column}", ?) WHERE substr("{column}", 1, ?) = ?',
        (str(new) + "/", len(prefix) + 1, len(prefix), prefix),
    )


def relocate_embedded_store(db: Path) -> Path | None:
    """Rewrite the old workspace's paths in a moved embedded store; return the old workspace (None: nothing moved).

    ``db`` is ``<workspace>/mlruns/mlflow.db``; any other file is left alone, as is a store not yet created.
    """
    db = Path(db)
    if db.name != EMBEDDED_DB or db.parent.name != EMBEDDED_DIR or not db.is_file():
        return None
    root = db.resolve().parent.parent
    with closing(sqlite3.connect(db, timeout=60)) as connection, connection as con:  # one transaction, then closed
        try:
            locations = [r[0] for r in con.execute("SELECT artifact_location FROM experiments")]
        except sqlite3.OperationalError:
            return None  # not an MLflow store (yet)
        old_roots = {w for w in map(_workspace_of, locations) if w is not None and w != root}
        for old in sorted(old_roots):
            for table, column in _text_columns(con):
                for before, after in _rewrites(old, root):
                    con.execute(
                        f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) WHERE instr("{column}", ?) > 0',
                        (before, after, before),
                    )
                _starts(con, table, column, old, root)
                con.execute(f'UPDATE "{table}" SET "{column}" = ? WHERE "{column}" = ?', (str(root), str(old)))
    return sorted(old_roots)[0] if old_roots else None
