"""Stage synthesize: one Dask task per (case, sample) -> data/synthetic/store.zarr + data/synthetic/manifest.json.

Samples are drawn from the training cases only: ``synth.relesion_per_case`` re-textured real lesions,
``synth.new_per_case`` new lesions and ``synth.remove_per_case`` removed lesions per case
(:mod:`lesionflow.synth.compose`); with ``synth.method: copy-paste`` the ``new`` samples are real training
lesions (data/rois) pasted exactly at new positions inside the organ, with no generator. Sample
``(case, kind, s)`` takes its numpy and torch generators from ``(project.seed, "synth", case, kind, s)`` and runs
single-threaded on CPU, so a Dask worker, a retry or a second run writes the same bytes. A sample whose key
(source case digest, generator digests, the ROI set for copy-paste, params, seed, code) is already in the store
is not recomputed; samples no longer asked for are removed. The synthetic case keeps the source's attributes
(affine, spacing, crop) and adds ``synthetic`` (source case, kind, method) and a ``generated`` label marking the
voxels that were generated.

The manifest is the synthetic data's lineage record (written here, in one place): per sample the seed parts and
the integer seed they derive, and every generator the sample used with its full weights digest and the digest of
the data it was trained on (``generators``: the texture or lesion maker first, then DiffMask's mask model; for
copy-paste the ROI set the lesions were copied from). None of it is part of a sample's bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from lesionflow.catalog.artifacts import (
    PROGRESSION_PICTURES,
    PROGRESSION_STORE,
    ROIS_STORE,
    STORE,
    SYNTHETIC_MANIFEST,
    SYNTHETIC_STORE,
)
from lesionflow.catalog.readers import (
    check_generator,
    generator_digest,
    generator_dir,
    load_plan,
    read_generator_extra,
    read_progression_manifest,
    splits,
    stored_trajectory_key,
    write_progression_manifest,
    write_stage_summary,
)
from lesionflow.devices import resolve_device
from lesionflow.errors import Finding, SourceError
from lesionflow.files import write_json
from lesionflow.hashing import sha256_file, sha256_json
from lesionflow.params import Params
from lesionflow.stages.base import CODE_VERSION, StageResult
from lesionflow.stages.synthesize.trajectories import make_trajectory, trajectory_task, wants_trajectories
from lesionflow.workspace import Workspace

STAGE = "synthesize"
#: (id, fn(root, params_json, digests, task) -> outcome, digests, task): one unit of Dask work
Job = tuple[str, Callable[..., dict[str, Any]], str, dict[str, Any]]
KINDS = ("relesion", "new", "remove")


def _texture_methods(params: Params) -> list[str]:
    """Generators the lesion samples need (none with method pie: it makes trajectories only; copy-paste needs
    none for its lesions, only the ddpm for removal samples)."""
    sp = params.synth
    if sp.method == "pie":
        return []
    used: list[str] = [] if sp.method == "copy-paste" else [sp.method]
    if "diffmask" in sp.generators and sp.new_per_case and sp.method != "copy-paste":
        used.append("diffmask")
    if sp.remove_per_case and sp.method != "ddpm":
        used.append("ddpm")
    return used


def _methods(params: Params) -> list[str]:
    return _texture_methods(params) + (["pie"] if wants_trajectories(params) else [])


def _donors_digest(ws: Workspace, params: Params) -> str | None:
    """copy-paste: the digest of the ROI set its lesions are copied from (no generator digest covers it); else None."""
    from lesionflow.catalog.digests import digest

    return digest(ROIS_STORE, ws, params) if params.synth.method == "copy-paste" else None


def _sample_generators(params: Params, kind: str) -> list[str]:
    """The generators one sample of ``kind`` is made with, the lesion (texture) maker first (as in
    :func:`synthesize_sample`): removal inpaints with the DDPM; copy-paste pastes ROIs (named "copy-paste")"""
    sp = params.synth
    if kind == "remove":
        return ["ddpm"]
    if sp.method == "copy-paste":
        return ["copy-paste"]
    mask = ["diffmask"] if kind == "new" and "diffmask" in _texture_methods(params) else []
    return [sp.method, *mask]


def _generator_lineage(ws: Workspace, params: Params) -> dict[str, dict[str, str]]:
    """method -> full weights digest and the digest of the ROI set it was trained on (recorded by train-generator
    in its config; "not recorded" for a generator saved before it did). copy-paste: the ROI set, both."""
    lineage = {
        m: {
            "sha256": generator_digest(ws, m),
            "training_data_sha256": str(read_generator_extra(ws, m).get("training_data_sha256", "not recorded")),
        }
        for m in _texture_methods(params)
    }
    donors = _donors_digest(ws, params)
    if donors is not None:
        lineage["copy-paste"] = {"sha256": donors, "training_data_sha256": donors}
    return lineage


def _with_lineage(record: dict[str, Any], params: Params, lineage: dict[str, dict[str, str]]) -> dict[str, Any]:
    """A manifest record with its lineage fields, recomputed at every write from the record's own seed parts and
    today's generators: a sample kept from an earlier run has the same key, so the same generator digests."""
    from lesionflow.seeding import derive_seed

    generators = [{"method": m, **lineage[m]} for m in _sample_generators(params, str(record["kind"]))]
    return {**record, "seed_value": derive_seed(*record["seed"]), "generators": generators}


