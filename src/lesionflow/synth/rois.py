"""Lesion-centred and lesion-free ROIs for lesion synthesis (generative.md §2.9, §9.2.1).

Arrays follow the store: image (c, x, y, z) float, label / organ (x, y, z) uint8; ROI sizes, origins, centres
and radii are in voxels, axis order (x, y, z). A ROI is the window ``[origin, origin + size)``; voxels outside the
volume are 0 in every crop (zero padding), so a ROI may be larger than the volume. A ROI centred on voxel ``p``
has ``origin = p - size // 2``. All random choices take an explicit generator derived from the seed
(:func:`lesionflow.seeding.rng_for`), so the same store and seed give the same ROIs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from lesionflow.seeding import rng_for
from lesionflow.store.zarr_store import list_cases, read_case
from lesionflow.synth.placement import Sphere, bounding_sphere_of_coords

Int3 = tuple[int, int, int]


@dataclass(frozen=True)
class RoiSpec:
    """ROI size (x, y, z) in voxels, e.g. (64, 64, 32) for CT nodules or (16, 16, 16) for toy runs."""

    size: Int3

    def __post_init__(self) -> None:
        if len(self.size) != 3 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in self.size):
            raise ValueError(f"ROI size must be 3 ints (x, y, z), got {self.size!r}")
        if min(self.size) < 1:
            raise ValueError(f"ROI size must be >= 1 voxel per axis, got {self.size}")
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))


@dataclass(frozen=True, eq=False)
class Roi:
    """One ROI crop. ``kind`` is "lesion" (centred on lesion ``index`` of the case) or "candidate" (lesion-free).

    ``origin`` is the voxel (x, y, z) of the crop's first voxel in the case volume (may be negative). ``image`` is
    (c, *size) in the store's dtype, ``label`` / ``organ`` are (*size) uint8 (``organ`` None when the case has
    none). ``mask`` is a bool (*size) mask of *this* lesion component only (other lesions in the window are in
    ``label`` but not in ``mask``; all False for candidates). ``sphere`` is the lesion's bounding sphere in ROI
    voxel coordinates (None for candidates), ``classes`` the sorted label values of the lesion component (empty
    for candidates), ``voxels`` its voxel count in the whole volume (the crop may cut a lesion larger than it).
    """

    case_id: str
    kind: str
    index: int
    origin: Int3
    image: np.ndarray
    label: np.ndarray
    organ: np.ndarray | None
    mask: np.ndarray
    sphere: Sphere | None
    classes: tuple[int, ...]
    voxels: int


@dataclass(frozen=True)
class Component:
    """One connected lesion component: voxel coordinates (n, 3) as (x, y, z) indices, its label values, size."""

    index: int
    coords: np.ndarray
    classes: tuple[int, ...]

    @property
    def voxels(self) -> int:
        return len(self.coords)


@dataclass(frozen=True)
class RoiSet:
    """ROIs of several cases: lesion ROIs and candidate ROIs (case order as given, then lesion / draw order).

    ``notes`` lists one line per case that gave fewer ROIs than asked (no label, no organ, no room) — reported,
    not raised.
    """

    size: Int3
    lesions: tuple[Roi, ...]
    candidates: tuple[Roi, ...]
    notes: tuple[str, ...] = ()


def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in (1, 2, 3):
        raise ValueError(f"connectivity must be 1 (faces), 2 (edges) or 3 (corners), got {connectivity}")
    return ndimage.generate_binary_structure(3, connectivity)


def lesion_components(
    label: np.ndarray, *, min_voxels: int = 1, per_class: bool = False, connectivity: int = 3
) -> list[Component]:
    """Connected components of ``label > 0`` (or of each ``label == v`` if ``per_class``) in a (x, y, z) label.

    Order is deterministic: by class value (``per_class`` only), then scipy's raster-scan label order.

    Components with fewer than ``min_voxels`` voxels are dropped. ``connectivity`` 3 = 26-neighbourhood.
    """
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"label must be a 3D (x, y, z) array, got shape {label.shape}")
    if min_voxels < 1:
        raise ValueError(f"min_voxels must be >= 1, got {min_voxels}")
    structure = _structure(connectivity)
    groups = [label == v for v in np.unique(label) if v != 0] if per_class else [label > 0]
    out: list[Component] = []
    for group in groups:
        comp, n = ndimage.label(group, structure=structure)
        if n == 0:
            continue
        for i, slc in enumerate(ndimage.find_objects(comp), start=1):
            if slc is None:
                continue
            local = np.argwhere(comp[slc] == i)
            if len(local) < min_voxels:
                continue
            coords = local + np.array([s.start for s in slc])
            values = np.unique(label[tuple(coords.T)])
            out.append(Component(index=len(out), coords=coords, classes=tuple(int(v) for v in values)))
    return out


def crop(arr: np.ndarray, origin: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``arr[..., o:o+s]`` over the last 3 (x, y, z) axes, zero outside the array (a new array, arr's dtype)."""
    lead = arr.shape[:-3]
    out = np.zeros((*lead, *size), dtype=arr.dtype)
    src, dst = [], []
    for o, s, n in zip(origin, size, arr.shape[-3:], strict=True):
        lo, hi = max(int(o), 0), min(int(o) + int(s), n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(o), hi - int(o)))
    keep = (slice(None),) * len(lead)
    out[(*keep, *dst)] = arr[(*keep, *src)]
    return out


