"""The flows' typed parameters (what the Prefect UI form shows), their artifacts, gates and lock, on a real harness."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml
from prefect import Flow, flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.states import Failed
from prefect.testing.utilities import prefect_test_harness
from prefect.utilities.callables import parameter_schema_from_entrypoint

from lesionflow.errors import GateFailed, LesionflowError
from lesionflow.flows.common import resolve_params
from lesionflow.flows.forms import partial_model
from lesionflow.flows.ingest import ingest_flow
from lesionflow.flows.pipeline import training_pipeline
from lesionflow.flows.synthesis import synthesis_flow
from lesionflow.params import Params, load_params
from lesionflow.registry.tracking import RegistryUnavailable
from lesionflow.stages.registry import STAGES, pipeline_order
from lesionflow.tasks import artifacts as artifacts_module
from lesionflow.tasks.artifacts import publish, stage_artifacts
from lesionflow.tasks.stages import (
    DVC_RETRY_DELAYS_S,
    REGISTRY_RETRY_DELAYS_S,
    dvc_commit,
    dvc_lock_busy,
    registry_unreachable,
    run_stage,
)
from lesionflow.workspace import Workspace
from lesionflow.workspace_lock import WorkspaceLocked, workspace_lock
from tests.helpers.volumes import write_msd

REPO = Path(__file__).resolve().parents[2]
FLOWS: dict[str, tuple[Flow[..., Any], tuple[str, ...]]] = {
    "lesionflow.flows.pipeline.training_pipeline": (training_pipeline, tuple(pipeline_order())),
    "lesionflow.flows.ingest.ingest_flow": (ingest_flow, ("ingest", "validate-raw")),
    "lesionflow.flows.synthesis.synthesis_flow": (
        synthesis_flow,
        ("extract-rois", "train-generator", "synthesize", "validate-synthetic"),
    ),
}
# a 1x1 transparent PNG: the artifact tests only need real PNG bytes
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


# ------------------------------------------------------------------------------------------ no server needed


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = next(item["$ref"] for item in node["anyOf"] if "$ref" in item)
    return dict(schema["definitions"][ref.split("/")[-1]])


@pytest.mark.parametrize("entrypoint", list(FLOWS))
def test_flow_parameters_show_params_sections_with_types_and_descriptions(entrypoint: str) -> None:
    the_flow, stages = FLOWS[entrypoint]
    schema = the_flow.parameters.model_dump()
    props = schema["properties"]
    for name, default in (("workspace", "."), ("params_file", "params.yaml"), ("wait_for_lock", True)):
        assert props[name]["default"] == default
        assert props[name]["description"]
    # exactly the params sections the flow's stages read, each one the partial model of lesionflow.params' section
    read = {key.split(".")[0] for stage in stages for key in STAGES[stage].params}
    sections = {name for name in props if name in Params.model_fields}
    assert sections == read
    for name in sections:
        assert props[name]["default"] is None  # None: params.yaml as it is
        assert "only the keys given" in props[name]["description"]
        model = _resolve(schema, props[name])
        expected = type(getattr(Params(), name))
        assert (
            model["title"] == partial_model(expected).__name__ == expected.__name__.removesuffix("Params") + "Overrides"
        )
        assert set(model["properties"]) == set(expected.model_fields)
        for field_name, info in expected.model_fields.items():
            field = model["properties"][field_name]
            if info.description:  # every key shows its description; none a default (the form would submit it)
                assert field["description"] == info.description
            assert "default" not in field, (name, field_name)
    # `prefect deploy` builds the form from the source file; it must be the same form
    assert parameter_schema_from_entrypoint(entrypoint).model_dump() == schema


def test_training_pipeline_form_shows_train_keys() -> None:
    schema = training_pipeline.parameters.model_dump()
    train = _resolve(schema, schema["properties"]["train"])
    assert train["properties"]["steps"]["type"] == "integer"
    assert train["properties"]["steps"]["minimum"] == 1
    assert train["properties"]["network"]["enum"] == ["unet", "dynunet", "swinunetr"]
    augmentation = train["properties"]["augmentation"]  # a nested section: its own partial model
    assert augmentation["$ref"].endswith("/AugmentOverrides")
    assert schema["definitions"]["AugmentOverrides"]["properties"]["flip_prob"]["maximum"] == 1


def test_section_overrides_replace_only_the_keys_given(workspace: Path) -> None:
    text = (workspace / "params.yaml").read_text()
    raw = yaml.safe_load(text)
    raw["quality"]["raw"]["spacing_mm"] = [0.2, 9.0]  # a non-default value that must survive the override
    (workspace / "params.yaml").write_text(yaml.safe_dump(raw))
    # what Prefect hands the flow for {"quality": {"raw": {"min_cases": 3}}} from the UI or --param
    given = ingest_flow.validate_parameters({"quality": {"raw": {"min_cases": 3}}, "project": {"seed": 5}})
    sections = {"quality": given["quality"], "project": given["project"], "ingest": None}
    params = resolve_params(Workspace.at(workspace), "params.yaml", ["project.seed=7"], sections)
    assert params.quality.raw.min_cases == 3
    assert params.quality.raw.spacing_mm == (0.2, 9.0)
    assert params.quality.max_reject_fraction == raw["quality"]["max_reject_fraction"]
    assert params.project.seed == 7  # `overrides` come last
    assert resolve_params(Workspace.at(workspace), "params.yaml", None, {}) == load_params(workspace / "params.yaml")


def test_retries_only_at_io_edges() -> None:
    """The stage task retries only a registry outage; dvc commit only DVC's lock; both with backoff."""
    assert run_stage.retries == len(REGISTRY_RETRY_DELAYS_S)
    assert run_stage.retry_delay_seconds == REGISTRY_RETRY_DELAYS_S
    assert sorted(REGISTRY_RETRY_DELAYS_S) == REGISTRY_RETRY_DELAYS_S
    assert dvc_commit.retry_delay_seconds == DVC_RETRY_DELAYS_S
    task_run: Any = None

    def state(error: Exception) -> Any:
        return Failed(data=error)

    assert registry_unreachable(run_stage, task_run, state(RegistryUnavailable("MLflow server is unreachable")))
    assert not registry_unreachable(run_stage, task_run, state(GateFailed("raw quality gate failed")))
    assert not registry_unreachable(run_stage, task_run, state(LesionflowError("params: bad")))
    busy = LesionflowError("dvc commit data.dvc ingest failed: ERROR: Unable to acquire lock. Most likely ...")
    assert dvc_lock_busy(dvc_commit, task_run, state(busy))
    assert not dvc_lock_busy(dvc_commit, task_run, state(LesionflowError("dvc commit failed: ERROR: dvc.lock is bad")))


