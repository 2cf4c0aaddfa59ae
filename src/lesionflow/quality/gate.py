"""Generic quality gate: validate a per-case table with a GX suite, map failures to cases, write reports.

Every gate (raw, processed, synthetic, metrics) is one call to :func:`run_gate` with its own list of GX
expectations and a :class:`GatePolicy`. The gate runs two GX validations in one ephemeral context:

1. the gate's suite over the table itself. Column-map expectations (``expect_column_values_to_*``) are
   *row-level*: GX returns the id column of every unexpected row (``result_format`` COMPLETE with
   ``unexpected_index_column_names=[id_column]``), and those cases are rejected. Aggregate expectations
   (row count, distinct-value count...) are *dataset-level* and fail the gate.
2. a policy suite over a derived ``(case_id, accepted, rejected)`` table: the number of accepted cases
   (``expect_column_sum_to_be_between``) and the reject fraction (``expect_column_mean_to_be_between``).
   Running the policy through GX too puts it in the same Data Docs as the data checks.

Expectations steer the mapping through their ``meta`` dict (all keys optional):

- ``scope``: ``"row"`` | ``"dataset"`` | ``"both"``; the default follows the result shape. ``"both"`` is for
  checks such as id uniqueness, where the rows are rejected *and* the dataset fails.
- ``param``: the params.yaml key that sets the bound, appended to the detail so the user knows what to change.
- ``table_level``: report the failure with ``column=None`` (the policy checks' derived columns mean nothing
  to the reader).
- ``explain``: a ``str.format`` template over the failing row (row-level) or ``{observed}`` (dataset-level),
  appended to (row) or replacing (dataset) the generic detail.

Great Expectations is imported inside functions only (its import takes ~3 s) so the CLI stays fast.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lesionflow.quality.report import (
    VALIDATIONS_PAGE,
    ExpectationInfo,
    FormatRow,
    allowed_text,
    dataset_detail,
    expectation_info,
    fmt_value,
    measured_text,
    render_html,
    render_validations_index,
    row_detail,
    summary_dict,
)
from lesionflow.quality.result import FailedCheck, GatePolicy, GateResult

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.core.expectation_validation_result import ExpectationValidationResult
    from great_expectations.data_context import AbstractDataContext
    from great_expectations.datasource.fluent import PandasDatasource
    from great_expectations.expectations import Expectation
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

ID_COLUMN = "case_id"
DATA_DOCS_DIR = "data_docs"
_DOCS_SITE = "lesionflow"


def _exception_message(result: ExpectationValidationResult) -> str | None:
    """The message of an exception GX caught while evaluating an expectation (missing column...), if any."""
    info = result.exception_info or {}
    candidates = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, Mapping)]
    for item in candidates:
        if item.get("raised_exception"):
            return str(item.get("exception_message") or "unknown error").splitlines()[0]
    return None


def _config(res: ExpectationValidationResult) -> ExpectationConfiguration:
    """The expectation behind a result (always set for results of a suite run)."""
    if res.expectation_config is None:
        raise RuntimeError("GX returned a validation result without its expectation configuration")
    return res.expectation_config


def _pick_row(
    rows: Mapping[str, list[dict[str, Any]]], case: str, column: str | None, item: Mapping[str, Any]
) -> dict[str, Any]:
    """The table row behind one unexpected item: with a duplicated id, the one whose value failed."""
    candidates = rows.get(case, [])
    if column is not None:
        value = fmt_value(item.get(column))
        for row in candidates:
            if fmt_value(row.get(column)) == value:
                return row
    return candidates[0] if candidates else {}


def _row_checks(
    res: ExpectationValidationResult, rows: Mapping[str, list[dict[str, Any]]], id_column: str
) -> list[tuple[str, FailedCheck]]:
    """(case id, reason) for every unexpected row of a failed column-map expectation."""
    cfg = _config(res)
    exp_type, kwargs, meta = cfg.type, cfg.kwargs, cfg.meta or {}
    column = kwargs.get("column")
    unexpected = (res.result or {}).get("unexpected_index_list") or []
    cond = _row_condition(kwargs)
    counts: dict[str, int] = {}
    for item in unexpected:
        case = str(item.get(id_column))
        counts[case] = counts.get(case, 0) + 1
    out = []
    for item in unexpected:
        case = str(item.get(id_column))
        detail = row_detail(exp_type, column, kwargs, cond, item.get(column), counts[case])
        if "explain" in meta:
            detail += "; " + str(meta["explain"]).format_map(FormatRow(_pick_row(rows, case, column, item)))
        if meta.get("param"):
            detail += f" [{meta['param']}]"
        out.append((case, FailedCheck(exp_type, column, detail)))
    return out


def _dataset_check(res: ExpectationValidationResult, table: pd.DataFrame, id_column: str) -> FailedCheck:
    """The dataset-level failure of a failed expectation (aggregate, or a row check with scope "both")."""
    cfg = _config(res)
    exp_type, kwargs, meta = cfg.type, cfg.kwargs, cfg.meta or {}
    column = kwargs.get("column")
    body = res.result or {}
    unexpected = body.get("unexpected_index_list")
    if unexpected:
        ids = ", ".join(repr(i) for i in sorted({str(i.get(id_column)) for i in unexpected}))
        detail = f"{column}: {len(unexpected)} rows fail (expected {allowed_text(exp_type, kwargs)}): {ids}"
    else:
        detail = dataset_detail(exp_type, kwargs, meta, body.get("observed_value"), table)
    if meta.get("param"):
        detail += f" [{meta['param']}]"
    # policy checks run on a derived outcome column; naming it would only confuse the reader
    return FailedCheck(exp_type, None if meta.get("table_level") else column, detail)


def _collect(
    results: Iterable[ExpectationValidationResult], table: pd.DataFrame, id_column: str
) -> tuple[dict[str, list[FailedCheck]], list[FailedCheck]]:
    """Split failed results into per-case reasons and dataset-level failures."""
    rejected: dict[str, list[FailedCheck]] = {}
    dataset: list[FailedCheck] = []
    rows: dict[str, list[dict[str, Any]]] = {}  # case id -> its rows (more than one when the id is duplicated)
    if id_column in table.columns:
        for row in table.to_dict("records"):
            rows.setdefault(str(row[id_column]), []).append(row)
    for res in results:
        if res.success:
            continue
        cfg = _config(res)
        error = _exception_message(res)
        if error is not None:  # e.g. a missing column: the table itself is malformed
            dataset.append(FailedCheck(cfg.type, cfg.kwargs.get("column"), f"could not be evaluated: {error}"))
            continue
        unexpected = (res.result or {}).get("unexpected_index_list")
        scope = (cfg.meta or {}).get("scope") or ("row" if unexpected is not None else "dataset")
        # A row-level failure that GX could not tie to rows (no id column) can only fail the dataset.
        row_level = scope in ("row", "both") and bool(unexpected)
        if row_level:
            for case, check in _row_checks(res, rows, id_column):
                reasons = rejected.setdefault(case, [])
                if check not in reasons:  # duplicated ids give the same reason twice
                    reasons.append(check)
        if scope in ("dataset", "both") or not row_level:
            dataset.append(_dataset_check(res, table, id_column))
    return rejected, dataset


def _row_condition(kwargs: Mapping[str, Any]) -> Any:
    """The row condition of a serialized expectation as a GX Condition (for its readable repr)."""
    raw = kwargs.get("row_condition")
    if raw is None:
        return None
    from great_expectations.expectations.row_conditions import deserialize_row_condition

    return deserialize_row_condition(raw)


def _context(docs_dir: Path | None) -> AbstractDataContext:
    """An in-memory GX context with analytics and progress bars off and (optionally) one local docs site.

    Passing an explicit ``project_config`` matters: ``get_context(mode="ephemeral")`` without one adds a
    default docs site in a fresh temp directory, which would leak a directory per run.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites: dict[str, Any] = {}
    if docs_dir is not None:
        sites[_DOCS_SITE] = {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,  # GX 1.24 sends nothing anyway; keep it off if a later version adds it back
        progress_bars=ProgressBarsConfig(globally=False),  # no tqdm output: the stage does the printing
        data_docs_sites=sites,
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _validate(
    context: AbstractDataContext,
    source: PandasDatasource,
    name: str,
    table: pd.DataFrame,
    expectations: Sequence[Expectation],
    id_column: str,
) -> list[ExpectationValidationResult]:
    """Run one suite over one dataframe through a checkpoint (which stores the result for Data Docs)."""
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    for exp in expectations:
        suite.add_expectation(exp)
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    result_format = {"result_format": "COMPLETE"}
    if id_column in table.columns:  # GX raises if an index column is missing
        result_format["unexpected_index_column_names"] = [id_column]  # type: ignore[assignment]
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(name=name, validation_definitions=[definition], result_format=result_format)
    )
    run = checkpoint.run(batch_parameters={"dataframe": table}, run_id=RunIdentifier(run_name=name))
    results = [r for vr in run.run_results.values() for r in vr.results]
    # GX does not return results in suite order; restore it so reasons and summary.json have a stable order
    order = {exp.id: i for i, exp in enumerate(suite.expectations)}
    return sorted(results, key=lambda r: order.get(_config(r).id, len(order)))