def sample_id(case_id: str, kind: str, index: int) -> str:
    return f"{case_id}__{kind}{index}"


def _tasks(ws: Workspace, params: Params) -> list[dict[str, Any]]:
    from lesionflow.store.zarr_store import case_digest

    sp = params.synth
    if sp.method == "pie":
        return []
    counts = {"relesion": sp.relesion_per_case, "new": sp.new_per_case, "remove": sp.remove_per_case}
    generators = {m: generator_digest(ws, m) for m in _texture_methods(params)}
    donors = _donors_digest(ws, params)
    synth = params.synth.model_dump(mode="json")
    for key in ("workers", "scheduler_address", "device"):
        synth.pop(key)

    chunk = list(load_plan(ws).chunk_shape)
    tasks = []
    for case_id in splits(ws, params).train:
        source = case_digest(STORE.at(ws), case_id)
        for kind in KINDS:
            for s in range(counts[kind]):
                fields = {"source": source, "generators": generators, "synth": synth, "seed": params.project.seed,
                          "kind": kind, "s": s, "code": CODE_VERSION,
                          "compression": params.preprocess.compression}  # fmt: skip
                if donors is not None:  # only copy-paste: the other methods' keys stay as they were
                    fields["donors"] = donors
                key = sha256_json(fields)
                tasks.append(
                    {"case_id": case_id, "kind": kind, "index": s, "key": key, "chunk": chunk,
                     "compression": params.preprocess.compression, "sample_id": sample_id(case_id, kind, s)}
                )  # fmt: skip
    return tasks


@functools.lru_cache(maxsize=2)
def _generators(root: str, params_json: str, digests: str) -> Any:
    """Load the generators once per worker process (``digests`` is part of the cache key: new weights reload)."""
    import numpy as np

    from lesionflow.diffusion.trainer import load_generator
    from lesionflow.synth.compose import Generators
    from lesionflow.synth.histograms import HistogramBank
    from lesionflow.synth.roi_store import read_roi_set

    ws, params = Workspace.at(root), Params.model_validate_json(params_json)
    sp = params.synth
    texture: Any = None
    extra: dict[str, Any] = {}
    if sp.method != "copy-paste":  # copy-paste copies real lesions: no texture model
        texture, _, extra = load_generator(generator_dir(ws, sp.method))
    if sp.method == "lefusion":
        classes = tuple(int(v) for v in extra["class_values"])
        bank: HistogramBank | None = HistogramBank.from_dict(extra["bank"])
        # sample with the value range recorded with the generator (derived from its training lesions or explicit)
        settings: Any = sp.lefusion.model_copy(update={"value_range": tuple(extra["bank"]["value_range"])})
    else:
        classes, settings, bank = (1,), sp.ddpm, None
    mask_model, mask_settings = None, None
    if "diffmask" in _texture_methods(params):
        mask_model, _, mask_extra = load_generator(generator_dir(ws, "diffmask"))
        mask_settings = sp.diffmask
        radii = np.asarray(mask_extra["radii"], dtype=np.float64)
    rois = read_roi_set(ROIS_STORE.at(ws))
    if mask_model is None:
        radii = np.asarray(sorted(r.sphere.radius for r in rois.lesions if r.sphere is not None), dtype=np.float64)
    remover, remover_settings = None, None
    if sp.remove_per_case:
        remover = texture if sp.method == "ddpm" else load_generator(generator_dir(ws, "ddpm"))[0]
        remover_settings = sp.ddpm
    return Generators(
        method=sp.method,
        texture=texture,
        texture_settings=settings,
        class_values=classes,
        bank=bank,
        histogram_mode=sp.lefusion.histogram_mode,
        explicit_histogram=sp.lefusion.explicit_histogram,
        mask_model=mask_model,
        mask_settings=mask_settings,
        radii=radii,
        layouts=[r for r in rois.lesions if r.sphere is not None],
        remover=remover,
        remover_settings=remover_settings,
    )


