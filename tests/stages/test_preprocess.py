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
from lesionflow.stages.registry import STAGES
from lesionflow.store.zarr_store import ARRAY_PATHS, list_cases, read_case, read_case_attrs
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
    ome = json.loads((STORE.at(ws) / "OME" / "zarr.json").read_text())["attributes"]["ome"]
    assert ome["series"] == list_cases(STORE.at(ws))  # viewers find the cases from the store root
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


def test_compression_param_reaches_the_store_and_keeps_the_voxels(msd_workspace: Workspace) -> None:
    ws = msd_workspace
    _run_all(ws, "preprocess.workers=1")
    before = read_case(STORE.at(ws), "case_000")

    def inner_codecs() -> list[str]:
        meta = json.loads((STORE.at(ws) / "case_000" / ARRAY_PATHS["image"] / "zarr.json").read_text())
        (sharding,) = meta["codecs"]
        return [codec["name"] for codec in sharding["configuration"]["codecs"]]

    assert inner_codecs() == ["bytes", "zstd"]
    params = load_params(ws.params_file, ["preprocess.workers=1", "preprocess.compression=blosc-lz4"])
    assert {s.stage: s.reason for s in status(ws, params)}["preprocess"] == "param preprocess.compression changed"
    assert run_cached("preprocess", ws, params, STAGES["preprocess"].run).summary["n_processed"] == 4
    assert inner_codecs() == ["bytes", "blosc"]
    after = read_case(STORE.at(ws), "case_000")
    assert after.image.tobytes() == before.image.tobytes()
    assert after.label is not None
    assert before.label is not None
    assert np.array_equal(after.label, before.label)


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


def test_cases_finished_before_a_kill_are_kept_and_only_the_rest_recomputed(msd_workspace: Workspace) -> None:
    """Issue 17 item 10: a killed run leaves complete store groups but no metadata.csv (written at the end).

    The rerun must keep those groups (their metadata row travels in their attrs) and recompute only the
    cases the killed run never finished, with the bytes of an uninterrupted run.
    """
    import shutil

    from lesionflow.catalog.artifacts import summary_artifact
    from lesionflow.store.zarr_store import case_digest

    ws = msd_workspace
    _run_all(ws, "preprocess.workers=1")
    store = STORE.at(ws)
    digests = {c: case_digest(store, c) for c in list_cases(store)}
    metadata = METADATA.at(ws).read_bytes()
    # What SIGKILL after two finished cases leaves: two complete groups, neither metadata.csv nor the summary.
    METADATA.at(ws).unlink()
    summary_artifact("preprocess").at(ws).unlink()
    for unfinished in ("case_002", "case_003"):
        shutil.rmtree(store / unfinished)
    again = STAGES["preprocess"].run(ws, load_params(ws.params_file, ["preprocess.workers=1"]))
    assert again.summary["n_processed"] == 2
    assert again.summary["n_skipped"] == 2
    assert {c: case_digest(store, c) for c in list_cases(store)} == digests
    assert METADATA.at(ws).read_bytes() == metadata


def _zero_background_head(spacing: tuple[float, float, float], shape: tuple[int, int, int], seed: int) -> tuple:
    """A T1-like head: noisy tissue in an ellipsoid, a brighter spherical lesion (label 1), exact 0 outside."""
    rng = np.random.default_rng(seed)
    world = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1) * np.array(spacing)
    centre = (np.array(shape) - 1) / 2 * np.array(spacing)
    head = (((world - centre) / np.array([15.0, 13.0, 13.0])) ** 2).sum(axis=-1) < 1
    lesion = np.linalg.norm(world - centre - [1.0, -0.5, 0.5], axis=-1) < 6.0
    image = rng.normal(300.0, 40.0, shape).astype(np.float32) + np.float32(150.0) * lesion
    image[~head] = 0.0  # skull-stripped: the background is exactly zero
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-16.0, -14.0, -14.0]
    return image, lesion.astype(np.uint8), affine


