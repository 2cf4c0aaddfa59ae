"""validate-metrics -> register -> lineage with a real embedded MLflow store; champion rule; bad inputs."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from lesionflow.caching import run_cached
from lesionflow.catalog.artifacts import SEGMENTER, STORE
from lesionflow.catalog.digests import raw_digest
from lesionflow.errors import LesionflowError
from lesionflow.hashing import sha256_file, sha256_json
from lesionflow.params import load_params
from lesionflow.registry.lineage import missing_fields, read_lineage
from lesionflow.registry.tracking import resolve_tracking_uri
from lesionflow.stages.registry import STAGES
from lesionflow.store.zarr_store import store_digest
from lesionflow.workspace import Workspace
from tests.helpers.volumes import add_msd_entry, sphere_case, use_tiny_training, write_msd

EXE = str(Path(sys.executable).with_name("lesionflow"))
CHAIN = ("ingest", "validate-raw", "plan", "preprocess", "validate-processed", "train", "evaluate")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace trained (6 steps) and evaluated on 2 test cases; tests register from copies of it."""
    root = tmp_path_factory.mktemp("evaluated") / "ws"
    root.mkdir()
    shutil.copy(Path(__file__).resolve().parents[2] / "params.yaml", root / "params.yaml")
    write_msd(root / "data" / "demo", n_train=5, n_test=2)
    use_tiny_training(root / "params.yaml", steps=12)
    ws = Workspace.at(root)
    params = load_params(ws.params_file, ["preprocess.workers=1"])
    for name in CHAIN:
        assert run_cached(name, ws, params, STAGES[name].run).ok
    return root


def _copy(src: Path, tmp_path: Path, name: str = "ws") -> Workspace:
    shutil.copytree(src, tmp_path / name)
    return Workspace.at(tmp_path / name)


def _cli(ws: Workspace, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], cwd=ws.root, capture_output=True, text=True, timeout=300, check=False)


def _gate_and_register(ws: Workspace, *overrides: str) -> tuple[dict[str, object], dict[str, object]]:
    params = load_params(ws.params_file, list(overrides))
    gate = STAGES["validate-metrics"].run(ws, params).summary
    reg = STAGES["register"].run(ws, params).summary
    return gate, reg


def test_register_records_complete_lineage_matching_the_actual_digests(evaluated: Path, tmp_path: Path) -> None:
    ws = _copy(evaluated, tmp_path)
    gate, reg = _gate_and_register(ws)
    assert gate["champion"] == {"status": "no_champion", "tolerance": 0.02}
    assert reg["version"] == 1
    assert reg["aliases"] == ["candidate", "champion"]
    uri = resolve_tracking_uri("", ws.root)
    metrics = json.loads(((ws.root / "reports") / "metrics.json").read_text())
    params = load_params(ws.params_file)
    model_sha = sha256_file(SEGMENTER.at(ws) / "model.safetensors")
    expected = {
        "raw": raw_digest(ws),
        "processed": store_digest(STORE.at(ws)),
        "plans": sha256_file((ws.root / "data" / "processed") / "plans.json"),
        "test-split": metrics["test_split_digest"],
    }
    expected_tags = {
        "lesionflow.params_sha256": sha256_json(params.redacted_dump()),  # the digest of the params as logged
        "lesionflow.plans_hash": json.loads(((ws.root / "data" / "processed") / "plans.json").read_text())["plan_hash"],
        "lesionflow.git_commit": "none",  # the workspace is not a git repository
        "lesionflow.dvc_lock_sha256": "none",
        "lesionflow.generator_model": "none",
    }
    # "months later, another checkout": only the registry is left
    for folder in ("data", "models", "reports"):
        shutil.rmtree(ws.root / folder)
    lineage = read_lineage("lesionflow-seg@candidate", uri)
    assert missing_fields(lineage) == []
    for name, digest in expected.items():
        dataset = lineage.dataset(name)
        assert dataset is not None, name
        assert dataset.digest == digest, name
    raw = lineage.dataset("raw")
    assert raw is not None
    assert raw.n_cases == 7
    assert raw.cases is not None
    assert sorted(row["case_id"] for row in raw.cases) == [f"case_{i:03d}" for i in range(7)]
    assert all(row["source_uri"].startswith("data/demo/images") for row in raw.cases)
    for key, value in expected_tags.items():
        assert lineage.tags[key] == value, key
    assert lineage.version_tags["lesionflow.model_sha256"] == model_sha
    assert lineage.metrics["mean_dice"] == pytest.approx(metrics["mean_dice"])
    assert lineage.params["train"]["steps"] == 12
    assert lineage.version == 1
    # the CLI: tree, JSON and graph, from a directory that is not the workspace
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tree = subprocess.run(
        [EXE, "lineage", "lesionflow-seg@candidate", "--tracking-uri", uri, "--graph", str(elsewhere / "g.png")],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        check=False,
    )
    assert tree.returncode == 0, tree.stderr
    for text in ("lesionflow-seg v1", "raw (training): 7 cases", expected["raw"][:12], "test-split", "git commit"):
        assert text in tree.stdout, text
    assert (elsewhere / "g.png").read_bytes()[:4] == b"\x89PNG"
    as_json = subprocess.run(
        [EXE, "lineage", "lesionflow-seg/1", "--json", "--tracking-uri", uri],
        cwd=elsewhere,
        capture_output=True,
        text=True,
    )
    assert json.loads(as_json.stdout)["tags"]["lesionflow.params_sha256"] == expected_tags["lesionflow.params_sha256"]


