"""Stage train-generator: train every generator of ``synth.generators`` on data/rois -> models/generators/<method>.

Methods: ``lefusion`` (lesion texture, histogram-conditioned, multi-class channels), ``diffmask`` (lesion masks
from a bounding sphere), ``ddpm`` (unconditional DDPM for RePaint removal / the insertion baseline) and ``pie``
(severity-conditioned DDPM with classifier-free guidance for progression trajectories). Each
is trained by the shared loop (EMA, resume from ``models/checkpoints/generators/<method>/<run key>``) and saved
as the weights (EMA or raw) with the lower held-out loss + ``config.json`` (``"weights"``: which, and both
losses; also in the stage summary) whose ``extra`` block records the method and preset fingerprint (a generator
from another method or preset is refused downstream), the seed and what sampling needs (LeFusion's classes and
histogram bank, DiffMask's radius pool). An empty ``synth.generators`` (params allow it only with
``synth.method: copy-paste``, which pastes real lesions) trains nothing and leaves an empty models/generators.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from lesionflow.catalog.artifacts import (
    GENERATORS,
    PLANS,
    ROIS_STORE,
    TRAIN_GENERATOR_CURVES,
    TRAIN_GENERATOR_CURVES_PNG,
)
from lesionflow.catalog.digests import digest
from lesionflow.catalog.readers import (
    generator_checkpoints,
    generator_dir,
    lesion_classes,
    load_plan,
    net_fingerprint,
    write_stage_summary,
)
from lesionflow.devices import cpu_threads, resolve_device
from lesionflow.errors import Finding
from lesionflow.files import write_json, write_text_if_changed
from lesionflow.hashing import sha256_file, sha256_json
from lesionflow.params import Params
from lesionflow.progress import progress_label
from lesionflow.stages.base import CODE_VERSION, StageResult
from lesionflow.workspace import Workspace

STAGE = "train-generator"


def _train_one(
    ws: Workspace, params: Params, method: str, rois: Any, device: Any
) -> tuple[Any, dict[str, Any], list[Finding]]:
    """Train ``method``; returns (outcome, extra for config.json, findings)."""
    from lesionflow.seeding import derive_seed

    net = getattr(params.synth, method)
    seed = derive_seed(params.project.seed, "generator", method)
    fingerprint = net_fingerprint(params, method)
    training_data = digest(ROIS_STORE, ws, params)
    key = sha256_json(
        {
            "fp": fingerprint,
            "net": net.model_dump(mode="json"),
            "seed": seed,
            "rois": {"rois": training_data, "plans": digest(PLANS, ws, params)},
            "code": CODE_VERSION,
            "ema": "warmup",  # checkpoints written before the EMA warm-up hold an initialisation-heavy EMA
        }
    )
    checkpoints = generator_checkpoints(ws, method) / key[:16]

    def warn(line: str) -> None:
        print(f"train-generator ({method}): {line}", file=sys.stderr)

    findings: list[Finding] = []
    # training_data_sha256: the ROI set it learnt from, copied by synthesize into each sample's lineage
    extra: dict[str, Any] = {
        "fingerprint": fingerprint,
        "seed": seed,
        "run_key": key,
        "training_data_sha256": training_data,
    }
    if method == "lefusion":
        from lesionflow.synth.lefusion import classes_without_lesions, train_lefusion

        classes = lesion_classes(
            load_plan(ws).label_values,
            params.synth.lefusion.multi_class,
            params.synth.lesion_labels,
            params.synth.organ_labels,
        )
        if not params.synth.lefusion.multi_class:
            # one merged class: every lesion voxel counts as the first lesion value
            rois = [_merged(r, classes[0]) for r in rois.lesions]
        else:
            rois = list(rois.lesions)
        for value in classes_without_lesions(rois, classes):
            findings.append(
                Finding(
                    "dataset",
                    "class_without_lesions",
                    f"lesion class {value} has no training lesion: its LeFusion channel is not trained and no "
                    "lesion of that class is synthesized; add cases with that class or set "
                    "synth.lefusion.multi_class=false",
                )
            )
        outcome, bank = train_lefusion(rois, net, classes, checkpoints, seed=seed, device=device, warn=warn)
        if bank.k < params.synth.lefusion.bank_k:
            findings.append(
                Finding(
                    "dataset",
                    "bank_smaller_than_k",
                    f"the histogram bank has {len(rois)} lesion(s) ({bank.k} distinct) for synth.lefusion.bank_k = "
                    f"{params.synth.lefusion.bank_k}; it uses k = {bank.k}; lower bank_k or add lesions",
                )
            )
        extra.update(class_values=list(classes), bank=bank.to_dict(), image_channels=int(rois[0].image.shape[0]))
        write_json(generator_dir(ws, method) / "histogram_bank.json", bank.to_dict())
    elif method == "diffmask":
        from lesionflow.synth.diffmask import train_diffmask

        usable = [r for r in rois.lesions if r.sphere is not None and r.mask.any()]
        outcome = train_diffmask(usable, net, checkpoints, seed=seed, device=device, warn=warn)
        extra["radii"] = sorted(float(r.sphere.radius) for r in usable)
    elif method == "pie":
        from lesionflow.synth.pie import fit_severity_scale, lesion_intensity_split, train_pie

        plan = load_plan(ws)
        pp = params.synth.pie
        classes = lesion_classes(plan.label_values, True, params.synth.lesion_labels, params.synth.organ_labels)
        scale = fit_severity_scale(rois.lesions, rois.candidates, pp.severity, classes)
        threshold, polarity = lesion_intensity_split(rois.lesions)
        patches = [*rois.lesions, *rois.candidates]
        outcome = train_pie(patches, scale, net, checkpoints, seed=seed, device=device, warn=warn)
        extra.update(
            severity=scale.to_dict(),
            lesion_threshold=threshold,
            lesion_polarity=polarity,
            image_channels=int(patches[0].image.shape[0]),
            spacing=list(plan.target_spacing),
        )
    else:
        from lesionflow.synth.inpaint import train_ddpm

        patches = [*rois.lesions, *rois.candidates]
        outcome = train_ddpm(patches, net, checkpoints, seed=seed, device=device, warn=warn)
        extra["image_channels"] = int(patches[0].image.shape[0])
    return outcome, extra, findings


def _merged(roi: Any, value: int) -> Any:
    from dataclasses import replace

    label = np.where(roi.label > 0, np.uint8(value), np.uint8(0))
    return replace(roi, label=label, classes=(value,))


def run(ws: Workspace, params: Params) -> StageResult:
    from lesionflow.diffusion.trainer import count_parameters, save_generator
    from lesionflow.seg.plots import loss_curves_png
    from lesionflow.synth.roi_store import read_roi_set

    rois = read_roi_set(ROIS_STORE.at(ws))
    GENERATORS.at(ws).mkdir(parents=True, exist_ok=True)  # declared output, also when nothing is trained
    device = resolve_device(params.synth.device)
    findings: list[Finding] = []
    methods: dict[str, Any] = {}
    histories: dict[str, list[float]] = {}
    with cpu_threads(params.train.cpu_threads) as threads:
        for method in params.synth.generators:
            with progress_label(f"{STAGE} {method}"):  # the bar and log lines name the generator
                outcome, extra, found = _train_one(ws, params, method, rois, device)
            findings += found
            folder = generator_dir(ws, method)
            save_generator(folder, outcome.best, outcome.best.config, extra, outcome.choice)
            histories[method] = list(outcome.history)
            methods[method] = {
                "parameters": count_parameters(outcome.model),
                "steps_done": outcome.steps_done,
                "resumed_from": outcome.resumed_from,
                "final_loss": outcome.history[-1] if outcome.history else None,
                "weights": outcome.choice.to_dict() if outcome.choice else None,
                "model_sha256": sha256_file(folder / "model.safetensors"),
            }
    loss_curves_png(histories, TRAIN_GENERATOR_CURVES_PNG.at(ws))
    rows = ["method,step,loss"] + [f"{m},{i + 1},{v:.6g}" for m, h in histories.items() for i, v in enumerate(h)]
    write_text_if_changed(TRAIN_GENERATOR_CURVES.at(ws), "\n".join(rows) + "\n")
    summary = {
        "generators": methods,
        "n_lesion_rois": len(rois.lesions),
        "n_candidate_rois": len(rois.candidates),
        "device": str(device),
        "cpu_threads": threads,  # torch threads used (train.cpu_threads; 0 = the machine's share): bytes depend on it
    }
    outputs = {
        "generators": GENERATORS.path,
        "curves": TRAIN_GENERATOR_CURVES_PNG.path,
        "summary": write_stage_summary(ws, STAGE, summary),
    }
    return StageResult(STAGE, True, summary, outputs, tuple(findings))
