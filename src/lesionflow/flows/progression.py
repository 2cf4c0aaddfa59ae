"""The progression flow: one PIE trajectory for one case toward one target severity, runnable from the Prefect UI.

Needs a trained ``pie`` generator (``lesionflow stage train-generator`` with ``pie`` in ``synth.generators``)
and the case in data/processed. The trajectory lands next to the ones `synthesize` makes
(``data/synthetic/progression.zarr/<case>__pie<target%>``, ``data/synthetic/progression.json``) with its GIF and PNG
strip under ``reports/synthesize/progression/``; the same case, target and params return the stored trajectory.
The flow publishes the trajectory's record and pictures as artifacts.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from lesionflow.catalog.artifacts import PROGRESSION_PICTURES
from lesionflow.errors import LesionflowError
from lesionflow.flows.common import DEFAULT_LOCK_TIMEOUT_S, fail
from lesionflow.params import load_params
from lesionflow.workspace import Workspace
from lesionflow.workspace_lock import workspace_lock


@task(name="pie-trajectory", task_run_name="{case_id} -> {target_severity}")
def pie_trajectory(
    workspace: str, params_file: str, case_id: str, target_severity: float, roi_mask: str, whole_volume: bool
) -> dict[str, Any]:
    from lesionflow.stages.synthesize.trajectories import run_one

    ws = Workspace.at(workspace)
    params = load_params(ws.path(params_file), [])
    return run_one(ws, params, case_id, target_severity, roi_mask_file=roi_mask, whole_volume=whole_volume)


def _number(value: float | None) -> str:
    return "n/a (target = start severity)" if value is None else f"{value:.3f}"


def _markdown(record: dict[str, Any], workspace: Workspace) -> str:
    tid = record["trajectory_id"]
    pictures = PROGRESSION_PICTURES.at(workspace)
    severities = ", ".join(str(v) for v in record["frame_severity_voxels"])
    return "\n".join(
        [
            f"# PIE trajectory `{tid}`",
            "",
            "| key | value |",
            "|---|---|",
            f"| source case | {record['source_case']} (start: {record['start']}) |",
            f"| severity | {record['start_severity']:.3f} -> {record['target_severity']:.3f} |",
            f"| frames | {record['frames']} |",
            f"| lesion voxels per frame | {severities} |",
            f"| Spearman rho (trend) | {_number(record['trend_rho'])} |",
            f"| step change ratio | {record['step_change_ratio']:.3f} |",
            f"| max change outside the ROI | {record['outside_max_change']:.3g} |",
            f"| seed | {record['seed']} |",
            "",
            f"Animated GIF: `{pictures / (tid + '.gif')}`  ",
            f"PNG strip: `{pictures / (tid + '.png')}`",
        ]
    )


@flow(name="lesionflow-progression", log_prints=True)
def progression_flow(
    case_id: Annotated[str, Field(description="Processed case id (data/processed/store.zarr) to start from.")],
    target_severity: Annotated[
        float, Field(ge=0.0, le=1.0, description="Severity to move toward: 0 = healthy, 1 = the most severe seen.")
    ] = 1.0,
    workspace: Annotated[str, Field(description="Workspace root (params.yaml, data/, models/).")] = ".",
    params_file: Annotated[str, Field(description="Params file inside the workspace.")] = "params.yaml",
    roi_mask: Annotated[
        str, Field(description="Optional ROI mask (.npy or NIfTI on the processed grid); empty = derived.")
    ] = "",
    whole_volume: Annotated[
        bool, Field(description="Edit the whole crop instead of a ROI (the paper saw hallucinations).")
    ] = False,
) -> dict[str, Any]:
    """Make (or return the stored) PIE trajectory of ``case_id`` toward ``target_severity``."""
    ws = Workspace.at(workspace)
    try:
        # the trajectory store and manifest are shared with `synthesize`: one writer per workspace at a time
        with workspace_lock(ws.root, wait=True, timeout_s=DEFAULT_LOCK_TIMEOUT_S, purpose="flow progression"):
            record = pie_trajectory(workspace, params_file, case_id, target_severity, roi_mask, whole_volume)
    except LesionflowError as error:
        print(f"progression failed: {error}")
        return fail(error)  # one line in the UI, not the worker's traceback
    create_markdown_artifact(
        markdown=_markdown(record, ws),
        key=re.sub(r"[^a-z0-9-]+", "-", f"pie-{record['trajectory_id']}".lower()),
        description=f"PIE trajectory of {case_id}",
    )
    print(
        f"trajectory {record['trajectory_id']}: {record['frames']} frames, lesion voxels "
        f"{record['frame_severity_voxels'][0]} -> {record['frame_severity_voxels'][-1]}, "
        f"rho {_number(record['trend_rho'])}"
    )
    return record


if __name__ == "__main__":
    import sys

    progression_flow(case_id=sys.argv[1], target_severity=float(sys.argv[2]) if len(sys.argv) > 2 else 1.0)