def _infos(
    suite: str, expectations: Sequence[Expectation], results: Sequence[ExpectationValidationResult], table: pd.DataFrame
) -> list[ExpectationInfo]:
    """The report rows of one suite, each with what this run measured (passing checks included)."""
    by_id = {_config(r).id: r for r in results}
    infos = []
    for exp in expectations:
        res = by_id.get(exp.id)
        column = exp.configuration.kwargs.get("column")
        plain = column in table.columns and _row_condition(exp.configuration.kwargs) is None
        values = table[column].tolist() if plain else []
        infos.append(expectation_info(suite, exp, measured_text(res.result or {}, values) if res else ""))
    return infos


def _write_validations_index(docs_dir: Path, results: Mapping[str, Sequence[ExpectationValidationResult]]) -> None:
    """``data_docs/validations.html``: GX's validation pages listed without scripts (GX's index needs CDNs)."""
    pages = []
    for suite, suite_results in results.items():
        ok = all(r.success for r in suite_results)
        pages += [
            (p.relative_to(docs_dir).as_posix(), suite, ok)
            for p in sorted(docs_dir.glob(f"validations/{suite}/**/*.html"))
        ]
    (docs_dir / VALIDATIONS_PAGE).write_text(render_validations_index(pages))


def _policy_expectations(gate: str, policy: GatePolicy) -> list[Expectation]:
    import great_expectations.expectations as gxe

    out: list[Expectation] = []
    if policy.min_accepted is not None:
        out.append(
            gxe.ExpectColumnSumToBeBetween(
                column="accepted",
                min_value=policy.min_accepted,
                notes="Too few usable cases left after rejection to plan, train and evaluate on.",
                meta={
                    "label": "accepted cases",
                    "param": policy.min_accepted_param,
                    "scope": "dataset",
                    "table_level": True,
                },
            )
        )
    out.append(
        gxe.ExpectColumnMeanToBeBetween(
            column="rejected",
            max_value=policy.max_reject_fraction,
            notes=f"Rejecting many cases means the {gate} data or its source is broken, not a few bad scans.",
            meta={
                "label": "reject fraction",
                "param": policy.max_reject_fraction_param,
                "scope": "dataset",
                "table_level": True,
            },
        )
    )
    return out