def _check_arrays(image: np.ndarray, label: np.ndarray | None, organ: np.ndarray | None) -> None:
    if image.ndim != 4:
        raise ValueError(f"image must be (c, x, y, z), got shape {image.shape}")
    for name, arr in (("label", label), ("organ", organ)):
        if arr is not None and arr.shape != image.shape[1:]:
            raise ValueError(f"{name} shape {arr.shape} != image spatial shape {image.shape[1:]}")


def _size(size: RoiSpec | Sequence[int]) -> Int3:
    return size.size if isinstance(size, RoiSpec) else RoiSpec(tuple(size)).size  # type: ignore[arg-type]


def lesion_rois(
    image: np.ndarray,
    label: np.ndarray,
    organ: np.ndarray | None,
    size: RoiSpec | Sequence[int],
    *,
    min_voxels: int = 1,
    per_class: bool = False,
    connectivity: int = 3,
    case_id: str = "",
) -> list[Roi]:
    """One ROI per lesion component (:func:`lesion_components`), centred on the rounded component centroid.

    Crops are zero-padded at the volume border; ``sphere`` is the component's bounding sphere (centroid, max
    voxel distance) shifted into ROI coordinates. The ROI's ``label`` crop keeps every lesion in the window;
    :attr:`Roi.mask` is this component only.
    """
    image, label = np.asarray(image), np.asarray(label)
    organ = None if organ is None else np.asarray(organ)
    _check_arrays(image, label, organ)
    roi_size = _size(size)
    half = np.array(roi_size) // 2
    rois = []
    for comp in lesion_components(label, min_voxels=min_voxels, per_class=per_class, connectivity=connectivity):
        sphere = bounding_sphere_of_coords(comp.coords)
        origin_arr = np.rint(np.array(sphere.centre)).astype(int) - half
        origin = (int(origin_arr[0]), int(origin_arr[1]), int(origin_arr[2]))
        local = comp.coords - origin_arr
        inside = np.all((local >= 0) & (local < np.array(roi_size)), axis=1)
        mask = np.zeros(roi_size, dtype=bool)
        mask[tuple(local[inside].T)] = True
        rois.append(
            Roi(
                case_id=case_id,
                kind="lesion",
                index=comp.index,
                origin=origin,
                image=crop(image, origin, roi_size),
                label=crop(label, origin, roi_size),
                organ=None if organ is None else crop(organ, origin, roi_size),
                mask=mask,
                sphere=Sphere(
                    centre=(
                        sphere.centre[0] - origin[0],
                        sphere.centre[1] - origin[1],
                        sphere.centre[2] - origin[2],
                    ),
                    radius=sphere.radius,
                ),
                classes=comp.classes,
                voxels=comp.voxels,
            )
        )
    return rois


