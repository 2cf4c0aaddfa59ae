"""Tiny real volumes on disk for tests: spheres in 16³-24³ grids with known labels and geometry."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from lesionflow.io.volumes import Volume, write_nifti


def sphere_case(
    seed: int,
    shape: tuple[int, int, int] = (20, 18, 16),
    spacing: tuple[float, float, float] = (1.0, 1.2, 2.0),
    ct: bool = False,
) -> tuple[Volume, Volume]:
    """An image with a bright sphere (label 1) and a smaller sphere of label 2 inside it."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float32)
    centre = np.array(shape, dtype=np.float32) / 2 + rng.uniform(-1, 1, 3)
    dist = np.linalg.norm(grid - centre, axis=-1)
    label = np.zeros(shape, np.uint8)
    label[dist < 5] = 1
    label[dist < 2.5] = 2
    if ct:
        image = (rng.normal(0, 10, shape) - 800 + 800 * (label > 0)).astype(np.int16)
    else:
        image = (rng.normal(100, 5, shape) + 50 * (label > 0)).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-10.0, 20.0, 5.0]
    return Volume(image, affine), Volume(label, affine)


def write_msd(
    root: Path, n_train: int = 3, n_test: int = 1, *, ct: bool = False, labels: dict[str, str] | None = None
) -> Path:
    """An MSD-layout dataset with ``n_train + n_test`` sphere cases; returns the dataset root."""
    labels = labels or {"0": "background", "1": "lesion", "2": "core"}
    entries: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
    for i in range(n_train + n_test):
        split, img_dir, lab_dir = (
            ("training", "imagesTr", "labelsTr") if i < n_train else ("test", "imagesTs", "labelsTs")
        )
        image, label = sphere_case(i, ct=ct)
        name = f"case_{i:03d}.nii.gz"
        write_nifti(image, root / img_dir / name)
        write_nifti(label, root / lab_dir / name)
        entries[split].append({"image": f"./{img_dir}/{name}", "label": f"./{lab_dir}/{name}"})
    dataset = {
        "name": "spheres",
        "modality": {"0": "CT" if ct else "MRI"},
        "labels": labels,
        "numTraining": n_train,
        "numTest": n_test,
        **entries,
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return root


def add_msd_entry(
    root: Path,
    name: str,
    image: np.ndarray | None,
    label: np.ndarray | None,
    *,
    affine: np.ndarray | None = None,
    raw_image_bytes: bytes | None = None,
) -> None:
    """Append one training case to an MSD dataset.json, writing its files (or raw bytes for broken files)."""
    affine = np.diag([1.0, 1.2, 2.0, 1.0]) if affine is None else affine
    img_path, lab_path = root / "imagesTr" / f"{name}.nii.gz", root / "labelsTr" / f"{name}.nii.gz"
    if raw_image_bytes is not None:
        img_path.write_bytes(raw_image_bytes)
    elif image is not None:
        nib.save(nib.Nifti1Image(image, affine), img_path)
    if label is not None:
        nib.save(nib.Nifti1Image(label, affine), lab_path)
    data = json.loads((root / "dataset.json").read_text())
    entry = {"image": f"./imagesTr/{name}.nii.gz"}
    if label is not None:
        entry["label"] = f"./labelsTr/{name}.nii.gz"
    data["training"].append(entry)
    data["numTraining"] = len(data["training"])
    (root / "dataset.json").write_text(json.dumps(data, indent=2))


TINY_TRAINING = {
    "train": {
        "patch_size": [16, 16, 16],
        "channels": [8, 16],
        "steps": 6,
        "val_every": 3,
        "val_fraction": 0.25,
        "checkpoint_every": 2,
        "num_workers": 0,
        "device": "cpu",
        "synthetic_store": "",  # real cases only; tests/stages/test_synthesis.py trains on the synthetic mix
        "synthetic_ratio": 0.0,
    },
    "evaluate": {"device": "cpu", "sw_batch_size": 4},
    "quality": {
        "metrics": {"min_mean_dice": 0.0},
        # generators trained for 3 steps make noise: the statistics are checked in tests/stages/test_synthesis.py
        "synthetic": {
            "max_histogram_w1": 10.0,
            "boundary_gradient_ratio": [0.0, 1000.0],
            "max_nn_similarity": 1.0,
            "max_diversity": 1.0,
            "min_volume_ks_pvalue": 0.0,
            "max_reject_fraction": 1.0,
            "acceptance_model": "",  # a 6-step segmenter finds nothing; the filter is tested on its own
        },
    },
    "synth": {
        "new_per_case": 0,  # a 20x18x16 sphere case has no room for a second lesion
        "workers": 1,
        "device": "cpu",
        "lefusion": {"steps": 3, "timesteps": 10, "batch_size": 2},
        "diffmask": {"steps": 3, "timesteps": 10, "batch_size": 2},
        "ddpm": {"steps": 3, "timesteps": 10, "batch_size": 2},
        # trained but no trajectory: a 3-step model has no trend to check (tests/stages/test_progression.py does)
        "pie": {"steps": 3, "timesteps": 10, "batch_size": 2, "ddim_steps": 4, "iterations": 2, "cases": 0},
    },
}


def use_tiny_training(params_file: Path, **train: object) -> None:
    """Rewrite ``params_file`` with training sized for 16³–24³ sphere volumes on a CPU (seconds)."""
    import yaml

    data = yaml.safe_load(params_file.read_text())

    def merge(node: dict[str, object], values: dict[str, object]) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                merge(node.setdefault(key, {}), value)  # type: ignore[arg-type]
            else:
                node[key] = value

    merge(data, TINY_TRAINING)  # type: ignore[arg-type]
    data["train"].update(train)
    params_file.write_text(yaml.safe_dump(data, sort_keys=False))
