"""Distribution-level checks of the synthetic gate on tiny made-up data: the feature MMD ratio against the
real-train halves, the nearest-neighbour copy rate with its shift/flip search, the diversity over seeds of one
ROI and condition, and their verdicts in the gate (a NaN statistic fails unless it was not measured, with why)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from lesionflow.errors import SourceError
from lesionflow.params import Params
from lesionflow.quality.result import GateResult
from lesionflow.quality.synthetic_checks import normalized_cross_correlation
from lesionflow.quality.synthetic_distribution import (
    RANDOM_ENCODER_CHANNELS,
    DistributionStats,
    SyntheticLesion,
    deepest_encoder_module,
    distribution_stats,
    encoder_features,
    max_shift_flip_ncc,
    mmd_ratio,
    random_encoder,
    seed_diversity,
)
from lesionflow.quality.synthetic_suite import SyntheticStats, SyntheticThresholds, run_synthetic_gate
from lesionflow.seg.networks import NetworkConfig, build_network
from lesionflow.stages.validate_synthetic import _distribution
from lesionflow.workspace import Workspace

SIZE = (12, 12, 12)
NAN = float("nan")


def _textures(n: int, seed: int) -> np.ndarray:
    """``n`` lesion ROIs (n, 1, *SIZE): smoothed noise, a texture with spatial structure like a real lesion's."""
    noise = np.random.default_rng(seed).normal(size=(n, 1, *SIZE))
    return np.stack([ndimage.gaussian_filter(x, sigma=(0, 1, 1, 1)) for x in noise]).astype(np.float32)


def _blob() -> np.ndarray:
    """A 5 x 4 x 6 box lesion off the ROI centre, so flips and shifts move it."""
    mask = np.zeros(SIZE, bool)
    mask[3:8, 4:8, 2:8] = True
    return mask


def _flat(rois: np.ndarray) -> np.ndarray:
    return rois.reshape(len(rois), -1).astype(np.float64)


# ----------------------------------------------------------------------------------- MMD


def test_mmd_ratio_is_about_one_for_the_same_distribution_and_large_for_a_shifted_one() -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 16))
    same = mmd_ratio(rng.normal(size=(40, 16)), real, seed=1)
    shifted = mmd_ratio(rng.normal(size=(40, 16)) + 1.5, real, seed=1)
    assert 0.6 < same.ratio < 1.6, same
    assert shifted.ratio > 10.0, shifted
    assert shifted.mmd2 > 20 * abs(same.mmd2)  # the unbiased estimates, reported alongside
    assert (same.n_synthetic, same.n_real) == (40, 60)
    assert same.bandwidth == shifted.bandwidth > 0  # from the real features only: the synthetic set cannot move it


def test_mmd_ratio_over_many_draws_centres_on_one() -> None:
    """The size-normalised ratio is ~1 for a synthetic set drawn like the real one, whatever the set sizes."""
    rng = np.random.default_rng(3)
    for m in (8, 40):
        ratios = [mmd_ratio(rng.normal(size=(m, 16)), rng.normal(size=(30, 16)), seed=k).ratio for k in range(60)]
        assert 0.85 < float(np.median(ratios)) < 1.15, (m, np.median(ratios))
        assert max(ratios) < 2.5, (m, max(ratios))  # the default bound, quality.synthetic.max_mmd_ratio, is 3


def test_nan_features_or_too_few_rois_give_nan_and_no_scale_gives_nan() -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(20, 4))
    bad = rng.normal(size=(10, 4))
    bad[3, 1] = np.nan
    assert math.isnan(mmd_ratio(bad, real, seed=0).ratio)
    assert math.isnan(mmd_ratio(real[:5], np.ones((20, 4)), seed=0).ratio)  # all real features equal: no scale
    assert math.isnan(mmd_ratio(real[:1], real, seed=0).ratio)
    with pytest.raises(ValueError, match="same f"):
        mmd_ratio(real[:, :3], real, seed=0)


# ----------------------------------------------------------------------------------- copies


