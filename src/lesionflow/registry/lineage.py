"""Read a registered model's lineage back from MLflow alone: model version -> run -> data and code.

Nothing here reads workspace files, so it works for a model trained months ago in another checkout, given
only the tracking URI. What :func:`lesionflow.registry.publish.register_model` wrote comes back as:

* ``tags``: every key of LINEAGE_TAGS -> the logged value; ``"none"`` means "recorded as absent" (e.g. no
  synthetic data), ``None`` means the run never recorded the key;
* ``params``: nested again from the flattened ``section.key`` params, values decoded to their types;
* ``datasets``: name, context, full digest, source, n_cases and the per-case rows read back from the run's
  ``datasets/<name>.json`` table (``cases`` is None with the reason in ``cases_note`` when they cannot be read).
  The ``synthetic`` dataset has one row per sample training used (``case_id`` the sample, ``source_case``,
  ``kind``, ``seed``, ``generator`` / ``generator_sha256`` / ``generator_data_sha256`` and the same for DiffMask's
  ``mask_generator``, ``source_lesions``, ``gate_verdict``): :func:`synthetic_generators` reads the generators
  and the ROI sets they were trained on back from those rows.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.tree import Tree

from lesionflow.io.remote import redact_uri
from lesionflow.registry.publish import (
    LINEAGE_TAGS,
    NONE,
    RESERVED_INPUT_TAGS,
    TAG_DIGEST,
    TAG_N_CASES,
    TAG_SOURCE,
    TAG_TABLE,
    TAG_TRUNCATED,
    decode_param,
)
from lesionflow.registry.tracking import MODEL_FILES, mlflow_session, require_store, resolve_with_client

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput

REQUIRED_DATASETS = ("raw", "processed", "plans", "test-split")
NOT_RECORDED = "not recorded"  # a synthetic row field the synthesize manifest did not hold (catalog.readers)
DISPLAY_ORDER = ("raw", "processed", "synthetic", "plans", "test-split")  # others follow by name
SHORT = 12  # hex digits shown for a digest
_MAX_SHOWN_SOURCES = 3
_MAX_SHOWN_SAMPLES = 20


@dataclass(frozen=True)
class DatasetLineage:
    name: str
    context: str
    digest: str  # full sha256 when recorded, else MLflow's short dataset digest
    source: str  # credentials redacted
    source_type: str
    n_cases: int | None
    columns: tuple[str, ...]  # from the dataset schema
    cases: tuple[dict[str, str], ...] | None  # None when the rows could not be read back (see cases_note)
    cases_note: str
    tags: dict[str, str]  # the DatasetRef's own tags (generator_model, ...)


@dataclass(frozen=True)
class GeneratorLineage:
    """One generator the synthetic samples were made with: full weights digest and its training data (ROI set)."""

    method: str
    sha256: str
    training_data_sha256: str  # "not recorded" for a generator saved before train-generator recorded it


@dataclass(frozen=True)
class Lineage:
    tracking_uri: str  # redacted
    model_name: str
    version: int
    aliases: tuple[str, ...]
    model_uri: str
    source: str  # models:/m-<id>
    version_tags: dict[str, str]
    run_id: str
    run_name: str
    experiment_id: str
    experiment_name: str
    start_time: str | None  # ISO 8601, UTC
    status: str
    params: dict[str, Any]
    params_truncated: tuple[str, ...]
    metrics: dict[str, float]
    datasets: tuple[DatasetLineage, ...]
    tags: dict[str, str | None]  # LINEAGE_TAGS -> value; "none" = recorded absent; None = not recorded
    artifacts: tuple[str, ...]  # run artifact paths (reports/, datasets/)
    model_files: tuple[str, ...]  # files of the logged model

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types with recursively sorted keys (stable output for diffs and tests)."""
        return _sorted(asdict(self))

    def dataset(self, name: str) -> DatasetLineage | None:
        return next((d for d in self.datasets if d.name == name), None)


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _sorted(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, list | tuple):
        return [_sorted(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------- reading


def nest_params(flat: dict[str, str]) -> dict[str, Any]:
    """``{"train.lr": "0.1"}`` -> ``{"train": {"lr": 0.1}}`` (a key that clashes with a section stays flat)."""
    nested: dict[str, Any] = {}
    for key in sorted(flat):
        value = decode_param(flat[key])
        *sections, leaf = key.split(".")
        node = nested
        for part in sections:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                node = nested
                leaf = key
                break
            node = child
        node[leaf] = value
    return nested


def _walk(list_artifacts: Callable[[str | None], list[Any]], path: str | None = None) -> list[str]:
    """Every file path under ``path`` of an artifact tree, sorted (``list_artifacts(path)`` lists one level)."""
    found: list[str] = []
    for info in list_artifacts(path):
        found.extend(_walk(list_artifacts, info.path) if info.is_dir else [info.path])
    return sorted(found)


def _list_run_artifacts(client: MlflowClient, run_id: str) -> list[str]:
    return _walk(lambda path: client.list_artifacts(run_id, path))


def _list_model_files(client: MlflowClient, model_id: str | None) -> list[str]:
    return [] if model_id is None else _walk(lambda path: client.list_logged_model_artifacts(model_id, path))


def _read_table(client: MlflowClient, run_id: str, table: str) -> tuple[tuple[dict[str, str], ...] | None, str]:
    from mlflow.exceptions import MlflowException

    try:
        with tempfile.TemporaryDirectory(prefix="lesionflow-lineage-") as tmp:
            local = Path(client.download_artifacts(run_id, table, tmp))
            payload = json.loads(local.read_text())
        columns = [str(c) for c in payload["columns"]]
        rows = tuple(
            {c: ("" if v is None else str(v)) for c, v in zip(columns, row, strict=True)} for row in payload["data"]
        )
    except (MlflowException, OSError, ValueError, KeyError, TypeError) as err:
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        return None, f"per-case rows not readable from {table} ({reason})"
    return rows, ""


def _columns(schema: str | None) -> tuple[str, ...]:
    try:
        specs = json.loads(schema or "{}").get("mlflow_colspec", [])
        return tuple(str(s["name"]) for s in specs if "name" in s)
    except (ValueError, AttributeError, TypeError, KeyError):
        return ()


def _dataset_lineage(client: MlflowClient, run_id: str, dataset_input: DatasetInput) -> DatasetLineage:
    dataset = dataset_input.dataset
    tags = {t.key: t.value for t in dataset_input.tags}
    try:
        source_dict = json.loads(dataset.source or "{}")
        source = str(source_dict.get("uri") or source_dict.get("url") or dataset.source)
    except (ValueError, AttributeError):
        source = str(dataset.source)
    source = redact_uri(tags.get(TAG_SOURCE) or source)
    n_cases: int | None = None
    if tags.get(TAG_N_CASES, "").strip().isdigit():
        n_cases = int(tags[TAG_N_CASES])
    else:
        try:
            n_cases = int(json.loads(dataset.profile or "{}")["num_rows"])
        except (ValueError, KeyError, TypeError):
            n_cases = None
    table = tags.get(TAG_TABLE)
    if table:
        cases, note = _read_table(client, run_id, table)
    elif n_cases == 0:
        cases, note = (), ""
    else:
        cases, note = None, "no per-case table was logged for this dataset"
    own = {k: v for k, v in tags.items() if k not in RESERVED_INPUT_TAGS and not k.startswith("mlflow.")}
    return DatasetLineage(
        name=dataset.name,
        context=tags.get("mlflow.data.context", ""),
        digest=tags.get(TAG_DIGEST) or dataset.digest,
        source=source,
        source_type=str(dataset.source_type or ""),
        n_cases=n_cases,
        columns=_columns(dataset.schema),
        cases=cases,
        cases_note=note,
        tags=dict(sorted(own.items())),
    )


def _read(client: MlflowClient, ref: str, tracking_uri: str) -> Lineage:
    from mlflow.exceptions import MlflowException

    resolved = resolve_with_client(client, ref)
    mv = client.get_model_version(resolved.name, str(resolved.version))
    run = client.get_run(resolved.run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    run_tags = dict(run.data.tags)
    try:
        model_files = _list_model_files(client, resolved.logged_model_id)
    except MlflowException:
        model_files = []
    start = run.info.start_time
    truncated = run_tags.get(TAG_TRUNCATED, "")
    inputs = run.inputs.dataset_inputs if run.inputs else []
    return Lineage(
        tracking_uri=redact_uri(tracking_uri),
        model_name=resolved.name,
        version=resolved.version,
        aliases=resolved.aliases,
        model_uri=resolved.model_uri,
        source=resolved.source,
        version_tags=dict(sorted((mv.tags or {}).items())),
        run_id=run.info.run_id,
        run_name=str(run.info.run_name or ""),
        experiment_id=str(run.info.experiment_id),
        experiment_name=str(experiment.name) if experiment else "",
        start_time=datetime.fromtimestamp(start / 1000, tz=UTC).isoformat() if start else None,
        status=str(run.info.status),
        params=nest_params(dict(run.data.params)),
        params_truncated=tuple(t for t in truncated.split(",") if t),
        metrics=dict(sorted(run.data.metrics.items())),
        datasets=tuple(
            sorted(
                (_dataset_lineage(client, run.info.run_id, di) for di in inputs),
                key=lambda d: d.name,
            )
        ),
        tags={key: run_tags.get(key) for key in LINEAGE_TAGS},
        artifacts=tuple(_list_run_artifacts(client, run.info.run_id)),
        model_files=tuple(model_files),
    )


def read_lineage(ref: str, tracking_uri: str) -> Lineage:
    """Lineage of model version ``ref`` (``name@alias``, ``name/version`` or run id) from the registry alone.

    Raises:
        ModelNotFound: the reference does not resolve (the message lists the registered models).
        RegistryUnavailable: the tracking server does not answer.
    """
    require_store(tracking_uri)
    with mlflow_session(tracking_uri) as client:
        return _read(client, ref, tracking_uri)


def missing_fields(lineage: Lineage) -> list[str]:
    """Required lineage fields that are absent, e.g. ``["dataset plans", "tag lesionflow.git_commit"]``.

    A tag logged as ``"none"`` counts as recorded; a synthetic generator without a ``synthetic`` dataset does not.
    """
    missing: list[str] = []
    if not lineage.run_id:
        missing.append("run")
    missing.extend(f"tag {key}" for key in LINEAGE_TAGS if lineage.tags.get(key) is None)
    if not lineage.params:
        missing.append("params")
    if not lineage.metrics:
        missing.append("metrics")
    names = {d.name for d in lineage.datasets}
    required = list(REQUIRED_DATASETS)
    if lineage.tags.get("lesionflow.generator_model") not in (None, NONE):
        required.append("synthetic")
    missing.extend(f"dataset {name}" for name in required if name not in names)
    for dataset in lineage.datasets:
        if not dataset.digest:
            missing.append(f"dataset {dataset.name} digest")
        if dataset.n_cases is None:
            missing.append(f"dataset {dataset.name} n_cases")
    absent_files = [f for f in MODEL_FILES if not any(p.rsplit("/", 1)[-1] == f for p in lineage.model_files)]
    if absent_files:
        missing.append("model files " + ", ".join(absent_files))
    return missing


# -------------------------------------------------------------------------------------- console tree


def short(digest: str | None) -> str:
    return (digest or NONE)[:SHORT]


def _value(text: str | None) -> str:
    if text is None:
        return "[red]not recorded[/red]"
    if text == NONE:
        return "[dim]none[/dim]"
    return escape(text)


def ordered_datasets(lineage: Lineage) -> list[DatasetLineage]:
    """Datasets in pipeline order (raw, processed, synthetic, plans, test-split), then the others by name."""
    rank = {name: i for i, name in enumerate(DISPLAY_ORDER)}
    return sorted(lineage.datasets, key=lambda d: (rank.get(d.name, len(rank)), d.name))


def cases_text(dataset: DatasetLineage) -> str:
    unit = "sample" if dataset.name == "synthetic" else "case"
    if dataset.n_cases is None:
        return f"? {unit}s"
    if dataset.n_cases == 0 and dataset.cases == ():
        return "no per-case rows"
    return f"{dataset.n_cases} {unit}" + ("" if dataset.n_cases == 1 else "s")


def synthetic_generators(lineage: Lineage) -> tuple[GeneratorLineage, ...]:
    """The distinct generators of the synthetic samples training used, from the per-sample rows (lesion makers
    first, then mask models); from the ``generator_model`` tag ("method:digest, ...", training data not recorded)
    when the rows hold none. Empty without synthetic data."""
    dataset = lineage.dataset("synthetic")
    if dataset is None:
        return ()
    found: dict[tuple[str, str], GeneratorLineage] = {}
    for prefix in ("generator", "mask_generator"):
        for row in dataset.cases or ():
            method, digest = row.get(prefix, ""), row.get(f"{prefix}_sha256", "")
            if method and method != NOT_RECORDED and (method, digest) not in found:
                data = row.get(f"{prefix}_data_sha256") or NOT_RECORDED
                found[(method, digest)] = GeneratorLineage(method, digest, data)
    if found:
        return tuple(found.values())
    named = dataset.tags.get("generator_model") or lineage.tags.get("lesionflow.generator_model") or ""
    pairs = [part.strip().partition(":") for part in named.split(",") if ":" in part]
    return tuple(GeneratorLineage(m, d, NOT_RECORDED) for m, _, d in pairs)


def generator_training_data(generators: tuple[GeneratorLineage, ...]) -> tuple[str, ...]:
    """The distinct ROI-set digests the generators were trained on (recorded ones only, in order)."""
    return tuple(dict.fromkeys(g.training_data_sha256 for g in generators if g.training_data_sha256 != NOT_RECORDED))


def _sample_line(row: dict[str, str]) -> str:
    mask = f" + {row['mask_generator']}" if row.get("mask_generator") else ""
    return (
        f"{row.get('case_id', '?')} from {row.get('source_case', '?')}: {row.get('kind', '?')}, "
        f"seed {row.get('seed', '?')}, {row.get('generator', '?')}{mask}, "
        f"source {row.get('source_lesions', '?')}, {row.get('gate_verdict', '?')}"
    )


def _case_sources(dataset: DatasetLineage) -> list[str]:
    seen: list[str] = []
    for row in dataset.cases or ():
        uri = row.get("source_uri") or row.get("source") or ""
        if uri and (shown := redact_uri(uri)) not in seen:
            seen.append(shown)
    return seen


def _dataset_label(dataset: DatasetLineage, lineage: Lineage) -> str:
    label = (
        f"[bold]{escape(dataset.name)}[/bold] ({escape(dataset.context or '?')}): {cases_text(dataset)}, "
        f"digest {short(dataset.digest)}, source {escape(dataset.source)}"
    )
    if dataset.name == "plans":
        plans_hash = lineage.tags.get("lesionflow.plans_hash")
        label += f", plans hash {_value(plans_hash if plans_hash in (None, NONE) else short(plans_hash))}"
    if dataset.cases is None and dataset.cases_note:
        label += f" [yellow]({escape(dataset.cases_note)})[/yellow]"
    return label


def _add_synthetic(node: Tree, dataset: DatasetLineage, lineage: Lineage) -> None:
    """Generators with full digests and the data they were trained on, then one line per sample used."""
    generators = synthetic_generators(lineage)
    if not generators:
        node.add(f"generator model {_value(lineage.tags.get('lesionflow.generator_model'))}")
    for g in generators:
        node.add(
            f"generator {escape(g.method)} sha256 {escape(g.sha256)}, trained on ROIs {escape(g.training_data_sha256)}"
        )
    rows = dataset.cases or ()
    samples = node.add(f"[bold]samples used[/bold]: {len(rows)}")
    for row in rows[:_MAX_SHOWN_SAMPLES]:
        samples.add(escape(_sample_line(row)))
    if len(rows) > _MAX_SHOWN_SAMPLES:
        samples.add(f"[dim]... and {len(rows) - _MAX_SHOWN_SAMPLES} more (lesionflow lineage --json lists all)[/dim]")


def lineage_tree(lineage: Lineage) -> Tree:
    """Model version -> run (metrics) -> data (each dataset) and code (commit, dvc.lock, params, flow run)."""
    aliases = " ".join(f"@{a}" for a in lineage.aliases) or "no aliases"
    tree = Tree(
        f"[bold]model {escape(lineage.model_name)} v{lineage.version}[/bold] ({escape(aliases)}) "
        f"{escape(lineage.source)} on {escape(lineage.tracking_uri)}"
    )
    run = tree.add(
        f"[bold]run[/bold] {lineage.run_id} ({escape(lineage.run_name)}), experiment "
        f"{escape(lineage.experiment_name)}, started {lineage.start_time or '?'}, {lineage.status.lower()}"
    )
    metrics = run.add("[bold]metrics[/bold]" + ("" if lineage.metrics else " [red]none logged[/red]"))
    for key, value in lineage.metrics.items():
        metrics.add(f"{escape(key)} = {value:.4g}")
    data = run.add("[bold]data[/bold]")
    names = {d.name for d in lineage.datasets}
    for dataset in ordered_datasets(lineage):
        node = data.add(_dataset_label(dataset, lineage))
        if dataset.name == "synthetic":
            _add_synthetic(node, dataset, lineage)
            continue
        sources = _case_sources(dataset)
        for uri in sources[:_MAX_SHOWN_SOURCES]:
            node.add(f"[dim]{escape(uri)}[/dim]")
        if len(sources) > _MAX_SHOWN_SOURCES:
            node.add(f"[dim]... and {len(sources) - _MAX_SHOWN_SOURCES} more source URIs[/dim]")
    if "synthetic" not in names:
        generator = lineage.tags.get("lesionflow.generator_model")
        data.add(f"[bold]synthetic[/bold]: none (generator model {_value(generator)})")
    for name in REQUIRED_DATASETS:
        if name not in names:
            data.add(f"[bold]{name}[/bold]: [red]not recorded[/red]")
    code = run.add("[bold]code[/bold]")
    for label, key in (
        ("git commit", "lesionflow.git_commit"),
        ("code version", "lesionflow.code_version"),
        ("dvc.lock sha256", "lesionflow.dvc_lock_sha256"),
        ("params sha256", "lesionflow.params_sha256"),
        ("plans hash", "lesionflow.plans_hash"),
        ("prefect flow run id", "lesionflow.prefect_flow_run_id"),
        ("workspace", "lesionflow.workspace"),
    ):
        code.add(f"{label}: {_value(lineage.tags.get(key))}")
    if lineage.artifacts:
        run.add("[bold]artifacts[/bold]: " + escape(", ".join(lineage.artifacts)))
    return tree
