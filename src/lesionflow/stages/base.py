"""What every stage returns, and the code version in every cache key."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lesionflow import __version__
from lesionflow.errors import Finding

# The code version in every cache key. Bump the suffix when a stage's output bytes change for the
# same inputs and params, so caches (Prefect, our manifests) are invalidated.
CODE_VERSION = f"{__version__}+stages.3"


@dataclass(frozen=True)
class StageResult:
    """A stage's outcome: small and JSON-ready (references and digests, never arrays)."""

    stage: str
    ok: bool
    summary: dict[str, Any]
    outputs: dict[str, str] = field(default_factory=dict)  # name -> workspace-relative path
    findings: tuple[Finding, ...] = ()  # rejected cases and dataset-level failures, for the console and logs
    cached: bool = False  # True when the stage did no work: its recorded state matched (lesionflow.caching)

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "ok": self.ok,
            "summary": self.summary,
            "outputs": self.outputs,
            "findings": [asdict(f) for f in self.findings],
            "cached": self.cached,
        }