def test_vectorised_search_matches_the_pairwise_ncc_without_shift_or_flip() -> None:
    rois = _textures(3, seed=1)
    mask = _blob()
    for ref in rois[1:]:
        plain = max_shift_flip_ncc(rois[0], mask, ref[None], max_shift=0, flips=((),))
        assert plain == pytest.approx(normalized_cross_correlation(rois[0], ref, mask), abs=1e-12)
    searched = max_shift_flip_ncc(rois[0], mask, rois[1:])
    assert searched >= max(normalized_cross_correlation(rois[0], r, mask) for r in rois[1:])


def test_exact_shifted_and_flipped_copies_are_found_and_independent_noise_is_not() -> None:
    real = _textures(6, seed=2)
    mask = _blob()
    copies = [
        real[0],
        np.roll(real[1], 1, axis=2),  # moved one voxel along y
        np.roll(real[2], (-2, 1), axis=(1, 3)),  # two voxels along x, one along z
        np.flip(real[3], axis=(1, 3)),  # mirrored in x and z
        np.roll(np.flip(real[4], axis=2), 1, axis=1),  # mirrored in y, then moved
    ]
    for image in copies:
        assert max_shift_flip_ncc(image, mask, real) == pytest.approx(1.0, abs=1e-9)
    noise = _textures(20, seed=99)
    lesions = [SyntheticLesion(image, mask, new_texture=True) for image in copies]
    copied = distribution_stats(lesions, real, _flat, copy_ncc=0.95, seed=0, encoder="flat")
    assert (copied.copy_rate, copied.n_copies, copied.n_copy_checked) == (1.0, 5, 5)
    independent = [SyntheticLesion(image, mask, new_texture=True) for image in noise]
    fresh = distribution_stats(independent, real, _flat, copy_ncc=0.95, seed=0, encoder="flat")
    assert fresh.copy_rate == 0.0
    assert max(max_shift_flip_ncc(image, mask, real) for image in noise) < 0.8


def test_pasted_copies_are_reported_apart_and_not_counted_in_the_copy_rate() -> None:
    real = _textures(6, seed=2)
    mask = _blob()
    pasted = [SyntheticLesion(real[k], mask, new_texture=False, name=f"p{k}") for k in range(3)]
    fresh = [SyntheticLesion(image, mask, True, name=f"n{k}") for k, image in enumerate(_textures(4, seed=5))]
    stats = distribution_stats(pasted + fresh, real, _flat, copy_ncc=0.95, seed=0, encoder="flat")
    assert (stats.paste_copy_rate, stats.n_pasted) == (1.0, 3)
    assert (stats.copy_rate, stats.n_copy_checked) == (0.0, 4)
    assert [round(stats.nearest_ncc[f"p{k}"], 9) for k in range(3)] == [1.0, 1.0, 1.0]  # per lesion, by name
    assert all(stats.nearest_ncc[f"n{k}"] < 0.8 for k in range(4))
    only_pasted = distribution_stats(pasted, real, _flat, copy_ncc=0.95, seed=0, encoder="flat")
    assert math.isnan(only_pasted.copy_rate)
    assert "copies by construction" in only_pasted.not_measured["copy_rate"]


def test_copy_search_edge_cases() -> None:
    real = _textures(2, seed=4)
    assert math.isnan(max_shift_flip_ncc(real[0], np.zeros(SIZE, bool), real))  # empty lesion
    assert max_shift_flip_ncc(np.ones((1, *SIZE)), _blob(), real) == 0.0  # constant lesion: no evidence
    broken = real[0].copy()
    broken[0, 4, 5, 3] = np.nan
    assert math.isnan(max_shift_flip_ncc(broken, _blob(), real))
    corner = np.zeros(SIZE, bool)
    corner[0:3, 0:3, 9:12] = True  # at the ROI's edge: only the shifts that stay inside are tried
    assert max_shift_flip_ncc(real[1], corner, real) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="references must be"):
        max_shift_flip_ncc(real[0], _blob(), real[0])


# ----------------------------------------------------------------------------------- seed diversity


