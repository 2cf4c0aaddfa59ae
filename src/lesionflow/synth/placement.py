"""Bounding spheres, DiffMask's placement sampler and the multi-channel merge rule (generative.md §2.7, §2.8, §9.2.6).

Axis order is (x, y, z) voxels everywhere; centres and radii are in voxels of the array they refer to (no mm).
A voxel belongs to a sphere when the distance from its centre (integer index) to the sphere centre is
``<= radius``. Every random draw takes an explicit ``numpy.random.Generator`` (:func:`lesionflow.seeding.rng_for`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class Sphere:
    """A sphere in voxel coordinates: ``centre`` (x, y, z) and ``radius``, both in voxels."""

    centre: Vec3
    radius: float


@dataclass(frozen=True)
class Placement:
    """Result of :func:`sample_spheres`: the accepted spheres (in draw order) and how the sampling went."""

    spheres: tuple[Sphere, ...]
    requested: int
    tries: int
    notes: tuple[str, ...] = field(default=())

    @property
    def shortfall(self) -> int:
        """How many requested spheres could not be placed."""
        return self.requested - len(self.spheres)


def _check_3d(name: str, arr: np.ndarray) -> None:
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a 3D (x, y, z) array, got shape {arr.shape}")


def bounding_sphere(mask: np.ndarray) -> Sphere:
    """DiffMask's bounding sphere of a (x, y, z) mask: centroid of its voxels, radius = max voxel distance to it.

    Units are voxels of ``mask``. A single voxel gives radius 0. Raises ValueError for an empty mask.
    """
    mask = np.asarray(mask)
    _check_3d("mask", mask)
    if not np.any(mask):
        raise ValueError("bounding_sphere of an empty mask")
    return bounding_sphere_of_coords(np.argwhere(mask > 0))


def bounding_sphere_of_coords(coords: np.ndarray) -> Sphere:
    """:func:`bounding_sphere` of voxel coordinates given as an (n, 3) array of (x, y, z) indices."""
    c = np.asarray(coords, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 3 or len(c) == 0:
        raise ValueError(f"coords must be a non-empty (n, 3) array, got shape {c.shape}")
    centre = c.mean(axis=0)
    radius = float(np.sqrt(((c - centre) ** 2).sum(axis=1).max()))
    return Sphere(centre=(float(centre[0]), float(centre[1]), float(centre[2])), radius=radius)


def sphere_mask(shape: Sequence[int], centre: Sequence[float], radius: float) -> np.ndarray:
    """Boolean (x, y, z) array of ``shape``: True where the voxel centre lies within ``radius`` voxels of ``centre``."""
    if len(shape) != 3 or len(centre) != 3:
        raise ValueError(f"shape and centre must have 3 (x, y, z) entries, got {tuple(shape)} and {tuple(centre)}")
    if not np.isfinite(radius) or radius < 0:
        raise ValueError(f"radius must be finite and >= 0, got {radius}")
    axes = [(np.arange(n, dtype=np.float64) - c) ** 2 for n, c in zip(shape, centre, strict=True)]
    dist2 = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]
    return np.asarray(dist2 <= radius * radius)


def sphere_channel(shape: Sequence[int], sphere: Sphere) -> np.ndarray:
    """DiffMask's control channel: float32 (x, y, z) volume, +1 inside ``sphere`` and -1 outside."""
    return np.where(sphere_mask(shape, sphere.centre, sphere.radius), 1.0, -1.0).astype(np.float32)


def radii_pool(radii: Sequence[float] | np.ndarray) -> np.ndarray:
    """The empirical radius distribution (voxels) of training lesions: sorted float64 array of the finite radii > 0.

    Sampling uniformly from the pool draws from the empirical distribution. Raises ValueError if none is left.
    """
    arr = np.asarray(radii, dtype=np.float64).ravel()
    pool = np.sort(arr[np.isfinite(arr) & (arr > 0)])
    if pool.size == 0:
        raise ValueError("radii pool is empty: no finite radius > 0")
    return pool


