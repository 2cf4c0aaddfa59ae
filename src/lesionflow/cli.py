"""The ``lesionflow`` command. An adapter: it parses arguments, loads typed params and calls stages.

dvc.yaml calls ``lesionflow stage NAME``; ``lesionflow run`` runs the same stages through the Prefect flow.
Errors a user can fix print one line and exit 2; they never show a traceback.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from lesionflow.catalog.artifacts import EVALUATIONS, RAW_MANIFEST
from lesionflow.errors import LesionflowError
from lesionflow.quiet_env import apply_quiet_env

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


PresetOpt = Annotated[
    str | None,
    typer.Option(
        "--preset", help="Apply <workspace>/presets/<name>.yaml (e.g. gpu) or a preset file before --set overrides."
    ),
]


# Every command that writes a workspace holds its lock (lesionflow.workspace_lock) while it writes, as the flows
# do: `lesionflow stage` (and so `dvc repro`, whose cmds call it), demo-data, dvc-yaml, evaluate. The stage
# functions never take it themselves: a flow calls them in-process while it holds the lock. dvc repro passes
# no flags, so the two settings also come from the environment.
WaitLockOpt = Annotated[
    bool,
    typer.Option(
        "--wait-lock/--no-wait-lock",
        envvar="LESIONFLOW_WAIT_LOCK",
        help="When another run holds the workspace: wait for it (up to --lock-timeout) or stop at once.",
    ),
]
LockTimeoutOpt = Annotated[
    float,
    typer.Option(
        "--lock-timeout", envvar="LESIONFLOW_LOCK_TIMEOUT", help="Seconds --wait-lock waits at most (0: no limit)."
    ),
]


def _locked(root: Path, wait: bool, timeout_s: float, purpose: str) -> Any:
    """The workspace lock held for a ``with`` block (a one-line WorkspaceLocked when another run holds it)."""
    from lesionflow.workspace_lock import workspace_lock

    return workspace_lock(root, wait=wait, timeout_s=timeout_s, purpose=purpose)


def _with_preset(workspace: Path, preset: str | None, overrides: list[str] | None) -> list[str]:
    """``--preset NAME`` is ``<workspace>/presets/NAME.yaml`` (the workspace is the project), or a file path."""
    from lesionflow.params import preset_overrides

    given = list(overrides or [])
    if not preset:
        return given
    return preset_overrides(preset, [Path(workspace).resolve()]) + given


def _load(workspace: Path, params_file: Path | None, overrides: list[str] | None) -> tuple[Any, Any]:
    from lesionflow.params import check_params_paths, load_params
    from lesionflow.workspace import Workspace

    ws = Workspace.at(workspace)
    params = load_params(params_file or ws.params_file, overrides or [])
    check_params_paths(ws.root, params)
    return ws, params


@params_app.command("check")
def params_check(workspace: WorkspaceOpt = Path("."), params_file: ParamsOpt = None, overrides: SetOpt = None) -> None:
    """Validate params.yaml (and overrides); print each section (URL credentials removed) when valid."""
    ws, params = _load(workspace, params_file, overrides)
    table = Table("section", "values", title="params.yaml is valid")
    for name, values in params.redacted_dump().items():
        table.add_row(name, str(values))
    out.print(table)
    out.print(_patch_fit(ws, params), highlight=False)


def _patch_fit(ws: Any, params: Any) -> str:
    """One line: the training patch checked against the preprocessed training volumes, the rule `train` applies.

    Raises ParamsError (one line) when the patch is larger than every training volume along an axis, so the
    mistake shows here and not only after `train` has started.
    """
    from lesionflow.catalog.artifacts import METADATA, PLANS

    if not PLANS.at(ws).exists() or not METADATA.at(ws).exists():
        return "train.patch_size: not checked against the data (no data/processed/plans.json and metadata yet)"
    from lesionflow.catalog.readers import load_plan, read_metadata, splits
    from lesionflow.stages.train import check_patch

    plan, rows = load_plan(ws), read_metadata(ws)
    try:
        train: tuple[str, ...] = tuple(splits(ws, params).train)
    except LesionflowError:  # the processed gate has not run yet: every preprocessed non-test case
        train = tuple(sorted(c for c, row in rows.items() if row.get("split") != "test"))
    if not train:
        return "train.patch_size: not checked (no preprocessed training volumes yet)"
    patch = params.train.patch_size or plan.patch_size
    check_patch(patch, rows, train)
    largest = [max(int(rows[c][f"shape_{a}"]) for c in train) for a in "xyz"]
    return f"train.patch_size {list(patch)} fits the {len(train)} preprocessed training volumes (largest {largest})"


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
    wait_lock: WaitLockOpt = False,
    lock_timeout: LockTimeoutOpt = 3600.0,
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
    with _locked(ws.root, wait_lock, lock_timeout, "lesionflow demo-data"):
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
    preset: PresetOpt = None,
    wait_lock: WaitLockOpt = False,
    lock_timeout: LockTimeoutOpt = 3600.0,
) -> None:
    """Run one pipeline stage (what dvc.yaml calls), holding the workspace lock."""
    from lesionflow.errors import ParamsError
    from lesionflow.stages.registry import STAGES

    if name not in STAGES:
        raise ParamsError(f"stage {name!r} is unknown; expected one of {', '.join(STAGES)}")
    from lesionflow.caching import run_cached

    ws, params = _load(workspace, params_file, _with_preset(workspace, preset, overrides))
    with _locked(ws.root, wait_lock, lock_timeout, f"lesionflow stage {name}"):
        result = run_cached(name, ws, params, STAGES[name].run)
    print_result(result)


@app.command("stages")
def stages() -> None:
    """List the pipeline stages in order, with what each one does."""
    from lesionflow.stages.registry import STAGES

    table = Table("stage", "what it does", "params")
    for spec in STAGES.values():
        table.add_row(spec.name, spec.description, ", ".join(spec.params))
    out.print(table)


@app.command("dvc-yaml")
def dvc_yaml(
    workspace: WorkspaceOpt = Path("."),
    check: Annotated[bool, typer.Option("--check", help="Only compare; exit 1 when dvc.yaml differs.")] = False,
    wait_lock: WaitLockOpt = False,
    lock_timeout: LockTimeoutOpt = 3600.0,
) -> None:
    """Write dvc.yaml, the plot templates and the offline plots page (.dvc/) as derived from the stage registry and
    the artifact catalog (or check that they are)."""
    from lesionflow.dvc import derived_dvc_files
    from lesionflow.workspace import Workspace

    root = Workspace.at(workspace).root
    files = {root / rel: text for rel, text in derived_dvc_files().items()}
    if check:
        stale = [path for path, text in files.items() if not path.exists() or path.read_text() != text]
        for path in stale:
            err.print(f"{path} differs from the stage declarations; run `lesionflow dvc-yaml` to regenerate it")
        if stale:
            raise typer.Exit(1)
        out.print(f"{', '.join(str(p) for p in files)} match the stage declarations")
        return
    from lesionflow.files import write_text_if_changed

    with _locked(root, wait_lock, lock_timeout, "lesionflow dvc-yaml"):
        changed = {path: write_text_if_changed(path, text) for path, text in files.items()}
    for path, written in changed.items():
        out.print(f"{path} {'written' if written else 'unchanged'}")


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


PREFECT_STARTUP_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
_PREFECT_STARTUP_FAILED = "Timed out while attempting to connect to ephemeral Prefect API server"


@contextlib.contextmanager
def _prefect_flow_call(params: Any, overrides: Sequence[str] | None, workspace: Path) -> Iterator[list[str]]:
    """Around a flow call: the overrides Prefect may store, the embedded server's home and start-up timeout, errors.

    * Prefect stores a flow's parameters in its database, so the flow gets the overrides with URL credentials
      redacted; the originals reach it through :data:`lesionflow.params.SECRET_OVERRIDES_ENV` in this process
      (lesionflow.flows.common.resolve_params restores them), never through Prefect.
    * The embedded (ephemeral) server gets ``orchestration.server_startup_timeout_s`` to start (Prefect's own
      default, 20 s, fails on a loaded machine); a PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS in the
      environment wins. A server that still does not answer is one line naming the setting.
    * The embedded server keeps its database in the workspace's Prefect home, the one ``lesionflow serve`` uses
      (:func:`lesionflow.serve.workspace_prefect_home`), so a flow-run id recorded in MLflow opens in serve's UI.
      A PREFECT_HOME in the environment, or a configured PREFECT_API_URL (a running server), wins.
    * A file-system error (read-only folder, full disk) is one line naming the path (lesionflow.files).
    """
    import os

    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    from lesionflow.files import file_system_error
    from lesionflow.params import SECRET_OVERRIDES_ENV, split_secret_overrides

    shown, secret = split_secret_overrides(list(overrides or []))
    timeout = os.environ.get(PREFECT_STARTUP_ENV) or params.orchestration.server_startup_timeout_s
    before = os.environ.pop(SECRET_OVERRIDES_ENV, None)
    if secret:
        os.environ[SECRET_OVERRIDES_ENV] = json.dumps(secret)
    from lesionflow.serve import workspace_prefect_home

    updates: dict[Any, Any] = {PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: int(timeout)}
    if "PREFECT_HOME" not in os.environ and not PREFECT_API_URL.value():
        updates[PREFECT_HOME] = workspace_prefect_home(workspace)
    try:
        with temporary_settings(updates=updates):
            yield shown
    except RuntimeError as error:
        if _PREFECT_STARTUP_FAILED not in str(error):
            raise
        raise LesionflowError(
            f"the embedded Prefect server did not start within {timeout} s (a busy machine?); raise "
            "orchestration.server_startup_timeout_s (or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS), "
            "or point PREFECT_API_URL at a running server (lesionflow serve)"
        ) from None
    except OSError as error:
        mapped = file_system_error(error)
        if mapped is None:
            raise
        raise mapped from None
    finally:
        os.environ.pop(SECRET_OVERRIDES_ENV, None)
        if before is not None:
            os.environ[SECRET_OVERRIDES_ENV] = before


@app.command("run")
def run(
    workspace: WorkspaceOpt = Path("."),
    params_file: ParamsOpt = None,
    overrides: SetOpt = None,
    preset: PresetOpt = None,
    wait_lock: Annotated[
        bool,
        typer.Option(
            "--wait-lock/--no-wait-lock",
            help="When another run holds the workspace: wait for it (up to --lock-timeout) or stop at once.",
        ),
    ] = False,
    lock_timeout: Annotated[
        float, typer.Option("--lock-timeout", help="Seconds --wait-lock waits at most (0: no limit).")
    ] = 3600.0,
) -> None:
    """Run the pipeline end to end through the Prefect flow (embedded Prefect unless PREFECT_API_URL is set)."""
    from lesionflow.workspace_lock import check_unlocked

    overrides = _with_preset(workspace, preset, overrides)
    ws, params = _load(workspace, params_file, overrides)  # fail fast on bad params, before Prefect starts
    if not wait_lock:
        check_unlocked(ws.root, "lesionflow run")  # fail fast too; the flow itself holds the lock for the run
    from lesionflow.flows.pipeline import training_pipeline

    with _prefect_flow_call(params, overrides, ws.root) as flow_overrides:
        results = training_pipeline(
            workspace=str(ws.root),
            params_file=str(params_file or ws.params_file),
            overrides=flow_overrides,
            wait_for_lock=wait_lock,
            lock_timeout_s=lock_timeout,
        )
    table = Table("stage", "status", "outputs", title="pipeline finished")
    for res in results:
        table.add_row(res["stage"], "ok" if res["ok"] else "failed", ", ".join(res["outputs"].values()))
    out.print(table)


@app.command("study")
def study(
    workspace: WorkspaceOpt = Path("."),
    params_file: ParamsOpt = None,
    overrides: SetOpt = None,
    preset: PresetOpt = None,
) -> None:
    """Does synthetic data help? Train every cell of params.study (arms x real fractions x seeds) and compare."""
    overrides = _with_preset(workspace, preset, overrides)
    ws, params = _load(workspace, params_file, overrides)  # fail fast on bad params, before Prefect starts
    from lesionflow.catalog.artifacts import STUDY_SUMMARY
    from lesionflow.flows.study import detection_rows, effects_rows, utility_study

    with _prefect_flow_call(params, overrides, ws.root) as flow_overrides:
        summary = utility_study(
            workspace=str(ws.root), params_file=str(params_file or ws.params_file), overrides=flow_overrides
        )
    rows = effects_rows(summary)
    table = Table(*(rows[0].keys() if rows else ["effects"]), title="each arm against real, paired by case and seed")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    out.print(table)
    found = [r for r in detection_rows(summary) if r["lesion size"] != "all"]
    if found:
        detected = Table(*found[0].keys(), title="lesion-level detection by lesion size (pooled over cases and seeds)")
        for row in found:
            detected.add_row(*(str(v) for v in row.values()))
        out.print(detected)
    trained, cached = summary["n_trained"], summary["n_cached"]
    out.print(f"{trained} cell(s) trained, {cached} from earlier runs; see {STUDY_SUMMARY.path}")


@app.command("serve")
def serve(
    workspace: WorkspaceOpt = Path("."),
    port: Annotated[int, typer.Option(help="Port of the Prefect server and UI (bound to 127.0.0.1).")] = 4200,
    database_url: Annotated[
        str | None,
        typer.Option(help="PostgreSQL URL (postgresql+asyncpg://user:pw@host:5432/db); default: SQLite in .prefect/."),
    ] = None,
    pool: Annotated[str | None, typer.Option(help="Process work pool (default: orchestration.work_pool).")] = None,
    params_file: ParamsOpt = None,
    reports_port: Annotated[
        int, typer.Option(help="Port serving reports/ over HTTP for the artifact links (0: --port + 1).")
    ] = 0,
) -> None:
    """Prefect server + work pool + the deployments of infra/prefect.yaml + a worker; Ctrl-C stops them."""
    from lesionflow.serve import resolve_settings
    from lesionflow.serve import serve as run_serve

    run_serve(resolve_settings(workspace, port, database_url, pool, params_file, reports_port))


def _tracking_uri(workspace: Path, params_file: Path | None, given: str | None) -> str:
    from lesionflow.params import Params
    from lesionflow.registry.tracking import resolve_tracking_uri
    from lesionflow.workspace import Workspace

    ws = Workspace.at(workspace)
    if given:
        return given
    params = _load(workspace, params_file, [])[1] if (params_file or ws.params_file).exists() else Params()
    return resolve_tracking_uri(params.registry.tracking_uri, ws.root)


TrackingOpt = Annotated[
    str | None, typer.Option("--tracking-uri", help="MLflow tracking URI (default: registry.tracking_uri / env).")
]


@app.command("lineage")
def lineage(
    model_ref: Annotated[str, typer.Argument(help="name@alias, name/version or an MLflow run id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the lineage as JSON.")] = False,
    graph: Annotated[Path | None, typer.Option("--graph", help="Also draw the lineage to a .png or .svg.")] = None,
    workspace: WorkspaceOpt = Path("."),
    params_file: ParamsOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Where a registered model came from: run, metrics, data versions, raw sources, code and params."""
    import json

    from lesionflow.registry.lineage import lineage_tree, missing_fields, read_lineage

    uri = _tracking_uri(workspace, params_file, tracking_uri)
    record = read_lineage(model_ref, uri)
    if as_json:
        print(json.dumps(record.to_json(), indent=2, sort_keys=True))
    else:
        out.print(lineage_tree(record))
    missing = missing_fields(record)
    if missing:
        err.print(f"[yellow]lineage incomplete:[/yellow] {', '.join(missing)} not recorded for {model_ref}")
    if graph is not None:
        from lesionflow.registry.graph import lineage_graph

        err.print(f"lineage graph -> {lineage_graph(record, graph)}")


