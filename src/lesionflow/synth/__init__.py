"""Lesion-synthesis data side: lesion / candidate ROIs, histogram texture control, sphere placement.

Pure numpy functions plus thin Zarr-store readers (generative.md §2.3, §2.7–2.9, §9.2). Axis order (x, y, z),
units voxels; images (c, x, y, z). Every random draw takes an explicit generator (:mod:`lesionflow.seeding`).
"""

from lesionflow.synth.histograms import (
    HistogramBank,
    HistogramDraw,
    concatenated_histograms,
    kmeans,
    lesion_histogram,
    perturb_histogram,
    validate_histogram,
)
from lesionflow.synth.placement import (
    Placement,
    Sphere,
    bounding_sphere,
    merge_class_channels,
    merge_label_masks,
    radii_pool,
    sample_spheres,
    sphere_channel,
    sphere_mask,
)
from lesionflow.synth.rois import (
    Component,
    Roi,
    RoiSet,
    RoiSpec,
    candidate_centres,
    candidate_rois,
    crop,
    extract_rois,
    lesion_components,
    lesion_rois,
)

__all__ = [
    "Component",
    "HistogramBank",
    "HistogramDraw",
    "Placement",
    "Roi",
    "RoiSet",
    "RoiSpec",
    "Sphere",
    "bounding_sphere",
    "candidate_centres",
    "candidate_rois",
    "concatenated_histograms",
    "crop",
    "extract_rois",
    "kmeans",
    "lesion_components",
    "lesion_histogram",
    "lesion_rois",
    "merge_class_channels",
    "merge_label_masks",
    "perturb_histogram",
    "radii_pool",
    "sample_spheres",
    "sphere_channel",
    "sphere_mask",
    "validate_histogram",
]
