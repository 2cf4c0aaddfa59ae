"""extract-rois -> train-generator -> synthesize -> validate-synthetic on real Zarr stores with organ masks.

Cases are 32x32x24 volumes: an organ ellipsoid holding a two-class sphere lesion off-centre, so new lesions
have room. Generators are trained for a few steps (noise textures): the tests check the invariants, the
determinism, the caching and the bad inputs, not the realism.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from lesionflow.caching import run_cached
from lesionflow.catalog.artifacts import SYNTHETIC_MANIFEST, SYNTHETIC_STORE, accepted_beside
from lesionflow.errors import GateFailed, SourceError
from lesionflow.hashing import sha256_file
from lesionflow.io.volumes import Volume, write_nifti
from lesionflow.params import load_params
from lesionflow.stages.registry import STAGES
from lesionflow.store.zarr_store import case_digest, list_cases, read_case, read_case_attrs, write_case
from lesionflow.workspace import Workspace
from tests.helpers.volumes import use_tiny_training

PREPARE = ("ingest", "validate-raw", "plan", "preprocess", "validate-processed")
SYNTH = ("extract-rois", "train-generator", "synthesize", "validate-synthetic")
SHAPE = (32, 32, 24)


def organ_case(
    seed: int, *, lesion_at: tuple[float, float, float] | None = None, organ: bool = True
) -> tuple[Volume, ...]:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1).astype(np.float32)
    centre = np.array(SHAPE, np.float32) / 2
    organ_mask = (((grid - centre) / np.array([14.0, 14.0, 10.0])) ** 2).sum(-1) <= 1.0
    lesion_centre = np.array(lesion_at if lesion_at is not None else (10 + rng.uniform(-1, 1), 12.0, 12.0))
    dist = np.linalg.norm(grid - lesion_centre, axis=-1)
    label = np.zeros(SHAPE, np.uint8)
    label[dist < 3.5] = 1
    label[dist < 1.8] = 2
    image = rng.normal(100, 5, SHAPE).astype(np.float32) + 30 * organ_mask + 60 * (label > 0) + 20 * (label == 2)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-16.0, 4.0, 7.0]
    organ_arr = organ_mask.astype(np.uint8) if organ else np.zeros(SHAPE, np.uint8)
    return Volume(image, affine), Volume(label, affine), Volume(organ_arr, affine)


def write_dataset(root: Path, cases: dict[str, tuple[Volume, ...]], n_test: int = 1) -> None:
    entries: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
    for i, (name, volumes) in enumerate(cases.items()):
        split = "test" if i >= len(cases) - n_test else "training"
        folders = ("imagesTs", "labelsTs", "organsTs") if split == "test" else ("imagesTr", "labelsTr", "organsTr")
        entry = {}
        for role, folder, volume in zip(("image", "label", "organ"), folders, volumes, strict=True):
            write_nifti(volume, root / folder / f"{name}.nii.gz")
            entry[role] = f"./{folder}/{name}.nii.gz"
        entries[split].append(entry)
    dataset = {
        "name": "organ-spheres",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "lesion", "2": "core"},
        "organ_mask": "organ",
        **entries,
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=2))


def _set(params_file: Path, **values: object) -> None:
    data = yaml.safe_load(params_file.read_text())
    for dotted, value in values.items():
        node = data
        *path, last = dotted.split("__")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    params_file.write_text(yaml.safe_dump(data, sort_keys=False))


def build_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Preprocessed workspace: 4 training cases (one without an organ mask, one with a border lesion), 1 test.

    Built once per test session (the ``prepared`` fixture in tests/conftest.py); every user copies it."""
    root = tmp_path_factory.mktemp("synth") / "ws"
    root.mkdir()
    shutil.copy(Path(__file__).resolve().parents[2] / "params.yaml", root / "params.yaml")
    cases = {f"case_{i}": organ_case(i) for i in range(2)}
    cases["case_noorgan"] = organ_case(7, organ=False)
    cases["case_border"] = organ_case(8, lesion_at=(1.0, 16.0, 12.0))
    cases["case_test"] = organ_case(9)
    write_dataset(root / "data" / "demo", cases)
    use_tiny_training(root / "params.yaml")
    _set(root / "params.yaml", train__val_fraction=0.0, synth__new_per_case=1, synth__remove_per_case=1,
         synth__generators=["lefusion", "diffmask", "ddpm"], synth__candidates_per_case=2)  # fmt: skip
    ws = Workspace.at(root)
    params = load_params(ws.params_file, ["preprocess.workers=1"])
    for name in PREPARE:
        assert run_cached(name, ws, params, STAGES[name].run).ok
    return root


