"""Synthetic-data lineage on a tiny real workspace (issue 19 item 3): per-sample rows, MLflow's dataset, the chain.

The workspace is test_synthesis's ``synthesized`` one (3-step generators, one relesion, new and remove sample per
training case); the gate's verdict is narrowed to all samples but one, the segmenter trains on the synthetic mix,
is evaluated and registered. Everything is then read back from the real MLflow store.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console

from lesionflow.catalog.artifacts import ROIS_STORE, SYNTHETIC_MANIFEST, SYNTHETIC_STORE
from lesionflow.catalog.digests import digest
from lesionflow.catalog.readers import judged_store_digest, synthetic_verdict, write_synthetic_verdict
from lesionflow.hashing import sha256_file
from lesionflow.params import load_params
from lesionflow.registry.graph import lineage_graph, lineage_spec
from lesionflow.registry.lineage import Lineage, lineage_tree, missing_fields, read_lineage, synthetic_generators
from lesionflow.registry.tracking import mlflow_session, resolve_tracking_uri
from lesionflow.seeding import derive_seed
from lesionflow.stages.registry import STAGES
from lesionflow.store.zarr_store import list_cases
from lesionflow.workspace import Workspace

HEX64 = re.compile(r"[0-9a-f]{64}")
MIX = ["train.synthetic_store=data/synthetic/store.zarr", "train.synthetic_ratio=0.5"]


@dataclass(frozen=True)
class Registered:
    ws: Workspace
    lineage: Lineage
    used: list[str]  # the samples the verdict admits (= what train used)
    n_synthetic: int  # train's own count
    n_in_store: int


@pytest.fixture(scope="module")
def registered(synthesized: Path, tmp_path_factory: pytest.TempPathFactory) -> Registered:
    root = tmp_path_factory.mktemp("synthetic-lineage") / "ws"
    shutil.copytree(synthesized, root)
    ws = Workspace.at(root)
    store = SYNTHETIC_STORE.at(ws)
    in_store = list_cases(store)
    # a verdict that leaves one sample out: training (and the lineage) must use the other ones only
    write_synthetic_verdict(store, judged_store_digest(store), in_store[1:], in_store[:1])
    params = load_params(ws.params_file, MIX)
    n_synthetic = STAGES["train"].run(ws, params).summary["n_synthetic"]
    for name in ("evaluate", "validate-metrics", "register"):
        assert STAGES[name].run(ws, params).ok, name
    lineage = read_lineage("lesionflow-seg@candidate", resolve_tracking_uri("", ws.root))
    used = sorted(synthetic_verdict(store, MIX[0].split("=")[1]).accepted)
    return Registered(ws, lineage, used, n_synthetic, len(in_store))


def test_synthetic_rows_are_the_samples_used_with_seed_generators_source_and_verdict(registered: Registered) -> None:
    ws, lineage = registered.ws, registered.lineage
    dataset = lineage.dataset("synthetic")
    assert dataset is not None
    assert dataset.cases is not None
    rows = {row["case_id"]: row for row in dataset.cases}
    assert sorted(rows) == registered.used
    assert len(rows) == dataset.n_cases == registered.n_synthetic == registered.n_in_store - 1
    manifest = {r["sample_id"]: r for r in json.loads(SYNTHETIC_MANIFEST.at(ws).read_text())["samples"]}
    generators = ws.root / "models" / "generators"
    weights = {m: sha256_file(generators / m / "model.safetensors") for m in ("lefusion", "diffmask", "ddpm")}
    rois = digest(ROIS_STORE, ws, load_params(ws.params_file))
    assert rois is not None
    assert HEX64.fullmatch(rois)
    kinds = set()
    for sample_id, row in rows.items():
        record = manifest[sample_id]
        kinds.add(row["kind"])
        assert row["source_case"] == record["source_case"]
        assert sample_id.startswith(row["source_case"] + "__")
        assert row["kind"] == record["kind"]
        assert row["seed"] == str(derive_seed(*record["seed"]))  # the seed the sample's generators were made with
        assert row["seed_parts"] == "/".join(str(p) for p in record["seed"])
        lesion_maker = "ddpm" if row["kind"] == "remove" else "lefusion"
        assert (row["generator"], row["generator_sha256"]) == (lesion_maker, weights[lesion_maker])
        assert HEX64.fullmatch(row["generator_sha256"])
        assert row["generator_data_sha256"] == rois  # the ROI set the generator was trained on
        if row["kind"] == "new":  # DiffMask made the new lesion's mask
            assert (row["mask_generator"], row["mask_generator_sha256"]) == ("diffmask", weights["diffmask"])
            assert row["mask_generator_data_sha256"] == rois
        else:
            assert row["mask_generator"] == row["mask_generator_sha256"] == ""
        assert "not recorded" not in row["source_lesions"]
        assert row["source_lesions"].startswith(f"{row['source_case']}@")
        assert row["gate_verdict"] == "accepted (gate passed)"
        assert row["sample_sha256"] == record["digest"]
    assert kinds == {"relesion", "new", "remove"}
    assert missing_fields(lineage) == []


def test_mlflow_synthetic_dataset_holds_one_row_per_sample_used(registered: Registered) -> None:
    """Read from the MLflow run itself: the dataset's profile (the UI's "num rows") and its logged table."""
    uri = resolve_tracking_uri("", registered.ws.root)
    with mlflow_session(uri) as client:
        run = client.get_run(registered.lineage.run_id)
        (synthetic,) = [d for d in run.inputs.dataset_inputs if d.dataset.name == "synthetic"]
        table = client.load_table(run.info.experiment_id, "datasets/synthetic.json", run_ids=[run.info.run_id])
    assert json.loads(synthetic.dataset.profile)["num_rows"] == len(registered.used)
    assert sorted(table["case_id"]) == registered.used
    assert {"seed", "generator_sha256", "generator_data_sha256", "source_lesions", "gate_verdict"} <= set(table)


def test_tree_and_graph_show_the_chain_with_full_digests(registered: Registered, tmp_path: Path) -> None:
    lineage = registered.lineage
    generators = synthetic_generators(lineage)
    assert sorted(g.method for g in generators) == ["ddpm", "diffmask", "lefusion"]
    spec = lineage_spec(lineage)
    assert [n.id for n in spec.chain] == ["raw", "processed", "rois", "generators", "synthetic", "model"]
    chain = [("raw", "processed"), ("processed", "rois"), ("rois", "generators"), ("generators", "synthetic")]
    assert [e for e in spec.edges if e in chain] == chain
    assert ("synthetic", "model") in spec.edges
    assert ("processed", "model") in spec.edges
    labels = {n.id: n.label for n in (*spec.chain, *spec.side)}
    assert generators[0].training_data_sha256 in labels["rois"]
    assert all(g.sha256 in labels["generators"] for g in generators)
    assert all(lineage.dataset(n).digest in labels[n] for n in ("raw", "processed", "synthetic"))  # type: ignore[union-attr]
    svg = lineage_graph(lineage, tmp_path / "lineage.svg").read_text()
    assert all(g.sha256 in svg for g in generators)  # the drawing names each generator by its full digest
    console = Console(record=True, width=400, color_system=None)
    console.print(lineage_tree(lineage))
    text = console.export_text()
    assert f"synthetic (training): {len(registered.used)} samples" in text
    assert f"samples used: {len(registered.used)}" in text
    assert all(f"sha256 {g.sha256}, trained on ROIs {g.training_data_sha256}" in text for g in generators)
    assert "accepted (gate passed)" in text


def _tiny_store(store: Path, ids: list[str]) -> None:
    import numpy as np

    from lesionflow.store.zarr_store import CaseArrays, write_case

    for case_id in ids:
        image = np.zeros((1, 4, 4, 4), np.float32)
        arrays = CaseArrays(image, np.zeros((4, 4, 4), np.uint8))
        write_case(store, case_id, arrays, {"spacing": [1.0] * 3}, chunk_shape=(4, 4, 4))


def test_rows_name_pasted_donors_say_what_is_not_recorded_and_skip_rejected_samples(tmp_path: Path) -> None:
    """Fast, on a hand-made store: copy-paste samples are kind "paste" with their donor lesion as the source; a
    sample the manifest does not describe says "not recorded"; a rejected sample is no row."""
    from lesionflow.catalog.readers import synthetic_lineage_rows

    store = tmp_path / "synthetic" / "store.zarr"
    _tiny_store(store, ["a__new0", "b__new0", "c__new0"])
    rois = "ab" * 32
    paste = {
        "sample_id": "a__new0", "source_case": "a", "kind": "new", "index": 0, "method": "copy-paste",
        "seed": [7, "synth", "a", "new", 0], "seed_value": derive_seed(7, "synth", "a", "new", 0), "digest": "d" * 64,
        "lesions": [{"origin": [1, 2, 3], "mask_source": "paste", "donor": "case_9#2"}],
        "generators": [{"method": "copy-paste", "sha256": rois, "training_data_sha256": rois}],
    }  # fmt: skip
    (store.parent / "manifest.json").write_text(json.dumps({"samples": [paste]}))
    write_synthetic_verdict(store, judged_store_digest(store), ["a__new0", "b__new0"], ["c__new0"], gate="passed")
    rows = synthetic_lineage_rows(store, "synthetic/store.zarr")
    assert [r["case_id"] for r in rows] == ["a__new0", "b__new0"]
    pasted, unknown = rows
    assert pasted["kind"] == "paste"
    assert pasted["source_lesions"] == "case_9#2"
    assert pasted["seed"] == str(derive_seed(7, "synth", "a", "new", 0))
    assert (pasted["generator"], pasted["generator_sha256"], pasted["generator_data_sha256"]) == (
        "copy-paste",
        rois,
        rois,
    )
    assert pasted["mask_generator"] == ""
    assert unknown["seed"] == unknown["generator_sha256"] == unknown["source_lesions"] == "not recorded"
    assert unknown["gate_verdict"] == "accepted (gate passed)"
