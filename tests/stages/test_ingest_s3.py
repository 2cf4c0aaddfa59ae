"""Ingest from an s3:// prefix served by a real moto server on 127.0.0.1; credentials never land on disk."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from lesionflow.catalog.artifacts import RAW_MANIFEST
from lesionflow.manifest import read_manifest
from lesionflow.params import load_params
from lesionflow.stages import ingest, validate_raw
from lesionflow.workspace import Workspace
from tests.helpers.moto_server import MotoS3
from tests.helpers.volumes import write_msd

KEY_ID, SECRET = "AKIAINGESTTEST42", "ingest-s3cr3t-QQ"


@pytest.fixture
def moto_s3_credentials() -> tuple[str, str]:
    return (KEY_ID, SECRET)


def _quiet(items, description, total):
    yield from items


def test_ingest_from_s3_prefix(moto_s3: MotoS3, workspace: Path, tmp_path: Path) -> None:
    local = write_msd(tmp_path / "msd", n_train=3, n_test=1)
    client = moto_s3.client()
    client.create_bucket(Bucket="scans")
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.put_object(Bucket="scans", Key=f"lung/{path.relative_to(local).as_posix()}", Body=path.read_bytes())
    ws = Workspace.at(workspace)
    # credentials in the URI are ignored and must be redacted from everything written
    params = load_params(ws.params_file, [f"ingest.source=s3://{KEY_ID}:{SECRET}@scans/lung"])
    result = ingest.run(ws, params, progress=_quiet)
    assert result.summary["n_added"] == 4
    validate_raw.run(ws, params)
    records = read_manifest(RAW_MANIFEST.at(ws))
    assert len(records) == 4
    assert all(r.source_uri.startswith("s3://scans/lung/") for r in records)
    again = ingest.run(ws, params, progress=_quiet)  # re-ingest: nothing downloaded again, nothing added
    assert again.summary["n_added"] == 0
    assert again.summary["n_unchanged"] == 4
    for root in (ws.root / "data", (ws.root / "reports")):
        for path in (p for p in root.rglob("*") if p.is_file()):
            blob = path.read_bytes()
            text = (gzip.decompress(blob) if path.suffix == ".gz" else blob).decode("latin-1")
            assert SECRET not in text, path
            assert KEY_ID not in text, path
