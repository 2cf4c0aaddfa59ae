"""Rendering of a :class:`~lesionflow.quality.gate.GateResult`: summary.json, a self-contained HTML page, console.

The HTML page has inline CSS only (no scripts, fonts or CDN links) so it opens offline and survives being
copied around as a DVC output or a Prefect artifact. The JSON summary is a DVC metrics file: sorted keys,
no timestamps and no absolute paths, so the same table gives the same bytes on any machine.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from lesionflow.quality.gate import ExpectationInfo, FailedCheck, GateResult

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
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.95em}
.counts td{width:auto}.muted{color:#666}
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
    from lesionflow.quality.gate import DATASET

    rows = [(DATASET, _check_name(c), c.detail) for c in result.dataset_failures]
    for case, checks in sorted(result.rejected.items()):
        rows.extend((case, _check_name(c), c.detail) for c in checks)
    return rows


def _check_name(check: FailedCheck) -> str:
    short = check.expectation.removeprefix("expect_")
    return f"{check.column}: {short}" if check.column else short


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
        rows = [(c.expectation, c.column or "", c.detail) for c in result.dataset_failures]
        parts.append(_table(["expectation", "column", "detail"], rows, code_cols=(0, 1)))
    else:
        parts.append('<p class="muted">None.</p>')
    heading = f"Rejected cases ({len(result.rejected)})"
    if result.n_rejected != len(result.rejected):  # a duplicated id is one entry but several rows
        heading = f"Rejected cases ({len(result.rejected)} ids, {result.n_rejected} rows)"
    parts.append(f"<h2>{_e(heading)}</h2>")
    if result.rejected:
        rows = [
            (case, c.column or "", c.expectation, c.detail)
            for case, checks in sorted(result.rejected.items())
            for c in checks
        ]
        parts.append(_table(["case", "column", "expectation", "reason"], rows, code_cols=(0, 1, 2)))
    else:
        parts.append('<p class="muted">None: every case passed every per-case check.</p>')
    parts.append("<h2>Expectations</h2>")
    rows = [(x.suite, x.expectation, x.column or "", x.allowed, x.param or "", x.notes or "") for x in expectations]
    parts.append(_table(["suite", "expectation", "column", "allowed", "param", "why"], rows, code_cols=(1, 2, 4)))
    parts.append("<h2>Great Expectations Data Docs</h2>")
    if result.data_docs_index is not None:
        # relative link so the report folder can be moved or published as a whole
        link = os.path.relpath(result.data_docs_index, result.report_html.parent)
        parts.append(
            f'<p><a href="{_e(link)}">{_e(link)}</a> <span class="muted">(GX\'s own pages; they load their '
            "styles from public CDNs and look plain offline)</span></p>"
        )
    else:
        parts.append('<p class="muted">Not built for this run.</p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
