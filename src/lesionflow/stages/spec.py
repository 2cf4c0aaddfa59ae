"""A stage's declaration, and everything derived from it.

A stage declares the params keys it reads, the catalog artifacts it reads and writes, and the code it runs
beyond its own module. From that one declaration come: its cache state (``lesionflow.caching``), its
``dvc.yaml`` entry (``lesionflow.dvc.render_dvc_yaml``), the Zarr stores a flow publishes after it, and the
params view it runs with (reading an undeclared key is an error, so the cache key cannot miss a setting).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from lesionflow.catalog.artifacts import Artifact, Digest, Dvc, Kind, summary_artifact
from lesionflow.errors import LesionflowError
from lesionflow.params import Params
from lesionflow.stages.base import StageResult
from lesionflow.workspace import Workspace


class UndeclaredParam(LesionflowError):
    """A stage read a params key its registry entry does not declare (a lesionflow bug, caught by the tests)."""


def _covered(key: str, declared: Sequence[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


class ParamsView:
    """Read-only attribute access to the declared keys of ``Params`` (sections or dotted keys).

    A fully declared node is returned as the real pydantic object; a node of which only some keys are declared
    is returned as another view; anything else raises UndeclaredParam naming the stage and the key.
    ``model_dump_json`` gives the whole params (the one JSON round trip across the Dask boundary).
    """

    __slots__ = ("_declared", "_node", "_prefix", "_stage")

    def __init__(self, node: Any, declared: tuple[str, ...], stage: str, prefix: str = "") -> None:
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_declared", declared)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str) -> Any:
        key = f"{self._prefix}.{name}" if self._prefix else name
        if name not in type(self._node).model_fields:  # a method (model_dump_json...), not a params key
            if not self._prefix:
                return getattr(self._node, name)  # of the root: the whole params
        elif _covered(key, self._declared):
            return getattr(self._node, name)
        elif any(d.startswith(key + ".") for d in self._declared):
            return ParamsView(getattr(self._node, name), self._declared, self._stage, key)
        raise UndeclaredParam(
            f"stage {self._stage} reads params key {key!r} but does not declare it; add it to the stage's params "
            "in lesionflow.stages (so its cache key and dvc.yaml entry include it)"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("params are read-only inside a stage")


def declared_view(params: Params, declared: tuple[str, ...], stage: str) -> Params:
    """``params`` restricted to ``declared`` (typed as Params for the stage functions)."""
    return cast(Params, ParamsView(params, declared, stage))


@dataclass(frozen=True)
class StageSpec:
    name: str
    fn: Callable[..., StageResult]  # (ws, params) -> StageResult; with records_flow_run also flow_run_id=
    description: str
    params: tuple[str, ...]  # params.yaml keys (sections or dotted keys) the stage reads
    reads: tuple[Artifact, ...]  # catalog artifacts it reads
    writes: tuple[Artifact, ...]  # catalog artifacts it writes
    code: tuple[str, ...] = ()  # source folders it runs beyond its own module (dvc.yaml deps)
    uses_dask: bool = False  # fans out on a Dask cluster (a flow run shares one between such stages)
    records_flow_run: bool = False  # fn takes ``flow_run_id`` (lineage): the orchestrator's run, passed explicitly

    def run(self, ws: Workspace, params: Params, *, flow_run_id: str = "none") -> StageResult:
        """Run the stage function with the params it declared (an undeclared read raises UndeclaredParam)."""
        view = declared_view(params, self.params, self.name)
        if self.records_flow_run:
            return self.fn(ws, view, flow_run_id=flow_run_id)
        return self.fn(ws, view)

    @property
    def module_path(self) -> str:
        """The stage's own source (a module, or the folder of a stage package), relative to the project."""
        module = sys.modules[self.fn.__module__]
        path = Path(str(module.__file__))
        if path.name == "__init__.py":
            path = path.parent
        parts = path.parts
        return "/".join(parts[parts.index("src") :]) if "src" in parts else path.name

    @property
    def zarr_stores(self) -> tuple[str, ...]:
        """The Zarr stores it writes: what a flow publishes to the team storage after the stage."""
        return tuple(a.path for a in self.writes if a.is_zarr and a.dvc in (Dvc.OUT, Dvc.PERSIST))

    @property
    def writes_remote(self) -> bool:
        """It changes remote state (the registry): it has no cache key and runs every time (idempotently)."""
        return any(a.kind is Kind.REMOTE for a in self.writes)

    @property
    def state_outputs(self) -> tuple[Artifact, ...]:
        """Written artifacts whose digest is part of the stage's cache state."""
        return tuple(a for a in self.writes if a.digest is not Digest.NONE and a.kind is not Kind.REMOTE)

    def outs(self, role: Dvc) -> tuple[str, ...]:
        return tuple(a.path for a in self.writes if a.dvc is role)


def dvc_dep(artifact: Artifact, stage: str, stages: dict[str, StageSpec]) -> str | None:
    """What dvc.yaml lists as the stage's dependency on ``artifact`` (None: DVC cannot see it).

    data/raw is tracked by data.dvc and rewritten by the raw gate, so a reader depends on the summary of the
    last stage before it that wrote data/raw: that orders it after the writer and reruns it when raw changes.
    """
    if artifact.dvc is Dvc.DATA_DVC:
        order = list(stages)
        writers = [s for s in order[: order.index(stage)] if artifact in stages[s].writes]
        if not writers:
            raise ValueError(f"stage {stage} reads {artifact.name}, which no earlier stage writes")
        return summary_artifact(writers[-1]).path
    if artifact.kind is Kind.SOURCE:
        return artifact.path  # ${key}: DVC's params templating
    if artifact.dvc is Dvc.NONE or artifact.kind is Kind.REMOTE:
        return None
    return artifact.path


def dvc_deps(spec: StageSpec, stages: dict[str, StageSpec]) -> tuple[str, ...]:
    data = [dvc_dep(a, spec.name, stages) for a in spec.reads]
    deps = [d for d in data if d is not None]
    return tuple(dict.fromkeys([*deps, *spec.code, spec.module_path]))
