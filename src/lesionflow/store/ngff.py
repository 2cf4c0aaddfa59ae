"""OME-NGFF 0.5 metadata for the stores (https://ngff.openmicroscopy.org/0.5/): pure builders of JSON-able dicts.

Axis contract: NGFF orders axes time, channel, then space, and viewers expect space as ``z, y, x``; so every array
is stored with its spatial axes reversed from the code's ``(x, y, z)`` RAS voxel order (the store module swaps on
write and read). Spatial units are millimetres. NGFF 0.5 has scale and translation only: for an axis-aligned affine
(every stored case, after preprocess reorients to RAS) they are exact; the full 4x4 affine stays in the case's own
attributes (``affine``, indexed (x, y, z)) for oblique scans.

A store root lists its images with the one NGFF 0.5 collection layout, ``bioformats2raw.layout`` 3: the root says
so, and its ``OME`` group's ``series`` names every image group (ngff 0.5 §"bioformats2raw.layout").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lesionflow.io.layout import present_values
from lesionflow.store.pyramid import level_transform

NGFF_VERSION = "0.5"
COLLECTION_GROUP = "OME"  # reserved by the bioformats2raw layout: no image may take this name
# Display colours (RGBA) for label values, cycled; NGFF says image-label SHOULD list "colors".
_PALETTE = ((255, 0, 0), (0, 200, 0), (0, 90, 255), (255, 200, 0), (200, 0, 255), (0, 220, 220), (255, 120, 0))


def axes(names: Sequence[str]) -> list[dict[str, str]]:
    """NGFF axes: ``t`` time (a step index, no unit), ``c`` channel, anything else space in millimetres."""
    kinds = {"t": {"type": "time"}, "c": {"type": "channel"}}
    return [{"name": n, **kinds.get(n, {"type": "space", "unit": "millimeter"})} for n in names]


def zyx(values: Sequence[float]) -> list[float]:
    """An (x, y, z) triple in the stored (z, y, x) order."""
    return [float(v) for v in reversed(list(values))]


def multiscales(
    name: str,
    names: Sequence[str],
    paths: Sequence[str],
    attrs: Mapping[str, Any],
    factors: Sequence[Sequence[int]],
) -> list[dict[str, Any]]:
    """One multiscale image: ``paths[k]`` is level k, whose voxel is ``factors[k]`` (cumulative, spatial axes in
    ``names`` order) level-0 voxels. ``attrs`` holds ``spacing`` (x, y, z mm) and optionally ``affine`` (4x4, indexed
    (x, y, z)): scale = spacing, translation = the world position of voxel (0, 0, 0), both in stored order."""
    spatial = [n for n in names if n not in ("t", "c")]
    if spatial != ["z", "y", "x"]:
        raise ValueError(f"NGFF arrays here end with spatial axes z, y, x; got {list(names)}")
    lead = [1.0] * (len(names) - 3)  # time and channel are not scaled
    spacing = zyx(attrs["spacing"])
    affine = attrs.get("affine")
    origin = [0.0] * 3 if affine is None else zyx(np.asarray(affine, dtype=float)[:3, 3].tolist())
    datasets = []
    for path, factor in zip(paths, factors, strict=True):
        scale, translation = level_transform(spacing, origin, factor)
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": lead + scale}]
        if affine is not None or any(f > 1 for f in factor):
            transforms.append({"type": "translation", "translation": [0.0] * len(lead) + translation})
        datasets.append({"path": path, "coordinateTransformations": transforms})
    return [{"name": name, "axes": axes(names), "datasets": datasets}]


def label_colors(label: np.ndarray) -> list[dict[str, Any]]:
    """One colour entry per non-zero value present in ``label`` (any shape, non-negative integers), sorted."""
    values = present_values(label)
    return [{"label-value": int(v), "rgba": [*_PALETTE[(int(v) - 1) % len(_PALETTE)], 255]} for v in values if v]


def image_label(colors: list[dict[str, Any]], multiscale: list[dict[str, Any]]) -> dict[str, Any]:
    """``ome`` attributes of a label image under ``<image>/labels/<name>``."""
    return {
        "version": NGFF_VERSION,
        "image-label": {"colors": colors, "source": {"image": "../../"}},
        "multiscales": multiscale,
    }


def collection_root() -> dict[str, Any]:
    """``ome`` attributes of a store root: a collection of images (bioformats2raw layout 3)."""
    return {"version": NGFF_VERSION, "bioformats2raw.layout": 3}


def collection_series(images: Sequence[str]) -> dict[str, Any]:
    """``ome`` attributes of the root's ``OME`` group: the image groups of the collection, in order."""
    return {"version": NGFF_VERSION, "series": list(images)}
