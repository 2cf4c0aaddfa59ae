"""The training pipeline flow: every registered stage in order, each as a Prefect task.

Stages: ingest -> validate-raw -> plan -> preprocess -> validate-processed -> train -> evaluate ->
validate-metrics -> register (synthesis joins in a later issue).
After each stage the flow runs ``dvc commit`` for it (and data.dvc), so dvc.lock records what the flow
produced and ``dvc status`` is clean. A failed gate fails its task and stops the flow.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from lesionflow.params import load_params
from lesionflow.stages import pipeline_order
from lesionflow.workspace import Workspace
from tasks.stages import dvc_commit, run_stage


@flow(name="lesionflow-pipeline", log_prints=True)
def training_pipeline(
    workspace: str = ".", params_file: str = "params.yaml", overrides: list[str] | None = None
) -> list[dict[str, Any]]:
    """Run the pipeline in ``workspace`` with ``params_file`` and ``section.key=value`` overrides."""
    ws = Workspace.at(workspace)
    params = load_params(ws.path(params_file), list(overrides or []))
    params_json = params.model_dump(mode="json")
    results = []
    for stage in pipeline_order():
        result = run_stage(stage, str(ws.root), params_json)
        for finding in result["findings"]:
            print(f"{stage}: {finding['subject']}: {finding['detail']} [{finding['code']}]")
        if result["cached"]:  # nothing ran, nothing new to record in dvc.lock
            pass
        elif overrides:
            print(f"{stage}: not recorded in dvc.lock (ran with overrides {overrides}; dvc.lock follows params.yaml)")
        else:
            dvc_commit(str(ws.root), ["data.dvc", stage])
        results.append(result)
    return results


if __name__ == "__main__":
    training_pipeline()
