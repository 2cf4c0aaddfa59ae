"""Run a utility study with the pipeline's own stages, one small workspace per fraction, arm and cell.

For each real fraction the study builds ``data/study/fNNN/``: the main workspace's raw data, plan, store and
metadata (symbolic links; nothing is copied) with an ``accepted.json`` that keeps only the fraction's subset of the
training split plus the whole test split. There the stages run unchanged: extract-rois and train-generator see the
subset's training cases only (validation is carved from the subset, the test split never reaches a generator).
Each synthetic arm gets ``arms/<arm>/`` (the fraction's ROIs and generators linked in) where synthesize and the
synthetic gate run with the arm's settings; each cell (arm, seed) gets ``cells/<arm>/seedN/`` where train and
evaluate run on the same test cases with the same budget (train.synthetic_ratio of the patches drawn from the arm's
store, none for ``real``). Every stage goes through ``run_cached``, so a rerun, an added seed or an added arm
trains only what is new and a killed study resumes where it stopped.

By default the study runs without the synthetic gate's acceptance segmenter. With ``study.acceptance_filter``
(FreeTumor's filter, trained on the subset's real data only), each fraction first trains its ``real`` cell of the
first seed -- a cell the study trains anyway, so nothing extra and the same budget -- and the arms' synthetic gates
score every sample with that segmenter; the arms then train on the samples the gate accepts, also when the gate
fails as a whole (too many rejected), which is the filter's purpose. Without the filter a synthetic gate that fails
as a whole does not stop the study: the arm trains on every sample it made and the failure is reported next to its
numbers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from lesionflow.caching import run_cached
from lesionflow.catalog.artifacts import (
    ACCEPTED,
    EVALUATE_CASES,
    GENERATORS,
    METADATA,
    PLANS,
    RAW,
    ROIS,
    SEGMENTER,
    STORE,
    STUDY_CELLS,
    STUDY_CURVES,
    STUDY_CURVES_PNG,
    STUDY_DETECTION,
    STUDY_EFFECTS_PNG,
    STUDY_SUMMARY,
    STUDY_WORK,
    SYNTHETIC_GATE_REPORT,
    SYNTHETIC_STORE,
)
from lesionflow.catalog.readers import (
    generator_digest,
    judged_store_digest,
    read_json,
    read_metadata,
    require,
    splits,
    write_accepted,
    write_synthetic_verdict,
)
from lesionflow.errors import GateFailed, SourceError
from lesionflow.files import write_json, write_text_if_changed
from lesionflow.params import Params, StudyArm, deep_merge, validate_params
from lesionflow.quality.synthetic_suite import sample_of_row
from lesionflow.stages.registry import STAGES
from lesionflow.store.zarr_store import list_cases
from lesionflow.study.design import ARM_SYNTH, Cell, arm_generators, grid, nested_subsets
from lesionflow.study.report import (
    CASE_METRICS,
    CELL_KEYS,
    cases_saved,
    detection,
    detection_columns,
    effects,
    effects_png,
    learning_curves,
    learning_curves_png,
)
from lesionflow.workspace import Workspace

#: the ``gate`` of the verdict the study writes when an arm's synthetic gate fails and the arm still trains
STUDY_GATE_FAILED = "failed, every sample used by the study"
STUDY_GATE_FILTERED = "failed, the samples it accepted used by the study (acceptance filter)"


@dataclass(frozen=True)
class CellResult:
    cell: Cell
    cases: pd.DataFrame  # evaluate's cases.csv of the cell, means over classes per case
    trained: bool  # False when train was served from its record (an earlier run of the same cell)


def _sub_params(params: Params, overrides: dict[str, Any]) -> Params:
    """The study's params with ``overrides`` (nested dict) merged in; the study never publishes or registers."""
    base = params.model_dump(mode="json")
    fixed = {"storage": {"remote": ""}, "quality": {"synthetic": {"acceptance_model": ""}}}
    return validate_params(deep_merge(deep_merge(base, fixed), overrides))


