"""The stores as OME-Zarr 0.5 for viewers: z, y, x axes whose transforms reproduce the affine at every pyramid level,
a root that lists its images, trajectories with a time axis; checked by ome-zarr-models and read by ome-zarr-py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from lesionflow.store.pyramid import level_factors
from lesionflow.store.zarr_store import (
    CaseArrays,
    index_collection,
    list_cases,
    on_disk,
    read_case,
    write_case,
)
from lesionflow.synth.trajectory_store import crop_affine, index_trajectories, read_trajectory, write_trajectory

ome_io = pytest.importorskip("ome_zarr.io")
ome_reader = pytest.importorskip("ome_zarr.reader")
ome_axes = pytest.importorskip("ome_zarr.axes")
ome_format = pytest.importorskip("ome_zarr.format")
v05_image = pytest.importorskip("ome_zarr_models.v05.image")
v05_collection = pytest.importorskip("ome_zarr_models.v05.bioformats2raw")

SHAPE = (70, 50, 12)  # (x, y, z): x and y are halved twice, the 12 slices never (thinner than 16)
SPACING = (0.8, 0.7, 2.5)
ORIGIN = (-12.5, 30.0, 4.25)


def _case(seed: int) -> tuple[CaseArrays, dict[str, Any]]:
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(2, *SHAPE)).astype(np.float32)
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[10:14, 20:23, 5:7] = 1
    label[41, 7, 3] = 2  # one voxel: the block maximum keeps it at every level
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = ORIGIN
    return CaseArrays(image=image, label=label), {"spacing": list(SPACING), "affine": affine}


def _world(transforms: list[dict[str, Any]], index: np.ndarray) -> np.ndarray:
    """World coordinates of an array index under NGFF scale then translation."""
    scale = np.asarray(transforms[0]["scale"], dtype=float)
    translation = np.asarray(transforms[1]["translation"], dtype=float) if len(transforms) > 1 else 0.0
    return index * scale + translation


def test_ome_zarr_py_reads_the_pyramid_and_every_level_lands_on_the_affine(tmp_path: Path) -> None:
    arrays, attrs = _case(11)
    write_case(tmp_path / "s.zarr", "case_001", arrays, attrs, chunk_shape=(16, 16, 16))
    location = ome_io.parse_url(tmp_path / "s.zarr" / "case_001")
    assert location is not None
    assert location.version == "0.5"
    nodes = list(ome_reader.Reader(location)())
    image_node = nodes[0]
    assert image_node.load(ome_reader.Multiscales) is not None
    meta = image_node.metadata
    assert [a["name"] for a in meta["axes"]] == ["c", "z", "y", "x"]
    assert [a.get("type") for a in meta["axes"]] == ["channel", "space", "space", "space"]
    ome_axes.Axes(meta["axes"], fmt=ome_format.FormatV05()).validate()  # the reader skips it for 0.5

    levels = [level.compute() for level in image_node.data]
    assert [lv.shape for lv in levels] == [(2, 12, 50, 70), (2, 12, 25, 35), (2, 12, 13, 18)]
    assert np.array_equal(levels[0], on_disk(arrays.image))
    factors = np.cumprod(np.asarray(level_factors((12, 50, 70))), axis=0)  # (z, y, x) per level
    label_node = next(n for n in nodes if n.load(ome_reader.Label) is not None and n.metadata["name"] == "label")
    label_levels = [level.compute() for level in label_node.data]
    assert np.array_equal(label_levels[0], on_disk(arrays.label))
    rng = np.random.default_rng(0)
    for k, (level, factor) in enumerate(zip(levels, factors, strict=True)):
        transforms = meta["coordinateTransformations"][k]
        for mine, label_transform in zip(transforms, label_node.metadata["coordinateTransformations"][k], strict=True):
            kind = mine["type"]
            assert mine[kind][1:] == label_transform[kind]  # the labels overlay their image (no channel axis)
        for _ in range(20):
            idx = np.asarray([int(rng.integers(n)) for n in level.shape[1:]])  # (z, y, x) at level k
            lo = idx * factor
            block = tuple(slice(a, min(a + f, n)) for a, f, n in zip(lo, factor, SHAPE[::-1], strict=True))
            # the voxel is the mean of its block of level-0 voxels, and sits at the block's centre in the world
            # that the case's own affine (indexed x, y, z) gives
            want = on_disk(arrays.image)[(slice(None), *block)].mean(axis=(1, 2, 3))
            np.testing.assert_allclose(level[(slice(None), *idx)], want, rtol=1e-5, atol=1e-6)
            centre_xyz = ((lo + (factor - 1) / 2.0)[::-1]).tolist()
            want_world = (attrs["affine"] @ np.asarray([*centre_xyz, 1.0]))[:3]
            got_world = _world(transforms, np.asarray([0, *idx], dtype=float))[1:]
            np.testing.assert_allclose(got_world[::-1], want_world, atol=1e-9)
            assert label_levels[k][tuple(idx)] == on_disk(arrays.label)[block].max()
    assert label_levels[2].max() == 2  # the one-voxel lesion is still drawn at the coarsest level


def test_ome_zarr_models_validates_cases_and_the_root_lists_them(tmp_path: Path) -> None:
    root = tmp_path / "s.zarr"
    for i, case_id in enumerate(["case_b", "case_a"]):
        arrays, attrs = _case(i)
        write_case(root, case_id, arrays, attrs, chunk_shape=(16, 16, 16))
    index_collection(root, list_cases(root))
    group = zarr.open_group(str(root), mode="r")
    collection = v05_collection.BioFormats2Raw.from_zarr(group)
    assert collection.attributes.ome.bioformats2raw_layout == 3
    series = zarr.open_group(str(root / "OME"), mode="r").attrs["ome"]["series"]
    assert series == ["case_a", "case_b"] == list_cases(root)  # the OME group is not a case
    for case_id in series:
        image = v05_image.Image.from_zarr(group[case_id])
        assert [d.path for d in image.attributes.ome.multiscales[0].datasets] == ["0", "1", "2"]
        assert image.labels is not None
        assert list(image.labels.attributes.ome.labels) == ["label"]
        back = read_case(root, case_id)
        assert back.image.flags.c_contiguous
        assert back.image.shape == (2, *SHAPE)
    with pytest.raises(ValueError, match="reserved"):
        write_case(root, "OME", *_case(3), chunk_shape=(16, 16, 16))


def test_trajectories_are_ome_images_with_a_time_axis(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    frames = rng.normal(size=(4, 1, 9, 7, 5)).astype(np.float32)  # (t, c, x, y, z)
    masks = (rng.random((4, 9, 7, 5)) > 0.7).astype(np.uint8)
    roi = rng.random((9, 7, 5)) > 0.5
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = ORIGIN
    attrs = {"spacing": list(SPACING), "affine": crop_affine(affine, (3, 2, 1)), "seed": 7}
    root = tmp_path / "progression.zarr"
    write_trajectory(root, "traj_a", frames, masks, roi, attrs)
    index_trajectories(root)

    back = read_trajectory(root, "traj_a")  # the code's order, as written
    assert np.array_equal(back.frames, frames)
    assert np.array_equal(back.masks, masks)
    assert np.array_equal(back.roi, roi)
    assert back.attrs["seed"] == 7
    assert "ome" not in back.attrs

    group = zarr.open_group(str(root), mode="r")
    assert zarr.open_group(str(root / "OME"), mode="r").attrs["ome"]["series"] == ["traj_a"]
    image = v05_image.Image.from_zarr(group["traj_a"])
    assert [a.name for a in image.attributes.ome.multiscales[0].axes] == ["t", "c", "z", "y", "x"]
    location = ome_io.parse_url(root / "traj_a")
    assert location is not None
    nodes = list(ome_reader.Reader(location)())
    ome_axes.Axes(nodes[0].metadata["axes"], fmt=ome_format.FormatV05()).validate()
    assert np.array_equal(nodes[0].data[0].compute(), on_disk(frames))
    (mask_node,) = [n for n in nodes if n.load(ome_reader.Label) is not None]
    assert np.array_equal(mask_node.data[0].compute(), on_disk(masks))
    transforms = nodes[0].metadata["coordinateTransformations"][0]
    # voxel (x, y, z) = (0, 0, 0) of the crop is voxel (3, 2, 1) of the source case
    want = (affine @ np.asarray([3.0, 2.0, 1.0, 1.0]))[:3]
    np.testing.assert_allclose(_world(transforms, np.zeros(5))[2:][::-1], want)
