"""MSD layout, dataset.json, determinism, reruns, splits and argument checks of build_demo_dataset."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from lesionflow.demo import DEMO_KINDS, DemoResult, build_demo_dataset, plan_cases
from lesionflow.errors import ParamsError
from lesionflow.io.volumes import read_volume

FOLDERS = ("imagesTr", "labelsTr", "organsTr", "imagesTs", "labelsTs", "organsTs")


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    return build_demo_dataset("chest-ct", 4, tmp_path_factory.mktemp("chest") / "out", seed=3, size=32)


def test_dataset_json_matches_files(chest: DemoResult) -> None:
    doc = json.loads(chest.dataset_json.read_text())
    assert chest.dataset_json.read_text() == json.dumps(doc, sort_keys=True, indent=2) + "\n"
    assert doc["tensorImageSize"] == "3D"
    assert doc["modality"] == {"0": "CT"}
    assert doc["labels"] == {"0": "background", "1": "nodule"}
    assert doc["organ_mask"] == "lung"
    assert "synthetic demo; numbers say nothing clinical" in doc["description"]
    assert {"name", "reference", "licence"} <= doc.keys()
    # round(4 * 0.25) = 1 test case, the rest train.
    assert (doc["numTraining"], doc["numTest"]) == (3, 1)
    assert len(doc["training"]) == 3
    assert len(doc["test"]) == 1
    listed = set()
    for split, entries in (("Tr", doc["training"]), ("Ts", doc["test"])):
        for entry in entries:
            assert set(entry) == {"image", "label", "organ"}
            case = Path(entry["image"]).name
            assert entry == {
                "image": f"./images{split}/{case}",
                "label": f"./labels{split}/{case}",
                "organ": f"./organs{split}/{case}",
            }
            listed |= {v[2:] for v in entry.values()}
    on_disk = {str(p.relative_to(chest.out)) for d in FOLDERS for p in (chest.out / d).glob("*")}
    assert on_disk == listed
    ids = sorted(Path(e["image"]).name.removesuffix(".nii.gz") for e in doc["training"] + doc["test"])
    assert ids == [f"chest_{i:03d}" for i in range(4)] == [c.case_id for c in chest.cases]
    for case in chest.cases:
        assert (case.split == "test") == (f"./imagesTs/{case.case_id}.nii.gz" in [e["image"] for e in doc["test"]])


def test_volumes_have_declared_types_and_values(chest: DemoResult) -> None:
    for case in chest.cases:
        folder = "Ts" if case.split == "test" else "Tr"
        image = read_volume(chest.out / f"images{folder}/{case.case_id}.nii.gz", case.case_id)
        label = read_volume(chest.out / f"labels{folder}/{case.case_id}.nii.gz", case.case_id)
        organ = read_volume(chest.out / f"organs{folder}/{case.case_id}.nii.gz", case.case_id)
        assert image.array.dtype == np.int16
        assert label.array.dtype == np.uint8
        assert organ.array.dtype == np.uint8
        assert set(np.unique(label.array)) <= {0, 1}
        assert set(np.unique(organ.array)) == {0, 1}
        assert image.spatial_shape == label.spatial_shape == organ.spatial_shape
        np.testing.assert_allclose(label.affine, image.affine)
        np.testing.assert_allclose(organ.affine, image.affine)
        assert case.lesion_voxels == {1: int((label.array == 1).sum())}


@pytest.mark.parametrize("kind", DEMO_KINDS)
def test_same_arguments_give_identical_bytes(kind: str, tmp_path: Path) -> None:
    a = build_demo_dataset(kind, 3, tmp_path / "a", seed=11, size=24)
    b = build_demo_dataset(kind, 3, tmp_path / "b", seed=11, size=24)
    c = build_demo_dataset(kind, 3, tmp_path / "c", seed=12, size=24)
    ha, hb, hc = _hashes(a.out), _hashes(b.out), _hashes(c.out)
    assert len(ha) == 3 * 3 + 1
    assert ha == hb
    images = [k for k in ha if k.startswith("images")]
    assert all(ha[k] != hc.get(k) for k in images if k in hc)


def test_rerun_overwrites_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "out"
    build_demo_dataset("chest-ct", 5, out, seed=1, size=24)
    (out / "imagesTr" / "notes.txt").write_text("mine")  # not ours: must survive
    result = build_demo_dataset("chest-ct", 3, out, seed=2, size=24)
    fresh = build_demo_dataset("chest-ct", 3, tmp_path / "fresh", seed=2, size=24)
    expected = _hashes(fresh.out)
    expected["imagesTr/notes.txt"] = hashlib.sha256(b"mine").hexdigest()
    assert _hashes(out) == expected
    assert json.loads(result.dataset_json.read_text())["numTraining"] == 2


def test_progress_is_reported_per_case(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    build_demo_dataset("chest-ct", 2, tmp_path / "o", seed=0, size=24, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 2), (2, 2)]


@pytest.mark.parametrize("cases", [2, 3, 4, 5, 8, 9, 20])
def test_split_and_lesion_free_plan(cases: int) -> None:
    is_test, free = plan_cases(cases, np.random.default_rng(0), 0.25)
    assert sum(is_test) == min(max(round(cases * 0.25), 1), cases - 1)
    assert sum(free) == max(round(cases * 0.25), 1 if cases >= 3 else 0)
    assert any(t and not f for t, f in zip(is_test, free, strict=True))  # test split has a lesion case
    assert any(not t and not f for t, f in zip(is_test, free, strict=True))  # and so does train


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"kind": "chest-ct", "cases": 1}, "cases=1"),
        ({"kind": "chest-ct", "cases": 0}, "cases=0"),
        ({"kind": "knee-mri", "cases": 4}, "'knee-mri'"),
        ({"kind": "chest-ct", "cases": 4, "size": 8}, "size=8"),
        ({"kind": "chest-ct", "cases": 4, "seed": -1}, "seed=-1"),
        ({"kind": "chest-ct", "cases": 4, "test_fraction": 1.0}, "test_fraction=1.0"),
    ],
)
def test_bad_arguments_raise_params_error(kwargs: dict, needle: str, tmp_path: Path) -> None:
    args = {"seed": 0, **kwargs}
    with pytest.raises(ParamsError) as info:
        build_demo_dataset(args.pop("kind"), args.pop("cases"), tmp_path / "out", **args)
    message = str(info.value)
    assert needle in message
    assert "expected" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()  # nothing written for rejected arguments