def test_seed_diversity_sees_mode_collapse_only_within_one_roi_and_condition() -> None:
    mask = _blob()
    same = _textures(1, seed=7)[0]
    real = _textures(8, seed=8)
    collapsed = [SyntheticLesion(same, mask, True, group=("case", (0, 0, 0), 2)) for _ in range(3)]
    varied = [SyntheticLesion(x, mask, True, group=("case", (0, 0, 0), 2)) for x in _textures(3, seed=9)]
    assert seed_diversity([same, same], mask) == 0.0
    assert seed_diversity([x for x in _textures(3, seed=9)], mask) > 0.7  # independent textures: NCC ~ 0
    low = distribution_stats(collapsed, real, _flat, copy_ncc=0.95, seed=0, encoder="flat")
    high = distribution_stats(varied, real, _flat, copy_ncc=0.95, seed=0, encoder="flat")
    assert (low.seed_diversity, low.n_seed_groups) == (0.0, 1)
    assert high.seed_diversity > 0.7
    # the same texture in different ROIs (groups) is not a repeat: not measurable, said so
    apart = [SyntheticLesion(same, mask, True, group=("case", (k, 0, 0), 2)) for k in range(3)]
    none = distribution_stats(apart, real, _flat, copy_ncc=0.95, seed=0, encoder="flat")
    assert math.isnan(none.seed_diversity)
    assert none.n_seed_groups == 0
    assert none.not_measured["seed_diversity"].startswith("not measurable: no ROI was generated twice")


# ----------------------------------------------------------------------------------- encoder features


def test_random_encoder_is_seeded_and_pools_the_deepest_level() -> None:
    rois = _textures(5, seed=1)
    net_a, factor = random_encoder(1, seed=11)
    net_b, _ = random_encoder(1, seed=11)
    net_c, _ = random_encoder(1, seed=12)
    assert factor == 2 ** (len(RANDOM_ENCODER_CHANNELS) - 1)
    a, b, c = (encoder_features(n, rois, factor) for n in (net_a, net_b, net_c))
    assert a.shape == (5, RANDOM_ENCODER_CHANNELS[-1])
    assert a.dtype == np.float64
    assert np.array_equal(a, b)  # same seed, same features
    assert not np.allclose(a, c)
    bottom = deepest_encoder_module(net_a)
    assert next(bottom.parameters()).shape[0] == RANDOM_ENCODER_CHANNELS[-1]
    odd = encoder_features(net_a, rois[:, :, :10, :11, :9], factor)  # edge-padded to fit the downsampling
    assert odd.shape == (5, RANDOM_ENCODER_CHANNELS[-1])
    assert np.all(np.isfinite(odd))


@pytest.mark.parametrize("network", ["unet", "dynunet"])
def test_a_segmenters_deepest_encoder_level_gives_the_features(network: str) -> None:
    config = NetworkConfig(network, 1, 2, (8, 16, 32), 1, (16, 16, 16))
    features = encoder_features(build_network(config).eval(), _textures(3, seed=1), config.downsampling)
    assert features.shape == (3, 32)  # the bottom level's width, globally average-pooled
    assert np.all(np.isfinite(features))


def test_stats_are_deterministic_and_nan_features_fail_the_gate(tmp_path: Path) -> None:
    mask = _blob()
    real = _textures(12, seed=1)
    synthetic = [SyntheticLesion(x, mask, True, group=("c", (0, 0, 0), k % 2)) for k, x in enumerate(_textures(6, 2))]
    net, factor = random_encoder(1, seed=3)

    def features(rois: np.ndarray) -> np.ndarray:
        return encoder_features(net, rois, factor)

    first = distribution_stats(synthetic, real, features, copy_ncc=0.95, seed=5, encoder="random")
    again = distribution_stats(synthetic, real, features, copy_ncc=0.95, seed=5, encoder="random")
    assert repr(first) == repr(again)  # every number, NaN included (NaN != NaN defeats ==)
    assert np.isfinite(first.mmd_ratio)
    assert first.n_seed_groups == 2

    def broken(rois: np.ndarray) -> np.ndarray:
        out = features(rois)
        out[0, 0] = np.nan
        return out

    nan = distribution_stats(synthetic, real, broken, copy_ncc=0.95, seed=5, encoder="random")
    assert math.isnan(nan.mmd_ratio)
    assert "mmd_ratio" not in nan.not_measured
    result = _gate(tmp_path / "nan", nan)
    assert not result.success
    assert {f.column for f in result.dataset_failures} == {"mmd_ratio"}
    assert "mmd_ratio = nan is not finite" in result.dataset_failures[0].detail


