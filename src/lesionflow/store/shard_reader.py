"""Fast window reads from sharded Zarr v3 arrays: the shard index read once, only the touched chunks decoded.

zarr-python spends 0.6-3.7 ms per inner chunk on its generic async codec pipeline, and a 96^3 training patch touches
about 15 chunks of 64^3 (docs/benchmarks.md, "Random patch reads"). :class:`ShardReader` reads the same files
directly: it parses the array's ``zarr.json`` (Zarr v3 spec, ``sharding_indexed`` codec), keeps one file descriptor
and the decoded shard index per shard, and per window ``pread``s + decodes only the inner chunks the window touches,
with the codec the store declares (numcodecs' zstd / blosc / gzip), and copies them into the output with numpy.

The store stays a plain Zarr v3 / OME-Zarr written by zarr-python; nothing here writes. A layout this reader does
not handle exactly (no sharding, a transpose codec, big-endian or extension dtypes, an unknown codec, a
non-``default`` chunk key encoding) is reported by :func:`parse_layout` as ``None`` with the reason, and
``lesionflow.store.zarr_store.open_case_reader`` then falls back to zarr-python, so callers never get different
voxels, only a slower read. tests/store/test_shard_reader.py checks bit-identity against zarr-python.

A reader holds open file descriptors and one decode buffer: keep one per array per process (a forked DataLoader
worker opens its own), use it from one thread, and :meth:`ShardReader.close` it when done.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import mmap
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import google_crc32c
import numcodecs.blosc
import numcodecs.gzip
import numcodecs.zstd
import numpy as np

# numcodecs' decoders read the frame header, so the codec's configuration (level, shuffle, typesize) is not needed
# to decode. Each maps (stored bytes, destination buffer or None) to the decoded bytes. Decoding into one reused
# buffer per reader avoids a fresh 1 MiB allocation per 64^3 float32 chunk, whose page faults cost up to as much as
# the decode itself (measured on this project's machine).
_GZIP = numcodecs.gzip.GZip()
_DECODERS: dict[str, Callable[[Any, Any], Any]] = {
    "zstd": numcodecs.zstd.decompress,
    "blosc": numcodecs.blosc.decompress,
    "gzip": lambda data, out: _GZIP.decode(data, out=out),
}
_EMPTY = 2**64 - 1  # offset and nbytes of an inner chunk that is not stored (all fill value)

ShardIndex = dict[tuple[int, ...], tuple[int, int]]  # inner chunk coords in the shard -> (offset, nbytes), stored only


class WindowReader(Protocol):
    """What the training loader needs from one stored array: its shape and dtype, and zero-padded windows."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype[Any]: ...

    def read(self, origin: Sequence[int], size: Sequence[int]) -> np.ndarray: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ShardLayout:
    """The parts of a sharded array's ``zarr.json`` that locate and decode one inner chunk.

    ``shard_shape``: the outer chunk (one file); ``chunk_shape``: the inner chunk (one compressed block);
    ``codecs``: the bytes-to-bytes codec names after ``bytes``, in encode order (decoded in reverse).
    """

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fill_value: bool | int | float
    shard_shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    codecs: tuple[str, ...]
    separator: str
    index_at_end: bool
    index_crc32c: bool

    @property
    def chunks_per_shard(self) -> tuple[int, ...]:
        return tuple(s // c for s, c in zip(self.shard_shape, self.chunk_shape, strict=True))

    def shard_key(self, shard: Sequence[int]) -> str:
        """Path of shard ``shard`` relative to the array folder (``default`` chunk key encoding)."""
        return self.separator.join(["c", *(str(i) for i in shard)])


def _little_endian_bytes(codec: Mapping[str, Any], dtype: np.dtype[Any]) -> bool:
    endian = (codec.get("configuration") or {}).get("endian")
    return codec.get("name") == "bytes" and (endian == "little" or (endian is None and dtype.itemsize == 1))


def _index_codecs_ok(index: Sequence[Mapping[str, Any]]) -> bool:
    if not index or len(index) > 2 or not _little_endian_bytes(index[0], np.dtype("uint64")):
        return False
    return len(index) == 1 or index[1].get("name") == "crc32c"


def parse_layout(meta: Mapping[str, Any]) -> tuple[ShardLayout | None, str]:
    """(layout, "") for an array ``zarr.json`` this reader decodes exactly, else (None, why not)."""
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        return None, "not a Zarr v3 array"
    if meta.get("storage_transformers"):
        return None, "storage transformers"
    try:
        dtype = np.dtype(str(meta["data_type"]))
    except TypeError:
        return None, f"data type {meta.get('data_type')!r}"
    if dtype.kind not in "biuf":
        return None, f"data type {dtype}"
    fill = meta.get("fill_value")
    if not isinstance(fill, (bool, int, float)):  # "NaN", "Infinity", hex floats: left to zarr-python
        return None, f"fill value {fill!r}"
    grid, keys = meta.get("chunk_grid", {}), meta.get("chunk_key_encoding", {})
    if grid.get("name") != "regular" or keys.get("name") != "default":
        return None, "not a regular grid with default chunk keys"
    codecs = meta.get("codecs", [])
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return None, "not sharded (or codecs around the sharding codec)"
    config = codecs[0]["configuration"]
    inner, index = config["codecs"], config.get("index_codecs", [])
    if not inner or not _little_endian_bytes(inner[0], dtype):
        return None, "inner chunks do not start with a little-endian bytes codec (transpose or big-endian)"
    names = tuple(str(c.get("name")) for c in inner[1:])
    if any(n not in _DECODERS for n in names):
        return None, f"inner codecs {names}"
    if not _index_codecs_ok(index):
        return None, "shard index codecs"
    shard_shape = tuple(int(s) for s in grid["configuration"]["chunk_shape"])
    chunk_shape = tuple(int(s) for s in config["chunk_shape"])
    shape = tuple(int(s) for s in meta["shape"])
    if len({len(shape), len(shard_shape), len(chunk_shape)}) != 1:
        return None, "rank mismatch"
    if any(s % c for s, c in zip(shard_shape, chunk_shape, strict=True)):
        return None, "shard shape is not a multiple of the inner chunk shape"
    layout = ShardLayout(
        shape=shape,
        dtype=dtype,
        fill_value=fill,
        shard_shape=shard_shape,
        chunk_shape=chunk_shape,
        codecs=names,
        separator=str((keys.get("configuration") or {}).get("separator", "/")),
        index_at_end=config.get("index_location", "end") == "end",
        index_crc32c=len(index) == 2,
    )
    return layout, ""


class ShardReader:
    """Windows of one sharded array on the local filesystem, read with the shard index kept in memory.

    Each shard file is mapped read-only once: a compressed chunk is decoded straight from the mapping (no read
    copy), an uncompressed one is a view, so a window copies only its own voxels out of the page cache.
    """

    def __init__(self, path: Path, layout: ShardLayout) -> None:
        self.path = Path(path)
        self.layout = layout
        # shard coords -> (mapping, index), or None for a shard with no file (all fill value). The index holds plain
        # ints: numpy scalar indexing per chunk would cost more than reading the chunk.
        self._shards: dict[tuple[int, ...], tuple[mmap.mmap, ShardIndex] | None] = {}
        self._buffer = np.empty(int(np.prod(layout.chunk_shape)) * layout.dtype.itemsize, dtype=np.uint8)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.layout.dtype

    def close(self) -> None:
        for entry in getattr(self, "_shards", {}).values():  # getattr: __del__ after a failed __init__
            if entry is not None:
                with contextlib.suppress(BufferError):  # a caller still holds a view: unmapped when it is freed
                    entry[0].close()
        self._shards = {}

    def __del__(self) -> None:  # a reader dropped without close() unmaps its shards now
        self.close()

    def _shard(self, coords: tuple[int, ...]) -> tuple[mmap.mmap, ShardIndex] | None:
        if coords in self._shards:
            return self._shards[coords]
        file = self.path / self.layout.shard_key(coords)
        try:
            fd = os.open(file, os.O_RDONLY)
        except FileNotFoundError:
            self._shards[coords] = None  # zarr-python stores no file for an all-fill shard
            return None
        try:
            size = os.fstat(fd).st_size
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else None
        finally:
            os.close(fd)  # the mapping keeps the file; no descriptor stays open
        if mapped is None:
            raise OSError(f"shard {file}: empty file; rerun preprocess")
        try:
            index = self._read_index(mapped, file)
        except BaseException:
            mapped.close()
            raise
        self._shards[coords] = (mapped, index)
        return self._shards[coords]

    def _read_index(self, mapped: mmap.mmap, file: Path) -> ShardIndex:
        cps = self.layout.chunks_per_shard
        nbytes = 16 * int(np.prod(cps)) + (4 if self.layout.index_crc32c else 0)
        size = len(mapped)
        if size < nbytes:
            raise OSError(f"shard {file}: {size} bytes, too short for its {nbytes}-byte index; rerun preprocess")
        start = size - nbytes if self.layout.index_at_end else 0
        raw = mapped[start : start + nbytes]
        if self.layout.index_crc32c:
            raw, crc = raw[:-4], raw[-4:]
            if google_crc32c.value(raw).to_bytes(4, "little") != crc:
                raise OSError(f"shard {file}: index checksum mismatch (damaged file); rerun preprocess")
        entries = np.frombuffer(raw, dtype="<u8").reshape(-1, 2).tolist()
        coords = itertools.product(*(range(n) for n in cps))  # the index lists the inner chunks in C order
        index = {c: (o, n) for c, (o, n) in zip(coords, entries, strict=True) if (o, n) != (_EMPTY, _EMPTY)}
        if any(o + n > size for o, n in index.values()):
            raise OSError(f"shard {file}: its index points past the end of the file (cut short); rerun preprocess")
        return index

    def _chunk(self, coords: tuple[int, ...]) -> np.ndarray | None:
        """Inner chunk ``coords`` (chunk-grid coordinates): a view of the mapping (uncompressed) or decoded into the
        reader's buffer; valid until the next call. None when it is not stored (all fill value)."""
        layout = self.layout
        cps = layout.chunks_per_shard
        shard = self._shard(tuple(c // n for c, n in zip(coords, cps, strict=True)))
        if shard is None:
            return None
        mapped, index = shard
        entry = index.get(tuple(c % n for c, n in zip(coords, cps, strict=True)))
        if entry is None:
            return None
        offset, nbytes = entry
        data: Any = memoryview(mapped)[offset : offset + nbytes]
        last = len(layout.codecs) - 1
        for i, name in enumerate(reversed(layout.codecs)):
            # only the last decode yields the raw array bytes (the buffer's size); earlier ones allocate
            data = _DECODERS[name](data, self._buffer if i == last else None)
        if len(data) != self._buffer.size:
            raise OSError(f"{self.path}: inner chunk {coords} holds {len(data)} bytes, not {self._buffer.size}")
        return np.frombuffer(data, dtype=layout.dtype.newbyteorder("<")).reshape(layout.chunk_shape)

    def read(self, origin: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """``arr[..., o:o+s]`` over the last ``len(origin)`` axes (all of each leading axis), zero outside the array.

        The same contract and bytes as ``lesionflow.store.zarr_store._read_window`` on this array.
        """
        shape, chunk = self.layout.shape, self.layout.chunk_shape
        lead = len(shape) - len(origin)
        out = np.zeros((*shape[:lead], *size), dtype=self.layout.dtype)
        lo, hi = [0] * lead, list(shape[:lead])
        for o, s, n in zip(origin, size, shape[lead:], strict=True):
            lo.append(max(o, 0))
            hi.append(min(o + s, n))
        if any(h <= low for low, h in zip(lo, hi, strict=True)):
            return out  # the window misses the array entirely
        shift = [0] * lead + list(origin)  # output coordinate = array coordinate - shift
        if self.layout.fill_value != 0:
            out[tuple(slice(a - d, b - d) for a, b, d in zip(lo, hi, shift, strict=True))] = self.layout.fill_value
        ranges = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(lo, hi, chunk, strict=True)]
        for coords in itertools.product(*ranges):
            data = self._chunk(coords)
            if data is None:
                continue  # out already holds the fill value there
            start = [i * c for i, c in zip(coords, chunk, strict=True)]
            a = [max(low, s) for low, s in zip(lo, start, strict=True)]
            b = [min(h, s + c) for h, s, c in zip(hi, start, chunk, strict=True)]
            src = tuple(slice(x - s, y - s) for x, y, s in zip(a, b, start, strict=True))
            dst = tuple(slice(x - d, y - d) for x, y, d in zip(a, b, shift, strict=True))
            out[dst] = data[src]
        return out


def open_shard_reader(path: Path) -> tuple[ShardReader | None, str]:
    """(reader, "") for the local array folder ``path`` when :func:`parse_layout` accepts it, else (None, why not)."""
    layout, why = parse_layout(json.loads((Path(path) / "zarr.json").read_bytes()))
    return (None, why) if layout is None else (ShardReader(Path(path), layout), "")