def run_gate(
    gate: str,
    table: pd.DataFrame,
    expectations: Sequence[Expectation],
    policy: GatePolicy,
    report_dir: Path,
    *,
    id_column: str = ID_COLUMN,
    data_docs: bool = True,
) -> GateResult:
    """Validate ``table`` with ``expectations``, apply ``policy``, write reports under ``report_dir``.

    Writes ``index.html`` and ``summary.json`` (deterministic) and, with ``data_docs``, a GX Data Docs site
    in ``report_dir/data_docs`` (rebuilt from scratch each run so no stale validation pages linger).
    Prints nothing: the stage renders :func:`lesionflow.quality.report.render_console` itself.
    """
    import pandas as pd

    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    docs_dir = report_dir / DATA_DOCS_DIR
    if docs_dir.exists():
        shutil.rmtree(docs_dir)  # our own output folder; old validation pages would otherwise stay listed
    context = _context(docs_dir if data_docs else None)
    source = context.data_sources.add_pandas("lesionflow")

    # 1. the data suite over the table
    results = _validate(context, source, gate, table, expectations, id_column)
    reasons, dataset_failures = _collect(results, table, id_column)

    # 2. the policy suite over the per-row outcome (all rows sharing a rejected id are rejected)
    ids = [str(v) for v in table[id_column].tolist()] if id_column in table.columns else []
    flags = [int(i in reasons) for i in ids]
    outcome = pd.DataFrame({id_column: ids, "accepted": [1 - f for f in flags], "rejected": flags})
    outcome = outcome.astype({"accepted": "int64", "rejected": "int64"})
    policy_exps = _policy_expectations(gate, policy)
    policy_results = _validate(context, source, f"{gate}_policy", outcome, policy_exps, id_column)
    dataset_failures += _collect(policy_results, outcome, id_column)[1]

    data_docs_index: Path | None = None
    if data_docs:
        context.build_data_docs(site_names=[_DOCS_SITE])
        data_docs_index = docs_dir / "index.html"
        _write_validations_index(docs_dir, {gate: results, f"{gate}_policy": policy_results})

    n_cases, n_rejected = len(table), sum(flags)
    result = GateResult(
        gate=gate,
        success=not dataset_failures,
        n_cases=n_cases,
        n_rejected=n_rejected,
        reject_fraction=n_rejected / n_cases if n_cases else 0.0,
        rejected={case: tuple(reasons[case]) for case in sorted(reasons)},
        dataset_failures=tuple(dataset_failures),
        report_html=report_dir / "index.html",
        data_docs_index=data_docs_index,
        summary_json=report_dir / "summary.json",
    )
    infos = _infos(gate, expectations, results, table) + _infos(f"{gate}_policy", policy_exps, policy_results, outcome)
    result.summary_json.write_text(json.dumps(summary_dict(result), indent=2, sort_keys=True) + "\n")
    result.report_html.write_text(render_html(result, infos))
    return result