# ----------------------------------------------------------------------------------- in the gate


def _gate(report: Path, distribution: DistributionStats, **bounds: Any) -> GateResult:
    row = {"sample_id": "s#0", "background_max_abs_diff": 0.0, "mask_binary": 1, "components": 1,
           "inside_organ": 1.0, "histogram_w1": 0.1, "boundary_gradient_ratio": 1.0, "nn_similarity": 0.3,
           "detected_fraction": NAN}  # fmt: skip
    stats = SyntheticStats(0.5, 0.3, NAN, {"acceptance_rate": "no segmenter"}, distribution=distribution)
    return run_synthetic_gate(pd.DataFrame([row]), stats, SyntheticThresholds(**bounds), report, data_docs=False)


def test_gate_bounds_each_statistic_and_shows_the_measured_values(tmp_path: Path) -> None:
    mask = _blob()
    real = _textures(10, seed=1)
    copies = [SyntheticLesion(real[k], mask, True, group=("c", (0, 0, 0), k)) for k in (0, 0, 1, 2)]
    stats = distribution_stats(copies, real, _flat, copy_ncc=0.95, seed=0, encoder="flat pixels")
    assert stats.copy_rate == 1.0
    assert stats.seed_diversity == 0.0
    result = _gate(tmp_path / "bad", stats, max_mmd_ratio=1e9)
    assert not result.success
    assert {f.column for f in result.dataset_failures} == {"copy_rate", "seed_diversity"}
    page = result.report_html.read_text()
    assert "quality.synthetic.max_copy_rate" in page
    assert "Measured: 4 of 4" in page
    assert f"Measured: ratio {stats.mmd_ratio:.4g}" in page
    assert "features: flat pixels" in page
    loose = _gate(tmp_path / "loose", stats, max_mmd_ratio=1e9, max_copy_rate=1.0, min_seed_diversity=0.0)
    assert loose.success


def test_unmeasured_statistics_pass_with_their_reason(tmp_path: Path) -> None:
    real = _textures(3, seed=1)  # too few real ROIs for two baseline halves
    pasted = [SyntheticLesion(real[k], _blob(), new_texture=False) for k in range(3)]
    stats = distribution_stats(pasted, real, _flat, copy_ncc=0.95, seed=0, encoder="flat")
    assert set(stats.not_measured) == {"mmd_ratio", "copy_rate", "seed_diversity"}
    result = _gate(tmp_path / "g", stats)
    assert result.success, result.dataset_failures
    page = result.report_html.read_text()
    assert "the MMD needs at least" in page
    assert "copies by construction and not gated: 1 of 3" in page


def test_the_stage_refuses_real_rois_of_test_cases(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    (tmp_path / "data" / "processed").mkdir(parents=True)
    (tmp_path / "data" / "processed" / "metadata.csv").write_text("case_id,split\ncase_a,train\ncase_t,test\n")
    mask = _blob()
    images = _textures(9, seed=1)
    lesions = [SimpleNamespace(case_id="case_a", image=x, mask=mask) for x in images]
    synthetic = [SyntheticLesion(x, mask, True) for x in _textures(4, seed=2)]
    ok = _distribution(ws, SimpleNamespace(lesions=lesions), synthetic, None, "off", Params())
    assert np.isfinite(ok.mmd_ratio)
    assert ok.encoder.startswith("random-init unet")
    network_config = NetworkConfig("unet", 1, 3, (8, 16, 32), 1, (16, 16, 16))  # a segmenter of the run
    loaded = (build_network(network_config).eval(), SimpleNamespace(network=network_config))
    trained = _distribution(ws, SimpleNamespace(lesions=lesions), synthetic, loaded, "champion:v1", Params())
    assert trained.encoder.startswith("acceptance segmenter champion:v1 (unet")
    assert np.isfinite(trained.mmd_ratio)
    leaked = [*lesions, SimpleNamespace(case_id="case_t", image=images[0], mask=mask)]
    with pytest.raises(SourceError, match="test-split case"):
        _distribution(ws, SimpleNamespace(lesions=leaked), synthetic, None, "off", Params())
