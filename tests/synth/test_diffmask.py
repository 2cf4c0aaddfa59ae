"""DiffMask on CPU (toy): training batches, post-processing invariants (§9.7 item 7), train + generate, checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from lesionflow.params_synth import DiffMaskParams, SyntheticQualityParams
from lesionflow.quality.synthetic_checks import volume_ks
from lesionflow.seeding import derive_seed, rng_for, torch_generator
from lesionflow.synth.diffmask import (
    SizeWindow,
    check_sphere_in_organ,
    generate_masks,
    generate_sized_mask,
    make_diffmask_model,
    mask_training_batches,
    noise_schedule,
    postprocess_mask,
    sample_mask_raw,
    train_diffmask,
)
from lesionflow.synth.placement import Sphere, sphere_channel, sphere_mask
from lesionflow.synth.rois import Roi, lesion_rois

SIZE = (16, 16, 16)
FULL = np.ones((3, 3, 3), bool)


def _components(mask: np.ndarray) -> int:
    return int(ndimage.label(mask, structure=FULL)[1])


def _raw(*blobs: tuple[tuple[float, float, float], float], shape: tuple[int, int, int] = SIZE) -> np.ndarray:
    """A raw sample: -1 background, +1 inside each (centre, radius) ball."""
    raw = -np.ones(shape, np.float32)
    for centre, radius in blobs:
        raw[sphere_mask(shape, centre, radius)] = 1.0
    return raw


@pytest.fixture(scope="module")
def rois() -> list[Roi]:
    """Lesion ROIs of two 32³ cases; every lesion is asymmetric along x (a ball plus a smaller one at +x)."""
    out: list[Roi] = []
    for k, centres in enumerate((((9, 10, 11), (22, 21, 20)), ((12, 20, 14),))):
        label = np.zeros((32, 32, 32), np.uint8)
        for cx, cy, cz in centres:
            label[sphere_mask(label.shape, (cx, cy, cz), 3.0)] = 1
            label[sphere_mask(label.shape, (cx + 3, cy, cz), 2.0)] = 1
        image = label[None].astype(np.float32)
        out += lesion_rois(image, label, None, SIZE, case_id=f"c{k}")
    return out


# --------------------------------------------------------------------------- settings and batches


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"timesteps": 0}, "timesteps"),
        ({"threshold": 1.0}, "threshold"),
        ({"zoom": 0.0}, "zoom"),
        ({"ddim_steps": 51}, "ddim_steps"),
    ],
)
def test_settings_validate(bad: dict[str, float], match: str) -> None:
    assert noise_schedule(DiffMaskParams()).num_timesteps == 50
    with pytest.raises(ValueError, match=match):
        DiffMaskParams(**bad)  # type: ignore[arg-type]


def test_training_batches_are_deterministic_and_binary(rois: list[Roi]) -> None:
    assert len(rois) == 3
    batches = mask_training_batches(rois, 4, seed=3)
    a, b = batches(7), batches(7)
    assert set(a) == {"image", "channels"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["image"].shape == a["channels"].shape == (4, 1, *SIZE)
    assert a["image"].dtype == a["channels"].dtype == torch.float32
    for key in a:
        assert set(torch.unique(a[key]).tolist()) == {-1.0, 1.0}
    assert not torch.equal(batches(8)["image"], a["image"])
    assert torch.equal(mask_training_batches(rois, 4, seed=3)(7)["image"], a["image"])


def test_flip_moves_mask_and_sphere_channel_together(rois: list[Roi]) -> None:
    roi = rois[0]
    assert roi.sphere is not None
    assert not np.array_equal(roi.mask, roi.mask[::-1])  # the flip is visible
    channel = sphere_channel(SIZE, roi.sphere)
    batches = mask_training_batches([roi], 8, seed=0)
    flips = set()
    for i in range(3):
        batch = batches(i)
        for image, control in zip(batch["image"][:, 0].numpy(), batch["channels"][:, 0].numpy(), strict=True):
            flipped = np.array_equal(image > 0, roi.mask[::-1])
            assert flipped or np.array_equal(image > 0, roi.mask)
            assert np.array_equal(control, channel[::-1] if flipped else channel)
            # geometric consistency: the sphere covers the mask and shares its centroid
            inside = control > 0
            assert inside[image > 0].all()
            np.testing.assert_allclose(np.argwhere(inside).mean(0), np.argwhere(image > 0).mean(0), atol=0.6)
            flips.add(flipped)
    assert flips == {True, False}


def test_training_batches_reject_bad_rois(rois: list[Roi]) -> None:
    no_sphere = dataclasses.replace(rois[1], sphere=None)
    with pytest.raises(ValueError, match=r"'c0' lesion index 1 has no bounding sphere"):
        mask_training_batches([rois[0], no_sphere], 2, seed=0)
    empty = dataclasses.replace(rois[2], mask=np.zeros(SIZE, bool))
    with pytest.raises(ValueError, match=r"'c1' lesion index 0 has an empty mask"):
        mask_training_batches([empty], 2, seed=0)
    with pytest.raises(ValueError, match="no lesion ROIs"):
        mask_training_batches([], 2, seed=0)


# --------------------------------------------------------------------------- post-processing


def test_postprocess_keeps_one_filled_component() -> None:
    raw = _raw(((5, 5, 8), 3.5), ((12, 12, 8), 1.5))
    raw[5, 5, 8] = -1.0  # a hole in the big blob
    raw[0, 15, 0] = raw[15, 0, 15] = 1.0  # isolated noise voxels
    raw += np.random.default_rng(0).normal(0, 0.2, raw.shape).astype(np.float32) * (raw < 0)
    out = postprocess_mask(raw, None, DiffMaskParams())
    assert out.dtype == bool
    assert out.shape == raw.shape
    assert _components(out) == 1
    assert out[5, 5, 8]  # hole filled
    assert out[sphere_mask(SIZE, (5, 5, 8), 3.0)].all()
    assert not out[sphere_mask(SIZE, (12, 12, 8), 2.5)].any()  # small blob dropped
    assert not out[0, 15, 0]
    assert not out[15, 0, 15]
    # sigma 1.0 / threshold 0.4 for a ~180-voxel mask keeps the volume close to the ball's
    assert abs(int(out.sum()) - int(sphere_mask(SIZE, (5, 5, 8), 3.5).sum())) <= 40


def test_threshold_is_strict_on_the_unit_mapping() -> None:
    raw = _raw(((8, 8, 8), 3.5))
    raw[raw > 0] = 0.0  # (0 + 1) / 2 = 0.5: not above 0.5
    assert not postprocess_mask(raw, None, DiffMaskParams()).any()
    assert postprocess_mask(raw, None, DiffMaskParams(threshold=0.4)).any()


def test_postprocess_tiny_mask_survives_smoothing() -> None:
    raw = _raw(((8, 8, 8), 1.0))  # 7 voxels: sigma 0.5, threshold 0.01
    out = postprocess_mask(raw, None, DiffMaskParams())
    assert out[raw > 0].all()
    assert _components(out) == 1
    assert 7 <= out.sum() <= 40


def test_equal_components_tie_break() -> None:
    raw = _raw(((4, 4, 8), 2.5), ((11, 11, 8), 2.5))
    first = postprocess_mask(raw, None, DiffMaskParams())
    near_second = postprocess_mask(raw, None, DiffMaskParams(), centre=(12, 12, 8))
    assert first.sum() == near_second.sum()  # a real tie
    assert first[4, 4, 8]  # lowest label (raster order)
    assert not first[11, 11, 8]
    assert near_second[11, 11, 8]  # nearest the given centre
    assert not near_second[4, 4, 8]


def test_zoom_keeps_shape_and_centre() -> None:
    raw = _raw(((8, 8, 8), 3.5))
    plain = postprocess_mask(raw, None, DiffMaskParams(zoom=1.0))
    assert np.array_equal(plain, postprocess_mask(raw, None, DiffMaskParams()))
    zoomed = postprocess_mask(raw, None, DiffMaskParams(zoom=1.5))
    assert zoomed.shape == plain.shape == SIZE
    assert _components(zoomed) == 1
    assert zoomed[plain].all()
    assert 2.5 < zoomed.sum() / plain.sum() < 4.5  # ~1.5³
    np.testing.assert_allclose(np.argwhere(zoomed).mean(0), np.argwhere(plain).mean(0), atol=0.5)
    # an explicit centre anchors the scaling: the far side grows, the near side stays put
    anchored = postprocess_mask(raw, None, DiffMaskParams(zoom=1.5), centre=(5.0, 8.0, 8.0))
    assert np.argwhere(anchored)[:, 0].mean() > np.argwhere(plain)[:, 0].mean() + 1.0
    shrunk = postprocess_mask(raw, None, DiffMaskParams(zoom=0.5))
    assert 0 < shrunk.sum() < plain.sum() / 4


def test_organ_intersection_stays_inside_and_connected() -> None:
    raw = _raw(((8, 8, 8), 4.5))
    organ = np.zeros(SIZE, np.uint8)
    organ[:7] = 1  # cuts the ball at x = 7
    organ[9] = 2  # a thin slab: a second, smaller piece once intersected
    out = postprocess_mask(raw, organ, DiffMaskParams())
    free = postprocess_mask(raw, None, DiffMaskParams())
    assert out.shape == SIZE
    assert out.any()
    assert not out[organ == 0].any()
    assert _components(out) == 1
    assert not out[9:].any()  # the slab piece (smaller) was dropped
    assert np.array_equal(out, free & (np.arange(16) < 7)[:, None, None])


def test_all_background_gives_an_empty_mask() -> None:
    out = postprocess_mask(-np.ones(SIZE, np.float32), np.ones(SIZE, np.uint8), DiffMaskParams(zoom=1.5))
    assert out.dtype == bool
    assert out.shape == SIZE
    assert not out.any()


# --------------------------------------------------------------------------- train, sample, generate


def test_train_then_generate(rois: list[Roi], tmp_path: Path) -> None:
    settings = DiffMaskParams(timesteps=8, steps=4, batch_size=2, learning_rate=1e-3, ema_decay=0.5, checkpoint_every=2)
    outcome = train_diffmask(rois, settings, tmp_path / "ckpt", seed=0, warn=lambda _: None)
    assert outcome.steps_done == 4
    assert len(outcome.history) == 4
    assert all(np.isfinite(outcome.history))
    model = outcome.ema
    assert (model.config.in_channels, model.config.out_channels, model.config.cond_dim) == (2, 1, 0)

    sphere = Sphere(centre=(8.0, 8.0, 8.0), radius=3.5)
    organ = np.zeros(SIZE, np.uint8)
    organ[2:14, 2:14, 2:14] = 1
    check_sphere_in_organ(sphere, organ, "toy")
    masks = generate_masks(model, settings, SIZE, sphere, organ, torch_generator(0, "mask", 1), count=2)
    assert len(masks) == 2
    ball = sphere_mask(SIZE, sphere.centre, sphere.radius)
    for m in masks:
        assert m.mask.shape == SIZE
        assert m.mask.dtype == bool
        assert m.sphere == sphere
        assert m.voxels == int(m.mask.sum())
        assert _components(m.mask) <= 1
        assert not m.mask[organ == 0].any()
        inter = int((m.mask & ball).sum())
        assert m.sphere_dice == pytest.approx(2 * inter / (m.voxels + int(ball.sum())))

    # the same generator seed replays the chain: generate_masks = sample_mask_raw + postprocess about the centre
    raw = sample_mask_raw(model, settings, SIZE, sphere, torch_generator(0, "mask", 1), batch=2)
    assert raw.shape == (2, *SIZE)
    assert raw.dtype == np.float32
    assert np.abs(raw).max() <= 1.0 + 1e-6  # x0 clipped at the last step
    assert not np.array_equal(raw[0], raw[1])  # one chain, independent noise per mask
    for m, r in zip(masks, raw, strict=True):
        assert np.array_equal(m.mask, postprocess_mask(r, organ, settings, centre=sphere.centre))
    other = sample_mask_raw(model, settings, SIZE, sphere, torch_generator(0, "mask", 2), batch=2)
    assert not np.array_equal(raw, other)


@pytest.mark.parametrize(("ddim_steps", "evaluations"), [(0, 8), (3, 3)])
def test_sampler_choice_sets_network_evaluations(ddim_steps: int, evaluations: int) -> None:
    settings = DiffMaskParams(timesteps=8, ddim_steps=ddim_steps)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = make_diffmask_model(settings)
    seen: list[torch.Tensor] = []
    original = model.forward

    def spy(x, t, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(x)
        return original(x, t, *args, **kwargs)

    model.forward = spy  # type: ignore[method-assign]
    sphere = Sphere(centre=(4.0, 8.0, 8.0), radius=2.0)
    raw = sample_mask_raw(model, settings, (8, 16, 16), sphere, torch.Generator().manual_seed(1), batch=2)
    assert raw.shape == (2, 8, 16, 16)
    assert len(seen) == evaluations
    # the sphere channel goes in as the second input channel, the same for every mask of the batch
    expected = torch.from_numpy(sphere_channel((8, 16, 16), sphere))
    assert all(torch.equal(x[b, 1], expected) for x in seen for b in range(2))


# --------------------------------------------------------------------------- sphere checks


def test_check_sphere_in_organ_messages() -> None:
    organ = np.zeros(SIZE, np.uint8)
    organ[2:14, 2:14, 2:14] = 1
    check_sphere_in_organ(Sphere((8.0, 8.0, 8.0), 5.0), organ, "ok")
    with pytest.raises(ValueError, match="case lung-7") as err:
        check_sphere_in_organ(Sphere((8.0, 8.0, 8.0), 6.0), organ, "lung-7")
    message = str(err.value)
    assert "\n" not in message
    assert "sphere (centre (8.00, 8.00, 8.00), radius 6.00 voxels)" in message
    assert "3 voxel(s) outside the organ mask and 0 outside the volume" in message  # the +x, +y, +z tips at 14
    assert "sample_spheres" in message
    with pytest.raises(ValueError, match=r"outside the organ mask and \d+ outside the volume") as err:
        check_sphere_in_organ(Sphere((1.0, 8.0, 8.0), 2.0), np.ones(SIZE, np.uint8))
    assert " 0 outside the volume" not in str(err.value)
    assert "0 voxel(s) outside the organ mask and 1 outside the volume" in str(err.value)


# --------------------------------------------------------------------------- sizes of new masks (issue 16)


def _disc_rois() -> list[Roi]:
    """16 flat lesions (one-voxel-thick discs, radius 2-4.8): few voxels (13-69) for a large bounding sphere, the
    shape that made toy DiffMask masks several times too big (they fill the sphere)."""
    grid = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij"), -1)
    out: list[Roi] = []
    for k in range(8):
        label = np.zeros((32, 32, 32), np.uint8)
        for j, centre in enumerate(((9, 9, 9), (22, 22, 22))):
            radius = 2 + (2 * k + j) % 8 * 0.4
            d = grid - np.array(centre)
            label[(d[..., 0] ** 2 + d[..., 1] ** 2 <= radius * radius) & (d[..., 2] == 0)] = 1
        out += lesion_rois(label[None].astype(np.float32), label, None, SIZE, case_id=f"d{k}")
    return out


def test_size_window_and_targets() -> None:
    window = SizeWindow.from_sizes([10, 20, 30, 40, 50, 60, 70, 80, 90, 1000, 0], (0.1, 0.9))
    assert window.sizes == (10, 20, 30, 40, 50, 60, 70, 80, 90, 1000)  # empty sizes left out
    assert (window.low, window.high) == (19, 181)  # np.quantile linear: 19, 181
    targets = [window.target(rng_for(0, "t", i)) for i in range(200)]
    assert set(targets) == {19, 20, 30, 40, 50, 60, 70, 80, 90, 181}  # 10 and 1000 clipped into the window
    with pytest.raises(ValueError, match="no training lesion sizes"):
        SizeWindow.from_sizes([0], (0.05, 0.95))
    with pytest.raises(ValueError, match="size_quantiles"):
        DiffMaskParams(size_quantiles=(0.9, 0.1))


def test_sized_mask_is_one_component_of_the_target_size_and_reproducible() -> None:
    """An untrained network (noise masks that fill the ROI): every candidate is rejected, the nearest one is
    rescaled to the target; the result is one component inside the organ and the same for the same seed."""
    settings = DiffMaskParams(timesteps=4, size_tries=2, size_batch=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = make_diffmask_model(settings)
    window = SizeWindow.from_sizes([20, 30, 40, 60], settings.size_quantiles)
    organ = np.zeros(SIZE, np.uint8)
    organ[1:15, 1:15, 1:15] = 1
    sphere = Sphere((8.0, 8.0, 8.0), 3.0)
    a = generate_sized_mask(model, settings, SIZE, sphere, organ, window, seed=5)
    b = generate_sized_mask(model, settings, SIZE, sphere, organ, window, seed=5)
    assert np.array_equal(a.sample.mask, b.sample.mask)
    assert a.candidates == 4
    assert a.rejected == 4
    assert a.rescaled
    assert _components(a.sample.mask) == 1
    assert not a.sample.mask[organ == 0].any()
    assert abs(np.log(a.sample.voxels / a.target)) < np.log(settings.size_tolerance)
    assert window.low <= a.target <= window.high
    assert "4 of 4 candidate(s) rejected" in a.note
    # off: the first mask of one chain, unchecked
    off = generate_sized_mask(model, settings.model_copy(update={"size_tries": 0}), SIZE, sphere, None, window, 5)
    assert (off.candidates, off.rejected, off.rescaled) == (1, 0, False)


@pytest.mark.slow
def test_new_mask_sizes_pass_the_gates_volume_ks(tmp_path: Path) -> None:
    """A toy-trained DiffMask on tiny flat lesions: unmatched, its masks fill their spheres and the gate's KS test
    fails; size-matched, the sizes pass it at the gate's threshold and every mask is one component."""
    rois = _disc_rois()
    real = [r.voxels for r in rois]
    settings = DiffMaskParams(timesteps=10, steps=40, batch_size=4, size_tries=3, size_batch=4)
    model = train_diffmask(rois, settings, tmp_path / "ckpt", seed=0, warn=lambda _: None).ema
    window = SizeWindow.from_sizes(real, settings.size_quantiles)
    threshold = SyntheticQualityParams().min_volume_ks_pvalue  # the gate's default, 0.001
    made: dict[int, list[int]] = {}
    for tries in (0, settings.size_tries):
        arm = settings.model_copy(update={"size_tries": tries})
        made[tries] = []
        for i in range(24):
            sphere = Sphere((8.0, 8.0, 8.0), rois[i % len(rois)].sphere.radius)  # type: ignore[union-attr]
            sized = generate_sized_mask(model, arm, SIZE, sphere, None, window, derive_seed(1, "lesion", i))
            assert _components(sized.sample.mask) <= 1
            made[tries].append(sized.sample.voxels)
    unmatched = [v for v in made[0] if v]  # synthesize skips empty masks: the gate sees the others
    assert volume_ks(real, unmatched).pvalue < threshold  # the issue: masks several times too big
    assert volume_ks(real, made[settings.size_tries]).pvalue >= threshold
    assert min(made[settings.size_tries]) > 0
