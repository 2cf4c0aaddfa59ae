"""extract-rois on a whole-brain label with noise specks (issue 19 item 10): it stops, naming the value and the key,
until params say which label values are lesions and which the organ."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lesionflow.caching import run_cached
from lesionflow.catalog.artifacts import ROIS_STORE
from lesionflow.errors import SourceError
from lesionflow.io.volumes import Volume, write_nifti
from lesionflow.params import load_params
from lesionflow.stages.registry import STAGES
from lesionflow.synth.roi_store import read_roi_set
from lesionflow.workspace import Workspace
from tests.helpers.volumes import use_tiny_training
from tests.synth.test_label_roles import _brain

PREPARE = ("ingest", "validate-raw", "plan", "preprocess", "validate-processed")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 training cases and 1 test case: label 1 = the whole brain, 2 = a lesion, 3 = noise specks; no organ file."""
    root = tmp_path_factory.mktemp("brainmask") / "ws"
    source = root / "data" / "demo"
    entries: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
    for i in range(4):
        label = _brain(i, specks=6, lesion=True)
        rng = np.random.default_rng(i)
        image = (rng.normal(100, 5, label.shape) + 40 * (label > 0) + 30 * (label == 2)).astype(np.float32)
        split, images, labels = ("training", "imagesTr", "labelsTr") if i < 3 else ("test", "imagesTs", "labelsTs")
        for folder, array in ((images, image), (labels, label)):
            write_nifti(Volume(array, np.eye(4)), source / folder / f"case_{i}.nii.gz")
        entries[split].append({"image": f"./{images}/case_{i}.nii.gz", "label": f"./{labels}/case_{i}.nii.gz"})
    names = {"0": "background", "1": "brain", "2": "lesion", "3": "noise"}
    dataset = {"name": "brain", "modality": {"0": "MRI"}, "labels": names, **entries}
    (source / "dataset.json").write_text(json.dumps(dataset))
    shutil.copy(Path(__file__).resolve().parents[2] / "params.yaml", root / "params.yaml")
    use_tiny_training(root / "params.yaml")
    ws = Workspace.at(root)
    params = load_params(ws.params_file, ["preprocess.workers=1", "train.val_fraction=0"])
    for name in PREPARE:
        assert run_cached(name, ws, params, STAGES[name].run).ok
    return root


def _extract(root: Path, *overrides: str) -> object:
    ws = Workspace.at(root)
    params = load_params(ws.params_file, ["train.val_fraction=0", "synth.candidates_per_case=2", *overrides])
    return STAGES["extract-rois"].run(ws, params)


def test_a_whole_brain_label_stops_extract_rois_in_one_line(prepared: Path) -> None:
    with pytest.raises(SourceError, match=r"label value 1 is organ-sized.* in 3 of 3 training cases") as info:
        _extract(prepared)
    assert "\n" not in str(info.value)
    assert "synth.lesion_labels" in str(info.value)


def test_speck_lesions_stop_extract_rois(prepared: Path) -> None:
    with pytest.raises(SourceError, match=r"made of specks.*median of 6 voxels.*synth\.min_median_lesion_voxels"):
        _extract(prepared, "synth.lesion_labels=[2, 3]", "synth.organ_labels=[1]")


def test_declared_lesion_and_organ_values_give_lesion_rois_and_organ_candidates(prepared: Path) -> None:
    result = _extract(prepared, "synth.lesion_labels=[2]", "synth.organ_labels=[1]")
    summary = result.summary  # type: ignore[attr-defined]
    assert (summary["n_lesions"], summary["lesion_voxels_median"]) == (3, 123.0)
    assert summary["lesion_labels"] == [2]
    assert summary["organ_labels"] == [1]
    assert summary["n_candidates"] == 6  # the organ mask comes from label value 1 (no organ file)
    assert not [f for f in result.findings if f.code == "empty_organ_mask"]  # type: ignore[attr-defined]
    rois = read_roi_set(ROIS_STORE.at(Workspace.at(prepared)))
    assert {int(v) for roi in rois.lesions for v in np.unique(roi.label)} == {0, 2}  # neither brain nor specks
    assert all(roi.organ is not None and roi.organ.any() for roi in rois.candidates)
