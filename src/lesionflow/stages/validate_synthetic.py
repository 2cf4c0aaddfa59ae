"""Stage validate-synthetic: the synthetic quality gate -> data/synthetic/accepted.json + an HTML report.

One table row per generated lesion (``<sample id>#<k>``; ``generated == k + 1`` in the synthetic case marks it):
exact invariants (background bit-exact outside the generated region, masks binary, one component, inside the
organ), texture fidelity (Wasserstein-1 to the condition histogram, or without one to the nearest real training
lesion's histogram), boundary gradient vs real lesions,
memorization (correlation with the nearest training lesion inside the mask) and, when a segmenter is
available (``quality.synthetic.acceptance_model``), the FreeTumor acceptance filter. Dataset statistics: KS
test of new-lesion volumes vs real ones, diversity of lesions sharing a condition, acceptance rate. A sample
with a rejected lesion is left out of accepted.json (the segmenter never trains on it); nothing is deleted.
accepted.json is the verdict for one store content: it records the store digest judged (``store_digest``, taken
before judging) and ``gate: passed``; it is deleted when the stage starts, so a failing gate leaves none, and
``train`` refuses a store without a verdict for its current digest (``catalog.readers.synthetic_verdict``).
A montage of real vs synthetic lesions per class is written for people.

Distribution level (:mod:`lesionflow.quality.synthetic_distribution`): the MMD of encoder features (the
acceptance segmenter's when it is used, else a seeded random-initialised UNet) of the synthetic vs the real
training lesion ROIs over that of two real-train halves, the nearest-neighbour copy rate with a shift/flip search,
and the diversity over seeds of one ROI and condition (relesion samples of one case re-texture the same ROIs:
measurable with ``synth.relesion_per_case >= 2``). The real ROIs are the training ROIs of data/rois; a ROI of a
test-split case there stops the stage.

Pasted lesions (``mask_source`` "paste", the copy-paste baseline) get the exact checks (background, binary mask
with the plan's lesion values, one component, inside the organ), the boundary gradient and the volume KS (their
volumes are the donors'); they have no condition, so their histogram W1 is to the nearest real training lesion
(their donor: 0) and they have no diversity group, and their memorization correlation is not measured (NaN): a
copy of a training lesion is what they are by design.

Never fail open: a statistic that should have been measured but is not finite (empty lesion region, no class
shared with the condition, no real lesion to compare with) is written as NaN with the reason in the row's
``notes``, and the gate rejects the sample; a removal sample's histogram W1 is not applicable
(``histogram_reference`` "none", said in ``notes``). A dataset statistic that is NaN passes only with the reason
it was not measured (``SyntheticStats.not_measured``: too few volumes for the KS test, no condition shared by
two lesions, no segmenter).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lesionflow.catalog.artifacts import (
    PROGRESSION_GATE_REPORT,
    PROGRESSION_STORE,
    ROIS_STORE,
    STORE,
    SYNTHETIC_ACCEPTED,
    SYNTHETIC_GATE_REPORT,
    SYNTHETIC_MANIFEST,
    SYNTHETIC_MONTAGE,
    SYNTHETIC_STORE,
    stage_report_dir,
    summary_artifact,
)
from lesionflow.catalog.readers import (
    acceptance_model,
    judged_store_digest,
    lesion_classes,
    load_plan,
    read_generator_extra,
    read_progression_manifest,
    require,
    write_stage_summary,
    write_synthetic_verdict,
)
from lesionflow.devices import resolve_device
from lesionflow.params import Params
from lesionflow.quality.findings import gate_failed, gate_findings
from lesionflow.quality.synthetic_suite import lesion_row_id, sample_of_row
from lesionflow.stages.base import StageResult
from lesionflow.workspace import Workspace

if TYPE_CHECKING:
    from lesionflow.quality.synthetic_checks import KsResult
    from lesionflow.quality.synthetic_suite import SyntheticStats

STAGE = "validate-synthetic"
#: lesions synthesize placed at a new position (a made mask or a moved real one): mask checks and the volume KS
MADE_MASKS = ("diffmask", "sphere", "paste")


def _ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    from lesionflow.quality.synthetic_checks import normalized_cross_correlation

    return float(normalized_cross_correlation(a, b, mask))


@dataclass(frozen=True)
class _LesionCrop:
    """Lesion ``k`` of a synthetic sample: its volume-wide region and its ROI crops (image (c, *size))."""

    k: int
    lesion: dict[str, Any]
    region: np.ndarray
    image: np.ndarray
    mask: np.ndarray
    label: np.ndarray


def _lesion_crops(sample: dict[str, Any], case: Any, size: tuple[int, int, int]) -> list[_LesionCrop]:
    from lesionflow.synth.rois import crop

    generated = case.generated if case.generated is not None else np.zeros(case.image.shape[1:], np.uint8)
    out = []
    for k, lesion in enumerate(sample["lesions"]):
        region = generated == k + 1  # synthesize writes lesion k as k + 1
        origin = tuple(lesion["origin"])
        label = crop(case.label, origin, size) if case.label is not None else np.zeros(size, np.uint8)
        mask = crop(region.astype(np.uint8), origin, size) > 0
        out.append(_LesionCrop(k, lesion, region, crop(case.image, origin, size), mask, label))
    return out


def _dominant_class(label: np.ndarray, mask: np.ndarray) -> int:
    values = label[mask]
    return int(np.bincount(values).argmax()) if values.size and values.max() > 0 else 0


def _lesion_rows(
    sample: dict[str, Any],
    case: Any,
    source: Any,
    lesions: list[_LesionCrop],
    real: Any,
    params: Params,
    plan_ctx: dict[str, Any],
    predicted: np.ndarray | None,
) -> list[dict[str, Any]]:
    from lesionflow.quality.synthetic_checks import (
        background_max_abs_diff,
        component_count,
        detected_fraction,
        inside_fraction,
    )

    lp = params.synth.lefusion
    classes = plan_ctx["class_values"]
    allowed = set(classes) | {0}
    generated = case.generated if case.generated is not None else np.zeros(case.image.shape[1:], np.uint8)
    background = background_max_abs_diff(source.image, case.image, generated > 0)
    rows = []
    for c in lesions:
        pasted = c.lesion["mask_source"] == "paste"
        made = c.lesion["mask_source"] in MADE_MASKS
        values = set(plan_ctx["lesion_values"]) if pasted else allowed  # a donor keeps its classes, never 0
        notes: list[str] = []
        w1, reference = _texture_w1(c, plan_ctx, lp.bins, notes)
        nn = float("nan")
        if not pasted:
            nn = max((_ncc(c.image[0], r.image[0], c.mask) for r in real.lesions), default=float("nan"))
            if not real.lesions:
                notes.append("nn_similarity not measured: no real training lesion to compare with")
        rows.append(
            {
                "sample_id": lesion_row_id(sample["sample_id"], c.k),
                "kind": sample["kind"],
                "mask_source": c.lesion["mask_source"],
                "cluster": -1 if c.lesion.get("cluster") is None else int(c.lesion["cluster"]),
                "voxels": int(c.region.sum()),
                "background_max_abs_diff": float(background),
                "mask_binary": int(set(np.unique(c.label[c.mask]).tolist()) <= values) if made else 1,
                "components": component_count(c.region) if made else 1,
                "inside_organ": inside_fraction(c.region, source.organ) if made else 1.0,
                "histogram_w1": w1,
                "histogram_reference": reference,
                "boundary_gradient_ratio": _gradient_ratio(case.image[0], c.region, plan_ctx["real_gradient"], notes),
                "nn_similarity": nn,
                "detected_fraction": float("nan") if predicted is None else detected_fraction(predicted, c.region),
                "notes": "; ".join(notes),
            }
        )
    return rows


def _texture_w1(c: _LesionCrop, ctx: dict[str, Any], bins: int, notes: list[str]) -> tuple[float, str]:
    """(histogram W1, what it compares with: "condition" | "real" | "none") of one lesion; NaN with the reason
    appended to ``notes`` when it cannot be measured, never a made-up 0 (a perfect score)."""
    from lesionflow.quality.synthetic_checks import histogram_w1, nearest_histogram_w1
    from lesionflow.synth.histograms import concatenated_histograms, lesion_histogram

    nan = float("nan")
    if c.lesion["mask_source"] == "removal":
        notes.append("histogram_w1 not applicable: a removal sample has no lesion texture to compare")
        return nan, "none"
    reference = "condition" if c.lesion["histogram"] else "real"
    if not c.mask.any():
        notes.append("histogram_w1 is not finite: the lesion region is empty in its ROI crop")
        return nan, reference
    if not np.all(np.isfinite(c.image[0][c.mask])):
        notes.append("histogram_w1 is not finite: the lesion has non-finite intensities")
        return nan, reference
    classes = ctx["class_values"]
    if reference == "condition":
        span = ctx["value_range"]  # the histogram support recorded with the generator
        if len(classes) > 1:
            hist = concatenated_histograms(c.image, np.where(c.mask, c.label, 0), classes, bins, span)
        else:
            hist = lesion_histogram(c.image, c.mask, bins, span)
        w1 = histogram_w1(hist, np.asarray(c.lesion["histogram"]), span, bins=bins)
        why = "no lesion class is present in both the lesion and its condition histogram"
    else:
        span = ctx["real_value_range"]
        hist = lesion_histogram(c.image, c.mask, bins, span)
        w1 = nearest_histogram_w1(hist, ctx["real_histograms"], span)
        why = "no real training lesion histogram to compare with"
    if not np.isfinite(w1):
        notes.append(f"histogram_w1 is not finite ({w1}): {why}")
        return nan, reference
    return float(w1), reference


def _gradient_ratio(image: np.ndarray, region: np.ndarray, real_gradient: float, notes: list[str]) -> float:
    """Boundary gradient of ``region`` over the median real one; NaN with the reason in ``notes`` if not finite."""
    from lesionflow.quality.synthetic_checks import boundary_gradient

    if not region.any():
        notes.append("boundary_gradient_ratio is not finite: the lesion region is empty")
        return float("nan")
    if not np.isfinite(real_gradient):
        notes.append("boundary_gradient_ratio is not finite: no real lesion boundary gradient to compare with")
        return float("nan")
    ratio = boundary_gradient(image, region) / real_gradient
    if not np.isfinite(ratio):
        notes.append(f"boundary_gradient_ratio is not finite ({ratio}): non-finite intensities at the boundary")
        return float("nan")
    return float(ratio)


def _real_texture(real: Any, bins: int, recorded: tuple[float, float] | None) -> dict[str, Any]:
    """The reference for lesions without a condition histogram: every real training lesion's histogram (channel
    0) over LeFusion's recorded support, else over the real lesions' 0.5-99.5th percentiles + 10% margin (the
    rule LeFusion derives its support with)."""
    from lesionflow.synth.histograms import lesion_histogram

    lesions = [r for r in real.lesions if r.mask.any() and np.all(np.isfinite(r.image[0][r.mask]))]
    if recorded is None and lesions:
        voxels = np.concatenate([r.image[0][r.mask] for r in lesions]).astype(np.float64)
        lo, hi = (float(v) for v in np.percentile(voxels, [0.5, 99.5]))
        margin = 0.1 * (hi - lo) or 1.0  # one constant intensity: any non-empty span
        recorded = (lo - margin, hi + margin)
    span = recorded or (-1.0, 1.0)
    return {
        "real_value_range": span,
        "real_histograms": [lesion_histogram(r.image, r.mask, bins, span) for r in lesions],
    }


def _recorded_value_range(ws: Workspace, samples: list[dict[str, Any]]) -> tuple[float, float] | None:
    """The histogram support LeFusion was trained with (its bank in config.json); None when no lesion has one."""
    if not any(lesion.get("histogram") for s in samples for lesion in s.get("lesions", [])):
        return None
    lo, hi = read_generator_extra(ws, "lefusion")["bank"]["value_range"]
    return float(lo), float(hi)


def _check_study_evidence(ws: Workspace, params: Params) -> None:
    """Utility in the loop (quality.synthetic.study_evidence): refuse the synthetic data, leaving nothing accepted,
    unless the named study showed these generators' arm at least min_study_effect (quality/study_evidence.py)."""
    from lesionflow.catalog.readers import generator_digest
    from lesionflow.errors import GateFailed
    from lesionflow.quality.study_evidence import study_verdict
    from lesionflow.study.design import ARM_SYNTH, arm_of_synth

    q = params.quality.synthetic
    if not q.study_evidence.strip():
        return
    path = ws.path(q.study_evidence)
    arm = arm_of_synth(params.synth)
    try:
        if not path.is_file():
            raise GateFailed(
                f"quality.synthetic.study_evidence = {q.study_evidence}: no such file; run `lesionflow study` first "
                "(it writes reports/study/summary.json) or clear the setting"
            )
        names = ARM_SYNTH.get(arm, {}).get("generators", []) if arm else []
        digests = {n: generator_digest(ws, n) for n in names}
        note = study_verdict(json.loads(path.read_text()), arm, digests, q.min_study_effect, source=q.study_evidence)
    except GateFailed:
        SYNTHETIC_ACCEPTED.at(ws).unlink(missing_ok=True)  # a failed gate leaves nothing a later stage reads
        raise
    print(f"{STAGE}: {note}", file=sys.stderr)


