"""Preprocessing array operations: exact geometry, crop, normalization, resampling and the way back."""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lesionflow.io.layout import on_disk, x_fastest
from lesionflow.preprocess import ops
from lesionflow.preprocess.ops import CropBox, NormStats, PreprocessRecord

Spacing = tuple[float, float, float]


def _affine(columns: list[list[float]], origin: tuple[float, float, float] = (-11.0, 7.5, 3.25)) -> np.ndarray:
    """4x4 affine whose voxel axes i, j, k map to the given world vectors (mm)."""
    a = np.eye(4)
    a[:3, :3] = np.array(columns, dtype=np.float64).T
    a[:3, 3] = origin
    return a


def _rot_z(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


LPS = _affine([[-1.0, 0, 0], [0, -1.2, 0], [0, 0, 2.0]])
LAS = _affine([[-0.8, 0, 0], [0, 1.0, 0], [0, 0, 1.5]])
PSR = _affine([[0, -1.1, 0], [0, 0, 2.0], [0.9, 0, 0]])  # i -> Posterior, j -> Superior, k -> Right
OBLIQUE = np.eye(4)
OBLIQUE[:3, :3] = _rot_z(25.0) @ np.diag([-1.0, 1.3, 0.7]) @ np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0.0]])
OBLIQUE[:3, 3] = (4.0, -2.0, 9.0)
AFFINES = {"LPS": LPS, "LAS": LAS, "PSR": PSR, "oblique": OBLIQUE}


def _world(affine: np.ndarray, index: np.ndarray) -> np.ndarray:
    """World coordinates (mm) of voxel indices (..., 3)."""
    return index @ affine[:3, :3].T + affine[:3, 3]


def _sphere(shape: tuple[int, int, int], affine: np.ndarray, radius: float, centre: np.ndarray) -> np.ndarray:
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    return np.linalg.norm(_world(affine, index) - centre, axis=-1) < radius


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


# --- to_ras ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_to_ras_keeps_world_coordinates_and_round_trips(name: str) -> None:
    affine = AFFINES[name]
    shape = (12, 14, 13)
    raw = np.arange(np.prod(shape)).reshape(shape)  # value = flat raw index, so we can trace every voxel
    ras, ras_affine, ornt = ops.to_ras(raw, affine)

    assert nib.orientations.aff2axcodes(ras_affine) == ("R", "A", "S")
    ras_index = np.stack(np.meshgrid(*[np.arange(n) for n in ras.shape], indexing="ij"), axis=-1)
    raw_index = np.stack(np.unravel_index(ras, shape), axis=-1)
    np.testing.assert_allclose(_world(ras_affine, ras_index), _world(affine, raw_index), atol=1e-9)
    assert np.array_equal(ops.from_ras(ras, ornt), raw)

    four_d = np.stack([raw, -raw], axis=-1)  # channels last travel along untouched
    ras4, _, _ = ops.to_ras(four_d, affine)
    assert np.array_equal(ras4[..., 0], ras)
    assert np.array_equal(ras4[..., 1], -ras)


def test_to_ras_rejects_degenerate_input() -> None:
    with pytest.raises(ValueError, match="degenerate"):
        ops.to_ras(np.zeros((4, 4, 4)), np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="non-empty"):
        ops.to_ras(np.zeros((4, 0, 4)), np.eye(4))


# --- crop ---------------------------------------------------------------------------------------------------


