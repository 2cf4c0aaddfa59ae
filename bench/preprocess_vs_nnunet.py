"""Benchmark: lesionflow plan + preprocess vs nnU-Net v2's ``nnUNetv2_plan_and_preprocess`` (3d_fullres).

Both sides get the same files: the demo dataset's training cases, converted to nnU-Net v2 raw format
(``Dataset501_LesionflowBench``); lesionflow ingests that folder (untimed, with validate-raw), then the timed
part is ``plan`` + ``preprocess`` (``preprocess.workers=W``) in one child process, against
``nnUNetv2_plan_and_preprocess -d 501 -c 3d_fullres -np W -npfp W --verify_dataset_integrity`` (fingerprint,
integrity check, planning and preprocessing; its own child process). Both wall times include interpreter
start-up and imports. While each runs, its process tree is polled every 50 ms (psutil) and the peak RSS of
every process is kept; "per worker" is the largest peak of any child process (Dask workers for lesionflow,
multiprocessing workers for nnU-Net). Since a bare worker process costs a fixed amount (Python + numpy +
the libraries it imports, torch for nnU-Net), the script also measures that import baseline in a fresh
process and reports peak minus baseline, against 3x the largest volume in float32.

The demo datasets have one spacing per dataset, so neither side resamples by default; ``--target-spacing T``
forces an isotropic T mm grid on both (``plan.target_spacing`` / ``-overwrite_target_spacing``).

    .venv/bin/python bench/preprocess_vs_nnunet.py --cases 20 --size 160 --workers 2
    .venv/bin/python bench/preprocess_vs_nnunet.py --cases 20 --size 160 --workers 2 --target-spacing 1.5

nnU-Net lives in its own venv (default /tmp/bench-venv-nnunet, ``--nnunet-venv``), made with:

    python3 -m venv /tmp/bench-venv-nnunet
    /tmp/bench-venv-nnunet/bin/pip install -U pip
    /tmp/bench-venv-nnunet/bin/pip install torch==2.13.0          # the CPU wheel on disk, first
    /tmp/bench-venv-nnunet/bin/pip install -c requirements/constraints.txt nnunetv2==2.8.1

(checked with nnunetv2 2.8.1, torch 2.13.0+cpu, blosc2 4.14.1). Without it, lesionflow still runs and the
script prints why nnU-Net did not.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import _common as c

from lesionflow.catalog.artifacts import RAW_CASES, RAW_MANIFEST

# What a preprocess worker has imported once its first case is done: the task's module and the modules its
# function imports when it runs.
OUR_WORKER_IMPORTS = (
    "import psutil, distributed, nibabel, zarr, scipy.ndimage\n"
    "import lesionflow.stages.preprocess, lesionflow.preprocess.ops, lesionflow.store.zarr_store\n"
    "import lesionflow.io.volumes, lesionflow.preprocess.geometry, lesionflow.preprocess.normstats"
)
NNUNET_WORKER_IMPORTS = (
    "import SimpleITK, blosc2\n"
    "from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor"
)


def phase_times(lines: list[tuple[float, str]], wall: float, marks: list[tuple[str, str]]) -> list[tuple[str, float]]:
    """Seconds between marker lines of a log: [(phase name, seconds)], the first phase from t=0."""
    found = []
    for name, marker in marks:
        t = next((t for t, text in lines if marker in text), None)
        if t is not None:
            found.append((name, t))
    out, start, label = [], 0.0, "start-up"
    for name, t in found:
        out.append((label, t - start))
        start, label = t, name
    out.append((label, wall - start))
    return out


def run_ours(args: argparse.Namespace, tmp: Path, source: Path) -> dict:
    root = c.make_workspace(tmp / "ws")
    overrides = [f"ingest.source={source}", f"preprocess.workers={args.workers}"]
    if args.target_spacing:
        t = args.target_spacing
        overrides.append(f"plan.target_spacing=[{t},{t},{t}]")
    c.run_stages(root, ["ingest", "validate-raw"], overrides)  # untimed: nnU-Net has no ingest
    report = tmp / "ours.json"
    cmd = c.stage_command(root, ["plan", "preprocess"], overrides, report)
    wall, rc, sampler, lines = c.run_watched(cmd, log=tmp / "ours.log")
    if rc != 0:
        tail = "\n".join(text for _, text in lines[-15:])
        raise SystemExit(f"lesionflow plan+preprocess failed (rc {rc}):\n{tail}")
    stages = json.loads(report.read_text())
    plans = json.loads((root / "data" / "processed" / "plans.json").read_text())
    return {"wall": wall, "sampler": sampler, "stages": stages, "plans": plans, "workspace": root}


def run_nnunet(args: argparse.Namespace, tmp: Path, nn: c.NnUNet) -> dict:
    env = c.nnunet_env(tmp / "nnunet")
    cmd = [str(nn.bin("nnUNetv2_plan_and_preprocess")), "-d", str(c.NNUNET_DATASET_ID), "-c", "3d_fullres"]
    cmd += ["-np", str(args.workers), "-npfp", str(args.workers), "--verify_dataset_integrity", "--no_pbar"]
    if args.target_spacing:
        cmd += ["-overwrite_target_spacing", *[str(args.target_spacing)] * 3]
    wall, rc, sampler, lines = c.run_watched(cmd, env=env, log=tmp / "nnunet.log")
    if rc != 0:
        tail = "\n".join(text for _, text in lines[-15:])
        return {"error": f"nnUNetv2_plan_and_preprocess exited with {rc}; last lines:\n{tail}"}
    marks = [
        ("verify_dataset_integrity", "Fingerprint extraction..."),
        ("fingerprint", "verify_dataset_integrity Done"),
        ("planning", "Experiment planning..."),
        ("preprocessing", "Preprocessing..."),
    ]
    pre = Path(env["nnUNet_preprocessed"]) / c.NNUNET_DATASET_NAME
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    n_out = len(list((pre / "nnUNetPlans_3d_fullres").glob("*_seg.b2nd")))
    return {
        "wall": wall,
        "sampler": sampler,
        "phases": phase_times(lines, wall, marks),
        "plans": plans["configurations"]["3d_fullres"],
        "n_out": n_out,
        "cmd": " ".join(Path(cmd[0]).name if i == 0 else a for i, a in enumerate(cmd)),
        "env": env,
    }


def profile_case(ws_root: Path, scratch: Path, with_cprofile: bool) -> dict:
    """Run ``process_case`` on the largest raw case in this process: seconds, tracemalloc peak, cProfile text."""
    import cProfile
    import io
    import pstats
    import time
    import tracemalloc
    from dataclasses import asdict

    from lesionflow.catalog.readers import load_plan
    from lesionflow.manifest import read_manifest
    from lesionflow.stages.preprocess import process_case
    from lesionflow.workspace import Workspace

    ws = Workspace.at(ws_root)
    rec = max(
        read_manifest(RAW_MANIFEST.at(ws)), key=lambda r: (RAW_CASES.at(ws) / r.case_id / "image.nii.gz").stat().st_size
    )
    call = (str(RAW_CASES.at(ws) / rec.case_id), asdict(rec), load_plan(ws).to_dict(), str(scratch), "profile")
    process_case(*call, "float32", "onehot_linear")  # warm: imports, first-call caches
    tracemalloc.start()
    t0 = time.perf_counter()
    process_case(*call, "float32", "onehot_linear")
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    text = ""
    if with_cprofile:
        prof = cProfile.Profile()
        prof.runcall(process_case, *call, "float32", "onehot_linear")
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)
        text = buf.getvalue()
    return {"case": rec.case_id, "seconds": seconds, "peak": peak, "cprofile": text}


def describe_workers(sampler: c.TreeSampler) -> str:
    kids = sorted(sampler.children(), key=lambda p: -p.peak_rss)
    return ", ".join(f"pid {p.pid} {c.mib(p.peak_rss)}" for p in kids[:6]) or "(none seen)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="chest-ct", choices=["chest-ct", "brain-mri"])
    parser.add_argument("--cases", type=int, default=20, help="demo cases (train + test); nnU-Net gets the train ones")
    parser.add_argument("--size", type=int, default=160, help="longest edge in voxels (chest: size x size x size/2)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--target-spacing", type=float, default=None, help="isotropic mm; forces resampling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nnunet-venv", type=Path, default=c.DEFAULT_NNUNET_VENV)
    parser.add_argument("--profile", action="store_true", help="also print cProfile of one case's preprocess")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder and print where it is")
    args = parser.parse_args()

    with c.workdir("bench-preprocess-", args.keep) as tmp:
        msd = tmp / "demo"
        c.build_demo(args.kind, args.cases, args.size, msd, args.seed)
        source = c.to_nnunet_raw(msd, tmp / "nnunet" / "raw")
        shapes = c.volume_shapes(source)
        largest = max(math.prod(s) for s in shapes) * 4
        mb = sum(p.stat().st_size for p in source.rglob("*.nii.gz")) / 1e6
        print(
            f"dataset: {args.kind}, {len(shapes)} training cases of {args.cases}, size {args.size}, "
            f"largest volume {max(shapes, key=math.prod)} = {c.mib(largest)} as float32, {mb:.1f} MB .nii.gz"
        )
        if args.target_spacing:
            print(f"target spacing forced to {args.target_spacing} mm isotropic on both sides")

        nn, why = c.find_nnunet(args.nnunet_venv)
        ours = run_ours(args, tmp, source)
        theirs = run_nnunet(args, tmp, nn) if nn else {"error": why}

        per = ", ".join(f"{s['stage']} {s['seconds']:.2f} s" for s in ours["stages"])
        print(f"\nlesionflow plan+preprocess, {args.workers} Dask workers: {ours['wall']:.2f} s wall ({per})")
        p = ours["plans"]
        print(f"  plan: spacing {p['target_spacing']}, patch {p['patch_size']}, chunks {p['chunk_shape']}")
        base_ours = c.baseline_rss(c.PROJECT_PYTHON, OUR_WORKER_IMPORTS)
        peak_ours = max((x.peak_rss for x in ours["sampler"].children()), default=0)
        print(f"  peak RSS: main process {c.mib(ours['sampler'].root_peak())}; per worker {c.mib(peak_ours)}")
        print(f"  workers: {describe_workers(ours['sampler'])}")
        prof = profile_case(ours["workspace"], tmp / "profile-store.zarr", args.profile)
        print(
            f"  one case in process ({prof['case']}, largest file): process_case {prof['seconds']:.2f} s, "
            f"tracemalloc peak {c.mib(prof['peak'])} = {prof['peak'] / largest:.1f}x the largest float32 volume"
        )
        if prof["cprofile"]:
            print(prof["cprofile"])

        if "error" in theirs:
            print(f"\nnnU-Net: not run: {theirs['error']}")
        else:
            phases = ", ".join(f"{n} {s:.2f} s" for n, s in theirs["phases"])
            print(f"\nnnU-Net {nn.version} ({theirs['cmd']}): {theirs['wall']:.2f} s wall")
            print(f"  phases: {phases}; {theirs['n_out']} cases written")
            q = theirs["plans"]
            print(f"  plan: spacing {q['spacing']}, patch {q['patch_size']} (axes transposed: low-res axis first)")
            base_nn = c.baseline_rss(nn.python, NNUNET_WORKER_IMPORTS, theirs["env"])
            peak_nn = max((x.peak_rss for x in theirs["sampler"].children()), default=0)
            print(f"  peak RSS: main process {c.mib(theirs['sampler'].root_peak())}; per worker {c.mib(peak_nn)}")
            print(f"  workers: {describe_workers(theirs['sampler'])}")

        print("\nresults")
        if "error" not in theirs:
            ratio = ours["wall"] / theirs["wall"]
            verdict = "meets" if ratio <= 0.5 else "misses"
            print(f"  wall time lesionflow / nnU-Net = {ratio:.2f}  (target <= 0.5: {verdict})")
        rows = [("lesionflow", peak_ours, base_ours)]
        if "error" not in theirs:
            rows.append((f"nnU-Net {nn.version}", peak_nn, base_nn))
        for name, peak, base in rows:
            print(
                f"  {name}: peak RSS per worker {c.mib(peak)} = {peak / largest:.1f}x the largest float32 volume; "
                f"worker import baseline {c.mib(base)}, peak - baseline {c.mib(peak - base)} = "
                f"{(peak - base) / largest:.1f}x  (target <= 3x)"
            )
        if "error" not in theirs:
            print(f"  per-worker peak lesionflow / nnU-Net = {peak_ours / peak_nn:.2f}")
        print(f"  RSS sampled every 50 ms: {ours['sampler'].samples} samples (ours)", end="")
        print("" if "error" in theirs else f", {theirs['sampler'].samples} (nnU-Net)")


if __name__ == "__main__":
    sys.exit(main())