def run(ws: Workspace, params: Params) -> StageResult:
    import pandas as pd

    from lesionflow.progress import rich_progress
    from lesionflow.quality.synthetic_checks import boundary_gradient, volume_ks
    from lesionflow.quality.synthetic_suite import SyntheticThresholds, run_synthetic_gate
    from lesionflow.store.zarr_store import read_case
    from lesionflow.synth.roi_store import read_roi_set

    manifest = json.loads(require(ws, SYNTHETIC_MANIFEST).read_text())
    # A verdict is about the content judged now: the old one goes first, so any failure below (a gate that fails,
    # the progression gate, the study evidence, a crash) leaves nothing a later stage reads as accepted.
    SYNTHETIC_ACCEPTED.at(ws).unlink(missing_ok=True)
    judged = judged_store_digest(SYNTHETIC_STORE.at(ws))  # before judging: a store changed meanwhile is refused
    _check_study_evidence(ws, params)
    samples = manifest["samples"]
    trajectories = read_progression_manifest(ws)
    progression = _progression_gate(ws, params, trajectories) if trajectories else None
    if not samples and trajectories:  # method pie: trajectories only, no lesion samples to judge
        return _finish(ws, judged, [], [], progression, {"n_samples": 0, "n_lesions": 0})
    real = read_roi_set(ROIS_STORE.at(ws))
    plan = load_plan(ws)
    classes = lesion_classes(
        plan.label_values, params.synth.lefusion.multi_class, params.synth.lesion_labels, params.synth.organ_labels
    )
    gradients = [g for g in (boundary_gradient(r.image[0], r.mask) for r in real.lesions) if np.isfinite(g)]
    value_range = _recorded_value_range(ws, samples)
    ctx = {
        "class_values": classes,
        "lesion_values": tuple(v for v in plan.label_values if v != 0),
        "real_gradient": (float(np.median(gradients)) or 1.0) if gradients else float("nan"),
        "value_range": value_range,
        **_real_texture(real, params.synth.lefusion.bins, value_range),
    }
    identity, folder, note = acceptance_model(ws, params)
    print(f"{STAGE}: {note}", file=sys.stderr)
    loaded = _acceptance_network(folder, plan, params) if folder is not None else None
    segment = _segmenter(*loaded, device=resolve_device(params.evaluate.device)) if loaded is not None else None
    rows: list[dict[str, Any]] = []
    distribution_lesions: list[Any] = []
    views: dict[str, list[Any]] = {"real": [], "synthetic": []}
    by_condition: dict[int, list[_LesionCrop]] = defaultdict(list)  # diversity: lesions sharing a cluster
    for sample in rich_progress(iter(samples), STAGE, len(samples)):
        case = read_case(SYNTHETIC_STORE.at(ws), sample["sample_id"])
        source = read_case(STORE.at(ws), sample["source_case"])
        predicted = segment(case.image) if segment is not None else None
        lesions = _lesion_crops(sample, case, params.synth.roi_size)
        rows += _lesion_rows(sample, case, source, lesions, real, params, ctx, predicted)
        distribution_lesions += _distribution_lesions(sample, lesions)
        views["synthetic"] += [_synthetic_view(c, sample) for c in lesions[:2]]
        for c in lesions:
            if c.lesion.get("cluster") is not None:
                by_condition[int(c.lesion["cluster"])].append(c)
    table = pd.DataFrame(rows)
    new_voxels = [r["voxels"] for r in rows if r["mask_source"] in MADE_MASKS]
    ks = volume_ks([r.voxels for r in real.lesions], new_voxels)
    diversity = _diversity(by_condition)
    detected = table["detected_fraction"].dropna() if len(table) else pd.Series(dtype=float)
    q = params.quality.synthetic
    acceptance = float((detected >= q.min_detected_fraction).mean()) if len(detected) else float("nan")
    distribution = _distribution(ws, real, distribution_lesions, loaded, identity, params)
    stats = replace(_population_stats(ks, diversity, acceptance, segment is not None), distribution=distribution)
    if len(table):  # each lesion's copy-search NCC, for the lesions.csv reader (the gate bounds the copy rate)
        table["copy_search_ncc"] = table["sample_id"].map(dict(distribution.nearest_ncc)).astype("float64")
    thresholds = SyntheticThresholds(
        max_histogram_w1=q.max_histogram_w1,
        min_volume_ks_pvalue=q.min_volume_ks_pvalue,
        boundary_gradient_ratio=q.boundary_gradient_ratio,
        max_nn_similarity=q.max_nn_similarity,
        max_diversity=q.max_diversity,
        min_detected_fraction=q.min_detected_fraction,
        max_reject_fraction=q.max_reject_fraction,
        max_mmd_ratio=q.max_mmd_ratio,
        max_copy_rate=q.max_copy_rate,
        min_seed_diversity=q.min_seed_diversity,
    )
    result = run_synthetic_gate(table, stats, thresholds, SYNTHETIC_GATE_REPORT.at(ws))
    findings = gate_findings(result)
    report = str(result.report_html.relative_to(ws.root))
    rejected_samples = sorted({sample_of_row(i) for i in result.rejected})
    views["real"] = [_real_view(r) for r in real.lesions[:8]]
    _montage(ws, views)
    table.to_csv(stage_report_dir(ws, STAGE) / "lesions.csv", index=False, float_format="%.6g")
    if result.dataset_failures:
        raise gate_failed("synthetic", result, report, findings)
    summary = {
        "n_samples": len(samples),
        "n_lesions": len(table),
        "volume_ks_pvalue": stats.volume_ks_pvalue,
        "diversity": diversity,
        "acceptance_rate": acceptance,
        **distribution.summary(),
        "segmenter": identity,
        "max_background_diff": float(table["background_max_abs_diff"].max()) if len(table) else 0.0,
        "mean_histogram_w1": float(table["histogram_w1"].mean()) if len(table) else 0.0,
        "report": report,
    }
    extra = {"montage": SYNTHETIC_MONTAGE.path, "report": report}
    return _finish(ws, judged, samples, rejected_samples, progression, summary, findings, extra)


