"""Registration in a real embedded MLflow store: aliases, champion, model references, model files, pyfunc."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lesionflow.registry.publish import (
    LINEAGE_TAGS,
    RegistrationError,
    champion_info,
    decode_param,
    encode_param,
    register_model,
)
from lesionflow.registry.tracking import (
    ModelNotFound,
    RegistryUnavailable,
    check_reachable,
    download_model_files,
    ensure_experiment,
    mlflow_session,
    resolve_model_ref,
    resolve_tracking_uri,
)
from lesionflow.seg.model_files import load_segmenter
from tests.registry.conftest import MODEL_NAME, Registered, make_request


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when the block ends: nothing listens there


# ------------------------------------------------------------------------------------------ aliases


def test_aliases_are_exactly_as_specified(registered: Registered) -> None:
    assert (registered.r1.version, registered.r2.version) == (1, 2)
    assert registered.r1.aliases == ("candidate", "champion")
    assert registered.r2.aliases == ("candidate",)
    # candidate moved to v2, champion stayed on v1
    assert resolve_model_ref(f"{MODEL_NAME}/1", registered.tracking_uri).aliases == ("champion",)
    assert resolve_model_ref(f"{MODEL_NAME}/2", registered.tracking_uri).aliases == ("candidate",)
    assert registered.r1.model_uri == f"models:/{MODEL_NAME}/1"


def test_champion_info_returns_the_champion_run(registered: Registered) -> None:
    info = champion_info(registered.tracking_uri, MODEL_NAME)
    assert info is not None
    assert (info.version, info.run_id) == (1, registered.r1.run_id)
    assert info.metrics == registered.v1.metrics
    test_split = next(d for d in registered.v1.datasets if d.name == "test-split")
    assert info.test_split_digest == test_split.digest


def test_champion_info_is_none_without_champion(registered: Registered, tmp_path: Path) -> None:
    assert champion_info(registered.tracking_uri, "no-such-model") is None
    assert champion_info(resolve_tracking_uri("", tmp_path), MODEL_NAME) is None


# ------------------------------------------------------------------------------------- model refs


def test_resolve_all_reference_forms(registered: Registered) -> None:
    uri = registered.tracking_uri
    champion = resolve_model_ref(f"{MODEL_NAME}@champion", uri)
    assert (champion.version, champion.run_id) == (1, registered.r1.run_id)
    assert champion.source.startswith("models:/m-")
    assert champion.logged_model_id
    assert champion.source.endswith(champion.logged_model_id)
    assert resolve_model_ref(f"{MODEL_NAME}@candidate", uri).version == 2
    assert resolve_model_ref(f"{MODEL_NAME}/2", uri).run_id == registered.r2.run_id
    assert resolve_model_ref(f"models:/{MODEL_NAME}/1", uri).version == 1
    by_run = resolve_model_ref(registered.r2.run_id, uri)
    assert (by_run.name, by_run.version) == (MODEL_NAME, 2)


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("unknown-model@champion", "model 'unknown-model' not found"),
        (f"{MODEL_NAME}@production", f"model '{MODEL_NAME}' has no alias 'production'"),
        (f"{MODEL_NAME}/9", f"model '{MODEL_NAME}' has no version 9"),
        ("0" * 32, f"run {'0' * 32} not found"),
        ("just-a-name", "is not name@alias, name/version or a 32-hex run id"),
    ],
)
def test_unknown_refs_list_registered_models(registered: Registered, ref: str, expected: str) -> None:
    with pytest.raises(ModelNotFound) as info:
        resolve_model_ref(ref, registered.tracking_uri)
    message = str(info.value)
    assert expected in message
    assert f"registered models: {MODEL_NAME} (@candidate=v2, @champion=v1)" in message
    assert "\n" not in message


def test_empty_store_says_no_models(tmp_path: Path) -> None:
    missing = resolve_tracking_uri("", tmp_path / "nothing-here")
    with pytest.raises(ModelNotFound, match="no models registered yet"):
        resolve_model_ref("x@champion", missing)
    assert not (tmp_path / "nothing-here").exists()  # a read never creates a store
    created = resolve_tracking_uri("", tmp_path / "empty")
    (tmp_path / "empty" / "mlruns").mkdir(parents=True)
    with mlflow_session(created) as client:
        ensure_experiment(client, "lesionflow", None)  # creates the tables: a real, empty store
    with pytest.raises(ModelNotFound, match=r"model 'x' not found; no models registered yet"):
        resolve_model_ref("x@champion", created)


# ---------------------------------------------------------------------------------- model files


def test_downloaded_files_rebuild_the_same_network(registered: Registered, tmp_path: Path) -> None:
    folder = download_model_files(f"{MODEL_NAME}@champion", registered.tracking_uri, tmp_path / "dl")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "metadata.json", "model.safetensors"]
    network, config = load_segmenter(folder)
    assert config == registered.config
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(network(x), registered.network(x))


def test_pyfunc_model_predicts_labels(registered: Registered) -> None:
    import mlflow.pyfunc

    with mlflow_session(registered.tracking_uri):
        model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    image = np.random.default_rng(0).normal(size=(1, 20, 24, 18)).astype(np.float32)
    labels = model.predict(image)
    assert labels.shape == (20, 24, 18)
    assert labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) <= {0, 1, 2}
    assert model.predict(image, params={"overlap": 0.25, "sw_batch_size": 1}).shape == (20, 24, 18)
    # the logged files, nothing pickled: the python model is the source file
    meta = model.metadata
    assert meta.signature is not None
    assert meta.signature.inputs.inputs[0].shape == (1, -1, -1, -1)


# --------------------------------------------------------------------------------- unreachable


def test_unreachable_server_fails_fast_with_one_line(tmp_path: Path) -> None:
    port = _closed_port()
    uri = f"http://admin:{'hunter2'}@127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(RegistryUnavailable) as info:
        check_reachable(uri)
    message = str(info.value)
    assert "\n" not in message
    assert "hunter2" not in message
    assert f"http://127.0.0.1:{port}" in message
    assert "rerun `lesionflow stage register`" in message
    for call in (
        lambda: resolve_model_ref(f"{MODEL_NAME}@champion", uri),
        lambda: champion_info(uri, MODEL_NAME),
        lambda: register_model(make_request(uri, _model_dir(tmp_path), [], champion=True, metrics={})),
    ):
        with pytest.raises(RegistryUnavailable):
            call()
    assert time.monotonic() - start < 10


def _model_dir(root: Path) -> Path:
    folder = root / "model"
    folder.mkdir(exist_ok=True)
    for name in ("model.safetensors", "config.json", "metadata.json"):
        (folder / name).write_text("{}")
    return folder


def test_sessions_leave_no_global_changes(registered: Registered, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////somewhere/else.db")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    before = mlflow.get_tracking_uri()
    resolve_model_ref(f"{MODEL_NAME}@champion", registered.tracking_uri)
    assert mlflow.get_tracking_uri() == before
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////somewhere/else.db"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


# ------------------------------------------------------------------------------------------ misc


def test_request_with_missing_model_files_is_rejected(tmp_path: Path) -> None:
    uri = resolve_tracking_uri("", tmp_path)
    req = make_request(uri, tmp_path / "no-model", [], champion=True, metrics={})
    with pytest.raises(RegistrationError, match=r"lacks model\.safetensors, config\.json, metadata\.json"):
        register_model(req)
    with pytest.raises(RegistrationError, match="repeated: raw"):
        register_model(replace(req, model_dir=_model_dir(tmp_path), datasets=[*req.datasets, req.datasets[0]]))
    assert not (tmp_path / "mlruns").exists()


def test_resolve_tracking_uri_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert resolve_tracking_uri("", tmp_path) == "http://mlflow.internal:5000"
    assert resolve_tracking_uri("http://other:5000", tmp_path) == "http://other:5000"
    assert resolve_tracking_uri("sqlite:///reg/m.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/reg/m.db"


@pytest.mark.parametrize("value", ["adam", "3", "true", "", 3, 0.01, True, None, [16, 16, 16], {}, {"a": 1}])
def test_param_encoding_round_trips(value: object) -> None:
    assert decode_param(encode_param(value)) == value


def test_lineage_tag_names_are_namespaced() -> None:
    assert all(tag.startswith("lesionflow.") for tag in LINEAGE_TAGS)
    assert len(set(LINEAGE_TAGS)) == 8
