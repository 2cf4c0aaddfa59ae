"""An MSD test split without labels (issue 19 item 9): a seeded labelled hold-out; the unlabelled still predicted."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lesionflow.catalog.artifacts import RAW_MANIFEST
from lesionflow.io.volumes import read_volume
from lesionflow.manifest import read_manifest
from lesionflow.params import EvaluateParams, load_params
from lesionflow.seg.evaluation import evaluate_cases
from lesionflow.seg.model_files import SegmenterConfig, save_segmenter
from lesionflow.seg.networks import NetworkConfig, build_network
from lesionflow.stages import ingest
from lesionflow.workspace import Workspace
from tests.helpers.volumes import write_msd

REPO = Path(__file__).resolve().parents[2]


def _quiet(items: Iterable[Any], description: str, total: int) -> Iterator[Any]:
    yield from items


def _unlabelled_test_msd(root: Path, n_train: int, n_test: int) -> Path:
    """write_msd, then the test entries lose their labels, as MSD tasks ship imagesTs/ without labelsTs/."""
    write_msd(root, n_train=n_train, n_test=n_test)
    data = json.loads((root / "dataset.json").read_text())
    data["test"] = [entry["image"] for entry in data["test"]]  # MSD lists test images as plain paths
    (root / "dataset.json").write_text(json.dumps(data))
    shutil.rmtree(root / "labelsTs")
    return root


def _ingest(tmp_path: Path, name: str, source: Path, *overrides: str) -> tuple[Workspace, dict[str, Any]]:
    root = tmp_path / name
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    ws = Workspace.at(root)
    params = load_params(ws.params_file, [f"ingest.source={source}", *overrides])
    return ws, ingest.run(ws, params, progress=_quiet).summary


def _splits(ws: Workspace) -> dict[str, tuple[str, bool]]:
    return {r.case_id: (r.split, r.has_label) for r in read_manifest(RAW_MANIFEST.at(ws))}


def test_an_unlabelled_test_split_gets_a_seeded_labelled_holdout(tmp_path: Path) -> None:
    source = _unlabelled_test_msd(tmp_path / "msd", n_train=6, n_test=2)
    ws, summary = _ingest(tmp_path, "a", source)
    splits = _splits(ws)
    assert [c for c, (s, lab) in splits.items() if s == "test" and not lab] == ["case_006", "case_007"]
    held = sorted(c for c, (s, lab) in splits.items() if s == "test" and lab)
    assert len(held) == 1  # round(6 x ingest.test_holdout_fraction 0.2)
    assert sum(s == "train" for s, _ in splits.values()) == 5
    assert summary["test_holdout"] == held
    note = str(summary["test_holdout_note"])
    assert "2 test cases have no labels" in note
    assert "ingest.test_holdout_fraction" in note
    assert held[0] in note

    again, _ = _ingest(tmp_path, "b", source)
    assert _splits(again) == splits  # same seed, same hold-out
    other = {tuple(_ingest(tmp_path, f"s{seed}", source, f"project.seed={seed}")[1]["test_holdout"]) for seed in (1, 2)}
    assert len(other | {tuple(held)}) > 1  # the seed picks the hold-out
    _, half = _ingest(tmp_path, "half", source, "ingest.test_holdout_fraction=0.5")
    assert len(half["test_holdout"]) == 3

    _, off = _ingest(tmp_path, "off", source, "ingest.test_holdout_fraction=0")
    assert off["test_holdout"] == []


def test_a_labelled_test_split_is_kept_as_declared(tmp_path: Path) -> None:
    source = write_msd(tmp_path / "msd", n_train=6, n_test=2)
    ws, summary = _ingest(tmp_path, "ws", source)
    assert {c: s for c, (s, _) in _splits(ws).items()} == {
        **{f"case_{i:03d}": "train" for i in range(6)},
        "case_006": "test",
        "case_007": "test",
    }
    assert summary["test_holdout"] == []
    assert "test_holdout_note" not in summary


def test_evaluate_scores_the_holdout_and_still_predicts_the_unlabelled_cases(tmp_path: Path) -> None:
    source = _unlabelled_test_msd(tmp_path / "msd", n_train=5, n_test=2)
    ws, summary = _ingest(tmp_path, "ws", source)
    test = [r for r in read_manifest(RAW_MANIFEST.at(ws)) if r.split == "test"]
    assert len(test) == 3
    torch.manual_seed(0)
    network_config = NetworkConfig("unet", 1, 3, (8, 16), 1, (16, 16, 16))
    config = SegmenterConfig(
        network=network_config,
        label_values=(0, 1, 2),
        label_names={"0": "background", "1": "lesion", "2": "core"},
        target_spacing=(1.0, 1.2, 2.0),
        normalization={"schemes": ["zscore"]},
        plan_hash="0" * 64,
        modalities=("MRI",),
    )
    save_segmenter(tmp_path / "model", build_network(network_config).eval(), config, {})
    settings = EvaluateParams(device="cpu", sw_batch_size=4)
    pred_dir = tmp_path / "pred"
    report = evaluate_cases(tmp_path / "model", ws, test, settings, tmp_path / "report", pred_dir)
    assert report.summary["cases"] == summary["test_holdout"]  # scored: the labelled hold-out only
    assert report.summary["unlabelled_cases"] == ["case_005", "case_006"]
    assert sorted(p.name for p in pred_dir.iterdir()) == sorted(f"{r.case_id}.nii.gz" for r in test)
    for name in ("case_005", "case_006"):
        pred = read_volume(pred_dir / f"{name}.nii.gz", name)
        image = read_volume(ws.root / "data" / "raw" / "cases" / name / "image.nii.gz", name)
        assert pred.array.shape == image.array.shape
        np.testing.assert_array_equal(pred.affine, image.affine)


def test_a_dataset_json_without_test_entries_follows_ingest_test_fraction(tmp_path: Path) -> None:
    """evaluate's advice ("set ingest.test_fraction") holds for an MSD dataset that lists no test case too."""
    source = write_msd(tmp_path / "msd", n_train=8, n_test=0)
    ws, summary = _ingest(tmp_path, "ws", source, "ingest.test_fraction=0.5")
    test = [c for c, (s, _) in _splits(ws).items() if s == "test"]
    assert 0 < len(test) < 8
    assert summary["test_holdout"] == []
    plain, _ = _ingest(tmp_path, "plain", source)
    assert {s for s, _ in _splits(plain).values()} == {"train"}  # test_fraction 0 (default): no test split
