"""Benchmark: clinical-size CT (512x512x300 int16, 0.7x0.7x1.25 mm) end to end, lesionflow vs nnU-Net v2.

Data (made here, seeded, never downloaded): each case is the project's procedural chest CT phantom
(:func:`lesionflow.demo.chest_ct.synthesize`, lung nodules and a lung organ mask) drawn at ``--base-size`` and
resampled to ``--shape`` (image linear, label and organ nearest), with seeded HU noise added at full resolution
so the image is not unrealistically smooth, clipped to [-1024, 3071] and stored as int16 with a RAS+ affine of
``--spacing`` mm. The cases go to MSD layout (imagesTr/labelsTr/organsTr, the last case in imagesTs) and the
training cases are copied to nnU-Net v2 raw layout (``Dataset501_LesionflowBench``); both sides read that folder.
Case ``i`` draws from ``default_rng(SeedSequence([seed, 512, i]))``.

One run, in this order (nothing is shared between the phases but the files):

1. ingest + validate-raw, in this process, **timed but not compared** (nnU-Net has no ingest);
2. lesionflow plan + preprocess in a child process (``preprocess.workers``, ``preprocess.memory_limit``), wall
   time and the peak RSS of every process in its tree (psutil, every 50 ms, as bench/preprocess_vs_nnunet.py);
   "per worker" is the largest peak of any child; the import baseline is a fresh process after the worker's
   imports; a Dask log line about the memory limit (pause, spill, restart, kill) is counted and printed;
3. ``nnUNetv2_plan_and_preprocess -d 501 -c 3d_fullres -np W -npfp W --verify_dataset_integrity`` (nnU-Net
   2.8.1 from ``--nnunet-venv``) on the same files, measured the same way; skipped with the reason when the venv
   has no working nnunetv2;
4. one case's ``process_case`` in this process under tracemalloc: the peak, and the allocation sites live at the
   largest snapshot taken while it ran (where the memory goes);
5. random patch reads (image + label, one thread, files in the page cache, a seeded (case, origin) sequence):
   the training loader's shard reader on the produced store vs nnU-Net's ``.b2nd`` (blosc2, its loader's way)
   vs a full ``.nii.gz`` load; the readers are bench/patch_read.py's;
6. training-loader throughput: ``PatchDataset`` on the store (``train.cache_mb`` 0: no decoded-case cache, the
   params.yaml augmentation) feeding a small MONAI UNet on the CPU vs the same network fed from batches kept in
   memory (the ceiling), with bench/train_throughput.py's loop. ``--loader-workers`` DataLoader processes (default
   1, what ``train.num_workers`` defaults to; 0 reads inline, between steps), ``--loader-rounds`` alternating
   runs of both sides with each side's best kept.

Prints a table with the ratios and the targets of issue 18 and writes everything to ``--out`` (JSON).

    OMP_NUM_THREADS=1 .venv/bin/python bench/clinical.py --nnunet-venv /tmp/bench-venv-nnunet-reads --out clinical.json
    OMP_NUM_THREADS=1 .venv/bin/python bench/clinical.py --shape 96,96,60 --cases 3 --reads 20   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import threading
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _common as c
import numpy as np
import patch_read as pr
import preprocess_vs_nnunet as pvn
from scipy import ndimage as ndi

HU_MIN, HU_MAX = -1024, 3071
SEED_TAG = 512  # second word of each case's SeedSequence: these cases never collide with the demo's
DASK_MEMORY_WORDS = ("memory budget", "Restarting worker", "Worker exceeded", "KilledWorker", "spill", "Pausing")


@dataclass
class Numbers:
    """Everything the run measured (the --out JSON)."""

    config: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    ingest: dict[str, Any] = field(default_factory=dict)
    ours: dict[str, Any] = field(default_factory=dict)
    nnunet: dict[str, Any] = field(default_factory=dict)
    trace: dict[str, Any] = field(default_factory=dict)
    reads: dict[str, Any] = field(default_factory=dict)
    loader: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)


# -- data ---------------------------------------------------------------------------------------------------


def clinical_case(seed: int, index: int, base_size: int, shape: tuple[int, int, int], spacing: tuple[float, ...]):
    """One case: the chest phantom at ``base_size``, resampled to ``shape`` at ``spacing`` mm (RAS+), int16 HU."""
    from lesionflow.demo import chest_ct
    from lesionflow.demo.fields import CaseVolumes
    from lesionflow.io.volumes import Volume

    rng = np.random.default_rng(np.random.SeedSequence([seed, SEED_TAG, index]))
    small = chest_ct.synthesize(rng, base_size, lesions=True)
    factors = [t / s for t, s in zip(shape, small.image.array.shape, strict=True)]
    hu = ndi.zoom(small.image.array.astype(np.float32), factors, order=1, output=np.float32)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(rng.uniform(8.0, 15.0))
    image = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)
    del hu
    label = ndi.zoom(small.label.array, factors, order=0)
    organ = ndi.zoom(small.organ.array, factors, order=0)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * np.asarray(spacing)
    return CaseVolumes(Volume(image, affine.copy()), Volume(label, affine.copy()), Volume(organ, affine.copy()))


def make_dataset(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """MSD-layout dataset of ``args.cases`` clinical-size cases (the last one is the test case)."""
    from lesionflow.demo import chest_ct, msd

    t0 = time.perf_counter()
    msd.begin(out)
    training: list[dict[str, str]] = []
    test: list[dict[str, str]] = []
    lesion_voxels: dict[str, int] = {}
    for i in range(args.cases):
        case_id = f"clin_{i:03d}"
        split = "test" if i == args.cases - 1 else "train"
        vols = clinical_case(args.seed, i, args.base_size, args.shape, args.spacing)
        (test if split == "test" else training).append(msd.write_case(out, case_id, split, vols))
        lesion_voxels[case_id] = int(np.count_nonzero(vols.label.array))
    meta = dict(chest_ct.META, name="lesionflow-bench-clinical-ct")
    msd.write_dataset_json(out, meta, training, test)
    return {"seconds": time.perf_counter() - t0, "lesion_voxels": lesion_voxels}


# -- lesionflow plan + preprocess -------------------------------------------------------------------------------


def run_ours(args: argparse.Namespace, tmp: Path, source: Path, numbers: Numbers) -> Path:
    root = c.make_workspace(tmp / "ws")
    overrides = [
        f"ingest.source={source}",
        f"preprocess.workers={args.workers}",
        f"preprocess.memory_limit={args.memory_limit}",
        *([f"preprocess.compression={args.compression}"] if args.compression else []),
    ]
    ingest = c.run_stages(root, ["ingest", "validate-raw"], overrides)
    numbers.ingest = {s["stage"]: round(s["seconds"], 2) for s in ingest}
    report = tmp / "ours.json"
    wall, rc, sampler, lines = c.run_watched(c.stage_command(root, ["plan", "preprocess"], overrides, report))
    memory_lines = [text for _, text in lines if any(w in text for w in DASK_MEMORY_WORDS)]
    if rc != 0:
        tail = "\n".join(text for _, text in lines[-20:])
        raise SystemExit(f"lesionflow plan+preprocess failed (rc {rc}):\n{tail}")
    stages = json.loads(report.read_text())
    plans = json.loads((root / "data" / "processed" / "plans.json").read_text())
    numbers.ours = {
        "wall_s": wall,
        "stages_s": {s["stage"]: s["seconds"] for s in stages},
        "peak_worker": max((p.peak_rss for p in sampler.children()), default=0),
        "peak_main": sampler.root_peak(),
        "workers": pvn.describe_workers(sampler),
        "baseline": c.baseline_rss(c.PROJECT_PYTHON, pvn.OUR_WORKER_IMPORTS),
        "memory_log_lines": memory_lines[:20],
        "plan": {k: plans[k] for k in ("target_spacing", "patch_size", "chunk_shape") if k in plans},
        "store_mib": pr.tree_bytes(root / "data" / "processed" / "store.zarr") / 2**20,
    }
    return root


def run_nnunet(args: argparse.Namespace, tmp: Path, numbers: Numbers) -> Path | None:
    """nnU-Net's plan_and_preprocess, measured as ours; returns its 3d_fullres folder, or None (reason recorded)."""
    nn, why = c.find_nnunet(args.nnunet_venv)
    if nn is None:
        numbers.nnunet = {"error": why}
        return None
    theirs = pvn.run_nnunet(argparse.Namespace(workers=args.workers, target_spacing=None), tmp, nn)
    if "error" in theirs:
        numbers.nnunet = {"error": theirs["error"]}
        return None
    sampler = theirs["sampler"]
    numbers.nnunet = {
        "version": nn.version,
        "python": str(nn.python),
        "cmd": theirs["cmd"],
        "wall_s": theirs["wall"],
        "phases_s": dict(theirs["phases"]),
        "peak_worker": max((p.peak_rss for p in sampler.children()), default=0),
        "peak_main": sampler.root_peak(),
        "workers": pvn.describe_workers(sampler),
        "baseline": c.baseline_rss(nn.python, pvn.NNUNET_WORKER_IMPORTS, theirs["env"]),
        "patch_size_zyx": theirs["plans"]["patch_size"],
    }
    out = Path(theirs["env"]["nnUNet_preprocessed"]) / c.NNUNET_DATASET_NAME / "nnUNetPlans_3d_fullres"
    numbers.nnunet["b2nd_mib"] = pr.tree_bytes(out) / 2**20
    return out