def build_synthesized(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``prepared`` after the synthesis stages (the session's ``synthesized`` fixture); every user copies it."""
    root = tmp_path_factory.mktemp("synthesized") / "ws"
    shutil.copytree(prepared, root)
    ws = Workspace.at(root)
    params = load_params(ws.params_file)
    for name in SYNTH:
        assert run_cached(name, ws, params, STAGES[name].run).ok
    return root


def _copy(src: Path, tmp_path: Path, name: str) -> Workspace:
    shutil.copytree(src, tmp_path / name)
    return Workspace.at(tmp_path / name)


def test_extract_rois_reports_border_lesion_and_missing_organ(synthesized: Path) -> None:
    record = json.loads((synthesized / "reports" / "extract-rois" / "stage.json").read_text())["result"]
    codes = {(f["subject"], f["code"]) for f in record["findings"]}
    assert ("case_border", "lesion_touches_border") in codes
    assert ("case_noorgan", "empty_organ_mask") in codes
    assert record["summary"]["n_lesions"] == 3  # case_0, case_1 and case_noorgan; the border lesion is skipped
    assert record["summary"]["n_candidates"] > 0


def test_synthetic_cases_keep_the_background_and_geometry_exactly(synthesized: Path) -> None:
    ws = Workspace.at(synthesized)
    manifest = json.loads(SYNTHETIC_MANIFEST.at(ws).read_text())
    kinds = {s["kind"] for s in manifest["samples"]}
    assert kinds == {"relesion", "new", "remove"}
    assert all(s["source_case"] != "case_test" for s in manifest["samples"])  # test cases never synthesized from
    processed = (ws.root / "data" / "processed") / "store.zarr"
    for sample in manifest["samples"]:
        synth = read_case(SYNTHETIC_STORE.at(ws), sample["sample_id"])
        source = read_case(processed, sample["source_case"])
        outside = synth.generated == 0
        assert synth.generated.any()
        assert np.array_equal(synth.image[:, outside].view(np.uint32), source.image[:, outside].view(np.uint32))
        assert np.array_equal(synth.label[outside], source.label[outside])
        assert np.array_equal(synth.organ, source.organ)
        attrs, src_attrs = (
            read_case_attrs(SYNTHETIC_STORE.at(ws), sample["sample_id"]),
            read_case_attrs(processed, sample["source_case"]),
        )
        assert attrs["affine"] == src_attrs["affine"]
        assert attrs["spacing"] == src_attrs["spacing"]
        assert attrs["synthetic"]["kind"] == sample["kind"]
        for k, lesion in enumerate(sample["lesions"]):
            region = synth.generated == k + 1
            if sample["kind"] == "new":
                assert lesion["mask_source"] == "diffmask"
                assert np.all(source.organ[region] > 0)  # inside the organ
                assert set(np.unique(synth.label[region])) <= {1, 2}
                assert np.all(source.label[region] == 0)  # away from the real lesion
            if sample["kind"] == "remove":
                assert np.all(synth.label[region] == 0)
            if sample["kind"] == "relesion":
                assert len(lesion["histogram"]) == 2 * 16  # two class blocks
                assert np.array_equal(synth.label, source.label)


def test_validate_synthetic_accepts_and_reports(synthesized: Path) -> None:
    ws = Workspace.at(synthesized)
    summary = json.loads(((ws.root / "reports") / "validate-synthetic" / "summary.json").read_text())
    accepted = json.loads(accepted_beside(SYNTHETIC_STORE.at(ws)).read_text())
    assert summary["max_background_diff"] == 0.0
    assert summary["segmenter"] == "off"  # quality.synthetic.acceptance_model is empty in the tiny params
    assert set(accepted["accepted"]) == set(list_cases(SYNTHETIC_STORE.at(ws)))
    assert ((ws.root / "reports") / "validate-synthetic" / "montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ((ws.root / "reports") / "quality" / "synthetic" / "index.html").exists()


def test_same_inputs_same_bytes_and_per_sample_cache(synthesized: Path, tmp_path: Path) -> None:
    ws = _copy(synthesized, tmp_path, "again")
    before = {c: case_digest(SYNTHETIC_STORE.at(ws), c) for c in list_cases(SYNTHETIC_STORE.at(ws))}
    victim = sorted(before)[0]
    shutil.rmtree(SYNTHETIC_STORE.at(ws) / victim)
    result = STAGES["synthesize"].run(ws, load_params(ws.params_file))
    assert result.summary["n_generated_now"] == 1  # only the deleted sample is recomputed, in a new Dask worker
    after = {c: case_digest(SYNTHETIC_STORE.at(ws), c) for c in list_cases(SYNTHETIC_STORE.at(ws))}
    assert after == before


def test_corrupted_sample_is_rejected_by_the_gate_and_left_out_of_training(synthesized: Path, tmp_path: Path) -> None:
    ws = _copy(synthesized, tmp_path, "corrupt")
    store = SYNTHETIC_STORE.at(ws)
    victim = sorted(list_cases(store))[0]
    arrays = read_case(store, victim)
    image = arrays.image.copy()
    where = np.argwhere(arrays.generated == 0)[0]
    image[(0, *where)] += 1.0  # one background voxel changed
    attrs = read_case_attrs(store, victim)
    write_case(
        store,
        victim,
        arrays.__class__(image, arrays.label, arrays.organ, arrays.generated),
        attrs,
        chunk_shape=(16, 16, 16),
    )
    params = load_params(ws.params_file, ["quality.synthetic.max_reject_fraction=0.9"])
    result = STAGES["validate-synthetic"].run(ws, params)
    accepted = json.loads(accepted_beside(store).read_text())
    assert victim in accepted["rejected"]
    assert victim not in accepted["accepted"]
    assert any(f.subject.startswith(victim) and "background_max_abs_diff" in f.code for f in result.findings)
    train_params = load_params(
        ws.params_file, ["train.synthetic_store=data/synthetic/store.zarr", "train.synthetic_ratio=0.5"]
    )
    summary = STAGES["train"].run(ws, train_params).summary
    assert summary["n_synthetic"] == len(accepted["accepted"])


def test_gate_fails_as_a_whole_when_too_many_samples_are_rejected(synthesized: Path, tmp_path: Path) -> None:
    ws = _copy(synthesized, tmp_path, "strict")
    params = load_params(
        ws.params_file,
        [
            "quality.synthetic.max_nn_similarity=0.0",
            "quality.synthetic.max_histogram_w1=0.0",  # every re-textured lesion differs from its condition
            "quality.synthetic.max_reject_fraction=0.1",
        ],
    )
    with pytest.raises(GateFailed, match="synthetic quality gate failed"):
        STAGES["validate-synthetic"].run(ws, params)


def test_generator_from_another_preset_is_refused(synthesized: Path, tmp_path: Path) -> None:
    ws = _copy(synthesized, tmp_path, "preset")
    params = load_params(ws.params_file, ["synth.lefusion.base_channels=16"])
    with pytest.raises(SourceError, match=r"models/generators/lefusion was trained with base_channels 8 \(now 16\)"):
        STAGES["synthesize"].run(ws, params)


def test_lesion_larger_than_roi_and_small_bank_are_reported(prepared: Path, tmp_path: Path) -> None:
    ws = _copy(prepared, tmp_path, "small-roi")
    params = load_params(ws.params_file, ["synth.roi_size=[4, 4, 4]"])
    with pytest.raises(SourceError, match="no usable lesion ROI"):
        STAGES["extract-rois"].run(ws, params)
    params = load_params(
        ws.params_file, ["synth.lefusion.bank_k=50", "synth.generators=[lefusion]", "synth.remove_per_case=0"]
    )
    run_cached("extract-rois", ws, params, STAGES["extract-rois"].run)
    result = STAGES["train-generator"].run(ws, params)
    assert any(f.code == "bank_smaller_than_k" and "bank_k = 50" in f.detail for f in result.findings)


def test_acceptance_filter_runs_the_segmenter_on_every_lesion(synthesized: Path, tmp_path: Path) -> None:
    ws = _copy(synthesized, tmp_path, "accept")
    STAGES["train"].run(ws, load_params(ws.params_file))
    folder = ws.root / "models" / "segmenter"
    strict = ["quality.synthetic.acceptance_model=models/segmenter", "quality.synthetic.min_detected_fraction=1.0"]
    loose = ["quality.synthetic.acceptance_model=models/segmenter", "quality.synthetic.min_detected_fraction=0.0"]
    result = STAGES["validate-synthetic"].run(ws, load_params(ws.params_file, loose))
    with ((ws.root / "reports") / "validate-synthetic" / "lesions.csv").open() as fh:
        fractions = [float(row["detected_fraction"]) for row in csv.DictReader(fh)]
    assert all(0.0 <= f <= 1.0 for f in fractions)  # measured for every lesion, not NaN
    assert result.summary["acceptance_rate"] == 1.0
    assert result.summary["segmenter"] == sha256_file(folder / "model.safetensors")
    params = load_params(ws.params_file, [*strict, "quality.synthetic.max_reject_fraction=1.0"])
    if min(fractions) < 1.0:  # a 6-step segmenter misses some lesion voxels: those samples are rejected
        result = STAGES["validate-synthetic"].run(ws, params)
        assert result.summary["n_rejected"] >= 1
        assert any("detected_fraction" in f.code for f in result.findings)


def test_ddpm_insertion_baseline_fills_the_same_masks(synthesized: Path, tmp_path: Path) -> None:
    ws = _copy(synthesized, tmp_path, "baseline")
    shutil.rmtree(SYNTHETIC_STORE.at(ws))
    params = load_params(ws.params_file, ["synth.method=ddpm", "synth.new_per_case=0", "synth.remove_per_case=0"])
    result = STAGES["synthesize"].run(ws, params)
    manifest = json.loads(SYNTHETIC_MANIFEST.at(ws).read_text())
    assert result.summary["by_kind"]["relesion"] == len(manifest["samples"]) >= 2
    for sample in manifest["samples"]:
        assert sample["method"] == "ddpm"
        assert all(lesion["histogram"] == [] for lesion in sample["lesions"])  # unconditional: no texture condition
        synth = read_case(SYNTHETIC_STORE.at(ws), sample["sample_id"])
        source = read_case((ws.root / "data" / "processed") / "store.zarr", sample["source_case"])
        outside = synth.generated == 0
        assert np.array_equal(synth.image[:, outside], source.image[:, outside])
        assert not np.array_equal(synth.image[:, ~outside], source.image[:, ~outside])


def test_copy_paste_baseline_needs_no_generator_and_passes_the_gate(prepared: Path, tmp_path: Path) -> None:
    ws = _copy(prepared, tmp_path, "copy-paste")
    overrides = ["synth.method=copy-paste", "synth.generators=[]", "synth.relesion_per_case=0",
                 "synth.remove_per_case=0", "synth.lesions_per_sample=2"]  # fmt: skip
    params = load_params(ws.params_file, overrides)
    for name in ("extract-rois", "train-generator"):
        assert run_cached(name, ws, params, STAGES[name].run).ok
    assert list((ws.root / "models" / "generators").iterdir()) == []  # nothing trained, nothing needed
    result = STAGES["synthesize"].run(ws, params)
    manifest = json.loads(SYNTHETIC_MANIFEST.at(ws).read_text())
    assert manifest["generators"] == {}
    assert manifest["generator_model"].startswith("copy-paste:")
    assert result.summary["by_kind"] == {"relesion": 0, "new": len(manifest["samples"]), "remove": 0}
    assert {s["source_case"] for s in manifest["samples"]} == {"case_0", "case_1", "case_border"}
    assert any(f.subject == "case_noorgan__new0" and f.code == "empty_organ_mask" for f in result.findings)
    from lesionflow.synth.roi_store import read_roi_set

    donors = {f"{r.case_id}#{r.index}": r for r in read_roi_set(ws.root / "data" / "rois" / "rois.zarr").lesions}
    processed = (ws.root / "data" / "processed") / "store.zarr"
    for sample in manifest["samples"]:
        assert (sample["method"], sample["kind"]) == ("copy-paste", "new")
        synth = read_case(SYNTHETIC_STORE.at(ws), sample["sample_id"])
        source = read_case(processed, sample["source_case"])
        assert synth.generated is not None
        assert synth.label is not None
        assert source.label is not None
        assert source.organ is not None
        outside = synth.generated == 0
        assert np.array_equal(synth.image[:, outside].view(np.uint32), source.image[:, outside].view(np.uint32))
        assert np.array_equal(synth.label[outside], source.label[outside])
        for k, lesion in enumerate(sample["lesions"]):
            assert (lesion["mask_source"], lesion["histogram"], lesion["cluster"]) == ("paste", [], None)
            region = synth.generated == k + 1
            x, y, z = (np.argwhere(region) - np.asarray(lesion["origin"])).T  # donor ROI voxels
            donor = donors[lesion["donor"]]
            assert int(region.sum()) == lesion["voxels"] == int(donor.mask.sum())
            assert donor.mask[x, y, z].all()
            assert np.array_equal(synth.image[:, region], donor.image[:, x, y, z])  # exact, every channel
            assert np.array_equal(synth.label[region], donor.label[x, y, z])
            assert np.all(source.organ[region] > 0)  # inside the organ
            assert np.all(source.label[region] == 0)  # not on a real lesion
    gate = STAGES["validate-synthetic"].run(ws, params)
    assert gate.summary["max_background_diff"] == 0.0
    assert gate.summary["n_rejected"] == 0
    assert gate.summary["n_lesions"] == sum(len(s["lesions"]) for s in manifest["samples"])
    table = ((ws.root / "reports") / "validate-synthetic" / "lesions.csv").read_text().splitlines()
    header = table[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in table[1:]]
    assert all(r["mask_source"] == "paste" and r["nn_similarity"] == "" for r in rows)  # not measured: copies
    assert all(np.isfinite(float(r["boundary_gradient_ratio"])) and float(r["histogram_w1"]) == 0.0 for r in rows)
    assert np.isfinite(gate.summary["volume_ks_pvalue"])
    before = {c: case_digest(SYNTHETIC_STORE.at(ws), c) for c in list_cases(SYNTHETIC_STORE.at(ws))}
    shutil.rmtree(SYNTHETIC_STORE.at(ws) / sorted(before)[0])
    again = STAGES["synthesize"].run(ws, params)
    assert again.summary["n_generated_now"] == 1  # per-sample cache; the recomputed one is the same bytes
    assert {c: case_digest(SYNTHETIC_STORE.at(ws), c) for c in list_cases(SYNTHETIC_STORE.at(ws))} == before


def test_utility_in_the_loop_admits_only_what_a_study_of_these_generators_showed(
    synthesized: Path, tmp_path: Path
) -> None:
    from lesionflow.catalog.readers import generator_digest

    ws = _copy(synthesized, tmp_path, "loop")
    accepted = accepted_beside(SYNTHETIC_STORE.at(ws))
    assert accepted.exists()  # the earlier, ungated verdict
    study = ws.root / "reports" / "study" / "summary.json"
    study.parent.mkdir(parents=True)
    digests = {n: generator_digest(ws, n) for n in ("lefusion", "diffmask")}

    def write(ci_low: float, generators: dict[str, str]) -> None:
        effect = {"arm": "lefusion+diffmask", "fraction": 1.0, "mean": ci_low + 0.01, "ci_low": ci_low, "ci_high": 0.1}
        study.write_text(json.dumps({"fractions": {"1": {"generators": generators}}, "effects": [effect]}))

    on = ["quality.synthetic.study_evidence=reports/study/summary.json"]
    write(0.0, digests)
    assert run_cached("validate-synthetic", ws, load_params(ws.params_file, on), STAGES["validate-synthetic"].run).ok
    write(-0.02, digests)  # a new study that shows harm: the gate is rerun (its summary is a declared read)
    with pytest.raises(GateFailed, match=r"refused by the utility study reports/study/summary.json: arm "
                       r"'lefusion\+diffmask' at fraction 1 changes test Dice by -1\.00"):  # fmt: skip
        run_cached("validate-synthetic", ws, load_params(ws.params_file, on), STAGES["validate-synthetic"].run)
    assert not accepted.exists()  # nothing a later stage could read as accepted
    write(0.0, {**digests, "lefusion": "0" * 64})
    with pytest.raises(GateFailed, match="measured other lefusion weights than this workspace's"):
        STAGES["validate-synthetic"].run(ws, load_params(ws.params_file, on))
    study.unlink()
    with pytest.raises(GateFailed, match=r"study_evidence = reports/study/summary.json: no such file"):
        STAGES["validate-synthetic"].run(ws, load_params(ws.params_file, on))


def _train_on_synthetic(ws: Workspace) -> object:
    overrides = ["train.synthetic_store=data/synthetic/store.zarr", "train.synthetic_ratio=0.5"]
    return STAGES["train"].run(ws, load_params(ws.params_file, overrides))


def test_failed_gate_leaves_no_verdict_and_train_refuses_the_store(synthesized: Path, tmp_path: Path) -> None:
    """Issue 17 item 1: a gate that fails (here as a whole) removes the earlier verdict; train then refuses."""
    from lesionflow.store.zarr_store import store_digest

    ws = _copy(synthesized, tmp_path, "failed-gate")
    store = SYNTHETIC_STORE.at(ws)
    verdict = json.loads(accepted_beside(store).read_text())
    assert verdict["gate"] == "passed"
    assert verdict["store_digest"] == store_digest(store)  # the content the gate judged
    strict = [  # any lesion with a texture distance rejects its sample, and any rejection fails the gate
        "quality.synthetic.max_histogram_w1=0.0",
        "quality.synthetic.max_nn_similarity=0.0",
        "quality.synthetic.max_reject_fraction=0.0",
    ]
    with pytest.raises(GateFailed, match="synthetic quality gate failed"):
        STAGES["validate-synthetic"].run(ws, load_params(ws.params_file, strict))
    assert not accepted_beside(store).exists()  # the earlier passing verdict is not left for train to read
    with pytest.raises(SourceError, match=r"has no passing synthetic-gate verdict \(no data/synthetic/accepted.json"):
        _train_on_synthetic(ws)


def test_train_refuses_a_store_changed_since_its_verdict(synthesized: Path, tmp_path: Path) -> None:
    """Issue 17 item 1: the verdict is for the store content it judged; a changed store needs the gate again."""
    ws = _copy(synthesized, tmp_path, "changed")
    store = SYNTHETIC_STORE.at(ws)
    shutil.copytree(store / sorted(list_cases(store))[0], store / "unjudged_sample")  # a sample nobody judged
    with pytest.raises(SourceError, match=r"store changed since the gate judged it") as info:
        _train_on_synthetic(ws)
    message = str(info.value)
    assert "train.synthetic_store = 'data/synthetic/store.zarr'" in message
    assert "lesionflow stage validate-synthetic" in message
    assert "\n" not in message
    shutil.rmtree(store / "unjudged_sample")  # back to the judged content: the verdict holds again
    summary = _train_on_synthetic(ws).summary  # type: ignore[attr-defined]
    assert summary["n_synthetic"] == len(json.loads(accepted_beside(store).read_text())["accepted"])
    verdict = accepted_beside(store)
    verdict.write_text(json.dumps({k: v for k, v in json.loads(verdict.read_text()).items() if k != "store_digest"}))
    with pytest.raises(SourceError, match=r"records no store digest"):  # a verdict of an older version
        _train_on_synthetic(ws)
