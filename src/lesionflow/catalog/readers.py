"""Readers (and the writers of shared tables) of the artifacts one stage hands to another.

A stage never imports another stage: it reads what an earlier stage wrote through these functions, which
know the artifact's path from the catalog and its format from here. Missing inputs are one-line
``SourceError``s naming the stage to run.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lesionflow.catalog.artifacts import (
    ACCEPTED,
    GENERATOR_CHECKPOINTS,
    GENERATORS,
    METADATA,
    PLANS,
    PROGRESSION_MANIFEST,
    PROGRESSION_STORE,
    RAW_DATASET,
    SYNTHETIC_MANIFEST,
    Artifact,
    accepted_beside,
    metrics_artifact,
    stage_report_dir,
)
from lesionflow.errors import SourceError
from lesionflow.files import write_json, write_text_if_changed
from lesionflow.hashing import sha256_file
from lesionflow.params import Params
from lesionflow.planning.plan import Plan
from lesionflow.seeding import rng_for
from lesionflow.workspace import Workspace


def require(ws: Workspace, artifact: Artifact) -> Path:
    """The artifact's path; a one-line SourceError naming the stage to run when it does not exist."""
    path = artifact.at(ws)
    if not path.exists():
        raise SourceError(f"{artifact.path} does not exist; run `lesionflow stage {artifact.producer}` first")
    return path


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON report, or None when it is missing or unreadable (for displays that may show nothing)."""
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def stage_summary(ws: Workspace, stage: str) -> dict[str, Any]:
    """``reports/<stage>/summary.json`` ({} when the stage has not run)."""
    return read_json(stage_report_dir(ws, stage) / "summary.json") or {}


def write_stage_summary(ws: Workspace, stage: str, summary: dict[str, Any]) -> str:
    """Write the stage's summary.json and its numbers to ``metrics/<stage>.json`` (:func:`write_stage_metrics`);
    returns the summary's workspace-relative path (for StageResult.outputs)."""
    path = stage_report_dir(ws, stage) / "summary.json"
    write_json(path, summary)
    write_stage_metrics(ws, stage, summary)
    return str(path.relative_to(ws.root))


# Numeric lists up to this length (spacing, patch size) become one metric per index; longer ones (per-step
# histories, per-case values) are left to the summary: a metrics table is one row per revision.
_MAX_LIST_METRICS = 8


