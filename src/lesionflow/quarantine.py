"""Quarantine: rejected inputs are kept with a reason, never silently dropped or overwritten.

Layout: ``data/quarantine/<case_id>/reason.json`` (+ the case's files when a gate moved them out of
data/raw). A case rejected because its id breaks the case-id rule (:mod:`lesionflow.case_id`) gets the folder
``_<sanitised id>-<8 hex of the id>`` instead: a leading ``_`` is never a valid case id, so it cannot collide
with one. reason.json holds the latest rejection and the earlier ones under ``history``; it is written
with sorted keys and no time stamps, so the same rejection twice gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from lesionflow.case_id import case_id_problem, safe_case_id
from lesionflow.errors import Finding
from lesionflow.files import write_json


@dataclass(frozen=True)
class Rejection:
    case_id: str
    stage: str  # ingest | validate-raw | ...
    code: str  # stable machine-readable reason (truncated_file, duplicate_case_id, ...)
    message: str  # one human line with the value and the fix
    source_uri: str = ""  # never with credentials
    source_sha256: str = ""

    def line(self) -> str:
        return f"case {self.case_id!r}: {self.message} [{self.code}]"

    def finding(self) -> Finding:
        return Finding(self.case_id, self.code, self.message)


def case_dir(quarantine_root: Path, case_id: str) -> Path:
    """``<root>/<case_id>`` for a valid id; an invalid one (``""``, ``..``, ``labels``) gets its own safe folder."""
    if case_id_problem(case_id) is None:
        return quarantine_root / case_id
    digest = hashlib.sha256(case_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return quarantine_root / f"_{safe_case_id(case_id)[:64]}-{digest}"


def record(quarantine_root: Path, rejection: Rejection, *, move_from: Path | None = None) -> Path:
    """Write (or extend) ``<case>/reason.json``; with ``move_from`` move that folder's files in as well."""
    folder = case_dir(quarantine_root, rejection.case_id)
    folder.mkdir(parents=True, exist_ok=True)
    reason_file = folder / "reason.json"
    entry = asdict(rejection)
    history: list[dict[str, str]] = []
    if reason_file.exists():
        previous = json.loads(reason_file.read_text())
        history = previous.pop("history", [])
        if previous != entry:
            history.append(previous)
    if move_from is not None and move_from.exists():
        target = folder / "files"
        if target.exists():  # an earlier quarantine of the same id: keep it, never overwrite
            n = 1
            while (folder / f"files.{n}").exists():
                n += 1
            target = folder / f"files.{n}"
        shutil.move(str(move_from), str(target))
    payload = {**entry, "history": history} if history else entry
    write_json(reason_file, payload)
    return folder


def read_all(quarantine_root: Path) -> dict[str, dict[str, object]]:
    """case id (as recorded in reason.json, whatever its folder) -> latest reason, for every quarantined case."""
    out: dict[str, dict[str, object]] = {}
    if not quarantine_root.is_dir():
        return out
    for reason_file in sorted(quarantine_root.glob("*/reason.json")):
        reason = json.loads(reason_file.read_text())
        out[str(reason.get("case_id", reason_file.parent.name))] = reason
    return out
