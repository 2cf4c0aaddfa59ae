"""The ``lesionflow`` command. An adapter: it parses arguments, loads typed params and calls stages.

dvc.yaml calls ``lesionflow stage NAME``; ``lesionflow run`` runs the same stages through the Prefect flow.
Errors a user can fix print one line and exit 2; they never show a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from lesionflow.errors import LesionflowError

# Telemetry off and nothing fetched at run time (stack.md lists what each variable silences).
QUIET_ENV = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "DVC_STUDIO_OFFLINE": "1",
    "GX_ANALYTICS_ENABLED": "false",
}

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="lesionflow: reproducible lesion segmentation pipelines (Prefect + DVC + Zarr + GX + MLflow).",
)
params_app = typer.Typer(no_args_is_help=True, help="Inspect and validate params.yaml.")
app.add_typer(params_app, name="params", help="Inspect and validate params.yaml.")

err = Console(stderr=True)
out = Console()

WorkspaceOpt = Annotated[Path, typer.Option("--workspace", "-w", help="Workspace root (holds params.yaml, data/).")]
ParamsOpt = Annotated[Path | None, typer.Option("--params", help="params.yaml (default: <workspace>/params.yaml).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a param: section.key=value (repeatable).")]


def _load(workspace: Path, params_file: Path | None, overrides: list[str] | None) -> tuple[Any, Any]:
    from lesionflow.params import load_params
    from lesionflow.workspace import Workspace

    ws = Workspace.at(workspace)
    return ws, load_params(params_file or ws.params_file, overrides or [])


@params_app.command("check")
def params_check(workspace: WorkspaceOpt = Path("."), params_file: ParamsOpt = None, overrides: SetOpt = None) -> None:
    """Validate params.yaml (and overrides); print each section when valid."""
    _, params = _load(workspace, params_file, overrides)
    table = Table("section", "values", title="params.yaml is valid")
    for name in type(params).model_fields:
        table.add_row(name, str(getattr(params, name).model_dump(mode="json")))
    out.print(table)


@app.command("demo-data")
def demo_data(
    kind: Annotated[str | None, typer.Argument(help="brain-mri or chest-ct (default: params demo.kind)")] = None,
    cases: Annotated[int | None, typer.Option(help="Number of cases, train + test (default: demo.cases).")] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Output folder, MSD layout (default: demo.out).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed; same seed, same bytes (default: demo.seed).")] = None,
    size: Annotated[int | None, typer.Option(help="Longest spatial edge in voxels (default: demo.size).")] = None,
    workspace: WorkspaceOpt = Path("."),
) -> None:
    """Build a demo dataset in MSD layout (brain MRI on the MNI152 template, or a procedural chest CT)."""
    from lesionflow.demo import build_demo_dataset
    from lesionflow.params import DemoParams, read_params_file, validate_params
    from lesionflow.workspace import Workspace

    ws = Workspace.at(workspace)
    defaults = validate_params(read_params_file(ws.params_file)).demo if ws.params_file.exists() else DemoParams()
    given = {"kind": kind, "cases": cases, "seed": seed, "size": size, "out": str(out_dir) if out_dir else None}
    demo = validate_params(
        {"demo": {**defaults.model_dump(), **{k: v for k, v in given.items() if v is not None}}}
    ).demo
    result = build_demo_dataset(demo.kind, demo.cases, ws.path(demo.out), demo.seed, size=demo.size)
    n_test = sum(c.split == "test" for c in result.cases)
    n_lesion_free = sum(not any(c.lesion_voxels.values()) for c in result.cases)
    out.print(
        f"demo-data: {len(result.cases)} {demo.kind} cases ({len(result.cases) - n_test} train, {n_test} test, "
        f"{n_lesion_free} lesion-free) -> {result.out}"
    )
    out.print("[dim]Synthetic demo data: its numbers say nothing clinical.[/dim]")


def print_result(result: object) -> None:
    from lesionflow.stages.base import StageResult

    assert isinstance(result, StageResult)
    state = "ok (up to date: no work done)" if result.cached else "ok" if result.ok else "FAILED"
    table = Table(title=f"stage {result.stage}: {state}", show_header=True)
    table.add_column("key")
    table.add_column("value", overflow="fold")
    for key, value in result.summary.items():
        if isinstance(value, (dict, list)) and len(str(value)) > 80:
            value = f"{len(value)} entries"
        table.add_row(key, str(value))
    for name, path in result.outputs.items():
        table.add_row(f"-> {name}", path)
    out.print(table)
    print_findings(result.findings)


def print_findings(findings: Sequence[Any], title: str = "quarantined or failed") -> None:
    """A readable table of rejected cases and failed dataset checks (nothing when there are none)."""
    if not findings:
        return
    table = Table("case", "check", "detail", title=f"{len(findings)} {title}", title_style="yellow")
    for finding in findings:
        table.add_row(finding.subject, finding.code, finding.detail)
    err.print(table)


@app.command("stage")
def stage(
    name: Annotated[str, typer.Argument(help="Stage to run (see `lesionflow stages`).")],
    workspace: WorkspaceOpt = Path("."),
    params_file: ParamsOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Run one pipeline stage (what dvc.yaml calls)."""
    from lesionflow.errors import ParamsError
    from lesionflow.stages import STAGES

    if name not in STAGES:
        raise ParamsError(f"stage {name!r} is unknown; expected one of {', '.join(STAGES)}")
    from lesionflow.caching import run_cached

    ws, params = _load(workspace, params_file, overrides)
    print_result(run_cached(name, ws, params, STAGES[name].run))


@app.command("stages")
def stages() -> None:
    """List the pipeline stages in order, with what each one does."""
    from lesionflow.stages import STAGES

    table = Table("stage", "what it does", "params")
    for spec in STAGES.values():
        table.add_row(spec.name, spec.description, ", ".join(spec.params))
    out.print(table)


@app.command("status")
def status(workspace: WorkspaceOpt = Path("."), params_file: ParamsOpt = None, overrides: SetOpt = None) -> None:
    """Each stage: up to date, or stale with the reason (which input, output or param changed)."""
    from lesionflow.caching import status as stage_status

    ws, params = _load(workspace, params_file, overrides)
    table = Table("stage", "state", "why")
    for row in stage_status(ws, params):
        table.add_row(
            row.stage, "[green]up to date[/green]" if row.up_to_date else "[yellow]stale[/yellow]", row.reason
        )
    out.print(table)


@app.command("run")
def run(workspace: WorkspaceOpt = Path("."), params_file: ParamsOpt = None, overrides: SetOpt = None) -> None:
    """Run the pipeline end to end through the Prefect flow (embedded Prefect unless PREFECT_API_URL is set)."""
    ws, _ = _load(workspace, params_file, overrides)  # fail fast on bad params, before Prefect starts
    from flows.pipeline import training_pipeline

    results = training_pipeline(
        workspace=str(ws.root), params_file=str(params_file or ws.params_file), overrides=list(overrides or [])
    )
    table = Table("stage", "status", "outputs", title="pipeline finished")
    for res in results:
        table.add_row(res["stage"], "ok" if res["ok"] else "failed", ", ".join(res["outputs"].values()))
    out.print(table)


def main() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    try:
        app()
    except LesionflowError as error:
        print_findings(getattr(error, "findings", ()), "failed checks")
        err.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
