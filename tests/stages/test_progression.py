"""PIE trajectories through the stages (train-generator -> synthesize -> validate-synthetic) and the progression flow.

Workspace: the organ-sphere cases of test_synthesis.py, with ``synth.method = pie`` (trajectories only) and a
pie model trained for a few steps: the tests check geometry, exactness, caching, the gate's invariants and the bad
inputs; the trend itself is checked on a model that learned one in tests/synth/test_pie.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lesionflow.caching import run_cached
from lesionflow.catalog.artifacts import (
    PROGRESSION_MANIFEST,
    PROGRESSION_STORE,
    STORE,
    SYNTHETIC_STORE,
    accepted_beside,
)
from lesionflow.errors import ParamsError, SourceError
from lesionflow.params import load_params
from lesionflow.stages.registry import STAGES
from lesionflow.stages.synthesize.trajectories import run_one
from lesionflow.store.zarr_store import read_case, read_case_attrs, write_case
from lesionflow.synth.rois import crop
from lesionflow.synth.trajectory_store import crop_affine, list_trajectories, read_trajectory
from lesionflow.workspace import Workspace
from tests.stages.test_synthesis import SYNTH, _set

PIE = {
    "synth__generators": ["pie"],
    "synth__method": "pie",
    "synth__remove_per_case": 0,
    "synth__pie__cases": 2,
    "synth__pie__iterations": 3,
    "synth__pie__steps": 20,
    "quality__synthetic__min_progression_rho": -1.0,  # a 20-step model has no trend to speak of
    "quality__synthetic__max_step_change_ratio": 1000.0,
}


@pytest.fixture(scope="module")
def progressed(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("progressed") / "ws"
    shutil.copytree(prepared, root)
    _set(root / "params.yaml", **PIE)
    ws = Workspace.at(root)
    params = load_params(ws.params_file)
    for name in SYNTH:
        assert run_cached(name, ws, params, STAGES[name].run).ok
    return root


def test_trajectories_keep_geometry_frame_zero_and_the_outside_bound(progressed: Path) -> None:
    ws = Workspace.at(progressed)
    ids = list_trajectories(PROGRESSION_STORE.at(ws))
    # earliest disease first: case_border's only lesion touches the border (a healthy start), then the smallest lesion
    assert ids == ["case_0__pie100", "case_border__pie100"]
    manifest = json.loads(PROGRESSION_MANIFEST.at(ws).read_text())
    assert [r["trajectory_id"] for r in manifest["trajectories"]] == ids
    for tid in ids:
        stored = read_trajectory(PROGRESSION_STORE.at(ws), tid)
        case = tid.split("__")[0]
        source, attrs = read_case(STORE.at(ws), case), read_case_attrs(STORE.at(ws), case)
        origin = stored.attrs["origin"]
        assert stored.frames.shape == (4, 1, 16, 16, 16)  # N + 1 frames with a time axis
        assert stored.masks.shape == (4, 16, 16, 16)
        assert np.array_equal(stored.frames[0], crop(source.image, origin, (16, 16, 16)))
        assert np.allclose(stored.attrs["affine"], crop_affine(np.asarray(attrs["affine"]), origin))
        assert stored.attrs["spacing"] == attrs["spacing"]
        assert stored.attrs["seed"] == [0, "pie", case, "1.000000"]
        assert stored.attrs["start"] == ("healthy" if case == "case_border" else "lesion")
        # outside M: at most β1 times the distance to the clamp range (z-scored units, clip ±5)
        x0 = stored.frames[0][:, ~stored.roi].astype(np.float64)
        bound = 0.01 * np.maximum(5.0 - x0, x0 + 5.0)
        assert np.all(np.abs(stored.frames[1:][:, :, ~stored.roi] - x0) <= bound + 1e-5)
        pictures = (ws.root / "reports") / "synthesize" / "progression"
        assert (pictures / f"{tid}.gif").read_bytes()[:6] == b"GIF89a"
        assert (pictures / f"{tid}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gate_reports_trajectories_and_no_lesion_samples_with_method_pie(progressed: Path) -> None:
    ws = Workspace.at(progressed)
    summary = json.loads(((ws.root / "reports") / "validate-synthetic" / "summary.json").read_text())
    assert summary["n_trajectories"] == 2
    assert summary["n_trajectories_rejected"] == 0
    assert summary["n_samples"] == 0
    assert 0 < summary["max_outside_change"] < 0.2
    accepted = json.loads(accepted_beside(SYNTHETIC_STORE.at(ws)).read_text())
    store_digest = accepted.pop("store_digest")  # the verdict records the content it judged
    assert len(store_digest) == 64
    assert accepted == {"accepted": [], "rejected": [], "trajectories_rejected": [], "gate": "passed"}
    assert ((ws.root / "reports") / "quality" / "progression" / "index.html").exists()


def _frames_bytes(ws: Workspace) -> dict[str, bytes]:
    store = PROGRESSION_STORE.at(ws)
    return {t: read_trajectory(store, t).frames.tobytes() for t in list_trajectories(store)}


def test_deleted_trajectory_is_recomputed_to_the_same_bytes(progressed: Path, tmp_path: Path) -> None:
    shutil.copytree(progressed, tmp_path / "ws")
    ws = Workspace.at(tmp_path / "ws")
    before = {
        t: read_trajectory(PROGRESSION_STORE.at(ws), t).frames.tobytes()
        for t in list_trajectories(PROGRESSION_STORE.at(ws))
    }
    shutil.rmtree(PROGRESSION_STORE.at(ws) / "case_0__pie100")
    result = STAGES["synthesize"].run(ws, load_params(ws.params_file))
    assert result.summary["n_trajectories"] == 2
    after = {
        t: read_trajectory(PROGRESSION_STORE.at(ws), t).frames.tobytes()
        for t in list_trajectories(PROGRESSION_STORE.at(ws))
    }
    assert after == before


def test_exact_mode_and_a_user_mask_through_run_one(progressed: Path, tmp_path: Path) -> None:
    shutil.copytree(progressed, tmp_path / "ws")
    ws = Workspace.at(tmp_path / "ws")
    params = load_params(ws.params_file, ["synth.pie.beta_outside=0"])
    record = run_one(ws, params, "case_1", 0.5)
    assert record["exact_background"] is True
    stored = read_trajectory(PROGRESSION_STORE.at(ws), record["trajectory_id"])
    outside = stored.frames[:, :, ~stored.roi].view(np.uint32)
    assert np.array_equal(outside, np.repeat(outside[:1], len(outside), axis=0))  # bit for bit, every frame
    mask = np.zeros(read_case(STORE.at(ws), "case_0").image.shape[1:], np.uint8)
    mask[14:19, 14:19, 10:14] = 1
    np.save(tmp_path / "roi.npy", mask)
    given = run_one(ws, params, "case_0", 1.0, roi_mask_file=str(tmp_path / "roi.npy"))
    assert given["start"] == "given"
    assert given["roi_voxels"] == int(mask.sum())
    kept = json.loads(PROGRESSION_MANIFEST.at(ws).read_text())["trajectories"]
    assert {r["trajectory_id"] for r in kept} >= {"case_0__pie100", "case_1__pie050", "case_border__pie100"}


def test_bad_inputs_are_one_line_errors(progressed: Path, tmp_path: Path) -> None:
    shutil.copytree(progressed, tmp_path / "ws")
    ws = Workspace.at(tmp_path / "ws")
    params = load_params(ws.params_file)
    with pytest.raises(SourceError, match=r"target severity 1.5 is outside the trained range \[0, 1\]"):
        run_one(ws, params, "case_0", 1.5)
    with pytest.raises(SourceError, match=r"case 'nope' is not in data/processed/store.zarr"):
        run_one(ws, params, "nope", 1.0)
    shape = read_case(STORE.at(ws), "case_0").image.shape[1:]
    np.save(tmp_path / "empty.npy", np.zeros(shape, np.uint8))
    with pytest.raises(SourceError, match="the ROI mask is empty"):
        run_one(ws, params, "case_0", 1.0, roi_mask_file=str(tmp_path / "empty.npy"))
    np.save(tmp_path / "small.npy", np.ones((4, 4, 4), np.uint8))
    with pytest.raises(SourceError, match=r"ROI mask shape \(4, 4, 4\) does not match the case volume \(32, 32, 24\)"):
        run_one(ws, params, "case_0", 1.0, roi_mask_file=str(tmp_path / "small.npy"))
    # a case resampled to another spacing than the model was trained at
    arrays, attrs = read_case(STORE.at(ws), "case_0"), read_case_attrs(STORE.at(ws), "case_0")
    write_case(STORE.at(ws), "case_wide", arrays, {**attrs, "spacing": [2.0, 2.0, 2.0]}, chunk_shape=(16, 16, 16))
    with pytest.raises(SourceError, match=r"spacing \[2.0, 2.0, 2.0\] mm, but the pie model was trained at"):
        run_one(ws, params, "case_wide", 1.0)
    for override, message in [
        ("synth.pie.iterations=0", "iterations"),
        ("synth.pie.strength=0", "strength"),
        ("synth.pie.strength=1.5", "strength"),
    ]:
        with pytest.raises(ParamsError, match=message):
            load_params(ws.params_file, [override])


def test_progression_flow_runs_one_trajectory_on_prefect(progressed: Path, tmp_path: Path) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from lesionflow.flows.progression import progression_flow

    shutil.copytree(progressed, tmp_path / "ws")
    with prefect_test_harness(server_startup_timeout=120):
        record = progression_flow(case_id="case_1", target_severity=0.8, workspace=str(tmp_path / "ws"))
        with pytest.raises(SourceError, match=r"case 'nope' is not in data/processed/store\.zarr"):
            progression_flow(case_id="nope", workspace=str(tmp_path / "ws"))
    assert record["trajectory_id"] == "case_1__pie080"
    assert record["frames"] == 4
    assert (tmp_path / "ws" / "reports" / "synthesize" / "progression" / "case_1__pie080.gif").exists()
