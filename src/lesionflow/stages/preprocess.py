"""Stage ``preprocess``: data/raw + plans.json -> data/processed/store.zarr (one group per case) + metadata.csv.

One Dask task per volume (each volume is written by exactly one task, so no two processes ever touch
one shard). Per case the cache key is digest(code version, the case's raw file digests, plan hash,
preprocess params); a case already in the store with that key is skipped, so changing one case
reprocesses only that case and changing nothing processes nothing. Each case appears in the store
completely or not at all (lesionflow.store writes under a temporary name and renames). Cases that fail
(constant image, a worker killed by the memory limit...) are quarantined with the reason; the rest go on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from lesionflow.catalog.artifacts import METADATA, QUARANTINE, RAW_CASES, RAW_MANIFEST, STORE, raw_case_file
from lesionflow.catalog.readers import load_plan, metadata_text, read_metadata, write_metadata, write_stage_summary
from lesionflow.errors import Finding
from lesionflow.hashing import sha256_file, sha256_json
from lesionflow.io.layout import present_values
from lesionflow.manifest import CaseRecord, read_manifest
from lesionflow.params import Params
from lesionflow.planning.plan import Plan
from lesionflow.quarantine import Rejection, record
from lesionflow.stages.base import CODE_VERSION, StageResult
from lesionflow.workspace import Workspace

STAGE = "preprocess"
#: the case attr holding its metadata.csv row (all columns but ``digest``, which covers the attrs themselves)
ROW_ATTR = "metadata_row"
# Bumped when the per-case record or metadata row changes for the same inputs: 2 = normalization statistics
# recorded before resampling (issue 17), so cases of an older store are reprocessed, not kept.
RECORD_FORMAT = 2


def case_key(rec: CaseRecord, plan: Plan, params: Params) -> str:
    p = params.preprocess
    return sha256_json(
        [
            CODE_VERSION,
            RECORD_FORMAT,
            rec.image_sha256,
            rec.label_sha256,
            rec.organ_sha256,
            plan.preprocessing_hash,
            p.image_dtype,
            p.label_resampling,
            p.compression,
        ]
    )


def _resample_mask(mask: np.ndarray, affine: np.ndarray, rec: Any, target: tuple[float, float, float]) -> np.ndarray:
    from lesionflow.preprocess.geometry import crop, to_ras
    from lesionflow.preprocess.ops import resample_label

    ras = to_ras(mask, affine)[0].astype(np.uint8)
    return resample_label(crop(ras, rec.crop), rec.spacing_before, target, mode="nearest")


def _stored_checks(out_img: np.ndarray, prec: Any, image_dtype: str) -> dict[str, Any]:
    """The processed gate's intensity columns: z-score statistics as recorded at normalization (before
    resampling, in its own mask) and the stored image's finiteness and range against the recorded range."""
    from dataclasses import asdict

    from lesionflow.preprocess.normstats import stored_image_checks

    stored = out_img.astype(image_dtype, copy=False)  # what the store holds (float16 rounds and can overflow)
    return asdict(stored_image_checks(stored, prec.normalization))


