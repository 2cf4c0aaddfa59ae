"""Stage ``plan``: data/raw -> data/processed/fingerprint.json + plans.json (versioned, nnU-Net style)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lesionflow.catalog.artifacts import FINGERPRINT, PLANS, RAW_CASES, RAW_DATASET, RAW_MANIFEST, raw_case_file
from lesionflow.catalog.readers import write_stage_summary
from lesionflow.devices import machine_cpus
from lesionflow.errors import SourceError
from lesionflow.files import write_json
from lesionflow.io.volumes import read_volume, read_volume_shape
from lesionflow.manifest import CaseRecord, modality_kind, read_manifest
from lesionflow.params import Params
from lesionflow.planning.fingerprint import CaseFingerprint, case_fingerprint, dataset_fingerprint
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
    folder_of = RAW_CASES.at(ws)

    def fingerprint(rec: CaseRecord) -> CaseFingerprint:
        image_file = raw_case_file(folder_of / rec.case_id, "image")
        if not (rec.has_label and rec.split == "train"):  # test labels never shape the plan: geometry only
            shape, affine = read_volume_shape(image_file, rec.case_id)
            return case_fingerprint(rec.case_id, shape, affine, None, seed=seed, samples=samples)
        image = read_volume(image_file, rec.case_id)
        label = read_volume(raw_case_file(folder_of / rec.case_id, "label"), rec.case_id).array
        labelled = (image.array, label)
        return case_fingerprint(rec.case_id, image.array.shape, image.affine, labelled, seed=seed, samples=samples)

    seed, samples = params.project.seed, params.plan.foreground_samples
    ordered = sorted(records, key=lambda r: r.case_id)
    # One thread per CPU: zlib inflates and numpy scans without the GIL, so reading the .nii.gz files overlaps.
    # Each result depends on its case alone (seeded by its id), and the dataset sorts them by case id.
    with ThreadPoolExecutor(max_workers=min(machine_cpus(), len(ordered))) as pool:
        fingerprints = list(progress(pool.map(fingerprint, ordered), "plan", len(ordered)))
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