def synthesize_sample(root: str, params_json: str, digests: str, task: dict[str, Any]) -> dict[str, Any]:
    """Compose and write one synthetic case (runs in a Dask worker); returns its manifest record or a failure."""
    import numpy as np
    import torch

    from lesionflow.seeding import rng_for, torch_generator
    from lesionflow.store.zarr_store import CaseArrays, read_case, read_case_attrs, write_case
    from lesionflow.synth import compose

    ws, params = Workspace.at(root), Params.model_validate_json(params_json)
    sp = params.synth
    case_id, kind, s = task["case_id"], task["kind"], int(task["index"])
    torch.set_num_threads(1)  # same thread count everywhere: same float sums, same bytes
    device = resolve_device(sp.device)
    gens = _generators(root, params_json, digests)
    if device.type != "cpu":
        for m in (gens.texture, gens.mask_model, gens.remover):
            if m is not None:
                m.to(device)
    arrays = read_case(STORE.at(ws), case_id)
    rng = rng_for(params.project.seed, "synth", case_id, kind, s)
    tgen = torch_generator(params.project.seed, "synth", case_id, kind, s, device=device)
    label = arrays.label if arrays.label is not None else np.zeros(arrays.image.shape[1:], np.uint8)
    if kind == "relesion":
        out = compose.relesion(
            arrays.image, label, arrays.organ, gens, sp.roi_size,
            min_voxels=sp.min_lesion_voxels, batch=sp.batch_lesions, rng=rng, torch_gen=tgen,
        )  # fmt: skip
    elif kind == "new":
        if arrays.organ is None or not arrays.organ.any():
            return {"ok": False, "code": "empty_organ_mask", "message": "no organ mask: nowhere to place a new lesion"}
        if gens.method == "copy-paste":
            out = compose.paste_lesions(
                arrays.image, label, arrays.organ, gens.layouts, sp.roi_size, count=sp.lesions_per_sample, rng=rng
            )
        else:
            out = compose.new_lesions(
                arrays.image, label, arrays.organ, gens, sp.roi_size,
                count=sp.lesions_per_sample, batch=sp.batch_lesions, rng=rng, torch_gen=tgen,
            )  # fmt: skip
    else:
        out = compose.remove_lesion(
            arrays.image, label, arrays.organ, gens, sp.roi_size,
            which=s, min_voxels=sp.min_lesion_voxels, torch_gen=tgen,
        )  # fmt: skip
    if not out.lesions:
        why = "; ".join(out.notes) or "no usable lesion"
        return {"ok": False, "code": "nothing_generated", "message": f"{kind} sample {s}: {why}"}
    attrs = read_case_attrs(STORE.at(ws), case_id)
    attrs["synthetic"] = {
        "source_case": case_id,
        "kind": kind,
        "index": s,
        "method": sp.method,
        "sample_key": task["key"],
    }
    chunk = tuple(int(c) for c in task["chunk"])
    digest = write_case(
        SYNTHETIC_STORE.at(ws),
        task["sample_id"],
        CaseArrays(out.image, out.label, arrays.organ, out.generated),
        attrs,
        chunk_shape=chunk,  # type: ignore[arg-type]
        image_dtype=str(arrays.image.dtype),
        compression=task["compression"],
    )
    from dataclasses import asdict

    record = {
        "sample_id": task["sample_id"],
        "source_case": case_id,
        "kind": kind,
        "index": s,
        "method": sp.method,
        "seed": [params.project.seed, "synth", case_id, kind, s],
        "sample_key": task["key"],
        "digest": digest,
        "lesions": [asdict(lesion) for lesion in out.lesions],
        "notes": out.notes,
    }
    return {"ok": True, "record": record}


def _existing(ws: Workspace) -> dict[str, str]:
    """sample id -> sample key of the complete synthetic cases already in the store."""
    from lesionflow.store.zarr_store import list_cases, read_case_attrs

    root = SYNTHETIC_STORE.at(ws)
    return {c: read_case_attrs(root, c).get("synthetic", {}).get("sample_key", "") for c in list_cases(root)}