# -- where the memory goes ---------------------------------------------------------------------------------------


def trace_case(ws_root: Path, scratch: Path, volume_bytes: int, top: int = 10, profile: bool = False) -> dict[str, Any]:
    """``process_case`` on the largest raw case under tracemalloc: the peak, and the biggest allocation sites
    live in the largest snapshot that a 5 ms poller took while it ran (numpy reports its buffers to tracemalloc).
    ``profile``: first run it once under cProfile and print the 30 heaviest calls (cumulative).
    """
    from lesionflow.catalog.artifacts import RAW_CASES, RAW_MANIFEST
    from lesionflow.catalog.readers import load_plan
    from lesionflow.manifest import read_manifest
    from lesionflow.stages.preprocess import process_case
    from lesionflow.workspace import Workspace

    ws = Workspace.at(ws_root)
    size = lambda r: (RAW_CASES.at(ws) / r.case_id / "image.nii.gz").stat().st_size  # noqa: E731
    rec = max(read_manifest(RAW_MANIFEST.at(ws)), key=size)
    call = (str(RAW_CASES.at(ws) / rec.case_id), asdict(rec), load_plan(ws).to_dict(), str(scratch), "trace")
    best: dict[str, Any] = {"current": 0, "snapshot": None}
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.005):
            current = tracemalloc.get_traced_memory()[0]
            if current > best["current"] * 1.05:
                best["current"], best["snapshot"] = current, tracemalloc.take_snapshot()

    if profile:  # first, untraced: where the time goes (tracemalloc would distort it)
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        t0 = time.perf_counter()
        other = (*call[:3], str(scratch.with_name("profile-store.zarr")), "profile")
        prof.runcall(lambda: process_case(*other, "float32", "onehot_linear"))
        profile_s = time.perf_counter() - t0
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
        print(f"cProfile of process_case({rec.case_id}), {profile_s:.1f} s:\n{buf.getvalue()}")
    tracemalloc.start(30)
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t0 = time.perf_counter()
    process_case(*call, "float32", "onehot_linear")
    seconds = time.perf_counter() - t0
    stop.set()
    poller.join()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    sites = []
    snapshot = best["snapshot"]
    if snapshot is not None:
        for stat in snapshot.statistics("traceback")[:top]:
            # innermost frame, then the innermost frame in lesionflow's own code (the call that caused it)
            frames = list(stat.traceback)  # oldest first
            ours = [f for f in frames if "lesionflow" in f.filename]
            shown = frames[-1:] + [f for f in ours[-1:] if f is not frames[-1]]
            where = " <- ".join(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno}" for f in shown)
            sites.append({"bytes": stat.size, "x_volume": stat.size / volume_bytes, "where": where})
    return {
        "case": rec.case_id,
        "seconds": seconds,
        "peak": peak,
        "peak_x_volume": peak / volume_bytes,
        "snapshot_bytes": best["current"],
        "snapshot_x_volume": best["current"] / volume_bytes,
        "sites": sites,
    }


