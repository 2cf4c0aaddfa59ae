"""Register a trained segmenter in MLflow with everything needed to trace it back to its data and code.

One MLflow run per registration holds:

* params: the params.yaml sections flattened to ``section.key`` (values: strings as written unless they would
  read back as another JSON value, everything else as JSON, so :func:`lesionflow.registry.lineage.read_lineage`
  can nest them back with their types); values over MLflow's 6000 characters are cut and listed in the run tag
  ``lesionflow.params_truncated``;
* metrics: the evaluation summary;
* tags: every key of :data:`LINEAGE_TAGS` (``"none"`` where the caller had no value), plus the caller's others;
* dataset inputs: one per :class:`DatasetRef` (MLflow's digest column holds 36 characters, so the dataset
  digest is the first 12 hex and the full sha256 is the input tag ``lesionflow.digest_sha256``); the per-case rows
  are logged as the run artifact ``datasets/<name>.json`` (MLflow table format) because MLflow datasets keep
  only the schema and profile, not the rows;
* artifacts: the caller's reports under ``reports/``;
* the model: a pyfunc logged from code (``registry/pyfunc_model.py``) with the three model files as artifacts --
  nothing pickled -- registered as a new version with alias ``candidate`` (and ``champion`` when promoted);
  the ``lesionflow.*`` tags (LINEAGE_TAGS and any other given) are also written on the version.

Every string that reaches MLflow (param values, run and input tags, dataset sources and rows) passes
:func:`lesionflow.io.remote.redact_text` first, so a URL's credentials are never stored.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lesionflow.errors import LesionflowError
from lesionflow.io.remote import redact_text, redact_uri
from lesionflow.registry.tracking import (
    MODEL_FILES,
    check_reachable,
    default_artifact_root,
    ensure_experiment,
    mlflow_session,
    sqlite_path,
)

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.data.pandas_dataset import PandasDataset

LINEAGE_TAGS = (
    "lesionflow.git_commit",
    "lesionflow.dvc_lock_sha256",
    "lesionflow.params_sha256",
    "lesionflow.plans_hash",
    "lesionflow.prefect_flow_run_id",
    "lesionflow.code_version",
    "lesionflow.generator_model",
    "lesionflow.workspace",
)
NONE = "none"
CANDIDATE = "candidate"
CHAMPION = "champion"
MODEL_ARTIFACT = "model"  # name of the logged model inside the run
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/lesionflow
ARTIFACT_KEYS = {"weights": MODEL_FILES[0], "config": MODEL_FILES[1], "metadata": MODEL_FILES[2]}
REPORTS_DIR = "reports"
DATASETS_DIR = "datasets"
SHORT_DIGEST = 12
# Defaults of the pyfunc model's predict params (as in pyfunc_model.DEFAULTS). Not passed as model_config:
# MLflow 3.17 logs a model_config as run params, where they would mix with params.yaml.
PREDICT_OPTIONS: dict[str, Any] = {"overlap": 0.5, "sw_batch_size": 2, "device": "auto"}
# dataset input tags written by lesionflow (the caller's DatasetRef.tags are logged next to them, as given)
TAG_DIGEST = "lesionflow.digest_sha256"
TAG_N_CASES = "lesionflow.n_cases"
TAG_SOURCE = "lesionflow.source"
TAG_TABLE = "lesionflow.cases_table"
TAG_TRUNCATED = "lesionflow.params_truncated"
RESERVED_INPUT_TAGS = (TAG_DIGEST, TAG_N_CASES, TAG_SOURCE, TAG_TABLE)

_MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_MAX_TAG_VALUE = 8000  # MAX_TAG_VAL_LENGTH
_MAX_INPUT_TAG_VALUE = 500  # MAX_INPUT_TAG_VALUE_SIZE
_MAX_KEY = 250  # MAX_ENTITY_KEY_LENGTH
_BAD_KEY_CHARS = re.compile(r"[^\w./\- :]")


@dataclass(frozen=True)
class DatasetRef:
    name: str  # "raw", "processed", "synthetic", "plans", "test-split"
    digest: str  # full sha256 hex
    source: str  # URI or path without credentials (redacted again before logging)
    context: str  # "training" | "evaluation" | "planning"
    cases: Sequence[Mapping[str, str]] = ()  # per-case rows (case_id, digest, split, source_uri, ...)
    tags: Mapping[str, str] = field(default_factory=dict)  # e.g. n_cases, generator_model


@dataclass(frozen=True)
class RegistrationRequest:
    tracking_uri: str
    experiment: str
    model_name: str
    model_dir: Path  # model.safetensors, config.json, metadata.json
    params: Mapping[str, Any]  # nested params sections
    metrics: Mapping[str, float]
    datasets: Sequence[DatasetRef]
    tags: Mapping[str, str]  # lineage tags (keys in LINEAGE_TAGS) and any others
    artifacts: Sequence[Path]  # extra files or folders to log under reports/
    promote_champion: bool
    pip_requirements: Sequence[str]
    artifact_root: str | None = None  # where a new experiment keeps artifacts (s3://...); None = the default


@dataclass(frozen=True)
class RegistrationResult:
    model_name: str
    version: int
    run_id: str
    model_uri: str  # models:/<name>/<version>
    aliases: tuple[str, ...]
    tracking_uri: str  # redacted


@dataclass(frozen=True)
class ChampionInfo:
    model_name: str
    version: int
    run_id: str
    metrics: dict[str, float]
    test_split_digest: str | None  # full sha256 of the run's "test-split" dataset, None when not logged


class RegistrationError(LesionflowError):
    """The registration request cannot be logged as given (missing model files, duplicate dataset names...)."""


# ---------------------------------------------------------------------------------------- encoding


def encode_param(value: Any) -> str:
    """Strings as written unless they would read back as another JSON value; everything else as JSON."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return value
        return json.dumps(value)
    if isinstance(value, Path):
        return str(value)
    return json.dumps(value, sort_keys=True, default=str)


