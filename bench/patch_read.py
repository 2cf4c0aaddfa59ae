"""Benchmark: random training-patch reads per second from our Zarr store vs raw .nii.gz vs nnU-Net's .b2nd.

Setup (untimed): the demo dataset's training cases in nnU-Net v2 raw format; lesionflow ingests that folder and
runs validate-raw, plan and preprocess into ``data/processed/store.zarr``; nnU-Net (from its own venv, if
present) runs ``nnUNetv2_plan_and_preprocess -c 3d_fullres`` into ``nnUNetPlans_3d_fullres/*.b2nd``.

Timed, one thread, ``--reads`` reads per reader after 5 untimed warm-up reads, the same seeded sequence of
(case, relative origin) for every reader; each read returns the image patch and the label patch:

* lesionflow (the training loader's path): ``open_case_reader(store, case, name)`` once per case and array, kept
  open as ``PatchDataset`` keeps it per worker, then ``reader.read(origin, size)``: the direct shard reader
  (``lesionflow.store.shard_reader``: shard index read once, only the touched chunks decoded);
* the same readers through zarr-python (``fast=False``, arrays kept open), and ``read_patch`` (opens both arrays on
  every read, the old number), for reference;
* zarr-python with the ``zarrs`` Rust codec pipeline (arrays kept open, one thread), only when ``zarrs`` imports
  (it is not a lesionflow dependency: ``pip install --target DIR zarrs`` and ``PYTHONPATH=DIR``);
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
    OMP_NUM_THREADS=1 .venv/bin/python bench/patch_read.py --cases 8 --size 256 --patch 96 --reads 200 --rounds 3

``--rounds N`` times every reader N times, round-robin, and keeps each reader's best round: on a shared machine,
load that comes and goes then biases no reader. ``--chunk 32`` overrides ``plan.chunk_shape`` (cubic) for the store.
``--layouts blosc-lz4,none`` (the default) also times the shard reader on untimed copies of the store written with
those ``write_case(compression=...)`` codecs (same chunks), and prints each store's size on disk.
``--patch planned`` uses plans.json's ``patch_size``; ``--patch 96`` a 96^3 patch; ``--patch 128,128,64`` any.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import _common as c
import nibabel as nib
import numcodecs.blosc
import numpy as np

WARMUP = 5
# One decode thread everywhere, as the nnU-Net reader's dparams: numcodecs' blosc otherwise uses one thread per core.
numcodecs.blosc.use_threads = False

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


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


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


def time_readers(store: Path, plan, warm, patch, shapes, mode: str) -> tuple[float, int]:
    """Readers opened once per case (untimed, as a loader worker keeps them), then timed windows.

    ``mode``: "fast" (shard reader), "zarr" (zarr-python), "zarrs" (zarr-python with the zarrs codec pipeline).
    """
    import contextlib

    import zarr

    from lesionflow.store.zarr_store import VoxelOrderReader, ZarrWindowReader, open_case_array, open_case_reader

    def open_reader(case: str, name: str):
        if mode != "zarrs":
            return open_case_reader(store, case, name, fast=mode == "fast")
        with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline", "threading.max_workers": 1}):
            return VoxelOrderReader(ZarrWindowReader(open_case_array(store, case, name)))

    used = sorted({case for case, _ in [*warm, *plan]})
    readers = {case: (open_reader(case, "image"), open_reader(case, "label")) for case in used}

    def read(case: str, rel: list[float]) -> int:
        lo, size = window(shapes[case], rel, patch)
        image, label = readers[case]
        return image.read(lo, size).size + (label.read(lo, size).size if label is not None else 0)

    try:
        return c.timed_reads(read, plan, warm)
    finally:
        for pair in readers.values():
            for reader in pair:
                with contextlib.suppress(AttributeError):
                    reader.close()


def time_nii(raw: Path, plan, warm, patch) -> tuple[float, int]:
    def read(case: str, rel: list[float]) -> int:
        img = np.asanyarray(nib.load(raw / "imagesTr" / f"{case}_0000.nii.gz").dataobj)
        lab = np.asanyarray(nib.load(raw / "labelsTr" / f"{case}.nii.gz").dataobj)
        lo, size = window(img.shape, rel, patch)
        sl = tuple(slice(o, o + p) for o, p in zip(lo, size, strict=True))
        return np.ascontiguousarray(img[sl]).size + np.ascontiguousarray(lab[sl]).size

    return c.timed_reads(read, plan, warm)


def run_and_report(
    readers: dict[str, Callable[[], tuple[float, int]]], ours_name: str, nn_name: str, reads: int, rounds: int
) -> None:
    """Time every reader ``rounds`` times round-robin (load that comes and goes biases none), print each one's best
    and the ratios of the shard-reader rows to the peers, with the targets."""
    best: dict[str, float] = {}
    voxels: dict[str, int] = {}
    for _ in range(rounds):  # round-robin, so that load that comes and goes biases no reader
        for name, timer in readers.items():
            t, voxels[name] = timer()
            best[name] = min(best.get(name, t), t)
    width = max(len(n) for n in readers)
    for name, t in best.items():
        print(f"  {name:{width}s} {reads / t:8.1f} reads/s  ({1000 * t / reads:.2f} ms/read)")
    if len(set(voxels.values())) != 1:
        print(f"  WARNING: the readers returned different voxel totals: {voxels}")
    print(f"results (best of {rounds} round(s) per reader, one run)")
    peers = {"nibabel .nii.gz full load": 10.0, **({nn_name: 1.0} if nn_name else {})}
    for name in readers:
        if name.startswith("shard reader"):
            for peer, target in peers.items():
                r = best[peer] / best[name]
                print(f"  {name} / {peer} = {r:.2f}x  (target >= {target:g}x: {'meets' if r >= target else 'misses'})")
    r = best["zarr-python, arrays kept open"] / best[ours_name]
    print(f"  {ours_name} / zarr-python, arrays kept open = {r:.2f}x")


def copy_stores(
    tmp: Path, store: Path, cases: list[str], chunk: tuple[int, int, int], layouts: str
) -> dict[str, tuple[Path, str]]:
    """{compression: (store, "name size")}: the stage's zstd store and, untimed, copies written with each other
    compression in ``layouts`` (``write_case(compression=...)``), same chunks."""
    from lesionflow.store.zarr_store import read_case, read_case_attrs, write_case

    stores = {"zstd": (store, f"zstd {tree_bytes(store) / 2**20:.1f} MiB")}
    for compression in [x for x in layouts.split(",") if x and x != "zstd"]:
        copy = tmp / f"store-{compression}.zarr"
        for cid in cases:
            write_case(
                copy,
                cid,
                read_case(store, cid),
                read_case_attrs(store, cid),
                chunk_shape=chunk,
                compression=compression,
            )
        stores[compression] = (copy, f"{compression} {tree_bytes(copy) / 2**20:.1f} MiB")
    return stores


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
    parser.add_argument("--rounds", type=int, default=1, help="time every reader N times; keep each one's best")
    parser.add_argument("--chunk", type=int, default=None, help="override plan.chunk_shape (cubic, voxels)")
    parser.add_argument(
        "--layouts", default="blosc-lz4,none", help="also time copies of the store with these compressions"
    )
    args = parser.parse_args()

    with c.workdir("bench-patch-", args.keep) as tmp:
        msd = tmp / "demo"
        c.build_demo(args.kind, args.cases, args.size, msd, args.seed)
        raw = c.to_nnunet_raw(msd, tmp / "nnunet" / "raw")
        root = c.make_workspace(tmp / "ws")
        overrides = [f"ingest.source={raw}", "preprocess.workers=2"]
        if args.chunk:
            overrides.append(f"plan.chunk_shape=[{args.chunk},{args.chunk},{args.chunk}]")
        c.run_stages(root, ["ingest", "validate-raw", "plan", "preprocess"], overrides)
        from lesionflow.store.zarr_store import case_shape, list_cases

        store = root / "data" / "processed" / "store.zarr"
        plans = json.loads((root / "data" / "processed" / "plans.json").read_text())
        patch = parse_patch(args.patch, plans["patch_size"])
        cases = list_cases(store)
        shapes = {cid: case_shape(store, cid)[1:] for cid in cases}

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

        chunk = (int(plans["chunk_shape"][0]), int(plans["chunk_shape"][1]), int(plans["chunk_shape"][2]))
        stores = copy_stores(tmp, store, list(shapes), chunk, args.layouts)
        if b2nd_dir is not None:
            print(f"nnU-Net .b2nd files: {tree_bytes(b2nd_dir) / 2**20:.1f} MiB")
        layouts = [x for x in stores if x != "zstd"]

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

        ours_name = f"shard reader, {stores['zstd'][1]} store (default)"
        readers: dict[str, Callable[[], tuple[float, int]]] = {
            ours_name: lambda: time_readers(store, plan, warm, patch, shapes, "fast"),
        }
        for compression in layouts:  # bind the loop value: the lambdas run later
            copy, label = stores[compression]
            readers[f"shard reader, {label} store"] = lambda s=copy: time_readers(s, plan, warm, patch, shapes, "fast")
        readers |= {
            "zarr-python, arrays kept open": lambda: time_readers(store, plan, warm, patch, shapes, "zarr"),
            "zarr-python read_patch (opens per read)": lambda: time_ours(store, plan, warm, patch, shapes),
            "nibabel .nii.gz full load": lambda: time_nii(raw, plan, warm, patch),
        }
        if importlib.util.find_spec("zarrs") is not None:
            ver = importlib.metadata.version("zarrs")
            readers[f"zarr-python + zarrs {ver}, kept open"] = lambda: time_readers(
                store, plan, warm, patch, shapes, "zarrs"
            )
        else:
            print("  zarrs: not run (not importable; see the docstring)")
        nn_name = ""
        if nn is not None and b2nd_dir is not None:
            job = tmp / "b2nd_job.json"
            job.write_text(
                json.dumps({"folder": str(b2nd_dir), "patch": list(patch)[::-1], "warmup": warm, "reads": plan})
            )
            script = tmp / "b2nd_reader.py"
            script.write_text(B2ND_READER)
            blosc2_version = subprocess.run(
                [str(nn.python), "-c", "import blosc2; print(blosc2.__version__)"], capture_output=True, text=True
            ).stdout.strip()
            nn_name = f"nnU-Net {nn.version} .b2nd (blosc2 {blosc2_version})"

            def time_b2nd() -> tuple[float, int]:
                out = subprocess.run(
                    [str(nn.python), str(script), str(job)], capture_output=True, text=True, check=True
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                return r["seconds"], r["voxels"]

            readers[nn_name] = time_b2nd
        else:
            print(f"  nnU-Net: not run: {why}")
        run_and_report(readers, ours_name, nn_name, args.reads, args.rounds)


if __name__ == "__main__":
    sys.exit(main())