def test_foreground_bbox_crop_and_affine() -> None:
    image = np.zeros((2, 16, 15, 14), np.float32)
    image[1, 3:9, 4:12, 5:7] = 2.0
    label = np.zeros((16, 15, 14), np.uint8)
    label[10, 5, 6] = 1  # label outside the image's nonzero region widens the box (union)
    box = ops.foreground_bbox(image, label)
    assert box == CropBox(lo=(3, 4, 5), hi=(11, 12, 7))
    assert ops.foreground_bbox(image, None) == CropBox(lo=(3, 4, 5), hi=(9, 12, 7))
    assert ops.foreground_bbox(np.zeros((1, 5, 6, 7)), None) == CropBox(lo=(0, 0, 0), hi=(5, 6, 7))

    cropped = ops.crop(image, box)
    assert cropped.shape == (2, *box.shape)
    assert cropped[1].sum() == image[1].sum()
    assert np.array_equal(ops.crop(label, box), label[3:11, 4:12, 5:7])
    affine = ops.to_ras(label, OBLIQUE)[1]
    new_affine = ops.cropped_affine(affine, box)
    idx = np.array([[0, 0, 0], [7, 7, 1], [2, 5, 0]], dtype=np.float64)
    np.testing.assert_allclose(_world(new_affine, idx), _world(affine, idx + np.array(box.lo)), atol=1e-12)
    with pytest.raises(ValueError, match="crop box"):
        ops.crop(label, CropBox(lo=(0, 0, 0), hi=(17, 5, 5)))


# --- resampling geometry -------------------------------------------------------------------------------


def test_target_shape_and_resampled_affine_keep_field_of_view() -> None:
    shape, spacing, target = (12, 12, 8), (1.0, 1.0, 3.0), (1.5, 1.5, 1.5)
    out_shape = ops.target_shape(shape, spacing, target)
    assert out_shape == (8, 8, 16)
    assert ops.target_shape((3, 1, 5), (1.0, 1.0, 1.0), (2.0, 4.0, 2.0)) == (2, 1, 2)  # round half even, >= 1

    affine = ops.to_ras(np.zeros(shape), _affine([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 3.0]]))[1]
    affine[:3, :3] = _rot_z(10.0) @ affine[:3, :3]
    out = ops.resampled_affine(affine, spacing, target)
    np.testing.assert_allclose(ops.spacing_of(out), target, rtol=0, atol=1e-12)
    # n * s / t is integral here, so both outer cell edges and the field-of-view centre coincide.
    np.testing.assert_allclose(_world(out, np.full(3, -0.5)), _world(affine, np.full(3, -0.5)), atol=1e-12)
    edge_in, edge_out = np.array(shape) - 0.5, np.array(out_shape) - 0.5
    np.testing.assert_allclose(_world(out, edge_out), _world(affine, edge_in), atol=1e-12)
    centre_in = (np.array(shape) - 1) / 2
    centre_out = (np.array(out_shape) - 1) / 2
    np.testing.assert_allclose(_world(out, centre_out), _world(affine, centre_in), atol=1e-12)
    with pytest.raises(ValueError, match="positive"):
        ops.target_shape(shape, (1.0, 0.0, 1.0), target)


@pytest.mark.parametrize(("order", "margin"), [(1, 0), (3, 8)])
def test_resample_image_reproduces_a_linear_ramp(order: int, margin: int) -> None:
    shape, spacing, target = (24, 22, 24), (1.0, 1.0, 2.0), (0.8, 1.5, 1.6)
    ramp = np.fromfunction(lambda i, j, k: 0.5 * i - 0.25 * j + 0.7 * k + 3, shape, dtype=np.float64)
    out = ops.resample_image(ramp[None].astype(np.float32), spacing, target, order=order)
    assert out.dtype == np.float32
    assert out.shape == (1, *ops.target_shape(shape, spacing, target))

    # The contract: output voxel u samples x_in = (u + 0.5) * t / s - 0.5.
    coords = [(np.arange(m) + 0.5) * t / s - 0.5 for m, s, t in zip(out.shape[1:], spacing, target, strict=True)]
    x, y, z = np.meshgrid(*coords, indexing="ij")
    expected = 0.5 * x - 0.25 * y + 0.7 * z + 3
    # Borders are extended (mode="nearest"), so only samples well inside the input follow the ramp; the cubic
    # prefilter's boundary effect decays by ~0.27 per voxel, hence the margin.
    inside = np.ones(out.shape[1:], bool)
    for axis, (c, n) in enumerate(zip(coords, shape, strict=True)):
        ok = (c >= margin) & (c <= n - 1 - margin)
        inside &= np.expand_dims(ok, [a for a in range(3) if a != axis])
    assert inside.sum() > 50
    np.testing.assert_allclose(out[0][inside], expected[inside], atol=1e-4)


