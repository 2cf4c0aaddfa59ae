"""Lesion histograms, the k-means bank and its three sampling modes (generative.md §2.3, §2.7)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lesionflow.seeding import rng_for
from lesionflow.synth.histograms import (
    HistogramBank,
    concatenated_histograms,
    kmeans,
    lesion_histogram,
    perturb_histogram,
    validate_histogram,
)


def _roi(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (1, 12, 12, 12)).astype(np.float32)
    mask = np.zeros((12, 12, 12), bool)
    mask[3:9, 2:10, 4:8] = True
    return image, mask


def test_histogram_matches_numpy() -> None:
    image, mask = _roi()
    h = lesion_histogram(image, mask)
    expected, _ = np.histogram(image[0][mask], bins=16, range=(-1.0, 1.0))
    assert h.shape == (16,)
    assert h.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(h, expected / mask.sum())
    np.testing.assert_array_equal(lesion_histogram(image[0], mask), h)  # (x, y, z) image too


def test_histogram_clips_out_of_range_values_into_edge_bins() -> None:
    image = np.zeros((4, 4, 4), np.float32)
    image[0, 0, :2] = [-3.0, 5.0]
    mask = np.zeros_like(image, dtype=bool)
    mask[0, 0, :3] = True
    h = lesion_histogram(image, mask, bins=4)
    np.testing.assert_allclose(h, [1 / 3, 0, 1 / 3, 1 / 3])
    with pytest.raises(ValueError, match="empty mask"):
        lesion_histogram(image, np.zeros_like(mask))


def test_concatenated_histograms_zero_block_for_absent_class() -> None:
    image, mask = _roi()
    label = np.zeros(mask.shape, np.uint8)
    label[mask] = 3
    label[3:5, 2:4, 4:6] = 4
    h = concatenated_histograms(image, label, [3, 4, 5])
    assert h.shape == (48,)
    np.testing.assert_allclose(h[:16], lesion_histogram(image, label == 3))
    np.testing.assert_allclose(h[16:32], lesion_histogram(image, label == 4))
    assert not h[32:].any()


def _two_cluster_histograms(n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    dark = np.zeros(16)
    dark[2:5] = [0.3, 0.4, 0.3]
    bright = np.zeros(16)
    bright[11:14] = [0.2, 0.5, 0.3]
    truth = np.arange(n) % 2
    rows = np.where(truth[:, None] == 0, dark, bright) + rng.uniform(0, 0.01, (n, 16))
    return rows / rows.sum(axis=1, keepdims=True), truth


def test_kmeans_recovers_two_clusters() -> None:
    x, truth = _two_cluster_histograms()
    _, labels, _ = kmeans(x, 2, seed=0)
    # same partition up to label names
    assert np.array_equal(labels, truth) or np.array_equal(labels, 1 - truth)
    bank = HistogramBank.fit(x, 2, seed=0)
    np.testing.assert_array_equal(bank.assignments, truth)  # cluster 0 = darkest texture
    np.testing.assert_allclose(bank.centres[0], x[truth == 0].mean(axis=0))
    again = HistogramBank.fit(x, 2, seed=0)
    np.testing.assert_array_equal(again.centres, bank.centres)


def test_bank_k_reduced_to_number_of_lesions() -> None:
    x, _ = _two_cluster_histograms(3)
    bank = HistogramBank.fit(x, 5, seed=0)
    assert (bank.k, bank.k_requested) == (3, 5)


def test_perturbation_bounded_and_seeded() -> None:
    x, _ = _two_cluster_histograms()
    centre = x[:10].mean(axis=0)
    raw = perturb_histogram(centre, rng_for(3, "hist"), renormalise=False)
    assert np.all(np.abs(raw - centre) <= 0.1 * centre + 1e-15)
    assert np.abs(raw - centre).max() > 0
    again = perturb_histogram(centre, rng_for(3, "hist"), renormalise=False)
    np.testing.assert_array_equal(raw, again)
    renormed = perturb_histogram(centre, rng_for(3, "hist"))
    np.testing.assert_allclose(renormed, raw / raw.sum())
    assert not np.array_equal(renormed, perturb_histogram(centre, rng_for(4, "hist")))


def test_bank_sampling_modes() -> None:
    x, _ = _two_cluster_histograms()
    bank = HistogramBank.fit(x, 2, seed=0)
    draw = bank.sample("cluster", rng_for(0, "s"), cluster=1)
    assert draw.cluster == 1
    assert draw.histogram.sum() == pytest.approx(1.0)
    assert np.all(np.abs(draw.histogram - bank.centres[1]) <= 0.25 * bank.centres[1] + 1e-12)
    same = bank.sample("cluster", rng_for(0, "s"), cluster=1)
    np.testing.assert_array_equal(draw.histogram, same.histogram)
    emp = bank.sample("empirical", rng_for(0, "e"))
    assert emp.source_index is not None
    np.testing.assert_array_equal(emp.histogram, bank.histograms[emp.source_index])
    np.testing.assert_allclose(emp.histogram, x[emp.source_index])
    exp = bank.sample("explicit", rng_for(0, "x"), explicit=[2.0] + [0.0] * 14 + [2.0])
    assert exp.histogram[0] == exp.histogram[15] == 0.5
    with pytest.raises(ValueError, match="unknown histogram mode"):
        bank.sample("other", rng_for(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cluster must be in"):
        bank.sample("cluster", rng_for(0), cluster=2)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ([1.0] * 15, "16 values"),
        ([1.0] * 15 + [-0.1], ">= 0"),
        ([0.0] * 16, "positive sum"),
        ([1.0] * 15 + [float("nan")], "finite"),
    ],
)
def test_explicit_validation_errors(values: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_histogram(values)


def test_multi_class_explicit_renormalises_per_block() -> None:
    vec = validate_histogram([1.0] * 16 + [0.0] * 16, n_classes=2)
    np.testing.assert_allclose(vec[:16], 1 / 16)
    assert not vec[16:].any()


def test_bank_json_round_trip() -> None:
    x, _ = _two_cluster_histograms()
    bank = HistogramBank.fit(x, 2, seed=5, value_range=(-2.0, 3.0))
    back = HistogramBank.from_dict(json.loads(json.dumps(bank.to_dict())))
    np.testing.assert_array_equal(back.centres, bank.centres)
    np.testing.assert_array_equal(back.histograms, bank.histograms)
    np.testing.assert_array_equal(back.assignments, bank.assignments)
    assert (back.bins, back.n_classes, back.value_range, back.k_requested, back.seed) == (16, 1, (-2.0, 3.0), 2, 5)
    with pytest.raises(ValueError, match="not a histogram bank"):
        HistogramBank.from_dict({"format": "x"})


# --------------------------------------------------------------------------- multi-class: per-class banks


def _two_class_histograms() -> np.ndarray:
    """12 lesions: class A (dark or bright) in every one, class B (mid) in the even ones only."""
    rows = []
    for i in range(12):
        a = np.zeros(16)
        a[[2, 3] if i % 3 else [12, 13]] = 0.5
        b = np.zeros(16)
        if i % 2 == 0:
            b[7:9] = [0.4 + 0.01 * i, 0.6 - 0.01 * i]
        rows.append(np.concatenate([a, b]))
    return np.stack(rows)


def test_multi_class_draw_gives_absent_classes_the_zero_block() -> None:
    """A target mask holding only class A gets the all-zero ("absent", as at training) block for class B."""
    x = _two_class_histograms()
    bank = HistogramBank.fit(x, 2, seed=0)
    for mode in ("cluster", "empirical"):
        draw = bank.sample(mode, rng_for(0, mode), present=[True, False])
        assert draw.histogram[:16].sum() == pytest.approx(1.0)
        assert not draw.histogram[16:].any()
        both = bank.sample(mode, rng_for(0, mode), present=[True, True])
        np.testing.assert_allclose(both.histogram.reshape(2, 16).sum(axis=1), [1.0, 1.0])
        only_b = bank.sample(mode, rng_for(1, mode), present=[False, True])
        assert not only_b.histogram[:16].any()
        assert only_b.histogram[16:].sum() == pytest.approx(1.0)
    emp = bank.sample("empirical", rng_for(2), present=[False, True])
    assert emp.sources[0] is None
    assert emp.source_index is not None
    assert emp.source_index % 2 == 0  # a lesion holding class B
    exp = bank.sample("explicit", rng_for(0), explicit=[1.0] * 32, present=[True, False])
    np.testing.assert_allclose(exp.histogram, [1 / 16] * 16 + [0.0] * 16)
    with pytest.raises(ValueError, match="pass present"):
        bank.sample("cluster", rng_for(0))
    with pytest.raises(ValueError, match="all-zero block for class index"):
        bank.sample("explicit", rng_for(0), explicit=[1.0] * 16 + [0.0] * 16, present=[True, True])


def test_per_class_bank_fits_each_class_on_the_lesions_holding_it() -> None:
    x = _two_class_histograms()
    bank = HistogramBank.fit(x, 2, seed=0)
    a_centres, b_centres = bank.class_centres
    assert a_centres.shape == (2, 16)
    np.testing.assert_allclose(a_centres.sum(axis=1), 1.0)
    np.testing.assert_allclose(b_centres.sum(axis=1), 1.0)  # no centre is a blend of present and absent lesions
    assert (bank.class_assignments[1][1::2] == -1).all()  # odd lesions lack class B
    assert (bank.class_assignments[1][0::2] >= 0).all()
    np.testing.assert_array_equal(bank.class_assignments[0], np.where(np.arange(12) % 3 == 0, 1, 0))  # 0 = dark
    assert bank.k == 2
    back = HistogramBank.from_dict(json.loads(json.dumps(bank.to_dict())))
    for got, want in zip(back.class_centres, bank.class_centres, strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="use class_centres"):
        _ = bank.centres
    only_a = HistogramBank.fit(x[1::2], 2, seed=0)  # no lesion holds class B
    with pytest.raises(ValueError, match="class index 1 has no training lesion"):
        only_a.sample("cluster", rng_for(0), present=[True, True])


def test_one_class_bank_of_the_former_format_still_loads() -> None:
    x, _ = _two_cluster_histograms()
    bank = HistogramBank.fit(x, 2, seed=5)
    old = bank.to_dict() | {
        "format": "lesionflow.histogram_bank/1",
        "centres": bank.centres.tolist(),
        "assignments": bank.assignments.tolist(),
    }
    back = HistogramBank.from_dict(old)
    np.testing.assert_array_equal(back.centres, bank.centres)
    a = bank.sample("cluster", rng_for(0, "s")).histogram
    np.testing.assert_array_equal(back.sample("cluster", rng_for(0, "s")).histogram, a)
    with pytest.raises(ValueError, match="rerun `lesionflow stage train-generator`"):
        HistogramBank.from_dict(old | {"n_classes": 2})