def _link(target: Path, link: Path) -> None:
    """``link`` -> ``target`` (absolute), replaced when it points elsewhere."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    if link.is_symlink() or link.is_file():
        link.unlink()
    link.symlink_to(target, target_is_directory=target.is_dir())


def _workspace(root: Path, links: Iterable[tuple[Path, Path]], params: Params) -> Workspace:
    """A workspace at ``root`` made of links into other workspaces, with its params.yaml for people to read."""
    ws = Workspace.at(root)
    for target, link in links:
        _link(target, link)
    write_text_if_changed(ws.params_file, yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    return ws


def _data_links(src: Workspace, dst_root: Path) -> list[tuple[Path, Path]]:
    dst = Workspace.at(dst_root)
    return [(a.at(src).resolve(), a.at(dst)) for a in (RAW, STORE, PLANS, METADATA)]


def _run(stage: str, ws: Workspace, params: Params) -> bool:
    """Run ``stage`` in ``ws`` through the cache; True when it did work."""
    return not run_cached(stage, ws, params, STAGES[stage].run).cached


def fraction_workspace(
    ws: Workspace, params: Params, fraction: float, subset: tuple[str, ...], test: tuple[str, ...]
) -> Workspace:
    """``data/study/fNNN``: the main data linked in, the subset (and the test split) as the accepted cases."""
    root = STUDY_WORK.at(ws) / f"f{round(fraction * 100):03d}"
    fws = _workspace(root, _data_links(ws, root), params)
    cases = sorted({*subset, *test})
    write_accepted(fws, cases)  # left untouched when its cases and the metadata it judged are unchanged
    return fws


def _arm_store(
    fws: Workspace, fparams: Params, arm: StudyArm, say: Callable[[str], None], acceptance: Path | None = None
) -> tuple[str, str]:
    """(absolute path of the arm's synthetic store or "" for real, a note on its synthetic gate).

    ``acceptance``: the fraction's real-only segmenter folder for the gate's acceptance filter (None: off)."""
    if arm == "real":
        return "", ""
    root = fws.root / "arms" / arm
    if arm == "copies":  # unmodified real lesion cases of the subset's training split fill the synthetic share
        aws = _workspace(root, [(STORE.at(fws).resolve(), SYNTHETIC_STORE.at(Workspace.at(root)))], fparams)
        rows = read_metadata(fws)
        lesion_cases = [c for c in splits(fws, fparams).train if float(rows[c]["fg_volume_processed_mm3"]) > 0]
        store = SYNTHETIC_STORE.at(aws)  # a verdict of the study's own, recorded with the content it covers
        write_synthetic_verdict(store, judged_store_digest(store), lesion_cases, [], gate="not run: real cases")
        return str(SYNTHETIC_STORE.at(aws)), "real lesion cases of the subset, unmodified"
    overrides: dict[str, Any] = {"synth": ARM_SYNTH[arm]}
    if acceptance is not None:
        overrides["quality"] = {"synthetic": {"acceptance_model": str(acceptance)}}
    aparams = _sub_params(fparams, overrides)
    links = [*_data_links(fws, root), (ACCEPTED.at(fws).resolve(), ACCEPTED.at(Workspace.at(root)))]
    links += [(a.at(fws).resolve(), a.at(Workspace.at(root))) for a in (ROIS, GENERATORS)]
    aws = _workspace(root, links, aparams)
    _run("synthesize", aws, aparams)
    note = "synthetic gate passed"
    try:
        _run("validate-synthetic", aws, aparams)
    except GateFailed as failed:  # the arm is still measured; the failure is reported next to its numbers
        store = SYNTHETIC_STORE.at(aws)  # an explicit, recorded choice: the gate's verdict is "failed"
        every = list_cases(store)
        rows = (read_json(SYNTHETIC_GATE_REPORT.at(aws) / "summary.json") or {}).get("rejected", {})
        rejected = {sample_of_row(row) for row in rows}  # the gate rejects lesion rows; a row rejects its sample
        kept = [c for c in every if c not in rejected]
        if acceptance is not None and kept:  # the filter's purpose: train on what it accepted
            write_synthetic_verdict(store, judged_store_digest(store), kept, sorted(rejected), gate=STUDY_GATE_FILTERED)
            note = f"synthetic gate failed, the {len(kept)} of {len(every)} samples it accepted used: {failed}"
        else:  # every sample it made
            write_synthetic_verdict(store, judged_store_digest(store), every, [], gate=STUDY_GATE_FAILED)
            note = f"synthetic gate failed, every sample used: {failed}"
        say(f"study: {arm} @ {fws.root.name}: {note}")
    return str(SYNTHETIC_STORE.at(aws)), note


def _acceptance_segmenter(
    fws: Workspace, fparams: Params, cells: list[Cell], fraction: float, say: Callable[[str], None]
) -> Path:
    """The fraction's real-only segmenter for the acceptance filter: its ``real`` cell of the first seed, trained
    here (through the cache, so the cell job later finds it done) on the subset's training cases only."""
    first = min((c for c in cells if c.arm == "real" and c.fraction == fraction), key=lambda c: c.seed)
    say(f"study: acceptance filter @ {fws.root.name}: the real cell {first.cell_id} scores the synthetic samples")
    run_cell(CellJob(fws.root, fparams, first, ""))
    return SEGMENTER.at(Workspace.at(fws.root / first.folder)).resolve()


@dataclass(frozen=True)
class CellJob:
    """Everything one cell needs, picklable (a Dask worker may run it): its fraction's workspace and params, the
    cell, and the absolute path of its arm's synthetic store ("" for real)."""

    fraction_root: Path
    fparams: Params
    cell: Cell
    store: str


def run_cell(job: CellJob) -> CellResult:
    """Train and evaluate one cell in ``<fraction>/<cell.folder>`` through the cache (same budget in every cell)."""
    fws = Workspace.at(job.fraction_root)
    root = fws.root / job.cell.folder
    links = [*_data_links(fws, root), (ACCEPTED.at(fws).resolve(), ACCEPTED.at(Workspace.at(root)))]
    train = {
        "seed": job.cell.seed,
        "synthetic_store": job.store,
        "synthetic_ratio": job.cell.ratio if job.store else 0.0,
        # fixed threads: a cell's weights do not depend on how many cells run side by side or on the machine
        "cpu_threads": job.fparams.study.cell_threads,
        # patches are loaded in the cell's own process: a Dask worker is a daemon process and may not start
        # loader processes, and the same setting in-process keeps a cell's numbers independent of the fan-out
        "num_workers": 0,
    }
    cparams = _sub_params(job.fparams, {"train": train})
    cws = _workspace(root, links, cparams)
    trained = _run("train", cws, cparams)
    _run("evaluate", cws, cparams)
    table = pd.read_csv(require(cws, EVALUATE_CASES), dtype={"case_id": str})
    by_case = table.groupby("case_id", sort=True)
    # scores: the mean over the lesion classes (the test metrics' rule); lesion counts: the sum over them
    per_case = pd.concat(
        [by_case[list(CASE_METRICS)].mean(), by_case[detection_columns(list(table.columns))].sum()], axis=1
    ).reset_index()
    return CellResult(job.cell, per_case, trained)


def _run_cells(jobs: list[CellJob], params: Params, say: Callable[[str], None]) -> list[CellResult]:
    """Every cell: one after another in this process, or side by side on Dask when study.workers > 1 (or a
    scheduler address is given). Results come back in the order of ``jobs`` either way."""
    sp = params.study
    if sp.workers == 1 and not sp.scheduler_address:
        results = []
        for i, job in enumerate(jobs, 1):
            # one line per cell: the stages inside draw their own progress bars (rich allows one at a time)
            say(f"study: cell {i}/{len(jobs)} {job.cell.cell_id}")
            results.append(run_cell(job))
        return results
    from lesionflow.parallel import completed, dask_client
    from lesionflow.progress import rich_progress

    with dask_client(sp.workers, "auto", sp.scheduler_address, say=say) as client:
        futures = {
            client.submit(run_cell, job, pure=False, key=f"study-cell-{job.cell.cell_id}"): i
            for i, job in enumerate(jobs)
        }
        done: dict[int, CellResult] = {}
        for future in rich_progress(completed(client, futures, "study"), f"study: {len(jobs)} cells", len(jobs)):
            done[futures[future]] = future.result()
    return [done[i] for i in range(len(jobs))]


@dataclass(frozen=True)
class StudyReport:
    summary: dict[str, Any]
    cells: pd.DataFrame
    n_trained: int
    n_cached: int
    mlflow_parent_run: str = ""  # the study's parent run in MLflow ("" when study.mlflow is off or unreachable)


def run_study(ws: Workspace, params: Params, *, say: Callable[[str], None] = print) -> StudyReport:
    """The study of ``params.study`` on the processed workspace ``ws``; writes reports/study and returns it."""
    sp = params.study
    split = splits(ws, params)
    if len(split.test) < 2:
        raise SourceError(
            f"the test split holds {len(split.test)} accepted case(s); the study pairs arms on at least 2 test cases: "
            "ingest more test cases (MSD imagesTs/labelsTs) or raise ingest.test_fraction"
        )
    rows = read_metadata(ws)
    pool = sorted({*split.train, *split.val})
    has_lesion = {c: float(rows[c]["fg_volume_processed_mm3"]) > 0 for c in pool}
    subsets = nested_subsets(has_lesion, sp.fractions, params.project.seed, min_cases=sp.min_lesion_cases)
    arms: list[StudyArm] = list(sp.arms)
    needs = arm_generators(arms)
    fraction_overrides: dict[str, Any] = {"synth": {"generators": needs or ["lefusion"], "method": "lefusion"}}
    fparams = _sub_params(params, fraction_overrides)
    cells = grid(arms, sp.fractions, sp.seeds, sp.synthetic_ratio, sp.dose_ratios)
    jobs: list[CellJob] = []
    notes: dict[str, str] = {}
    generators: dict[float, dict[str, str]] = {}  # weights digests per fraction: the gate's utility-in-the-loop key
    for fraction in sorted(subsets):
        fws = fraction_workspace(ws, fparams, fraction, subsets[fraction], split.test)
        if needs or "copy-paste" in arms:
            _run("extract-rois", fws, fparams)
        if needs:
            _run("train-generator", fws, fparams)
        generators[fraction] = {name: generator_digest(fws, name) for name in needs}
        acceptance = _acceptance_segmenter(fws, fparams, cells, fraction, say) if sp.acceptance_filter else None
        stores: dict[str, str] = {}
        for arm in arms:
            stores[arm], notes[f"{arm}@{round(fraction * 100)}"] = _arm_store(fws, fparams, arm, say, acceptance)
        jobs += [CellJob(fws.root, fparams, c, stores[c.arm]) for c in cells if c.fraction == fraction]
    results = _run_cells(jobs, params, say)
    report = _report(ws, params, results, subsets, generators, notes)
    return _log_to_mlflow(ws, params, report, say) if sp.mlflow else report


def _log_to_mlflow(ws: Workspace, params: Params, report: StudyReport, say: Callable[[str], None]) -> StudyReport:
    """The study as an MLflow parent run with one child per cell; an unreachable server costs one line, not the
    study (its results are on disk)."""
    from lesionflow.registry.study_runs import log_study
    from lesionflow.registry.tracking import RegistryUnavailable, resolve_tracking_uri

    uri = resolve_tracking_uri(params.registry.tracking_uri, ws.root)
    files = [a.at(ws) for a in (STUDY_SUMMARY, STUDY_CELLS, STUDY_CURVES_PNG, STUDY_EFFECTS_PNG, STUDY_DETECTION)]
    study = params.study.model_dump(mode="json")
    try:
        runs = log_study(
            uri,
            f"{params.registry.experiment}-utility-study",
            STUDY_SUMMARY.at(ws),
            study,
            report.cells,
            report.summary["effects"],
            files,
        )
    except RegistryUnavailable as err:
        say(f"study: not logged to MLflow: {err}")
        return report
    what = "logged" if runs.logged else "already logged"
    say(
        f"study: {what} to MLflow {runs.tracking_uri}, experiment {runs.experiment}: parent run "
        f"{runs.parent_run_id} with {runs.n_children} cell runs"
    )
    return replace(report, mlflow_parent_run=runs.parent_run_id)


def _report(
    ws: Workspace,
    params: Params,
    results: list[CellResult],
    subsets: dict[float, tuple[str, ...]],
    generators: dict[float, dict[str, str]],
    notes: dict[str, str],
) -> StudyReport:
    sp = params.study
    frames = [
        r.cases.assign(arm=r.cell.arm, fraction=r.cell.fraction, ratio=r.cell.ratio, dose=r.cell.dose, seed=r.cell.seed)
        for r in results
    ]
    table = pd.concat(frames, ignore_index=True)
    table = table[[*CELL_KEYS, *CASE_METRICS, *detection_columns(list(table.columns))]]
    table = table.sort_values(["fraction", "arm", "ratio", "seed", "case_id"], kind="stable").reset_index(drop=True)
    table[list(CASE_METRICS)] = table[list(CASE_METRICS)].round(6)  # the statistics use exactly what cells.csv holds
    STUDY_CELLS.at(ws).parent.mkdir(parents=True, exist_ok=True)
    write_text_if_changed(STUDY_CELLS.at(ws), table.to_csv(index=False, float_format="%.6f", lineterminator="\n"))
    curves = learning_curves(table, seed=params.project.seed, n_resamples=sp.bootstrap_resamples)
    write_text_if_changed(STUDY_CURVES.at(ws), curves.to_csv(index=False, float_format="%.6f", lineterminator="\n"))
    effect_rows = effects(table, sp.arms, seed=params.project.seed, n_resamples=sp.bootstrap_resamples)
    saved = cases_saved(curves, sp.arms, sp.saved_tolerance)
    found = detection(table)
    if found:
        detection_csv = pd.DataFrame(found).to_csv(index=False, float_format="%.6f", lineterminator="\n")
        write_text_if_changed(STUDY_DETECTION.at(ws), detection_csv)
    n_trained = sum(r.trained for r in results)
    summary = {
        "arms": list(sp.arms),
        "fractions": {
            f"{f:g}": {"n_training_cases": len(c), "cases": list(c), "generators": generators.get(f, {})}
            for f, c in sorted(subsets.items())
        },
        "seeds": list(sp.seeds),  # segmenter seeds (train.seed) of every cell
        "generator_seed": params.project.seed,  # subsets, generators and synthesis derive from it, fixed per fraction
        "n_test_cases": int(table["case_id"].nunique()),
        "synthetic_ratio": sp.synthetic_ratio,
        "acceptance_filter": sp.acceptance_filter,  # FreeTumor's filter with each fraction's real-only segmenter
        "dose_ratios": [r for r in sp.dose_ratios if r != sp.synthetic_ratio],  # at the smallest fraction only
        "metric": "test Dice per case (mean over lesion classes), paired by case and seed",
        "effects": effect_rows,
        "real_cases_saved": saved,
        "detection": found,  # lesion-level sensitivity per size bin and false positives per case (reports/study)
        "saved_tolerance": sp.saved_tolerance,
        "real_curve": _real_curve_note(curves, sp.saved_tolerance),
        "curves": curves.to_dict(orient="records"),
        "arm_notes": notes,
        "n_cells": len(results),
    }
    write_json(STUDY_SUMMARY.at(ws), summary)
    learning_curves_png(curves, STUDY_CURVES_PNG.at(ws))
    effects_png(effect_rows, STUDY_EFFECTS_PNG.at(ws))
    return StudyReport(summary, table, n_trained, len(results) - n_trained)


def _real_curve_note(curves: pd.DataFrame, tolerance: float) -> dict[str, Any]:
    """How much ``real`` gains from its smallest to its largest fraction; a flat curve makes "saved" uninformative."""
    real = curves[curves["arm"] == "real"].sort_values("fraction")
    gain = float(real["mean_dice"].iloc[-1] - real["mean_dice"].iloc[0]) if len(real) else 0.0
    note = (
        "real already reaches its largest-fraction Dice at the smallest fraction: 'real cases saved' says nothing "
        "here (the segmenter's budget, not the data, limits it; try more train.steps or a GPU preset)"
        if gain <= tolerance
        else "real improves with more real cases: 'real cases saved' reads the learning curve"
    )
    return {"gain_smallest_to_largest": gain, "note": note}


def check_ready(ws: Workspace) -> None:
    """The study starts from a processed workspace (the pipeline up to validate-processed)."""
    for artifact in (PLANS, METADATA, ACCEPTED):
        if not artifact.at(ws).exists():
            raise SourceError(
                f"{artifact.path} does not exist: the study starts from a processed workspace; run `lesionflow run` "
                f"(or the stages up to validate-processed) first"
            )
    if not STORE.at(ws).is_dir():
        raise SourceError(f"{STORE.path} is missing; run `lesionflow stage preprocess` first")
