"""Random training patches read straight from the Zarr store, nnU-Net style, reproducible item by item.

Item ``i`` of a :class:`PatchDataset` is a pure function of ``(seed, i)``: which pool (real or synthetic), which
case, where the patch lies and how it is augmented all come from ``rng_for(seed, "patch", i)`` and
``rng_for(seed, "augment", i)``. So any worker, any number of workers, and a resumed run (see :func:`batch_items`)
read exactly the same patches. Voxel order is the store's: image (c, x, y, z), label (x, y, z); positions and
sizes are in voxels of the preprocessed grid.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lesionflow.params import AugmentParams
from lesionflow.seeding import rng_for
from lesionflow.seg.augment import Shape3, apply_augmentation, draw_margin, sample_augmentation
from lesionflow.store.shard_reader import WindowReader
from lesionflow.store.zarr_store import _read_window, case_shape, open_case_reader


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields make field-wise == ambiguous; identity is enough
class CaseIndex:
    """What patch sampling needs to know about one case, without its voxels.

    ``shape``: (x, y, z) voxels. ``foreground``: (n, 3) int32 voxel coordinates (x, y, z) of label > 0, a
    deterministic subsample (empty (0, 3) without foreground or label). ``classes``: (n,) uint8 label value at
    each of those points.
    """

    store: Path
    case_id: str
    shape: Shape3
    n_channels: int
    foreground: np.ndarray
    classes: np.ndarray

    @property
    def present_classes(self) -> np.ndarray:
        """Sorted label values (> 0) that have indexed points."""
        return np.unique(self.classes)


def _class_quotas(counts: np.ndarray, max_points: int) -> np.ndarray:
    """Points kept per class: water-filling, so a small class keeps all its voxels and the rest is shared evenly.

    A plain subsample of all foreground voxels would lose a class of a few voxels next to a large one, and then
    nnU-Net's per-class sampling could never pick it.
    """
    quotas = np.zeros_like(counts)
    remaining = max_points
    order = np.argsort(counts, kind="stable")
    for rank, k in enumerate(order):
        quotas[k] = min(int(counts[k]), remaining // (len(order) - rank))
        remaining -= int(quotas[k])
    return quotas


def _index_foreground(label: np.ndarray, rng: np.random.Generator, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) int32 coordinates and (n,) uint8 values of a per-class subsample of the voxels with label > 0."""
    coords = np.argwhere(label > 0)
    values = label[tuple(coords.T)]
    class_values, counts = np.unique(values, return_counts=True)
    keep: list[np.ndarray] = []
    for value, count, quota in zip(class_values, counts, _class_quotas(counts, max_points), strict=True):
        members = np.flatnonzero(values == value)
        keep.append(members if quota >= count else members[np.sort(rng.choice(count, quota, replace=False))])
    chosen = np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
    return coords[chosen].astype(np.int32).reshape(-1, 3), values[chosen].astype(np.uint8)


def index_cases(store: Path, case_ids: Sequence[str], *, seed: int, max_points: int = 20000) -> list[CaseIndex]:
    """Index the foreground of each case (one read of its label array); subsample ``rng_for(seed, "fg-index", id)``.

    At most ``max_points`` points per case, shared between label values so that every value keeps at least one
    point when ``max_points`` >= the number of values.
    """
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    indexed = []
    for case_id in case_ids:
        channels, *spatial = case_shape(store, case_id)
        shape = (spatial[0], spatial[1], spatial[2])
        label = open_case_reader(store, case_id, "label")
        if label is None:
            foreground, classes = np.zeros((0, 3), dtype=np.int32), np.zeros(0, dtype=np.uint8)
        else:
            rng = rng_for(seed, "fg-index", case_id)
            foreground, classes = _index_foreground(label.read((0, 0, 0), shape), rng, max_points)
            label.close()
        indexed.append(CaseIndex(Path(store), case_id, shape, channels, foreground, classes))
    return indexed


def batch_items(step: int, batch_size: int) -> range:
    """Item indices of training step ``step`` (0-based): a resumed run reads exactly the patches of that step."""
    if step < 0 or batch_size < 1:
        raise ValueError(f"need step >= 0 and batch_size >= 1, got step={step}, batch_size={batch_size}")
    return range(step * batch_size, (step + 1) * batch_size)


def is_forced_foreground(item: int, batch_size: int, foreground_fraction: float) -> bool:
    """nnU-Net's oversampling rule: item ``item`` (batch position ``item % batch_size``) is centred on foreground
    iff its position is not below ``round(batch_size * (1 - foreground_fraction))`` (Python's round, as nnU-Net);
    with batch_size 2 and 0.33 that is position 1, so every batch holds at least one forced item."""
    return not (item % batch_size) < round(batch_size * (1 - foreground_fraction))


