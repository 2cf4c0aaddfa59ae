"""The bad-input corpus of the foundation issue, each a real file: quarantined with a reason, valid cases go on."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lesionflow.catalog.artifacts import QUARANTINE, RAW_CASES, RAW_MANIFEST
from lesionflow.hashing import sha256_file
from lesionflow.manifest import read_manifest
from lesionflow.params import load_params
from lesionflow.quarantine import case_dir
from lesionflow.stages import ingest, validate_raw
from lesionflow.workspace import Workspace
from tests.helpers.dicom_factory import PHI, write_ct_series
from tests.helpers.volumes import add_msd_entry, sphere_case, write_msd


def _quiet(items, description, total):
    yield from items


def _reasons(ws: Workspace) -> dict[str, str]:
    """case id (as reason.json names it, whatever its folder) -> quarantine code."""
    return {
        json.loads(p.read_text())["case_id"]: json.loads(p.read_text())["code"]
        for p in QUARANTINE.at(ws).glob("*/reason.json")
    }


def _msd_corpus(root: Path, outside: Path) -> dict[str, str]:
    """Four valid cases plus one case per bad input; returns case id -> expected quarantine code."""
    write_msd(root, n_train=4, n_test=0)
    image, label = sphere_case(7)
    good = nib.load(root / "imagesTr" / "case_000.nii.gz").to_bytes()
    truncated = gzip.compress(good)[:300]
    add_msd_entry(root, "truncated", None, label.array, raw_image_bytes=truncated)
    nan_img = image.array.copy()
    nan_img[3, 3, 3], nan_img[4, 4, 4] = np.nan, np.inf
    add_msd_entry(root, "nan_inf", nan_img, label.array)
    add_msd_entry(root, "shape_mismatch", image.array, label.array[:, :, :-2])
    bad_values = label.array.copy()
    bad_values[0, 0, 0] = 7
    add_msd_entry(root, "undeclared_label", image.array, bad_values)
    add_msd_entry(root, "float_label", image.array, label.array.astype(np.float32) * 0.5)
    add_msd_entry(root, "four_d", np.stack([image.array] * 3, axis=-1), label.array)
    add_msd_entry(root, "zero_axis", np.zeros((0, 18, 16), np.float32), None)
    (root / "imagesTr" / "unreadable.nii").write_bytes(b"this is not a NIfTI file at all" * 20)
    data = json.loads((root / "dataset.json").read_text())
    data["training"].append({"image": "./imagesTr/unreadable.nii"})
    # a path with ../ that points outside the dataset folder, and a symlink leaving it
    nib.save(nib.Nifti1Image(image.array, image.affine), outside)
    escaping = f"training[{len(data['training'])}]"  # named by its own entry, not by the file it points to
    data["training"].append({"image": "./imagesTr/../../" + outside.name})
    (root / "imagesTr" / "linked.nii.gz").symlink_to(outside)
    data["training"].append({"image": "./imagesTr/linked.nii.gz"})
    # duplicate case ids: one name in the training and the test split
    for sub in ("imagesTr", "imagesTs"):
        (root / sub).mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(image.array, image.affine), root / sub / "dup.nii.gz")
    data["training"].append({"image": "./imagesTr/dup.nii.gz"})
    data["test"] = [{"image": "./imagesTs/dup.nii.gz"}]
    (root / "dataset.json").write_text(json.dumps(data))
    if os.geteuid() != 0:  # root reads anything; elsewhere also prove a permission error is handled
        locked = root / "imagesTr" / "locked.nii.gz"
        nib.save(nib.Nifti1Image(image.array, image.affine), locked)
        locked.chmod(0)
        data["training"].append({"image": "./imagesTr/locked.nii.gz"})
        (root / "dataset.json").write_text(json.dumps(data))
    return {
        "truncated": "truncated_file",
        "four_d": "not_3d",
        "zero_axis": "zero_length_axis",
        "unreadable": "unreadable_file",
        escaping: "path_escapes_source",
        "linked": "symlink_outside_source",
        "dup": "duplicate_case_id",
        "nan_inf": "gate:n_nonfinite",
        "shape_mismatch": "gate:shape_match",
        "undeclared_label": "gate:n_undeclared_labels",
        "float_label": "gate:label_integral",
        **({"locked": "unreadable_file"} if os.geteuid() != 0 else {}),
    }


def test_msd_bad_input_corpus(workspace: Path, tmp_path: Path) -> None:
    ws = Workspace.at(workspace)
    # a valid dataset is ingested first: nothing stored may be lost or overwritten by the bad one
    first = write_msd(tmp_path / "first", n_train=2, n_test=0)
    ingest.run(ws, load_params(ws.params_file, [f"ingest.source={first}"]), progress=_quiet)
    stored_before = {p.name: sha256_file(p / "image.nii.gz") for p in RAW_CASES.at(ws).iterdir()}
    (tmp_path / "first" / "imagesTr" / "case_000.nii.gz").unlink()  # the bad source reuses ids 000/001
    source = tmp_path / "bad"
    expected = _msd_corpus(source, tmp_path / "outside_source.nii.gz")
    params = load_params(ws.params_file, [f"ingest.source={source}", "quality.max_reject_fraction=0.9"])
    result = ingest.run(ws, params, progress=_quiet)
    for finding in result.findings:
        assert "\n" not in finding.detail
        assert "Traceback" not in finding.detail
    assert {f.subject: f.code for f in result.findings}["truncated"] == "truncated_file"
    gate = validate_raw.run(ws, params)
    reasons = _reasons(ws)
    for case_id, code in expected.items():
        assert reasons.get(case_id, "").startswith(code), (case_id, reasons.get(case_id))
    accepted = {r.case_id for r in read_manifest(RAW_MANIFEST.at(ws))}
    assert accepted == {"case_000", "case_001", "case_002", "case_003"}
    for name, digest in stored_before.items():
        assert sha256_file(RAW_CASES.at(ws) / name / "image.nii.gz") == digest
    assert (QUARANTINE.at(ws) / "nan_inf" / "files" / "image.nii.gz").exists()  # moved out of raw by the gate
    assert not (RAW_CASES.at(ws) / "nan_inf").exists()
    assert set(gate.summary["quarantined"]) == {"nan_inf", "shape_mismatch", "undeclared_label", "float_label"}


def test_escaping_entry_is_named_by_its_own_entry(workspace: Path, tmp_path: Path) -> None:
    """Issue 17 item 4: an entry pointing outside the dataset is reported as that entry, never under the name of
    its target (here another dataset's case_001, which is also a valid case of this one, and /etc/passwd)."""
    source = write_msd(tmp_path / "msd", n_train=2, n_test=0)
    other = write_msd(tmp_path / "other", n_train=2, n_test=0)
    data = json.loads((source / "dataset.json").read_text())
    data["training"] += [{"image": "./imagesTr/../../other/imagesTr/case_001.nii.gz"}, {"image": "/etc/passwd"}]
    (source / "dataset.json").write_text(json.dumps(data))
    ws = Workspace.at(workspace)
    result = ingest.run(ws, load_params(ws.params_file, [f"ingest.source={source}"]), progress=_quiet)
    assert _reasons(ws) == {"training[2]": "path_escapes_source", "training[3]": "path_escapes_source"}
    assert sorted(p.name for p in QUARANTINE.at(ws).iterdir()) == sorted(
        case_dir(QUARANTINE.at(ws), f"training[{i}]").name for i in (2, 3)
    )
    assert {r.case_id for r in read_manifest(RAW_MANIFEST.at(ws))} == {"case_000", "case_001"}
    details = {f.subject: f.detail for f in result.findings}
    assert "'../other/imagesTr/case_001.nii.gz' escapes the source folder" in details["training[2]"]
    assert other.exists()


def test_integral_float_labels_are_accepted_as_integers(workspace: Path, tmp_path: Path) -> None:
    source = write_msd(tmp_path / "msd", n_train=2, n_test=0)
    image, label = sphere_case(5)
    add_msd_entry(source, "float_ok", image.array, label.array.astype(np.float64))
    ws = Workspace.at(workspace)
    params = load_params(ws.params_file, [f"ingest.source={source}"])
    ingest.run(ws, params, progress=_quiet)
    validate_raw.run(ws, params)
    stored = nib.load(RAW_CASES.at(ws) / "float_ok" / "label.nii.gz")
    assert stored.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(stored.dataobj), label.array)