def lesion_roi_problem(roi: Roi, volume_shape: Sequence[int]) -> tuple[str, str] | None:
    """Why a lesion ROI cannot be used for training or re-texturing, as (code, one-line message), or None.

    ``lesion_larger_than_roi``: the crop cuts the lesion (its mask holds fewer voxels than the component);
    ``lesion_touches_border``: the lesion reaches the first or last voxel of the (x, y, z) volume along an axis,
    so the scan itself cuts it and its shape is not a lesion shape.
    """
    size = list(roi.mask.shape)
    coords = np.argwhere(roi.mask) + np.asarray(roi.origin)
    if int(roi.mask.sum()) < roi.voxels:
        extent = (coords.max(0) - coords.min(0) + 1).tolist() if len(coords) else []
        return (
            "lesion_larger_than_roi",
            f"lesion {roi.index} ({roi.voxels} voxels) does not fit synth.roi_size {size} "
            f"(visible part spans {extent}); skipped; raise synth.roi_size to cover it",
        )
    lows, highs = coords.min(0), coords.max(0)
    touching = [a for a, n in enumerate(volume_shape) if lows[a] == 0 or highs[a] == int(n) - 1]
    if touching:
        axes = ",".join("xyz"[a] for a in touching)
        return (
            "lesion_touches_border",
            f"lesion {roi.index} touches the volume border along {axes} (the scan cuts it); skipped; "
            "preprocess with a wider crop if such lesions matter",
        )
    return None


def candidate_centres(label: np.ndarray | None, organ: np.ndarray, size: RoiSpec | Sequence[int]) -> np.ndarray:
    """Boolean (x, y, z) map: voxel p is a valid candidate centre if it is an organ voxel and the ROI centred on it
    (``origin = p - size // 2``) holds no lesion voxel (``label > 0``; voxels outside the volume count as none).
    """
    roi_size = _size(size)
    valid = np.asarray(organ) > 0
    if label is not None and np.any(label):
        # For a window of size s, scipy's filter (origin 0) covers p - s//2 .. p - s//2 + s - 1: exactly our ROI.
        has_lesion = ndimage.maximum_filter((np.asarray(label) > 0).astype(np.uint8), size=roi_size, mode="constant")
        valid &= has_lesion == 0
    return valid


def candidate_rois(
    image: np.ndarray,
    label: np.ndarray | None,
    organ: np.ndarray | None,
    size: RoiSpec | Sequence[int],
    count: int,
    rng: np.random.Generator,
    *,
    case_id: str = "",
) -> list[Roi]:
    """Up to ``count`` lesion-free ROIs (synthesis targets) with distinct centres drawn uniformly among the valid
    centres of :func:`candidate_centres`. Fewer (possibly none: no organ mask, empty organ, no room) is not an
    error; the caller sees the shortfall in the list length. Draw order is kept; ``index`` counts 0..n-1.
    """
    image = np.asarray(image)
    label = None if label is None else np.asarray(label)
    organ = None if organ is None else np.asarray(organ)
    _check_arrays(image, label, organ)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    roi_size = _size(size)
    if organ is None or count == 0:
        return []
    centres = np.flatnonzero(candidate_centres(label, organ, roi_size))
    if centres.size == 0:
        return []
    picked = rng.choice(centres, size=min(count, centres.size), replace=False)
    half = np.array(roi_size) // 2
    blank = np.zeros(image.shape[1:], dtype=np.uint8) if label is None else label
    rois = []
    for i, flat in enumerate(picked):
        p = np.array(np.unravel_index(int(flat), organ.shape)) - half
        origin = (int(p[0]), int(p[1]), int(p[2]))
        rois.append(
            Roi(
                case_id=case_id,
                kind="candidate",
                index=i,
                origin=origin,
                image=crop(image, origin, roi_size),
                label=crop(blank, origin, roi_size),
                organ=crop(organ, origin, roi_size),
                mask=np.zeros(roi_size, dtype=bool),
                sphere=None,
                classes=(),
                voxels=0,
            )
        )
    return rois


