"""Lineage read back from the registry alone equals what was registered; tree and graph render it."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

import pytest
from rich.console import Console

from lesionflow.io.remote import redact_uri
from lesionflow.registry.graph import lineage_graph
from lesionflow.registry.lineage import Lineage, lineage_tree, missing_fields, read_lineage
from lesionflow.registry.publish import LINEAGE_TAGS, NONE
from lesionflow.registry.tracking import mlflow_session
from tests.registry.conftest import LINEAGE, MODEL_NAME, PARAMS, SECRET, Registered


@pytest.fixture(scope="module")
def lineage_v1(registered: Registered, tmp_path_factory: pytest.TempPathFactory) -> Lineage:
    """Read from another working directory (another checkout) with nothing but the tracking URI."""
    elsewhere = tmp_path_factory.mktemp("other-checkout")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(elsewhere)
        lineage = read_lineage(f"{MODEL_NAME}@champion", registered.tracking_uri)
    assert list(elsewhere.iterdir()) == []  # nothing written into the current directory either
    return lineage


def test_every_registered_field_comes_back(registered: Registered, lineage_v1: Lineage) -> None:
    req = registered.v1
    assert (lineage_v1.model_name, lineage_v1.version, lineage_v1.aliases) == (MODEL_NAME, 1, ("champion",))
    assert lineage_v1.run_id == registered.r1.run_id
    assert lineage_v1.experiment_name == req.experiment
    assert lineage_v1.start_time is not None
    assert lineage_v1.status == "FINISHED"
    assert lineage_v1.metrics == dict(req.metrics)
    assert lineage_v1.params == json.loads(json.dumps(PARAMS))  # nested again, types kept (tuples -> lists)
    assert lineage_v1.params_truncated == ()
    expected_tags = {key: LINEAGE.get(key, NONE) for key in LINEAGE_TAGS}
    assert lineage_v1.tags == expected_tags
    assert {k: lineage_v1.version_tags[k] for k in LINEAGE_TAGS} == expected_tags
    assert lineage_v1.version_tags["lesionflow.model_sha256"] == LINEAGE["lesionflow.model_sha256"]
    assert [d.name for d in lineage_v1.datasets] == sorted(d.name for d in req.datasets)
    for ref in req.datasets:
        got = lineage_v1.dataset(ref.name)
        assert got is not None
        assert got.digest == ref.digest
        assert got.context == ref.context
        assert got.source == ref.source
        assert got.n_cases == int(ref.tags.get("n_cases", len(ref.cases)))
        assert got.tags == dict(ref.tags)
        expected_rows = [{k: redact_uri(v) for k, v in row.items()} for row in ref.cases]
        assert got.cases is not None
        assert list(got.cases) == expected_rows
        assert got.cases_note == ""
        if ref.cases:
            assert list(got.columns) == list(ref.cases[0])
    assert {"reports/metrics.json", "reports/plots/dice.svg", "datasets/raw.json"} <= set(lineage_v1.artifacts)
    assert {Path(f).name for f in lineage_v1.model_files} >= {"model.safetensors", "config.json", "metadata.json"}
    assert missing_fields(lineage_v1) == []


def test_v2_and_run_id_refs_read_their_own_run(registered: Registered) -> None:
    lineage = read_lineage(registered.r2.run_id, registered.tracking_uri)
    assert (lineage.version, lineage.aliases) == (2, ("candidate",))
    assert lineage.params["train"]["learning_rate"] == 0.02
    assert lineage.metrics["dice_mean"] == 0.75
    assert math.isnan(lineage.metrics["hd95_mean"])  # NaN (e.g. no lesion predicted) is kept, not dropped
    assert lineage.params_truncated == ("notes.long",)  # MLflow keeps 6000 characters of a param value
    assert lineage.params["notes"]["long"] == "x" * 6000


def test_credentials_never_reach_the_registry(lineage_v1: Lineage) -> None:
    text = json.dumps(lineage_v1.to_json())
    assert SECRET not in text
    assert "s3://bucket/raw/case_000.nii.gz" in text


def test_to_json_is_deterministic(lineage_v1: Lineage) -> None:
    first = json.dumps(lineage_v1.to_json())
    assert first == json.dumps(lineage_v1.to_json())
    data = lineage_v1.to_json()
    assert list(data) == sorted(data)
    assert list(data["datasets"][0]) == sorted(data["datasets"][0])


def test_missing_fields_names_what_is_absent(lineage_v1: Lineage) -> None:
    without_plans = replace(lineage_v1, datasets=tuple(d for d in lineage_v1.datasets if d.name != "plans"))
    assert missing_fields(without_plans) == ["dataset plans"]
    raw = lineage_v1.dataset("raw")
    assert raw is not None
    no_count = replace(
        lineage_v1, datasets=tuple(replace(d, n_cases=None) if d is raw else d for d in lineage_v1.datasets)
    )
    assert missing_fields(no_count) == ["dataset raw n_cases"]
    untagged = replace(lineage_v1, tags={**lineage_v1.tags, "lesionflow.git_commit": None})
    assert missing_fields(untagged) == ["tag lesionflow.git_commit"]
    generated = replace(lineage_v1, tags={**lineage_v1.tags, "lesionflow.generator_model": "lesion-gan@3"})
    assert missing_fields(generated) == ["dataset synthetic"]
    assert missing_fields(replace(lineage_v1, params={}, metrics={})) == ["params", "metrics"]


def test_unreadable_rows_are_reported_not_fatal(registered: Registered) -> None:
    with mlflow_session(registered.tracking_uri) as client:
        artifact_uri = client.get_run(registered.r2.run_id).info.artifact_uri
    table = Path(urlparse(artifact_uri).path) / "datasets" / "test-split.json"
    table.unlink()
    lineage = read_lineage(f"{MODEL_NAME}/2", registered.tracking_uri)
    test_split = lineage.dataset("test-split")
    assert test_split is not None
    assert test_split.cases is None
    assert "per-case rows not readable from datasets/test-split.json" in test_split.cases_note
    assert test_split.n_cases == 1  # still known from the input tag
    assert missing_fields(lineage) == []


def test_tree_shows_data_and_code(lineage_v1: Lineage) -> None:
    console = Console(record=True, width=250, color_system=None)
    console.print(lineage_tree(lineage_v1))
    text = console.export_text()
    assert f"model {MODEL_NAME} v1 (@champion)" in text
    assert f"run {lineage_v1.run_id}" in text
    assert "dice_mean = 0.8" in text
    raw = lineage_v1.dataset("raw")
    assert raw is not None
    assert "plans (planning): no per-case rows" in text
    assert f"raw (training): 4 cases, digest {raw.digest[:12]}, source s3://bucket/raw" in text
    assert "s3://bucket/raw/case_000.nii.gz" in text
    assert SECRET not in text
    assert "synthetic: none (generator model none)" in text
    assert f"plans hash {LINEAGE['lesionflow.plans_hash'][:12]}" in text
    assert f"git commit: {LINEAGE['lesionflow.git_commit']}" in text
    assert f"dvc.lock sha256: {LINEAGE['lesionflow.dvc_lock_sha256']}" in text
    assert f"prefect flow run id: {LINEAGE['lesionflow.prefect_flow_run_id']}" in text


def test_graph_png_and_svg(lineage_v1: Lineage, tmp_path: Path) -> None:
    png = lineage_graph(lineage_v1, tmp_path / "a" / "lineage.png")
    again = lineage_graph(lineage_v1, tmp_path / "b" / "lineage.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.read_bytes() == again.read_bytes()
    svg = lineage_graph(lineage_v1, tmp_path / "lineage.svg")
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml")
    assert "<svg" in text
    assert lineage_graph(lineage_v1, tmp_path / "again.svg").read_text() == text
    with pytest.raises(ValueError, match=r"use a \.png or \.svg"):
        lineage_graph(lineage_v1, tmp_path / "lineage.pdf")
