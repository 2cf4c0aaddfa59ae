"""Pure array helpers shared by the demo generators: smooth random fields, blobs, reorientation.

Conventions: arrays are indexed ``(i, j, k)`` (NIfTI voxel order); shapes are 3-tuples of ints; spacings are
millimetres per voxel along i, j, k. Every function that draws random numbers takes an explicit
``np.random.Generator`` and draws a fixed number of values for a given input, so output depends only on the
generator state and the arguments (no global RNG, no clock).

Smooth fields are built by separable cubic B-spline upsampling of a coarse Gaussian lattice. The contraction
is done axis by axis with ``np.einsum(..., optimize=False)``, which never calls BLAS: BLAS kernels may sum in a
thread-count dependent order, and the demo data must be byte-reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from lesionflow.io.volumes import Volume

Shape3 = tuple[int, int, int]


@dataclass(frozen=True)
class CaseVolumes:
    """One synthesized case: image, label map (uint8) and organ mask (uint8 0/1) on the same grid."""

    image: Volume
    label: Volume
    organ: Volume

    def reoriented(self, axcodes: str) -> CaseVolumes:
        """The same world content stored with voxel axes pointing along ``axcodes`` (e.g. ``"LPS"``)."""
        return CaseVolumes(reorient(self.image, axcodes), reorient(self.label, axcodes), reorient(self.organ, axcodes))


def reorient(volume: Volume, axcodes: str) -> Volume:
    """Flip/permute voxel axes so they point along ``axcodes``; the affine changes so world geometry does not.

    Only axis flips and permutations are used (no resampling), so every voxel value is preserved exactly and
    ``nibabel.as_closest_canonical`` of the result gives back the canonical array and affine.
    """
    current = nib.orientations.io_orientation(volume.affine)
    target = nib.orientations.axcodes2ornt(tuple(axcodes))
    transform = nib.orientations.ornt_transform(current, target)
    array = np.ascontiguousarray(nib.orientations.apply_orientation(volume.array, transform))
    affine = volume.affine @ nib.orientations.inv_ornt_aff(transform, volume.spatial_shape)
    return Volume(array=array, affine=affine)


def _bspline_matrix(n: int, coarse: int) -> np.ndarray:
    """(n, coarse + 2) cubic B-spline weights mapping coarse control values onto n evenly spaced samples."""
    t = np.linspace(0.0, coarse - 1.0, n)[:, None]
    d = np.abs(t - np.arange(-1, coarse + 1)[None, :])
    near = 2.0 / 3.0 - d**2 + 0.5 * d**3
    far = (2.0 - d) ** 3 / 6.0
    return np.where(d < 1.0, near, np.where(d < 2.0, far, 0.0))


def smooth_field(rng: np.random.Generator, shape: Shape3, coarse: int | Shape3) -> np.ndarray:
    """Smooth random field of ``shape`` with unit standard deviation (float64).

    ``coarse`` is the number of control points per axis (larger = finer detail); the field is a cubic
    B-spline through a Gaussian lattice of that size, hence smooth at the scale ``shape / coarse``.
    """
    c = (coarse, coarse, coarse) if isinstance(coarse, int) else coarse
    coeff = rng.standard_normal((c[0] + 2, c[1] + 2, c[2] + 2))
    mi, mj, mk = (_bspline_matrix(n, m) for n, m in zip(shape, c, strict=True))
    out = np.einsum("kc,abc->abk", mk, coeff, optimize=False)
    out = np.einsum("jb,abk->ajk", mj, out, optimize=False)
    out = np.einsum("ia,ajk->ijk", mi, out, optimize=False)
    std = float(out.std())
    return out / std if std > 0 else out


def correlated_noise(rng: np.random.Generator, shape: Shape3, sigma_vox: tuple[float, float, float]) -> np.ndarray:
    """Gaussian noise low-passed by a Gaussian kernel of ``sigma_vox`` voxels, rescaled to unit std (float32)."""
    white = rng.standard_normal(shape).astype(np.float32)
    out = ndi.gaussian_filter(white, sigma=sigma_vox, mode="reflect")
    std = float(out.std())
    return out / std if std > 0 else out


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """3x3 rotation composed of rotations about x, y, z, each uniform in ``[-max_deg, +max_deg]`` degrees."""
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def noisy_ellipsoid(
    rng: np.random.Generator,
    shape: Shape3,
    center: np.ndarray,
    radii_mm: np.ndarray,
    spacing: tuple[float, float, float],
    roughness: float,
    rotation: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean mask of an ellipsoid whose boundary is perturbed by a smooth random field.

    ``center`` is in voxel coordinates, ``radii_mm`` the three semi-axes in mm (along the rotated axes).
    A voxel is inside when ``|R^T (x - c) / r| + roughness * field(x) < 1`` with ``field`` zero-mean and scaled
    to ``max |field| = 1``: the blob lies within ``radii * (1 + roughness)`` and contains
    ``radii * (1 - roughness)`` (callers rely on this to nest blobs). Only a bounding box is
    evaluated, so cost scales with the blob, not the volume. ``rotation`` defaults to a random one.
    """
    sp = np.asarray(spacing, dtype=np.float64)
    rot = random_rotation(rng, 180.0) if rotation is None else rotation
    reach = float(np.max(radii_mm)) * (1.0 + roughness) / sp + 1.0  # voxels, per axis
    lo = np.maximum(np.floor(center - reach).astype(int), 0)
    hi = np.minimum(np.ceil(center + reach).astype(int) + 1, np.asarray(shape))
    box = tuple(int(h - lo_) for lo_, h in zip(lo, hi, strict=True))
    field = smooth_field(rng, (max(box[0], 1), max(box[1], 1), max(box[2], 1)), 3)  # drawn even if box is empty
    field -= field.mean()
    peak = float(np.abs(field).max())
    field = field / peak if peak > 0 else field
    mask = np.zeros(shape, dtype=bool)
    if min(box) <= 0:
        return mask
    grids = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi, strict=True)), indexing="ij")
    offset_mm = np.stack([(g - c) * s for g, c, s in zip(grids, center, sp, strict=True)], axis=-1)
    local = offset_mm @ rot  # rows: R^T applied to each offset
    rho = np.sqrt(((local / np.asarray(radii_mm)) ** 2).sum(axis=-1))
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = rho + roughness * field < 1.0
    return mask


