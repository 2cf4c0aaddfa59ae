"""Rendering of gate outcomes: failure text, summary.json, a self-contained HTML page and a console table.

Failure text: every :class:`~lesionflow.quality.result.FailedCheck` detail is one line with the observed value,
what was allowed and (from the expectation's ``meta``) the params.yaml key that sets the bound.

The HTML page has inline CSS only (no scripts, fonts or CDN links) so it opens offline and survives being
copied around as a DVC output or a Prefect artifact. The JSON summary is a DVC metrics file: sorted keys,
no timestamps and no absolute paths, so the same table gives the same bytes on any machine.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.expectations import Expectation
    from rich.console import Console
    from rich.table import Table

from lesionflow.quality.result import FailedCheck, GateResult

VALIDATIONS_PAGE = "validations.html"  # beside GX's Data Docs index.html: the validation pages, without scripts
DATASET = "(dataset)"  # the "case" column of dataset-level failures in console and HTML tables

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:72em;
color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.banner{padding:.8em 1em;border-radius:6px;font-weight:600;font-size:1.1em}
.pass{background:#e6f4ea;color:#1e6b34;border:1px solid #9bd1aa}
.fail{background:#fdecea;color:#8a1c13;border:1px solid #f1a9a0}
table{border-collapse:collapse;width:100%;font-size:.92em}
th,td{border:1px solid #ddd;padding:.35em .6em;text-align:left;vertical-align:top}
th{background:#f5f5f5}tr:nth-child(even) td{background:#fafafa}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.95em}.muted{color:#666}
"""


def _check_dict(check: FailedCheck) -> dict[str, Any]:
    return {"expectation": check.expectation, "column": check.column, "detail": check.detail}


def summary_dict(result: GateResult) -> dict[str, Any]:
    """The JSON-ready summary (DVC metrics): verdict, counts, reject fraction and every reason."""
    return {
        "gate": result.gate,
        "success": result.success,
        "n_cases": result.n_cases,
        "n_accepted": result.n_accepted,
        "n_rejected": result.n_rejected,
        "reject_fraction": round(result.reject_fraction, 6),
        "rejected": {case: [_check_dict(c) for c in checks] for case, checks in sorted(result.rejected.items())},
        "dataset_failures": [_check_dict(c) for c in result.dataset_failures],
    }


def verdict(result: GateResult) -> str:
    """One line: PASSED/FAILED with counts, e.g. ``raw gate PASSED: 8 cases, 7 accepted, 1 rejected (12.5%)``."""
    word = "PASSED" if result.success else "FAILED"
    line = (
        f"{result.gate} gate {word}: {result.n_cases} cases, {result.n_accepted} accepted, "
        f"{result.n_rejected} rejected ({result.reject_fraction:.1%})"
    )
    if result.dataset_failures:
        line += f", {len(result.dataset_failures)} dataset-level failure(s)"
    return line


def _rows(result: GateResult) -> list[tuple[str, str, str]]:
    """(case, check, detail) rows: dataset-level failures first, then rejected cases by id."""
    rows = [(DATASET, _check_name(c), c.detail) for c in result.dataset_failures]
    for case, checks in sorted(result.rejected.items()):
        rows.extend((case, _check_name(c), c.detail) for c in checks)
    return rows


def _check_name(check: FailedCheck) -> str:
    short = check.expectation.removeprefix("expect_")
    return f"{check.column}: {short}" if check.column else short


# ----------------------------------------------------------------------------------------------- failure text


@dataclass(frozen=True)
class ExpectationInfo:
    """A plain description of one expectation of a suite, for the HTML report (no GX objects)."""

    suite: str
    expectation: str
    column: str | None
    allowed: str  # "between 0.1 and 10.0", "one of [True]", ... plus "where <condition>"
    param: str | None
    notes: str | None
    measured: str = ""  # what this run observed: "0.42", "0.1 .. 3.2; 0 of 8 rows unexpected" (passing ones too)


def fmt_value(value: Any) -> str:
    """Deterministic, readable text for a value coming out of pandas/GX (numpy scalars included)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # np.float64(3.0) -> 3.0, np.False_ -> False
    if isinstance(value, str):
        return repr(value)
    try:
        missing = value is None or bool(value != value)  # NaN is the only value unequal to itself
    except TypeError:  # pd.NA refuses bool()
        missing = True
    if missing:
        return "missing"
    return repr(value) if isinstance(value, float) else str(value)


def _bound(value: Any) -> str:
    """A bound as written in params.yaml: GX stores every bound as float, so 0.0 reads back as 0."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return fmt_value(value)


