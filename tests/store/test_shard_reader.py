"""The direct shard reader returns exactly zarr-python's bytes, and anything it does not decode falls back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, ShardingCodec, TransposeCodec, ZstdCodec

from lesionflow.seg.patches import PatchDataset, index_cases
from lesionflow.store.shard_reader import ShardReader, open_shard_reader, parse_layout
from lesionflow.store.zarr_store import (
    ARRAY_PATHS,
    COMPRESSION,
    CaseArrays,
    VoxelOrderReader,
    ZarrWindowReader,
    on_disk,
    open_case_reader,
    read_patch,
    write_case,
)

SHAPE = (37, 29, 21)  # no axis a multiple of the chunk: partial edge chunks everywhere


def _windows(shape: tuple[int, ...], n: int, seed: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Random windows over the last 3 axes: inside, across edges, partly or wholly outside, and the whole volume."""
    rng = np.random.default_rng(seed)
    spatial = shape[-3:]
    out = [((0, 0, 0), spatial), ((-3, -3, -3), tuple(s + 6 for s in spatial)), ((-50, 0, 0), (10, 5, 5))]
    for _ in range(n):
        size = tuple(int(rng.integers(1, s + 8)) for s in spatial)
        origin = tuple(int(rng.integers(-z - 4, s + 4)) for z, s in zip(size, spatial, strict=True))
        out.append((origin, size))
    return out


def _assert_same_windows(path: Path, n: int = 80, seed: int = 0) -> ShardReader:
    """Every window from the shard reader equals zarr-python's, bit for bit (dtype, shape, bytes)."""
    reader, why = open_shard_reader(path)
    assert reader is not None, why
    array = zarr.open_array(str(path), mode="r", zarr_format=3)
    reference = ZarrWindowReader(array)
    assert reader.shape == reference.shape
    assert reader.dtype == reference.dtype
    for origin, size in _windows(reader.shape, n, seed):
        got, want = reader.read(origin, size), reference.read(origin, size)
        assert got.dtype == want.dtype, (origin, size)
        assert got.shape == want.shape, (origin, size)
        assert got.tobytes() == want.tobytes(), (origin, size)
    return reader


def _case(tmp_path: Path, compression: str = "zstd") -> Path:
    rng = np.random.default_rng(3)
    image = rng.normal(size=(2, *SHAPE)).astype(np.float32)
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[20:30, 3:12, 10:19] = rng.integers(0, 3, size=(10, 9, 9))  # most label chunks are all zero: not stored
    root = tmp_path / "store"
    attrs = {"spacing": [1, 1, 1]}
    write_case(root, "c1", CaseArrays(image, label), attrs, chunk_shape=(8, 8, 8), compression=compression)
    return root


@pytest.mark.parametrize("compression", sorted(COMPRESSION))
def test_store_case_reads_match_zarr_python(tmp_path: Path, compression: str) -> None:
    root = _case(tmp_path, compression)
    for name in ("image", "label"):
        reader = open_case_reader(root, "c1", name)
        assert isinstance(reader, VoxelOrderReader)  # API order (x, y, z) over the stored (z, y, x)
        stored = reader.stored
        assert isinstance(stored, ShardReader)  # the store's own layouts take the fast path
        assert len(stored.layout.codecs) == (compression != "none")
        _assert_same_windows(stored.path)
        reader.close()
    assert open_case_reader(root, "c1", "organ") is None


def test_unknown_compression_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="compression must be one of"):
        _case(tmp_path, "lz5")


def _array(path: Path, data: np.ndarray, **kwargs: Any) -> Path:
    array = zarr.create_array(store=str(path), shape=data.shape, dtype=data.dtype, zarr_format=3, **kwargs)
    array[...] = data
    return path


def _partly_written(path: Path, data: np.ndarray, region: tuple[slice, ...], **kwargs: Any) -> Path:
    """An array of which only ``region`` was written: the rest is the fill value, with no chunk (or shard) stored."""
    array = zarr.create_array(store=str(path), shape=data.shape, dtype=data.dtype, zarr_format=3, **kwargs)
    array[region] = data[region]
    return path


@pytest.mark.parametrize(
    ("dtype", "kwargs"),
    [
        ("float32", {"chunks": (8, 4, 4), "shards": (16, 8, 8), "compressors": ZstdCodec(level=1)}),
        ("int16", {"chunks": (4, 4, 8), "shards": (8, 12, 16), "compressors": BloscCodec(cname="lz4")}),
        ("float16", {"chunks": (5, 5, 5), "shards": (10, 10, 10), "compressors": GzipCodec()}),
        ("uint8", {"chunks": (6, 6, 6), "shards": (12, 12, 12), "compressors": None}),
        (
            "float32",
            {"chunks": (4, 4, 4), "shards": (8, 8, 8), "chunk_key_encoding": {"name": "default", "separator": "."}},
        ),
    ],
)
def test_multi_shard_layouts_match_zarr_python(tmp_path: Path, dtype: str, kwargs: dict[str, Any]) -> None:
    rng = np.random.default_rng(5)
    data = (rng.normal(size=SHAPE) * 100).astype(dtype)
    reader = _assert_same_windows(_array(tmp_path / "a", data, **kwargs))
    # the windows crossed shard boundaries: more than one shard file was opened
    assert sum(entry is not None for entry in reader._shards.values()) > 1
    reader.close()


