"""Benchmark: random training-patch reads per second from our Zarr store vs raw .nii.gz vs nnU-Net's .b2nd.

Setup (untimed): the demo dataset's training cases in nnU-Net v2 raw format; lesionflow ingests that folder and
runs validate-raw, plan and preprocess into ``data/processed/store.zarr``; nnU-Net (from its own venv, if
present) runs ``nnUNetv2_plan_and_preprocess -c 3d_fullres`` into ``nnUNetPlans_3d_fullres/*.b2nd``.

Timed, one thread, ``--reads`` reads per reader after 5 untimed warm-up reads, the same seeded sequence of
(case, relative origin) for every reader; each read returns the image patch and the label patch:

* lesionflow: ``lesionflow.store.zarr_store.read_patch(store, case, origin, size)`` (opens both arrays,
  reads only the touched chunks of the one shard);
* raw NIfTI: ``nib.load`` + ``np.asanyarray(img.dataobj)`` + slice, for image and label: a full gzip
  decompress per read, what a naive loader does;
* nnU-Net: ``blosc2.open(case.b2nd, mode="r", mmap_mode="r", dparams={"nthreads": 1})`` + slice (image and
  ``_seg``), as nnU-Net's ``nnUNetDatasetBlosc2.load_case`` opens them; run in the nnU-Net venv (blosc2 is only
  there) by a child process.

The patch is clipped to each volume per axis so all readers return the same number of voxels; origins are
drawn uniformly so the patch lies inside the volume. nnU-Net's arrays have their axes reversed (z, y, x), so
its patch is the reversed one. Files are in the page cache (hot reads): this measures decode + copy cost.

    .venv/bin/python bench/patch_read.py --cases 8 --size 160 --patch 96 --reads 200
    .venv/bin/python bench/patch_read.py --cases 8 --size 160 --patch planned --reads 200

``--patch planned`` uses plans.json's ``patch_size``; ``--patch 96`` a 96^3 patch; ``--patch 128,128,64`` any.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import _common as c
import nibabel as nib
import numpy as np

WARMUP = 5

# Runs in the nnU-Net venv: argv[1] = JSON job; prints JSON {"seconds": ..., "voxels": ...}.
B2ND_READER = r"""
import json, sys, time
import blosc2
import numpy as np

job = json.loads(open(sys.argv[1]).read())
blosc2.set_nthreads(1)
dparams = {"nthreads": 1}


def read(case, rel, patch):
    data = blosc2.open(urlpath=f"{job['folder']}/{case}.b2nd", mode="r", dparams=dparams, mmap_mode="r")
    seg = blosc2.open(urlpath=f"{job['folder']}/{case}_seg.b2nd", mode="r", dparams=dparams, mmap_mode="r")
    shape = data.shape[1:]
    size = [min(p, s) for p, s in zip(patch, shape)]
    lo = [int(r * (s - p + 1)) for r, s, p in zip(rel, shape, size)]
    sl = tuple(slice(o, o + p) for o, p in zip(lo, size))
    img = np.asarray(data[(slice(None), *sl)])
    lab = np.asarray(seg[(slice(None), *sl)])
    return img.size + lab.size


patch = job["patch"]
for case, rel in job["warmup"]:
    read(case, rel, patch)
voxels = 0
t0 = time.perf_counter()
for case, rel in job["reads"]:
    voxels += read(case, rel, patch)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "voxels": voxels, "blosc2": blosc2.__version__}))
