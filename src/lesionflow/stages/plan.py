"""Stage ``plan``: data/raw -> data/processed/fingerprint.json + plans.json (versioned, nnU-Net style)."""

from __future__ import annotations

import json
from typing import Any

from lesionflow.catalog.artifacts import FINGERPRINT, PLANS, RAW_CASES, RAW_DATASET, RAW_MANIFEST, raw_case_file
from lesionflow.catalog.readers import write_stage_summary
from lesionflow.errors import SourceError
from lesionflow.files import write_json
from lesionflow.io.volumes import read_volume
from lesionflow.manifest import modality_kind, read_manifest
from lesionflow.params import Params
from lesionflow.planning.fingerprint import case_fingerprint, dataset_fingerprint
from lesionflow.planning.plan import derive_plan
from lesionflow.progress import ProgressFactory, rich_progress
from lesionflow.stages.base import StageResult
from lesionflow.workspace import Workspace

STAGE = "plan"


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
    records = read_manifest(RAW_MANIFEST.at(ws))
    if not records:
        raise SourceError(f"{RAW_MANIFEST.path} holds no cases; run `lesionflow stage ingest` and validate-raw first")
    dataset = json.loads(RAW_DATASET.at(ws).read_text())
    modalities = tuple(dataset["modalities"])
    # A channel's kind comes from its declared modality; undeclared ones (loose folders, DICOM) from the cases.
    kinds = tuple(k if (k := modality_kind(m)) != "OTHER" else records[0].modality_kind for m in modalities)
    fingerprints = []
    for rec in progress(sorted(records, key=lambda r: r.case_id), "plan", len(records)):
        folder = RAW_CASES.at(ws) / rec.case_id
        image = read_volume(raw_case_file(folder, "image"), rec.case_id)
        use_label = rec.has_label and rec.split == "train"  # test labels never shape the plan
        label = read_volume(raw_case_file(folder, "label"), rec.case_id).array if use_label else None
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
    write_json(FINGERPRINT.at(ws), fp.to_dict())
    write_json(PLANS.at(ws), {**plan.to_dict(), "plan_hash": plan.plan_hash})
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
    outputs = {"plans": PLANS.path, "fingerprint": FINGERPRINT.path, "summary": write_stage_summary(ws, STAGE, summary)}
    return StageResult(STAGE, True, summary, outputs)