def numeric_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a stage summary, nested as in the summary: what ``dvc metrics``/``dvc exp show`` compare.

    Kept: finite ints and floats; booleans as 1/0 (a flag that flips shows as a change); numeric lists of at
    most ``_MAX_LIST_METRICS`` entries as ``{"0": .., "1": ..}``. Dropped: strings (hashes, paths, notes),
    None, NaN/inf (not JSON numbers), longer lists, and objects left empty by those rules.
    """

    def number(value: Any) -> float | int | None:
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value):
            return value
        return None

    def convert(value: Any) -> Any:
        if isinstance(value, dict):
            kept = {str(k): v for k, v in ((k, convert(v)) for k, v in value.items()) if v is not None}
            return kept or None
        if isinstance(value, list | tuple):
            numbers = [number(v) for v in value]
            if 0 < len(numbers) <= _MAX_LIST_METRICS and all(n is not None for n in numbers):
                return {str(i): n for i, n in enumerate(numbers)}
            return None
        return number(value)

    return convert(summary) or {}


def write_stage_metrics(ws: Workspace, stage: str, summary: dict[str, Any]) -> str:
    """Write ``metrics/<stage>.json`` (:func:`numeric_metrics` of ``summary``); returns its relative path.

    Stages that write a summary get this through :func:`write_stage_summary`; evaluate, whose summary is
    ``reports/metrics.json``, calls it directly.
    """
    artifact = metrics_artifact(stage)
    write_json(artifact.at(ws), numeric_metrics(summary))
    return artifact.path


# ---- plan -------------------------------------------------------------------------------------------------
def load_plan(ws: Workspace) -> Plan:
    return Plan.from_dict(json.loads(require(ws, PLANS).read_text()))


# ---- metadata.csv: one row per processed case -------------------------------------------------------------
METADATA_COLUMNS = (
    "case_id",
    "split",
    "cache_key",
    "digest",
    "shape_x",
    "shape_y",
    "shape_z",
    "shape_min",
    "shape_max",
    "spacing_x",
    "spacing_y",
    "spacing_z",
    "spacing_dev_mm",
    "n_nonfinite",
    "zscore_mean_abs",
    "zscore_std_dev",
    "intensity_min",
    "intensity_max",
    "range_excess",
    "label_values_raw",
    "label_values_processed",
    "label_set_unchanged",
    "fg_volume_raw_mm3",
    "fg_volume_processed_mm3",
    "fg_kept_ratio",
)
# Column types of metadata.csv (everything else is text), so readers need not know them.
_FLOAT_COLUMNS = frozenset(
    {
        "spacing_x",
        "spacing_y",
        "spacing_z",
        "spacing_dev_mm",
        "zscore_mean_abs",
        "zscore_std_dev",
        "intensity_min",
        "intensity_max",
        "range_excess",
        "fg_volume_raw_mm3",
        "fg_volume_processed_mm3",
        "fg_kept_ratio",
    }
)
_INT_COLUMNS = frozenset({"shape_x", "shape_y", "shape_z", "shape_min", "shape_max", "n_nonfinite"})
_BOOL_COLUMNS = frozenset({"label_set_unchanged"})


def _typed(column: str, text: str) -> Any:
    if column in _FLOAT_COLUMNS:
        return float(text)
    if column in _INT_COLUMNS:
        return int(text)
    if column in _BOOL_COLUMNS:
        return text == "True"
    return text


def read_metadata(ws: Workspace) -> dict[str, dict[str, Any]]:
    """case id -> row of metadata.csv, as text ({} when preprocess has not run)."""
    path = METADATA.at(ws)
    if not path.exists():
        return {}
    with path.open(newline="") as fh:
        return {row["case_id"]: row for row in csv.DictReader(fh)}


def metadata_frame(ws: Workspace) -> Any:
    """metadata.csv as a typed pandas DataFrame (one row per case, METADATA_COLUMNS order)."""
    import pandas as pd

    rows = [{k: _typed(k, v) for k, v in row.items()} for _, row in sorted(read_metadata(ws).items())]
    return pd.DataFrame(rows, columns=list(METADATA_COLUMNS))


def metadata_text(row: dict[str, Any]) -> dict[str, str]:
    """A metadata row as metadata.csv holds it: floats by repr (they read back exactly; NaN/inf as text), None empty."""
    return {k: "" if v is None else repr(float(v)) if isinstance(v, float) else str(v) for k, v in row.items()}


def write_metadata(ws: Workspace, rows: dict[str, dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(METADATA_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for case_id in sorted(rows):
        writer.writerow(metadata_text(rows[case_id]))
    write_text_if_changed(METADATA.at(ws), buffer.getvalue())


# ---- the processed gate's verdict and the splits ----------------------------------------------------------
def accepted_cases(ws: Workspace) -> list[str]:
    """The processed gate's accepted cases, only while metadata.csv is the one it judged (else one line)."""
    verdict = json.loads(require(ws, ACCEPTED).read_text())
    judged = verdict.get("metadata_digest")
    if judged != sha256_file(require(ws, METADATA)):
        raise SourceError(
            f"{ACCEPTED.path} judged another {METADATA.path} (it was rewritten after the processed gate ran); "
            f"run `lesionflow stage validate-processed -w {ws.root}` to judge the current cases"
        )
    return list(verdict["cases"])


def write_accepted(ws: Workspace, cases: list[str]) -> None:
    write_json(ACCEPTED.at(ws), {"cases": cases, "metadata_digest": sha256_file(METADATA.at(ws))})


# ---- the synthetic gate's verdict: accepted.json beside its store, for the store content it judged ---------
#: ``gate`` of a verdict the synthetic gate wrote after passing; other values are recorded choices (the study's)
GATE_PASSED = "passed"


def judged_store_digest(store: Path) -> str:
    """What a synthetic verdict is about: :func:`lesionflow.store.zarr_store.store_digest` ("absent": no store)."""
    from lesionflow.store.zarr_store import store_digest

    return store_digest(store) if (store / "zarr.json").is_file() else "absent"


