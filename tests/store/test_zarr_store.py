"""Zarr v3 case store: round trip, sharding layout, determinism, atomicity, patches, NGFF readers, dask."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lesionflow.store import zarr_store as zs
from lesionflow.store.zarr_store import (
    CaseArrays,
    case_digest,
    clean_temp,
    list_cases,
    open_case_array,
    open_store,
    read_case,
    read_case_attrs,
    read_patch,
    store_digest,
    write_case,
)

SHAPE = (20, 18, 16)
CHUNK = (8, 8, 8)
SPACING = (0.8, 0.7, 2.5)


def _case(seed: int = 0, *, organ: bool = True, label: bool = True) -> tuple[CaseArrays, dict[str, Any]]:
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(1, *SHAPE)).astype(np.float32)
    lab = (rng.random(SHAPE) > 0.8).astype(np.uint8)
    org = rng.integers(0, 4, SHAPE, dtype=np.uint8)
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = [-12.5, 30.0, 4.25]
    attrs = {
        "spacing": np.asarray(SPACING),
        "affine": affine,
        "origin": (12.5, -30.0, 4.25),
        "direction": np.eye(3).ravel(),
        "source_sha256": "ab" * 32,
        "plan_hash": "p1",
        "crop_bbox": [[0, 20], [0, 18], [0, 16]],
        "n_voxels": np.int64(np.prod(SHAPE)),
    }
    return CaseArrays(image=image, label=lab if label else None, organ=org if organ else None), attrs


def _req(array: np.ndarray | None) -> np.ndarray:
    assert array is not None
    return array


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_open_store_creates_root(tmp_path: Path) -> None:
    group = open_store(tmp_path / "s.zarr")
    assert group.metadata.zarr_format == 3
    assert (tmp_path / "s.zarr" / "zarr.json").is_file()
    assert list_cases(tmp_path / "s.zarr") == []
    assert clean_temp(tmp_path / "s.zarr") == []  # open_store leaves no temp folder behind


def test_round_trip_attrs_and_layout(tmp_path: Path) -> None:
    root = tmp_path / "s.zarr"
    arrays, attrs = _case()
    digest = write_case(root, "case_001", arrays, attrs, chunk_shape=CHUNK)
    assert digest == case_digest(root, "case_001")
    assert list_cases(root) == ["case_001"]

    back = read_case(root, "case_001")
    assert back.image.dtype == np.float32
    assert np.array_equal(back.image, arrays.image)
    assert back.label is not None
    assert back.label.dtype == np.uint8
    assert np.array_equal(back.label, _req(arrays.label))
    assert back.organ is not None
    assert np.array_equal(back.organ, _req(arrays.organ))

    got = read_case_attrs(root, "case_001")
    assert got == {
        "affine": attrs["affine"].tolist(),
        "crop_bbox": [[0, 20], [0, 18], [0, 16]],
        "direction": np.eye(3).ravel().tolist(),
        "n_voxels": int(np.prod(SHAPE)),
        "origin": [12.5, -30.0, 4.25],
        "plan_hash": "p1",
        "source_sha256": "ab" * 32,
        "spacing": list(SPACING),
    }
    ome = read_case_attrs(root, "case_001", include_ome=True)["ome"]
    assert ome["version"] == "0.5"
    (ms,) = ome["multiscales"]
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"]  # the order viewers expect
    assert ms["datasets"] == [  # 20 x 18 x 16 voxels: no edge above 32, so one level
        {
            "path": "0",
            "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, *SPACING[::-1]]},
                {"type": "translation", "translation": [0.0, 4.25, 30.0, -12.5]},
            ],
        }
    ]

    # One shard per row of inner chunks along x (the last stored axis), one chunk thick in z and y, x rounded up to
    # the inner chunk: 16 slices x 18 rows in chunks of 8 are 2 x 3 shards, so six data files per array.
    # Stored (c, z, y, x): the code's (c, x, y, z) with the spatial axes reversed.
    image = open_case_array(root, "case_001", "image")
    assert image is not None
    assert image.shape == (1, *SHAPE[::-1])
    assert np.array_equal(image[...], zs.on_disk(arrays.image))
    assert image.chunks == (1, 8, 8, 8)
    assert image.shards == (1, 8, 8, 24)
    assert getattr(image.metadata, "dimension_names", None) == ("c", "z", "y", "x")
    for name in ("label", "organ"):
        arr = open_case_array(root, "case_001", name)
        assert arr is not None
        assert arr.chunks == (8, 8, 8)
        assert arr.shards == (8, 8, 24)
        assert arr.dtype == np.uint8
        assert getattr(arr.metadata, "dimension_names", None) == ("z", "y", "x")
    case_dir = root / "case_001"
    for path in ("0", "labels/label/0", "labels/organ/0"):
        data_files = [p for p in (case_dir / path / "c").rglob("*") if p.is_file()]
        shards = sorted(f.relative_to(case_dir / path / "c").parts[-3:-1] for f in data_files)
        assert shards == [(z, y) for z in "01" for y in "012"], (path, data_files)


def test_chunk_larger_than_volume_is_clipped(tmp_path: Path) -> None:
    arrays, attrs = _case(organ=False)
    write_case(tmp_path / "s", "c1", arrays, attrs, chunk_shape=(64, 64, 64))
    image = open_case_array(tmp_path / "s", "c1", "image")
    assert image is not None
    assert image.chunks == (1, *SHAPE[::-1])
    assert image.shards == (1, *SHAPE[::-1])
    assert open_case_array(tmp_path / "s", "c1", "organ") is None
    assert read_case(tmp_path / "s", "c1").organ is None


def test_float16_option(tmp_path: Path) -> None:
    arrays, attrs = _case()
    write_case(tmp_path / "s", "c1", arrays, attrs, chunk_shape=CHUNK, image_dtype="float16")
    back = read_case(tmp_path / "s", "c1")
    assert back.image.dtype == np.float16
    assert np.array_equal(back.image, arrays.image.astype(np.float16))
    too_big = CaseArrays(image=np.full((1, 4, 4, 4), 1e6, np.float32), label=None)
    with pytest.raises(ValueError, match="non-finite"):
        write_case(tmp_path / "s", "c2", too_big, attrs, chunk_shape=CHUNK, image_dtype="float16")
    assert list_cases(tmp_path / "s") == ["c1"]


@pytest.mark.parametrize(
    ("case_id", "attrs_extra"),
    [("../x", {}), (".tmp-x", {}), ("labels", {}), ("ok", {"ome": {}}), ("ok", {"bad": float("nan")})],
)
def test_rejects_bad_ids_and_attrs(tmp_path: Path, case_id: str, attrs_extra: dict[str, Any]) -> None:
    arrays, attrs = _case()
    with pytest.raises(ValueError, match=r"invalid case id|reserved|non-finite"):
        write_case(tmp_path / "s", case_id, arrays, {**attrs, **attrs_extra}, chunk_shape=CHUNK)
    assert list_cases(tmp_path / "s") == []
    assert clean_temp(tmp_path / "s") == []


def test_determinism_byte_identical(tmp_path: Path) -> None:
    arrays, attrs = _case(3)
    # Same content, attrs given in another key order: the files must still be byte-identical.
    reordered = dict(reversed(list(attrs.items())))
    d1 = write_case(tmp_path / "a.zarr", "case_x", arrays, attrs, chunk_shape=CHUNK)
    d2 = write_case(tmp_path / "b.zarr", "case_x", arrays, reordered, chunk_shape=CHUNK)
    files_a, files_b = _files(tmp_path / "a.zarr"), _files(tmp_path / "b.zarr")
    assert files_a.keys() == files_b.keys()
    assert "case_x/zarr.json" in files_a
    assert "zarr.json" in files_a
    assert all(files_a[k] == files_b[k] for k in files_a)
    assert d1 == d2
    assert store_digest(tmp_path / "a.zarr") == store_digest(tmp_path / "b.zarr")
    # Rewriting in place gives the same bytes again.
    assert write_case(tmp_path / "a.zarr", "case_x", arrays, attrs, chunk_shape=CHUNK) == d1


def test_one_voxel_changes_only_that_case(tmp_path: Path) -> None:
    root = tmp_path / "s"
    a, attrs_a = _case(1)
    b, attrs_b = _case(2)
    da = write_case(root, "case_a", a, attrs_a, chunk_shape=CHUNK)
    db = write_case(root, "case_b", b, attrs_b, chunk_shape=CHUNK)
    before = store_digest(root)
    image = b.image.copy()
    image[0, 5, 6, 7] += 1.0
    db2 = write_case(root, "case_b", CaseArrays(image, b.label, b.organ), attrs_b, chunk_shape=CHUNK)
    assert db2 != db
    assert case_digest(root, "case_a") == da
    assert store_digest(root) != before
    assert list_cases(root) == ["case_a", "case_b"]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # the .old- folder was deleted


def test_crash_leftovers_are_invisible_and_cleaned(tmp_path: Path) -> None:
    root = tmp_path / "s"
    arrays, attrs = _case()
    digest = write_case(root, "case_a", arrays, attrs, chunk_shape=CHUNK)
    garbage = root / ".tmp-case_a-xx"
    (garbage / "image").mkdir(parents=True)
    (garbage / "image" / "zarr.json").write_text("{not json")
    (root / ".tmp-case_b-yy").mkdir()  # a first write of case_b that crashed
    assert list_cases(root) == ["case_a"]
    assert store_digest(root) == store_digest(root)  # leftovers do not break the digest
    assert clean_temp(root) == [".tmp-case_a-xx", ".tmp-case_b-yy"]
    assert sorted(p.name for p in root.iterdir()) == ["case_a", "zarr.json"]
    assert case_digest(root, "case_a") == digest


def test_failure_midway_keeps_previous_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "s"
    arrays, attrs = _case()
    digest = write_case(root, "case_a", arrays, attrs, chunk_shape=CHUNK)
    files = _files(root)
    real_write_array = zs.write_array
    written: list[str] = []

    def fail_on_label(group: Any, name: str, data: np.ndarray, *args: Any) -> None:
        if group.path.startswith("labels"):  # the image pyramid is complete on disk; the first label write "crashes"
            raise RuntimeError("simulated crash")
        real_write_array(group, name, data, *args)
        written.append(name)

    monkeypatch.setattr(zs, "write_array", fail_on_label)
    new, _ = _case(9)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_case(root, "case_a", new, attrs, chunk_shape=CHUNK)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_case(root, "case_new", new, attrs, chunk_shape=CHUNK)
    assert written == ["0", "0"]  # level 0 of the image, once per attempt
    assert _files(root) == files  # old case untouched, temp folders removed by write_case itself
    assert list_cases(root) == ["case_a"]
    assert case_digest(root, "case_a") == digest


def test_failure_after_old_moved_aside_restores_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "s"
    arrays, attrs = _case()
    digest = write_case(root, "case_a", arrays, attrs, chunk_shape=CHUNK)
    real_rename = os.rename

    def rename(src: Any, dst: Any) -> None:
        if Path(src).name.startswith(".tmp-case_a-"):
            raise OSError("simulated failure publishing the new case")
        real_rename(src, dst)

    monkeypatch.setattr(zs.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        write_case(root, "case_a", _case(5)[0], attrs, chunk_shape=CHUNK)
    monkeypatch.undo()
    assert list_cases(root) == ["case_a"]
    assert case_digest(root, "case_a") == digest
    assert clean_temp(root) == []


def test_clean_temp_repairs_crash_between_renames(tmp_path: Path) -> None:
    root = tmp_path / "s"
    arrays, attrs = _case()
    digest = write_case(root, "case-a", arrays, attrs, chunk_shape=CHUNK)
    # State after a kill between "rename old aside" and "rename new into place": no case folder at all.
    os.rename(root / "case-a", root / ".old-case-a-0123abcd")
    write_case(root, "tmpcopy", _case(4)[0], attrs, chunk_shape=CHUNK)
    os.rename(root / "tmpcopy", root / ".tmp-case-a-4567ef")
    assert list_cases(root) == []
    assert clean_temp(root) == [".old-case-a-0123abcd", ".tmp-case-a-4567ef"]
    assert list_cases(root) == ["case-a"]
    assert case_digest(root, "case-a") == digest
    # An .old- folder whose case exists (crash while deleting it) is simply removed.
    shutil.copytree(root / "case-a", root / ".old-case-a-89")
    assert clean_temp(root) == [".old-case-a-89"]
    assert case_digest(root, "case-a") == digest


@pytest.mark.parametrize(
    ("origin", "size"),
    [
        ((2, 3, 4), (8, 8, 8)),  # inside, crossing chunk borders
        ((8, 8, 8), (8, 8, 8)),  # one aligned inner chunk
        ((-3, 10, 12), (8, 10, 8)),  # leaves the volume on both sides
        ((15, -5, -2), (10, 30, 20)),  # larger than the volume along y
        ((30, 0, 0), (4, 4, 4)),  # entirely outside
    ],
)
def test_read_patch_matches_padded_numpy(tmp_path: Path, origin: tuple[int, int, int], size: tuple[int, ...]) -> None:
    arrays, attrs = _case(7)
    write_case(tmp_path / "s", "c1", arrays, attrs, chunk_shape=CHUNK)
    pad = 40
    img = np.pad(arrays.image, [(0, 0)] + [(pad, pad)] * 3)
    assert arrays.label is not None
    lab = np.pad(arrays.label, [(pad, pad)] * 3)
    sl = tuple(slice(o + pad, o + pad + s) for o, s in zip(origin, size, strict=True))
    image_patch, label_patch = read_patch(tmp_path / "s", "c1", origin, (size[0], size[1], size[2]))
    assert image_patch.shape == (1, *size)
    assert image_patch.dtype == np.float32
    assert np.array_equal(image_patch, img[(slice(None), *sl)])
    assert label_patch is not None
    assert np.array_equal(label_patch, lab[sl])


def test_read_patch_without_label(tmp_path: Path) -> None:
    arrays, attrs = _case(label=False, organ=False)
    write_case(tmp_path / "s", "c1", arrays, attrs, chunk_shape=CHUNK)
    image_patch, label_patch = read_patch(tmp_path / "s", "c1", (0, 0, 0), (4, 4, 4))
    assert label_patch is None
    assert np.array_equal(image_patch, arrays.image[:, :4, :4, :4])
    assert not (tmp_path / "s" / "c1" / "labels").exists()


def _write_one(root: str, case_id: str, seed: int) -> str:
    arrays, attrs = _case(seed)
    return write_case(Path(root), case_id, arrays, attrs, chunk_shape=CHUNK)


def test_dask_parallel_writes_match_sequential(tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    cases = {f"case_{i:03d}": i for i in range(4)}
    sequential = {cid: _write_one(str(tmp_path / "seq.zarr"), cid, seed) for cid, seed in cases.items()}
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        # One task per case: each case (and so each shard) is written by exactly one process.
        futures = {
            cid: client.submit(_write_one, str(tmp_path / "par.zarr"), cid, seed, pure=False)
            for cid, seed in cases.items()
        }
        parallel = {cid: fut.result() for cid, fut in futures.items()}
    assert parallel == sequential
    assert list_cases(tmp_path / "par.zarr") == sorted(cases)
    assert store_digest(tmp_path / "par.zarr") == store_digest(tmp_path / "seq.zarr")
    assert clean_temp(tmp_path / "par.zarr") == []


def test_label_colours_list_every_value_present_across_slabs() -> None:
    from lesionflow.store.ngff import label_colors

    label = np.zeros((256, 256, 80), dtype=np.uint16)  # 5.2 M voxels: many slabs of the counting loop
    label[3, 4, 5], label[-1, -1, -1], label[100, 100, 40] = 2, 300, 7
    assert [c["label-value"] for c in label_colors(label)] == [2, 7, 300]
