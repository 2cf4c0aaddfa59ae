"""One case-id rule (lesionflow.case_id) for ingest, the Zarr stores and the quarantine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lesionflow import case_id as rule
from lesionflow import quarantine
from lesionflow.case_id import InvalidCaseId, case_id_problem, check_case_id, safe_case_id
from lesionflow.errors import LesionflowError
from lesionflow.io import sources
from lesionflow.io.deid import DeidKey, pseudonymous_case_id
from lesionflow.io.sources import CaseSource, DatasetInfo, Discovery, discover
from lesionflow.store import zarr_store
from lesionflow.store.zarr_store import CaseArrays, list_cases, write_case

# Arbitrary text, plus text drawn from the characters that matter to the rule (so that valid ids are common).
ANY_TEXT = (
    st.text(max_size=300)
    | st.text(alphabet="aZ09._-/\\ \n\x00é", max_size=12)
    | st.sampled_from(["labels", "LABELS", "zarr.json", "-1", "..", ".", "", "ok\n", "a" * 200, "a" * 201])
)


def _old_store_rule(case_id: str) -> bool:
    """The store's check before the rule was shared: what a Zarr store has always accepted."""
    return (
        bool(case_id)
        and case_id[0] not in "._-"
        and "/" not in case_id
        and "\\" not in case_id
        and (case_id != "labels")
    )


def _ingest_accepts(case_id: str) -> bool:
    """Whether discovery keeps a case with this id (the ingest-level decision, through the real code path)."""
    found = Discovery(DatasetInfo("d", ("CT",), {}), cases=[CaseSource(case_id, "train", relative="x")])
    return [c.case_id for c in sources._finish(found).cases] == [case_id]


def _store_accepts(case_id: str) -> bool:
    try:
        zarr_store.check_case_id(case_id)
    except ValueError:
        return False
    return True


def test_ingest_and_store_use_the_same_function() -> None:
    assert zarr_store.check_case_id is rule.check_case_id
    assert sources.case_id_problem is rule.case_id_problem
    assert sources.safe_case_id is rule.safe_case_id
    assert quarantine.case_id_problem is rule.case_id_problem


@settings(max_examples=500, deadline=None)
@given(ANY_TEXT)
def test_ingest_and_store_agree_on_every_string(value: str) -> None:
    accepted = case_id_problem(value) is None
    assert _ingest_accepts(value) == accepted == _store_accepts(value)
    if accepted:
        assert check_case_id(value) == value
        assert _old_store_rule(value)  # never looser than the store has always been
        assert len(f".tmp-{value}-{'0' * 16}".encode()) <= 255  # the store's temp folder name fits a file name
    else:
        with pytest.raises(InvalidCaseId) as info:
            check_case_id(value)
        assert isinstance(info.value, ValueError)
        assert isinstance(info.value, LesionflowError)
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith("invalid case id")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_safe_case_id_gives_safe_characters_and_the_rule_decides(name: str) -> None:
    candidate = safe_case_id(name)
    assert candidate
    assert set(candidate) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
    problem = case_id_problem(candidate)
    # What sanitising cannot fix: a leading '-', a reserved name, a long name.
    assert (problem is None) == (
        not candidate.startswith("-") and candidate.casefold() not in rule.RESERVED and len(candidate) <= 200
    )


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=64))
def test_dicom_pseudonyms_are_valid_case_ids(series_uid: str) -> None:
    assert case_id_problem(pseudonymous_case_id(series_uid, DeidKey("s3cret"))) is None


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("-1", "starting with a letter or digit"),
        ("labels", "reserved"),
        ("Zarr.JSON", "reserved"),
        ("a/b", "only letters, digits"),
        ("", "empty"),
        ("x" * 201, "at most 200"),
    ],
)
def test_one_clear_line_naming_the_value_and_the_fix(value: str, words: str) -> None:
    problem = case_id_problem(value)
    assert problem is not None
    assert words in problem
    assert repr(value[:40]) in problem
    assert any(fix in problem for fix in ("rename", "shorten", "give the case a name"))


def test_ingest_rejects_ids_the_store_would_refuse(tmp_path: Path) -> None:
    for name in ("-1.nii.gz", "labels.nii.gz", "zarr.json.nii.gz", "ok_1.nii.gz"):
        (tmp_path / name).write_bytes(b"")  # discovery reads no voxels
    found = discover(tmp_path)
    assert [c.case_id for c in found.cases] == ["ok_1"]
    rejected = {r.case_id: r for r in found.rejected}
    assert sorted(rejected) == ["-1", "labels", "zarr.json"]
    assert {r.code for r in rejected.values()} == {"invalid_case_id"}
    assert "-1.nii.gz" in rejected["-1"].message  # names the source file to rename
    assert str(rejected["-1"]).count("\n") == 0


def test_store_refuses_what_ingest_refuses(tmp_path: Path) -> None:
    arrays = CaseArrays(np.zeros((1, 4, 4, 4), np.float32), None)
    attrs = {"spacing": [1.0, 1.0, 1.0]}
    write_case(tmp_path / "s", "ok_1", arrays, attrs, chunk_shape=(4, 4, 4))
    root_meta = (tmp_path / "s" / "zarr.json").read_bytes()
    for bad in ("-1", "zarr.json", "Labels"):
        with pytest.raises(InvalidCaseId, match="invalid case id"):
            write_case(tmp_path / "s", bad, arrays, attrs, chunk_shape=(4, 4, 4))
    assert (tmp_path / "s" / "zarr.json").read_bytes() == root_meta  # the root metadata survived
    assert list_cases(tmp_path / "s") == ["ok_1"]


def test_quarantine_folders_of_invalid_ids_are_safe_and_distinct(tmp_path: Path) -> None:
    ids = ["ok_1", "-1", "labels", "", "..", "a/b", "a_b"]
    folders = [quarantine.case_dir(tmp_path, i) for i in ids]
    assert folders[0] == tmp_path / "ok_1"
    assert folders[-1] == tmp_path / "a_b"
    assert len(set(folders)) == len(ids)
    assert all(f.parent == tmp_path for f in folders)
    assert all(f.name.startswith("_") for f in folders[1:-1])  # never a valid case id: no collision possible
    for i in ids:
        quarantine.record(tmp_path, quarantine.Rejection(i, "ingest", "invalid_case_id", "rename it"))
    reasons = quarantine.read_all(tmp_path)
    assert sorted(reasons) == sorted(ids)  # keyed by the recorded id, whatever the folder
    assert json.loads((folders[1] / "reason.json").read_text())["case_id"] == "-1"
