"""Zarr v3 store of preprocessed cases: one OME-Zarr 0.5 image group per case, written atomically.

Axis contract: the functions here take and return arrays in the code's voxel order, image ``(c, x, y, z)`` and
labels ``(x, y, z)`` (RAS); on disk every array has its spatial axes reversed, ``(c, z, y, x)`` and ``(z, y, x)``,
the order NGFF viewers expect (:mod:`lesionflow.store.ngff`). Only :func:`open_case_array` hands out the raw on-disk
array. ``spacing`` and ``affine`` in the attrs stay indexed (x, y, z).

Layout: ``<root>`` is a Zarr v3 group listing its cases as an NGFF collection (``ome.bioformats2raw.layout`` 3, and
``OME/`` whose ``series`` names the cases: :func:`index_collection`); ``<root>/<case_id>`` a group whose attrs are the
caller's attrs (keys sorted) plus ``ome`` (NGFF 0.5 multiscales), with arrays (level 0 paths in :data:`ARRAY_PATHS`;
use the readers below rather than hard-coding them):
``0``, ``1``, ... the image pyramid (:mod:`lesionflow.store.pyramid`; level 0 is the data, float32|float16);
``labels/<name>/0``, ``/1``, ... for ``label``, ``organ`` (and ``generated`` on synthetic cases), uint8, as NGFF
"image-label" groups with the image's levels.

Each array is sharded by rows of inner chunks (:func:`write_array`), every shard of a case written by one process,
exactly once: no read-modify-write race inside a shard (pipeline.md §5). All-zero inner chunks are not stored
(``write_empty_chunks=False``), so an all-zero label has no data file. Same arrays + attrs + chunk shape give
byte-identical files for the same zarr/numcodecs versions. Local filesystem only (atomic ``os.rename``).
Different cases may be written concurrently; :func:`clean_temp` must not run while writers are active.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from lesionflow.case_id import check_case_id
from lesionflow.hashing import combine_digests, sha256_file, sha256_tree
from lesionflow.io.layout import on_disk, x_fastest
from lesionflow.store import ngff
from lesionflow.store.pyramid import downsample_image, downsample_label, level_factors
from lesionflow.store.shard_reader import WindowReader, open_shard_reader

# Plain Zstandard level 3: on smooth float32 volumes it compressed better (3.6x vs 1.9x) and wrote faster than
# Blosc-zstd with byte shuffle in our measurement (128^3 case, 64^3 chunks). Output is deterministic for a given
# zstd/numcodecs version; a codec upgrade may change the bytes (and so the digests) of unchanged data.
COMPRESSOR = ZstdCodec(level=3)
# write_case(compression=...): the inner-chunk codec, each a standard Zarr v3 one. "zstd" is the smallest; the direct
# shard reader decodes "blosc-lz4" about 2x and reads "none" (mapped, no decode) about 8x faster per training patch,
# for 2.6x and 9x the disk of "zstd" on the 256^3 chest demo (docs/benchmarks.md, "Random patch reads").
COMPRESSION: dict[str, ZstdCodec | BloscCodec | None] = {
    "zstd": COMPRESSOR,
    "blosc-lz4": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    "none": None,
}
IMAGE_AXES = ("c", "z", "y", "x")  # on disk; the API's image is (c, x, y, z)
SPATIAL_AXES = ("z", "y", "x")
LABEL_NAMES = ("label", "organ", "generated")
ARRAY_PATHS: dict[str, str] = {  # level 0 of each pyramid
    "image": "0",
    "label": "labels/label/0",
    "organ": "labels/organ/0",
    "generated": "labels/generated/0",
}
NGFF_VERSION = ngff.NGFF_VERSION
_TMP, _OLD = ".tmp-", ".old-"


@dataclass(frozen=True)
class CaseArrays:
    """Arrays of one case: image (c, x, y, z) float; label / organ (x, y, z) uint8 or None.

    ``generated`` (x, y, z) uint8, synthetic cases only: k where lesion k - 1 of the sample was generated, 0
    where every voxel equals the source case bit for bit (the synthetic gate checks it).
    """

    image: np.ndarray
    label: np.ndarray | None
    organ: np.ndarray | None = None
    generated: np.ndarray | None = None


def jsonable(obj: Any) -> Any:
    """Plain-JSON copy of ``obj`` with dict keys sorted recursively (the same attrs give the same bytes)."""
    if isinstance(obj, Mapping):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"attribute keys must be str: {list(obj)}")
        return {k: jsonable(obj[k]) for k in sorted(obj)}
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"non-finite float in attributes: {obj}")  # NaN/inf are not valid JSON
        return obj
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, PurePath):
        return obj.as_posix()
    raise TypeError(f"attribute value of type {type(obj).__name__} is not JSON-serialisable")


def _write_group_json(folder: Path, attributes: Mapping[str, Any]) -> None:
    """Write ``<folder>/zarr.json`` of a group with ``attributes`` atomically (racing writers write the same bytes,
    so the winner does not matter)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{_TMP}group-{secrets.token_hex(4)}"
    try:
        zarr.create_group(store=str(tmp), zarr_format=3, attributes=jsonable(attributes))
        os.replace(tmp / "zarr.json", folder / "zarr.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_root(root: Path) -> None:
    """Create ``<root>/zarr.json`` (an NGFF collection) atomically (several worker processes may race here)."""
    if not (root / "zarr.json").is_file():
        _write_group_json(Path(root), {"ome": ngff.collection_root()})


def index_collection(root: Path, images: Sequence[str]) -> None:
    """List ``images`` (group names under ``root``, in order) as the root's NGFF collection: ``<root>/OME`` series.

    Call it after the writes of a stage (the list is derived data: :func:`list_cases` scans the folders)."""
    root = Path(root)
    ensure_root(root)
    _write_group_json(root / ngff.COLLECTION_GROUP, {"ome": ngff.collection_series(images)})


def open_store(root: Path) -> zarr.Group:
    """Open the store's root group, creating it (Zarr format 3) if missing."""
    ensure_root(Path(root))
    return zarr.open_group(str(root), mode="r+", zarr_format=3)


def write_array(
    group: zarr.Group,
    name: str,
    data: np.ndarray,
    chunks: tuple[int, ...],
    dims: Sequence[str],
    compression: str = "zstd",
) -> None:
    """Create ``name`` in ``group`` holding ``chunks``-sized inner chunks (codec ``COMPRESSION[compression]``) in
    one shard per row of chunks along the last axis (one chunk thick in the two spatial axes before it), and write
    it shard by shard.

    Each shard is encoded and written exactly once, and only one shard's buffer is in memory at a time: zarr
    assembles a shard in a buffer of the whole shard's shape, so a whole-volume shard held the volume a second
    time (padded to the chunk grid) during the write (docs/benchmarks.md, clinical sizes)."""
    split = (data.ndim - 3, data.ndim - 2)
    shards = tuple(c if i in split else -(-s // c) * c for i, (s, c) in enumerate(zip(data.shape, chunks, strict=True)))
    arr = group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        shards=shards,
        compressors=COMPRESSION[compression],
        fill_value=0,
        dimension_names=list(dims),
    )
    lead = (slice(None),) * split[0]
    for z in range(0, data.shape[split[0]], chunks[split[0]]):
        for y in range(0, data.shape[split[1]], chunks[split[1]]):
            shard = (*lead, slice(z, z + chunks[split[0]]), slice(y, y + chunks[split[1]]))
            arr[shard] = data[shard]  # exactly one shard


def _prepare(arrays: CaseArrays, image_dtype: str) -> dict[str, np.ndarray]:
    """Validate shapes/dtypes and return {name: array in its stored dtype}."""
    if image_dtype not in ("float32", "float16"):
        raise ValueError(f"image_dtype must be float32 or float16, got {image_dtype}")
    image = np.asarray(arrays.image)
    if image.ndim != 4 or not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"image must be a float (c, x, y, z) array, got {image.dtype} {image.shape}")
    with np.errstate(over="ignore"):  # float16 overflow is reported just below, with a clearer message
        out = {"image": x_fastest(image, dtype=image_dtype)}  # x fastest: written without a transposed copy
    if not np.isfinite(out["image"]).all():
        raise ValueError(f"image has non-finite values as {image_dtype} (NaN in the input or float16 overflow)")
    for name in LABEL_NAMES:
        value = getattr(arrays, name)
        if value is None:
            continue
        lab = np.asarray(value)
        if lab.shape != image.shape[1:]:
            raise ValueError(f"{name} shape {lab.shape} != image spatial shape {image.shape[1:]}")
        if lab.dtype != np.uint8:
            if lab.dtype != bool and not np.issubdtype(lab.dtype, np.integer):
                raise ValueError(f"{name} must be an integer array, got {lab.dtype}")
            if lab.size and (lab.min() < 0 or lab.max() > 255):
                raise ValueError(f"{name} values must fit uint8")
        out[name] = x_fastest(lab, dtype=np.uint8)
    return out


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush every file and folder below ``path``, so that the rename publishes durable bytes."""
    for dirpath, _, filenames in os.walk(path):
        for name in [*filenames, "."]:
            _fsync(os.path.join(dirpath, name))


def _write_pyramid(
    group: zarr.Group,
    level0: np.ndarray,
    steps: Sequence[tuple[int, ...]],
    chunk: Sequence[int],
    dims: Sequence[str],
    downsample: Callable[[np.ndarray, Sequence[int]], np.ndarray],
    compression: str,
) -> None:
    """Arrays ``0``, ``1``, ... of ``group``: ``level0`` (on-disk order) and its downsampled levels (``steps``)."""
    level = level0
    lead = level0.ndim - len(chunk)
    for k, step in enumerate(steps):
        if k:
            level = downsample(level, step)
        spatial = tuple(min(c, s) for c, s in zip(chunk, level.shape[lead:], strict=True))
        write_array(group, str(k), level, (1,) * lead + spatial, dims, compression)  # one chunk per channel


def _write_group(
    tmp: Path,
    case_id: str,
    data: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any],
    chunk: Sequence[int],
    compression: str = "zstd",
) -> None:
    """Write the complete case group (metadata + all pyramids) into the fresh folder ``tmp``.

    ``data`` is in the API order; ``chunk`` is (x, y, z) like the plan's chunk shape."""
    image = on_disk(data["image"])
    steps = level_factors(image.shape[1:])
    factors = [tuple(int(f) for f in np.prod(steps[: k + 1], axis=0)) for k in range(len(steps))]
    paths = [str(k) for k in range(len(steps))]
    disk_chunk = tuple(int(c) for c in reversed(list(chunk)))
    ome = {"version": NGFF_VERSION, "multiscales": ngff.multiscales(case_id, IMAGE_AXES, paths, attrs, factors)}
    group = zarr.create_group(store=str(tmp), zarr_format=3, attributes={**jsonable(attrs), "ome": jsonable(ome)})
    _write_pyramid(group, image, steps, disk_chunk, IMAGE_AXES, downsample_image, compression)
    names = [n for n in LABEL_NAMES if n in data]
    if names:
        labels = group.create_group("labels", attributes={"ome": {"version": NGFF_VERSION, "labels": names}})
        for name in names:
            multiscale = ngff.multiscales(name, SPATIAL_AXES, paths, attrs, factors)
            label_ome = ngff.image_label(ngff.label_colors(data[name]), multiscale)
            sub = labels.create_group(name, attributes={"ome": jsonable(label_ome)})
            _write_pyramid(sub, on_disk(data[name]), steps, disk_chunk, SPATIAL_AXES, downsample_label, compression)


def write_case(
    root: Path,
    case_id: str,
    arrays: CaseArrays,
    attrs: dict[str, Any],
    *,
    chunk_shape: tuple[int, int, int],
    image_dtype: str = "float32",
    compression: str = "zstd",
) -> str:
    """Write (or replace) case ``case_id`` atomically and return :func:`case_digest`.

    ``attrs`` must be JSON-like (numpy scalars/arrays are converted) and contain ``spacing`` (x, y, z, mm);
    ``affine`` (4x4, RAS) is optional and gives the NGFF translation. ``compression`` is a key of
    :data:`COMPRESSION` (the inner-chunk codec). The case is built in
    ``<root>/.tmp-<case_id>-<hex>`` and renamed into place; an existing case is first renamed to
    ``.old-<case_id>-<hex>`` and deleted only after the new one is in place. After a crash at any point
    :func:`clean_temp` leaves either the old or the new complete case. On an exception the temp folder is removed.
    """
    root = Path(root)
    check_case_id(case_id)  # the rule ingest applies (lesionflow.case_id); InvalidCaseId is a ValueError
    if case_id == ngff.COLLECTION_GROUP:
        raise ValueError(f"case id {case_id!r} is reserved by the NGFF collection layout of the store root")
    data = _prepare(arrays, image_dtype)
    if compression not in COMPRESSION:
        raise ValueError(f"compression must be one of {sorted(COMPRESSION)}, got {compression!r}")
    if "ome" in attrs:
        raise ValueError("'ome' is reserved for the NGFF metadata written by this module")
    if len(attrs.get("spacing", ())) != 3:
        raise ValueError("attrs must contain 'spacing' (3 values, mm): it becomes the NGFF scale")
    ensure_root(root)
    publish_group(root, case_id, lambda tmp: _write_group(tmp, case_id, data, attrs, chunk_shape, compression))
    return case_digest(root, case_id)


def publish_group(root: Path, name: str, build: Callable[[Path], None]) -> None:
    """Build group ``name`` with ``build(tmp_folder)`` in ``<root>/.tmp-<name>-<hex>`` and rename it into place.

    An existing ``<root>/<name>`` is first renamed to ``.old-<name>-<hex>`` and deleted only after the new one is in
    place, so after a crash at any point :func:`clean_temp` leaves either the old or the new complete group. On an
    exception the temp folder is removed and the old group put back.
    """
    tmp = root / f"{_TMP}{name}-{secrets.token_hex(8)}"
    final = root / name
    old = root / f"{_OLD}{name}-{secrets.token_hex(8)}"
    had_old = False
    try:
        build(tmp)
        _fsync_tree(tmp)
        if final.exists():
            os.rename(final, old)  # a crash from here until the next rename is repaired by clean_temp
            had_old = True
        os.rename(tmp, final)
        _fsync(root)  # make the renames themselves durable
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if had_old and not final.exists():
            os.rename(old, final)  # put the previous complete group back
        raise
    if had_old:
        shutil.rmtree(old, ignore_errors=True)  # a leftover is removed by clean_temp


def clean_temp(root: Path, is_complete: Callable[[Path], bool] | None = None) -> list[str]:
    """Remove leftover ``.tmp-*`` / ``.old-*`` folders of interrupted writes; return their names (sorted).

    An ``.old-<case>-*`` folder whose case is missing (crash between the two renames of :func:`write_case`)
    is renamed back to ``<case>`` instead of being deleted (``is_complete`` says what complete means; default: a
    case with an image). Must not run concurrently with writers.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    handled = []
    for entry in sorted(root.iterdir()):
        if not entry.name.startswith((_TMP, _OLD)):
            continue
        handled.append(entry.name)
        if entry.name.startswith(_OLD):
            final = root / entry.name[len(_OLD) :].rsplit("-", 1)[0]
            if not final.exists() and (is_complete or _is_complete)(entry):
                os.rename(entry, final)
                continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return handled


def _is_complete(case_dir: Path) -> bool:
    return (case_dir / "zarr.json").is_file() and (case_dir / ARRAY_PATHS["image"] / "zarr.json").is_file()


def list_cases(root: Path) -> list[str]:
    """Sorted ids of the complete cases (a ``zarr.json`` and an ``image`` array; temp folders excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if not p.name.startswith(".") and p.name != ngff.COLLECTION_GROUP and p.is_dir() and _is_complete(p)
    )


def _case_dir(root: Path, case_id: str) -> Path:
    check_case_id(case_id)  # the rule ingest applies (lesionflow.case_id); InvalidCaseId is a ValueError
    case_dir = Path(root) / case_id
    if not _is_complete(case_dir):
        raise FileNotFoundError(f"no complete case {case_id!r} in {root}")
    return case_dir


def case_digest(root: Path, case_id: str) -> str:
    """sha256 over (relative path, sha256 of bytes) of every file of the case, sorted; no mtimes."""
    return sha256_tree(_case_dir(root, case_id), exclude_prefixes=())


def store_digest(root: Path) -> str:
    """Digest of the whole store: the case digests (by case id) plus the bytes of ``<root>/zarr.json``."""
    root = Path(root)
    items = [(case_id, case_digest(root, case_id)) for case_id in list_cases(root)]
    # "/zarr.json" cannot collide with a case id (ids have no "/").
    return combine_digests([*items, ("/zarr.json", sha256_file(root / "zarr.json"))])


def read_case_attrs(root: Path, case_id: str, *, include_ome: bool = False) -> dict[str, Any]:
    """The case's attrs as written (canonical JSON); the NGFF ``ome`` block only if ``include_ome``."""
    meta = json.loads((_case_dir(root, case_id) / "zarr.json").read_bytes())
    attrs: dict[str, Any] = meta.get("attributes", {})
    if not include_ome:
        attrs.pop("ome", None)
    return attrs


def open_case_array(root: Path, case_id: str, name: str) -> zarr.Array | None:
    """The stored level-0 array ``name`` ("image", "label", "organ" or "generated"), read-only, in the **on-disk**
    order (c, z, y, x) / (z, y, x); None when the case lacks it. Code that wants voxels uses :func:`read_case`,
    :func:`open_case_reader` or :func:`case_shape`."""
    path = _case_dir(root, case_id) / ARRAY_PATHS[name]
    if not (path / "zarr.json").is_file():
        return None
    arr = zarr.open_array(str(path), mode="r", zarr_format=3)
    assert isinstance(arr, zarr.Array)
    return arr


def case_shape(root: Path, case_id: str) -> tuple[int, int, int, int]:
    """The case's image shape (c, x, y, z), from its metadata (no voxel is read)."""
    image = open_case_array(root, case_id, "image")
    assert image is not None  # _case_dir raises for a case without image
    c, z, y, x = (int(n) for n in image.shape)
    return c, x, y, z


def read_case(root: Path, case_id: str) -> CaseArrays:
    """Read all arrays of a case into memory, in the API order (C-contiguous)."""
    arrays = {name: open_case_array(root, case_id, name) for name in ARRAY_PATHS}
    loaded = {
        name: None if a is None else np.ascontiguousarray(on_disk(np.asarray(a[...]))) for name, a in arrays.items()
    }
    assert loaded["image"] is not None
    return CaseArrays(
        image=loaded["image"], label=loaded["label"], organ=loaded["organ"], generated=loaded["generated"]
    )


def _read_window(arr: zarr.Array | np.ndarray, origin: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``arr[..., o:o+s]`` over the last 3 axes, zero-padded outside the array; reads only the touched chunks."""
    lead = tuple(arr.shape[:-3])
    out = np.zeros((*lead, *size), dtype=arr.dtype)
    src, dst = [], []
    for o, s, n in zip(origin, size, arr.shape[-3:], strict=True):
        lo, hi = max(o, 0), min(o + s, n)
        if hi <= lo:
            return out  # the window misses the volume entirely
        src.append(slice(lo, hi))
        dst.append(slice(lo - o, hi - o))
    keep = (slice(None),) * len(lead)
    out[(*keep, *dst)] = arr[(*keep, *src)]
    return out


class ZarrWindowReader:
    """:class:`~lesionflow.store.shard_reader.WindowReader` through zarr-python, in the array's own axis order:
    any layout zarr-python opens."""

    def __init__(self, array: zarr.Array) -> None:
        self.array = array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(self.array.dtype)

    def read(self, origin: Sequence[int], size: Sequence[int]) -> np.ndarray:
        return _read_window(self.array, origin, size)

    def close(self) -> None:
        return None


class VoxelOrderReader:
    """A :class:`~lesionflow.store.shard_reader.WindowReader` in the API order over one in the on-disk order:
    origins and sizes are given (x, y, z), windows come back as views (c, x, y, z) / (x, y, z) of the stored ones."""

    def __init__(self, stored: WindowReader) -> None:
        self.stored = stored

    @property
    def shape(self) -> tuple[int, ...]:
        shape = self.stored.shape
        return (*shape[:-3], *reversed(shape[-3:]))

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.stored.dtype

    def read(self, origin: Sequence[int], size: Sequence[int]) -> np.ndarray:
        return on_disk(self.stored.read(tuple(reversed(list(origin))), tuple(reversed(list(size)))))

    def close(self) -> None:
        self.stored.close()


def open_case_reader(root: Path, case_id: str, name: str, *, fast: bool = True) -> WindowReader | None:
    """A window reader for array ``name`` of the case in the API order (None when the case lacks it), to keep open
    across reads.

    With ``fast``, the direct shard reader (:mod:`lesionflow.store.shard_reader`) where it decodes the layout exactly,
    else zarr-python; both return the same voxels as :func:`read_patch`. The caller closes it (file descriptors).
    """
    path = _case_dir(root, case_id) / ARRAY_PATHS[name]
    if not (path / "zarr.json").is_file():
        return None
    if fast:
        reader, _ = open_shard_reader(path)
        if reader is not None:
            return VoxelOrderReader(reader)
    array = open_case_array(root, case_id, name)
    assert array is not None
    return VoxelOrderReader(ZarrWindowReader(array))


def read_patch(
    root: Path, case_id: str, origin: tuple[int, int, int], size: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Image (c, *size) and label (*size) patch starting at voxel ``origin`` (x, y, z; may be negative / past the
    end), in the API order. Voxels outside the volume are 0. The label is None when the case has none. Dtypes are the
    stored ones."""
    readers = [open_case_reader(root, case_id, name, fast=False) for name in ("image", "label")]
    image, label = (None if r is None else r.read(origin, size) for r in readers)
    assert image is not None
    return image, label