# -- patch reads ---------------------------------------------------------------------------------------------------


def time_b2nd(nn_python: Path, tmp: Path, folder: Path, patch, warm, plan) -> tuple[float, int]:
    job = tmp / "b2nd_job.json"
    job.write_text(json.dumps({"folder": str(folder), "patch": list(patch)[::-1], "warmup": warm, "reads": plan}))
    script = tmp / "b2nd_reader.py"
    script.write_text(pr.B2ND_READER)
    out = subprocess.run([str(nn_python), str(script), str(job)], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["seconds"], r["voxels"]


def run_reads(args: argparse.Namespace, tmp: Path, root: Path, raw: Path, b2nd: Path | None, numbers: Numbers) -> None:
    from lesionflow.store.zarr_store import case_shape, list_cases

    store = root / "data" / "processed" / "store.zarr"
    cases = list_cases(store)
    if b2nd is not None:
        nn_cases = {p.name.removesuffix("_seg.b2nd") for p in b2nd.glob("*_seg.b2nd")}
        cases = [cid for cid in cases if cid in nn_cases]
    shapes = {cid: case_shape(store, cid)[1:] for cid in cases}
    patch = pr.parse_patch(args.patch, numbers.ours["plan"]["patch_size"])
    rng = np.random.default_rng(np.random.SeedSequence([args.seed, SEED_TAG, 1_000_000]))
    picks = [(cases[int(rng.integers(len(cases)))], rng.random(3).tolist()) for _ in range(args.reads + pr.WARMUP)]
    warm, plan = picks[: pr.WARMUP], picks[pr.WARMUP :]
    nii_plan = plan[: args.nii_reads]
    timers = {"ours": lambda: pr.time_readers(store, plan, warm, patch, shapes, "fast")}
    if b2nd is not None:
        timers["nnunet"] = lambda: time_b2nd(Path(numbers.nnunet["python"]), tmp, b2nd, patch, warm, plan)
    best: dict[str, float] = {}
    for _ in range(args.rounds):  # round-robin, best round kept: load that comes and goes biases neither
        for name, timer in timers.items():
            seconds, _ = timer()
            best[name] = min(best.get(name, seconds), seconds / len(plan))
    seconds, _ = pr.time_nii(raw, nii_plan, warm[:1], patch)  # one full gzip decompress per read: few reads
    best["nii"] = seconds / len(nii_plan)
    eff = [min(p, s) for p, s in zip(patch, max(shapes.values(), key=math.prod), strict=True)]
    numbers.reads = {
        "patch": list(patch),
        "patch_clipped": eff,
        "reads": len(plan),
        "nii_reads": len(nii_plan),
        "rounds": args.rounds,
        "ms_per_read": {k: 1000 * v for k, v in best.items()},
        "reads_per_s": {k: 1 / v for k, v in best.items()},
    }


# -- training loader ---------------------------------------------------------------------------------------------


def run_loader(args: argparse.Namespace, root: Path, numbers: Numbers) -> None:
    import itertools

    import torch
    import train_throughput as tt
    from torch.utils.data import DataLoader

    from lesionflow.catalog.readers import load_plan
    from lesionflow.params import AugmentParams
    from lesionflow.seg.patches import PatchDataset, batch_items, index_cases
    from lesionflow.store.zarr_store import list_cases
    from lesionflow.workspace import Workspace

    plan = load_plan(Workspace.at(root))
    store = root / "data" / "processed" / "store.zarr"
    patch = (args.loader_patch,) * 3
    total = args.warmup + args.steps
    t0 = time.perf_counter()
    index = index_cases(store, list_cases(store), seed=args.seed)
    index_s = time.perf_counter() - t0
    dataset = PatchDataset(
        index,
        patch_size=patch,
        batch_size=args.batch,
        seed=args.seed,
        length=total * args.batch,
        augmentation=AugmentParams(),
        cache_mb=0.0,
    )
    lut = torch.zeros(256, dtype=torch.int64)
    lut[list(plan.label_values)] = torch.arange(len(plan.label_values))
    sampler = [list(batch_items(s, args.batch)) for s in range(total)]
    device = torch.device("cpu")
    net_args = argparse.Namespace(network="unet", channels=args.channels)
    cached = [
        {k: v for k, v in b.items() if isinstance(v, torch.Tensor)}
        for b in itertools.islice(DataLoader(dataset, batch_sampler=sampler, num_workers=0), args.cached_batches)
    ]
    # Rounds alternate the two sides and keep each side's best, as the patch reads do: on a shared machine, load
    # that comes and goes then favours neither.
    fed: dict[str, float] = {}
    ceiling: dict[str, float] = {}
    for _ in range(args.loader_rounds):
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.loader_workers)
        net = tt._network(net_args, plan, patch, device)
        run = tt._run(net, iter(loader), args.steps, args.warmup, device, lut)
        fed = max(fed, run, key=lambda r: r.get("patches_per_s", 0.0))
        net = tt._network(net_args, plan, patch, device)
        run = tt._run(net, itertools.cycle(cached), args.steps, args.warmup, device, lut)
        ceiling = max(ceiling, run, key=lambda r: r.get("patches_per_s", 0.0))
    numbers.loader = {
        "patch": list(patch),
        "batch": args.batch,
        "steps": args.steps,
        "network": f"unet {args.channels}",
        "torch_threads": torch.get_num_threads(),
        "loader_workers": args.loader_workers,
        "loader_rounds": args.loader_rounds,
        "index_cases_s": index_s,
        "loader_patches_per_s": fed["patches_per_s"],
        "ceiling_patches_per_s": ceiling["patches_per_s"],
        "ratio": fed["patches_per_s"] / ceiling["patches_per_s"],
    }


