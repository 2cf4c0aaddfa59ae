"""Patch sampling from real Zarr stores: reproducible per item, nnU-Net oversampling, synthetic mixing, padding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lesionflow.params import AugmentParams
from lesionflow.seg.patches import CaseIndex, PatchDataset, batch_items, index_cases
from lesionflow.store.zarr_store import CaseArrays, read_patch, write_case

CHUNK = (16, 16, 16)
PATCH = (16, 16, 16)
SHAPE = (40, 36, 32)
AUGMENT = AugmentParams(rotate_prob=0.5, scale_prob=0.5, intensity_prob=0.5, gamma_prob=0.5, noise_prob=0.5)


def _write(store: Path, case_id: str, image: np.ndarray, label: np.ndarray | None) -> None:
    write_case(store, case_id, CaseArrays(image=image, label=label), {"spacing": [1.0, 1.0, 1.0]}, chunk_shape=CHUNK)


def _lesion_case(seed: int, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Noise image; a class-1 ball (radius 4, ~250 voxels) and a class-2 cube of 8 voxels, far apart."""
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((channels, *SHAPE), dtype=np.float32)
    centre = rng.integers(8, np.asarray(SHAPE) - 8)
    grid = np.indices(SHAPE).transpose(1, 2, 3, 0)
    label = (np.linalg.norm(grid - centre, axis=-1) <= 4).astype(np.uint8)
    corner = (2, 2, 2) if centre[0] > SHAPE[0] // 2 else (SHAPE[0] - 4, 2, 2)
    label[corner[0] : corner[0] + 2, corner[1] : corner[1] + 2, corner[2] : corner[2] + 2] = 2
    return image, label


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[CaseIndex]]:
    """real: two lesion cases, one with an empty label, one without label; synthetic: two lesion cases."""
    root = tmp_path_factory.mktemp("stores")
    real, synthetic = root / "real", root / "synthetic"
    for k in range(2):
        _write(real, f"lesion{k}", *_lesion_case(k))
        _write(synthetic, f"synth{k}", *_lesion_case(10 + k))
    empty_image = np.random.default_rng(5).standard_normal((1, *SHAPE), dtype=np.float32)
    _write(real, "empty", empty_image, np.zeros(SHAPE, dtype=np.uint8))
    _write(real, "unlabelled", empty_image, None)
    return {
        "lesion": index_cases(real, ["lesion0", "lesion1"], seed=0),
        "all": index_cases(real, ["lesion0", "lesion1", "empty", "unlabelled"], seed=0),
        "synthetic": index_cases(synthetic, ["synth0", "synth1"], seed=0),
    }


def _dataset(cases: list[CaseIndex], **kwargs: Any) -> PatchDataset:
    options: dict[str, Any] = {"patch_size": PATCH, "batch_size": 3, "seed": 1, "length": 300, **kwargs}
    return PatchDataset(cases, **options)