def process_case(
    case_dir: str,
    rec_json: dict[str, Any],
    plan_json: dict[str, Any],
    store: str,
    key: str,
    image_dtype: str,
    label_resampling: str,
    compression: str = "zstd",
) -> dict[str, Any]:
    """Runs in a Dask worker: read one raw case, preprocess, write its store group, return its metadata row."""
    from lesionflow.io.volumes import read_volume
    from lesionflow.preprocess.geometry import spacing_of
    from lesionflow.preprocess.ops import preprocess_arrays
    from lesionflow.store.zarr_store import CaseArrays, write_case

    rec = CaseRecord(**rec_json)
    plan = Plan.from_dict(plan_json)
    folder = Path(case_dir)
    img = read_volume(raw_case_file(folder, "image"), rec.case_id)
    raw_affine, image = img.affine, img.array  # stored dtype (int16 CT stays int16): normalization makes the float32
    del img
    label = read_volume(raw_case_file(folder, "label"), rec.case_id).array if rec.has_label else None
    raw_vox = float(np.prod([rec.spacing_x, rec.spacing_y, rec.spacing_z]))
    fg_raw = float(np.count_nonzero(label)) * raw_vox if label is not None else 0.0
    # The raw arrays are dropped as soon as they are used: the worker's memory peak is the store write, which
    # needs only the processed arrays.
    try:
        out_img, out_lab, prec = preprocess_arrays(image, label, raw_affine, plan.target_spacing, plan.normalization)
        del image
        if label is not None and label_resampling == "nearest":
            out_lab = _resample_mask(label, raw_affine, prec, plan.target_spacing)
        del label
        organ = None
        if rec.has_organ:
            organ_raw = read_volume(raw_case_file(folder, "organ"), rec.case_id).array > 0
            organ = _resample_mask(organ_raw.astype(np.uint8), raw_affine, prec, plan.target_spacing)
            del organ_raw
    except ValueError as err:
        return {"case_id": rec.case_id, "ok": False, "code": "preprocess_failed", "message": str(err).splitlines()[0]}
    affine = np.asarray(prec.final_affine)
    spacing = spacing_of(affine)
    attrs = {
        "case_id": rec.case_id,
        "split": rec.split,
        "modality": rec.modality,
        "spacing": list(spacing),
        "affine": affine.tolist(),
        "origin": affine[:3, 3].tolist(),
        "direction": (affine[:3, :3] / np.asarray(spacing)).tolist(),
        "source_sha256": rec.image_sha256,
        "label_sha256": rec.label_sha256,
        "plan_hash": plan.preprocessing_hash,
        "cache_key": key,
        "crop_bbox": {"lo": list(prec.crop.lo), "hi": list(prec.crop.hi)},
        "preprocess_record": prec.to_dict(),
    }
    fg_new = float(np.count_nonzero(out_lab)) * float(np.prod(spacing)) if out_lab is not None else 0.0
    values_new = [int(v) for v in present_values(out_lab)] if out_lab is not None else []
    values_raw = json.loads(rec.label_values) if rec.has_label else []
    checks = _stored_checks(out_img, prec, image_dtype)
    shape = out_img.shape[1:]
    row = {
        "case_id": rec.case_id,
        "split": rec.split,
        "cache_key": key,
        "shape_x": shape[0],
        "shape_y": shape[1],
        "shape_z": shape[2],
        "shape_min": min(shape),
        "shape_max": max(shape),
        "spacing_x": spacing[0],
        "spacing_y": spacing[1],
        "spacing_z": spacing[2],
        "spacing_dev_mm": float(np.max(np.abs(np.asarray(spacing) - np.asarray(plan.target_spacing)))),
        **checks,  # n_nonfinite, zscore_mean_abs, zscore_std_dev, intensity_min/max, range_excess
        "label_values_raw": json.dumps(values_raw),
        "label_values_processed": json.dumps(values_new),
        "label_set_unchanged": values_raw == values_new,
        "fg_volume_raw_mm3": fg_raw,
        "fg_volume_processed_mm3": fg_new,
        "fg_kept_ratio": fg_new / fg_raw if fg_raw > 0 else 1.0,
    }
    # The row travels with the case: a run killed after this group is published but before metadata.csv is
    # written (it is written once, at the end) keeps the case; the rerun reads the row back (_stored_row).
    attrs[ROW_ATTR] = metadata_text(row)  # as text: a NaN or inf statistic is not valid JSON
    row = {
        **row,
        "digest": write_case(
            Path(store),
            rec.case_id,
            CaseArrays(out_img, out_lab, organ),
            attrs,
            chunk_shape=plan.chunk_shape,
            image_dtype=image_dtype,
            compression=compression,
        ),
    }
    return {"case_id": rec.case_id, "ok": True, "row": row}


Work = tuple[list[tuple[CaseRecord, str]], dict[str, dict[str, Any]], list[str]]


def _stored_row(root: Path, case_id: str, attrs: dict[str, Any]) -> dict[str, Any] | None:
    """The metadata row a finished case carries in its attrs, with its digest; None for a store written before
    rows travelled with their cases (that case is recomputed once)."""
    from lesionflow.store.zarr_store import case_digest

    row = attrs.get(ROW_ATTR)
    return {**row, "digest": case_digest(root, case_id)} if isinstance(row, dict) else None


def _plan_work(ws: Workspace, params: Params, plan: Plan) -> Work:
    """(cases to process with their keys, metadata rows to keep, store groups to delete)."""
    from lesionflow.store.zarr_store import clean_temp, list_cases, read_case_attrs

    root = STORE.at(ws)
    if root.exists():
        clean_temp(root)  # leftovers of a killed run
    stored = {cid: read_case_attrs(root, cid) for cid in list_cases(root)} if root.exists() else {}
    rows = read_metadata(ws)
    todo, keep = [], {}
    records = {r.case_id: r for r in read_manifest(RAW_MANIFEST.at(ws))}
    for case_id, rec in sorted(records.items()):
        key = case_key(rec, plan, params)
        attrs = stored.get(case_id, {})
        if attrs.get("cache_key") != key:
            todo.append((rec, key))
        elif rows.get(case_id, {}).get("cache_key") == key:
            keep[case_id] = rows[case_id]
        elif (row := _stored_row(root, case_id, attrs)) is not None:
            keep[case_id] = row  # finished by a run that was killed before it wrote metadata.csv
        else:
            todo.append((rec, key))
    stale = sorted(set(stored) - set(records))  # cases no longer in data/raw (derived data: safe to drop)
    return todo, keep, stale