def write_synthetic_verdict(
    store: Path,
    judged_digest: str,
    accepted: list[str],
    rejected: list[str],
    *,
    gate: str = GATE_PASSED,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``accepted.json`` beside ``store``: the samples training may use, for the store content of
    ``judged_digest`` (taken before judging, so a store changed meanwhile is refused by train)."""
    path = accepted_beside(store)
    payload = {"accepted": accepted, "rejected": rejected, "gate": gate, "store_digest": judged_digest}
    write_json(path, {**payload, **(extra or {})})
    return path


@dataclass(frozen=True)
class SyntheticVerdict:
    """The samples of a synthetic store training may use, and how that was decided (``gate``)."""

    accepted: frozenset[str]
    gate: str


def synthetic_verdict(store: Path, setting: str) -> SyntheticVerdict:
    """The verdict on ``store``'s current content; a one-line SourceError naming the store (``setting``, as the
    user wrote it) and the fix when there is none: no accepted.json (never judged, or the last gate failed), a
    verdict without a store digest (an older version wrote it), or a store changed since it was judged."""
    path = accepted_beside(store)
    shown = str(Path(setting).parent / path.name)  # as the user would find it: beside the store they named
    problem = ""
    verdict: dict[str, Any] = {}
    if not path.is_file():
        problem = f"no {shown}: the synthetic gate has not passed this store, or its last run failed"
    else:
        verdict = json.loads(path.read_text())
        judged, now = str(verdict.get("store_digest", "")), judged_store_digest(store)
        if not judged:
            problem = f"{shown} records no store digest (an older lesionflow wrote it)"
        elif judged != now:
            problem = f"the store changed since the gate judged it: {judged[:12]} judged, {now[:12]} now"
    if problem:
        raise SourceError(
            f"train.synthetic_store = {setting!r} has no passing synthetic-gate verdict ({problem}); run "
            "`lesionflow stage validate-synthetic` to judge its current samples, or train on real cases only "
            "(train.synthetic_store empty and train.synthetic_ratio=0)"
        )
    return SyntheticVerdict(frozenset(verdict["accepted"]), str(verdict.get("gate", GATE_PASSED)))


def synthetic_samples_used(store: Path, setting: str) -> list[str]:
    """The samples of ``store`` training mixes in: its complete cases that the verdict on its content accepted."""
    from lesionflow.store.zarr_store import list_cases

    ids = list_cases(store)
    if not ids:
        return []
    keep = synthetic_verdict(store, setting).accepted
    return [c for c in ids if c in keep]


#: a lineage field the synthetic manifest does not hold (a store synthesize did not write, or an older one)
NOT_RECORDED = "not recorded"


def _source_lesion(source_case: str, lesion: dict[str, Any]) -> str:
    """Where one synthetic lesion comes from: a pasted donor ``<case>#<k>``, else ``<source case>@x,y,z``, the
    ROI origin of the re-textured or removed real lesion (mask_source real / removal) or of the new one."""
    if lesion.get("donor"):
        return str(lesion["donor"])
    origin = ",".join(str(int(v)) for v in lesion.get("origin", ()))
    return f"{source_case}@{origin} ({lesion.get('mask_source', '?')})"


def synthetic_lineage_rows(store: Path, setting: str) -> list[dict[str, str]]:
    """One row per sample training used (:func:`synthetic_samples_used`), from the synthesize manifest beside the
    store and the gate's verdict: sample id, source case, kind (relesion / new / remove / paste), derived seed and
    its parts, the generator (the lesion maker) and DiffMask's mask model with their full digests and the digests
    of their training data, the source lesions and the verdict. Fields the manifest lacks read "not recorded"."""
    manifest = read_json(store.parent / SYNTHETIC_MANIFEST.path.rsplit("/", 1)[1]) or {}
    records = {str(r["sample_id"]): r for r in manifest.get("samples", [])}
    used = synthetic_samples_used(store, setting)
    gate = synthetic_verdict(store, setting).gate if used else GATE_PASSED
    rows = []
    for sample_id in used:
        r = records.get(sample_id, {})
        kind = str(r.get("kind", NOT_RECORDED))
        gens: list[dict[str, Any] | None] = [*r.get("generators", []), None, None]
        row = {
            "case_id": sample_id,
            "source_case": str(r.get("source_case", NOT_RECORDED)),
            "kind": "paste" if kind == "new" and r.get("method") == "copy-paste" else kind,
            "seed": str(r.get("seed_value", NOT_RECORDED)),
            "seed_parts": "/".join(str(p) for p in r["seed"]) if "seed" in r else NOT_RECORDED,
        }
        # the lesion maker is always there; DiffMask's mask model only for its new lesions ("" otherwise)
        for prefix, g, missing in (("generator", gens[0], NOT_RECORDED), ("mask_generator", gens[1], "")):
            row[prefix] = str(g["method"]) if g else missing
            row[f"{prefix}_sha256"] = str(g["sha256"]) if g else missing
            row[f"{prefix}_data_sha256"] = str(g["training_data_sha256"]) if g else missing
        row["source_lesions"] = (
            ";".join(_source_lesion(row["source_case"], lesion) for lesion in r["lesions"])
            if "lesions" in r
            else NOT_RECORDED
        )
        row["gate_verdict"] = f"accepted (gate {gate})"
        row["sample_sha256"] = str(r.get("digest", NOT_RECORDED))
        rows.append(row)
    return rows


@dataclass(frozen=True)
class Splits:
    """Accepted case ids by role (sorted). ``val`` is held out of ``train`` by a seeded draw."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


