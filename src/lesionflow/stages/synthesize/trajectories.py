"""PIE trajectories: made by `synthesize` (one Dask task per trajectory) and by the progression flow (one case).

Outputs: ``data/synthetic/progression.zarr/<id>`` (frames with a time axis, per-frame lesion masks, the ROI mask;
see :mod:`lesionflow.synth.trajectory_store`), ``data/synthetic/progression.json`` (one record per trajectory:
parameters, seed, severities) and, for people, ``reports/synthesize/progression/<id>.gif`` and ``<id>.png``.
Trajectory ``<case>__pie<target%>`` takes its noise from ``(project.seed, "pie", case, target)`` and runs
single-threaded, so any worker writes the same bytes; one whose key (source case, generator, settings, seed, mask)
is already stored is kept as it is.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from lesionflow.catalog.artifacts import PROGRESSION_PICTURES, PROGRESSION_STORE, STORE
from lesionflow.catalog.readers import (
    check_generator,
    generator_digest,
    generator_dir,
    read_progression_manifest,
    stored_trajectory_key,
    write_progression_manifest,
)
from lesionflow.devices import resolve_device
from lesionflow.errors import SourceError
from lesionflow.hashing import sha256_file, sha256_json
from lesionflow.params import Params
from lesionflow.stages.base import CODE_VERSION
from lesionflow.workspace import Workspace

__all__ = [
    "make_trajectory",
    "trajectory_id",
    "trajectory_task",
    "wants_trajectories",
    "write_progression_manifest",
]


def wants_trajectories(params: Params) -> bool:
    """Trajectories are made when the pie generator is trained and asked for (or is the method itself)."""
    sp = params.synth
    return "pie" in sp.generators and (sp.pie.cases > 0 or sp.method == "pie")


def trajectory_id(case_id: str, target: float) -> str:
    return f"{case_id}__pie{round(target * 100):03d}"


def trajectory_task(
    ws: Workspace,
    params: Params,
    case_id: str,
    target: float,
    *,
    roi_mask_file: str = "",
    whole_volume: bool = False,
) -> dict[str, Any]:
    """One trajectory's task: ids, the paths it reads and its cache key."""
    from lesionflow.store.zarr_store import case_digest

    mask_digest = sha256_file(Path(roi_mask_file)) if roi_mask_file else ""
    key = sha256_json(
        {
            "source": case_digest(STORE.at(ws), case_id),
            "generator": generator_digest(ws, "pie"),
            "pie": params.synth.pie.model_dump(mode="json"),
            "roi_size": list(params.synth.roi_size),
            "min_voxels": params.synth.min_lesion_voxels,
            "seed": params.project.seed,
            "target": target,
            "mask": mask_digest,
            "whole": whole_volume,
            "code": CODE_VERSION,
        }
    )
    return {
        "trajectory_id": trajectory_id(case_id, target),
        "case_id": case_id,
        "target": float(target),
        "roi_mask_file": roi_mask_file,
        "whole_volume": whole_volume,
        "key": key,
    }


@functools.lru_cache(maxsize=2)
def _pie_generator(root: str, digest: str) -> tuple[Any, dict[str, Any]]:
    """The pie model and its extras, loaded once per worker (``digest`` keys the cache: new weights reload)."""
    from lesionflow.diffusion.trainer import load_generator

    model, _, extra = load_generator(generator_dir(Workspace.at(root), "pie"))
    return model, extra


def _read_mask_file(path: str, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """A user's ROI mask on the processed case's grid: a .npy array, or a volume file (NIfTI, NRRD, MHA) whose
    shape and affine must be the processed case's (a mask on another grid would edit the wrong voxels)."""
    from lesionflow.io.volumes import read_volume

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"ROI mask file {path} does not exist; give a .npy or .nii.gz mask on the processed grid")
    if file.suffix == ".npy":
        return np.asarray(np.load(file, allow_pickle=False))
    volume = read_volume(file, file.name)
    if volume.array.shape == shape and not np.allclose(volume.affine, affine, atol=1e-3):
        raise ValueError(
            f"ROI mask {file.name} has another affine than the processed case (origin "
            f"{np.round(volume.affine[:3, 3], 3).tolist()} vs {np.round(affine[:3, 3], 3).tolist()} mm); "
            "resample it onto the processed grid"
        )
    return np.asarray(volume.array)