# -- report ----------------------------------------------------------------------------------------------------------


def judge(numbers: Numbers, volume_bytes: int, memory_limit_bytes: int) -> None:
    """The issue 18 targets, each with its measured value (None where the peer did not run)."""
    ours, nn, reads = numbers.ours, numbers.nnunet, numbers.reads["ms_per_read"]
    net = ours["peak_worker"] - ours["baseline"]
    rows = [
        (
            "completes within memory_limit per worker",
            ours["peak_worker"] / memory_limit_bytes,
            "<= 1 (x limit)",
            ours["peak_worker"] <= memory_limit_bytes and not ours["memory_log_lines"],
        ),
        ("peak RSS per worker net of imports", net / volume_bytes, "<= 3 (x float32 volume)", net <= 3 * volume_bytes),
        ("patch reads vs .nii.gz", reads["nii"] / reads["ours"], ">= 10", reads["nii"] / reads["ours"] >= 10),
        ("loader vs in-memory ceiling", numbers.loader["ratio"], ">= 0.8", numbers.loader["ratio"] >= 0.8),
    ]
    if "error" not in nn:
        wall = ours["wall_s"] / nn["wall_s"]
        rows.insert(2, ("plan+preprocess wall vs nnU-Net", wall, "<= 0.5", wall <= 0.5))
        r = reads["nnunet"] / reads["ours"]
        rows.insert(4, ("patch reads vs nnU-Net .b2nd", r, ">= 1", r >= 1))
    numbers.targets = [{"target": t, "value": v, "goal": g, "met": bool(m)} for t, v, g, m in rows]


