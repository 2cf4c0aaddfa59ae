"""Stage ``plan``: data/raw -> data/processed/fingerprint.json + plans.json (versioned, nnU-Net style)."""

from __future__ import annotations

import json
from typing import Any

from lesionflow.errors import SourceError
from lesionflow.hashing import sha256_file
from lesionflow.io.volumes import read_volume
from lesionflow.manifest import modality_kind, read_manifest
from lesionflow.params import Params
from lesionflow.planning.fingerprint import case_fingerprint, dataset_fingerprint
from lesionflow.planning.plan import Plan, derive_plan
from lesionflow.stages.base import ProgressFactory, StageResult, rich_progress, write_json
from lesionflow.stages.ingest import raw_digest
from lesionflow.workspace import Workspace

STAGE = "plan"


def plans_path(ws: Workspace) -> Any:
    return ws.processed / "plans.json"


def fingerprint_path(ws: Workspace) -> Any:
    return ws.processed / "fingerprint.json"


def inputs(ws: Workspace, params: Params) -> dict[str, str]:
    return {"raw": raw_digest(ws)}


def load_plan(ws: Workspace) -> Plan:
    path = plans_path(ws)
    if not path.exists():
        raise SourceError("data/processed/plans.json does not exist; run `lesionflow stage plan` first")
    return Plan.from_dict(json.loads(path.read_text()))


def _overrides(params: Params) -> dict[str, Any]:
    p = params.plan
    out: dict[str, Any] = {}
    for key in ("target_spacing", "patch_size", "chunk_shape"):
        if getattr(p, key) is not None:
            out[key] = list(getattr(p, key))
    if p.normalization:
        out["normalization"] = dict(p.normalization)
    return out


def run(ws: Workspace, params: Params, *, progress: ProgressFactory[Any] = rich_progress) -> StageResult:
    """Fingerprint every case in data/raw (train and test: geometry only, no labels of the test split used)."""
    records = read_manifest(ws.raw_manifest)
    if not records:
        raise SourceError("data/raw/manifest.csv holds no cases; run `lesionflow stage ingest` and validate-raw first")
    dataset = json.loads(ws.raw_dataset.read_text())
    modalities = tuple(dataset["modalities"])
    # A channel's kind comes from its declared modality; undeclared ones (loose folders, DICOM) from the cases.
    kinds = tuple(k if (k := modality_kind(m)) != "OTHER" else records[0].modality_kind for m in modalities)
    fingerprints = []
    for rec in progress(sorted(records, key=lambda r: r.case_id), "plan", len(records)):
        folder = ws.raw_cases / rec.case_id
        image = read_volume(folder / "image.nii.gz", rec.case_id)
        use_label = rec.has_label and rec.split == "train"  # test labels never shape the plan
        label = read_volume(folder / "label.nii.gz", rec.case_id).array if use_label else None
        fingerprints.append(
            case_fingerprint(
                rec.case_id,
                image.array,
                label,
                image.affine,
                seed=params.project.seed,
                samples=params.plan.foreground_samples,
            )
        )
    fp = dataset_fingerprint(fingerprints, modalities, kinds)
    plan = derive_plan(fp, gpu_memory_gb=params.plan.gpu_memory_gb, overrides=_overrides(params))
    write_json(fingerprint_path(ws), fp.to_dict())
    write_json(plans_path(ws), {**plan.to_dict(), "plan_hash": plan.plan_hash})
    summary = {
        "plan_hash": plan.plan_hash,
        "fingerprint_digest": plan.fingerprint_digest,
        "target_spacing": list(plan.target_spacing),
        "patch_size": list(plan.patch_size),
        "chunk_shape": list(plan.chunk_shape),
        "normalization": plan.normalization["schemes"],
        "overrides": list(plan.overrides),
        "n_cases": fp.n_cases,
    }
    write_json(ws.stage_report_dir(STAGE) / "summary.json", summary)
    outputs = {"plans": "data/processed/plans.json", "fingerprint": "data/processed/fingerprint.json"}
    return StageResult(STAGE, True, summary, outputs)


def plans_digest(ws: Workspace) -> str:
    path = plans_path(ws)
    return sha256_file(path) if path.exists() else "absent"