def make_trajectory(root: str, params_json: str, digest: str, task: dict[str, Any]) -> dict[str, Any]:
    """Compute and store one trajectory (runs in a Dask worker or in the flow's process); returns its record, or
    ``{"ok": False, "code", "message"}`` for a case that cannot be used."""
    import torch

    from lesionflow.quality.progression_checks import frame_lesion_masks, progression_stats
    from lesionflow.seeding import rng_for, torch_generator
    from lesionflow.store.zarr_store import read_case, read_case_attrs
    from lesionflow.synth.pie import (
        CLIP_RANGE,
        SeverityScale,
        loop_settings,
        progress,
        progression_start,
        start_from_mask,
    )
    from lesionflow.synth.trajectory_store import crop_affine, write_trajectory
    from lesionflow.synth.trajectory_view import trajectory_gif, trajectory_strip_png

    ws, params = Workspace.at(root), Params.model_validate_json(params_json)
    pp, case_id, target = params.synth.pie, task["case_id"], float(task["target"])
    torch.set_num_threads(1)  # same thread count everywhere: same float sums, same bytes
    device = resolve_device(params.synth.device)
    model, extra = _pie_generator(root, digest)
    model.to(device)
    scale = SeverityScale.from_dict(extra["severity"])
    attrs = read_case_attrs(STORE.at(ws), case_id)
    spacing = [float(s) for s in attrs["spacing"]]
    if not np.allclose(spacing, extra["spacing"], rtol=0, atol=1e-6):
        return _failure("spacing_mismatch", f"spacing {spacing} mm, but the pie model was trained at "
                        f"{extra['spacing']} mm; preprocess the case with the same plan or retrain pie")  # fmt: skip
    try:
        scale.check_target(target)
        arrays = read_case(STORE.at(ws), case_id)
        label = arrays.label if arrays.label is not None else np.zeros(arrays.image.shape[1:], np.uint8)
        if task["roi_mask_file"]:
            mask_full = _read_mask_file(task["roi_mask_file"], arrays.image.shape[1:], np.asarray(attrs["affine"]))
            start = start_from_mask(arrays.image, label, mask_full, params.synth.roi_size)
        else:
            rng = rng_for(params.project.seed, "pie-start", case_id)
            start = progression_start(
                arrays.image, label, arrays.organ, params.synth.roi_size,
                min_voxels=params.synth.min_lesion_voxels, margin=pp.margin, rng=rng, whole=task["whole_volume"],
            )  # fmt: skip
        generator = torch_generator(params.project.seed, "pie", case_id, f"{target:.6f}", device=device)
        trajectory = progress(model, pp, start.image, start.roi_mask, target, generator)
    except ValueError as err:
        return _failure("progression_input", str(err))
    masks = frame_lesion_masks(
        trajectory.frames, start.label, trajectory.roi_mask, extra["lesion_threshold"], extra["lesion_polarity"]
    )
    start_severity = scale.of_lesion(start.lesion_voxels, start.classes)
    stats = progression_stats(
        trajectory.frames, masks, trajectory.roi_mask, direction=target - start_severity,
        beta_outside=pp.beta_outside, clip_range=CLIP_RANGE,
    )  # fmt: skip
    seed = [params.project.seed, "pie", case_id, f"{target:.6f}"]
    tid = task["trajectory_id"]
    record: dict[str, Any] = {
        "trajectory_id": tid,
        "source_case": case_id,
        "start": start.kind,
        "origin": list(start.origin),
        "target_severity": target,
        "start_severity": start_severity,
        "frames": len(trajectory.frames),
        "roi_voxels": int(trajectory.roi_mask.sum()),
        "settings": loop_settings(pp),
        "exact_background": trajectory.exact_background,
        "seed": seed,
        "key": task["key"],
        "generator_sha256": digest,
        "frame_severity_voxels": list(stats.severity),
        # JSON has no NaN/inf: a statistic that is not finite (no change in the first half of the frames gives an
        # infinite step-change ratio) is recorded as null; the progression gate measures the frames again anyway
        "trend_rho": _finite_or_none(stats.trend_rho),
        "step_change_ratio": _finite_or_none(stats.step_change_ratio),
        "outside_max_change": _finite_or_none(stats.outside_max_change),
    }
    write_trajectory(
        PROGRESSION_STORE.at(ws),
        tid,
        trajectory.frames,
        masks,
        trajectory.roi_mask,
        {**record, "spacing": spacing, "affine": crop_affine(np.asarray(attrs["affine"]), start.origin)},
    )
    pictures = PROGRESSION_PICTURES.at(ws)
    pictures.mkdir(parents=True, exist_ok=True)
    title = f"{case_id}: severity {start_severity:.2f} -> {target:.2f} (Spearman rho {stats.trend_rho:.2f})"
    (pictures / f"{tid}.png").write_bytes(trajectory_strip_png(trajectory.frames, masks, title=title))
    (pictures / f"{tid}.gif").write_bytes(trajectory_gif(trajectory.frames, masks))
    return {"ok": True, "record": record}


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _failure(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "code": code, "message": message}


def run_one(
    ws: Workspace, params: Params, case_id: str, target: float, *, roi_mask_file: str = "", whole_volume: bool = False
) -> dict[str, Any]:
    """One trajectory in this process (the progression flow): its record; a clear SourceError for bad input."""
    from lesionflow.store.zarr_store import list_cases

    if "pie" not in params.synth.generators:
        raise SourceError("synth.generators has no 'pie': add it and run `lesionflow stage train-generator`")
    check_generator(ws, params, "pie")
    if case_id not in list_cases(STORE.at(ws)):
        raise SourceError(f"case {case_id!r} is not in {STORE.path}; pick a processed case id")
    task = trajectory_task(ws, params, case_id, target, roi_mask_file=roi_mask_file, whole_volume=whole_volume)
    records = read_progression_manifest(ws)
    if stored_trajectory_key(ws, task["trajectory_id"]) == task["key"] and task["trajectory_id"] in records:
        return records[task["trajectory_id"]]
    outcome = make_trajectory(str(ws.root), params.model_dump_json(), generator_digest(ws, "pie"), task)
    if not outcome["ok"]:
        raise SourceError(f"progression of case {case_id}: {outcome['message']} [{outcome['code']}]")
    records[task["trajectory_id"]] = outcome["record"]
    write_progression_manifest(ws, records)
    return dict(outcome["record"])
