"""Benchmark: lesionflow ingest vs a plain nibabel copy loop (the I/O ceiling), and the cost of re-ingesting.

Peer: for every case, ``nib.load`` + ``np.asanyarray`` + ``nib.save`` of image, label and organ mask into
a folder — the least any ingest must do. lesionflow additionally hashes the sources, validates structure,
computes the metadata row (intensity percentiles, label values), writes deterministic gzip and renders one
montage PNG per run. Both run in this process on the same demo dataset; best of --repeats.

    .venv/bin/python bench/ingest_throughput.py --kind brain-mri --cases 16 --size 96
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from lesionflow.demo import build_demo_dataset
from lesionflow.params import Params
from lesionflow.stages import ingest
from lesionflow.workspace import Workspace


def _quiet(items, description, total):
    yield from items


def plain_copy(source: Path, out: Path) -> float:
    data = json.loads((source / "dataset.json").read_text())
    start = time.perf_counter()
    for entry in data["training"] + data["test"]:
        for role in ("image", "label", "organ"):
            img = nib.load(source / entry[role])
            arr = np.asanyarray(img.dataobj)
            target = out / role / Path(entry[role]).name
            target.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(arr, img.affine, img.header), target)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="brain-mri")
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = root / "demo"
        build_demo_dataset(args.kind, args.cases, source, 0, size=args.size)
        mb = sum(p.stat().st_size for p in source.rglob("*.nii.gz")) / 1e6
        plain, ours, again = [], [], []
        for r in range(args.repeats):
            plain.append(plain_copy(source, root / f"plain{r}"))
            ws = Workspace.at(root / f"ws{r}")
            params = Params.model_validate({"ingest": {"source": str(source)}})
            t0 = time.perf_counter()
            ingest.run(ws, params, progress=_quiet)
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ingest.run(ws, params, progress=_quiet)
            again.append(time.perf_counter() - t0)
            shutil.rmtree(root / f"plain{r}")
        p, o, a = min(plain), min(ours), min(again)
        print(f"dataset: {args.kind}, {args.cases} cases, size {args.size}, {mb:.1f} MB compressed")
        print(f"plain nibabel copy (3 files/case): {p:.2f} s  ({args.cases / p:.1f} cases/s)")
        print(f"lesionflow ingest (first):       {o:.2f} s  ({args.cases / o:.1f} cases/s)")
        print(f"ratio lesionflow/plain = {o / p:.2f}")
        print(f"lesionflow re-ingest (no change): {a:.3f} s  ratio re-ingest/first = {a / o:.3f}")


if __name__ == "__main__":
    main()
