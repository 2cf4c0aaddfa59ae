"""train and evaluate on real Zarr stores: resume after SIGKILL, corrupted checkpoints, bad params, geometry."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from safetensors.torch import load_file

from lesionflow.caching import run_cached
from lesionflow.catalog.artifacts import RAW_CASES, SEGMENTER, SEGMENTER_CHECKPOINTS
from lesionflow.errors import ParamsError
from lesionflow.params import load_params
from lesionflow.stages.registry import STAGES
from lesionflow.workspace import Workspace
from tests.helpers.volumes import use_tiny_training, write_msd

PREPARE = ("ingest", "validate-raw", "plan", "preprocess", "validate-processed")
EXE = str(Path(sys.executable).with_name("lesionflow"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One preprocessed workspace (5 train + 2 test sphere cases); tests work on copies of it."""
    root = tmp_path_factory.mktemp("prepared") / "ws"
    root.mkdir()
    shutil.copy(Path(__file__).resolve().parents[2] / "params.yaml", root / "params.yaml")
    write_msd(root / "data" / "demo", n_train=5, n_test=2)
    use_tiny_training(root / "params.yaml")
    ws = Workspace.at(root)
    params = load_params(ws.params_file, ["preprocess.workers=1"])
    for name in PREPARE:
        assert run_cached(name, ws, params, STAGES[name].run).ok
    return root


def _copy(prepared: Path, tmp_path: Path, name: str = "ws") -> Workspace:
    dest = tmp_path / name
    shutil.copytree(prepared, dest)
    return Workspace.at(dest)


def _weights(ws: Workspace) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in load_file(str(SEGMENTER.at(ws) / "model.safetensors")).items()}


