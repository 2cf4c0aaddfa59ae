"""Ingest on real files: MSD, nnU-Net, loose NRRD/MHA folders; geometry exact; re-ingest is a no-op."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from lesionflow.catalog.artifacts import QUARANTINE, RAW, RAW_CASES, RAW_DATASET, RAW_MANIFEST
from lesionflow.errors import SourceError
from lesionflow.hashing import sha256_file
from lesionflow.manifest import read_manifest
from lesionflow.params import load_params
from lesionflow.stages import ingest
from lesionflow.workspace import Workspace
from tests.helpers.volumes import sphere_case, write_msd


def _quiet(items, description, total):
    yield from items


def _ingest(ws_root: Path, source: Path, *extra: str):
    ws = Workspace.at(ws_root)
    params = load_params(ws.params_file, [f"ingest.source={source}", *extra])
    return ws, ingest.run(ws, params, progress=_quiet)


def _tree_state(root: Path) -> dict[str, tuple[str, int]]:
    return {
        p.relative_to(root).as_posix(): (sha256_file(p), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_msd_ingest_writes_cases_manifest_and_exact_geometry(workspace: Path, tmp_path: Path) -> None:
    source = write_msd(tmp_path / "msd", n_train=3, n_test=1)
    ws, result = _ingest(workspace, source)
    records = {r.case_id: r for r in read_manifest(RAW_MANIFEST.at(ws))}
    assert sorted(records) == ["case_000", "case_001", "case_002", "case_003"]
    assert [records[c].split for c in sorted(records)] == ["train", "train", "train", "test"]
    assert result.summary["n_added"] == 4
    assert result.summary["n_rejected"] == 0
    for i in range(4):
        image, label = sphere_case(i)
        stored_img = nib.load(RAW_CASES.at(ws) / f"case_{i:03d}" / "image.nii.gz")
        stored_lab = nib.load(RAW_CASES.at(ws) / f"case_{i:03d}" / "label.nii.gz")
        split_dir = "imagesTr" if i < 3 else "imagesTs"
        source_img = nib.load(source / split_dir / f"case_{i:03d}.nii.gz")  # NIfTI keeps the affine in float32
        np.testing.assert_array_equal(stored_img.affine, source_img.affine)
        np.testing.assert_allclose(stored_img.affine, image.affine, atol=1e-6)
        np.testing.assert_array_equal(np.asanyarray(stored_img.dataobj), image.array)
        np.testing.assert_array_equal(np.asanyarray(stored_lab.dataobj), label.array)
        assert stored_lab.get_data_dtype() == np.uint8
        rec = records[f"case_{i:03d}"]
        assert (rec.spacing_x, rec.spacing_y, rec.spacing_z) == pytest.approx((1.0, 1.2, 2.0))
        assert rec.label_values == "[0, 1, 2]"
        assert rec.n_undeclared_labels == 0
        assert rec.shape_match
        assert rec.image_sha256 == sha256_file(RAW_CASES.at(ws) / f"case_{i:03d}" / "image.nii.gz")
        assert rec.modality_kind == "MR"
        assert rec.orientation == "RAS"
    dataset = json.loads(RAW_DATASET.at(ws).read_text())
    assert dataset["labels"] == {"0": "background", "1": "lesion", "2": "core"}
    assert json.loads(((ws.root / "reports") / "ingest" / "summary.json").read_text())["n_stored"] == 4
    assert ((ws.root / "reports") / "ingest" / "montage.png").read_bytes()[:4] == b"\x89PNG"


def test_reingest_same_source_changes_nothing(workspace: Path, tmp_path: Path) -> None:
    source = write_msd(tmp_path / "msd", n_train=3, n_test=0)
    ws, _ = _ingest(workspace, source)
    before = _tree_state(RAW.at(ws))
    _, again = _ingest(workspace, source)
    assert again.summary["n_added"] == 0
    assert again.summary["n_unchanged"] == 3
    assert _tree_state(RAW.at(ws)) == before  # same bytes and untouched mtimes: nothing rewritten


def test_changed_bytes_under_stored_id_are_quarantined_not_overwritten(workspace: Path, tmp_path: Path) -> None:
    source = write_msd(tmp_path / "msd", n_train=3, n_test=0)
    ws, _ = _ingest(workspace, source)
    stored = sha256_file(RAW_CASES.at(ws) / "case_001" / "image.nii.gz")
    image, _ = sphere_case(99)
    nib.save(nib.Nifti1Image(image.array, image.affine), source / "imagesTr" / "case_001.nii.gz")
    _, again = _ingest(workspace, source)
    assert again.summary["rejected"] == {"case_001": "conflicts_with_stored_case"}
    assert sha256_file(RAW_CASES.at(ws) / "case_001" / "image.nii.gz") == stored
    reason = json.loads((QUARANTINE.at(ws) / "case_001" / "reason.json").read_text())
    assert reason["code"] == "conflicts_with_stored_case"
    assert reason["stage"] == "ingest"


def test_interrupted_write_leaves_no_half_case(workspace: Path, tmp_path: Path) -> None:
    source = write_msd(tmp_path / "msd", n_train=2, n_test=0)
    ws = Workspace.at(workspace)
    (RAW.at(ws) / ".staging" / "case_000").mkdir(parents=True)
    (RAW.at(ws) / ".staging" / "case_000" / "image.nii.gz").write_bytes(b"half")
    (RAW_CASES.at(ws) / "case_001").mkdir(parents=True)  # folder without a manifest row: never committed
    (RAW_CASES.at(ws) / "case_001" / "image.nii.gz").write_bytes(b"partial")
    _, result = _ingest(workspace, source)
    assert result.summary["n_added"] == 2
    assert not (RAW.at(ws) / ".staging").exists()
    assert nib.load(RAW_CASES.at(ws) / "case_001" / "image.nii.gz").shape == (20, 18, 16)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_formats_keep_world_geometry(workspace: Path, tmp_path: Path, suffix: str) -> None:
    """An oblique LPS volume read through SimpleITK lands in NIfTI with the same world coordinates."""
    source = tmp_path / "loose"
    (source / "labels").mkdir(parents=True)
    image, label = sphere_case(3)
    angle = np.deg2rad(20)
    direction = (np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0)
    for arr, path in ((image.array, source / f"scan{suffix}"), (label.array, source / "labels" / f"scan{suffix}")):
        itk = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
        itk.SetSpacing((0.7, 0.9, 2.5))
        itk.SetOrigin((12.0, -30.0, 40.0))
        itk.SetDirection(direction)
        sitk.WriteImage(itk, str(path))
    ws, result = _ingest(workspace, source, "ingest.modality=MR")
    assert result.summary["n_added"] == 1
    stored = nib.load(RAW_CASES.at(ws) / "scan" / "image.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(stored.dataobj), image.array)
    itk = sitk.ReadImage(str(source / f"scan{suffix}"))
    for ijk in [(0, 0, 0), (19, 0, 0), (0, 17, 15), (7, 5, 3)]:
        lps = np.array(itk.TransformIndexToPhysicalPoint(ijk))
        ras = stored.affine @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-5)
    rec = read_manifest(RAW_MANIFEST.at(ws))[0]
    assert rec.has_label
    assert rec.shape_match
    assert rec.affine_max_diff_mm < 1e-9
    assert rec.source_format == ("nrrd" if suffix == ".nrrd" else "mha")


def test_nnunet_multichannel_layout(workspace: Path, tmp_path: Path) -> None:
    root = tmp_path / "Dataset001_Spheres"
    for d in ("imagesTr", "labelsTr"):
        (root / d).mkdir(parents=True)
    for i in range(2):
        image, label = sphere_case(i)
        for c in range(2):
            nib.save(
                nib.Nifti1Image(image.array + 10 * c, image.affine), root / "imagesTr" / f"sph_{i:03d}_{c:04d}.nii.gz"
            )
        nib.save(nib.Nifti1Image(label.array, label.affine), root / "labelsTr" / f"sph_{i:03d}.nii.gz")
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "T1", "1": "T2"},
                "labels": {"background": 0, "lesion": 1, "core": 2},
                "numTraining": 2,
                "file_ending": ".nii.gz",
            }
        )
    )
    ws, result = _ingest(workspace, root)
    assert result.summary["n_added"] == 2
    stored = nib.load(RAW_CASES.at(ws) / "sph_001" / "image.nii.gz")
    assert stored.shape == (20, 18, 16, 2)
    np.testing.assert_allclose(
        np.asanyarray(stored.dataobj)[..., 1] - np.asanyarray(stored.dataobj)[..., 0], 10, atol=1e-4
    )
    rec = {r.case_id: r for r in read_manifest(RAW_MANIFEST.at(ws))}["sph_001"]
    assert rec.n_channels == 2
    assert rec.modality == "T1"
    assert json.loads(RAW_DATASET.at(ws).read_text())["modalities"] == ["T1", "T2"]


def test_second_source_with_other_labels_is_refused(workspace: Path, tmp_path: Path) -> None:
    _ingest(workspace, write_msd(tmp_path / "a", n_train=2, n_test=0))
    other = write_msd(tmp_path / "b", n_train=2, n_test=0, labels={"0": "background", "1": "tumour"})
    with pytest.raises(SourceError, match="declares labels"):
        _ingest(workspace, other)


def _loose_niftis(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        image, _ = sphere_case(i)
        nib.save(nib.Nifti1Image(image.array, image.affine), root / f"scan_{i:02d}.nii.gz")
    return root


def test_zero_spacing_file_is_quarantined_and_the_rest_ingested(workspace: Path, tmp_path: Path) -> None:
    """Issue 17 item 2: a zero spacing in one file's sform used to kill the stage in the NIfTI writer."""
    source = _loose_niftis(tmp_path / "loose", 5)
    bad = nib.load(source / "scan_02.nii.gz")
    header = bad.header.copy()
    header["srow_y"] = [0.0, 0.0, 0.0, 20.0]  # the j axis has zero length
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\x00" * 4 + np.asanyarray(bad.dataobj).tobytes(order="F")
    (source / "scan_02.nii.gz").unlink()
    (source / "scan_02.nii").write_bytes(raw)
    ws, result = _ingest(workspace, source)
    assert result.summary["n_added"] == 4
    assert result.summary["rejected"] == {"scan_02": "invalid_spacing"}
    reason = json.loads((QUARANTINE.at(ws) / "scan_02" / "reason.json").read_text())
    assert "voxel spacing (1, 0, 2) mm" in reason["message"]
    assert not (RAW_CASES.at(ws) / "scan_02").exists()