def allowed_text(exp_type: str, kwargs: Mapping[str, Any], row_condition: Any = None) -> str:
    """Describe what an expectation allows from its type and kwargs: range, set, uniqueness or non-null."""
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    if exp_type == "expect_column_values_to_be_unique":
        text = "unique values"
    elif exp_type == "expect_column_values_to_not_be_null":
        text = "a value (not missing)"
    elif "value_set" in kwargs:
        text = "one of [" + ", ".join(fmt_value(v) for v in kwargs["value_set"]) + "]"
    elif lo is not None and hi is not None:
        text = f"exactly {_bound(lo)}" if lo == hi else f"between {_bound(lo)} and {_bound(hi)}"
    elif lo is not None:
        text = f"at least {_bound(lo)}"
    elif hi is not None:
        text = f"at most {_bound(hi)}"
    else:
        text = "(see the expectation)"
    if row_condition is not None:
        text += f" where {_condition_text(row_condition)}"
    return text


def _condition_text(condition: Any) -> str:
    """``modality_kind == 'CT'`` for a GX comparison; GX's own repr (which drops the quotes) otherwise."""
    column, operator = getattr(condition, "column", None), getattr(condition, "operator", None)
    if column is not None and operator is not None and hasattr(condition, "parameter"):
        op = getattr(operator, "value", operator)
        return f"{column.name} {op} {fmt_value(condition.parameter)}"
    return repr(condition)


class FormatRow(dict[str, Any]):
    """Mapping for ``str.format_map`` that prints "?" for a missing key instead of raising."""

    def __missing__(self, key: str) -> str:
        return "?"


def measured_text(body: Mapping[str, Any], values: Sequence[Any] = ()) -> str:
    """What one expectation measured, from its GX result body, for every check (passing ones included).

    An aggregate reports GX's ``observed_value``; a column-map check its unexpected count and, given the checked
    column's numeric ``values``, their range (the number a reader compares with the allowed bounds).
    """
    observed = body.get("observed_value")
    if observed is not None:
        if hasattr(observed, "item"):
            observed = observed.item()
        return fmt_value(round(observed, 6) if isinstance(observed, float) else observed)
    n, unexpected = body.get("element_count"), body.get("unexpected_count")
    if n is None:
        return ""
    text = f"{unexpected or 0} of {n} rows unexpected"
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
    if numbers:
        text = f"{fmt_value(round(min(numbers), 6))} .. {fmt_value(round(max(numbers), 6))}; " + text
    return text


def render_validations_index(pages: Sequence[tuple[str, str, bool]]) -> str:
    """A script-free list of GX validation pages, ``(relative link, suite, success)`` each.

    GX's own Data Docs index builds its table with JavaScript from public CDNs, so offline it lists nothing.
    """
    rows = [(f'<a href="{_e(link)}">{_e(suite)}</a>', "passed" if ok else "FAILED") for link, suite, ok in pages]
    body = "".join(f"<tr><td>{a}</td><td>{_e(status)}</td></tr>" for a, status in rows)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>GX validations</title>'
        f"<style>{_CSS}</style></head><body><h1>Great Expectations validations</h1>"
        f"<table><tr><th>suite</th><th>result</th></tr>{body}</table></body></html>\n"
    )


def expectation_info(suite_name: str, exp: Expectation, measured: str = "") -> ExpectationInfo:
    """Flatten a GX expectation into the plain row the HTML report lists."""
    kwargs = exp.configuration.kwargs
    meta = exp.meta or {}
    notes = exp.notes if isinstance(exp.notes, str) or exp.notes is None else " ".join(exp.notes)
    return ExpectationInfo(
        suite=suite_name,
        expectation=exp.expectation_type,
        column=kwargs.get("column"),
        allowed=allowed_text(exp.expectation_type, kwargs, getattr(exp, "row_condition", None)),
        param=meta.get("param"),
        notes=notes,
        measured=measured,
    )


def row_detail(exp_type: str, column: str | None, kwargs: Mapping[str, Any], cond: Any, value: Any, n: int) -> str:
    """The generic part of a per-case reason: observed value and what was allowed."""
    if exp_type == "expect_column_values_to_be_unique":
        return f"{column} = {fmt_value(value)} appears in {n} rows, expected unique values"
    return f"{column} = {fmt_value(value)}, expected {allowed_text(exp_type, kwargs, cond)}"


def dataset_detail(
    exp_type: str, kwargs: Mapping[str, Any], meta: Mapping[str, Any], observed: Any, table: pd.DataFrame
) -> str:
    """The detail of a failed aggregate expectation: observed value vs allowed, or the ``explain`` template."""
    # GX reports no observed value for an aggregate over zero rows (the mean of nothing)
    if isinstance(observed, float):
        observed = round(observed, 6)  # a reject fraction of 1/3 reads 0.333333, not 0.3333333333333333
    shown = "undefined (no rows)" if observed is None else fmt_value(observed)
    if "explain" in meta:
        detail = str(meta["explain"]).format_map(FormatRow(observed=shown))
    else:
        label = meta.get("label") or kwargs.get("column") or "row count"
        detail = f"{label} = {shown}, expected {allowed_text(exp_type, kwargs)}"
    column = kwargs.get("column")
    if exp_type == "expect_column_unique_value_count_to_be_between" and column in table.columns:
        values = sorted({fmt_value(v) for v in table[column].tolist()})
        detail += f" (values seen: {', '.join(values)})"
    return detail


