"""plan -> preprocess -> validate-processed on real files and a real Dask cluster; work is counted, not timed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lesionflow.caching import run_cached, status
from lesionflow.catalog.artifacts import METADATA, QUARANTINE, RAW_CASES, RAW_MANIFEST, STORE
from lesionflow.catalog.readers import read_metadata
from lesionflow.manifest import read_manifest
from lesionflow.params import load_params
from lesionflow.preprocess.geometry import invert_to_raw, spacing_of
from lesionflow.stages import STAGES
from lesionflow.store.zarr_store import list_cases, read_case, read_case_attrs
from lesionflow.workspace import Workspace
from tests.helpers.volumes import add_msd_entry, sphere_case, write_msd

ORDER = ("ingest", "validate-raw", "plan", "preprocess", "validate-processed")


def _run_all(ws: Workspace, *overrides: str) -> dict[str, object]:
    params = load_params(ws.params_file, list(overrides))
    return {name: run_cached(name, ws, params, STAGES[name].run) for name in ORDER}


@pytest.fixture
def msd_workspace(workspace: Path, tmp_path: Path) -> Workspace:
    write_msd(workspace / "data" / "demo", n_train=3, n_test=1)
    return Workspace.at(workspace)


def test_pipeline_to_store_and_no_work_on_rerun(msd_workspace: Workspace) -> None:
    ws = msd_workspace
    first = _run_all(ws, "preprocess.workers=1")
    assert first["preprocess"].summary["n_processed"] == 4
    plan = json.loads(((ws.root / "data" / "processed") / "plans.json").read_text())
    assert plan["target_spacing"] == pytest.approx([1.0, 1.2, 2.0])  # median of identical spacings
    assert list_cases(STORE.at(ws)) == ["case_000", "case_001", "case_002", "case_003"]
    arrays = read_case(STORE.at(ws), "case_001")
    attrs = read_case_attrs(STORE.at(ws), "case_001")
    assert arrays.image.dtype == np.float32
    assert arrays.image.ndim == 4
    assert spacing_of(np.asarray(attrs["affine"])) == pytest.approx(tuple(plan["target_spacing"]))
    assert attrs["plan_hash"] == first["preprocess"].summary["preprocessing_hash"]
    assert json.loads(((ws.root / "data" / "processed") / "accepted.json").read_text())["cases"] == list_cases(
        STORE.at(ws)
    )
    # the stored label maps back to the raw grid exactly (same spacing: crop + reorientation only)
    from lesionflow.preprocess.geometry import PreprocessRecord

    record = PreprocessRecord.from_dict(attrs["preprocess_record"])
    raw_label = np.asanyarray(nib.load(RAW_CASES.at(ws) / "case_001" / "label.nii.gz").dataobj)
    np.testing.assert_array_equal(invert_to_raw(arrays.label, record), raw_label)
    again = _run_all(ws, "preprocess.workers=1")
    assert all(result.cached for result in again.values())  # no stage did any work
    rows = status(ws, load_params(ws.params_file, ["preprocess.workers=1"]))
    assert all(s.up_to_date for s in rows if s.stage in ORDER)


def test_one_new_case_is_the_only_work(msd_workspace: Workspace) -> None:
    ws = msd_workspace
    _run_all(ws, "preprocess.workers=1")
    digests = {cid: row["digest"] for cid, row in read_metadata(ws).items()}
    image, label = sphere_case(11)
    add_msd_entry(ws.root / "data" / "demo", "case_new", image.array, label.array, affine=image.affine)
    before = json.loads(((ws.root / "data" / "processed") / "plans.json").read_text())
    after = _run_all(ws, "preprocess.workers=1")
    # the new case moves the fingerprint (a new plan hash) but not spacing or normalization,
    # so exactly the new case is processed
    assert after["plan"].summary["plan_hash"] != before["plan_hash"]
    assert after["preprocess"].summary["n_processed"] == 1
    rows = read_metadata(ws)
    assert {cid: rows[cid]["digest"] for cid in digests} == digests


def test_param_change_reruns_and_status_says_why(msd_workspace: Workspace) -> None:
    ws = msd_workspace
    _run_all(ws, "preprocess.workers=1")
    params = load_params(ws.params_file, ["preprocess.workers=1", "preprocess.image_dtype=float16"])
    reasons = {s.stage: s.reason for s in status(ws, params)}
    assert reasons["preprocess"] == "param preprocess.image_dtype changed"
    assert reasons["validate-processed"] == "runs after stale stage preprocess"
    result = run_cached("preprocess", ws, params, STAGES["preprocess"].run)
    assert result.summary["n_processed"] == 4
    assert read_case(STORE.at(ws), "case_000").image.dtype == np.float16


def test_same_inputs_same_bytes_in_two_workspaces(tmp_path: Path, workspace: Path) -> None:
    digests = []
    for name in ("a", "b"):
        root = tmp_path / name
        root.mkdir()
        (root / "params.yaml").write_text((workspace / "params.yaml").read_text())
        write_msd(root / "data" / "demo", n_train=3, n_test=1)
        ws = Workspace.at(root)
        _run_all(ws, f"preprocess.workers={1 if name == 'a' else 2}")
        digests.append(((ws.root / "data" / "processed") / "metadata.csv").read_bytes())
    assert digests[0] == digests[1]


def test_constant_image_is_quarantined_and_others_go_on(msd_workspace: Workspace) -> None:
    ws = msd_workspace
    _, label = sphere_case(2)
    add_msd_entry(
        ws.root / "data" / "demo",
        "flat",
        np.full((20, 18, 16), 7.0, np.float32),
        label.array,
        affine=np.diag([1.0, 1.2, 2.0, 1.0]),
    )
    results = _run_all(ws, "preprocess.workers=1", "quality.max_reject_fraction=0.5")
    assert results["preprocess"].summary["n_failed"] == 1
    reason = json.loads((QUARANTINE.at(ws) / "flat" / "reason.json").read_text())
    assert reason["code"] == "preprocess_failed"
    assert "std is 0" in reason["message"]
    assert "flat" not in list_cases(STORE.at(ws))
    assert len(list_cases(STORE.at(ws))) == 4


def test_killed_run_leaves_no_half_case_and_rerun_matches_clean_run(tmp_path: Path, workspace: Path) -> None:
    """SIGKILL the whole preprocess run (client and workers) mid-way; the rerun gives the clean run's bytes."""
    runs = {}
    for name in ("killed", "clean"):
        root = tmp_path / name
        root.mkdir()
        (root / "params.yaml").write_text((workspace / "params.yaml").read_text())
        write_msd(root / "data" / "demo", n_train=6, n_test=0)
        ws = Workspace.at(root)
        params = load_params(ws.params_file, ["preprocess.workers=1"])
        for stage in ("ingest", "validate-raw", "plan"):
            run_cached(stage, ws, params, STAGES[stage].run)
        runs[name] = ws
    ws = runs["killed"]
    exe = str(Path(sys.executable).with_name("lesionflow"))
    proc = subprocess.Popen(
        [exe, "stage", "preprocess", "--set", "preprocess.workers=1"],
        cwd=ws.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    store = STORE.at(ws)
    while time.monotonic() < deadline and proc.poll() is None:
        if store.exists() and (any(p.name.startswith(".tmp-") for p in store.iterdir()) or list_cases(store)):
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list_cases(store)) < 6, "the run finished before it could be killed"
    for name, w in runs.items():
        run_cached("preprocess", w, load_params(w.params_file, ["preprocess.workers=1"]), STAGES["preprocess"].run)
        assert len(read_manifest(RAW_MANIFEST.at(w))) == 6, name
    assert METADATA.at(runs["killed"]).read_bytes() == (METADATA.at(runs["clean"])).read_bytes()
    assert not [p for p in store.iterdir() if p.name.startswith((".tmp-", ".old-"))]