def test_unexpected_read_error_quarantines_that_case_in_one_line(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any exception while reading one case (here one no check anticipates) quarantines it; the others go on."""
    source = _loose_niftis(tmp_path / "loose", 3)
    real = ingest.read_case

    def flaky(case, *args, **kwargs):
        if case.case_id == "scan_01":
            raise RuntimeError("an attribute the reader did not expect\nsecond line")
        return real(case, *args, **kwargs)

    monkeypatch.setattr(ingest, "read_case", flaky)
    _, result = _ingest(workspace, source)
    assert result.summary["n_added"] == 2
    assert result.summary["rejected"] == {"scan_01": "unreadable"}
    finding = result.findings[0]
    assert finding.subject == "scan_01"
    assert "\n" not in finding.detail
    assert "failed with RuntimeError: an attribute the reader did not expect second line;" in finding.detail
    assert "re-export" in finding.detail


def test_failed_write_removes_the_partial_case_and_goes_on(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer failure after the image was written leaves no half case in staging or data/raw."""
    source = write_msd(tmp_path / "msd", n_train=3, n_test=0)
    real = ingest.write_nifti

    def failing_label(volume, path):
        if "case_001" in str(path) and Path(path).name.startswith("label"):
            assert (Path(path).parent / "image.nii.gz").exists()  # the image is already in staging
            raise ValueError("Could not decompose affine")
        return real(volume, path)

    monkeypatch.setattr(ingest, "write_nifti", failing_label)
    ws, result = _ingest(workspace, source)
    assert result.summary["rejected"] == {"case_001": "cannot_store"}
    assert "storing the case failed with ValueError: Could not decompose affine" in result.findings[0].detail
    assert sorted(p.name for p in RAW_CASES.at(ws).iterdir()) == ["case_000", "case_002"]
    assert not (RAW.at(ws) / ".staging").exists()


def test_full_disk_stops_the_stage_without_a_half_case(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A workspace fault is dataset-level: every case would fail the same way, so the stage stops (no quarantine)."""
    import errno

    source = write_msd(tmp_path / "msd", n_train=2, n_test=0)
    real = ingest.write_nifti

    def disk_full(volume, path):
        if "case_001" in str(path) and Path(path).name.startswith("label"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(volume, path)

    monkeypatch.setattr(ingest, "write_nifti", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _ingest(workspace, source)
    ws = Workspace.at(workspace)
    assert not (RAW.at(ws) / ".staging" / "case_001").exists()
    assert not QUARANTINE.at(ws).exists()
    assert {r.case_id for r in read_manifest(RAW_MANIFEST.at(ws))} == {"case_000"}