def extract_rois(
    store: Path,
    case_ids: Sequence[str] | None,
    size: RoiSpec | Sequence[int],
    *,
    seed: int,
    candidates_per_case: int = 0,
    min_voxels: int = 1,
    per_class: bool = False,
    connectivity: int = 3,
) -> RoiSet:
    """Lesion and candidate ROIs of ``case_ids`` (all cases of the store if None), reading each case once.

    Candidates of case ``k`` use ``rng_for(seed, "synth-candidates", case_id)``, so they do not depend on which
    other cases are extracted. Cases without a label give no lesion ROI, without an organ mask no candidate;
    both are reported in ``notes``. Everything is held in memory (meant for ROI-sized crops).
    """
    roi_size = _size(size)
    ids = list_cases(store) if case_ids is None else list(case_ids)
    lesions: list[Roi] = []
    candidates: list[Roi] = []
    notes: list[str] = []
    for case_id in ids:
        arrays = read_case(store, case_id)
        if arrays.label is None:
            notes.append(f"{case_id}: no label array, no lesion ROIs")
        else:
            lesions += lesion_rois(
                arrays.image,
                arrays.label,
                arrays.organ,
                roi_size,
                min_voxels=min_voxels,
                per_class=per_class,
                connectivity=connectivity,
                case_id=case_id,
            )
        if candidates_per_case <= 0:
            continue
        rng = rng_for(seed, "synth-candidates", case_id)
        found = candidate_rois(
            arrays.image, arrays.label, arrays.organ, roi_size, candidates_per_case, rng, case_id=case_id
        )
        candidates += found
        if len(found) < candidates_per_case:
            why = "no organ mask" if arrays.organ is None else "empty organ mask" if not np.any(arrays.organ) else ""
            why = why or "not enough lesion-free organ positions"
            notes.append(f"{case_id}: {len(found)} of {candidates_per_case} candidate ROIs ({why})")
    return RoiSet(size=roi_size, lesions=tuple(lesions), candidates=tuple(candidates), notes=tuple(notes))


# ---- which label values are lesions (issue 19): declared roles, and a census that refuses non-lesions ----------


@dataclass(frozen=True)
class LabelRoles:
    """The label values that are lesions (what ROIs, components and the lesion census see) and those that mark the
    organ (never lesions; with the lesions they make the organ mask of a case without an organ file)."""

    lesion: tuple[int, ...]
    organ: tuple[int, ...]

    def lesion_map(self, label: np.ndarray) -> np.ndarray:
        """``label`` (x, y, z) with every value that is not a lesion set to 0 (uint8)."""
        label = np.asarray(label)
        return np.where(np.isin(label, self.lesion), label, 0).astype(np.uint8)

    def organ_map(self, label: np.ndarray) -> np.ndarray | None:
        """The organ mask (x, y, z) uint8 from the organ values and the lesions in them; None without organ values."""
        if not self.organ:
            return None
        return np.isin(np.asarray(label), (*self.organ, *self.lesion)).astype(np.uint8)