def print_report(numbers: Numbers, volume_bytes: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    ours, nn, rd, ld = numbers.ours, numbers.nnunet, numbers.reads, numbers.loader
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    t = Table(title=f"clinical-size CT: {numbers.config['summary']}")
    for col in ("measure", "lesionflow", "nnU-Net", "ratio"):
        t.add_column(col, justify="left" if col == "measure" else "right")
    has_nn = "error" not in nn
    dash = "-"
    t.add_row("ingest + validate-raw (timed, not compared)", f"{sum(numbers.ingest.values()):.1f} s", dash, dash)
    t.add_row(
        "plan + preprocess wall",
        f"{ours['wall_s']:.1f} s",
        f"{nn['wall_s']:.1f} s" if has_nn else dash,
        f"{ours['wall_s'] / nn['wall_s']:.2f}" if has_nn else dash,
    )
    t.add_row(
        "peak RSS per worker",
        gib(ours["peak_worker"]),
        gib(nn["peak_worker"]) if has_nn else dash,
        f"{ours['peak_worker'] / nn['peak_worker']:.2f}" if has_nn else dash,
    )
    net_ours = ours["peak_worker"] - ours["baseline"]
    t.add_row(
        "  net of import baseline (x float32 volume)",
        f"{gib(net_ours)} = {net_ours / volume_bytes:.1f}x",
        f"{gib(nn['peak_worker'] - nn['baseline'])} = {(nn['peak_worker'] - nn['baseline']) / volume_bytes:.1f}x"
        if has_nn
        else dash,
        dash,
    )
    t.add_row("peak RSS main process", gib(ours["peak_main"]), gib(nn["peak_main"]) if has_nn else dash, dash)
    ms = rd["ms_per_read"]
    t.add_row(
        f"patch read {rd['patch_clipped']} (ms)",
        f"{ms['ours']:.1f}",
        f"{ms['nnunet']:.1f}" if "nnunet" in ms else dash,
        f"{ms['nnunet'] / ms['ours']:.2f}x" if "nnunet" in ms else dash,
    )
    t.add_row("  .nii.gz full load (ms)", f"{ms['nii']:.1f}", dash, f"{ms['nii'] / ms['ours']:.1f}x vs ours")
    t.add_row(
        f"loader patches/s ({ld['patch']}, no cache, {ld['loader_workers']} workers)",
        f"{ld['loader_patches_per_s']:.2f}",
        f"ceiling {ld['ceiling_patches_per_s']:.2f}",
        f"{ld['ratio']:.2f}",
    )
    console.print(t)
    if not has_nn:
        console.print(f"nnU-Net: not run: {nn['error']}")
    else:
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in nn["phases_s"].items())
        console.print(f"nnU-Net {nn['version']} phases: {phases}")
    console.print(f"lesionflow stages: {ours['stages_s']}; plan {ours['plan']}; workers {ours['workers']}")
    if ours["memory_log_lines"]:
        console.print("Dask memory lines:\n  " + "\n  ".join(ours["memory_log_lines"]))
    tr = numbers.trace
    if tr:
        console.print(
            f"tracemalloc, one process_case ({tr['case']}, {tr['seconds']:.1f} s): peak {gib(tr['peak'])} = "
            f"{tr['peak_x_volume']:.1f}x; largest snapshot {tr['snapshot_x_volume']:.1f}x:"
        )
        for s in tr["sites"]:
            console.print(f"  {s['x_volume']:5.2f}x  {s['where']}")
    targets = Table(title="issue 18 targets")
    for col in ("target", "value", "goal", "met"):
        targets.add_column(col)
    for row in numbers.targets:
        targets.add_row(row["target"], f"{row['value']:.2f}", row["goal"], "yes" if row["met"] else "NO")
    console.print(targets)