def splits(ws: Workspace, params: Params) -> Splits:
    """Train/val/test from the processed gate's accepted list and each case's ingest split.

    Reads params ``project.seed`` and ``train.val_fraction``: a stage calling this declares both.
    """
    accepted = set(accepted_cases(ws))
    rows = read_metadata(ws)
    train = sorted(c for c in accepted if rows.get(c, {}).get("split") != "test")
    test = sorted(c for c in accepted if rows.get(c, {}).get("split") == "test")
    if not train:
        raise SourceError("no accepted training cases; check data/quarantine and the processed gate report")
    n_val = min(len(train) - 1, int(len(train) * params.train.val_fraction))
    order = rng_for(params.project.seed, "val-split").permutation(len(train))
    val = sorted(train[i] for i in order[:n_val])
    return Splits(tuple(c for c in train if c not in set(val)), tuple(val), tuple(test))


def label_names(ws: Workspace, label_values: tuple[int, ...]) -> dict[str, str]:
    """Label value -> name from data/raw/dataset.json (``label_<v>`` where the source names none)."""
    declared: dict[str, str] = {}
    dataset = RAW_DATASET.at(ws)
    if dataset.exists():
        declared = {str(k): str(v) for k, v in json.loads(dataset.read_text()).get("labels", {}).items()}
    return {str(v): declared.get(str(v), "background" if v == 0 else f"label_{v}") for v in label_values}


# ---- generators: models/generators/<method>/ --------------------------------------------------------------
GENERATOR_FILES = ("model.safetensors", "config.json")


def generator_dir(ws: Workspace, method: str) -> Path:
    return GENERATORS.at(ws) / method


def generator_checkpoints(ws: Workspace, method: str) -> Path:
    return GENERATOR_CHECKPOINTS.at(ws) / method


def generator_digest(ws: Workspace, method: str) -> str:
    """sha256 of the generator's weights ("absent" when it has not been trained)."""
    weights = generator_dir(ws, method) / "model.safetensors"
    return sha256_file(weights) if weights.exists() else "absent"


def read_generator_extra(ws: Workspace, method: str) -> dict[str, Any]:
    """The ``extra`` block of a generator's config.json (method, preset fingerprint, bank, classes...)."""
    path = generator_dir(ws, method) / "config.json"
    if not path.exists():
        raise SourceError(
            f"no {method} generator in {path.parent}; run `lesionflow stage train-generator` "
            f"with '{method}' in synth.generators"
        )
    return dict(json.loads(path.read_text()).get("extra", {}))


def lesion_classes(
    label_values: tuple[int, ...],
    multi_class: bool,
    lesion_labels: tuple[int, ...] = (),
    organ_labels: tuple[int, ...] = (),
) -> tuple[int, ...]:
    """The label values LeFusion gives a channel each (§2.7); one merged class (the first) when not multi-class.

    Only lesion values count: ``synth.lesion_labels`` when given, else every non-zero plan value outside
    ``synth.organ_labels`` (one rule: :func:`lesionflow.synth.rois.label_roles`, the one extract-rois uses), so a
    liver label (1 = organ, 2 = tumour) gives generators and gate the tumour class, never the organ."""
    from lesionflow.synth.rois import label_roles

    if not any(v != 0 for v in label_values):
        raise SourceError("the plan lists no lesion label value (only background); nothing to synthesize")
    values = label_roles(label_values, lesion_labels, organ_labels).lesion
    return values if multi_class else values[:1]


