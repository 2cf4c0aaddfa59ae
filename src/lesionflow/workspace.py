"""A lesionflow workspace, resolved from one explicit root; no path globals.

The artifacts inside it (what DVC tracks) are declared in ``lesionflow.catalog.artifacts``; this type only
knows the root, the project files at the root and the scratch folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    """One lesionflow workspace; ``root`` is where params.yaml and dvc.yaml live."""

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
    def dvc_yaml(self) -> Path:
        return self.root / "dvc.yaml"

    @property
    def dvc_lock(self) -> Path:
        return self.root / "dvc.lock"

    @property
    def cache(self) -> Path:
        """Scratch that may be deleted at any time (mirrors of remote sources, staging, downloaded models)."""
        return self.root / "data" / "cache"