def test_fill_value_for_missing_chunks_and_shards(tmp_path: Path) -> None:
    data = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    region = (slice(0, 12), slice(3, 9), slice(0, 21))  # most shards are never written: no files at all
    path = _partly_written(tmp_path / "a", data, region, chunks=(4, 4, 4), shards=(8, 8, 8), fill_value=-7)
    reader = _assert_same_windows(path, seed=1)
    assert None in reader._shards.values()  # some shard had no file
    # inside the volume but outside what was written: the fill value; outside the volume: 0
    window = reader.read((30, 20, 15), (10, 12, 10))
    assert (window[:7, :9, :6] == -7).all()
    assert (window[7:] == 0).all()
    assert (window[:, 9:] == 0).all()
    reader.close()


def test_index_at_start(tmp_path: Path) -> None:
    data = np.random.default_rng(2).normal(size=SHAPE).astype(np.float32)
    sharding = ShardingCodec(chunk_shape=(4, 4, 4), codecs=[BytesCodec(), ZstdCodec()], index_location="start")
    path = _array(tmp_path / "a", data, chunks=(8, 8, 8), serializer=sharding, compressors=None)
    assert json.loads((path / "zarr.json").read_bytes())["codecs"][0]["configuration"]["index_location"] == "start"
    _assert_same_windows(path).close()


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"chunks": (8, 8, 8)}, "not sharded"),
        ({"chunks": (4, 4, 4), "shards": (8, 8, 8), "filters": [TransposeCodec(order=(2, 1, 0))]}, "transpose"),
        (
            {"chunks": (8, 8, 8), "serializer": ShardingCodec(chunk_shape=(4, 4, 4)), "compressors": ZstdCodec()},
            "around",
        ),
        (
            {
                "chunks": (8, 8, 8),
                "serializer": ShardingCodec(chunk_shape=(4, 4, 4), codecs=[BytesCodec(endian="big")]),
                "compressors": None,
            },
            "big-endian",
        ),
        ({"chunks": (4, 4, 4), "shards": (8, 8, 8), "fill_value": float("nan")}, "fill value"),
    ],
)
def test_layouts_it_does_not_decode_are_refused(tmp_path: Path, kwargs: dict[str, Any], reason: str) -> None:
    data = np.random.default_rng(4).normal(size=SHAPE).astype(np.float32)
    path = _array(tmp_path / "a", data, **kwargs)
    layout, why = parse_layout(json.loads((path / "zarr.json").read_bytes()))
    assert layout is None
    assert reason in why


def test_non_sharded_case_falls_back_to_zarr_python(tmp_path: Path) -> None:
    root = _case(tmp_path)
    label_path = root / "c1" / "labels" / "label" / "0"
    label = np.asarray(zarr.open_array(str(label_path), mode="r")[...])
    shutil.rmtree(label_path)
    _array(label_path, label, chunks=(8, 8, 8), compressors=ZstdCodec())  # what another writer might leave
    reader = open_case_reader(root, "c1", "label")
    assert isinstance(reader, VoxelOrderReader)
    assert isinstance(reader.stored, ZarrWindowReader)
    label = on_disk(label)  # the stored (z, y, x) in the API's (x, y, z)
    for origin, size in _windows(SHAPE, 20, seed=7):
        padded = np.zeros(tuple(s + 200 for s in SHAPE), dtype=np.uint8)
        padded[100 : 100 + SHAPE[0], 100 : 100 + SHAPE[1], 100 : 100 + SHAPE[2]] = label
        lo = [o + 100 for o in origin]
        want = padded[lo[0] : lo[0] + size[0], lo[1] : lo[1] + size[1], lo[2] : lo[2] + size[2]]
        assert reader.read(origin, size).tobytes() == want.tobytes()


def test_damaged_index_is_reported(tmp_path: Path) -> None:
    root = _case(tmp_path)
    shard = root / "c1" / ARRAY_PATHS["image"] / "c" / "0" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # inside the index, before its crc32c
    shard.write_bytes(bytes(raw))
    reader = open_case_reader(root, "c1", "image")
    assert reader is not None
    with pytest.raises(OSError, match="index checksum mismatch"):
        reader.read((0, 0, 0), (4, 4, 4))


@pytest.mark.parametrize("cache_mb", [0.0, 64.0])
def test_patch_dataset_reads_are_read_patch_bytes(tmp_path: Path, cache_mb: float) -> None:
    root = _case(tmp_path)
    (case,) = index_cases(root, ["c1"], seed=0)
    dataset = PatchDataset([case], patch_size=(16, 16, 16), batch_size=2, seed=0, length=4, cache_mb=cache_mb)
    for origin, size in _windows(SHAPE, 30, seed=9):
        image, label = dataset.read_region(case, (origin[0], origin[1], origin[2]), (size[0], size[1], size[2]))
        want_image, want_label = read_patch(root, "c1", (origin[0], origin[1], origin[2]), (size[0], size[1], size[2]))
        assert want_label is not None
        assert image.tobytes() == want_image.astype(np.float32).tobytes()
        assert label.tobytes() == want_label.tobytes()
    assert isinstance(getattr(dataset._array(case, "image"), "stored", None), ShardReader)
