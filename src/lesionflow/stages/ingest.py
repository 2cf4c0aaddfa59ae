"""Stage ``ingest``: source -> data/raw (one folder per case, NIfTI) + manifest; bad cases -> quarantine.

Contracts:
* data/raw is append-only. A case already stored is never rewritten: the same source bytes are skipped
  (re-ingesting costs one hash per file), different bytes under a stored case id are quarantined.
* A case appears completely or not at all: it is written into ``data/raw/.staging`` and renamed.
* Per-case isolation: any failure while reading, checking, measuring or writing one case quarantines that
  case with one line (an unanticipated exception: code ``unreadable``/``cannot_store`` and its one-line
  message) and the others go on. Only dataset-level faults stop the stage: an unreadable dataset.json, no
  case at all, an ``OSError`` while writing the workspace (disk full, read-only).
* DICOM is de-identified before anything is stored; its case id and source URI are pseudonymous.
* Credentials never reach logs, manifests or reports (``redact_uri``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lesionflow.catalog.artifacts import (
    INGEST_MONTAGE,
    QUARANTINE,
    RAW,
    RAW_CASES,
    RAW_DATASET,
    RAW_MANIFEST,
    raw_case_file,
)
from lesionflow.catalog.digests import raw_digest
from lesionflow.catalog.readers import write_stage_summary
from lesionflow.errors import CaseRejected, SourceError
from lesionflow.files import write_json
from lesionflow.hashing import combine_digests, sha256_file
from lesionflow.io.case_reader import LoadedCase, read_case
from lesionflow.io.sources import CaseSource, DatasetInfo, Discovery, discover
from lesionflow.io.volumes import write_nifti
from lesionflow.manifest import (
    CaseRecord,
    geometry_fields,
    intensity_stats,
    label_stats,
    modality_kind,
    read_manifest,
    write_manifest,
)
from lesionflow.params import Params
from lesionflow.progress import ProgressFactory, rich_progress
from lesionflow.quarantine import Rejection, read_all, record
from lesionflow.stages.base import StageResult
from lesionflow.workspace import Workspace

STAGE = "ingest"


@dataclass(frozen=True)
class _Resolved:
    local_root: Path
    display_uri: str  # redacted
    remote_rejections: tuple[Rejection, ...]


def _resolve_source(ws: Workspace, source: str) -> _Resolved:
    from lesionflow.io import remote

    if remote.is_remote(source):
        mirror = remote.mirror_remote_source(source, ws.cache / "sources")
        shown = remote.redact_uri(source)
        rejected = tuple(
            Rejection(Path(key).name or "case", STAGE, "unsafe_key", reason, f"{shown}/{key}")
            for key, reason in mirror.rejected_keys
        )
        return _Resolved(mirror.local_root, shown, rejected)
    path = ws.path(source)
    return _Resolved(path, str(source), ())


def _deid_key(params: Params) -> Any:
    from lesionflow.io.deid import DeidKey

    secret = os.environ.get("LESIONFLOW_DEID_SECRET") or params.ingest.deid.salt
    return DeidKey(secret=secret, max_date_shift_days=params.ingest.deid.max_date_shift_days)


def _assign_ids(found: Discovery, params: Params, test_fraction: float) -> list[CaseSource]:
    """DICOM cases get pseudonymous ids; a source that declares no test case (loose folders, DICOM, an MSD or
    nnU-Net dataset without test entries) gets a deterministic test split when ``ingest.test_fraction`` asks."""
    from lesionflow.hashing import sha256_json

    declares_test = any(c.split == "test" for c in found.cases)
    cases = []
    key = None
    for case in found.cases:
        if case.dicom_series is not None:
            from lesionflow.io.deid import pseudonymous_case_id

            key = key or _deid_key(params)
            cid = pseudonymous_case_id(case.dicom_series.series_uid, key)
            case = replace(case, case_id=cid, relative=f"#series={cid}")
        if not declares_test and test_fraction > 0:
            rank = int(sha256_json([params.project.seed, case.case_id])[:8], 16) / 0xFFFFFFFF
            case = replace(case, split="test" if rank < test_fraction else "train")
        cases.append(case)
    return cases


@dataclass(frozen=True)
class _Holdout:
    unlabelled_test: int  # test cases the source declares, none of them labelled (0: no hold-out needed)
    labelled_train: int  # labelled training cases of the source
    chosen: tuple[str, ...]  # training cases moved to the test split


def _hold_out_test(cases: list[CaseSource], params: Params) -> tuple[list[CaseSource], _Holdout]:
    """A labelled test split when the source's declared one has none (MSD tasks ship imagesTs/ without labels).

    Rule: if the source declares test cases and none has a label, ``n = round(k * ingest.test_holdout_fraction)``
    of its ``k`` labelled training cases, clamped to ``[1, k - 1]`` (0 when the fraction is 0 or ``k < 2``), move
    to the test split: those ranked first by ``sha256_json([project.seed, "test-holdout", case_id])`` (seeded,
    independent of the listing order). The unlabelled test cases stay in the test split: evaluate predicts them
    and scores the hold-out. A source with any labelled test case keeps its split as declared. The split is
    recorded per case in data/raw/manifest.csv (never rewritten: data/raw is append-only)."""
    from lesionflow.hashing import sha256_json

    test = [c for c in cases if c.split == "test"]
    labelled = [c.case_id for c in cases if c.split == "train" and c.label is not None]
    if not test or any(c.label is not None for c in test):
        return cases, _Holdout(0, len(labelled), ())
    fraction = params.ingest.test_holdout_fraction
    n = min(max(round(len(labelled) * fraction), 1), len(labelled) - 1) if fraction > 0 and len(labelled) >= 2 else 0
    ranked = sorted(labelled, key=lambda c: sha256_json([params.project.seed, "test-holdout", c]))
    chosen = set(ranked[:n])
    moved = [replace(c, split="test") if c.case_id in chosen else c for c in cases]
    return moved, _Holdout(len(test), len(labelled), tuple(sorted(chosen)))


def _holdout_note(holdout: _Holdout, held: list[str], params: Params) -> str:
    """The one line ingest prints (its summary's ``test_holdout_note``) about a test split without labels."""
    fraction = params.ingest.test_holdout_fraction
    lead = f"the source's {holdout.unlabelled_test} test cases have no labels"
    if not held:
        return (
            f"{lead} and no labelled training case was held out (ingest.test_holdout_fraction={fraction}, "
            f"{holdout.labelled_train} labelled training cases): evaluate has nothing to score"
        )
    return (
        f"{lead}: held out {len(held)} of {holdout.labelled_train} labelled training cases as the scored test split "
        f"(ingest.test_holdout_fraction={fraction}, project.seed={params.project.seed}): {', '.join(held)}; "
        "evaluate still predicts the unlabelled ones"
    )


def _source_digest(case: CaseSource) -> str:
    if case.dicom_series is not None:
        return combine_digests((f"slice{i:05d}", sha256_file(f)) for i, f in enumerate(case.files))
    roles = [(f"image{i}", p) for i, p in enumerate(case.images)] + [("label", case.label), ("organ", case.organ)]
    return combine_digests((role, sha256_file(p)) for role, p in roles if p is not None)


def _record(
    case: CaseSource, loaded: LoadedCase, shas: dict[str, str], info: DatasetInfo, uri: str, src_sha: str
) -> CaseRecord:
    label = loaded.label
    lab = (
        label_stats(label.array, set(info.labels))
        if label is not None
        else {"label_values": "[]", "label_integral": True, "n_undeclared_labels": 0, "foreground_fraction": 0.0}
    )
    return CaseRecord(
        case_id=case.case_id,
        split=case.split,
        modality=loaded.modality,
        modality_kind=modality_kind(loaded.modality),
        source_format=loaded.source_format,
        **geometry_fields(loaded.image, label),
        **intensity_stats(loaded.image.array),
        **lab,
        has_organ=loaded.organ is not None,
        image_sha256=shas["image"],
        label_sha256=shas.get("label", ""),
        organ_sha256=shas.get("organ", ""),
        source_sha256=src_sha,
        source_uri=uri,
    )


def _unexpected(err: BaseException, doing: str) -> tuple[str, str]:
    """(code, one-line message) for an exception no check anticipated: named, never swallowed."""
    if isinstance(err, MemoryError):
        return (
            "out_of_memory",
            f"{doing} the case needed more memory than is free (MemoryError); crop or split the scan, or ingest "
            "it on a machine with more memory",
        )
    text = " ".join(str(err).split())[:200] or "no message"
    return (
        "unreadable" if doing == "reading" else "cannot_store",
        f"{doing} the case failed with {type(err).__name__}: {text}; check the file's header (nib-ls, "
        "SimpleITK) and re-export it, or report it to lesionflow if the file is valid",
    )


def _store_case(ws: Workspace, case_id: str, loaded: LoadedCase) -> dict[str, str]:
    """Write the case into staging, then rename into data/raw/cases/<id> (all or nothing).

    A failure part way removes the staging folder before it propagates: no half-written case is left."""
    staging = RAW.at(ws) / ".staging" / case_id
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shas = {"image": write_nifti(loaded.image, raw_case_file(staging, "image"))}
        if loaded.label is not None:
            shas["label"] = write_nifti(loaded.label, raw_case_file(staging, "label"))
        if loaded.organ is not None:
            shas["organ"] = write_nifti(loaded.organ, raw_case_file(staging, "organ"))
        if loaded.dicom_header_json:
            (staging / "dicom_header.json").write_text(loaded.dicom_header_json)
            (staging / "deid_report.json").write_text(loaded.deid_report_json)
        RAW_CASES.at(ws).mkdir(parents=True, exist_ok=True)
        staging.rename(RAW_CASES.at(ws) / case_id)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return shas


def _dataset_json(ws: Workspace, info: DatasetInfo, uri: str) -> dict[str, Any]:
    """data/raw/dataset.json; a second source must agree with the first on channels and labels."""
    new = {
        "name": info.name,
        "modalities": list(info.modalities),
        "labels": {str(k): v for k, v in sorted(info.labels.items())},
        "organ_mask": info.organ_mask,
        "sources": [uri],
    }
    if RAW_DATASET.at(ws).exists():
        old = json.loads(RAW_DATASET.at(ws).read_text())
        for key in ("modalities", "labels"):
            if old[key] != new[key]:
                raise SourceError(
                    f"source {uri} declares {key} {new[key]} but data/raw holds {old[key]}; "
                    "ingest it into a separate workspace"
                )
        new["sources"] = sorted(set(old["sources"]) | {uri})
        new["name"], new["organ_mask"] = old["name"], old["organ_mask"] or info.organ_mask
    return new


def run(ws: Workspace, params: Params, *, progress: ProgressFactory[Any] = rich_progress) -> StageResult:
    """Ingest ``params.ingest.source`` into the workspace's data/raw."""
    resolved = _resolve_source(ws, params.ingest.source)
    found = discover(resolved.local_root, modality=params.ingest.modality, labels=params.ingest.labels)
    if not found.cases and not found.rejected and not resolved.remote_rejections:
        raise SourceError(
            f"no cases found in {resolved.display_uri}: expected NIfTI/NRRD/MHA volumes, DICOM series "
            "or an MSD/nnU-Net dataset.json; check ingest.source"
        )
    dataset = _dataset_json(ws, found.info, resolved.display_uri)
    cases, holdout = _hold_out_test(_assign_ids(found, params, params.ingest.test_fraction), params)
    stored = {r.case_id: r for r in read_manifest(RAW_MANIFEST.at(ws))}
    quarantined = read_all(QUARANTINE.at(ws))
    _drop_orphans(ws, stored)
    rejections = list(resolved.remote_rejections)
    rejections += [Rejection(r.case_id, STAGE, r.code, r.message, resolved.display_uri) for r in found.rejected]
    added, unchanged, key = 0, 0, None
    for case in progress(cases, "ingest", len(cases)):
        uri = f"{resolved.display_uri}/{case.relative}".rstrip("/") if case.relative else resolved.display_uri
        try:
            src_sha = _source_digest(case)
        except OSError as err:
            rejections.append(
                Rejection(
                    case.case_id,
                    STAGE,
                    "unreadable_file",
                    f"cannot read the source file ({type(err).__name__}); fix its permissions",
                    uri,
                )
            )
            continue
        if case.case_id in stored:
            if stored[case.case_id].source_sha256 == src_sha:
                unchanged += 1
                continue
            rejections.append(
                Rejection(
                    case.case_id,
                    STAGE,
                    "conflicts_with_stored_case",
                    "a different scan is already stored under this case id and data/raw is never "
                    "overwritten; give the new scan another case id",
                    uri,
                    src_sha,
                )
            )
            continue
        if quarantined.get(case.case_id, {}).get("source_sha256") == src_sha:
            continue  # rejected earlier for these very bytes; reason.json already says why
        if case.dicom_series is not None and key is None:
            key = _deid_key(params)
        # Per-case isolation: whatever goes wrong with this case's files quarantines this case (one line,
        # never a traceback) and the loop goes on. Reading, checking and measuring come first, so a case
        # whose statistics cannot be computed never reaches data/raw.
        try:
            loaded = read_case(case, found.info, deid_key=key, spacing_tolerance=params.ingest.slice_spacing_tolerance)
            measured = _record(case, loaded, {"image": ""}, found.info, uri, src_sha)
        except CaseRejected as rej:
            rejections.append(Rejection(case.case_id, STAGE, rej.code, rej.message, uri, src_sha))
            continue
        except Exception as err:  # noqa: BLE001 - a reader/library failure on one file is that case's fault
            rejections.append(Rejection(case.case_id, STAGE, *_unexpected(err, "reading"), uri, src_sha))
            continue
        try:
            shas = _store_case(ws, case.case_id, loaded)
        except OSError:
            raise  # the workspace (disk full, read-only, permissions) is at fault: a dataset-level stop
        except Exception as err:  # noqa: BLE001 - e.g. an affine the NIfTI writer cannot encode
            rejections.append(Rejection(case.case_id, STAGE, *_unexpected(err, "storing"), uri, src_sha))
            continue
        stored[case.case_id] = replace(
            measured,
            image_sha256=shas["image"],
            label_sha256=shas.get("label", ""),
            organ_sha256=shas.get("organ", ""),
        )
        write_manifest(list(stored.values()), RAW_MANIFEST.at(ws))  # commit point of this case
        added += 1
    shutil.rmtree(RAW.at(ws) / ".staging", ignore_errors=True)
    for rejection in rejections:
        record(QUARANTINE.at(ws), rejection)
    write_json(RAW_DATASET.at(ws), dataset)
    write_manifest(list(stored.values()), RAW_MANIFEST.at(ws))
    # what the manifest holds: a case stored earlier keeps the split it was stored with
    held = [c for c in holdout.chosen if c in stored and stored[c].split == "test"]
    split: dict[str, Any] = {"test_holdout": held}
    if holdout.unlabelled_test:
        split["test_holdout_note"] = _holdout_note(holdout, held, params)
    return _finish(ws, stored, added, unchanged, rejections, resolved.display_uri, split)


def _drop_orphans(ws: Workspace, stored: dict[str, CaseRecord]) -> None:
    """A case folder without a manifest row is a write interrupted before its commit point: remove it."""
    shutil.rmtree(RAW.at(ws) / ".staging", ignore_errors=True)
    if RAW_CASES.at(ws).is_dir():
        for folder in RAW_CASES.at(ws).iterdir():
            if folder.name not in stored:
                shutil.rmtree(folder)


def write_montage(ws: Workspace, records: list[CaseRecord], path: Path, *, max_cases: int = 16) -> None:
    """The ingest montage: per case, the axial slice with the most lesion (else the middle one)."""
    import nibabel as nib

    from lesionflow.viz import Tile, lesion_slice_index, montage_png

    tiles = []
    for rec in sorted(records, key=lambda r: r.case_id)[:max_cases]:
        folder = RAW_CASES.at(ws) / rec.case_id
        image = nib.as_closest_canonical(nib.load(raw_case_file(folder, "image")))  # RAS, so axis 2 is axial
        volume = np.asanyarray(image.dataobj)
        volume = volume[..., 0] if volume.ndim == 4 else volume
        label = None
        if rec.has_label and rec.shape_match:
            label = np.asanyarray(nib.as_closest_canonical(nib.load(raw_case_file(folder, "label"))).dataobj)
        z = lesion_slice_index(label)
        z = volume.shape[2] // 2 if z is None else z
        tiles.append(Tile(f"{rec.case_id} ({rec.split})", volume[:, :, z], None if label is None else label[:, :, z]))
    if tiles:
        is_ct = all(r.modality_kind == "CT" for r in records)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(montage_png(tiles, is_ct=is_ct, title=f"{RAW.path}: {len(records)} cases"))


def _finish(
    ws: Workspace,
    stored: dict[str, CaseRecord],
    added: int,
    unchanged: int,
    rejections: list[Rejection],
    uri: str,
    split: dict[str, Any],
) -> StageResult:
    summary = {
        "source": uri,
        "n_stored": len(stored),
        "n_added": added,
        "n_unchanged": unchanged,
        "n_rejected": len(rejections),
        "rejected": {r.case_id: r.code for r in rejections},
        **split,  # test_holdout (+ its note): the labelled test split held out of the training cases
        "raw_digest": raw_digest(ws),
    }
    out = write_stage_summary(ws, STAGE, summary)
    montage = INGEST_MONTAGE.at(ws)
    if added or not montage.exists():  # re-ingesting an unchanged source stays cheap
        write_montage(ws, list(stored.values()), montage)
    if not stored:
        raise SourceError(
            f"no usable case in {uri}: all {len(rejections)} were quarantined (see data/quarantine/*/reason.json)"
        )
    return StageResult(
        STAGE,
        True,
        summary,
        {
            "raw": RAW.path,
            "manifest": RAW_MANIFEST.path,
            "summary": out,
            "montage": INGEST_MONTAGE.path,
        },
        tuple(r.finding() for r in rejections),
    )