def random_origin(rng: np.random.Generator, shape: Shape3, patch_size: Shape3) -> Shape3:
    """Uniform origin keeping the patch inside the volume; where the volume is smaller than the patch, the volume is
    centred in it (the extra ``pad // 2`` zeros before, the rest after, as nnU-Net pads). One draw per axis."""
    origin = []
    for n, p in zip(shape, patch_size, strict=True):
        offset = int(rng.integers(0, max(n - p, 0) + 1))
        origin.append(offset if n >= p else -((p - n) // 2))
    return origin[0], origin[1], origin[2]


def foreground_origin(rng: np.random.Generator, case: CaseIndex, patch_size: Shape3) -> Shape3:
    """Origin of a patch centred (voxel ``patch // 2``) on a foreground point: a class uniformly among those present,
    then a point of that class uniformly (nnU-Net's class-balanced oversampling)."""
    present = case.present_classes
    value = present[rng.integers(len(present))]
    points = case.foreground[case.classes == value]
    point = points[rng.integers(len(points))]
    return (
        int(point[0]) - patch_size[0] // 2,
        int(point[1]) - patch_size[1] // 2,
        int(point[2]) - patch_size[2] // 2,
    )


def _check_cases(real: Sequence[CaseIndex], synthetic: Sequence[CaseIndex]) -> None:
    if not real:
        raise ValueError("real case list is empty: need at least one training case")
    channels = {c.n_channels for c in real}
    if len(channels) != 1:
        raise ValueError(f"real cases differ in channel count: {sorted(channels)}")
    synthetic_channels = {c.n_channels for c in synthetic} - channels
    if synthetic_channels:
        raise ValueError(f"synthetic cases have {sorted(synthetic_channels)} channels, real cases {channels.pop()}")


def _check_patch_size(patch_size: Sequence[int]) -> Shape3:
    if len(patch_size) != 3 or any(int(p) != p or p < 1 for p in patch_size):
        raise ValueError(f"patch_size must be three positive ints (x, y, z voxels), got {tuple(patch_size)}")
    return int(patch_size[0]), int(patch_size[1]), int(patch_size[2])


class PatchDataset(Dataset[dict[str, Any]]):
    """``length`` random training patches; item ``i`` is a pure function of ``(seed, i)``.

    Item ``i`` is at batch position ``i % batch_size`` and is forced to foreground by :func:`is_forced_foreground`.
    Its pool is synthetic with probability ``synthetic_ratio`` (if that pool is non-empty), its case uniform in the
    pool. A forced item is centred on a foreground point (:func:`foreground_origin`), any other item (and a forced
    one of a case without foreground) lies uniformly in the volume (:func:`random_origin`). With ``augmentation``,
    a margin around the patch is read so that rotation / zoom-out never sample beyond the read region.

    An item is a dict: "image" float32 (c, x, y, z), "label" int64 (1, x, y, z), "case_id" str, "synthetic" bool,
    "forced_foreground" bool. Arrays are opened lazily as window readers (the direct shard reader where the layout
    allows, else zarr-python: :func:`lesionflow.store.zarr_store.open_case_reader`) and kept per process (DataLoader
    workers included), so a read pays neither the open nor the shard index again.
    """

    def __init__(
        self,
        real: Sequence[CaseIndex],
        *,
        patch_size: Sequence[int],
        batch_size: int,
        seed: int,
        length: int,
        foreground_fraction: float = 0.33,
        synthetic: Sequence[CaseIndex] = (),
        synthetic_ratio: float = 0.0,
        augmentation: AugmentParams | None = None,
        cache_mb: float = 0.0,
    ) -> None:
        _check_cases(real, synthetic)
        if cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {cache_mb}")
        self.patch_size = _check_patch_size(patch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
        if not 0.0 <= synthetic_ratio <= 1.0:
            raise ValueError(f"synthetic_ratio must be in [0, 1], got {synthetic_ratio}")
        self.real = tuple(real)
        self.synthetic = tuple(synthetic)
        self.batch_size = batch_size
        self.seed = seed
        self.length = length
        self.foreground_fraction = foreground_fraction
        self.synthetic_ratio = synthetic_ratio
        self.augmentation = augmentation if augmentation is not None and augmentation.enabled else None
        self._arrays: dict[tuple[Path, str, str], WindowReader | None] = {}
        self._arrays_pid = os.getpid()
        # Decoded whole cases (image, label), least recently used first; at most cache_mb per process.
        self.cache_bytes = int(cache_mb * 2**20)
        self._decoded: OrderedDict[tuple[Path, str], tuple[np.ndarray, np.ndarray | None]] = OrderedDict()

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict[str, Any]:
        # Opened readers (file descriptors) stay in the process that opened them; a worker opens its own on first use.
        state = self.__dict__.copy()
        state["_arrays"] = {}
        state["_decoded"] = OrderedDict()
        return state

    def _array(self, case: CaseIndex, name: str) -> WindowReader | None:
        if self._arrays_pid != os.getpid():  # forked worker: the parent's handles are not ours to reuse
            self._arrays, self._arrays_pid, self._decoded = {}, os.getpid(), OrderedDict()
        key = (case.store, case.case_id, name)
        if key not in self._arrays:
            self._arrays[key] = open_case_reader(case.store, case.case_id, name)
        return self._arrays[key]

    def read_region(self, case: CaseIndex, origin: Shape3, size: Shape3) -> tuple[np.ndarray, np.ndarray]:
        """Image (c, *size) float32 and label (*size) uint8 from voxel ``origin``, zeros outside the volume
        (the bytes of :func:`lesionflow.store.zarr_store.read_patch` via the kept readers); all-zero label if none."""
        decoded = self._decoded_case(case)
        if decoded is not None:
            image_window = _read_window(decoded[0], origin, size)
            label_window = None if decoded[1] is None else _read_window(decoded[1], origin, size)
        else:
            image = self._array(case, "image")
            assert image is not None
            label = self._array(case, "label")
            image_window = image.read(origin, size)
            label_window = None if label is None else label.read(origin, size)
        if label_window is None:
            label_window = np.zeros(size, dtype=np.uint8)
        return image_window.astype(np.float32, copy=False), label_window

    def _decoded_case(self, case: CaseIndex) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The whole decoded case from the per-process LRU cache (read from its shards on first use), or None
        when caching is off or the case alone exceeds the budget. Same bytes as reading windows from Zarr."""
        if not self.cache_bytes:
            return None
        key = (case.store, case.case_id)
        if key in self._decoded:
            self._decoded.move_to_end(key)
            return self._decoded[key]
        image = self._array(case, "image")
        assert image is not None
        voxels = int(np.prod(image.shape[1:]))
        size = voxels * (image.shape[0] * image.dtype.itemsize + 1)  # the image, and the label as uint8
        if size > self.cache_bytes:
            return None
        label = self._array(case, "label")
        whole = ((0, 0, 0), case.shape)
        entry = (image.read(*whole), None if label is None else label.read(*whole))
        used = sum(a.nbytes + (0 if b is None else b.nbytes) for a, b in self._decoded.values())
        while self._decoded and used + size > self.cache_bytes:
            _, (old_image, old_label) = self._decoded.popitem(last=False)
            used -= old_image.nbytes + (0 if old_label is None else old_label.nbytes)
        self._decoded[key] = entry
        return entry

    def choose(self, index: int) -> tuple[CaseIndex, bool, bool, Shape3]:
        """(case, synthetic, forced_foreground, patch origin) of item ``index``, without reading voxels."""
        rng = rng_for(self.seed, "patch", index)
        # Drawn even without a synthetic pool, so that adding a pool at ratio 0 leaves every item unchanged.
        pool_u = rng.random()
        synthetic = bool(self.synthetic) and bool(pool_u < self.synthetic_ratio)
        pool = self.synthetic if synthetic else self.real
        case = pool[int(rng.integers(len(pool)))]
        forced = is_forced_foreground(index, self.batch_size, self.foreground_fraction)
        if forced and len(case.foreground):
            origin = foreground_origin(rng, case, self.patch_size)
        else:
            origin = random_origin(rng, case.shape, self.patch_size)
        return case, synthetic, forced, origin

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"item {index} out of range [0, {self.length})")
        case, synthetic, forced, origin = self.choose(index)
        if self.augmentation is None:
            image, label = self.read_region(case, origin, self.patch_size)
        else:
            draw = sample_augmentation(rng_for(self.seed, "augment", index), self.augmentation)
            # Read only what this draw samples (most draws have no rotation/zoom): read_margin is the worst case.
            margin = draw_margin(draw, self.patch_size)
            region_origin = (origin[0] - margin[0], origin[1] - margin[1], origin[2] - margin[2])
            region = tuple(p + 2 * m for p, m in zip(self.patch_size, margin, strict=True))
            image, label = self.read_region(case, region_origin, (region[0], region[1], region[2]))
            image, label = apply_augmentation(image, label, draw, self.patch_size)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "label": torch.from_numpy(label.astype(np.int64))[None],
            "case_id": case.case_id,
            "synthetic": synthetic,
            "forced_foreground": forced,
        }