def _trajectory_tasks(ws: Workspace, params: Params) -> list[dict[str, Any]]:
    """``synth.pie.cases`` training cases toward ``synth.pie.target_severity``, the earliest disease first.

    Order (from the ROI set): cases with only lesion-free ROIs (a healthy start), then by the voxel count of the
    case's smallest usable lesion, then by id. A case whose lesions are already the largest seen would have
    nowhere to progress to; cases with neither a usable lesion nor an organ mask cannot start at all.
    """
    from lesionflow.synth.roi_store import read_roi_set

    if not wants_trajectories(params):
        return []
    rois = read_roi_set(ROIS_STORE.at(ws))
    train = set(splits(ws, params).train)
    smallest_lesion: dict[str, int] = {}
    for r in rois.lesions:
        if r.case_id in train:
            smallest_lesion[r.case_id] = min(r.voxels, smallest_lesion.get(r.case_id, r.voxels))
    healthy = {r.case_id for r in rois.candidates if r.case_id in train} - set(smallest_lesion)
    order = sorted(healthy) + sorted(smallest_lesion, key=lambda c: (smallest_lesion[c], c))
    return [trajectory_task(ws, params, c, params.synth.pie.target_severity) for c in order[: params.synth.pie.cases]]


def run(ws: Workspace, params: Params) -> StageResult:
    import json
    import shutil

    import zarr

    from lesionflow.store.zarr_store import clean_temp, ensure_root, index_collection, list_cases, open_store
    from lesionflow.synth.trajectory_store import repair

    for method in _methods(params):
        check_generator(ws, params, method)
    root = SYNTHETIC_STORE.at(ws)
    open_store(root)
    clean_temp(root)
    repair(PROGRESSION_STORE.at(ws))
    tasks = _tasks(ws, params)
    trajectories = _trajectory_tasks(ws, params)
    if not tasks and not trajectories:
        raise SourceError(
            "synth: no samples asked for (relesion_per_case, new_per_case and remove_per_case are 0, and no "
            "pie trajectory: synth.pie.cases = 0 or pie not in synth.generators)"
        )
    old = json.loads(SYNTHETIC_MANIFEST.at(ws).read_text()) if SYNTHETIC_MANIFEST.at(ws).exists() else {"samples": []}
    records = {r["sample_id"]: r for r in old.get("samples", [])}
    existing = _existing(ws)
    wanted = {t["sample_id"] for t in tasks}
    for stale in sorted(set(existing) - wanted):
        shutil.rmtree(root / stale, ignore_errors=True)
    todo = [t for t in tasks if existing.get(t["sample_id"]) != t["key"] or t["sample_id"] not in records]
    # Trajectories made by the progression flow for other cases or targets stay; only ours are (re)computed.
    trajectory_records = read_progression_manifest(ws)
    traj_todo = [
        t
        for t in trajectories
        if stored_trajectory_key(ws, t["trajectory_id"]) != t["key"] or t["trajectory_id"] not in trajectory_records
    ]
    jobs: list[Job] = [(t["sample_id"], synthesize_sample, _texture_digests(ws, params), t) for t in todo]
    jobs += [(t["trajectory_id"], make_trajectory, generator_digest(ws, "pie"), t) for t in traj_todo]
    outcomes = _fan_out(params, ws, jobs) if jobs else {}
    findings: list[Finding] = []
    for task in todo:
        outcome = outcomes[task["sample_id"]]
        if outcome["ok"]:
            records[task["sample_id"]] = outcome["record"]
        else:
            records.pop(task["sample_id"], None)
            shutil.rmtree(root / task["sample_id"], ignore_errors=True)  # an outdated sample must not stay behind
            findings.append(Finding(task["sample_id"], outcome["code"], outcome["message"]))
    for task in traj_todo:
        outcome = outcomes[task["trajectory_id"]]
        if outcome["ok"]:
            trajectory_records[task["trajectory_id"]] = outcome["record"]
        else:
            findings.append(Finding(task["trajectory_id"], outcome["code"], outcome["message"]))
    # Always written (dvc.yaml declares them), empty when no trajectory is asked for.
    ensure_root(PROGRESSION_STORE.at(ws))
    write_progression_manifest(ws, trajectory_records)
    lineage = _generator_lineage(ws, params)
    kept = [
        _with_lineage(records[t["sample_id"]], params, lineage)
        for t in tasks
        if t["sample_id"] in records and (root / t["sample_id"]).exists()
    ]
    texture = _texture_methods(params)
    # full digests: the generator names that reach MLflow and `lesionflow lineage` are the generators' identities
    models = [f"{m}:{generator_digest(ws, m)}" for m in _methods(params)]
    donors = _donors_digest(ws, params)
    if donors is not None:  # copy-paste: the synthetic data is named by the ROI set its lesions come from
        models.insert(0, f"copy-paste:{donors}")
    generator_model = ", ".join(models)
    zarr.open_group(str(root), mode="r+", zarr_format=3).attrs.update({"generator_model": generator_model})
    index_collection(root, list_cases(root))  # viewers find the samples from the store root
    manifest = {
        "generator_model": generator_model,
        "generators": {m: generator_digest(ws, m) for m in texture},
        "generator_training_data": {m: lineage[m]["training_data_sha256"] for m in texture},
        **({} if donors is None else {"donors": donors}),
        "samples": kept,
    }
    write_json(SYNTHETIC_MANIFEST.at(ws), manifest)
    made = [t for t in trajectories if t["trajectory_id"] in trajectory_records]
    if (tasks and not kept) or (trajectories and not made):
        raise SourceError(
            f"synthesize produced no {'sample' if tasks and not kept else 'trajectory'} ({len(findings)} failed: "
            f"{'; '.join(f.line() for f in findings[:3])}); see the findings above"
        )
    by_kind = {k: sum(r["kind"] == k for r in kept) for k in KINDS}
    summary = {
        "n_samples": len(kept),
        "n_generated_now": len(todo) - sum(not outcomes[t["sample_id"]]["ok"] for t in todo),
        "n_failed": len(findings),
        "by_kind": by_kind,
        "n_lesions": sum(len(r["lesions"]) for r in kept),
        "n_trajectories": len(made),
        "trajectory_rho": [_rounded(trajectory_records[t["trajectory_id"]]["trend_rho"]) for t in made],
        "generator_model": generator_model,
        "manifest_sha256": sha256_file(SYNTHETIC_MANIFEST.at(ws)),
    }
    write_stage_summary(ws, STAGE, summary)
    outputs = {"store": SYNTHETIC_STORE.path, "manifest": SYNTHETIC_MANIFEST.path}
    if trajectories:
        outputs.update(progression=PROGRESSION_STORE.path, pictures=PROGRESSION_PICTURES.path)
    return StageResult(STAGE, True, summary, outputs, tuple(findings))


