"""Patch augmentation in two pure steps: :func:`sample_augmentation` draws the parameters, :func:`apply_augmentation`
applies them (TorchIO style), so that a draw can be logged, replayed and tested on its own. No I/O.

Conventions used throughout:

* Arrays are in the store's voxel order: image ``(c, x, y, z)`` float32, label ``(x, y, z)`` uint8 (RAS axes).
* Geometry is in voxel units of the preprocessed grid (rotation does not correct for anisotropic spacing, as in
  nnU-Net, which rotates in voxel space too). The centre of an array of ``n`` voxels is at index ``(n - 1) / 2``.
* A rotation angle ``a`` (radians) about axis ``x`` turns the *content* from ``+y`` towards ``+z`` (right-hand
  rule; likewise ``y``: ``z`` towards ``x``; ``z``: ``x`` towards ``y``); the three are composed as
  ``Rz @ Ry @ Rx`` (about x first). A zoom ``s > 1`` enlarges the content ``s`` times (zooms in).
  So output voxel ``p`` (relative to the patch centre) shows input point ``Rᵀ p / s`` (relative to the region
  centre); 90 degrees about ``z`` equals ``np.rot90(a, 1, axes=(0, 1))``.
* Intensities are in normalized units (z-scores or the CT scheme's), as stored.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lesionflow.params import AugmentParams

Shape3 = tuple[int, int, int]

# The angle grid on which read_margin evaluates the sampled extent (per axis); the Lipschitz slack it adds for
# points between grid nodes is |h| * 1.5 * step, about 3 voxels for a 128^3 patch at the default 15 degrees.
_MARGIN_GRID_STEPS = 31
# Float64 noise in the computed extent (cos(pi/2) is 6e-17, not 0) must not cost a whole extra voxel of reading
# when the exact extent is an integer; the sampled coordinates themselves are float32 (~1e-5 voxel) anyway.
_MARGIN_TOLERANCE = 1e-6


@dataclass(frozen=True)
class AugmentationDraw:
    """One sample's augmentation parameters (see the module docstring for axis order and units).

    ``flips``: flip along (x, y, z). ``rotation``: angles about (x, y, z) in radians. ``zoom``: isotropic factor,
    1.0 = none, > 1 zooms in. ``intensity_mult`` / ``intensity_add``: ``image * mult + add``. ``gamma``: exponent
    applied to the per-channel [min, max]-rescaled image, None = none. ``noise_std``: Gaussian noise standard
    deviation in intensity units, 0 = none, drawn from ``np.random.default_rng(noise_seed)``.
    """

    flips: tuple[bool, bool, bool] = (False, False, False)
    rotation: tuple[float, float, float] = (0.0, 0.0, 0.0)
    zoom: float = 1.0
    intensity_mult: float = 1.0
    intensity_add: float = 0.0
    gamma: float | None = None
    noise_std: float = 0.0
    noise_seed: int = 0

    @property
    def is_spatial(self) -> bool:
        """True when the draw resamples the grid (rotation or zoom); flips alone are exact index permutations."""
        return any(a != 0.0 for a in self.rotation) or self.zoom != 1.0


def sample_augmentation(rng: np.random.Generator, params: AugmentParams) -> AugmentationDraw:
    """Draw one sample's augmentation from ``rng`` according to ``params``.

    Always consumes the same draws in the same order (whatever is enabled or drawn), so two configurations that
    differ in one probability still give the same noise seed and angles for the same stream. The intensity
    shift is drawn from ``[scale_min - 1, scale_max - 1]`` (AugmentParams has no separate shift range; with the
    default (0.75, 1.25) that is ±0.25 intensity units). Disabled params give the identity draw.
    """
    flip_u = rng.random(3)
    gate_rotate, gate_zoom, gate_intensity, gate_gamma, gate_noise = rng.random(5)
    angles_u = rng.uniform(-1.0, 1.0, 3)
    zoom_u, mult_u, add_u, gamma_u = rng.random(4)
    noise_seed = int(rng.integers(0, 2**63 - 1, dtype=np.int64))
    if not params.enabled:
        return AugmentationDraw(noise_seed=noise_seed)

    def between(lo_hi: tuple[float, float], u: float) -> float:
        return float(lo_hi[0] + (lo_hi[1] - lo_hi[0]) * u)

    rotate = gate_rotate < params.rotate_prob and params.rotate_deg > 0
    angles = np.deg2rad(params.rotate_deg) * angles_u if rotate else np.zeros(3)
    intensity = gate_intensity < params.intensity_prob
    scale_lo, scale_hi = params.intensity_scale
    return AugmentationDraw(
        flips=(
            bool(flip_u[0] < params.flip_prob),
            bool(flip_u[1] < params.flip_prob),
            bool(flip_u[2] < params.flip_prob),
        ),
        rotation=(float(angles[0]), float(angles[1]), float(angles[2])),
        zoom=between(params.scale_range, zoom_u) if gate_zoom < params.scale_prob else 1.0,
        intensity_mult=between(params.intensity_scale, mult_u) if intensity else 1.0,
        intensity_add=between((scale_lo - 1.0, scale_hi - 1.0), add_u) if intensity else 0.0,
        gamma=between(params.gamma_range, gamma_u) if gate_gamma < params.gamma_prob else None,
        noise_std=float(params.noise_std) if gate_noise < params.noise_prob else 0.0,
        noise_seed=noise_seed,
    )


def rotation_matrices(angles: np.ndarray) -> np.ndarray:
    """``Rz @ Ry @ Rx`` for angles (..., 3) about (x, y, z) in radians -> (..., 3, 3) float64 (active rotation)."""
    angles = np.asarray(angles, dtype=np.float64)
    cos, sin = np.cos(angles), np.sin(angles)
    one, zero = np.ones(angles.shape[:-1]), np.zeros(angles.shape[:-1])

    def matrix(rows: list[list[np.ndarray]]) -> np.ndarray:
        return np.stack([np.stack(row, axis=-1) for row in rows], axis=-2)

    cx, cy, cz = cos[..., 0], cos[..., 1], cos[..., 2]
    sx, sy, sz = sin[..., 0], sin[..., 1], sin[..., 2]
    rx = matrix([[one, zero, zero], [zero, cx, -sx], [zero, sx, cx]])
    ry = matrix([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
    rz = matrix([[cz, -sz, zero], [sz, cz, zero], [zero, zero, one]])
    result: np.ndarray = rz @ ry @ rx
    return result


def _sampling_matrix(draw: AugmentationDraw) -> np.ndarray:
    """(3, 3) map from output voxel offsets to input voxel offsets (both relative to the centres): ``Rᵀ / zoom``."""
    result: np.ndarray = rotation_matrices(np.array(draw.rotation)).T / draw.zoom
    return result


def _half_extent(patch_size: Shape3) -> np.ndarray:
    """Distance (voxels) from the patch centre to its outermost voxel centres, per axis."""
    return (np.asarray(patch_size, dtype=np.float64) - 1.0) / 2.0


def _margin_for_extent(extent: np.ndarray, patch_size: Shape3) -> Shape3:
    """Voxels to add on each side so that input offsets up to ``extent`` stay on voxel centres of the region."""
    need = extent - _half_extent(patch_size) - _MARGIN_TOLERANCE
    m = [max(0, math.ceil(float(v))) for v in need]
    return m[0], m[1], m[2]


def draw_margin(draw: AugmentationDraw, patch_size: Shape3) -> Shape3:
    """Margin (voxels per side, x y z) that this draw's spatial transform needs; (0, 0, 0) without one.

    The sampled offsets along axis k reach ``sum_j |A_kj| h_j`` (A the sampling matrix, h the half extent),
    attained at a patch corner. Smaller than :func:`read_margin` for most draws, so reading less.
    """
    if not draw.is_spatial:
        return (0, 0, 0)
    return _margin_for_extent(np.abs(_sampling_matrix(draw)) @ _half_extent(patch_size), patch_size)


def read_margin(params: AugmentParams, patch_size: Shape3) -> Shape3:
    """Margin (voxels per side, x y z) that covers every draw ``params`` allows: any angles in ±rotate_deg and any
    zoom down to ``scale_range[0]``, so a region of ``patch + 2 * margin`` is never sampled outside.

    The extent is maximised over a grid of angles, plus the Lipschitz bound for angles between grid nodes (each
    angle moves a point at distance d by at most d per radian), capped by the rotation-invariant sphere bound
    ``|h|``. (0, 0, 0) when disabled or when neither rotation nor zoom-out can be drawn.
    """
    half = _half_extent(patch_size)
    can_rotate = params.enabled and params.rotate_prob > 0 and params.rotate_deg > 0
    can_zoom_out = params.enabled and params.scale_prob > 0 and params.scale_range[0] < 1.0
    if not (can_rotate or can_zoom_out):
        return (0, 0, 0)
    min_zoom = min(params.scale_range[0], 1.0) if can_zoom_out else 1.0
    extent = half
    if can_rotate:
        r = math.radians(params.rotate_deg)
        nodes = np.linspace(-r, r, _MARGIN_GRID_STEPS)
        angles = np.array(list(itertools.product(nodes, repeat=3)))
        # Rᵀ maps output offsets to input offsets: row k of Rᵀ is column k of R.
        sampled = np.abs(np.swapaxes(rotation_matrices(angles), -1, -2)) @ half
        between_nodes = float(np.linalg.norm(half)) * 1.5 * (nodes[1] - nodes[0])
        extent = np.minimum(sampled.max(axis=0) + between_nodes, np.linalg.norm(half))
    return _margin_for_extent(extent / min_zoom, patch_size)


def _check_region(image: np.ndarray, label: np.ndarray, patch_size: Shape3) -> Shape3:
    """Validate shapes and return the margin per side (region = patch + 2 * margin)."""
    if image.ndim != 4 or label.ndim != 3 or image.shape[1:] != label.shape:
        raise ValueError(f"expected image (c, x, y, z) and label (x, y, z), got {image.shape} and {label.shape}")
    extra = [r - p for r, p in zip(label.shape, patch_size, strict=True)]
    if any(e < 0 or e % 2 for e in extra):
        raise ValueError(f"region {label.shape} must be patch {tuple(patch_size)} plus an even margin per axis")
    return extra[0] // 2, extra[1] // 2, extra[2] // 2


def _centre_crop(array: np.ndarray, margin: Shape3, patch_size: Shape3) -> np.ndarray:
    lead: tuple[slice, ...] = (slice(None),) * (array.ndim - 3)
    window = tuple(slice(m, m + p) for m, p in zip(margin, patch_size, strict=True))
    return array[lead + window]


def _affine_theta(draw: AugmentationDraw, region: Shape3, patch_size: Shape3) -> torch.Tensor:
    """``affine_grid`` theta (1, 3, 4) for the draw, in torch's normalized (w, h, d) = (z, y, x) coordinates.

    With ``align_corners=True`` a normalized coordinate u on an axis of n voxels is the offset ``u * (n - 1) / 2``
    from the centre, so ``theta = D_in⁻¹ A D_out`` with ``D = diag((n - 1) / 2)``; an axis of one voxel maps to 0
    whatever theta says, so its scale is taken as 1.
    """
    d_in, d_out = _half_extent(region), _half_extent(patch_size)
    d_in, d_out = np.where(d_in > 0, d_in, 1.0), np.where(d_out > 0, d_out, 1.0)
    theta_xyz = _sampling_matrix(draw) * d_out[None, :] / d_in[:, None]
    theta_zyx = theta_xyz[::-1, ::-1]
    affine = np.concatenate([theta_zyx, np.zeros((3, 1))], axis=1)
    return torch.from_numpy(np.ascontiguousarray(affine, dtype=np.float32))[None]


def _resample(
    image: np.ndarray, label: np.ndarray, draw: AugmentationDraw, patch_size: Shape3
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate and zoom about the centres: trilinear for the image, nearest for the label (keeps its values)."""
    region = (label.shape[0], label.shape[1], label.shape[2])
    theta = _affine_theta(draw, region, patch_size)
    grid = F.affine_grid(theta, [1, image.shape[0], *patch_size], align_corners=True)
    image_t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    label_t = torch.from_numpy(label.astype(np.float32))[None, None]  # uint8 values are exact in float32
    out_image = F.grid_sample(image_t, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    out_label = F.grid_sample(label_t, grid, mode="nearest", padding_mode="zeros", align_corners=True)
    return out_image[0].numpy(), out_label[0, 0].numpy().astype(np.uint8)


def _gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    """Per channel: rescale to [0, 1], raise to ``gamma``, map back; min and max stay exactly where they were.

    Computed in float64 so that ``1 * (max - min) + min`` returns max exactly after casting back to float32.
    """
    out = np.empty_like(image)
    for c, channel in enumerate(image):
        lo, hi = float(channel.min()), float(channel.max())
        if hi <= lo:
            out[c] = channel  # constant channel: nothing to reshape
            continue
        unit = (channel.astype(np.float64) - lo) / (hi - lo)
        out[c] = np.clip(unit**gamma * (hi - lo) + lo, lo, hi)
    return out


def apply_augmentation(
    image: np.ndarray, label: np.ndarray, draw: AugmentationDraw, patch_size: Shape3
) -> tuple[np.ndarray, np.ndarray]:
    """Augment a region and return the patch: image (c, *patch_size) float32, label (*patch_size) uint8.

    ``image`` (c, X, Y, Z) and ``label`` (X, Y, Z) are the region read around the patch: ``patch_size + 2 * m``
    per axis, centred (use :func:`draw_margin` or :func:`read_margin` for m). Order: rotation + zoom about the
    centre (``grid_sample``; a plain centre crop when the draw has none), flips, then intensity: ``* mult + add``
    (all channels), gamma (per channel), Gaussian noise. Deterministic: the same draw and input give the same
    bytes. Inputs are not modified.
    """
    margin = _check_region(image, label, patch_size)
    if draw.is_spatial:
        out_image, out_label = _resample(image, label, draw, patch_size)
    else:
        out_image = _centre_crop(image, margin, patch_size).astype(np.float32)
        out_label = _centre_crop(label, margin, patch_size).astype(np.uint8)
    flip_axes = tuple(axis for axis, flip in enumerate(draw.flips) if flip)
    if flip_axes:
        out_image = np.flip(out_image, axis=tuple(a + 1 for a in flip_axes))
        out_label = np.flip(out_label, axis=flip_axes)
    if draw.intensity_mult != 1.0 or draw.intensity_add != 0.0:
        out_image = out_image * np.float32(draw.intensity_mult) + np.float32(draw.intensity_add)
    if draw.gamma is not None:
        out_image = _gamma(out_image, draw.gamma)
    if draw.noise_std > 0:
        noise = np.random.default_rng(draw.noise_seed).standard_normal(out_image.shape, dtype=np.float32)
        out_image = out_image + noise * np.float32(draw.noise_std)
    return np.ascontiguousarray(out_image, dtype=np.float32), np.ascontiguousarray(out_label, dtype=np.uint8)
