"""A utility study in MLflow: one parent run with the effects and the reports, one child run per cell.

The MLflow compare view then lines the cells up (arm, real fraction, ratio, seed as params; the cell's mean test
Dice, NSD, HD95 and lesion sensitivity as metrics), and the parent holds what people read (summary.json,
cells.csv, the two PNGs) with each arm's effect as metrics.

Contracts:
- Idempotent: the parent is tagged with the digest of the study's summary.json bytes. A study whose summary is
  unchanged (a rerun served from its cells' records) finds its finished parent and logs nothing new.
- Names: MLflow keys allow letters, digits and ``_ - . / space``; an arm's ``+`` is written ``_and_``
  (``lefusion+diffmask`` -> ``lefusion_and_diffmask``) in metric keys, never in param values.
- Credentials never reach MLflow: the tracking URI is reported redacted, nothing else names a URL.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lesionflow.hashing import sha256_file
from lesionflow.io.remote import redact_uri
from lesionflow.registry.tracking import (
    check_reachable,
    default_artifact_root,
    ensure_experiment,
    mlflow_session,
    sqlite_path,
)
from lesionflow.study.design import Cell

TAG_STUDY_DIGEST = "lesionflow.study_digest"
TAG_KIND = "lesionflow.kind"
PARENT_RUN_ID = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a child under its parent


@dataclass(frozen=True)
class CellRun:
    """One cell as MLflow shows it: ``cell_id`` is the run name; ``params`` and ``metrics`` are logged as given."""

    cell_id: str
    params: Mapping[str, str | float | int]
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class StudyRuns:
    parent_run_id: str
    experiment: str
    tracking_uri: str  # redacted
    n_children: int
    logged: bool  # False when an identical study was already logged


def metric_key(*parts: object) -> str:
    """``effect.lefusion_and_diffmask.f025`` from its parts (MLflow-safe, see the module contract)."""
    return ".".join(str(p).replace("+", "_and_") for p in parts)


def cell_runs(cells: pd.DataFrame) -> list[CellRun]:
    """One run per (arm, fraction, ratio, seed) of ``cells.csv``: the means over its test cases."""
    out = []
    for (arm, fraction, ratio, seed), group in cells.groupby(["arm", "fraction", "ratio", "seed"], sort=True):
        metrics = {f"test_{m}_mean": float(group[m].mean()) for m in ("dice", "nsd", "hd95_mm") if m in group}
        if "lesions" in group and int(group["lesions"].sum()) > 0:
            metrics["test_lesion_sensitivity"] = float(group["detected"].sum() / group["lesions"].sum())
            metrics["test_false_positives_per_case"] = float(group["false_positives"].mean())
        cell = Cell(str(arm), float(fraction), int(seed), float(ratio), dose=bool(group["dose"].iloc[0]))
        params: dict[str, str | float | int] = {
            "arm": str(arm),
            "fraction": float(fraction),
            "ratio": float(ratio),
            "seed": int(seed),
        }
        out.append(CellRun(cell.cell_id, {**params, "n_test_cases": int(group["case_id"].nunique())}, metrics))
    return out


def effect_metrics(effects: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The parent's metrics: each (arm, ratio) row's mean difference from real, its CI bounds and Holm p."""
    out: dict[str, float] = {}
    for row in effects:
        dose = f".x{round(float(row['ratio']) * 100):03d}" if row.get("dose") else ""
        stem = metric_key("effect", f"{row['arm']}{dose}", f"f{round(float(row['fraction']) * 100):03d}")
        for field in ("mean", "ci_low", "ci_high", "p_holm"):
            out[f"{stem}.{field}"] = float(row[field])
    return out


def _find_parent(client: Any, experiment_id: str, digest: str) -> str | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{TAG_STUDY_DIGEST}` = '{digest}' and tags.`{TAG_KIND}` = 'utility-study' "
            "and attributes.status = 'FINISHED'"
        ),
        max_results=1,
    )
    return str(runs[0].info.run_id) if runs else None


def log_study(
    tracking_uri: str,
    experiment: str,
    summary_file: Path,
    study_params: Mapping[str, Any],
    cells: pd.DataFrame,
    effects: Sequence[Mapping[str, Any]],
    files: Sequence[Path],
) -> StudyRuns:
    """Log the study (see the module contract); returns the parent run id. Raises RegistryUnavailable (one line)
    when an http(s) tracking server does not answer."""
    from mlflow.entities import Metric, Param, RunTag

    from lesionflow.registry.publish import encode_param, flatten_params

    check_reachable(tracking_uri)
    db = sqlite_path(tracking_uri)
    if db is not None and str(db) not in ("", ":memory:"):
        db.parent.mkdir(parents=True, exist_ok=True)
    digest = sha256_file(summary_file)
    children = cell_runs(cells)
    shown = redact_uri(tracking_uri)
    with mlflow_session(tracking_uri) as client:
        experiment_id = ensure_experiment(client, experiment, default_artifact_root(tracking_uri))
        found = _find_parent(client, experiment_id, digest)
        if found is not None:
            return StudyRuns(found, experiment, shown, len(children), logged=False)
        tags = {TAG_STUDY_DIGEST: digest, TAG_KIND: "utility-study"}
        parent = client.create_run(experiment_id, run_name=f"utility study {digest[:8]}", tags=tags)
        parent_id = parent.info.run_id
        params = [Param(k, encode_param(v)) for k, v in flatten_params(dict(study_params), "study.").items()]
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in effect_metrics(effects).items()]
        client.log_batch(parent_id, metrics=metrics, params=params)
        for path in files:
            if path.is_file():
                client.log_artifact(parent_id, str(path))
        for child in children:
            run = client.create_run(
                experiment_id,
                run_name=child.cell_id,
                tags={PARENT_RUN_ID: parent_id, TAG_KIND: "utility-study-cell"},
            )
            client.log_batch(
                run.info.run_id,
                metrics=[Metric(k, v, now, 0) for k, v in child.metrics.items()],
                params=[Param(k, encode_param(v)) for k, v in child.params.items()],
                tags=[RunTag(TAG_STUDY_DIGEST, digest)],
            )
            client.set_terminated(run.info.run_id)
        client.set_terminated(parent_id)  # last: an interrupted log leaves no FINISHED parent to be reused
    return StudyRuns(parent_id, experiment, shown, len(children), logged=True)