def _population_stats(ks: KsResult, diversity: float, acceptance: float, segmenter: bool) -> SyntheticStats:
    """:class:`SyntheticStats` with the reason of each statistic that is not measured (NaN then passes); a KS
    test with fewer than 2 volumes on a side is not measured (NaN), not the p-value 1.0 of a perfect match."""
    from lesionflow.quality.synthetic_suite import SyntheticStats

    not_measured: dict[str, str] = {}
    pvalue = ks.pvalue
    if ks.n_real < 2 or ks.n_synthetic < 2:
        pvalue = float("nan")
        not_measured["volume_ks_pvalue"] = (
            f"{ks.n_synthetic} new-mask lesion volume(s) vs {ks.n_real} real: the KS test needs 2 on each side"
        )
    if not np.isfinite(diversity):
        not_measured["diversity"] = "no condition (LeFusion cluster) is shared by 2 lesions"
    if not np.isfinite(acceptance):
        not_measured["acceptance_rate"] = (
            "no lesion was scored: no acceptance segmenter" if not segmenter else "the segmenter scored no lesion"
        )
    return SyntheticStats(pvalue, diversity, acceptance, not_measured)


def _finish(
    ws: Workspace,
    judged: str,
    samples: list[dict[str, Any]],
    rejected_samples: list[str],
    progression: Any,
    summary: dict[str, Any],
    findings: list[Any] | None = None,
    outputs: dict[str, str] | None = None,
) -> StageResult:
    """Fail on the progression gate, else write accepted.json (samples and trajectories, for the store digest
    ``judged``) and the summary."""
    findings = list(findings or [])
    accepted = sorted(s["sample_id"] for s in samples if s["sample_id"] not in set(rejected_samples))
    payload: dict[str, Any] = {}
    if progression is not None:
        result, report, numbers = progression
        findings += gate_findings(result)
        if result.dataset_failures:
            raise gate_failed("progression", result, report, findings)
        payload["trajectories_rejected"] = sorted(result.rejected)
        summary.update(
            n_trajectories=result.n_cases,
            n_trajectories_rejected=result.n_rejected,
            progression_report=report,
            **numbers,
        )
    write_synthetic_verdict(SYNTHETIC_STORE.at(ws), judged, accepted, rejected_samples, extra=payload)
    summary = {"success": True, **summary, "n_accepted": len(accepted), "n_rejected": len(rejected_samples)}
    write_stage_summary(ws, STAGE, summary)
    out = {"accepted": SYNTHETIC_ACCEPTED.path, "summary": summary_artifact(STAGE).path, **(outputs or {})}
    if progression is not None:
        out["progression_report"] = progression[1]
    return StageResult(STAGE, True, summary, out, tuple(findings))