def net_fingerprint(params: Params, method: str) -> dict[str, Any]:
    """What a trained generator must agree with to be used or resumed: method, ROI size and architecture."""
    net = getattr(params.synth, method)
    fingerprint: dict[str, Any] = {
        "method": method,
        "roi_size": list(params.synth.roi_size),
        "base_channels": net.base_channels,
        "channel_mults": list(net.channel_mults),
        "attention_levels": list(net.attention_levels),
        "timesteps": net.timesteps,
    }
    if method == "pie":  # the condition's meaning: a volume-quantile model cannot be driven by class ranks
        fingerprint["severity"] = params.synth.pie.severity
    return fingerprint


def check_generator(ws: Workspace, params: Params, method: str) -> dict[str, Any]:
    """The generator's extras after checking it was trained by ``method`` with today's preset; else a clear error."""
    extra = read_generator_extra(ws, method)
    want = net_fingerprint(params, method)
    have = extra.get("fingerprint", {})
    if have != want:
        diff = ", ".join(f"{k} {have.get(k)!r} (now {v!r})" for k, v in want.items() if have.get(k) != v)
        raise SourceError(
            f"the generator in {GENERATORS.path}/{method} was trained with {diff}; it cannot be used with the "
            f"current params: rerun `lesionflow stage train-generator` or restore the params it was trained with"
        )
    return extra


# ---- PIE trajectories -------------------------------------------------------------------------------------
def read_progression_manifest(ws: Workspace) -> dict[str, dict[str, Any]]:
    """trajectory id -> record ({} when there are none)."""
    path = PROGRESSION_MANIFEST.at(ws)
    if not path.exists():
        return {}
    return {r["trajectory_id"]: r for r in json.loads(path.read_text()).get("trajectories", [])}


def write_progression_manifest(ws: Workspace, records: dict[str, dict[str, Any]]) -> None:
    """The manifest of the trajectories that exist in the store (sorted by id)."""
    from lesionflow.synth.trajectory_store import index_trajectories, list_trajectories

    index_trajectories(PROGRESSION_STORE.at(ws))  # viewers find the trajectories from the store root
    stored = set(list_trajectories(PROGRESSION_STORE.at(ws)))
    kept = [records[t] for t in sorted(records) if t in stored]
    write_json(PROGRESSION_MANIFEST.at(ws), {"generator": generator_digest(ws, "pie"), "trajectories": kept})


def stored_trajectory_key(ws: Workspace, trajectory_id: str) -> str:
    """The key of a stored trajectory ("" when it is not stored)."""
    import zarr

    path = PROGRESSION_STORE.at(ws) / trajectory_id
    if not (path / "frames" / "zarr.json").is_file():
        return ""
    return str(zarr.open_group(str(path), mode="r", zarr_format=3).attrs.get("key", ""))


# ---- the synthetic gate's acceptance segmenter ------------------------------------------------------------
def acceptance_model(ws: Workspace, params: Params) -> tuple[str, Path | None, str]:
    """(identity, local model folder or None, note for the console) of the synthetic gate's segmenter.

    The identity is the cache's (``catalog.digests.acceptance_model_identity``), "unreachable" when the
    registry did not answer; the champion's files are downloaded into the scratch folder once per version.
    """
    from lesionflow.catalog.digests import acceptance_model_identity

    setting = params.quality.synthetic.acceptance_model.strip()
    identity = acceptance_model_identity(ws, params)
    if not setting:
        return "off", None, "acceptance filter off (quality.synthetic.acceptance_model is empty)"
    if setting != "champion":
        return str(identity), ws.path(setting), f"acceptance filter: {setting}"
    name = params.registry.model_name
    if identity is None:
        return "unreachable", None, "acceptance filter off: the model registry did not answer"
    if identity == "none":
        return "none", None, f"acceptance filter off: no {name}@champion yet"
    from lesionflow.registry.publish import champion_info
    from lesionflow.registry.tracking import download_model_files, resolve_tracking_uri

    uri = resolve_tracking_uri(params.registry.tracking_uri, ws.root)
    champ = champion_info(uri, name)
    if champ is None:  # demoted between the two questions
        return "none", None, f"acceptance filter off: no {name}@champion yet"
    folder = ws.cache / "acceptance" / f"v{champ.version}"
    if not (folder / "model.safetensors").is_file():
        download_model_files(f"{name}/{champ.version}", uri, folder)
    return f"champion:v{champ.version}:{champ.run_id}", folder, f"acceptance filter: {name}@champion (v{champ.version})"