def test_dicom_corpus_and_no_identifying_value_survives(workspace: Path, tmp_path: Path) -> None:
    source = tmp_path / "dicom"
    mixed = source / "DOE^JANE_CT"  # folder names from PACS exports often carry the patient's name
    a = write_ct_series(mixed, n_slices=8, seed=1)
    b = write_ct_series(mixed, n_slices=6, orientation="oblique", seed=2)
    gap = write_ct_series(source / "gap", n_slices=8, drop_slice=4, seed=3)
    uneven = write_ct_series(source / "uneven", n_slices=8, jitter_slice=3, seed=4)
    ws = Workspace.at(workspace)
    params = load_params(ws.params_file, [f"ingest.source={source}", "quality.max_reject_fraction=0.6"])
    result = ingest.run(ws, params, progress=_quiet)
    assert result.summary["n_added"] == 2  # two series mixed in one folder become two cases
    assert sorted(_reasons(ws).values()) == ["missing_slice", "uneven_slice_spacing"]
    validate_raw.run(ws, params)
    records = read_manifest(RAW_MANIFEST.at(ws))
    assert {r.modality_kind for r in records} == {"CT"}
    assert {r.source_format for r in records} == {"dicom"}
    assert all(r.case_id.startswith("dcm_") for r in records)
    assert sorted(r.shape_z for r in records) == [6, 8]
    # no original identifying value anywhere under data/ (decompressing .gz), nor in reports/
    secrets = [v for k, v in PHI.items() if k != "StudyDate"] + ["DOE^JANE", "20240115"]
    secrets += [s.series_uid for s in (a, b, gap, uneven)] + [a.study_uid, *a.sop_uids, a.frame_of_reference_uid]
    for root in (ws.root / "data", (ws.root / "reports")):
        for path in (p for p in root.rglob("*") if p.is_file()):
            blob = path.read_bytes()
            if path.suffix == ".gz":
                blob = gzip.decompress(blob)
            text = blob.decode("latin-1")
            for secret in secrets:
                assert secret not in text, f"{secret!r} survives in {path}"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("lesionflow")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{ not json", "is not valid JSON"),
        ('["a list"]', "must hold a JSON object"),
        ('{"training": [{"label": "x"}], "modality": {"0": "CT"}}', "must be an object with an 'image' path"),
        ('{"description": "neither format"}', "neither MSD"),
    ],
)
def test_malformed_dataset_json_stops_with_one_line(workspace: Path, tmp_path: Path, content: str, needle: str) -> None:
    source = tmp_path / "broken"
    source.mkdir()
    (source / "dataset.json").write_text(content)
    proc = _cli("stage", "ingest", "--set", f"ingest.source={source}", cwd=workspace)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0]
    assert "dataset.json" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_empty_dataset_stops_with_one_line(workspace: Path, tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no scans here")
    proc = _cli("stage", "ingest", "--set", f"ingest.source={tmp_path / 'empty'}", cwd=workspace)
    assert proc.returncode == 2
    assert "no cases found" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_failed_gate_moves_nothing_and_says_why(workspace: Path, tmp_path: Path) -> None:
    """Half the cases bad with max_reject_fraction 0.25: the gate fails, nothing leaves data/raw."""
    source = write_msd(tmp_path / "msd", n_train=2, n_test=0)
    image, label = sphere_case(3)
    for i in range(2):
        bad = image.array.copy()
        bad[1, 1, 1] = np.nan
        add_msd_entry(source, f"nan_{i}", bad, label.array)
    proc = _cli("stage", "ingest", "--set", f"ingest.source={source}", cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    gate = _cli("stage", "validate-raw", cwd=workspace)
    assert gate.returncode == 2
    last = gate.stderr.strip().splitlines()[-1]
    assert "raw quality gate failed" in last
    assert "nothing was quarantined" in last
    assert "nan_0" in gate.stderr  # the table of failed checks names the cases
    assert "Traceback" not in gate.stderr
    ws = Workspace.at(workspace)
    assert {r.case_id for r in read_manifest(RAW_MANIFEST.at(ws))} == {"case_000", "case_001", "nan_0", "nan_1"}
    assert not QUARANTINE.at(ws).exists()
    summary = json.loads(((ws.root / "reports") / "validate-raw" / "summary.json").read_text())
    assert summary["success"] is False
    assert summary["reject_fraction"] == 0.5
    assert ((ws.root / "reports") / "quality" / "raw" / "index.html").exists()