def run(ws: Workspace, params: Params) -> StageResult:
    from lesionflow.store.zarr_store import index_collection, list_cases, open_store

    plan = load_plan(ws)
    root = STORE.at(ws)
    open_store(root)
    todo, rows, stale = _plan_work(ws, params, plan)
    for case_id in stale:
        shutil.rmtree(root / case_id, ignore_errors=True)
    findings: list[Finding] = []
    if todo:
        findings = _fan_out(ws, params, plan, todo, rows)
    index_collection(root, list_cases(root))  # viewers find the cases from the store root
    write_metadata(ws, rows)
    n_processed = len(todo) - len(findings)
    summary = {
        "n_cases": len(rows),
        "n_processed": n_processed,
        "n_skipped": len(rows) - n_processed,
        "n_failed": len(findings),
        "n_removed": len(stale),
        "plan_hash": plan.plan_hash,
        "preprocessing_hash": plan.preprocessing_hash,
        "metadata_digest": sha256_file(METADATA.at(ws)),
    }
    outputs = {"store": STORE.path, "metadata": METADATA.path, "summary": write_stage_summary(ws, STAGE, summary)}
    return StageResult(STAGE, True, summary, outputs, tuple(findings))


def _fan_out(
    ws: Workspace, params: Params, plan: Plan, todo: list[tuple[CaseRecord, str]], rows: dict[str, dict[str, Any]]
) -> list[Finding]:
    """One Dask task per case; updates ``rows`` in place and returns the quarantined cases.

    When the nanny kills a worker (memory limit), Dask blames every task queued on that worker, so a
    case that failed with a dead worker is retried alone: only a case that kills a worker by itself is
    quarantined.
    """
    import dask
    import distributed  # noqa: F401 - its config defaults must exist before dask.config.set below

    from lesionflow.parallel import completed, dask_client
    from lesionflow.progress import rich_progress

    findings: list[Finding] = []
    root = STORE.at(ws)

    def submit(client: Any, rec: CaseRecord, key: str, attempt: str = "") -> Any:
        return client.submit(
            process_case,
            str(RAW_CASES.at(ws) / rec.case_id),
            _rec_json(rec),
            plan.to_dict(),
            str(root),
            key,
            params.preprocess.image_dtype,
            params.preprocess.label_resampling,
            params.preprocess.compression,
            key=f"preprocess-{rec.case_id}-{key[:12]}{attempt}",
            pure=False,
        )

    def settle(rec: CaseRecord, outcome: dict[str, Any]) -> None:
        if outcome["ok"]:
            rows[rec.case_id] = outcome["row"]
            return
        rows.pop(rec.case_id, None)
        rejection = Rejection(
            rec.case_id, STAGE, outcome["code"], outcome["message"], rec.source_uri, rec.source_sha256
        )
        record(QUARANTINE.at(ws), rejection)
        findings.append(rejection.finding())

    # one retry after a worker death: enough to tell a culprit from a bystander, quick to give up
    pp = params.preprocess
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 1}),
        dask_client(pp.workers, pp.memory_limit, pp.scheduler_address) as client,
    ):
        futures = {submit(client, rec, key): (rec, key) for rec, key in todo}
        suspects = []
        for future in rich_progress(completed(client, futures, "preprocess"), "preprocess", len(futures)):
            rec, key = futures[future]
            outcome = _outcome(future, rec)
            if not outcome["ok"] and outcome["code"] == "worker_died":
                suspects.append((rec, key))
            else:
                settle(rec, outcome)
        for rec, key in suspects:  # one at a time: alone on its worker, a culprit dies again, a bystander passes
            for future in completed(client, [submit(client, rec, key, "-alone")], "preprocess"):
                settle(rec, _outcome(future, rec))
    return findings


def _rec_json(rec: CaseRecord) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(rec)


def _outcome(future: Any, rec: CaseRecord) -> dict[str, Any]:
    """A finished future -> its result, or a quarantine reason when the worker died or the task raised."""
    from distributed.scheduler import KilledWorker

    try:
        return dict(future.result())
    except KilledWorker:
        return {
            "ok": False,
            "code": "worker_died",
            "message": "the Dask worker died on this case (out of memory?); raise preprocess.memory_limit",
        }
    except MemoryError:
        return {"ok": False, "code": "out_of_memory", "message": "ran out of memory; raise preprocess.memory_limit"}
    except Exception as err:  # noqa: BLE001 - one bad case must not stop the others; the reason is kept
        text = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        return {"ok": False, "code": "preprocess_error", "message": f"{type(err).__name__}: {text}"}