# ------------------------------------------------------------------------------------------ on the harness


@pytest.fixture(scope="module", autouse=True)
def prefect_harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _artifacts(flow_run_id: UUID) -> dict[str, Any]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {a.key: a for a in found if a.key}


def _table(artifact: Any) -> list[dict[str, Any]]:
    data = json.loads(artifact.data)
    if isinstance(data, dict):  # dict of columns -> rows
        return [dict(zip(data, row, strict=True)) for row in zip(*data.values(), strict=True)]
    return list(data)


def test_ingest_flow_runs_both_stages_and_attaches_the_gate_report(workspace: Path) -> None:
    write_msd(workspace / "data" / "demo", n_train=3, n_test=0)
    state = ingest_flow(workspace=str(workspace), return_state=True)
    assert state.is_completed(), state.message
    results = state.result()
    assert [r["stage"] for r in results] == ["ingest", "validate-raw"]
    assert results[0]["summary"]["n_stored"] == 3
    assert state.state_details.flow_run_id is not None
    found = _artifacts(state.state_details.flow_run_id)
    assert _table(found["validate-raw-failed-checks"]) == []  # every expectation passed
    assert "raw gate PASSED" in found["validate-raw-failed-checks"].description
    report = workspace / "reports" / "quality" / "raw" / "index.html"
    assert found["validate-raw-report"].data == f"[validate-raw report]({report.as_uri()})"
    assert report.is_file()
    stages = _table(found["lesionflow-ingest-stages"])
    assert [(r["stage"], r["status"]) for r in stages] == [("ingest", "ok"), ("validate-raw", "ok")]
    assert not (workspace / ".lesionflow" / "lock").read_text()  # released: the holder record is emptied


def test_failed_gate_stops_the_flow_with_its_failed_checks_and_report(workspace: Path) -> None:
    write_msd(workspace / "data" / "demo", n_train=3, n_test=0)
    state = ingest_flow(workspace=str(workspace), quality={"raw": {"min_cases": 50}}, return_state=True)
    assert state.is_failed()
    assert "raw quality gate failed" in str(state.message)
    assert "\n" not in str(state.message)  # one line
    with pytest.raises(GateFailed):
        state.result()
    assert state.state_details.flow_run_id is not None
    found = _artifacts(state.state_details.flow_run_id)
    rows = _table(found["validate-raw-failed-checks"])
    assert any(r["case"] == "(dataset)" and "quality.raw.min_cases" in r["detail"] for r in rows), rows
    assert "raw gate FAILED" in found["validate-raw-failed-checks"].description
    assert "validate-raw-report" in found
    stages = {r["stage"]: r["status"] for r in _table(found["lesionflow-ingest-stages"])}
    assert stages == {"ingest": "ok", "validate-raw": "failed"}


def test_direct_call_raises_the_gate_error_for_the_cli(workspace: Path) -> None:
    write_msd(workspace / "data" / "demo", n_train=2, n_test=0)
    with pytest.raises(GateFailed) as info:
        ingest_flow(workspace=str(workspace), overrides=["quality.raw.min_cases=9"])
    assert info.value.findings  # the CLI prints them as a table before the one line


