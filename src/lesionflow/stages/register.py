"""Stage ``register``: the evaluated model into MLflow with its full lineage; aliases only through the gate.

Logged on one run: params (flattened), test metrics, the model (safetensors + config + metadata as an
MLflow pyfunc "model from code": nothing pickled), plots and tables, and the lineage as dataset inputs
(raw manifest, processed store, plans, test split, synthetic store when used) with full digests, plus tags
(git commit, dvc.lock sha256, params sha256, plans hash, Prefect flow-run id, code version, generator).
``candidate`` always moves to the new version; ``champion`` only when validate-metrics says so.
Registration is idempotent: a version already registered for the same model bytes, metrics and lineage
is reused, so retrying after an unreachable server (outputs are kept on disk) never retrains or duplicates.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from lesionflow.catalog.artifacts import (
    EVALUATE_CASES,
    EVALUATE_REPORT,
    METRICS,
    PLANS,
    RAW,
    RAW_DATASET,
    RAW_MANIFEST,
    SEGMENTER,
    STORE,
    TRAIN_CURVES,
    TRAIN_CURVES_PNG,
    TRAIN_SUMMARY,
    VALIDATE_METRICS_SUMMARY,
    summary_artifact,
)
from lesionflow.catalog.digests import raw_digest
from lesionflow.catalog.readers import (
    load_plan,
    read_metadata,
    splits,
    synthetic_lineage_rows,
    write_stage_summary,
)
from lesionflow.errors import SourceError
from lesionflow.hashing import sha256_file, sha256_json
from lesionflow.manifest import read_manifest
from lesionflow.params import Params
from lesionflow.stages.base import CODE_VERSION, StageResult
from lesionflow.workspace import Workspace

STAGE = "register"


def git_commit(root: Path) -> str:
    """HEAD of the workspace's git repository (``+dirty`` when tracked files differ), or ``none``."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "none"
    return f"{head}+dirty" if dirty else head


def _file_digest(path: Path) -> str:
    return sha256_file(path) if path.exists() else "none"


def lineage_datasets(ws: Workspace, params: Params, metrics: dict[str, Any]) -> list[Any]:
    """The data versions behind the model, as registry dataset inputs (digests from bytes, URIs redacted)."""
    from lesionflow.io.remote import redact_uri
    from lesionflow.registry.publish import DatasetRef
    from lesionflow.store.zarr_store import list_cases, store_digest

    records = read_manifest(RAW_MANIFEST.at(ws))
    dataset = json.loads(RAW_DATASET.at(ws).read_text()) if RAW_DATASET.at(ws).exists() else {}
    sources = sorted({redact_uri(s) for s in dataset.get("sources", [])})
    raw_rows = [
        {
            "case_id": r.case_id,
            "split": r.split,
            "image_sha256": r.image_sha256,
            "label_sha256": r.label_sha256,
            "source_uri": redact_uri(r.source_uri),
        }
        for r in records
    ]
    split = splits(ws, params)
    meta = read_metadata(ws)
    used = sorted(split.train + split.val)
    processed_rows = [{"case_id": c, "digest": meta[c]["digest"], "split": meta[c]["split"]} for c in used]
    plan = load_plan(ws)
    test = set(metrics["cases"])
    refs = [
        DatasetRef(
            "raw",
            raw_digest(ws),
            ";".join(sources) or str(RAW.at(ws)),
            "training",
            raw_rows,
            {"n_cases": str(len(records)), "source_uris": ";".join(sources)},
        ),
        DatasetRef(
            "processed",
            store_digest(STORE.at(ws)),
            str(STORE.at(ws)),
            "training",
            processed_rows,
            {"n_cases": str(len(used)), "n_train": str(len(split.train)), "n_val": str(len(split.val))},
        ),
        DatasetRef(
            "plans", sha256_file(PLANS.at(ws)), str(PLANS.at(ws)), "planning", [], {"plan_hash": plan.plan_hash}
        ),
        DatasetRef(
            "test-split",
            metrics["test_split_digest"],
            str(RAW.at(ws)),
            "evaluation",
            [row for row in raw_rows if row["case_id"] in test],
            {"n_cases": str(len(test))},
        ),
    ]
    if params.train.synthetic_store:
        root = ws.path(params.train.synthetic_store)
        generator = _generator_model(root)
        # rows = the samples training used (the same rule as train): MLflow's dataset profile counts them
        samples = synthetic_lineage_rows(root, params.train.synthetic_store)
        refs.append(
            DatasetRef(
                "synthetic",
                store_digest(root),
                str(root),
                "training",
                samples,
                {
                    "generator_model": generator,
                    "ratio": str(params.train.synthetic_ratio),
                    "n_cases": str(len(samples)),
                    "n_in_store": str(len(list_cases(root))),
                },
            )
        )
    return refs


def _generator_model(store: Path) -> str:
    """The generator that made a synthetic store, as recorded in its root attributes (``none`` if unknown)."""
    meta = store / "zarr.json"
    if not meta.exists():
        return "none"
    attrs = json.loads(meta.read_text()).get("attributes", {})
    return str(attrs.get("generator_model", "none"))


# Tags that identify "the same registration": same weights, same params, same test cases.
_IDENTITY_TAGS = ("lesionflow.model_sha256", "lesionflow.params_sha256", "lesionflow.test_split_sha256")


