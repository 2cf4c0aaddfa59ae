"""Calls to the DVC command line (the flow records its outputs so `dvc status` stays clean, then pushes them)."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

from lesionflow.errors import LesionflowError
from lesionflow.workspace import Workspace

# The remote the flow pushes to when storage.remote is set; configured in .dvc/config.local (machine-local, not
# versioned), so a team's own default remote in .dvc/config is left alone.
STORAGE_REMOTE = "lesionflow-storage"
# Words of DVC/botocore failures that retrying may cure (the endpoint did not answer).
_TRANSIENT = ("connect", "timed out", "timeout", "temporarily", "503", "500 ", "slowdown")


def is_dvc_repo(ws: Workspace) -> bool:
    return (ws.root / ".dvc").is_dir()


def _dvc(ws: Workspace, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=ws.root, capture_output=True, text=True, check=False
    )


def _error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.startswith("ERROR")]
    return " ".join(lines[-1].split()) if lines else f"exit status {proc.returncode}"


def commit(ws: Workspace, targets: list[str]) -> bool:
    """``dvc commit -f TARGETS`` in the workspace; False (and nothing done) outside a DVC repository."""
    if not is_dvc_repo(ws):
        return False
    targets = [t for t in targets if not t.endswith(".dvc") or (ws.root / t).exists()]
    proc = _dvc(ws, "commit", "-f", *targets)
    if proc.returncode != 0:
        raise LesionflowError(f"dvc commit {' '.join(targets)} failed: {_error_line(proc)}")
    return True


def push(ws: Workspace, url: str) -> int:
    """Push what dvc.lock and data.dvc record to the DVC remote at ``url`` (s3://...); returns the files pushed.

    The remote is (re)configured as ``lesionflow-storage`` in ``.dvc/config.local``; the endpoint and credentials
    come from the AWS_* environment (dvc-s3 reads it). Outside a DVC repository nothing is pushed (0).

    Raises:
        StorageError: one line naming the remote and DVC's message; StorageUnavailable when the endpoint did not
            answer (worth retrying).
    """
    from lesionflow.io.publish import StorageError, StorageUnavailable
    from lesionflow.io.remote import redact_uri

    if not is_dvc_repo(ws):
        return 0
    added = _dvc(ws, "remote", "add", "--local", "--force", STORAGE_REMOTE, url)
    if added.returncode != 0:
        raise StorageError(f"cannot configure the DVC remote {redact_uri(url)}: {_error_line(added)}")
    proc = _dvc(ws, "push", "--remote", STORAGE_REMOTE)
    if proc.returncode != 0:
        message = _error_line(proc)
        kind = StorageUnavailable if any(w in message.lower() for w in _TRANSIENT) else StorageError
        raise kind(f"dvc push to {redact_uri(url)} failed: {message}; check AWS_ENDPOINT_URL, the bucket, credentials")
    pushed = re.search(r"(\d+) files? pushed", proc.stdout)  # "Everything is up to date." when none
    return int(pushed.group(1)) if pushed else 0


DVC_YAML_HEADER = """\
# Generated from the stage registry (lesionflow.stages) and the artifact catalog (lesionflow.catalog.artifacts)
# by `lesionflow dvc-yaml`; tests/test_dvc_consistency.py fails on any difference. Do not edit by hand.
# Every cmd is the same function the Prefect flow runs.
"""


def dvc_stages() -> dict[str, dict[str, Any]]:
    """The ``stages:`` mapping of dvc.yaml, derived from each stage's declaration."""
    from lesionflow.catalog.artifacts import Dvc
    from lesionflow.stages.registry import STAGES
    from lesionflow.stages.spec import dvc_deps

    out: dict[str, dict[str, Any]] = {}
    for name, spec in STAGES.items():
        entry: dict[str, Any] = {"cmd": f"lesionflow stage {name}", "params": list(spec.params)}
        entry["deps"] = list(dvc_deps(spec, STAGES))
        outs: list[Any] = [
            *spec.outs(Dvc.OUT),
            *({path: {"persist": True}} for path in spec.outs(Dvc.PERSIST)),
            *({path: {"cache": False}} for path in spec.outs(Dvc.REPORT)),
        ]
        if outs:
            entry["outs"] = outs
        metrics = [{a.path: {"cache": False}} for a in spec.writes if a.dvc is Dvc.METRIC]
        plots = [
            {a.path: {"cache": False, **_axes(a.plot_axes), **_series(a.plot_series)}}
            for a in spec.writes
            if a.dvc is Dvc.PLOT
        ]
        entry.update({k: v for k, v in (("metrics", metrics), ("plots", plots)) if v})
        out[name] = entry
    return out


def _axes(axes: tuple[str, str] | None) -> dict[str, str]:
    return {} if axes is None else {"x": axes[0], "y": axes[1]}


def _series(column: str | None) -> dict[str, str]:
    return {} if column is None else {"template": series_template_name(column)}


def dvc_top_level() -> dict[str, list[Any]]:
    """Metrics and plots no stage writes (the utility study's reports): dvc.yaml's top-level lists."""
    from lesionflow.catalog.artifacts import ARTIFACTS, Dvc

    loose = [a for a in ARTIFACTS.values() if a.producer is None]
    out: dict[str, list[Any]] = {}
    metrics = [a.path for a in loose if a.dvc is Dvc.METRIC]
    plots = [{a.path: {**_axes(a.plot_axes), **_series(a.plot_series)}} for a in loose if a.dvc is Dvc.PLOT]
    if metrics:
        out["metrics"] = metrics
    if plots:
        out["plots"] = plots
    return out


def render_dvc_yaml() -> str:
    """dvc.yaml's exact text: the header, then the derived stages and top-level metrics and plots."""
    import yaml

    body = {"stages": dvc_stages(), **dvc_top_level()}
    return DVC_YAML_HEADER + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)