def decode_param(text: str) -> Any:
    """Inverse of :func:`encode_param`."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _clean_key(key: str) -> str:
    return _BAD_KEY_CHARS.sub("_", key)[:_MAX_KEY]


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``; an empty mapping stays as a leaf ``{}``."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = dict(value) if isinstance(value, Mapping) else value
    return flat


def _param_items(params: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    logged: dict[str, str] = {}
    truncated: list[str] = []
    for key, value in flatten_params(params).items():
        text = redact_text(encode_param(value))  # callers pass Params.redacted_dump(); a raw dict is redacted too
        if len(text) > _MAX_PARAM_VALUE:
            text = text[:_MAX_PARAM_VALUE]
            truncated.append(key)
        logged[_clean_key(key)] = text
    return logged, truncated


def lineage_tag_values(tags: Mapping[str, str]) -> dict[str, str]:
    """Every LINEAGE_TAGS key (``"none"`` for missing or empty values) plus the caller's other tags."""
    values = {key: redact_text(str(value))[:_MAX_TAG_VALUE] for key, value in tags.items() if value not in (None, "")}
    for key in LINEAGE_TAGS:
        values.setdefault(key, NONE)
    return {_clean_key(k): v for k, v in sorted(values.items())}


# -------------------------------------------------------------------------------------------- checks


def _check_request(req: RegistrationRequest) -> None:
    missing = [name for name in MODEL_FILES if not (Path(req.model_dir) / name).is_file()]
    if missing:
        raise RegistrationError(
            f"model folder {req.model_dir} lacks {', '.join(missing)}; run `lesionflow stage train` first"
        )
    absent = [str(p) for p in req.artifacts if not Path(p).exists()]
    if absent:
        raise RegistrationError(f"report files to register are missing: {', '.join(absent)}; rerun evaluate")
    names = [d.name for d in req.datasets]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RegistrationError(f"dataset names must be unique per registration; repeated: {', '.join(duplicates)}")
    bad = [d.name for d in req.datasets if not re.fullmatch(r"[0-9a-fA-F]{16,}", d.digest or "")]
    if bad:
        raise RegistrationError(f"datasets {', '.join(bad)} have no hex digest; compute them before registering")