def parse_ints(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.split(","))
    if len(parts) != 3 or min(parts) < 8:
        raise SystemExit(f"--shape {text!r}: expected X,Y,Z voxels, each >= 8")
    return parts


def parse_spacing(text: str) -> tuple[float, float, float]:
    parts = tuple(float(p) for p in text.split(","))
    if len(parts) != 3 or min(parts) <= 0:
        raise SystemExit(f"--spacing {text!r}: expected X,Y,Z mm, each > 0")
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=4, help="cases made; the last is the test case (not preprocessed)")
    ap.add_argument("--shape", type=parse_ints, default=(512, 512, 300), help="X,Y,Z voxels")
    ap.add_argument("--spacing", type=parse_spacing, default=(0.7, 0.7, 1.25), help="X,Y,Z mm")
    ap.add_argument("--base-size", type=int, default=160, help="size of the chest phantom before resampling")
    ap.add_argument("--workers", type=int, default=2, help="preprocess workers, both sides")
    ap.add_argument("--memory-limit", default="4GiB", help="preprocess.memory_limit per Dask worker")
    ap.add_argument("--compression", default="", help="preprocess.compression of the store (default: params.yaml's)")
    ap.add_argument("--patch", default="planned", help="read patch: 'planned', N or X,Y,Z")
    ap.add_argument("--reads", type=int, default=100, help="timed patch reads (ours, nnU-Net)")
    ap.add_argument("--nii-reads", type=int, default=5, help="timed .nii.gz full loads")
    ap.add_argument("--rounds", type=int, default=2, help="round-robin rounds of ours / nnU-Net reads; best kept")
    ap.add_argument("--loader-patch", type=int, default=32)
    ap.add_argument("--channels", default="16,32,64,128")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--cached-batches", type=int, default=8)
    ap.add_argument(
        "--loader-workers", type=int, default=1, help="DataLoader processes (1 = train.num_workers default; 0 inline)"
    )
    ap.add_argument("--loader-rounds", type=int, default=3, help="alternating loader / ceiling runs; best of each kept")
    ap.add_argument("--no-trace", action="store_true", help="skip the tracemalloc pass over one case")
    ap.add_argument("--profile", action="store_true", help="also cProfile one case's process_case (before tracing)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nnunet-venv", type=Path, default=c.DEFAULT_NNUNET_VENV)
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if args.cases < 2:
        raise SystemExit(f"--cases {args.cases}: expected >= 2 (train cases + one test case)")

    limit_bytes = _memory_bytes(args.memory_limit)
    volume_bytes = math.prod(args.shape) * 4
    shape_txt = "x".join(map(str, args.shape))
    summary = (
        f"{args.cases - 1} train cases of {shape_txt} int16 at {args.spacing} mm, {args.workers} workers, "
        f"memory_limit {args.memory_limit}, seed {args.seed}"
    )
    numbers = Numbers(config={**{k: str(v) for k, v in vars(args).items()}, "summary": summary})
    t_all = time.perf_counter()
    numbers.config["load_average_start"] = str(os.getloadavg())
    with c.workdir("bench-clinical-", args.keep) as tmp:
        numbers.data = make_dataset(tmp / "msd", args)
        raw = c.to_nnunet_raw(tmp / "msd", tmp / "nnunet" / "raw")
        numbers.data["nii_gz_mib"] = sum(p.stat().st_size for p in raw.rglob("*.nii.gz")) / 2**20
        numbers.data["volume_float32_mib"] = volume_bytes / 2**20
        print(f"data: {summary}; made in {numbers.data['seconds']:.1f} s, {numbers.data['nii_gz_mib']:.0f} MiB .nii.gz")
        root = run_ours(args, tmp, raw, numbers)
        print(f"lesionflow plan+preprocess: {numbers.ours['wall_s']:.1f} s")
        b2nd = run_nnunet(args, tmp, numbers)
        print(f"nnU-Net: {numbers.nnunet.get('wall_s', numbers.nnunet.get('error'))}")
        if not args.no_trace:
            numbers.trace = trace_case(root, tmp / "trace-store.zarr", volume_bytes, profile=args.profile)
        run_reads(args, tmp, root, raw, b2nd, numbers)
        run_loader(args, root, numbers)
    numbers.config["total_s"] = str(round(time.perf_counter() - t_all, 1))
    numbers.config["load_average_end"] = str(os.getloadavg())
    judge(numbers, volume_bytes, limit_bytes)
    print_report(numbers, volume_bytes)
    if args.out is not None:
        args.out.write_text(json.dumps(asdict(numbers), indent=2, default=str) + "\n")
        print(f"wrote {args.out}")


def _memory_bytes(text: str) -> int:
    """'4GiB' -> bytes, with dask's parser (the one the Dask workers' memory_limit goes through)."""
    from dask.utils import parse_bytes

    return int(parse_bytes(text))


if __name__ == "__main__":
    main()