# ---- DVC's plots: one line per series, and a page that renders offline -------------------------------------------
# Files under .dvc/ that are derived here like dvc.yaml (written by `lesionflow dvc-yaml`, compared by the tests).
# DVC resolves a plot's ``template`` in .dvc/plots/ and ``plots.html_template`` (set in .dvc/config) from .dvc/.
PLOT_TEMPLATES_DIR = ".dvc/plots"
PLOTS_PAGE = ".dvc/plots.html"
# Vega-Lite of the bundled page: DVC's own plot templates are written for Vega-Lite 5 ($schema .../v5.json).
PLOTS_PAGE_VEGA_LITE = "5.21"


def series_template_name(column: str) -> str:
    return f"lines-by-{column}"


def render_series_template(column: str) -> str:
    """A DVC plot template (Vega-Lite) drawing one line per value of ``column``, dashed per revision.

    DVC's built-in templates colour by revision and file only, so a long table (``method,step,loss``) would be
    one line zig-zagging through every method; here colour is the column and the dash is the revision (so
    ``dvc plots diff`` / experiments still tell revisions apart). Anchors are DVC's ``<DVC_METRIC_*>``.
    """
    import json

    spec = {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "data": {"values": "<DVC_METRIC_DATA>"},
        "title": "<DVC_METRIC_TITLE>",
        "width": 300,
        "height": 300,
        "mark": {"type": "line", "tooltip": True},
        "encoding": {
            "x": {"field": "<DVC_METRIC_X>", "type": "quantitative", "title": "<DVC_METRIC_X_LABEL>"},
            "y": {
                "field": "<DVC_METRIC_Y>",
                "type": "quantitative",
                "title": "<DVC_METRIC_Y_LABEL>",
                "scale": {"zero": False},
            },
            "color": {"field": column, "type": "nominal"},
            "strokeDash": {"field": "rev", "type": "nominal"},
        },
        "params": [{"name": "grid", "select": "interval", "bind": "scales"}],
    }
    return json.dumps(spec, indent=2) + "\n"


_PAGE = """<!DOCTYPE html>
<!-- Generated by `lesionflow dvc-yaml` (lesionflow.dvc.render_plots_page); do not edit by hand.
     DVC's page for `dvc plots show` (plots.html_template in .dvc/config). Vega {vega}, Vega-Lite {vega_lite} and
     Vega-Embed {vega_embed} are inlined below (bundled by vl-convert-python {vl_convert}), so the page renders
     with no network: DVC's default page loads them from a CDN. DVC fills plot_divs and refresh_tag; its
     scripts placeholder is left out on purpose (it holds those CDN tags). -->
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <script type="text/javascript">
(function () {{
{bundle}
}})();
    </script>
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


# What DVC's plot divs call (``vegaEmbed('#id', spec)``) and what Vega-Embed needs: the bundle's globals.
_PAGE_GLOBALS = "window.vegaEmbed = vegaEmbed; window.vega = vega; window.vegaLite = vegaLite;"


def render_plots_page() -> str:
    """The offline page for ``dvc plots show``: DVC's page with Vega, Vega-Lite and Vega-Embed inlined.

    The bundle defines ``window.vega``, ``window.vegaLite`` and ``window.vegaEmbed`` (what DVC's plot divs
    call); wrapped in a function so its top-level names cannot clash with the ``var spec`` of those divs.
    """
    from importlib.metadata import version

    import vl_convert

    bundle = vl_convert.javascript_bundle(_PAGE_GLOBALS, vl_version=PLOTS_PAGE_VEGA_LITE)
    if "</script" in bundle.lower():  # would end the inline script early
        raise ValueError("the Vega bundle contains '</script'; it cannot be inlined")
    return _PAGE.format(
        vega=vl_convert.get_vega_version(),
        vega_lite=PLOTS_PAGE_VEGA_LITE,
        vega_embed=vl_convert.get_vega_embed_version(),
        vl_convert=version("vl-convert-python"),
        bundle=bundle,
    )


def derived_dvc_files() -> dict[str, str]:
    """Every DVC file derived from the declarations, by workspace-relative path: dvc.yaml, a plot template per
    plotted series column, and the offline plots page (its bundling takes a few seconds)."""
    from lesionflow.catalog.artifacts import ARTIFACTS, Dvc

    files = {"dvc.yaml": render_dvc_yaml()}
    columns = sorted({a.plot_series for a in ARTIFACTS.values() if a.dvc is Dvc.PLOT and a.plot_series})
    for column in columns:
        files[f"{PLOT_TEMPLATES_DIR}/{series_template_name(column)}.json"] = render_series_template(column)
    files[PLOTS_PAGE] = render_plots_page()
    return files
