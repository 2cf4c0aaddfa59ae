"""The workspace layout (what DVC tracks), resolved from one explicit root; no path globals."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    """Folders of one lesionflow workspace; ``root`` is where params.yaml and dvc.yaml live."""

    root: Path

    @classmethod
    def at(cls, root: str | Path) -> Workspace:
        return cls(Path(root).resolve())

    def path(self, relative: str | Path) -> Path:
        """A params path (workspace-relative unless absolute)."""
        p = Path(relative).expanduser()
        return p if p.is_absolute() else self.root / p

    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    @property
    def raw(self) -> Path:
        """Immutable ingested scans + manifest, tracked by the top-level data.dvc."""
        return self.root / "data" / "raw"

    @property
    def raw_cases(self) -> Path:
        return self.raw / "cases"

    @property
    def raw_manifest(self) -> Path:
        return self.raw / "manifest.csv"

    @property
    def raw_dataset(self) -> Path:
        return self.raw / "dataset.json"

    @property
    def quarantine(self) -> Path:
        return self.root / "data" / "quarantine"

    @property
    def cache(self) -> Path:
        """Scratch that may be deleted at any time (mirrors of remote sources, staging)."""
        return self.root / "data" / "cache"

    @property
    def processed(self) -> Path:
        return self.root / "data" / "processed"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def stage_report_dir(self, stage: str) -> Path:
        return self.reports / stage