def _existing_version(request: Any) -> Any:
    """The version already registered for this model, params and test split (aliases updated), or None."""
    from lesionflow.io.remote import redact_uri
    from lesionflow.registry.publish import CANDIDATE, CHAMPION, RegistrationResult
    from lesionflow.registry.tracking import check_reachable, mlflow_session

    check_reachable(request.tracking_uri)
    want = {k: request.tags[k] for k in _IDENTITY_TAGS}
    with mlflow_session(request.tracking_uri) as client:
        if not client.search_registered_models(filter_string=f"name = '{request.model_name}'"):
            return None
        versions = client.search_model_versions(f"name = '{request.model_name}'")
        same = [v for v in versions if all((v.tags or {}).get(k) == val for k, val in want.items())]
        if not same:
            return None
        version = max(same, key=lambda v: int(v.version))
        aliases = [CANDIDATE, CHAMPION] if request.promote_champion else [CANDIDATE]
        for alias in aliases:
            client.set_registered_model_alias(request.model_name, alias, version.version)
        current = client.get_model_version(request.model_name, version.version)
        return RegistrationResult(
            model_name=request.model_name,
            version=int(version.version),
            run_id=str(version.run_id),
            model_uri=f"models:/{request.model_name}/{version.version}",
            aliases=tuple(sorted(current.aliases or ())),
            tracking_uri=redact_uri(request.tracking_uri),
        )


def run(ws: Workspace, params: Params, *, flow_run_id: str = "none") -> StageResult:
    """Register the segmenter; ``flow_run_id`` is the Prefect flow run that made it (lineage), when there is one."""
    import monai
    import numpy as np
    import safetensors
    import torch

    from lesionflow.registry.publish import RegistrationRequest, register_model
    from lesionflow.registry.tracking import resolve_tracking_uri

    gate_path = VALIDATE_METRICS_SUMMARY.at(ws)
    if not gate_path.exists():
        raise SourceError("the metrics gate has not passed yet; run `lesionflow stage validate-metrics` first")
    gate = json.loads(gate_path.read_text())
    metrics = json.loads(METRICS.at(ws).read_text())
    model = SEGMENTER.at(ws)
    if gate.get("model_sha256") != sha256_file(model / "model.safetensors"):
        raise SourceError(f"{SEGMENTER.path} changed after the metrics gate ran; rerun evaluate and validate-metrics")
    datasets = lineage_datasets(ws, params, metrics)
    # What MLflow stores: URL credentials removed (the hash is of these, so it matches the run's params).
    logged_params = params.redacted_dump()
    synthetic = [d for d in datasets if d.name == "synthetic"]
    tags = {
        "lesionflow.git_commit": git_commit(ws.root),
        "lesionflow.dvc_lock_sha256": _file_digest(ws.dvc_lock),
        "lesionflow.params_sha256": sha256_json(logged_params),
        "lesionflow.plans_hash": next(d.tags["plan_hash"] for d in datasets if d.name == "plans"),
        "lesionflow.prefect_flow_run_id": flow_run_id,
        "lesionflow.code_version": CODE_VERSION,
        "lesionflow.generator_model": synthetic[0].tags["generator_model"] if synthetic else "none",
        "lesionflow.workspace": str(ws.root),
        "lesionflow.model_sha256": metrics["model_sha256"],
        "lesionflow.test_split_sha256": metrics["test_split_digest"],
    }
    train_summary = TRAIN_SUMMARY.at(ws)
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if train_summary.exists():
        t = json.loads(train_summary.read_text())
        numbers.update({f"train_{k}": float(t[k]) for k in ("final_loss", "best_val_dice") if t.get(k) is not None})
    artifacts = [
        p
        for p in (
            METRICS.at(ws),
            EVALUATE_CASES.at(ws),
            EVALUATE_REPORT.at(ws) / "boxplot.png",
            EVALUATE_REPORT.at(ws) / "montage.png",
            TRAIN_CURVES_PNG.at(ws),
            TRAIN_CURVES.at(ws),
            gate_path,
        )
        if p.exists()
    ]
    requirements = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"monai=={monai.__version__}",
        f"safetensors=={safetensors.__version__}",
        f"numpy=={np.__version__}",
    ]
    request = RegistrationRequest(
        tracking_uri=resolve_tracking_uri(params.registry.tracking_uri, ws.root),
        experiment=params.registry.experiment,
        model_name=params.registry.model_name,
        model_dir=model,
        params=logged_params,
        metrics=numbers,
        datasets=datasets,
        tags=tags,
        artifacts=artifacts,
        promote_champion=bool(gate["promote_champion"]),
        pip_requirements=requirements,
        # Team storage: MLflow keeps the model and reports under <storage.remote>/mlflow (boto3 reads AWS_*).
        artifact_root=f"{params.storage.remote}/mlflow" if params.storage.remote else None,
    )
    existing = _existing_version(request)
    result = existing or register_model(request)
    summary = {
        "model_name": result.model_name,
        "version": result.version,
        "run_id": result.run_id,
        "model_uri": result.model_uri,
        "aliases": list(result.aliases),
        "reused_existing_version": existing is not None,
        "champion_status": gate["champion"]["status"],
        "lineage": f"lesionflow lineage {result.model_name}/{result.version}",
    }
    write_stage_summary(ws, STAGE, summary)
    return StageResult(STAGE, True, summary, {"summary": summary_artifact(STAGE).path})