# ----------------------------------------------------------------------------------------------- console


def render_console(result: GateResult) -> Table:
    """A rich table ``case | check | detail`` of every failure, titled with the one-line verdict."""
    from rich.markup import escape
    from rich.table import Table

    style = "bold green" if result.success else "bold red"
    table = Table(title=escape(verdict(result)), title_style=style, show_lines=False, expand=False)
    table.add_column("case", style="cyan", no_wrap=True)
    table.add_column("check", style="magenta")
    table.add_column("detail", overflow="fold")
    for case, check, detail in _rows(result):
        # escape: details contain "[quality.raw.spacing_mm]", which rich would swallow as a markup tag
        table.add_row(escape(case), escape(check), escape(detail))
    return table


def print_result(result: GateResult, console: Console) -> None:
    """Print the failure table (when there is any failure), the verdict and where the report is."""
    from rich.text import Text

    if result.rejected or result.dataset_failures:
        console.print(render_console(result))
    style = "bold green" if result.success else "bold red"
    console.print(Text(verdict(result), style=style))
    console.print(Text(f"report: {result.report_html}"), soft_wrap=True)


# ----------------------------------------------------------------------------------------------- HTML


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], code_cols: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = [
            f"<td><code>{_e(v)}</code></td>" if i in code_cols and v != "" else f"<td>{_e(v)}</td>"
            for i, v in enumerate(row)
        ]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(result: GateResult, expectations: Sequence[ExpectationInfo]) -> str:
    """The gate's own report page: banner, counts, rejected cases, dataset failures, suite, Data Docs link."""
    title = f"lesionflow {result.gate} quality gate"
    banner_cls = "pass" if result.success else "fail"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<div class="banner {banner_cls}">{_e(verdict(result))}</div>',
        "<h2>Counts</h2>",
        _table(
            ["cases", "accepted", "rejected", "reject fraction", "dataset-level failures"],
            [
                [
                    result.n_cases,
                    result.n_accepted,
                    result.n_rejected,
                    f"{result.reject_fraction:.1%}",
                    len(result.dataset_failures),
                ]
            ],
        ),
        "<h2>Dataset-level failures</h2>",
    ]
    if result.dataset_failures:
        failures = [(c.expectation, c.column or "", c.detail) for c in result.dataset_failures]
        parts.append(_table(["expectation", "column", "detail"], failures, code_cols=(0, 1)))
    else:
        parts.append('<p class="muted">None.</p>')
    heading = f"Rejected cases ({len(result.rejected)})"
    if result.n_rejected != len(result.rejected):  # a duplicated id is one entry but several rows
        heading = f"Rejected cases ({len(result.rejected)} ids, {result.n_rejected} rows)"
    parts.append(f"<h2>{_e(heading)}</h2>")
    if result.rejected:
        reasons = [
            (case, c.column or "", c.expectation, c.detail)
            for case, checks in sorted(result.rejected.items())
            for c in checks
        ]
        parts.append(_table(["case", "column", "expectation", "reason"], reasons, code_cols=(0, 1, 2)))
    else:
        parts.append('<p class="muted">None: every case passed every per-case check.</p>')
    parts.append("<h2>Expectations</h2>")
    suite = [
        (x.suite, x.expectation, x.column or "", x.allowed, x.measured, x.param or "", x.notes or "")
        for x in expectations
    ]
    headers = ["suite", "expectation", "column", "allowed", "measured", "param", "why"]
    parts.append(_table(headers, suite, code_cols=(1, 2, 5)))
    parts.append("<h2>Great Expectations Data Docs</h2>")
    if result.data_docs_index is not None:
        # relative link so the report folder can be moved or published as a whole
        link = os.path.relpath(result.data_docs_index, result.report_html.parent)
        listing = os.path.relpath(result.data_docs_index.with_name(VALIDATIONS_PAGE), result.report_html.parent)
        parts.append(
            f'<p><a href="{_e(listing)}">validation pages</a> (listed without scripts) and GX\'s index '
            f'<a href="{_e(link)}">{_e(link)}</a> <span class="muted">(GX\'s own pages load their styles and '
            "their index table from public CDNs: offline they look plain and the index lists nothing)</span></p>"
        )
    else:
        parts.append('<p class="muted">Not built for this run.</p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