# ------------------------------------------------------------------------------------------ datasets


def _frame(rows: Sequence[Mapping[str, str]]) -> pd.DataFrame:
    import pandas as pd

    if not rows:
        return pd.DataFrame({"case_id": pd.Series([], dtype=str)})
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    # URIs in the rows (source_uri...) lose any credentials; other values are kept as written.
    cells = [{c: redact_text("" if row.get(c) is None else str(row.get(c))) for c in columns} for row in rows]
    return pd.DataFrame(cells)


def _dataset(df: pd.DataFrame, source: str, name: str, digest: str) -> tuple[PandasDataset, bool]:
    """The MLflow dataset, and whether MLflow could record ``source`` itself."""
    from mlflow.data.pandas_dataset import from_pandas
    from mlflow.exceptions import MlflowException

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "source can be interpreted in multiple ways" for local paths
        try:
            return from_pandas(df, source=source, name=name, digest=digest), True
        except MlflowException:
            # No MLflow resolver for this scheme (dvc://, zarr+s3://...): MLflow's default source is kept and the
            # URI itself is recorded in the input's lesionflow.source tag (see _log_dataset), read back first.
            return from_pandas(df, name=name, digest=digest), False


def _log_dataset(ref: DatasetRef) -> None:
    import mlflow

    source = redact_text(str(ref.source)) or NONE
    df = _frame(ref.cases)
    tags = {
        str(k): redact_text(str(v))[:_MAX_INPUT_TAG_VALUE] for k, v in ref.tags.items() if k not in RESERVED_INPUT_TAGS
    }
    tags[TAG_DIGEST] = ref.digest.lower()
    tags[TAG_N_CASES] = str(ref.tags.get("n_cases") or len(ref.cases))
    # Longer URIs live in the dataset's own source (64 KB); a scheme MLflow cannot resolve keeps them in the
    # tag, cut with a visible marker (in practice only a long ';'-joined list of sources), see below.
    if len(source) <= _MAX_INPUT_TAG_VALUE:
        tags[TAG_SOURCE] = source
    if ref.cases:
        table = f"{DATASETS_DIR}/{_clean_key(ref.name).replace('/', '_')}.json"
        mlflow.log_table(df, artifact_file=table)
        tags[TAG_TABLE] = table
    dataset, resolved = _dataset(df, source, ref.name, ref.digest.lower()[:SHORT_DIGEST])
    if not resolved and TAG_SOURCE not in tags:
        tags[TAG_SOURCE] = source[: _MAX_INPUT_TAG_VALUE - 1] + "…"
    mlflow.log_input(dataset, context=ref.context, tags=tags)


def _log_artifacts(paths: Sequence[Path]) -> None:
    import mlflow

    for path in map(Path, paths):
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=f"{REPORTS_DIR}/{path.name}")
        else:
            mlflow.log_artifact(str(path), artifact_path=REPORTS_DIR)


# -------------------------------------------------------------------------------------------- model