"""


def parse_patch(text: str, planned: list[int]) -> tuple[int, int, int]:
    if text == "planned":
        return (int(planned[0]), int(planned[1]), int(planned[2]))
    parts = [int(p) for p in text.split(",")]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or min(parts) < 1:
        raise SystemExit(f"--patch {text!r}: expected 'planned', N or X,Y,Z")
    return (parts[0], parts[1], parts[2])


def window(shape: tuple[int, ...], rel: list[float], patch: tuple[int, ...]) -> tuple[list[int], list[int]]:
    size = [min(p, s) for p, s in zip(patch, shape, strict=True)]
    lo = [int(r * (s - p + 1)) for r, s, p in zip(rel, shape, size, strict=True)]
    return lo, size


def time_ours(store: Path, plan: list[tuple[str, list[float]]], warm, patch, shapes) -> tuple[float, int]:
    from lesionflow.store.zarr_store import read_patch

    def read(case: str, rel: list[float]) -> int:
        lo, size = window(shapes[case], rel, patch)
        img, lab = read_patch(store, case, tuple(lo), tuple(size))
        return img.size + (lab.size if lab is not None else 0)

    return c.timed_reads(read, plan, warm)


def time_nii(raw: Path, plan, warm, patch) -> tuple[float, int]:
    def read(case: str, rel: list[float]) -> int:
        img = np.asanyarray(nib.load(raw / "imagesTr" / f"{case}_0000.nii.gz").dataobj)
        lab = np.asanyarray(nib.load(raw / "labelsTr" / f"{case}.nii.gz").dataobj)
        lo, size = window(img.shape, rel, patch)
        sl = tuple(slice(o, o + p) for o, p in zip(lo, size, strict=True))
        return np.ascontiguousarray(img[sl]).size + np.ascontiguousarray(lab[sl]).size

    return c.timed_reads(read, plan, warm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="chest-ct", choices=["chest-ct", "brain-mri"])
    parser.add_argument("--cases", type=int, default=8, help="demo cases (train + test); the train ones are read")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--patch", default="96", help="'planned', N (cubic) or X,Y,Z voxels")
    parser.add_argument("--reads", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nnunet-venv", type=Path, default=c.DEFAULT_NNUNET_VENV)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    with c.workdir("bench-patch-", args.keep) as tmp:
        msd = tmp / "demo"
        c.build_demo(args.kind, args.cases, args.size, msd, args.seed)
        raw = c.to_nnunet_raw(msd, tmp / "nnunet" / "raw")
        root = c.make_workspace(tmp / "ws")
        overrides = [f"ingest.source={raw}", "preprocess.workers=2"]
        c.run_stages(root, ["ingest", "validate-raw", "plan", "preprocess"], overrides)
        from lesionflow.store.zarr_store import list_cases, open_case_array

        store = root / "data" / "processed" / "store.zarr"
        plans = json.loads((root / "data" / "processed" / "plans.json").read_text())
        patch = parse_patch(args.patch, plans["patch_size"])
        cases = list_cases(store)
        shapes = {cid: tuple(open_case_array(store, cid, "image").shape[1:]) for cid in cases}

        nn, why = c.find_nnunet(args.nnunet_venv)
        b2nd_dir = None
        if nn is not None:
            env = c.nnunet_env(tmp / "nnunet")
            cmd = [str(nn.bin("nnUNetv2_plan_and_preprocess")), "-d", str(c.NNUNET_DATASET_ID), "-c", "3d_fullres"]
            cmd += ["-np", "2", "-npfp", "2", "--no_pbar"]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            b2nd_dir = Path(env["nnUNet_preprocessed"]) / c.NNUNET_DATASET_NAME / "nnUNetPlans_3d_fullres"
            if out.returncode != 0:
                why = f"nnUNetv2_plan_and_preprocess exited with {out.returncode}: {out.stdout[-800:]}"
                nn, b2nd_dir = None, None
            else:
                nn_cases = {p.name.removesuffix("_seg.b2nd") for p in b2nd_dir.glob("*_seg.b2nd")}
                cases = [cid for cid in cases if cid in nn_cases]

        rng = np.random.default_rng(args.seed)
        picks = [(cases[int(rng.integers(len(cases)))], rng.random(3).tolist()) for _ in range(args.reads + WARMUP)]
        warm, plan = picks[:WARMUP], picks[WARMUP:]
        print(
            f"dataset: {args.kind}, {len(cases)} training cases, size {args.size}, store shapes "
            f"{sorted(set(shapes.values()))}; planned patch {plans['patch_size']}, chunks {plans['chunk_shape']}"
        )
        eff = [min(p, s) for p, s in zip(patch, max(shapes.values(), key=np.prod), strict=True)]
        mib = np.prod(eff) * 4 / 2**20
        print(f"patch {list(patch)}, clipped to the volume {eff} ({mib:.1f} MiB float32 image), ", end="")
        print(f"{args.reads} reads, seed {args.seed}")

        results: dict[str, float] = {}
        voxels: dict[str, int] = {}
        t, voxels["lesionflow zarr"] = time_ours(store, plan, warm, patch, shapes)
        results["lesionflow zarr"] = args.reads / t
        print(f"  lesionflow read_patch (zarr): {args.reads / t:8.1f} reads/s  ({1000 * t / args.reads:.2f} ms/read)")
        t, voxels["nii.gz"] = time_nii(raw, plan, warm, patch)
        results["nii.gz"] = args.reads / t
        print(f"  nibabel .nii.gz full load:    {args.reads / t:8.1f} reads/s  ({1000 * t / args.reads:.2f} ms/read)")
        if nn is not None and b2nd_dir is not None:
            job = tmp / "b2nd_job.json"
            job.write_text(
                json.dumps({"folder": str(b2nd_dir), "patch": list(patch)[::-1], "warmup": warm, "reads": plan})
            )
            script = tmp / "b2nd_reader.py"
            script.write_text(B2ND_READER)
            out = subprocess.run([str(nn.python), str(script), str(job)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results["nnU-Net b2nd"] = args.reads / r["seconds"]
            voxels["nnU-Net b2nd"] = r["voxels"]
            print(
                f"  nnU-Net {nn.version} .b2nd (blosc2 {r['blosc2']}): {args.reads / r['seconds']:8.1f} reads/s  "
                f"({1000 * r['seconds'] / args.reads:.2f} ms/read)"
            )
        else:
            print(f"  nnU-Net: not run: {why}")

        ours = results["lesionflow zarr"]
        if len(set(voxels.values())) != 1:
            print(f"  WARNING: the readers returned different voxel totals: {voxels}")
        print("results")
        r = ours / results["nii.gz"]
        print(f"  lesionflow / nii.gz  = {r:.1f}x  (target >= 10x: {'meets' if r >= 10 else 'misses'})")
        if "nnU-Net b2nd" in results:
            r = ours / results["nnU-Net b2nd"]
            print(f"  lesionflow / nnU-Net = {r:.2f}x  (target >= 1x: {'meets' if r >= 1 else 'misses'})")


if __name__ == "__main__":
    sys.exit(main())