def _centre(label: torch.Tensor) -> int:
    return int(label[0, PATCH[0] // 2, PATCH[1] // 2, PATCH[2] // 2])


def test_index_cases_lists_foreground_and_keeps_every_class(stores: dict[str, list[CaseIndex]]) -> None:
    store = stores["all"][0].store
    full = index_cases(store, ["lesion0", "empty", "unlabelled"], seed=0)
    label = read_patch(store, "lesion0", (0, 0, 0), SHAPE)[1]
    assert label is not None
    assert full[0].shape == SHAPE
    assert full[0].n_channels == 1
    assert np.array_equal(full[0].foreground, np.argwhere(label > 0))
    assert full[0].foreground.dtype == np.int32
    assert np.array_equal(full[0].classes, label[label > 0])
    for no_foreground in full[1:]:
        assert no_foreground.foreground.shape == (0, 3)
        assert no_foreground.classes.shape == (0,)

    small = index_cases(store, ["lesion0"], seed=0, max_points=10)[0]
    assert len(small.foreground) == 10
    assert np.array_equal(np.bincount(small.classes), [0, 5, 5])  # the 8-voxel class keeps half the budget
    assert np.array_equal(label[tuple(small.foreground.T)], small.classes)
    again = index_cases(store, ["lesion0"], seed=0, max_points=10)[0]
    other = index_cases(store, ["lesion0"], seed=1, max_points=10)[0]
    assert np.array_equal(small.foreground, again.foreground)
    assert not np.array_equal(small.foreground, other.foreground)


def test_cached_reads_match_read_patch(stores: dict[str, list[CaseIndex]]) -> None:
    case = stores["all"][0]
    dataset = _dataset(stores["all"])
    for origin in [(0, 0, 0), (-5, 30, 10), (30, -3, 25), (-20, -20, -20)]:
        image, label = dataset.read_region(case, origin, (20, 12, 16))
        expected_image, expected_label = read_patch(case.store, case.case_id, origin, (20, 12, 16))
        assert expected_label is not None
        assert np.array_equal(image, expected_image)
        assert np.array_equal(label, expected_label)
    image, label = dataset.read_region(stores["all"][3], (0, 0, 0), PATCH)  # no label array: zeros
    assert label.dtype == np.uint8
    assert not label.any()


def test_items_are_reproducible_from_seed_and_index(stores: dict[str, list[CaseIndex]]) -> None:
    options = {"length": 12, "augmentation": AUGMENT, "synthetic": stores["synthetic"], "synthetic_ratio": 0.5}
    first, second = _dataset(stores["all"], **options), _dataset(stores["all"], **options)
    other_seed = _dataset(stores["all"], **{**options, "seed": 2})
    differs = 0
    for i in range(12):
        a, b, c = first[i], second[i], other_seed[i]
        assert a["image"].dtype == torch.float32
        assert a["image"].shape == (1, *PATCH)
        assert a["label"].dtype == torch.int64
        assert a["label"].shape == (1, *PATCH)
        assert set(torch.unique(a["label"]).tolist()) <= {0, 1, 2}
        assert a["image"].numpy().tobytes() == b["image"].numpy().tobytes()
        assert torch.equal(a["label"], b["label"])
        assert (a["case_id"], a["synthetic"], a["forced_foreground"]) == (
            b["case_id"],
            b["synthetic"],
            b["forced_foreground"],
        )
        differs += not torch.equal(a["image"], c["image"])
    assert differs == 12

    # spawned, as the training stage does: forking a pytest process that runs threads is not safe
    loader = DataLoader(first, batch_size=3, num_workers=2, shuffle=False, multiprocessing_context="spawn")
    for step, batch in enumerate(loader):
        items = [second[i] for i in batch_items(step, 3)]
        assert torch.equal(batch["image"], torch.stack([item["image"] for item in items]))
        assert torch.equal(batch["label"], torch.stack([item["label"] for item in items]))
        assert batch["case_id"] == [item["case_id"] for item in items]


def test_foreground_oversampling_follows_nnunet_positions(stores: dict[str, list[CaseIndex]]) -> None:
    small = (8, 8, 8)  # so that a random patch meets foreground only ~1 time in 5
    oversampled = _dataset(stores["lesion"], foreground_fraction=0.33, patch_size=small)
    uniform = _dataset(stores["lesion"], foreground_fraction=0.0, patch_size=small)
    # round(3 * 0.67) = 2: positions 0 and 1 are random, position 2 is forced.
    assert [oversampled.choose(i)[2] for i in range(300)] == [i % 3 == 2 for i in range(300)]
    assert not any(uniform.choose(i)[2] for i in range(300))
    with_foreground = {"oversampled": 0, "uniform": 0}
    for i in range(150):
        item = oversampled[i]
        assert item["forced_foreground"] == (i % 3 == 2)
        if item["forced_foreground"]:
            assert item["label"][0, 4, 4, 4] > 0  # centred on the chosen voxel: index patch // 2
        with_foreground["oversampled"] += bool(item["label"].any())
        with_foreground["uniform"] += bool(uniform[i]["label"].any())
    # expected about 150 * (1/3 + 2/3 * 0.2) = 70 against 150 * 0.2 = 30
    assert with_foreground["oversampled"] >= with_foreground["uniform"] + 25


def test_forced_items_balance_the_classes(stores: dict[str, list[CaseIndex]]) -> None:
    """Class 2 has 8 voxels against ~250 of class 1, yet is the centre of about half of the forced patches."""
    n = 120
    dataset = _dataset(stores["lesion"], foreground_fraction=1.0, length=n)
    centres = [_centre(dataset[i]["label"]) for i in range(n)]
    assert set(centres) == {1, 2}
    assert abs(centres.count(2) - n / 2) <= 4 * np.sqrt(n * 0.25)


def test_cases_without_foreground_fall_back_to_random_patches(stores: dict[str, list[CaseIndex]]) -> None:
    dataset = _dataset(stores["all"][2:], foreground_fraction=1.0, length=10)
    for i in range(10):
        case, _, forced, origin = dataset.choose(i)
        assert forced
        assert all(0 <= o <= n - p for o, n, p in zip(origin, case.shape, PATCH, strict=True))
        assert not dataset[i]["label"].any()


def test_patch_larger_than_the_volume_is_zero_padded(tmp_path: Path) -> None:
    shape = (10, 16, 13)
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(1, *shape) + 1
    label = np.zeros(shape, dtype=np.uint8)
    label[4:7, 5:9, 3:6] = 1
    _write(tmp_path, "small", image, label)
    cases = index_cases(tmp_path, ["small"], seed=0)
    patch = (16, 16, 16)
    item = PatchDataset(cases, patch_size=patch, batch_size=2, seed=0, length=4, foreground_fraction=0.0)[0]
    pad = ((3, 3), (0, 0), (1, 2))  # x: 6 missing -> 3 + 3; z: 3 missing -> 1 before, 2 after
    assert np.array_equal(item["image"].numpy(), np.pad(image, ((0, 0), *pad)))
    assert np.array_equal(item["label"][0].numpy(), np.pad(label, pad))

    forced = PatchDataset(cases, patch_size=patch, batch_size=2, seed=0, length=4, foreground_fraction=1.0)
    for i in range(4):
        item = forced[i]
        assert item["image"].shape == (1, *patch)
        assert _centre(item["label"]) == 1


def test_synthetic_share_is_binomial_around_the_ratio(stores: dict[str, list[CaseIndex]]) -> None:
    n, ratio = 400, 0.3
    mixed = _dataset(stores["lesion"], synthetic=stores["synthetic"], synthetic_ratio=ratio, length=n)
    choices = [mixed.choose(i) for i in range(n)]
    synthetic_ids = {c.case_id for c in stores["synthetic"]}
    assert all((case.case_id in synthetic_ids) == synthetic for case, synthetic, _, _ in choices)
    share = sum(synthetic for _, synthetic, _, _ in choices)
    assert abs(share - n * ratio) <= 4 * np.sqrt(n * ratio * (1 - ratio))
    item = mixed[next(i for i, c in enumerate(choices) if c[1])]
    assert item["synthetic"]
    assert item["case_id"] in synthetic_ids
    for exact, expected in ((0.0, False), (1.0, True)):
        pure = _dataset(stores["lesion"], synthetic=stores["synthetic"], synthetic_ratio=exact, length=100)
        assert all(pure.choose(i)[1] == expected for i in range(100))
    # a pool at ratio 0 changes nothing: the same cases and origins as without one
    without = _dataset(stores["lesion"], length=100)
    unused = _dataset(stores["lesion"], synthetic=stores["synthetic"], synthetic_ratio=0.0, length=100)
    assert [without.choose(i) for i in range(100)] == [unused.choose(i) for i in range(100)]
    no_pool = _dataset(stores["lesion"], synthetic_ratio=1.0, length=50)
    assert not any(no_pool.choose(i)[1] for i in range(50))


def test_batch_items_are_the_steps_indices() -> None:
    assert batch_items(0, 3) == range(0, 3)
    assert batch_items(5, 4) == range(20, 24)
    with pytest.raises(ValueError, match="step"):
        batch_items(-1, 3)


def test_invalid_inputs_are_named(tmp_path: Path, stores: dict[str, list[CaseIndex]]) -> None:
    real = stores["lesion"]
    with pytest.raises(ValueError, match="empty"):
        _dataset([])
    with pytest.raises(ValueError, match=r"patch_size .*\(0, 16, 16\)"):
        _dataset(real, patch_size=(0, 16, 16))
    with pytest.raises(ValueError, match=r"synthetic_ratio .* 1\.5"):
        _dataset(real, synthetic_ratio=1.5)
    with pytest.raises(ValueError, match=r"foreground_fraction .* -0\.1"):
        _dataset(real, foreground_fraction=-0.1)
    _write(tmp_path, "two", np.zeros((2, 16, 16, 16), dtype=np.float32), None)
    with pytest.raises(ValueError, match=r"synthetic cases have \[2\] channels, real cases 1"):
        _dataset(real, synthetic=index_cases(tmp_path, ["two"], seed=0), synthetic_ratio=0.5)
    with pytest.raises(IndexError):
        _dataset(real, length=3)[3]


def test_decoded_case_cache_gives_the_same_items_and_respects_its_budget(
    stores: dict[str, list[CaseIndex]],
) -> None:
    cases = stores["all"]
    plain = _dataset(cases, augmentation=AugmentParams())
    cached = _dataset(cases, augmentation=AugmentParams(), cache_mb=64)
    for i in range(40):
        a, b = plain[i], cached[i]
        assert torch.equal(a["image"], b["image"])
        assert torch.equal(a["label"], b["label"])
    assert 1 <= len(cached._decoded) <= len(cases)
    one_case = cases[0]
    image_bytes = int(np.prod(one_case.shape)) * one_case.n_channels * 4
    tight = _dataset(cases, cache_mb=(image_bytes * 1.5) / 2**20)  # room for one case (+ its label) only
    for i in range(40):
        tight[i]
    assert len(tight._decoded) == 1
    assert _dataset(cases, cache_mb=0.001)[0]["image"].shape == (1, *PATCH)  # a case over budget is read from Zarr
    assert not _dataset(cases, cache_mb=0.001)._decoded