def test_champion_moves_only_when_the_candidate_is_not_worse(evaluated: Path, tmp_path: Path) -> None:
    ws = _copy(evaluated, tmp_path)
    _gate_and_register(ws)  # v1: champion
    first_dice = json.loads(((ws.root / "reports") / "metrics.json").read_text())["mean_dice"]
    assert first_dice > 0.05, "the toy model must beat an all-background model for this test to mean anything"
    weights = SEGMENTER.at(ws) / "model.safetensors"
    save_file({k: v * 0 for k, v in load_file(str(weights)).items()}, str(weights))  # predicts background only
    params = load_params(ws.params_file)
    STAGES["evaluate"].run(ws, params)
    gate, reg = _gate_and_register(ws)
    champion = gate["champion"]
    assert isinstance(champion, dict)
    assert champion["status"] == "failed"
    assert champion["version"] == 1
    assert champion["mean_dice"] == pytest.approx(first_dice)
    assert champion["delta"] < -0.02
    assert gate["promote_champion"] is False
    assert reg["version"] == 2
    assert reg["aliases"] == ["candidate"]  # candidate moved, champion stayed on v1
    uri = resolve_tracking_uri("", ws.root)
    assert read_lineage("lesionflow-seg@champion", uri).version == 1
    again = STAGES["register"].run(ws, params).summary  # a retry registers nothing new
    assert again["version"] == 2
    assert again["reused_existing_version"] is True
    # a tolerance wide enough lets the worse model through: champion moves (other params: a new version)
    _, promoted = _gate_and_register(ws, "quality.metrics.champion_tolerance=1.0")
    assert promoted["aliases"] == ["candidate", "champion"]
    assert read_lineage("lesionflow-seg@champion", uri).version == promoted["version"] == 3


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_server_keeps_outputs_and_retry_needs_no_retraining(evaluated: Path, tmp_path: Path) -> None:
    ws = _copy(evaluated, tmp_path)
    model_bytes = (SEGMENTER.at(ws) / "model.safetensors").read_bytes()
    url = f"http://127.0.0.1:{_closed_port()}"
    down = _cli(ws, "stage", "validate-metrics", "--set", f"registry.tracking_uri={url}")
    assert down.returncode == 2
    assert "Traceback" not in down.stderr
    lines = [line for line in down.stderr.splitlines() if line.strip() and "━" not in line]
    assert len(lines) == 1, down.stderr
    assert url in lines[0]
    assert (SEGMENTER.at(ws) / "model.safetensors").read_bytes() == model_bytes
    params = load_params(ws.params_file)
    # Rerunning train (this copy is another workspace, so its stage cache misses) trains nothing: the final
    # checkpoint is already there. Then registration succeeds against the embedded store.
    again = run_cached("train", ws, params, STAGES["train"].run).summary
    assert again["resumed_from"] == again["steps_done"] == 12
    assert (SEGMENTER.at(ws) / "model.safetensors").read_bytes() == model_bytes
    _, reg = _gate_and_register(ws)
    assert reg["version"] == 1


def test_unknown_model_reference_is_one_line_listing_the_models(evaluated: Path, tmp_path: Path) -> None:
    ws = _copy(evaluated, tmp_path)
    empty = _cli(ws, "lineage", "lesionflow-seg@champion")
    assert empty.returncode == 2
    assert "no models registered yet" in empty.stderr
    _gate_and_register(ws)
    missing = _cli(ws, "lineage", "lesionflow-seg@gold")
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr
    assert "lesionflow-seg (@candidate=v1, @champion=v1)" in missing.stderr.replace("\n", " ")