def _rounded(value: float | None) -> float | None:
    """ρ for the summary (None: the target equals the start severity, no trend to measure)."""
    return None if value is None else round(value, 4)


def _texture_digests(ws: Workspace, params: Params) -> str:
    """What the workers' generator cache is keyed on: the generators' weights, and the donor ROIs for copy-paste."""
    digests = {m: generator_digest(ws, m) for m in _texture_methods(params)}
    donors = _donors_digest(ws, params)
    return sha256_json(digests if donors is None else {**digests, "donors": donors})


def _fan_out(params: Params, ws: Workspace, jobs: list[Job]) -> dict[str, dict[str, Any]]:
    """Run ``fn(root, params_json, digests, task)`` for every job ``(id, fn, digests, task)`` on one Dask cluster;
    the outcome per id (an exception becomes a failure with its first line: the other jobs go on)."""
    from lesionflow.parallel import completed, dask_client
    from lesionflow.progress import rich_progress

    params_json = params.model_dump_json()
    outcomes: dict[str, dict[str, Any]] = {}
    sp = params.synth
    with dask_client(sp.workers, params.preprocess.memory_limit, sp.scheduler_address) as client:
        futures = {
            client.submit(
                fn, str(ws.root), params_json, digests, task,
                key=f"synthesize-{job_id}-{task['key'][:12]}", pure=False,
            ): job_id
            for job_id, fn, digests, task in jobs
        }  # fmt: skip
        for future in rich_progress(completed(client, futures, "synthesize"), "synthesize", len(futures)):
            job_id = futures[future]
            try:
                outcomes[job_id] = dict(future.result())
            except Exception as err:  # noqa: BLE001 - one failed job must not stop the others; the reason is kept
                text = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
                outcomes[job_id] = {"ok": False, "code": "synthesis_error", "message": f"{type(err).__name__}: {text}"}
    return outcomes