def test_train_writes_model_curves_and_same_seed_same_bytes(prepared: Path, tmp_path: Path) -> None:
    a, b = _copy(prepared, tmp_path, "a"), _copy(prepared, tmp_path, "b")
    results = [STAGES["train"].run(ws, load_params(ws.params_file)) for ws in (a, b)]
    summary = results[0].summary
    assert summary["steps_done"] == 6
    assert summary["resumed_from"] is None
    assert summary["n_train"] + summary["n_val"] == 5
    assert summary["n_val"] == 1
    assert summary["best_val_dice"] is not None
    assert 0.0 <= summary["best_val_dice"] <= 1.0
    assert (SEGMENTER.at(a) / "model.safetensors").read_bytes() == (SEGMENTER.at(b) / "model.safetensors").read_bytes()
    config = json.loads((SEGMENTER.at(a) / "config.json").read_text())
    assert config["label_values"] == [0, 1, 2]
    assert config["label_names"]["1"] == "lesion"
    meta = json.loads((SEGMENTER.at(a) / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 3
    curves = ((a.root / "reports") / "train" / "curves.csv").read_text().splitlines()
    assert curves[0] == "step,loss,lr,val_dice"
    assert len(curves) == 7
    assert [line.split(",")[3] != "" for line in curves[1:]] == [False, False, True, False, False, True]
    assert ((a.root / "reports") / "train" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = _copy(prepared, tmp_path, "c")
    STAGES["train"].run(other, load_params(other.params_file, ["project.seed=1"]))
    assert (SEGMENTER.at(other) / "model.safetensors").read_bytes() != (
        SEGMENTER.at(a) / "model.safetensors"
    ).read_bytes()


def _latest_checkpoint(ws: Workspace) -> list[Path]:
    return sorted(SEGMENTER_CHECKPOINTS.at(ws).glob("*/step-*"))


@pytest.mark.slow
def test_killed_training_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_run(
    prepared: Path, tmp_path: Path
) -> None:
    overrides = ["train.steps=24", "train.checkpoint_every=4", "train.val_every=100", "train.cpu_threads=1"]
    killed, clean = _copy(prepared, tmp_path, "killed"), _copy(prepared, tmp_path, "clean")
    args = [EXE, "stage", "train"] + [x for o in overrides for x in ("--set", o)]
    # An inherited OMP_NUM_THREADS=1 must not matter: the stage fixes its torch thread count (train.cpu_threads).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        args, cwd=killed.root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not _latest_checkpoint(killed):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = [int(p.name.split("-")[1]) for p in _latest_checkpoint(killed)]
    assert saved, "no checkpoint was written"
    assert max(saved) < 24, f"the run finished before it could be killed: {saved}"
    assert not (SEGMENTER.at(killed) / "model.safetensors").exists()
    resumed = STAGES["train"].run(killed, load_params(killed.params_file, overrides)).summary
    assert resumed["resumed_from"] == max(saved)
    assert resumed["steps_done"] == 24
    STAGES["train"].run(clean, load_params(clean.params_file, overrides))
    got, want = _weights(killed), _weights(clean)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    history = ((killed.root / "reports") / "train" / "curves.csv").read_text()
    assert history == ((clean.root / "reports") / "train" / "curves.csv").read_text()


def test_corrupted_checkpoint_falls_back_to_the_previous_good_one(
    prepared: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    ws = _copy(prepared, tmp_path)
    params = load_params(ws.params_file, ["train.keep_checkpoints=3"])
    STAGES["train"].run(ws, params)
    ckpts = _latest_checkpoint(ws)
    assert [p.name for p in ckpts] == ["step-0000002", "step-0000004", "step-0000006"]
    last = ckpts[-1] / "optimizer.safetensors"
    last.write_bytes(last.read_bytes()[: len(last.read_bytes()) // 2])
    again = STAGES["train"].run(ws, params).summary
    assert again["resumed_from"] == 4
    assert again["steps_done"] == 6
    err = capfd.readouterr().err
    assert "checkpoint step-0000006 is corrupted" in err
    assert "Traceback" not in err
    assert list(ckpts[-1].parent.glob("corrupt-step-0000006-*"))


def test_other_params_start_fresh_instead_of_resuming(prepared: Path, tmp_path: Path) -> None:
    ws = _copy(prepared, tmp_path)
    STAGES["train"].run(ws, load_params(ws.params_file))
    other = STAGES["train"].run(ws, load_params(ws.params_file, ["train.learning_rate=0.01"])).summary
    assert other["resumed_from"] is None
    assert len(list(SEGMENTER_CHECKPOINTS.at(ws).iterdir())) == 2  # the first run's checkpoints are kept


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "train.patch_size=[32,16,16]",
            r"larger than every training volume along x \(largest volume \[\d+, \d+, \d+\]",
        ),
        ("train.patch_size=[16,16,15]", r"every edge must be a multiple of 2; e.g. use \[16, 16, 14\]"),
        ("train.synthetic_ratio=0.5", r"train.synthetic_store is empty"),
    ],
)
def test_bad_training_params_fail_with_one_line(prepared: Path, tmp_path: Path, override: str, message: str) -> None:
    ws = _copy(prepared, tmp_path)
    with pytest.raises(ParamsError, match=message) as info:
        STAGES["train"].run(ws, load_params(ws.params_file, [override]))
    assert "\n" not in str(info.value)
    cli = subprocess.run([EXE, "stage", "train", "--set", override], cwd=ws.root, capture_output=True, text=True)
    assert cli.returncode == 2
    assert "Traceback" not in cli.stderr
    assert len([line for line in cli.stderr.splitlines() if line.strip()]) == 1, cli.stderr


def test_evaluate_predictions_keep_the_raw_geometry(prepared: Path, tmp_path: Path) -> None:
    ws = _copy(prepared, tmp_path)
    params = load_params(ws.params_file)
    STAGES["train"].run(ws, params)
    result = STAGES["evaluate"].run(ws, params)
    metrics = json.loads(((ws.root / "reports") / "metrics.json").read_text())
    assert metrics["n_cases"] == 2
    assert metrics["cases"] == ["case_005", "case_006"]
    for key in ("mean_dice", "mean_hd95_mm", "mean_nsd", "dice_lesion", "dice_core", "nsd_core"):
        assert np.isfinite(metrics[key]), key
    assert 0 <= metrics["mean_dice"] <= 1
    assert result.outputs["metrics"] == "reports/metrics.json"
    for case in metrics["cases"]:
        raw = nib.load(RAW_CASES.at(ws) / case / "image.nii.gz")
        pred = nib.load(ws.root / "data" / "predictions" / f"{case}.nii.gz")
        assert pred.shape == raw.shape
        np.testing.assert_array_equal(pred.affine, raw.affine)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}
    table = ((ws.root / "reports") / "evaluate" / "cases.csv").read_text().splitlines()
    assert table[0].startswith("case_id,label,name,dice,hd95_mm,nsd")
    assert len(table) == 1 + 2 * 2
    for png in ("boxplot.png", "montage.png"):
        assert ((ws.root / "reports") / "evaluate" / png).stat().st_size > 1000


@pytest.mark.slow
def test_ddp_with_two_processes_on_cpu(prepared: Path, tmp_path: Path) -> None:
    """torchrun + gloo: two ranks, each reading its own items; rank 0 writes the model and the summary."""
    ws = _copy(prepared, tmp_path)
    overrides = ["train.ddp_processes=2", "train.steps=4", "train.cpu_threads=1"]
    summary = STAGES["train"].run(ws, load_params(ws.params_file, overrides)).summary
    assert summary["world_size"] == 2
    assert summary["steps_done"] == 4
    assert (SEGMENTER.at(ws) / "model.safetensors").exists()
    single = _copy(prepared, tmp_path, "single")
    STAGES["train"].run(single, load_params(single.params_file, ["train.steps=4", "train.cpu_threads=1"]))
    # two ranks saw twice the patches (different items), so the averaged gradients differ from one process's
    assert _weights(ws).keys() == _weights(single).keys()
    assert any(not np.array_equal(a, b) for a, b in zip(_weights(ws).values(), _weights(single).values(), strict=True))
