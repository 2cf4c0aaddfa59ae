"""Zarr v3 store of preprocessed cases: one OME-Zarr 0.5 image group per case, written atomically.

Layout: ``<root>`` is a Zarr v3 group; ``<root>/<case_id>`` a group whose attrs are the caller's attrs (keys
sorted) plus ``ome`` (NGFF 0.5 multiscales), with arrays (paths in :data:`ARRAY_PATHS`, use
:func:`open_case_array` rather than hard-coding them):
``image`` (c, x, y, z) float32|float16, RAS voxel order, NGFF axes "c","x","y","z";
``labels/label/0`` and ``labels/organ/0`` (x, y, z) uint8, as NGFF "image-label" groups under ``labels``.

Each array is one shard (shape rounded up to the inner chunk), written by one process in one call: no
read-modify-write race inside a shard (pipeline.md §5). All-zero inner chunks are not stored
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
IMAGE_AXES = ("c", "x", "y", "z")
SPATIAL_AXES = ("x", "y", "z")
LABEL_NAMES = ("label", "organ", "generated")
ARRAY_PATHS: dict[str, str] = {
    "image": "image",
    "label": "labels/label/0",
    "organ": "labels/organ/0",
    "generated": "labels/generated/0",
}
NGFF_VERSION = "0.5"
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


def _axes(names: Sequence[str]) -> list[dict[str, str]]:
    return [
        {"name": n, "type": "channel"} if n == "c" else {"name": n, "type": "space", "unit": "millimeter"}
        for n in names
    ]


def _multiscales(name: str, path: str, axes: Sequence[str], attrs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """NGFF 0.5 ``multiscales`` with one level; scale = spacing, translation = affine[:3, 3] (if given)."""
    spacing = [float(s) for s in attrs["spacing"]]
    lead = [1.0] * (len(axes) - 3)  # the channel axis is not scaled
    transforms: list[dict[str, Any]] = [{"type": "scale", "scale": lead + spacing}]
    if attrs.get("affine") is not None:
        # NGFF has no rotation: only the world position of voxel (0,0,0); the full affine stays in our attrs.
        offset = [float(v) for v in np.asarray(attrs["affine"], dtype=float)[:3, 3]]
        transforms.append({"type": "translation", "translation": [0.0] * len(lead) + offset})
    return [{"name": name, "axes": _axes(axes), "datasets": [{"path": path, "coordinateTransformations": transforms}]}]


def ensure_root(root: Path) -> None:
    """Create ``<root>/zarr.json`` atomically (several worker processes may race here)."""
    if (root / "zarr.json").is_file():
        return
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{_TMP}root-{secrets.token_hex(4)}"
    try:
        zarr.create_group(store=str(tmp), zarr_format=3)
        # os.replace is atomic, and racing writers all write the same bytes, so the winner does not matter.
        os.replace(tmp / "zarr.json", root / "zarr.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    """Create ``name`` in ``group`` as one shard holding ``chunks``-sized inner chunks (codec
    ``COMPRESSION[compression]``), and write it in one call."""
    shards = tuple(-(-s // c) * c for s, c in zip(data.shape, chunks, strict=True))
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
    arr[...] = data  # whole volume at once: the shard is encoded and written exactly once


def _prepare(arrays: CaseArrays, image_dtype: str) -> dict[str, np.ndarray]:
    """Validate shapes/dtypes and return {name: array in its stored dtype}."""
    if image_dtype not in ("float32", "float16"):
        raise ValueError(f"image_dtype must be float32 or float16, got {image_dtype}")
    image = np.asarray(arrays.image)
    if image.ndim != 4 or not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"image must be a float (c, x, y, z) array, got {image.dtype} {image.shape}")
    with np.errstate(over="ignore"):  # float16 overflow is reported just below, with a clearer message
        out = {"image": np.ascontiguousarray(image, dtype=image_dtype)}
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
        out[name] = np.ascontiguousarray(lab, dtype=np.uint8)
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


# Display colours (RGBA) for label values, cycled; NGFF says image-label SHOULD list "colors".
_PALETTE = ((255, 0, 0), (0, 200, 0), (0, 90, 255), (255, 200, 0), (200, 0, 255), (0, 220, 220), (255, 120, 0))


def _label_colors(label: np.ndarray) -> list[dict[str, Any]]:
    """One colour entry per non-zero value present in ``label`` (sorted), for NGFF viewers."""
    # slab by slab: bincount widens its input to int64 (8x a uint8 label), which set the writer's memory peak
    flat, counts = label.reshape(-1), np.zeros(256, dtype=np.int64)
    for i in range(0, flat.size, 1 << 22):
        slab = np.bincount(flat[i : i + (1 << 22)], minlength=counts.size)
        counts = np.pad(counts, (0, slab.size - counts.size)) + slab  # a label value above 255 widens it
    values = np.flatnonzero(counts)
    return [{"label-value": int(v), "rgba": [*_PALETTE[(int(v) - 1) % len(_PALETTE)], 255]} for v in values if v]


def _write_group(
    tmp: Path,
    case_id: str,
    data: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any],
    chunk: Sequence[int],
    compression: str = "zstd",
) -> None:
    """Write the complete case group (metadata + all arrays) into the fresh folder ``tmp``."""
    spatial = data["image"].shape[1:]
    p = tuple(min(int(c), s) for c, s in zip(chunk, spatial, strict=True))
    ome = {"version": NGFF_VERSION, "multiscales": _multiscales(case_id, "image", IMAGE_AXES, attrs)}
    group = zarr.create_group(store=str(tmp), zarr_format=3, attributes={**jsonable(attrs), "ome": jsonable(ome)})
    write_array(group, "image", data["image"], (1, *p), IMAGE_AXES, compression)
    names = [n for n in LABEL_NAMES if n in data]
    if names:
        labels = group.create_group("labels", attributes={"ome": {"version": NGFF_VERSION, "labels": names}})
        for name in names:
            label_ome = {
                "version": NGFF_VERSION,
                "image-label": {"colors": _label_colors(data[name]), "source": {"image": "../../"}},
                "multiscales": _multiscales(name, "0", SPATIAL_AXES, attrs),
            }
            sub = labels.create_group(name, attributes={"ome": jsonable(label_ome)})
            write_array(sub, "0", data[name], p, SPATIAL_AXES, compression)


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
    return (case_dir / "zarr.json").is_file() and (case_dir / "image" / "zarr.json").is_file()


def list_cases(root: Path) -> list[str]:
    """Sorted ids of the complete cases (a ``zarr.json`` and an ``image`` array; temp folders excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and p.is_dir() and _is_complete(p))


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
    """Open array ``name`` ("image", "label", "organ" or "generated") read-only; None when the case lacks it."""
    path = _case_dir(root, case_id) / ARRAY_PATHS[name]
    if not (path / "zarr.json").is_file():
        return None
    arr = zarr.open_array(str(path), mode="r", zarr_format=3)
    assert isinstance(arr, zarr.Array)
    return arr