@app.command("evaluate")
def evaluate_model(
    model: Annotated[str, typer.Option("--model", help="Registered model: name@alias, name/version or run id.")],
    data: Annotated[Path, typer.Option("--data", help="Workspace whose data/raw was ingested (any dataset).")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="Report folder (default: DATA/reports/...).")] = None,
    split: Annotated[str, typer.Option(help="Cases to evaluate: all | train | test.")] = "all",
    workspace: WorkspaceOpt = Path("."),
    params_file: ParamsOpt = None,
    tracking_uri: TrackingOpt = None,
    wait_lock: WaitLockOpt = False,
    lock_timeout: LockTimeoutOpt = 3600.0,
) -> None:
    """Evaluate a registered model on any ingested dataset (preprocessed with the model's own plan)."""
    import tempfile

    from lesionflow.errors import ParamsError, SourceError
    from lesionflow.files import write_json
    from lesionflow.manifest import read_manifest
    from lesionflow.params import Params
    from lesionflow.registry.tracking import download_model_files, resolve_model_ref
    from lesionflow.seg.evaluation import evaluate_cases
    from lesionflow.workspace import Workspace

    if split not in ("all", "train", "test"):
        raise ParamsError(f"--split {split!r} is unknown; expected all, train or test")
    uri = _tracking_uri(workspace, params_file, tracking_uri)
    resolved = resolve_model_ref(model, uri)
    target = Workspace.at(data)
    if not RAW_MANIFEST.at(target).exists():
        raise SourceError(
            f"{target.root} has no data/raw/manifest.csv; ingest the dataset first: "
            f"lesionflow stage ingest -w {target.root} --set ingest.source=<folder>"
        )
    ws = Workspace.at(workspace)
    settings = (_load(workspace, params_file, [])[1] if ws.params_file.exists() else Params()).evaluate
    records = [r for r in read_manifest(RAW_MANIFEST.at(target)) if split == "all" or r.split == split]
    name = f"{resolved.name}-v{resolved.version}"
    report_dir = out_dir or EVALUATIONS.at(target) / name
    # the data workspace is the one written (its reports/evaluations): a run there must not interleave
    with (
        _locked(target.root, wait_lock, lock_timeout, "lesionflow evaluate"),
        tempfile.TemporaryDirectory(prefix="lesionflow-model-") as tmp,
    ):
        folder = download_model_files(model, uri, Path(tmp) / "model")
        report = evaluate_cases(folder, target, records, settings, report_dir, report_dir / "predictions")
        summary = {**report.summary, "model": f"{resolved.name}/{resolved.version}", "run_id": resolved.run_id}
        write_json(report_dir / "metrics.json", summary)
    table = Table("metric", "value", title=f"{resolved.name} v{resolved.version} on {target.root.name}")
    for key, value in sorted(summary.items()):
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
    out.print(table)
    out.print(f"reports -> {report_dir}")


def main() -> None:
    apply_quiet_env()  # telemetry off, nothing fetched at run time (lesionflow.quiet_env)
    try:
        app()
    except LesionflowError as error:
        print_findings(getattr(error, "findings", ()), "failed checks")
        err.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as error:  # a read-only folder, a full disk...: the path and the fix, not a traceback
        from lesionflow.files import file_system_error

        user_error = file_system_error(error)
        if user_error is None:
            raise
        err.print(f"[red]error:[/red] {user_error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