def test_resample_is_a_no_op_when_spacing_equals_target() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 12, 13, 14)).astype(np.float32)
    label = rng.integers(0, 3, size=(12, 13, 14)).astype(np.int16)
    out = ops.resample_image(image, (1.0, 2.0, 3.0), (1.0, 2.0, 3.0))
    lab = ops.resample_label(label, (1.0, 2.0, 3.0), (1.0, 2.0, 3.0))
    assert out is image  # no copy of a full volume: the worker's memory peak is what limits preprocessing
    as_int = ops.resample_image(np.round(image * 100).astype(np.int16), (1.0, 2.0, 3.0), (1.0, 2.0, 3.0))
    assert as_int.dtype == np.float32
    np.testing.assert_array_equal(as_int, np.round(image * 100))
    assert np.array_equal(lab, label)
    assert lab.dtype == np.int16
    assert lab is not label


@pytest.mark.parametrize("mode", ["onehot_linear", "nearest"])
def test_resample_label_keeps_label_set_and_volume(mode: str) -> None:
    shape, spacing, target = (24, 24, 8), (1.0, 1.0, 3.0), (1.5, 1.5, 1.5)
    affine = _affine([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 3.0]], origin=(0.0, 0.0, 0.0))
    centre = np.array([11.7, 12.2, 11.0])
    label = _sphere(shape, affine, 6.0, centre).astype(np.int32) * 3
    label[_sphere(shape, affine, 3.0, centre)] = 5
    out = ops.resample_label(label, spacing, target, mode=mode)  # type: ignore[arg-type]
    assert out.dtype == np.int32
    assert out.shape == (16, 16, 16)
    assert set(np.unique(out)) == {0, 3, 5}
    vol_in, vol_out = (label > 0).sum() * np.prod(spacing), (out > 0).sum() * np.prod(target)
    assert abs(vol_out / vol_in - 1) < 0.1


def test_resample_label_ties_go_to_the_lowest_value() -> None:
    label = np.zeros((2, 1, 1), np.uint8)
    label[1] = 7  # downsampling x by 2: the single output voxel sits halfway between 0 and 7
    assert ops.resample_label(label, (1.0, 1.0, 1.0), (2.0, 1.0, 1.0))[0, 0, 0] == 0
    label[0], label[1] = 7, 2
    assert ops.resample_label(label, (1.0, 1.0, 1.0), (2.0, 1.0, 1.0))[0, 0, 0] == 2


# --- normalization ------------------------------------------------------------------------------------------


def test_zscore_with_and_without_mask() -> None:
    rng = np.random.default_rng(1)
    image = np.zeros((2, 12, 12, 12), np.float32)
    mask = np.zeros((12, 12, 12), bool)
    mask[2:10, 3:9, 1:11] = True
    image[:, mask] = rng.normal([[50.0], [-3.0]], [[7.0], [0.5]], size=(2, int(mask.sum())))
    out = ops.zscore(image, mask)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[:, mask].mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(out[:, mask].std(axis=1), 1, atol=1e-5)
    assert np.all(out[:, ~mask] == 0)  # background stays 0 (nnU-Net use_mask_for_norm)
    whole = ops.zscore(image)
    np.testing.assert_allclose(whole.reshape(2, -1).mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(whole.reshape(2, -1).std(axis=1), 1, atol=1e-5)


def test_constant_image_raises_with_the_value() -> None:
    with pytest.raises(ValueError, match=r"std is 0.*= 3\.5") as info:
        ops.zscore(np.full((1, 12, 12, 12), 3.5, np.float32))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="empty"):
        ops.zscore(np.ones((1, 4, 4, 4)), np.zeros((4, 4, 4), bool))