def _progression_rows(ws: Workspace, trajectories: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per stored trajectory, measured again from its stored frames (the record is not trusted)."""
    from lesionflow.quality.progression_checks import progression_stats
    from lesionflow.quality.progression_suite import OUTSIDE_TOLERANCE
    from lesionflow.synth.trajectory_store import read_trajectory

    rows = []
    for tid in sorted(trajectories):
        stored = read_trajectory(PROGRESSION_STORE.at(ws), tid)
        settings = stored.attrs["settings"]
        beta_outside = float(settings["beta_outside"])
        stats = progression_stats(
            stored.frames,
            stored.masks,
            stored.roi,
            direction=float(stored.attrs["target_severity"]) - float(stored.attrs["start_severity"]),
            beta_outside=beta_outside,
            clip_range=(float(settings["clip_range"][0]), float(settings["clip_range"][1])),
        )
        exact = beta_outside == 0
        within = stats.outside_max_change == 0 if exact else stats.outside_excess <= OUTSIDE_TOLERANCE
        rows.append(
            {
                "trajectory_id": tid,
                "frame_count_ok": int(len(stored.frames) == int(settings["iterations"]) + 1),
                "outside_within_bound": int(within),
                "trend_rho": stats.trend_rho,
                "step_change_ratio": stats.step_change_ratio,
                "outside_max_change": stats.outside_max_change,
                "exact_background": int(exact),
                "severity_first": stats.severity[0],
                "severity_last": stats.severity[-1],
            }
        )
    return rows


def _progression_gate(
    ws: Workspace, params: Params, trajectories: dict[str, dict[str, Any]]
) -> tuple[Any, str, dict[str, float]]:
    """(gate result, report path, summary numbers) of the stored trajectories."""
    import pandas as pd

    from lesionflow.quality.progression_suite import run_progression_gate

    table = pd.DataFrame(_progression_rows(ws, trajectories))
    q = params.quality.synthetic
    result = run_progression_gate(table, q.min_progression_rho, q.max_step_change_ratio, PROGRESSION_GATE_REPORT.at(ws))
    stage_report_dir(ws, STAGE).mkdir(parents=True, exist_ok=True)
    table.to_csv(stage_report_dir(ws, STAGE) / "trajectories.csv", index=False, float_format="%.6g")
    numbers = {
        "mean_trend_rho": float(table["trend_rho"].mean()),
        "mean_step_change_ratio": float(table["step_change_ratio"].mean()),
        "max_outside_change": float(table["outside_max_change"].max()),
    }
    return result, str(result.report_html.relative_to(ws.root)), numbers


def _acceptance_network(folder: Path, plan: Any, params: Params) -> tuple[Any, Any] | None:
    """(network, config) of the acceptance segmenter on ``evaluate.device``; None when it was trained on another
    plan (its intensities mean something else: neither the filter nor the MMD features use it then)."""
    from lesionflow.seg.model_files import load_segmenter

    network, config = load_segmenter(folder, resolve_device(params.evaluate.device))
    if config.plan_hash != plan.plan_hash:
        print(f"{STAGE}: acceptance filter off: the segmenter was trained on another plan", file=sys.stderr)
        return None
    return network, config


def _segmenter(network: Any, config: Any, device: Any) -> Any:
    """``predict(image) -> labels`` with the acceptance segmenter."""
    from lesionflow.seg.inference import probabilities_to_labels, sliding_window_predict

    def predict(image: np.ndarray) -> np.ndarray:
        probs = sliding_window_predict(
            network, image.astype(np.float32), config.network.patch_size, overlap=0.25, device=device
        )
        return probabilities_to_labels(probs, config.label_values)

    return predict


def _distribution_lesions(sample: dict[str, Any], lesions: list[_LesionCrop]) -> list[Any]:
    """The sample's lesions for the distribution checks (removals have no lesion). A re-textured real lesion
    (``mask_source`` "real") is keyed by (source case, ROI origin, condition cluster): every relesion sample of a
    case re-textures the same ROIs with its own seed, so a repeat of that key is the same ROI and condition."""
    from lesionflow.quality.synthetic_distribution import SyntheticLesion

    out = []
    for c in lesions:
        source = c.lesion["mask_source"]
        if source == "removal":
            continue
        group = None
        if source == "real":
            cluster = c.lesion.get("cluster")
            group = (sample["source_case"], tuple(c.lesion["origin"]), -1 if cluster is None else int(cluster))
        name = lesion_row_id(sample["sample_id"], c.k)  # the row id of _lesion_rows
        out.append(SyntheticLesion(c.image, c.mask, new_texture=source != "paste", group=group, name=name))
    return out


def _distribution(
    ws: Workspace, real: Any, lesions: list[Any], loaded: tuple[Any, Any] | None, identity: str, params: Params
) -> Any:
    """:class:`~lesionflow.quality.synthetic_distribution.DistributionStats` of ``lesions`` vs the real training
    lesion ROIs, on the acceptance segmenter's encoder when it is used, else on a seeded random-initialised one."""
    from lesionflow.catalog.readers import read_metadata
    from lesionflow.errors import SourceError
    from lesionflow.quality.synthetic_distribution import (
        RANDOM_ENCODER_CHANNELS,
        distribution_stats,
        encoder_features,
        gate_seed,
        random_encoder,
    )

    test_cases = {c for c, row in read_metadata(ws).items() if row.get("split") == "test"}
    leaked = sorted({r.case_id for r in real.lesions} & test_cases)
    if leaked:  # extract-rois reads the training split only; a store that says otherwise is not used as "real"
        raise SourceError(
            f"data/rois holds lesions of test-split case(s) {', '.join(leaked[:3])}: the synthetic gate compares "
            "with training lesions only; rerun `lesionflow stage extract-rois`"
        )
    images = np.stack([r.image for r in real.lesions]) if real.lesions else np.zeros((0, 1, *params.synth.roi_size))
    if loaded is not None:
        network, config = loaded
        device, factor = str(next(network.parameters()).device), config.network.downsampling
        encoder = f"acceptance segmenter {identity} ({config.network.network}, deepest encoder level)"
    else:
        seed = gate_seed("encoder")
        network, factor = random_encoder(int(images.shape[1]), seed)
        device = "cpu"
        encoder = f"random-init unet {list(RANDOM_ENCODER_CHANNELS)} (seed {seed}), deepest encoder level"

    def features(rois: np.ndarray) -> np.ndarray:
        return encoder_features(network, rois, factor, device=device)

    q = params.quality.synthetic
    return distribution_stats(
        lesions, images, features, copy_ncc=q.copy_ncc, seed=gate_seed("mmd-halves"), encoder=encoder
    )


def _diversity(by_condition: dict[int, list[_LesionCrop]]) -> float:
    """Mean over conditions (LeFusion cluster) of the mean pairwise correlation of their lesions' ROIs."""
    from lesionflow.quality.synthetic_checks import pairwise_similarity

    values = [
        pairwise_similarity([c.image[0] for c in items], [c.mask for c in items])
        for items in by_condition.values()
        if len(items) > 1
    ]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def _synthetic_view(c: _LesionCrop, sample: dict[str, Any]) -> Any:
    from lesionflow.synth.montage import LesionView

    return LesionView(c.image[0], c.mask, _dominant_class(c.label, c.mask), f"{sample['kind']} {sample['source_case']}")


def _real_view(roi: Any) -> Any:
    from lesionflow.synth.montage import LesionView

    return LesionView(roi.image[0], roi.mask, _dominant_class(roi.label, roi.mask), f"real {roi.case_id}")


def _montage(ws: Workspace, views: dict[str, list[Any]]) -> None:
    from lesionflow.synth.montage import lesion_montage

    png = lesion_montage(views["real"], views["synthetic"], title="Real vs synthetic lesions per class")
    path = SYNTHETIC_MONTAGE.at(ws)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_bytes() != png:
        path.write_bytes(png)