def sample_spheres(
    organ_mask: np.ndarray,
    radii: Sequence[float] | np.ndarray,
    count: int,
    rng: np.random.Generator,
    *,
    max_tries: int = 1000,
    allow_overlap: bool = True,
) -> Placement:
    """Draw up to ``count`` spheres fully inside the organ (DiffMask placement, generative.md §9.2.6).

    Each try draws a centre uniformly among the organ voxels of the (x, y, z) ``organ_mask`` and a radius
    uniformly from ``radii`` (the empirical pool, voxels); a sphere is accepted only if every voxel of
    :func:`sphere_mask` at that centre and radius is an organ voxel inside the volume (checked exactly with a
    Euclidean distance transform: the nearest non-organ voxel must be farther than the radius). With
    ``allow_overlap=False`` a sphere must also not intersect an accepted one (centre distance > sum of radii).
    Stops after ``count`` acceptances or ``max_tries`` tries. Impossible placements (empty organ, organ thinner
    than every radius) are not errors: the result has fewer spheres and says why in ``notes``.
    """
    organ = np.asarray(organ_mask) > 0
    _check_3d("organ_mask", organ)
    if count < 0 or max_tries < 0:
        raise ValueError(f"count and max_tries must be >= 0, got {count} and {max_tries}")
    pool = np.asarray(radii, dtype=np.float64).ravel()
    if pool.size == 0 or not np.all(np.isfinite(pool)) or np.any(pool < 0):
        raise ValueError("radii must be a non-empty sequence of finite values >= 0")
    coords = np.argwhere(organ)
    if count == 0:
        return Placement(spheres=(), requested=0, tries=0)
    if coords.size == 0:
        return Placement(spheres=(), requested=count, tries=0, notes=("empty organ mask: no sphere placed",))
    # Distance (voxels) from each voxel to the nearest non-organ voxel; the zero pad makes outside-the-volume count.
    edt = ndimage.distance_transform_edt(np.pad(organ, 1))[1:-1, 1:-1, 1:-1]
    accepted: list[Sphere] = []
    tries = 0
    while len(accepted) < count and tries < max_tries:
        tries += 1
        centre = coords[int(rng.integers(len(coords)))]
        radius = float(pool[int(rng.integers(pool.size))])
        if edt[tuple(centre)] <= radius:
            continue
        c = (float(centre[0]), float(centre[1]), float(centre[2]))
        if not allow_overlap and any(np.linalg.norm(np.subtract(c, s.centre)) <= radius + s.radius for s in accepted):
            continue
        accepted.append(Sphere(centre=c, radius=radius))
    notes: tuple[str, ...] = ()
    if len(accepted) < count:
        notes = (f"placed {len(accepted)} of {count} spheres in {tries} tries (max_tries={max_tries})",)
        if float(edt.max()) <= float(pool.min()):
            notes += (f"organ too thin: max inner distance {float(edt.max()):.2f} <= smallest radius {pool.min():.2f}",)
    return Placement(spheres=tuple(accepted), requested=count, tries=tries, notes=notes)


def _stack_masks(masks: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    stacked = np.stack([np.asarray(m) > 0 for m in masks]) if not isinstance(masks, np.ndarray) else masks > 0
    if stacked.ndim != 4 or stacked.shape[0] == 0:
        raise ValueError(f"masks must be (C, x, y, z) with C >= 1, got shape {stacked.shape}")
    return stacked


def merge_class_channels(channels: np.ndarray, masks: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """The §2.7 merge of per-class generated channels into one (x, y, z) image.

    ``channels`` is (C, x, y, z): channel c was generated for lesion class c; ``masks`` is (C, x, y, z), mask c
    of class c. Rule (LeFusion EMIDEC, generalised to C classes): ``out = sum_c ch_c * M_c + ch_0 * (1 - union M)``,
    i.e. the background comes from the first channel. Where masks overlap (the original formula would count the
    voxel twice), the *last* class wins, matching :func:`merge_label_masks`. Dtype is that of ``channels``.
    """
    ch = np.asarray(channels)
    m = _stack_masks(masks)
    if ch.shape != m.shape:
        raise ValueError(f"channels shape {ch.shape} != masks shape {m.shape}")
    out = ch[0].copy()
    for c in range(1, ch.shape[0]):
        out[m[c]] = ch[c][m[c]]
    return out


def merge_label_masks(masks: np.ndarray | Sequence[np.ndarray], class_values: Sequence[int]) -> np.ndarray:
    """Merge per-class binary (C, x, y, z) masks into a uint8 (x, y, z) label: class_values[c] where mask c is set.

    Overlaps go to the later class (same rule as :func:`merge_class_channels`); 0 where no mask is set.
    """
    m = _stack_masks(masks)
    if len(class_values) != m.shape[0]:
        raise ValueError(f"{len(class_values)} class values for {m.shape[0]} masks")
    if any(not 0 < int(v) <= 255 for v in class_values):
        raise ValueError(f"class values must be in 1..255, got {list(class_values)}")
    label = np.zeros(m.shape[1:], dtype=np.uint8)
    for mask, value in zip(m, class_values, strict=True):
        label[mask] = int(value)
    return label