@pytest.mark.slow
def test_registered_model_evaluates_a_dataset_ingested_later(evaluated: Path, tmp_path: Path) -> None:
    ws = _copy(evaluated, tmp_path)
    _gate_and_register(ws)
    other = tmp_path / "later"
    other.mkdir()
    shutil.copy(ws.params_file, other / "params.yaml")
    source = write_msd(other / "data" / "demo", n_train=1, n_test=0)
    image, label = sphere_case(11, shape=(22, 20, 14), spacing=(0.9, 1.1, 2.2))
    flipped = np.diag([-0.9, 1.1, 2.2, 1.0])  # stored LAS: the model must map back onto this grid
    add_msd_entry(source, "case_flipped", image.array, label.array.astype(np.uint8), affine=flipped)
    ingest = _cli(Workspace.at(other), "stage", "ingest")
    assert ingest.returncode == 0, ingest.stderr
    uri = resolve_tracking_uri("", ws.root)
    result = _cli(ws, "evaluate", "--model", "lesionflow-seg@candidate", "--data", str(other), "--tracking-uri", uri)
    assert result.returncode == 0, result.stderr
    report = other / "reports" / "evaluations" / "lesionflow-seg-v1"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["cases"] == ["case_000", "case_flipped"]
    assert metrics["model"] == "lesionflow-seg/1"
    assert 0.0 <= metrics["mean_dice"] <= 1.0
    raw = nib.load(other / "data" / "raw" / "cases" / "case_flipped" / "image.nii.gz")
    pred = nib.load(report / "predictions" / "case_flipped.nii.gz")
    assert pred.shape == raw.shape
    np.testing.assert_array_equal(pred.affine, raw.affine)
    not_ingested = _cli(ws, "evaluate", "--model", "lesionflow-seg@candidate", "--data", str(tmp_path / "nothing"))
    assert not_ingested.returncode == 2
    assert "ingest the dataset first" in not_ingested.stderr


def test_metrics_gate_floor_stops_before_registration(evaluated: Path, tmp_path: Path) -> None:
    ws = _copy(evaluated, tmp_path)
    params = load_params(ws.params_file, ["quality.metrics.min_mean_dice=0.99"])
    with pytest.raises(LesionflowError, match=r"metrics quality gate failed: .*dice.*quality.metrics.min_mean_dice"):
        STAGES["validate-metrics"].run(ws, params)
    assert ((ws.root / "reports") / "quality" / "metrics" / "index.html").exists()
    assert not (ws.root / "mlruns").exists() or not list((ws.root / "mlruns").glob("artifacts/*/*"))


def test_synthetic_store_is_mixed_in_and_recorded_in_the_lineage(evaluated: Path, tmp_path: Path) -> None:
    """A second (here: real) store as the synthetic pool: used by train, recorded by register with its digest."""
    ws = _copy(evaluated, tmp_path)
    synthetic = ws.root / "data" / "synthetic" / "store.zarr"
    shutil.copytree(STORE.at(ws), synthetic)
    from lesionflow.catalog.readers import judged_store_digest, write_synthetic_verdict
    from lesionflow.store.zarr_store import list_cases

    # train takes only a store with a verdict on its current content (issue 17); here every case is admitted
    write_synthetic_verdict(synthetic, judged_store_digest(synthetic), list_cases(synthetic), [], gate="test")
    overrides = ["train.synthetic_store=data/synthetic/store.zarr", "train.synthetic_ratio=0.5"]
    params = load_params(ws.params_file, overrides)
    summary = STAGES["train"].run(ws, params).summary
    assert summary["n_synthetic"] == 7
    assert summary["resumed_from"] is None  # other data: a new run key, not the real-only checkpoints
    STAGES["evaluate"].run(ws, params)
    STAGES["validate-metrics"].run(ws, params)
    STAGES["register"].run(ws, params)
    lineage = read_lineage("lesionflow-seg@candidate", resolve_tracking_uri("", ws.root))
    dataset = lineage.dataset("synthetic")
    assert dataset is not None
    assert dataset.digest == store_digest(synthetic)
    assert dataset.tags["ratio"] == "0.5"
    assert missing_fields(lineage) == []
