"""The ingest fuzz corpus (issue 17): broken scans of every format through ONE ingest of one loose folder.

Every kind is generated here (tests/helpers/broken_files.py), nothing is checked in. Each broken kind must be
quarantined under its own case id with one line that quotes the offending value and says how to fix it;
each valid kind in the same source must be stored with exact values and geometry; nothing may print a
traceback. Hypothesis adds NIfTI headers nobody thought of: whatever the reader accepts, the writer stores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lesionflow.catalog.artifacts import QUARANTINE, RAW_CASES, RAW_MANIFEST
from lesionflow.errors import CaseRejected
from lesionflow.io.case_reader import _checked
from lesionflow.io.deid import pseudonymous_case_id
from lesionflow.io.volumes import Volume, nifti_bytes, read_volume
from lesionflow.manifest import read_manifest
from lesionflow.params import load_params
from lesionflow.quarantine import case_dir
from lesionflow.stages import ingest
from lesionflow.stages.base import StageResult
from lesionflow.workspace import Workspace
from tests.helpers import broken_files as bf
from tests.helpers.dicom_factory import write_ct_series

REPO = Path(__file__).resolve().parents[2]
KINDS = bf.nifti_kinds() + bf.label_kinds() + bf.itk_kinds()
DICOM_KINDS = bf.dicom_kinds()
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_FIX = re.compile(r"; \S")  # lesionflow's one-line form: "<what is wrong, with the value>; <the fix>"


def _quiet(items, description, total):
    yield from items


@contextmanager
def _captured_fds() -> Iterator[list[str]]:
    """Everything written to fd 1 and 2 (Python, C++ readers) while the block runs."""
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = [os.dup(1), os.dup(2)]
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            out.append(sink.read().decode("utf-8", "replace"))


@dataclass(frozen=True)
class Corpus:
    ws: Workspace
    source: Path
    result: StageResult
    output: str
    seconds: float
    dicom_ids: dict[str, str]  # kind name -> pseudonymous case id
    dicom_written: dict[str, Any]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("fuzz")
    ws_root = root / "ws"
    ws_root.mkdir()
    shutil.copy(REPO / "params.yaml", ws_root / "params.yaml")
    source = root / "source"
    source.mkdir()
    for kind in KINDS:
        kind.write(source)
    uids = {k.name: k.write(source / "dicom" / k.name) for k in DICOM_KINDS}
    ws = Workspace.at(ws_root)
    params = load_params(ws.params_file, [f"ingest.source={source}"])
    key = ingest._deid_key(params)
    start = time.perf_counter()
    with _captured_fds() as captured:
        result = ingest.run(ws, params, progress=_quiet)
    seconds = time.perf_counter() - start
    ids = {name: pseudonymous_case_id(uid, key) for name, uid in uids.items()}
    return Corpus(ws, source, result, captured[0], seconds, ids, uids)


def _reason(corpus: Corpus, case_id: str) -> dict[str, Any]:
    path = case_dir(QUARANTINE.at(corpus.ws), case_id) / "reason.json"
    assert path.exists(), f"{case_id} was not quarantined; rejected: {corpus.result.summary['rejected']}"
    return json.loads(path.read_text())


def _assert_one_line(corpus: Corpus, case_id: str, code: str, value: str) -> None:
    reason = _reason(corpus, case_id)
    message = reason["message"]
    assert reason["case_id"] == case_id
    assert reason["code"] == code, message
    assert "\n" not in message
    assert "Traceback" not in message
    assert value in message, f"{value!r} not in {message!r}"
    assert _FIX.search(message), f"no fix in {message!r}"
    finding = {f.subject: f for f in corpus.result.findings}[case_id]
    assert (finding.code, finding.detail) == (code, message)
    assert not (RAW_CASES.at(corpus.ws) / case_id).exists()


def test_corpus_size_time_and_no_traceback(corpus: Corpus) -> None:
    assert len(KINDS) + len(DICOM_KINDS) >= 40
    assert "Traceback" not in corpus.output, corpus.output
    assert "MemoryError" not in corpus.output
    n_valid = sum(1 for k in KINDS if not k.code) + sum(1 for k in DICOM_KINDS if not k.code)
    assert corpus.result.summary["n_added"] == n_valid
    assert not (corpus.ws.root / "data" / "raw" / ".staging").exists()
    print(f"\nfuzz corpus: {len(KINDS) + len(DICOM_KINDS)} kinds, one ingest in {corpus.seconds:.1f} s")
    assert corpus.seconds < 60


@pytest.mark.parametrize("kind", [k for k in KINDS if k.code], ids=lambda k: k.name)
def test_broken_kind_is_quarantined_with_one_line(corpus: Corpus, kind: bf.Kind) -> None:
    _assert_one_line(corpus, kind.name, kind.code, kind.value)


@pytest.mark.parametrize("kind", [k for k in DICOM_KINDS if k.code], ids=lambda k: k.name)
def test_broken_dicom_kind_is_quarantined_with_one_line(corpus: Corpus, kind: bf.DicomKind) -> None:
    _assert_one_line(corpus, corpus.dicom_ids[kind.name], kind.code, kind.value)


def _source_file(source: Path, name: str) -> Path:
    return next(p for p in source.iterdir() if p.name.split(".")[0] == name)


@pytest.mark.parametrize("kind", [k for k in KINDS if not k.code], ids=lambda k: k.name)
def test_valid_kind_is_stored_exactly(corpus: Corpus, kind: bf.Kind) -> None:
    folder = RAW_CASES.at(corpus.ws) / kind.name
    records = {r.case_id: r for r in read_manifest(RAW_MANIFEST.at(corpus.ws))}
    assert kind.name in records, corpus.result.summary["rejected"].get(kind.name)
    stored = nib.load(folder / "image.nii.gz")
    if "array" in kind.accept:
        expected = np.asarray(kind.accept["array"])
        np.testing.assert_array_equal(np.asanyarray(stored.dataobj), expected)
        assert stored.get_data_dtype() == np.dtype(str(kind.accept.get("dtype", expected.dtype)))
    if kind.fmt.startswith("nifti"):  # the stored affine is the source's, bit for bit
        np.testing.assert_array_equal(stored.affine, nib.load(_source_file(corpus.source, kind.name)).affine)
    else:  # ITK geometry (float64 text) stored as a float32 NIfTI affine
        np.testing.assert_allclose(stored.affine, np.asarray(kind.accept["affine"]), atol=1e-6)
    if "label" in kind.accept:
        label = nib.load(folder / "label.nii.gz")
        np.testing.assert_array_equal(np.asanyarray(label.dataobj), np.asarray(kind.accept["label"]))
        assert label.get_data_dtype() == np.dtype(str(kind.accept["label_dtype"]))
        assert records[kind.name].label_values == json.dumps(sorted(np.unique(kind.accept["label"]).tolist()))


def test_valid_dicom_series_is_stored_exactly(corpus: Corpus, tmp_path: Path) -> None:
    case_id = corpus.dicom_ids["dcm_valid"]
    stored = nib.load(RAW_CASES.at(corpus.ws) / case_id / "image.nii.gz")
    reference = write_ct_series(tmp_path, n_slices=5, seed=15)  # the same series again, to know its truth
    np.testing.assert_array_equal(np.asanyarray(stored.dataobj), reference.array_hu)
    np.testing.assert_allclose(stored.affine, LPS_TO_RAS @ reference.affine_lps, atol=1e-5)


# -- Hypothesis: NIfTI headers nobody thought of --------------------------------------------------------------

_DATATYPES = [2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280, 32, 128, 1536, 1792, 2304, 9999, 0]
_SPACING = st.sampled_from([1.0, 0.5, 2.5, 0.0, -1.0, float("nan"), float("inf"), 1e-30, 1e30])


@st.composite
def _nifti_files(draw: st.DrawFn) -> bytes:
    version = draw(st.sampled_from([1, 2]))
    ndim = draw(st.integers(1, 5))
    small = st.integers(0, 7)
    limit = 32767 if version == 1 else 2**40
    dims = tuple(draw(st.one_of(small, small, st.sampled_from([-3, limit]))) for _ in range(ndim))
    dtype = np.dtype(draw(st.sampled_from(["u1", "i2", "f4", "f8", "i8", "c8"])))
    data_shape = tuple(min(max(d, 0), 7) for d in dims)
    data = np.zeros(data_shape, dtype=dtype)
    fields: dict[str, Any] = {"pixdim": np.array([1.0, *(draw(_SPACING) for _ in range(3)), 1, 1, 1, 1])}
    if draw(st.booleans()):
        fields["datatype"] = draw(st.sampled_from(_DATATYPES))
    if draw(st.booleans()):
        rows = [[draw(st.sampled_from([0.0, 1.0, -1.0, 0.3, float("nan")])) for _ in range(4)] for _ in range(3)]
        fields.update(sform_code=1, srow_x=rows[0], srow_y=rows[1], srow_z=rows[2])
    else:
        fields.update(sform_code=0, quatern_b=draw(st.sampled_from([0.0, 0.5, float("nan")])))
    blob = bf.nifti_bytes(data, version=version, dims=dims, **fields)
    cut = draw(st.sampled_from([None, None, 4, 300, 348, 540, len(blob) - 1]))
    return blob if cut is None else blob[:cut]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=_nifti_files(), gz=st.booleans())
def test_hypothesis_nifti_headers_are_rejected_in_one_line_or_stored(blob: bytes, gz: bool, tmp_path: Path) -> None:
    path = bf.write(tmp_path / ("h.nii.gz" if gz else "h.nii"), blob)
    rejection: CaseRejected | None = None
    try:
        volume = _checked(read_volume(path, "hyp"), "hyp", path.name)
    except CaseRejected as rej:  # the only way out besides a storable volume
        rejection = rej
    if rejection is not None:
        assert rejection.case_id == "hyp"
        assert rejection.message
        assert "\n" not in rejection.message
        assert _FIX.search(rejection.message), rejection.message
        return
    assert volume.array.size <= 8**5
    nifti_bytes(Volume(volume.array, volume.affine, volume.header))  # what the checks pass, the writer stores
