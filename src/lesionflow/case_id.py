"""The one case-id rule: ingest (discovery), the Zarr stores and the quarantine all ask this module.

A case id names a folder in data/raw/cases, a group in the Zarr stores and a folder in data/quarantine, so it
must be one safe path component that cannot be mistaken for anything else the stores hold:

* 1 to :data:`MAX_LENGTH` characters from ``A-Z a-z 0-9 . _ -``, the first a letter or digit (``.tmp-*`` /
  ``.old-*`` are temp folders, hidden names are skipped by digests, a leading ``-`` reads as a command option);
* not a name the store root holds itself, compared without case: :data:`RESERVED` (``labels`` is the NGFF
  label group, ``zarr.json`` the root metadata).

:data:`MAX_LENGTH` leaves room for ``.tmp-<id>-<16 hex>`` within the 255-byte file-name limit; derived ids
(a synthetic sample ``<id>__relesion3``) are checked by the same rule when they are written.

:func:`safe_case_id` is how discovery turns a file name into a candidate id; a candidate that still breaks
the rule (``-1``, ``labels``) is rejected at ingest with code :data:`INVALID_CODE` and quarantined there,
instead of failing later inside a preprocess worker.
"""

from __future__ import annotations

import re

from lesionflow.errors import LesionflowError

MAX_LENGTH = 200
RESERVED = frozenset({"labels", "zarr.json"})
INVALID_CODE = "invalid_case_id"
_VALID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class InvalidCaseId(LesionflowError, ValueError):
    """A case id breaks the rule of this module (a ValueError too, for callers that catch those)."""


def case_id_problem(value: str) -> str | None:
    """Why ``value`` is not a valid case id (one line naming the value and the fix), or None when it is."""
    if not isinstance(value, str) or not value:
        return f"invalid case id {value!r}: it is empty; give the case a name"
    if len(value) > MAX_LENGTH:
        return f"invalid case id {value[:40]!r}...: {len(value)} characters, at most {MAX_LENGTH}; shorten the name"
    if _VALID.fullmatch(value) is None:
        return (
            f"invalid case id {value!r}: use only letters, digits, '.', '_' and '-', starting with a letter or "
            "digit; rename the source file or folder"
        )
    if value.casefold() in RESERVED:
        return f"invalid case id {value!r}: the name is reserved by the Zarr store; rename the source file or folder"
    return None


def check_case_id(value: str) -> str:
    """``value`` unchanged when it is a valid case id; otherwise raise :class:`InvalidCaseId` (one line)."""
    problem = case_id_problem(value)
    if problem is not None:
        raise InvalidCaseId(problem)
    return value


def safe_case_id(name: str) -> str:
    """A candidate case id from a file or folder name: runs of other characters become ``_``, leading and
    trailing ``.``/``_`` are stripped, an empty result becomes ``case``. The result can still break the rule
    (``-1``, ``labels``, too long): pass it to :func:`check_case_id` / :func:`case_id_problem`."""
    return _UNSAFE.sub("_", name).strip("._") or "case"
