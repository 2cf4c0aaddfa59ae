"""Stage declarations hold: a stage reads only what it declares, and only the params keys it declares."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from lesionflow.caching import run_cached
from lesionflow.catalog.artifacts import ARTIFACTS, RAW, Digest, Kind
from lesionflow.params import Params, load_params
from lesionflow.stages.registry import STAGES
from lesionflow.stages.spec import UndeclaredParam, declared_view
from lesionflow.workspace import Workspace
from tests.helpers.declarations import opened_for_reading, undeclared_reads
from tests.helpers.volumes import use_tiny_training, write_msd

REPO = Path(__file__).resolve().parents[2]


def _prepared(tmp_path: Path) -> Workspace:
    root = tmp_path / "ws"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    use_tiny_training(root / "params.yaml")
    write_msd(root / "data" / "demo", n_train=3, n_test=1)
    return Workspace.at(root)


def test_the_first_stages_read_only_what_they_declare_and_a_missing_read_is_caught(tmp_path: Path) -> None:
    ws = _prepared(tmp_path)
    params = load_params(ws.params_file)
    opened: dict[str, set[Path]] = {}
    for name in ("ingest", "validate-raw", "plan"):
        with opened_for_reading() as seen:
            assert run_cached(name, ws, params, STAGES[name].run).ok
        opened[name] = seen
        assert undeclared_reads(STAGES[name], seen, ws, params) == {}, name
    assert any(RAW.at(ws) in p.parents for p in opened["plan"])  # the audit saw plan read the raw scans
    forgetful = dataclasses.replace(STAGES["plan"], reads=())
    missed = undeclared_reads(forgetful, opened["plan"], ws, params)
    assert set(missed) >= {"raw.manifest", "raw.cases"}, missed


def test_reading_an_undeclared_params_key_fails_and_declared_ones_pass() -> None:
    params = Params()
    view = declared_view(params, ("project.seed", "train", "registry.model_name"), "demo")
    assert view.registry.model_name == params.registry.model_name  # a field named model_*, not a method
    assert view.project.seed == params.project.seed
    assert view.train.val_fraction == params.train.val_fraction
    assert view.model_dump_json() == params.model_dump_json()  # the Dask/Prefect boundary: the whole params
    with pytest.raises(UndeclaredParam, match="stage demo reads params key 'synth'"):
        _ = view.synth
    with pytest.raises(UndeclaredParam, match=r"reads params key 'project\.model_dump'"):
        _ = view.project.model_dump()
    with pytest.raises(AttributeError, match="read-only"):
        view.train = params.train  # type: ignore[misc]


def test_every_declaration_is_well_formed() -> None:
    names = list(STAGES)
    for spec in STAGES.values():
        for key in spec.params:  # every params key exists in the typed model
            node: object = Params()
            for part in key.split("."):
                node = getattr(node, part)
        for artifact in spec.reads:
            if not spec.writes_remote:  # a stage with a cache key digests everything it reads
                assert artifact.digest is not Digest.NONE, f"{spec.name} reads {artifact.name}: no digest rule"
            if artifact.param_key is not None:  # its location is a setting the stage must declare
                assert any(artifact.param_key == k or artifact.param_key.startswith(k + ".") for k in spec.params) or (
                    artifact.kind is Kind.REMOTE
                ), (spec.name, artifact.name)
            if artifact.producer is not None and artifact.kind is not Kind.REMOTE:  # produced upstream or here
                assert names.index(artifact.producer) <= names.index(spec.name), (spec.name, artifact.name)
        for artifact in spec.writes:
            assert artifact.producer is not None, artifact.name
    for artifact in ARTIFACTS.values():  # the producer writes it (or the folder holding it)
        if artifact.producer is not None:
            written = [a.path for a in STAGES[artifact.producer].writes]
            assert any(artifact.path == w or artifact.path.startswith(w + "/") for w in written), artifact.name