def read_case(root: Path, case_id: str) -> CaseArrays:
    """Read all arrays of a case into memory."""
    arrays = {name: open_case_array(root, case_id, name) for name in ARRAY_PATHS}
    loaded = {name: None if a is None else np.asarray(a[...]) for name, a in arrays.items()}
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
    """:class:`~lesionflow.store.shard_reader.WindowReader` through zarr-python: any layout zarr-python opens."""

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


def open_case_reader(root: Path, case_id: str, name: str, *, fast: bool = True) -> WindowReader | None:
    """A window reader for array ``name`` of the case (None when the case lacks it), to keep open across reads.

    With ``fast``, the direct shard reader (:mod:`lesionflow.store.shard_reader`) where it decodes the layout exactly,
    else zarr-python; both return the same bytes as :func:`read_patch`. The caller closes it (file descriptors).
    """
    path = _case_dir(root, case_id) / ARRAY_PATHS[name]
    if not (path / "zarr.json").is_file():
        return None
    if fast:
        reader, _ = open_shard_reader(path)
        if reader is not None:
            return reader
    array = open_case_array(root, case_id, name)
    assert array is not None
    return ZarrWindowReader(array)


def read_patch(
    root: Path, case_id: str, origin: tuple[int, int, int], size: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Image (c, *size) and label (*size) patch starting at voxel ``origin`` (may be negative / past the end).

    Voxels outside the volume are 0. The label is None when the case has none. Dtypes are the stored ones.
    """
    image = open_case_array(root, case_id, "image")
    assert image is not None
    label = open_case_array(root, case_id, "label")
    return _read_window(image, origin, size), None if label is None else _read_window(label, origin, size)
