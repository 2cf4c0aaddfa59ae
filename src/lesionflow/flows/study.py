"""The utility-study flow: does synthetic data make the segmenter better? (lesionflow.study.runner)

Runs every cell of ``params.study`` (arms x nested real fractions x segmenter seeds) on a processed workspace,
holding the workspace lock, then attaches the effects table, the learning curves and the forest plot to the flow
run. Cells are cached by content: rerunning, adding a seed or an arm trains only the new cells.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from lesionflow.catalog.artifacts import STUDY_CURVES_PNG, STUDY_EFFECTS_PNG, STUDY_SUMMARY
from lesionflow.errors import LesionflowError
from lesionflow.flows.common import DEFAULT_LOCK_TIMEOUT_S, fail, resolve_params
from lesionflow.flows.forms import Overrides
from lesionflow.params import ProjectParams, StudyParams, TrainParams
from lesionflow.params_synth import SynthParams
from lesionflow.workspace import Workspace
from lesionflow.workspace_lock import workspace_lock

FLOW_NAME = "lesionflow-utility-study"


def effects_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The effects table people read: one row per (fraction, arm) against real, in Dice points."""
    saved = summary.get("real_cases_saved", {})
    rows = []
    for e in summary.get("effects", []):
        share = saved.get(e["arm"])
        rows.append(
            {
                "real share": f"{e['fraction']:g}",
                "arm": f"{e['arm']} x{e['ratio']:g}" if e.get("dose") else e["arm"],
                "Δ Dice pts": f"{100 * e['mean']:+.2f}",
                "95% CI": f"[{100 * e['ci_low']:+.2f}, {100 * e['ci_high']:+.2f}]",
                "p Holm": f"{e['p_holm']:.3f}",
                "cases": e["n_cases"],
                "matches real@max at": "never" if share is None else f"{share:.2f}",
            }
        )
    return rows


def detection_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Lesion-level detection people read: sensitivity per lesion size bin and false positives per case."""
    rows = []
    for d in summary.get("detection", []):
        sensitivity = d["sensitivity"]
        rows.append(
            {
                "real share": f"{d['fraction']:g}",
                "arm": d["arm"]
                if d["arm"] == "real" or d["ratio"] == summary["synthetic_ratio"]
                else f"{d['arm']} x{d['ratio']:g}",
                "lesion size": d["size_bin"],
                "sensitivity": "-" if sensitivity is None else f"{sensitivity:.3f}",
                "found / lesions": f"{d['detected']}/{d['lesions']}",
                "FP per case": f"{d['false_positives_per_case']:.2f}",
            }
        )
    return rows


def _publish(ws: Workspace, summary: dict[str, Any]) -> None:
    from lesionflow.tasks.artifacts import ArtifactSpec, image_artifact, publish

    rows = effects_rows(summary)
    specs = [ArtifactSpec("table", "study-effects", "Each arm against real (Dice points, 95% CI)", table=rows)]
    if summary.get("detection"):
        found = detection_rows(summary)
        specs.append(ArtifactSpec("table", "study-detection", "Lesion-level sensitivity by lesion size", table=found))
    for picture in (STUDY_CURVES_PNG, STUDY_EFFECTS_PNG):
        specs += image_artifact(ws, "study", picture)
    publish(specs)


@flow(name=FLOW_NAME, log_prints=True)
def utility_study(
    workspace: str = ".",
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    study: Overrides[StudyParams] | None = None,
    project: Overrides[ProjectParams] | None = None,
    synth: Overrides[SynthParams] | None = None,
    train: Overrides[TrainParams] | None = None,
    wait_for_lock: bool = True,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> dict[str, Any]:
    """Measure whether synthetic lesions help: every arm against real-only, paired by test case and seed.

    Args:
        workspace: Workspace root (processed through validate-processed); relative to the worker's directory.
        params_file: params.yaml to read, relative to the workspace unless absolute.
        overrides: Extra `section.key=value` overrides, applied last (e.g. study.seeds=[0,1,2,3]).
        study: Overrides of the `study` section (arms, fractions, seeds, synthetic_ratio); only the keys given.
        project: Overrides of the `project` section (the seed of the subsets and the generators); only the keys given.
        synth: Overrides of the `synth` section (generator sizes, sample counts) for every arm; only the keys given.
        train: Overrides of the `train` section (the budget every cell gets: steps, patch size); only the keys given.
        wait_for_lock: When another run holds the workspace, wait for it (true) or fail at once (false).
        lock_timeout_s: Longest wait for the workspace lock, in seconds (0: no limit).

    Returns:
        The study summary (reports/study/summary.json).
    """
    from lesionflow.study.runner import check_ready, run_study

    try:
        ws = Workspace.at(workspace)
        sections = {"study": study, "project": project, "synth": synth, "train": train}
        params = resolve_params(ws, params_file, overrides, sections)
        with workspace_lock(ws.root, wait=wait_for_lock, timeout_s=lock_timeout_s, purpose=f"flow {FLOW_NAME}"):
            check_ready(ws)
            report = run_study(ws, params)
    except LesionflowError as error:
        print(f"{FLOW_NAME} failed: {error}")
        failed: Any = fail(error)  # a Failed state: Prefect ends the run with the one line, callers get the error
        return failed
    summary = dict(report.summary)
    print(f"study: {report.n_trained} cell(s) trained, {report.n_cached} from earlier runs; see {STUDY_SUMMARY.path}")
    _publish(ws, summary)
    return {
        **summary,
        "n_trained": report.n_trained,
        "n_cached": report.n_cached,
        "mlflow_parent_run": report.mlflow_parent_run,
    }


if __name__ == "__main__":
    utility_study()