def _signature(model_dir: Path) -> Any:
    """Input: float32 (in_channels, x, y, z), the preprocessed image; params: sliding-window options."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    config = json.loads((model_dir / MODEL_FILES[1]).read_text())
    channels = int(config["network"]["in_channels"])
    inputs = Schema([TensorSpec(np.dtype(np.float32), (channels, -1, -1, -1))])
    params = ParamSchema(
        [
            ParamSpec("overlap", "double", float(PREDICT_OPTIONS["overlap"])),
            ParamSpec("sw_batch_size", "long", int(PREDICT_OPTIONS["sw_batch_size"])),
            ParamSpec("device", "string", str(PREDICT_OPTIONS["device"])),
        ]
    )
    return ModelSignature(inputs=inputs, params=params)


def _log_model(req: RegistrationRequest) -> Any:
    import mlflow

    model_dir = Path(req.model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "+cpu stripped from torch requirement" and similar notices
        return mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=str(PYFUNC_FILE),
            artifacts={key: str(model_dir / filename) for key, filename in ARTIFACT_KEYS.items()},
            pip_requirements=list(req.pip_requirements),
            signature=_signature(model_dir),
            # The model carries the package it imports at load time (lesionflow is not on PyPI): MLflow copies it
            # under the model's code/ and puts it on sys.path when loading, so a clean environment with the
            # logged requirements loads it (tests/registry/test_portable_model.py).
            code_paths=[str(PACKAGE_DIR)],
        )


def _metric_values(metrics: Mapping[str, float]) -> dict[str, float]:
    """Float values (NaN kept: MLflow stores it, and "undefined" is a result); None dropped."""
    return {_clean_key(k): float(v) for k, v in metrics.items() if v is not None}


def register_model(req: RegistrationRequest) -> RegistrationResult:
    """Log one run with params, metrics, lineage tags, datasets, reports and the model; register a new version.

    Raises:
        RegistryUnavailable: the tracking server does not answer (nothing was logged).
        RegistrationError: the request points at missing files.
    """
    import mlflow

    _check_request(req)
    check_reachable(req.tracking_uri)
    db = sqlite_path(req.tracking_uri)
    if db is not None and str(db) not in ("", ":memory:"):
        db.parent.mkdir(parents=True, exist_ok=True)
    tags = lineage_tag_values(req.tags)
    params, truncated = _param_items(req.params)
    if truncated:
        tags[TAG_TRUNCATED] = ",".join(truncated)[:_MAX_TAG_VALUE]
    with mlflow_session(req.tracking_uri) as client:
        experiment_id = ensure_experiment(
            client, req.experiment, req.artifact_root or default_artifact_root(req.tracking_uri)
        )
        with mlflow.start_run(experiment_id=experiment_id, run_name=req.model_name, tags=tags) as run:
            run_id = run.info.run_id
            if params:
                mlflow.log_params(params)
            for ref in req.datasets:
                _log_dataset(ref)
            _log_artifacts(req.artifacts)
            info = _log_model(req)
            metrics = _metric_values(req.metrics)
            if metrics:
                mlflow.log_metrics(metrics, model_id=info.model_id)
        version_tags = {key: value for key, value in tags.items() if key.startswith("lesionflow.")}
        # Registered after the run in one call that also writes the version's lineage tags (one round trip
        # instead of nine against a server).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mv = mlflow.register_model(info.model_uri, req.model_name, tags=version_tags, await_registration_for=60)
        version = int(mv.version)
        aliases = _set_aliases(client, req.model_name, version, req.promote_champion)
    return RegistrationResult(
        model_name=req.model_name,
        version=version,
        run_id=run_id,
        model_uri=f"models:/{req.model_name}/{version}",
        aliases=aliases,
        tracking_uri=redact_uri(req.tracking_uri),
    )


def _set_aliases(client: MlflowClient, name: str, version: int, champion: bool) -> tuple[str, ...]:
    aliases = (CANDIDATE, CHAMPION) if champion else (CANDIDATE,)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, str(version))
    return tuple(sorted(aliases))


def champion_info(tracking_uri: str, model_name: str) -> ChampionInfo | None:
    """The ``champion`` version of ``model_name`` with its run's metrics; None when there is none yet."""
    from mlflow.exceptions import MlflowException

    check_reachable(tracking_uri)
    db = sqlite_path(tracking_uri)
    if db is not None and str(db) not in ("", ":memory:") and not db.is_file():
        return None
    with mlflow_session(tracking_uri) as client:
        try:
            model = client.get_registered_model(model_name)
        except MlflowException as err:
            if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        version = (model.aliases or {}).get(CHAMPION)
        if version is None:
            return None
        mv = client.get_model_version(model_name, str(version))
        run = client.get_run(str(mv.run_id))
        digest = None
        for dataset_input in run.inputs.dataset_inputs if run.inputs else ():
            if dataset_input.dataset.name == "test-split":
                input_tags = {t.key: t.value for t in dataset_input.tags}
                digest = input_tags.get(TAG_DIGEST) or dataset_input.dataset.digest
        return ChampionInfo(
            model_name=model_name,
            version=int(mv.version),
            run_id=str(mv.run_id),
            metrics={k: float(v) for k, v in sorted(run.data.metrics.items())},
            test_split_digest=digest,
        )