def test_ct_normalize_clips_then_scales() -> None:
    image = np.array([-3000, -1000, 0, 40, 5000], np.int16).reshape(1, 5, 1, 1)
    out = ops.ct_normalize(image, clip_lo=-1000.0, clip_hi=1000.0, mean=40.0, std=200.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [-5.2, -5.2, -0.2, 0.0, 4.8], atol=1e-6)
    with pytest.raises(ValueError, match="std 0"):
        ops.ct_normalize(image, -1000.0, 1000.0, 40.0, 0.0)


# --- whole case and the way back --------------------------------------------------------------------------


def _mr_case(affine: np.ndarray, shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two-channel MR-like image: noise inside a 'head' ellipsoid, exact zeros outside; sphere label of 6 mm."""
    rng = np.random.default_rng(seed)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    world = _world(affine, index)
    centre = _world(affine, (np.array(shape) - 1) / 2)
    head = (((world - centre) / np.array([8.0, 7.0, 8.0])) ** 2).sum(axis=-1) < 1
    label = (np.linalg.norm(world - centre - [0.5, -0.3, 0.2], axis=-1) < 6.0).astype(np.uint8)
    image = rng.normal([100.0, 400.0], [10.0, 30.0], size=(*shape, 2)).astype(np.float32)
    image[label > 0] += [60.0, -100.0]
    image[~head] = 0
    return image, label


MR_NORM = {"schemes": ["zscore", "zscore"]}


@pytest.mark.parametrize("affine", [LPS, LAS], ids=["LPS", "LAS"])
def test_round_trip_is_exact_without_resampling(affine: np.ndarray) -> None:
    shape = (24, 18, 14)
    image, label = _mr_case(affine, shape)
    spacing = ops.spacing_of(affine)
    out_img, out_lab, record = ops.preprocess_arrays(image, label, affine, spacing, MR_NORM)
    assert out_lab is not None
    assert record.cropped_shape != record.ras_shape
    back = ops.invert_to_raw(out_lab, record)
    assert back.shape == shape
    assert back.dtype == np.uint8
    assert np.array_equal(back, label)
    # The normalized image maps back voxel-for-voxel too (with 0 where cropped, as the raw background).
    back_img = ops.invert_to_raw(out_img, record, order=1)
    assert back_img.shape == (*shape, 2)
    assert np.array_equal(back_img[image == 0], np.zeros(int((image == 0).sum()), np.float32))
    # Zero background => z-score statistics over the nonzero mask only (nnU-Net's use_mask_for_norm).
    head = image[..., 0] != 0
    np.testing.assert_allclose(back_img[head].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(back_img[head].std(axis=0), 1, atol=1e-5)


def test_round_trip_with_anisotropic_resampling() -> None:
    shape, affine = (24, 24, 8), _affine([[-1.0, 0, 0], [0, -1.0, 0], [0, 0, 3.0]])  # LPS, 1 x 1 x 3 mm
    image, label = _mr_case(affine, shape, seed=3)
    out_img, out_lab, record = ops.preprocess_arrays(image, label, affine, (1.5, 1.5, 1.5), MR_NORM)
    assert out_lab is not None
    back = ops.invert_to_raw(out_lab, record)
    assert back.shape == shape
    assert _dice(back > 0, label > 0) >= 0.9

    # Geometry of the way back: a field equal to world x on the final grid, inverted with linear
    # interpolation, must equal world x on the raw grid wherever no border clamping happens.
    final_affine = np.array(record.final_affine)
    fidx = np.stack(np.meshgrid(*[np.arange(n) for n in record.final_shape], indexing="ij"), axis=-1)
    field = _world(final_affine, fidx.astype(np.float64))[..., 0].astype(np.float32)
    inverted = ops.invert_to_raw(field, record, order=1)
    ratio = np.array(record.spacing_before) / np.array(record.spacing_after)
    valid = np.ones(record.cropped_shape, bool)
    for axis, (n_out, n_in, r) in enumerate(zip(record.cropped_shape, record.final_shape, ratio, strict=True)):
        x_in = (np.arange(n_out) + 0.5) * r - 0.5
        valid &= np.expand_dims((x_in >= 0) & (x_in <= n_in - 1), [a for a in range(3) if a != axis])
    ras_valid = np.zeros(record.ras_shape, bool)
    ras_valid[record.crop.slices()] = valid
    raw_valid = ops.from_ras(ras_valid, np.array(record.ras_ornt))
    raw_idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    expected = _world(np.array(record.raw_affine), raw_idx)[..., 0]
    assert raw_valid.sum() > 500
    np.testing.assert_allclose(inverted[raw_valid], expected[raw_valid], atol=1e-4)
    with pytest.raises(ValueError, match="expected"):
        ops.invert_to_raw(out_img[0, :-1], record)


def test_preprocess_mr_like_case() -> None:
    shape, affine = (20, 18, 10), PSR
    image, label = _mr_case(affine, shape, seed=5)
    target = (1.0, 1.0, 1.0)
    out_img, out_lab, record = ops.preprocess_arrays(image, label, affine, target, MR_NORM)
    assert out_img.dtype == np.float32
    assert out_lab is not None
    assert out_lab.dtype == np.uint8
    assert record.final_shape == ops.target_shape(record.cropped_shape, record.spacing_before, target)
    assert out_img.shape == (2, *record.final_shape)
    assert out_lab.shape == record.final_shape
    assert set(np.unique(out_lab)) == {0, 1}
    final_affine = np.array(record.final_affine)
    assert nib.orientations.aff2axcodes(final_affine) == ("R", "A", "S")
    np.testing.assert_allclose(ops.spacing_of(final_affine), target, atol=1e-12)
    assert PreprocessRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    # The lesion is brighter than the head in channel 0 and darker in channel 1 (z-scored, so around 0).
    assert out_img[0][out_lab > 0].mean() > 0 > out_img[1][out_lab > 0].mean()


def test_preprocess_ct_like_case_without_resampling() -> None:
    shape, affine = (16, 14, 12), PSR
    rng = np.random.default_rng(7)
    image = rng.normal(-800, 150, size=shape).astype(np.int16)  # air/lung: nonzero everywhere, no crop
    image[4:9, 5:10, 3:8] = 2500
    label = np.zeros(shape, np.int64)
    label[5:8, 6:9, 4:7] = 2
    ct = {"clip_lo": -1000.0, "clip_hi": 1500.0, "mean": -300.0, "std": 400.0}
    norm = {"schemes": ["ct"], "ct": [ct]}
    ras_spacing = ops.spacing_of(ops.to_ras(image, affine)[1])  # target spacing is per RAS axis (x, y, z)
    assert ras_spacing == (0.9, 1.1, 2.0)
    out_img, out_lab, record = ops.preprocess_arrays(image, label, affine, ras_spacing, norm)
    assert record.cropped_shape == record.ras_shape == (12, 16, 14)
    assert out_img.shape == (1, 12, 16, 14)
    assert out_lab is not None
    assert out_lab.dtype == np.uint8
    assert out_img.max() == pytest.approx((1500 + 300) / 400)
    assert out_img.min() == pytest.approx(-700 / 400)
    assert np.array_equal(ops.invert_to_raw(out_lab, record), label.astype(np.uint8))


def test_preprocess_is_deterministic() -> None:
    image, label = _mr_case(OBLIQUE, (16, 14, 12), seed=9)
    runs = [ops.preprocess_arrays(image, label, OBLIQUE, (1.1, 0.9, 1.2), MR_NORM) for _ in range(2)]
    (img_a, lab_a, rec_a), (img_b, lab_b, rec_b) = runs
    assert lab_a is not None
    assert lab_b is not None
    assert img_a.tobytes() == img_b.tobytes()
    assert lab_a.tobytes() == lab_b.tobytes()
    assert rec_a == rec_b


def test_preprocess_rejects_bad_inputs() -> None:
    image, label = _mr_case(LPS, (12, 12, 12))
    with pytest.raises(ValueError, match="spatial shape"):
        ops.preprocess_arrays(image, label[:-1], LPS, (1.0, 1.0, 1.0), MR_NORM)
    with pytest.raises(ValueError, match="one per channel"):
        ops.preprocess_arrays(image, label, LPS, (1.0, 1.0, 1.0), {"schemes": ["zscore"]})
    with pytest.raises(ValueError, match="constant image"):
        ops.preprocess_arrays(np.full((12, 12, 12), 5.0), None, LPS, (1.0, 1.0, 1.0), {"schemes": ["zscore"]})


def _normalized_then_resampled(
    image_cf: np.ndarray, mask: np.ndarray, norm: dict[str, Any], spacing: Spacing, target: Spacing
) -> tuple[np.ndarray, tuple[NormStats, ...]]:
    """The two steps as separate volumes (what preprocess_arrays did before the fused path)."""
    normed, stats = ops._normalize(image_cf, mask, norm)
    return ops.resample_image(normed, spacing, target, order=3), stats


@settings(max_examples=20, deadline=None)
@given(
    shape=st.tuples(*[st.integers(3, 12)] * 3),
    target=st.tuples(*[st.sampled_from([0.6, 1.0, 1.3, 2.2])] * 3),
    scheme=st.sampled_from(["zscore", "ct", "zscore+ct"]),
    seed=st.integers(0, 2**16),
)
def test_normalizing_into_the_spline_buffer_gives_the_same_bytes_and_statistics(
    shape: tuple[int, int, int], target: tuple[float, float, float], scheme: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    schemes = scheme.split("+")
    image = x_fastest(rng.normal(100, 40, size=(len(schemes), *shape)).astype(np.float32))
    mask = rng.random(shape) < 0.7
    mask[0, 0, 0] = True
    ct = {"clip_lo": 20.0, "clip_hi": 180.0, "mean": 95.0, "std": 35.0}
    norm = {"schemes": schemes, "ct": [ct] * len(schemes), "use_mask_for_norm": True}
    spacing = (1.0, 1.0, 1.0)
    assume(target != spacing)  # preprocess_arrays stores the normalized crop itself then (no resampling)
    got, got_stats = ops._normalize_resampled(image, mask, norm, spacing, target)
    want, want_stats = _normalized_then_resampled(image, mask, norm, spacing, target)
    assert got.shape == want.shape
    assert on_disk(got).flags.c_contiguous
    np.testing.assert_array_equal(got, want)
    assert got_stats == want_stats


def test_the_fused_path_holds_two_volumes_fewer_at_its_peak() -> None:
    image = x_fastest(np.random.default_rng(0).normal(100, 40, size=(1, 128, 128, 96)).astype(np.float32))
    mask = np.ones(image.shape[1:], bool)
    norm = {"schemes": ["zscore"], "use_mask_for_norm": False}
    spacing, target = (1.0, 1.0, 1.0), (0.9, 0.9, 1.1)  # about the same number of voxels out as in
    peaks = []
    for run in (ops._normalize_resampled, _normalized_then_resampled):
        tracemalloc.start()
        run(image, mask, norm, spacing, target)
        peaks.append(tracemalloc.get_traced_memory()[1] / (image.nbytes))
        tracemalloc.stop()
    fused, separate = peaks
    # separate: the normalized crop, the padded coefficients, the sampled channel and the output it is copied into
    assert fused <= separate - 1.8, (fused, separate)
    # fused: the padded buffer the channel is normalized into (1.76 volumes at this size) and the sampled output
    assert fused < 3.0, fused
