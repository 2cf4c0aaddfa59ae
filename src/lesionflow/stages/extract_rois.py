"""Stage extract-rois: lesion-centred and lesion-free ROIs of the training cases -> data/rois/rois.zarr.

Only the training split is read (validation and test cases never reach a generator). Lesions the generators
cannot learn from are reported and skipped, the other cases go on: a lesion larger than the ROI (it would be
cut), a lesion touching the volume border (the scan cuts it; its shape is not a lesion shape), a case whose
organ mask is empty or missing (no lesion-free candidates).

Which label values are lesions comes from ``synth.lesion_labels`` / ``synth.organ_labels``
(:class:`lesionflow.synth.rois.LabelRoles`): only lesion values become lesion ROIs, organ values mark the organ
(the organ mask of a case that has no organ file). Before anything is written the lesions of the training cases
are checked (:class:`lesionflow.synth.rois.LesionCensus`): a lesion value covering more than
``synth.max_lesion_share`` of the volume (organ-sized, e.g. a whole-brain mask) or lesions whose components have a
median below ``synth.min_median_lesion_voxels`` voxels (label specks) stop the stage with one line.
"""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np

from lesionflow.catalog.artifacts import (
    ROIS_STORE,
    ROIS_TABLE,
    STORE,
    summary_artifact,
)
from lesionflow.catalog.readers import load_plan, splits, write_stage_summary
from lesionflow.errors import Finding, SourceError
from lesionflow.files import write_text_if_changed
from lesionflow.hashing import sha256_tree
from lesionflow.params import Params
from lesionflow.stages.base import StageResult
from lesionflow.workspace import Workspace

STAGE = "extract-rois"


def run(ws: Workspace, params: Params) -> StageResult:
    from lesionflow.progress import rich_progress
    from lesionflow.seeding import rng_for
    from lesionflow.store.zarr_store import read_case
    from lesionflow.synth.roi_store import write_roi_set
    from lesionflow.synth.rois import (
        LesionCensus,
        RoiSet,
        candidate_rois,
        label_roles,
        lesion_roi_problem,
        lesion_rois,
    )

    sp = params.synth
    plan = load_plan(ws)
    roles = label_roles(plan.label_values, sp.lesion_labels, sp.organ_labels)
    cases = splits(ws, params).train
    store = STORE.at(ws)
    census = LesionCensus(min_voxels=sp.min_lesion_voxels)
    lesions: list[Any] = []
    candidates: list[Any] = []
    findings: list[Finding] = []
    for case_id in rich_progress(iter(cases), "extract-rois", len(cases)):
        arrays = read_case(store, case_id)
        label = None if arrays.label is None else roles.lesion_map(arrays.label)
        organ = arrays.organ
        if organ is None and arrays.label is not None:
            organ = roles.organ_map(arrays.label)  # None unless synth.organ_labels is set
        if label is not None:
            census.add(label)
            for roi in lesion_rois(
                arrays.image, label, organ, sp.roi_size, min_voxels=sp.min_lesion_voxels, case_id=case_id
            ):
                problem = lesion_roi_problem(roi, arrays.image.shape[1:])
                if problem:
                    findings.append(Finding(case_id, *problem))
                else:
                    lesions.append(roi)
        if sp.candidates_per_case == 0:
            continue
        if organ is None or not np.any(organ):
            what = "has no organ mask" if organ is None else "has an empty organ mask"
            findings.append(
                Finding(
                    case_id,
                    "empty_organ_mask",
                    f"{what}: no lesion-free ROIs and no new lesions from it; check the organ mask of the source",
                )
            )
            continue
        rng = rng_for(params.project.seed, "synth-candidates", case_id)
        found = candidate_rois(arrays.image, label, organ, sp.roi_size, sp.candidates_per_case, rng, case_id=case_id)
        candidates += found
    not_lesions = census.problem(max_share=sp.max_lesion_share, min_median_voxels=sp.min_median_lesion_voxels)
    if not_lesions:
        raise SourceError(not_lesions)
    if not lesions:
        raise SourceError(
            f"no usable lesion ROI in the {len(cases)} training case(s) "
            f"({len(findings)} skipped: {'; '.join(f.line() for f in findings[:3]) or 'no labelled lesions'}); "
            "check synth.roi_size and synth.min_lesion_voxels"
        )
    roi_set = RoiSet(size=sp.roi_size, lesions=tuple(lesions), candidates=tuple(candidates))
    write_roi_set(ROIS_STORE.at(ws), roi_set, plan.n_channels)
    _write_table(ws, roi_set)
    summary = {
        "n_cases": len(cases),
        "n_lesions": len(lesions),
        "n_candidates": len(candidates),
        "n_skipped": len(findings),
        "roi_size": list(sp.roi_size),
        "lesion_labels": list(roles.lesion),
        "organ_labels": list(roles.organ),
        "lesion_voxels_median": float(np.median([r.voxels for r in lesions])),
        "rois_digest": sha256_tree(ROIS_STORE.at(ws)),
    }
    write_stage_summary(ws, STAGE, summary)
    outputs = {"rois": ROIS_STORE.path, "table": ROIS_TABLE.path, "summary": summary_artifact(STAGE).path}
    return StageResult(STAGE, True, summary, outputs, tuple(findings))


def _write_table(ws: Workspace, roi_set: Any) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["kind", "case_id", "index", "origin_x", "origin_y", "origin_z", "radius", "classes", "voxels"])
    for roi in (*roi_set.lesions, *roi_set.candidates):
        radius = "" if roi.sphere is None else f"{roi.sphere.radius:.3f}"
        writer.writerow(
            [roi.kind, roi.case_id, roi.index, *roi.origin, radius, " ".join(map(str, roi.classes)), roi.voxels]
        )
    write_text_if_changed(ROIS_TABLE.at(ws), buf.getvalue())