def test_synthesis_flow_refuses_before_the_processed_gate_ran(workspace: Path) -> None:
    with pytest.raises(LesionflowError, match="never run there: ingest, validate-raw, plan, preprocess") as info:
        synthesis_flow(workspace=str(workspace))
    assert "lesionflow run" in str(info.value)
    assert not (workspace / "data" / "rois").exists()


def test_flow_refuses_a_workspace_another_run_holds(workspace: Path) -> None:
    write_msd(workspace / "data" / "demo", n_train=2, n_test=0)
    with workspace_lock(workspace, purpose="test holder"), pytest.raises(WorkspaceLocked, match="test holder"):
        ingest_flow(workspace=str(workspace), wait_for_lock=False)
    assert not (workspace / "data" / "raw").exists()  # nothing ran


def test_stage_artifacts_for_train_register_synthesis(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train: metric table + curves image; register: markdown with version and lineage; montage and samples."""
    ws = Workspace.at(workspace)
    reports = ws.root / "reports"
    (reports / "train").mkdir(parents=True)
    (reports / "train" / "summary.json").write_text(json.dumps({"steps_done": 6, "final_loss": 0.5, "device": "cpu"}))
    (reports / "train" / "curves.png").write_bytes(PNG)
    (reports / "register").mkdir()
    register = {
        "model_name": "lesionflow-seg",
        "version": 3,
        "run_id": "abc",
        "model_uri": "models:/lesionflow-seg/3",
        "aliases": ["candidate", "champion"],
        "champion_status": "passed",
        "reused_existing_version": False,
        "lineage": "lesionflow lineage lesionflow-seg/3",
    }
    (reports / "register" / "summary.json").write_text(json.dumps(register))
    (reports / "validate-synthetic").mkdir()
    (reports / "validate-synthetic" / "montage.png").write_bytes(PNG * 4)
    (reports / "synthesize").mkdir()
    (reports / "synthesize" / "summary.json").write_text(
        json.dumps({"n_samples": 3, "by_kind": {"new": 2, "relesion": 1}, "n_lesions": 4, "generator_model": "g"})
    )
    params = load_params(ws.params_file)
    monkeypatch.setattr(artifacts_module, "MAX_INLINE_IMAGE_BYTES", len(PNG) * 2)  # the montage is "too big"

    @flow
    def show() -> list[str]:
        keys: list[str] = []
        for stage in ("train", "register", "synthesize", "validate-synthetic"):
            keys += publish(stage_artifacts(stage, ws, params, {}))
        return keys

    state = show(return_state=True)
    assert state.result() == [
        "train-metrics",
        "train-curves",
        "register-model",
        "synthesize-samples",
        "validate-synthetic-montage",
    ]
    assert state.state_details.flow_run_id is not None
    found = _artifacts(state.state_details.flow_run_id)
    assert _table(found["train-metrics"]) == [
        {"metric": "final_loss", "value": 0.5},
        {"metric": "steps_done", "value": 6},
    ]
    curves = found["train-curves"]
    assert curves.type == "image"
    assert base64.b64decode(curves.data.removeprefix("data:image/png;base64,")) == PNG
    markdown = found["register-model"].data
    assert found["register-model"].type == "markdown"
    assert "version 3" in markdown
    assert "lesionflow lineage lesionflow-seg/3" in markdown
    assert "champion" in markdown
    assert _table(found["synthesize-samples"])[-1] == {"kind": "total", "samples": 3}
    montage = found["validate-synthetic-montage"]  # over the inline limit: a file:// link instead
    assert (
        montage.data
        == f"[reports/validate-synthetic/montage.png]({(reports / 'validate-synthetic' / 'montage.png').as_uri()})"
    )


def test_publish_outside_a_run_does_nothing(workspace: Path) -> None:
    (workspace / "reports" / "train").mkdir(parents=True)
    (workspace / "reports" / "train" / "curves.png").write_bytes(PNG)
    specs = stage_artifacts("train", Workspace.at(workspace), Params(), {})
    assert [s.key for s in specs] == ["train-curves"]
    assert publish(specs) == []


def test_failed_stage_publishes_only_what_this_run_wrote(workspace: Path) -> None:
    """After a gate failure its report is this run's; after any other failure the files may be an older run's."""
    folder = workspace / "reports" / "quality" / "raw"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"gate": "raw", "success": False, "dataset_failures": []}))
    (folder / "index.html").write_text("<html></html>")
    ws = Workspace.at(workspace)
    assert stage_artifacts("validate-raw", ws, Params(), None) == []
    keys = [s.key for s in stage_artifacts("validate-raw", ws, Params(), None, gate_failed=True)]
    assert keys == ["validate-raw-failed-checks", "validate-raw-report"]
    assert stage_artifacts("train", ws, Params(), None, gate_failed=True) == []