def label_roles(label_values: Sequence[int], lesion_labels: Sequence[int], organ_labels: Sequence[int]) -> LabelRoles:
    """Roles from ``synth.lesion_labels`` / ``synth.organ_labels`` and the plan's label values.

    Lesions default to every non-zero plan value that is not an organ value. A declared value must be one of the
    plan's non-zero values and may not be both; at least one lesion value must remain. Bad input: one-line
    :class:`ParamsError` naming the value and the key."""
    from lesionflow.errors import ParamsError

    present = sorted({int(v) for v in label_values if int(v) != 0})
    for key, values in (("synth.lesion_labels", lesion_labels), ("synth.organ_labels", organ_labels)):
        for v in values:
            if int(v) not in present:
                raise ParamsError(
                    f"{key} names label value {int(v)}, but the plan's label values are {present}; "
                    f"list values of this dataset in {key}"
                )
    both = sorted(set(map(int, lesion_labels)) & set(map(int, organ_labels)))
    if both:
        raise ParamsError(
            f"label value {both[0]} is in both synth.lesion_labels and synth.organ_labels; give each value one role"
        )
    organ = tuple(sorted({int(v) for v in organ_labels}))
    lesion = tuple(sorted({int(v) for v in lesion_labels})) or tuple(v for v in present if v not in organ)
    if not lesion:
        raise ParamsError(
            f"no lesion label value left: the plan's values {present} are all in synth.organ_labels; "
            "name the lesion values in synth.lesion_labels"
        )
    return LabelRoles(lesion, organ)


@dataclass
class LesionCensus:
    """What the lesion values of the training cases look like, to stop before generators learn from non-lesions.

    :meth:`add` one lesion map (:meth:`LabelRoles.lesion_map`) per labelled training case. Two rules
    (:meth:`problem`): a lesion value is *organ-sized* when the median, over the cases holding it, of its share of
    the case's voxels (the processed volume: the scan cropped to its non-zero box) exceeds ``max_share``; the
    lesions are *specks* when the median voxel count of their components (26-connected over all lesion values,
    as :func:`lesion_components` splits them, those of at least ``min_voxels`` voxels: what ROIs are cut from)
    is below ``min_median_voxels``."""

    min_voxels: int = 1
    n_cases: int = 0
    shares: dict[int, list[float]] = field(default_factory=dict)
    component_voxels: list[int] = field(default_factory=list)

    def add(self, lesion_label: np.ndarray) -> None:
        lesion_label = np.asarray(lesion_label)
        self.n_cases += 1
        values, counts = np.unique(lesion_label, return_counts=True)
        for v, n in zip(values.tolist(), counts.tolist(), strict=True):
            if v != 0:
                self.shares.setdefault(int(v), []).append(n / lesion_label.size)
        self.component_voxels += [c.voxels for c in lesion_components(lesion_label, min_voxels=self.min_voxels)]

    def median_share(self, value: int) -> float:
        return float(np.median(self.shares[value])) if self.shares.get(value) else 0.0

    def problem(self, *, max_share: float, min_median_voxels: int) -> str | None:
        """One line naming the value, the case count and the params keys to fix; None when the lesions look like
        lesions (or nothing was seen)."""
        for value in sorted(self.shares):
            share = self.median_share(value)
            if share > max_share:
                return (
                    f"label value {value} is organ-sized, not a lesion: it covers a median {share:.1%} of the volume "
                    f"in {len(self.shares[value])} of {self.n_cases} training cases (synth.max_lesion_share = "
                    f"{max_share}); list the lesion values in synth.lesion_labels (the organ's in synth.organ_labels)"
                )
        if self.component_voxels:
            median = float(np.median(self.component_voxels))
            if median < min_median_voxels:
                return (
                    f"the lesions of label value(s) {sorted(self.shares)} are made of specks: their "
                    f"{len(self.component_voxels)} components in {self.n_cases} training cases have a median of "
                    f"{median:g} voxels (synth.min_median_lesion_voxels = {min_median_voxels}); list the real "
                    "lesion values in synth.lesion_labels, clean the labels, or lower synth.min_median_lesion_voxels"
                )
        return None