def grid_mm(shape: Shape3, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Open (broadcastable) voxel-centre coordinates in mm relative to the grid centre, along i, j, k."""
    axes = [(np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing, strict=True)]
    return (axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])


def tube_weights(
    shape: Shape3, spacing: tuple[float, float, float], points: np.ndarray, radii_mm: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise tubes given as centre-line samples; returns (weight, distance_mm), both float32 of ``shape``.

    ``points`` is (N, 3) in voxel coordinates (samples outside the grid are dropped), ``radii_mm`` (N,) the
    tube radius at each sample. ``distance_mm`` is the distance from each voxel centre to the sub-voxel
    position of the nearest centre-line sample (approximately: nearest in the voxel sense), and
    ``weight = clip((r - d) / min_spacing + 0.5, 0, 1) * min(2 r / min_spacing, 1)`` approximates the
    partial volume of the tube in that voxel. Using the sub-voxel position matters on thick slices: a thin
    tube between two slice centres must not fill a whole 2.5 mm voxel. One Euclidean distance transform
    serves every tube, so the cost does not depend on the number of segments.
    """
    sp = np.asarray(spacing, dtype=np.float64)
    idx = np.rint(points).astype(np.int64)
    keep = np.all((idx >= 0) & (idx < np.asarray(shape)), axis=1)
    if not keep.any():
        return np.zeros(shape, np.float32), np.full(shape, np.inf, np.float32)
    idx, pts, rad = idx[keep], points[keep], radii_mm[keep]
    # Several samples can fall in one voxel: keep the thickest (ties: the first), deterministically.
    flat = np.ravel_multi_index(tuple(idx.T), shape)
    order = np.lexsort((np.arange(flat.size), -rad, flat))
    first = order[np.unique(flat[order], return_index=True)[1]]
    radius = np.zeros(shape, dtype=np.float64)
    offset = np.zeros((3, *shape), dtype=np.float64)  # sample position minus voxel centre, voxels
    radius[tuple(idx[first].T)] = rad[first]
    offset[(slice(None), *tuple(idx[first].T))] = (pts[first] - idx[first]).T
    _, nearest = ndi.distance_transform_edt(radius == 0, sampling=sp, return_indices=True)
    r_near = radius[tuple(nearest)]
    grid = np.indices(shape, dtype=np.float64)
    delta = (grid - nearest - offset[(slice(None), *nearest)]) * sp[:, None, None, None]
    dist = np.sqrt((delta**2).sum(axis=0))
    edge = float(sp.min())
    weight = np.clip((r_near - dist) / edge + 0.5, 0.0, 1.0) * np.minimum(2.0 * r_near / edge, 1.0)
    return weight.astype(np.float32), dist.astype(np.float32)