@pytest.mark.slow
def test_volume_too_big_for_its_worker_is_quarantined(msd_workspace: Workspace) -> None:
    """A real out-of-memory: the nanny kills the worker on the big case; the case is quarantined, others go on."""
    ws = msd_workspace
    rng = np.random.default_rng(0)
    big = rng.normal(100, 5, (400, 400, 300)).astype(np.float32)  # 192 MB; preprocessing holds several copies
    label = np.zeros(big.shape, np.uint8)
    label[190:210, 190:210, 140:160] = 1
    add_msd_entry(ws.root / "data" / "demo", "huge", big, label, affine=np.diag([1.0, 1.2, 2.0, 1.0]))
    params = [
        "preprocess.workers=1",
        "preprocess.memory_limit=600MB",
        "quality.max_reject_fraction=0.5",
        "plan.target_spacing=[1.0, 1.2, 2.0]",
    ]
    results = _run_all(ws, *params)
    reason = json.loads((QUARANTINE.at(ws) / "huge" / "reason.json").read_text())
    assert reason["code"] == "worker_died"
    assert "memory_limit" in reason["message"]
    assert results["preprocess"].summary["n_failed"] == 1
    assert list_cases(STORE.at(ws)) == ["case_000", "case_001", "case_002", "case_003"]


def test_unreachable_scheduler_is_one_line_naming_the_address(
    msd_workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lesionflow import parallel
    from lesionflow.errors import LesionflowError
    from tests.helpers.moto_server import _free_port

    monkeypatch.setattr(parallel, "CONNECT_TIMEOUT_S", 2.0)  # the real connect loop, shorter
    address = f"tcp://127.0.0.1:{_free_port()}"  # nothing listens there
    params = load_params(msd_workspace.params_file, [f"preprocess.scheduler_address={address}"])
    for name in ORDER[:3]:
        run_cached(name, msd_workspace, params, STAGES[name].run)
    with pytest.raises(LesionflowError) as err:
        run_cached("preprocess", msd_workspace, params, STAGES["preprocess"].run)
    assert address in str(err.value)
    assert "\n" not in str(err.value)
    assert not list_cases(STORE.at(msd_workspace))  # nothing half-written
