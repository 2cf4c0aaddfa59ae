"""Medical Segmentation Decathlon (MSD) layout writer for the demo datasets.

Layout under ``out``::

    imagesTr/<case>.nii.gz  labelsTr/<case>.nii.gz  organsTr/<case>.nii.gz
    imagesTs/<case>.nii.gz  labelsTs/<case>.nii.gz  organsTs/<case>.nii.gz
    dataset.json

``dataset.json`` follows MSD (``training``/``test`` lists of ``./``-relative paths) and adds ``organ`` per
entry plus a top-level ``organ_mask`` naming the organ. Unlike the original MSD, test entries carry labels:
the demo is for evaluating a pipeline end to end.

Rerun safety: dataset.json is removed before any case is written and written last (temp file + rename),
so a dataset.json on disk always describes a complete set of files; every NIfTI is written atomically by
:func:`lesionflow.io.volumes.write_nifti`; stale case files of the same kind from an earlier run (other
case counts or splits) are removed so the folders hold exactly what dataset.json lists.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from lesionflow.demo.fields import CaseVolumes
from lesionflow.files import write_json
from lesionflow.io.volumes import write_nifti

Split = Literal["train", "test"]
FOLDERS: dict[str, tuple[str, str, str]] = {
    "train": ("imagesTr", "labelsTr", "organsTr"),
    "test": ("imagesTs", "labelsTs", "organsTs"),
}
DATASET_JSON = "dataset.json"


def case_entry(case_id: str, split: Split) -> dict[str, str]:
    """The dataset.json entry (``image``, ``label``, ``organ``; ``./``-relative paths) of one case."""
    images, labels, organs = FOLDERS[split]
    name = f"{case_id}.nii.gz"
    return {"image": f"./{images}/{name}", "label": f"./{labels}/{name}", "organ": f"./{organs}/{name}"}


def begin(out: Path) -> None:
    """Prepare ``out`` for a (re)write: create it and drop an old dataset.json so a crash leaves none."""
    out.mkdir(parents=True, exist_ok=True)
    (out / DATASET_JSON).unlink(missing_ok=True)


def write_case(out: Path, case_id: str, split: Split, volumes: CaseVolumes) -> dict[str, str]:
    """Write the three NIfTI files of one case; return its dataset.json entry."""
    entry = case_entry(case_id, split)
    for key, volume in (("image", volumes.image), ("label", volumes.label), ("organ", volumes.organ)):
        write_nifti(volume, out / entry[key])
    return entry


def remove_stale(out: Path, prefix: str, keep: set[str]) -> list[Path]:
    """Delete ``<prefix>_<digits>.nii.gz`` files in the six MSD folders whose relative path is not in ``keep``.

    Only files matching this generator's own naming are touched; anything else a user put there stays.
    """
    pattern = re.compile(rf"{re.escape(prefix)}_\d+\.nii\.gz")
    removed = []
    for folders in FOLDERS.values():
        for folder in folders:
            directory = out / folder
            if not directory.is_dir():
                continue
            for path in sorted(directory.iterdir()):
                rel = f"./{folder}/{path.name}"
                if pattern.fullmatch(path.name) and rel not in keep:
                    path.unlink()
                    removed.append(path)
    return removed


def write_dataset_json(
    out: Path, meta: dict[str, Any], training: list[dict[str, str]], test: list[dict[str, str]]
) -> Path:
    """Write dataset.json (sorted keys, indent 2, trailing newline: deterministic bytes) atomically."""
    doc = dict(meta)
    doc.update(
        {
            "tensorImageSize": "3D",
            "numTraining": len(training),
            "numTest": len(test),
            "training": training,
            "test": test,
        }
    )
    path = out / DATASET_JSON
    write_json(path, doc)
    return path
