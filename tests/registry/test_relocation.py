"""Issue 19 item 4: a copied workspace's embedded MLflow store reads and writes the copy, never the original."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import torch

from lesionflow.registry.publish import register_model
from lesionflow.registry.relocation import relocate_embedded_store
from lesionflow.registry.tracking import download_model_files, mlflow_session, resolve_tracking_uri
from lesionflow.seg.model_files import load_segmenter
from tests.registry.conftest import MODEL_NAME, make_request, staging


def _cells_naming(db: Path, text: str) -> int:
    with sqlite3.connect(db) as con:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        count = 0
        for table in tables:
            columns = [r[1] for r in con.execute(f'PRAGMA table_info("{table}")')]
            for column in columns:
                count += con.execute(
                    f'SELECT count(*) FROM "{table}" WHERE instr(CAST("{column}" AS TEXT), ?) > 0', (text,)
                ).fetchone()[0]
    return count


def test_a_copied_workspace_uses_its_own_store(tmp_path: Path) -> None:
    original = tmp_path / "ws"
    model_dir, reports, network, _ = staging(tmp_path / "checkout")
    first = make_request(resolve_tracking_uri("", original), model_dir, reports, champion=True, metrics={"dice": 0.8})
    register_model(first)
    db = original / "mlruns" / "mlflow.db"
    assert _cells_naming(db, str(original) + "/") > 0  # absolute paths of the original, the problem

    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    gone = tmp_path / "ws-moved-away"
    original.rename(gone)  # from here on, anything still reading or writing the original fails or recreates it
    uri = resolve_tracking_uri("", copy)
    with mlflow_session(uri) as client:
        (experiment,) = [e for e in client.search_experiments() if e.name == first.experiment]
        assert experiment.artifact_location == (copy / "mlruns" / "artifacts").as_uri()
    assert _cells_naming(copy / "mlruns" / "mlflow.db", str(original) + "/") == 0

    folder = download_model_files(f"{MODEL_NAME}@champion", uri, tmp_path / "dl")
    loaded, _ = load_segmenter(folder)
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(loaded(x), network.eval()(x))
    second = make_request(uri, model_dir, reports, champion=False, metrics={"dice": 0.7})
    result = register_model(second)
    assert result.version == 2
    assert not original.exists()  # nothing was written into the original's place
    assert sorted(p.name for p in (copy / "mlruns" / "artifacts").iterdir())  # the new run's files are in the copy
    assert relocate_embedded_store(copy / "mlruns" / "mlflow.db") is None  # idempotent: nothing left to move


def test_a_look_alike_path_is_not_rewritten(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "mlruns").mkdir(parents=True)
    db = ws / "mlruns" / "mlflow.db"
    old = "/data/old"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE experiments (artifact_location VARCHAR(256))")
        con.execute("CREATE TABLE tags (value TEXT)")
        con.execute("INSERT INTO experiments VALUES (?)", (f"file://{old}/mlruns/artifacts",))
        rows = [old, f"{old}/x.csv", f'{{"uri": "{old}/y"}}', "/mnt/data/old/z", f"{old}2/w"]
        con.executemany("INSERT INTO tags VALUES (?)", [(r,) for r in rows])
    assert relocate_embedded_store(db) == Path(old)
    with sqlite3.connect(db) as con:
        values = [r[0] for r in con.execute("SELECT value FROM tags")]
        (location,) = con.execute("SELECT artifact_location FROM experiments").fetchone()
    root = ws.resolve()
    assert values == [str(root), f"{root}/x.csv", f'{{"uri": "{root}/y"}}', "/mnt/data/old/z", f"{old}2/w"]
    assert location == f"{root.as_uri()}/mlruns/artifacts"
