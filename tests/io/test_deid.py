"""De-identification (PS3.15 basic profile) on real files written by tests.helpers.dicom_factory."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from lesionflow.io import deid
from lesionflow.io.deid import (
    DeidKey,
    DeidReport,
    date_shift_days,
    deidentified_header_json,
    deidentify,
    patient_pseudonym,
    pseudonymous_case_id,
    remap_uid,
)
from lesionflow.io.dicom import find_series, read_series
from tests.helpers.dicom_factory import PHI, WrittenSeries, write_ct_series

KEY = DeidKey("unit-test-secret")
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def _deidentify_series(written: WrittenSeries, out: Path) -> list[tuple[Path, DeidReport, str]]:
    """deidentify + save every file; returns (path, report, header json) per file."""
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for index, path in enumerate(written.files):
        ds = pydicom.dcmread(path)
        report = deidentify(ds, KEY)
        target = out / f"{index:03d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        results.append((target, report, deidentified_header_json(ds)))
    return results


def _original_uids(written: WrittenSeries) -> list[str]:
    return [written.series_uid, written.study_uid, written.frame_of_reference_uid, *written.sop_uids]


def _assert_clean(blob: bytes, written: WrittenSeries) -> None:
    for label, value in PHI.items():
        assert value.encode() not in blob, f"{label} leaked"
    for uid in _original_uids(written):
        assert uid.encode() not in blob, "original UID leaked"
    assert b"20240115" not in blob
    assert b"19610203" not in blob


def test_no_phi_in_files_reports_or_headers(tmp_path: Path) -> None:
    written = write_ct_series(tmp_path / "in")
    assert PHI["PrivateValue"].encode() in written.files[0].read_bytes()  # the test data really has it
    for path, report, header in _deidentify_series(written, tmp_path / "out"):
        _assert_clean(path.read_bytes(), written)
        _assert_clean(report.to_json().encode(), written)
        _assert_clean(report.to_json(include_date_shift=True).encode(), written)
        _assert_clean(header.encode(), written)


def test_consistent_within_and_across_series_of_one_patient(tmp_path: Path) -> None:
    a = write_ct_series(tmp_path / "a", seed=1)
    b = write_ct_series(tmp_path / "b", seed=2, orientation="oblique")
    results = _deidentify_series(a, tmp_path / "out_a") + _deidentify_series(b, tmp_path / "out_b")
    assert {r.pseudonym for _, r, _ in results} == {patient_pseudonym(PHI["PatientID"], KEY)}
    assert {r.date_shift_days for _, r, _ in results} == {date_shift_days(PHI["PatientID"], KEY)}

    datasets = [pydicom.dcmread(path) for path, _, _ in results[: len(a.files)]]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds[keyword].value) for ds in datasets}
        assert len(values) == 1
    assert str(datasets[0].SeriesInstanceUID) == remap_uid(a.series_uid, KEY)
    sops = [str(ds.SOPInstanceUID) for ds in datasets]
    assert len(set(sops)) == len(sops)
    for ds in datasets:
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == CTImageStorage
        assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
        assert ds.PatientName == ds.PatientID == patient_pseudonym(PHI["PatientID"], KEY)
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID):
            assert len(uid) <= 64
            assert UID_RE.match(uid)
    # references inside sequences follow the remapping: slice k points at slice k-1's new SOP UID
    refs = {
        str(ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID)
        for ds in datasets
        if "ReferencedImageSequence" in ds
    }
    assert refs <= set(sops)
    assert len(refs) == len(sops) - 1


def test_different_patients_differ() -> None:
    assert patient_pseudonym("PID-1", KEY) != patient_pseudonym("PID-2", KEY)
    assert date_shift_days("PID-1", KEY) != date_shift_days("PID-2", KEY)
    assert patient_pseudonym("PID-1", KEY) != patient_pseudonym("PID-1", DeidKey("another-secret"))
    shifts = [date_shift_days(f"P{n}", DeidKey("s", max_date_shift_days=3)) for n in range(200)]
    assert set(shifts) == {-3, -2, -1, 1, 2, 3}
    assert re.fullmatch(r"anon-[0-9a-f]{12}", patient_pseudonym("PID-1", KEY))
    assert re.fullmatch(r"dcm_[0-9a-f]{10}", pseudonymous_case_id("1.2.3", KEY))


def test_dates_shift_by_exactly_the_offset(tmp_path: Path) -> None:
    written = write_ct_series(tmp_path / "in", n_slices=2)
    ds = pydicom.dcmread(written.files[0])
    deidentify(ds, KEY)
    offset = dt.timedelta(days=date_shift_days(PHI["PatientID"], KEY))
    expected = (dt.date(2024, 1, 15) + offset).strftime("%Y%m%d")
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate"):
        assert ds[keyword].value == expected
        dt.datetime.strptime(ds[keyword].value, "%Y%m%d")  # a valid DA
    assert ds.AcquisitionDateTime == expected + "101512.250000"
    assert ds.StudyTime == "101500"  # TM kept (113107)
    assert ds.PatientBirthDate == ""  # Z
    assert ds.PatientIdentityRemoved == "YES"
    assert [item.CodeValue for item in ds.DeidentificationMethodCodeSequence] == ["113100", "113107"]


def test_report_lists_tags_not_values(tmp_path: Path) -> None:
    written = write_ct_series(tmp_path / "in", n_slices=2)
    report = deidentify(pydicom.dcmread(written.files[1]), KEY)  # slice 1 has a ReferencedImageSequence
    actions = {(c.keyword, c.action) for c in report.changes}
    for expected in [
        ("PatientName", "replaced"),
        ("PatientID", "replaced"),
        ("PatientBirthDate", "emptied"),
        ("PatientSex", "emptied"),
        ("AccessionNumber", "emptied"),
        ("InstitutionName", "removed"),
        ("OperatorsName", "removed"),
        ("StudyDescription", "removed"),
        ("StudyDate", "date_shifted"),
        ("StudyInstanceUID", "uid_remapped"),
        ("MediaStorageSOPInstanceUID", "uid_remapped"),
        ("ReferencedSOPInstanceUID", "uid_remapped"),
    ]:
        assert expected in actions
    assert any(c.action == "private_removed" and c.tag.startswith("(0009,") for c in report.changes)
    assert not any(c.keyword == "SOPClassUID" for c in report.changes)
    data = json.loads(report.to_json())
    assert set(data) == {"pseudonym", "changes"}  # the date offset only on request
    assert json.loads(report.to_json(include_date_shift=True))["date_shift_days"] == report.date_shift_days
    assert report.to_json() == report.to_json()


def test_nested_sequences_names_uids_and_private_tags() -> None:
    ds = Dataset()
    ds.PatientID = "P-77"
    item = Dataset()
    item.ContentCreatorName = "NESTED^NAME"
    item.VerifyingObserverName = "WATSON^JOHN"
    item.ReferencedSOPInstanceUID = "1.2.3.4.5"
    item.ReferencedSOPClassUID = CTImageStorage
    item.add_new(0x00091010, "LO", "NESTED-PRIVATE")
    item.add_new(0x00401101, "SQ", [])  # a kept sequence with no items
    ds.SourceImageSequence = [item]
    ds.AnatomicRegionSequence = [Dataset()]
    ds.AnatomicRegionSequence[0].add_new(0x00081060, "PN", "READER^DEEP")  # PN anywhere is emptied
    ds.add_new(0x60003000, "OW", b"\x00\x01")  # overlay data: removed
    deidentify(ds, KEY)
    out = ds.SourceImageSequence[0]
    assert out.ContentCreatorName == ""
    assert out.VerifyingObserverName == "ANONYMIZED"
    assert out.ReferencedSOPInstanceUID == remap_uid("1.2.3.4.5", KEY)
    assert out.ReferencedSOPClassUID == CTImageStorage
    assert 0x00091010 not in out
    assert 0x60003000 not in ds
    assert "READER^DEEP" not in str(ds)


def test_header_json_is_deterministic_and_guarded(tmp_path: Path) -> None:
    written = write_ct_series(tmp_path / "in", n_slices=2)
    ds = pydicom.dcmread(written.files[0])
    with pytest.raises(ValueError, match="not de-identified"):
        deidentified_header_json(ds)
    deidentify(ds, KEY)
    text = deidentified_header_json(ds)
    assert text == deidentified_header_json(ds)
    data = json.loads(text)
    assert "7FE00010" not in data
    assert "00100010" in data
    assert "PixelData" in ds  # the dataset itself is untouched


def test_deidentified_series_still_reads_identically(tmp_path: Path) -> None:
    written = write_ct_series(tmp_path / "in", orientation="oblique", shape=(16, 14))
    _deidentify_series(written, tmp_path / "out")
    [series] = find_series(tmp_path / "out")
    assert series.series_uid == remap_uid(written.series_uid, KEY)
    original = read_series(find_series(tmp_path / "in")[0], "a")
    anonymised = read_series(series, "a")
    np.testing.assert_array_equal(anonymised.array, original.array)
    np.testing.assert_allclose(anonymised.affine, original.affine)


def test_key_validation_and_profile_table() -> None:
    with pytest.raises(ValueError, match="secret"):
        DeidKey("")
    with pytest.raises(ValueError, match="max_date_shift_days"):
        DeidKey("s", max_date_shift_days=0)
    assert "unit-test-secret" not in repr(KEY)
    unknown = [kw for kw in [*deid._PROFILE, *deid._KEEP_UIDS] if tag_for_keyword(kw) is None]
    assert unknown == []  # a typo in the profile table would silently keep an attribute
    uid = remap_uid("1.2.840.113619.2.55.3.604688119", KEY)
    assert uid.startswith("2.25.")
    assert len(uid) <= 64
    assert UID_RE.match(uid)
