"""One real MLflow store (embedded SQLite) with two registered versions, shared by the registry tests.

``registered`` (session scope) builds a tiny real UNet, saves it with ``save_segmenter``, registers it twice
(v1 promoted to champion, v2 candidate only) and then deletes the staging workspace: every test reads the
model, its files and its lineage from the registry alone.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch

from lesionflow.registry.publish import (
    DatasetRef,
    RegistrationRequest,
    RegistrationResult,
    register_model,
)
from lesionflow.registry.tracking import resolve_tracking_uri
from lesionflow.seg.model_files import SegmenterConfig, save_segmenter
from lesionflow.seg.networks import NetworkConfig, build_network

MODEL_NAME = "lesion-seg"
NETWORK = NetworkConfig("unet", 1, 3, (8, 16), 1, (16, 16, 16))
PIP_REQUIREMENTS = ("torch", "monai", "safetensors", "numpy")
SECRET = "Sup3rSecretKey"


@dataclass(frozen=True)
class Registered:
    tracking_uri: str
    network: torch.nn.Module
    config: SegmenterConfig
    v1: RegistrationRequest
    v2: RegistrationRequest
    r1: RegistrationResult
    r2: RegistrationResult


def digest(seed: str) -> str:
    import hashlib

    return hashlib.sha256(seed.encode()).hexdigest()


def tiny_model(folder: Path) -> tuple[torch.nn.Module, SegmenterConfig]:
    torch.manual_seed(0)
    network = build_network(NETWORK).eval()
    config = SegmenterConfig(
        network=NETWORK,
        label_values=(0, 1, 2),
        label_names={"0": "background", "1": "lesion", "2": "organ"},
        target_spacing=(1.0, 1.0, 1.5),
        normalization={"scheme": "ct", "clip": [-100.0, 200.0]},
        plan_hash=digest("plans"),
        modalities=("CT",),
    )
    save_segmenter(folder, network, config, {"intended_use": "tests only", "epochs": 1})
    return network, config


def datasets(with_synthetic: bool = False) -> list[DatasetRef]:
    raw_rows = [
        {
            "case_id": f"case_{i:03d}",
            "digest": digest(f"raw{i}"),
            "split": "train" if i < 3 else "test",
            # a credential in a row must never reach the registry
            "source_uri": f"s3://AKIAEXAMPLE:{SECRET}@bucket/raw/case_{i:03d}.nii.gz" if i == 0 else
            f"s3://bucket/raw/case_{i:03d}.nii.gz",
        }
        for i in range(4)
    ]  # fmt: skip
    refs = [
        DatasetRef("raw", digest("raw"), "s3://bucket/raw", "training", raw_rows, {"n_cases": "4"}),
        DatasetRef(
            "processed",
            digest("processed"),
            "/data/processed/store.zarr",
            "training",
            [{"case_id": r["case_id"], "digest": digest("p" + r["case_id"])} for r in raw_rows],
            {"store_format": "zarr-v3"},
        ),
        DatasetRef("plans", digest("plans"), "dvc://plans/plans.json", "planning", [], {"planner": "default"}),
        DatasetRef(
            "test-split",
            digest("test-split"),
            "/data/processed/store.zarr#test",
            "evaluation",
            [{"case_id": "case_003", "digest": digest("raw3"), "split": "test"}],
            {},
        ),
    ]
    if with_synthetic:
        refs.append(
            DatasetRef(
                "synthetic",
                digest("synthetic"),
                "/data/synthetic/store.zarr",
                "training",
                [{"case_id": "syn_000", "digest": digest("syn0")}],
                {"generator_model": "lesion-gan@3"},
            )
        )
    return refs


PARAMS: dict[str, Any] = {
    "project": {"name": "demo", "seed": 7},
    "train": {
        "learning_rate": 0.01,
        "patch_size": [16, 16, 16],
        "network": "unet",
        "amp": True,
        "resume": None,
        "tag": "3",  # a string that looks like a number must come back as a string
        "schedule": {"warmup": 2, "kind": "poly"},
        "extra": {},
    },
    "registry": {"tracking_uri": "", "experiment": "lesionflow"},
}
LINEAGE = {
    "lesionflow.git_commit": "0123456789abcdef0123456789abcdef01234567",
    "lesionflow.dvc_lock_sha256": digest("dvc.lock"),
    "lesionflow.params_sha256": digest("params"),
    "lesionflow.plans_hash": digest("plans"),
    "lesionflow.prefect_flow_run_id": "6f1c2a1e-1111-2222-3333-444455556666",
    "lesionflow.code_version": "0.1.0",
    "lesionflow.workspace": "/home/user/ws",
    # generator_model left out: logged as "none"
    "lesionflow.model_sha256": digest("weights"),  # an extra tag: logged on the run and the version too
}


def make_request(
    tracking_uri: str, model_dir: Path, reports: list[Path], *, champion: bool, metrics: dict[str, float]
) -> RegistrationRequest:
    return RegistrationRequest(
        tracking_uri=tracking_uri,
        experiment="lesionflow-tests",
        model_name=MODEL_NAME,
        model_dir=model_dir,
        params=PARAMS,
        metrics=metrics,
        datasets=datasets(),
        tags=LINEAGE,
        artifacts=reports,
        promote_champion=champion,
        pip_requirements=PIP_REQUIREMENTS,
    )


def staging(root: Path) -> tuple[Path, list[Path], torch.nn.Module, SegmenterConfig]:
    model_dir = root / "models" / "seg"
    network, config = tiny_model(model_dir)
    reports = root / "reports"
    (reports / "plots").mkdir(parents=True)
    (reports / "metrics.json").write_text(json.dumps({"dice_mean": 0.8}))
    (reports / "plots" / "dice.svg").write_text("<svg/>")
    return model_dir, [reports / "metrics.json", reports / "plots"], network, config


@pytest.fixture(scope="session")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Registered:
    store_root = tmp_path_factory.mktemp("store")
    uri = resolve_tracking_uri("", store_root)
    stage = tmp_path_factory.mktemp("checkout")
    model_dir, reports, network, config = staging(stage)
    v1 = make_request(uri, model_dir, reports, champion=True, metrics={"dice_mean": 0.8, "hd95_mean": 4.5})
    r1 = register_model(v1)
    v2 = replace(
        make_request(uri, model_dir, reports, champion=False, metrics={"dice_mean": 0.75, "hd95_mean": float("nan")}),
        params={**PARAMS, "train": {**PARAMS["train"], "learning_rate": 0.02}, "notes": {"long": "x" * 7000}},
    )
    r2 = register_model(v2)
    shutil.rmtree(stage)  # nothing from the "checkout" is left: everything must come from the registry
    return Registered(uri, network, config, v1, v2, r1, r2)
