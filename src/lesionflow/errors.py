"""Errors a user can act on.

Every exception defined here carries a message that fits on one line and names the case (where there is
one), the offending value and the fix. The CLI prints ``str(error)`` and exits non-zero without a
traceback; anything else escaping a stage is a bug in lesionflow, not in the user's data.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    """One rejected case or dataset-level failure: what, a stable code, and the one-line detail."""

    subject: str  # case id, or "dataset"
    code: str
    detail: str

    def line(self) -> str:
        return f"{self.subject}: {self.detail} [{self.code}]"


class LesionflowError(Exception):
    """Base class: a problem the user can fix; printed as one line, never with a traceback."""


class ParamsError(LesionflowError):
    """A value in params.yaml or a ``--set`` override is invalid."""


class SourceError(LesionflowError):
    """The dataset as a whole cannot be read (malformed dataset.json, empty dataset, missing folder)."""


class GateFailed(LesionflowError):
    """A quality gate rejected the data; the message points at the report.

    ``findings`` holds the failed checks (lesionflow.stages.base.Finding) so adapters can show them as a
    table or a Prefect artifact before the one-line message.
    """

    def __init__(self, message: str, findings: tuple[object, ...] = ()) -> None:
        self.findings = findings
        super().__init__(message)


class CaseRejected(LesionflowError):
    """One case cannot be used. The stage quarantines it with ``code`` and ``message`` and goes on.

    ``code`` is a short stable identifier (``truncated_file``, ``missing_slice``...) that tests and
    reports can match on; ``message`` is the human sentence with the value and the fix.
    """

    def __init__(self, case_id: str, code: str, message: str) -> None:
        self.case_id = case_id
        self.code = code
        self.message = message
        super().__init__(f"case {case_id!r}: {message} [{code}]")
