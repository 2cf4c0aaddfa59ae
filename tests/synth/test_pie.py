"""PIE in 3D: settings, severity scale, the editing loop's invariants and a known progression.

The known progression is a toy world where severity *is* lesion size: 8³ ROIs with a bright ball of radius
0..3 voxels in noise, severity = the volume quantile. A model trained on it (300 steps, ~20 s) must grow a small
lesion toward severity 1 and shrink a large one toward 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lesionflow.params_synth import PieParams
from lesionflow.quality.progression_checks import frame_lesion_masks, outside_change, progression_stats
from lesionflow.quality.progression_suite import run_progression_gate
from lesionflow.seeding import rng_for, torch_generator
from lesionflow.synth.pie import (
    CLIP_RANGE,
    SeverityScale,
    edit_mask,
    edit_start,
    edit_timesteps,
    fit_severity_scale,
    lesion_intensity_split,
    loop_settings,
    make_pie_model,
    noise_schedule,
    paper_start,
    progress,
    progression_start,
    start_from_mask,
    train_pie,
)
from lesionflow.synth.rois import Roi

S = 8
RADII = (0.0, 1.0, 1.5, 2.0, 2.5, 3.0)


def ball_roi(i: int, radius: float) -> Roi:
    rng = rng_for(0, "toy-pie", i)
    image = rng.normal(0, 0.3, (1, S, S, S)).astype(np.float32)
    d = np.sqrt(((np.indices((S, S, S)) - (S - 1) / 2) ** 2).sum(0))
    mask = d <= radius
    image[0][mask] += 2.0
    kind = "lesion" if mask.any() else "candidate"
    classes = (1,) if mask.any() else ()
    return Roi(f"c{i}", kind, 0, (0, 0, 0), image, mask.astype(np.uint8), None, mask, None, classes, int(mask.sum()))


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, SeverityScale, float, float]:
    torch.set_num_threads(1)
    rois = [ball_roi(i, RADII[i % len(RADII)]) for i in range(60)]
    lesions = [r for r in rois if r.kind == "lesion"]
    scale = fit_severity_scale(lesions, [r for r in rois if r.kind == "candidate"], "volume", (1,))
    threshold, polarity = lesion_intensity_split(lesions)
    params = PieParams(steps=300, batch_size=8, learning_rate=2e-3, ema_decay=0.99, checkpoint_every=1000)
    outcome = train_pie(rois, scale, params, tmp_path_factory.mktemp("pie"), seed=1, warn=print)
    return outcome.ema, scale, threshold, polarity


@pytest.fixture
def untrained() -> torch.nn.Module:
    torch.manual_seed(0)
    return make_pie_model(1, PieParams(cond_dropout=0.1)).eval()


def test_settings_reject_bad_loop_parameters() -> None:
    with pytest.raises(ValueError, match=r"at least one iteration, got N = 0"):
        PieParams(iterations=0)
    with pytest.raises(ValueError, match=r"strength γ must lie in \(0, 1\], got 0"):
        PieParams(strength=0.0)
    with pytest.raises(ValueError, match=r"got 1.5"):
        PieParams(strength=1.5)
    with pytest.raises(ValueError, match=r"keeps int\(10 · 0.05\) = 0"):
        PieParams(strength=0.05)
    assert PieParams().kept_steps == 5
    assert PieParams(ddim_steps=50).kept_steps == 25


def test_severity_scale_volume_quantiles_and_class_ranks() -> None:
    rois = [ball_roi(i, r) for i, r in enumerate((1.0, 2.0, 3.0, 0.0))]
    scale = fit_severity_scale(rois[:3], rois[3:], "volume", (1,))
    assert scale.volumes == (8, 32, 136)
    assert [scale.of_roi(r) for r in rois] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.0])
    assert scale.trained_range == (0.0, 1.0)
    assert SeverityScale.from_dict(scale.to_dict()) == scale
    by_class = SeverityScale("class", (), (1, 2), (0.0, 1.0))
    assert by_class.of_lesion(5, (1,)) == 0.5
    assert by_class.of_lesion(5, (1, 2)) == 1.0
    only_lesions = fit_severity_scale(rois[1:3], [], "volume", (1,))
    assert only_lesions.trained_range == (0.5, 1.0)
    with pytest.raises(ValueError, match=r"target severity 0.2 is outside the trained range \[0.5, 1\]"):
        only_lesions.check_target(0.2)


def test_loop_invariants_frame_count_start_frame_and_outside_bound(untrained: torch.nn.Module) -> None:
    start = ball_roi(7, 1.0)
    mask = edit_mask(start.mask, 2)
    settings = PieParams(iterations=4)
    out = progress(untrained, settings, start.image, mask, 1.0, torch_generator(0, "t"))
    assert out.frames.shape == (5, 1, S, S, S)
    assert out.frames.dtype == np.float32
    assert np.array_equal(out.frames[0], start.image)  # frame 0 is the start bit for bit
    changed, excess = outside_change(out.frames, mask, settings.beta_outside, CLIP_RANGE)
    assert changed > 0
    assert excess <= 1e-5
    assert np.abs(out.frames[1:, :, mask] - start.image[:, mask]).max() > 10 * changed  # M is where it edits


def test_exact_mode_keeps_the_background_bitwise(untrained: torch.nn.Module) -> None:
    start = ball_roi(8, 1.5)
    mask = edit_mask(start.mask, 1)
    out = progress(untrained, PieParams(iterations=3, beta_outside=0.0), start.image, mask, 1.0, torch_generator(1))
    assert out.exact_background
    assert np.array_equal(
        out.frames[:, :, ~mask].view(np.uint32), np.repeat(start.image[None][:, :, ~mask].view(np.uint32), 4, 0)
    )


def test_same_seed_same_bytes_other_seed_differs(untrained: torch.nn.Module) -> None:
    start = ball_roi(9, 1.0)
    mask = edit_mask(start.mask, 2)
    settings = PieParams(iterations=2)
    a = progress(untrained, settings, start.image, mask, 1.0, torch_generator(5, "x"))
    b = progress(untrained, settings, start.image, mask, 1.0, torch_generator(5, "x"))
    c = progress(untrained, settings, start.image, mask, 1.0, torch_generator(6, "x"))
    assert a.frames.tobytes() == b.frames.tobytes()
    assert not np.array_equal(a.frames[1:], c.frames[1:])


def test_bad_masks_and_volumes_are_clear_errors(untrained: torch.nn.Module) -> None:
    start = ball_roi(10, 1.0)
    settings = PieParams(iterations=1)
    gen = torch_generator(0)
    with pytest.raises(ValueError, match=r"no ROI mask: .* whole_volume=True"):
        progress(untrained, settings, start.image, None, 1.0, gen)
    with pytest.raises(ValueError, match="the ROI mask is empty"):
        progress(untrained, settings, start.image, np.zeros((S, S, S), bool), 1.0, gen)
    with pytest.raises(ValueError, match=r"ROI mask shape \(8, 8, 4\) does not match the start volume \(8, 8, 8\)"):
        progress(untrained, settings, start.image, np.ones((S, S, 4), bool), 1.0, gen)
    with pytest.raises(ValueError, match=r"the start volume has shape \(2, 8, 8, 8\)"):
        progress(untrained, settings, np.zeros((2, S, S, S), np.float32), start.mask, 1.0, gen)
    with pytest.raises(ValueError, match=r"shape \(8, 8, 7\) must be a multiple of 2"):
        progress(untrained, settings, np.zeros((1, S, S, 7), np.float32), np.ones((S, S, 7), bool), 1.0, gen)
    whole = progress(untrained, settings, start.image, None, 1.0, gen, whole_volume=True)
    assert whole.roi_mask.all()


def test_starts_from_the_smallest_lesion_or_a_healthy_spot() -> None:
    image = np.zeros((1, 24, 24, 24), np.float32)
    label = np.zeros((24, 24, 24), np.uint8)
    label[4:6, 4:6, 4:6] = 1  # 8 voxels
    label[14:18, 14:18, 14:18] = 1  # 64 voxels
    organ = np.ones_like(label)
    start = progression_start(image, label, organ, (8, 8, 8), min_voxels=4, margin=1, rng=rng_for(0))
    assert start.kind == "lesion"
    assert start.lesion_voxels == 8
    assert start.origin == (0, 0, 0)  # centroid 4.5 rounds to 4 (half to even), minus 8 // 2
    assert start.roi_mask.sum() == 4**3  # the 2³ lesion grown by one voxel
    healthy = progression_start(image, np.zeros_like(label), organ, (8, 8, 8), min_voxels=4, margin=1, rng=rng_for(0))
    assert healthy.kind == "healthy"
    assert healthy.lesion_voxels == 0
    assert healthy.roi_mask.any()
    with pytest.raises(ValueError, match="no organ mask to start a healthy ROI in"):
        progression_start(image, np.zeros_like(label), None, (8, 8, 8), min_voxels=4, margin=1, rng=rng_for(0))
    given = start_from_mask(image, label, label == 1, (16, 16, 16))
    assert given.kind == "given"
    assert given.roi_mask.sum() == 72
    with pytest.raises(ValueError, match=r"spans \[14, 14, 14\] voxels, more than synth.roi_size \[8, 8, 8\]"):
        start_from_mask(image, label, label == 1, (8, 8, 8))
    with pytest.raises(ValueError, match="ROI mask is empty"):
        start_from_mask(image, label, np.zeros_like(label), (8, 8, 8))


def _measure(frames: np.ndarray, masks: np.ndarray, roi: np.ndarray, direction: float, tid: str) -> dict[str, float]:
    stats = progression_stats(frames, masks, roi, direction=direction, beta_outside=0.01, clip_range=(-5.0, 5.0))
    return {
        "trajectory_id": tid,
        "frame_count_ok": int(len(frames) == 11),
        "outside_within_bound": int(stats.outside_excess <= 1e-5),
        "trend_rho": stats.trend_rho,
        "step_change_ratio": stats.step_change_ratio,
        "first": stats.severity[0],
        "last": stats.severity[-1],
    }


def test_known_progression_grows_and_shrinks_and_passes_the_gate(
    toy_world: tuple[torch.nn.Module, SeverityScale, float, float], tmp_path: Path
) -> None:
    import pandas as pd

    model, scale, threshold, polarity = toy_world
    rows, reversed_rows = [], []
    for seed, (radius, target) in enumerate([(1.0, 1.0)] * 3 + [(3.0, 0.0)] * 2):
        start = ball_roi(100 + seed, radius)
        mask = edit_mask(start.mask, 2)
        out = progress(model, PieParams(), start.image, mask, target, torch_generator(seed, "known"))
        masks = frame_lesion_masks(out.frames, start.label, mask, threshold, polarity)
        direction = target - scale.of_roi(start)
        rows.append(_measure(out.frames, masks, mask, direction, f"t{seed}"))
        # the same frames played backwards: severity moves away from the target
        reversed_rows.append(_measure(out.frames[::-1], masks[::-1], mask, direction, f"t{seed}"))
    grow, shrink = rows[:3], rows[3:]
    assert all(r["last"] > 3 * r["first"] for r in grow), grow  # an 8-voxel lesion grows toward the largest
    assert all(r["last"] < r["first"] / 2 for r in shrink), shrink  # a 136-voxel lesion heals toward 0
    table = pd.DataFrame(rows)
    assert table["trend_rho"].mean() > 0.5
    assert table["step_change_ratio"].mean() < 1.0  # the edits converge (the paper's argument)
    passed = run_progression_gate(table, 0.0, 1.0, tmp_path / "ok", data_docs=False)
    assert passed.success
    assert passed.n_rejected == 0
    failed = run_progression_gate(pd.DataFrame(reversed_rows), 0.0, 1.0, tmp_path / "bad", data_docs=False)
    assert not failed.success
    assert {f.column for f in failed.dataset_failures} >= {"trend_rho", "step_change_ratio"}


def test_strength_maps_to_the_papers_signal_level() -> None:
    """γ = 0.5 starts the paper's edit at t = 481 of SD's scaled-linear schedule (ᾱ = 0.302); ours starts at the
    cosine step with the nearest ᾱ, not at the same fraction of our steps (which sat at ᾱ = 0.51 for T = 1000)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    t, abar = paper_start(0.5)
    assert t == 481
    assert abar == pytest.approx(np.prod(1 - betas[:482]))
    assert abar == pytest.approx(0.3023, abs=1e-4)
    assert paper_start(1.0)[0] == 981
    assert paper_start(0.01)[0] == 1  # below one paper step: its last step
    big = PieParams(timesteps=1000, ddim_steps=50)
    start, start_abar = edit_start(big)
    assert start == 625
    assert start_abar == pytest.approx(abar, abs=2e-3)
    steps = edit_timesteps(big)
    assert (steps[0], steps[-1], len(steps)) == (625, 0, 25)  # int(50 · 0.5) steps from the mapped start
    toy = PieParams()  # T = 50, S = 10: the toy preset
    assert edit_timesteps(toy) == [30, 22, 15, 8, 0]
    assert float(noise_schedule(toy).alphas_cumprod[30]) == pytest.approx(0.3116, abs=1e-4)
    settings = loop_settings(toy)
    assert settings["strength"] == 0.5
    assert (settings["start_timestep"], settings["paper_start_timestep"]) == (30, 481)
    assert settings["start_alpha_bar"] == pytest.approx(0.3116, abs=1e-4)
    assert settings["paper_alpha_bar"] == pytest.approx(abar)