def test_zero_background_mr_at_mixed_spacings_passes_the_processed_gate(workspace: Path) -> None:
    """Issue 17 item 11: 1 mm and 2x2x3 mm MR with exact-zero background, resampled to one grid, default params.

    Before the fix the gate recomputed the z-score on the resampled image's non-zero voxels (cubic resampling
    smears the zero background), found std ~0.7 and rejected every resampled case, failing the gate.
    """
    root = workspace / "data" / "demo"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    write_msd(root, n_train=0, n_test=0)  # dataset.json only; the cases follow
    cases = {"fine_a": ((1.0, 1.0, 1.0), (32, 28, 28)), "fine_b": ((1.0, 1.0, 1.0), (32, 28, 28))}
    cases |= {"coarse_a": ((2.0, 2.0, 3.0), (16, 14, 10)), "coarse_b": ((2.0, 2.0, 3.0), (16, 14, 10))}
    for seed, (name, (spacing, shape)) in enumerate(cases.items()):
        image, label, affine = _zero_background_head(spacing, shape, seed)
        add_msd_entry(root, name, image, label, affine=affine)
    ws = Workspace.at(workspace)
    results = _run_all(ws, "preprocess.workers=1")  # workers only: every gate setting is the default
    plan = json.loads((ws.root / "data" / "processed" / "plans.json").read_text())
    target = tuple(plan["target_spacing"])
    assert target == pytest.approx((1.5, 1.5, 2.0))  # the median: every case is resampled
    gate = results["validate-processed"].summary
    assert gate["n_rejected"] == 0, gate["rejected"]
    assert json.loads((ws.root / "data" / "processed" / "accepted.json").read_text())["cases"] == sorted(cases)
    rows = read_metadata(ws)
    for case_id in cases:
        row = rows[case_id]
        assert float(row["zscore_mean_abs"]) < 1e-5  # measured before resampling: exact
        assert float(row["zscore_std_dev"]) < 1e-5
        assert 0.0 <= float(row["range_excess"]) < 0.1
        attrs = read_case_attrs(STORE.at(ws), case_id)
        assert spacing_of(np.asarray(attrs["affine"])) == pytest.approx(target, abs=1e-12)  # geometry exact
        (stats,) = attrs["preprocess_record"]["normalization"]
        assert stats["masked"]
        assert stats["scheme"] == "zscore"
        assert stats["mean"] == pytest.approx(0.0, abs=1e-5)
        assert stats["std"] == pytest.approx(1.0, abs=1e-5)


def test_failed_processed_gate_leaves_no_accepted_list_and_a_stale_one_is_refused(msd_workspace: Workspace) -> None:
    """Issue 17 item 1 (processed gate): the accepted list is a verdict on the metadata it judged, or nothing."""
    from lesionflow.catalog.artifacts import ACCEPTED
    from lesionflow.catalog.readers import accepted_cases
    from lesionflow.errors import GateFailed, SourceError

    ws = msd_workspace
    _run_all(ws, "preprocess.workers=1")
    assert accepted_cases(ws) == list_cases(STORE.at(ws))
    strict = load_params(ws.params_file, ["quality.processed.shape_range=[1000, 2000]"])  # every case too small
    with pytest.raises(GateFailed, match="processed quality gate failed"):
        STAGES["validate-processed"].run(ws, strict)
    assert not ACCEPTED.at(ws).exists()  # the earlier passing list is gone: nothing reads it as accepted
    with pytest.raises(SourceError, match=r"data/processed/accepted.json does not exist; run `lesionflow stage "):
        accepted_cases(ws)
    STAGES["validate-processed"].run(ws, load_params(ws.params_file))
    assert accepted_cases(ws) == list_cases(STORE.at(ws))
    # metadata.csv rewritten after the verdict (preprocess rerun on other data): the old list is not for it
    METADATA.at(ws).write_text(METADATA.at(ws).read_text().replace("case_003", "case_999"))
    with pytest.raises(SourceError, match=r"accepted.json judged another data/processed/metadata.csv") as info:
        accepted_cases(ws)
    assert "lesionflow stage validate-processed" in str(info.value)
    assert "\n" not in str(info.value)
