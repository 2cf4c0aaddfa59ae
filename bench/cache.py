"""Benchmark: the pipeline so far (ingest -> validate-processed) in a fresh workspace, then a no-change rerun.

Both runs go through ``lesionflow.caching.run_cached`` in this process, stage by stage, on the same MSD demo
dataset (train and test cases, with organ masks), with ``preprocess.workers=--workers``. The rerun changes
nothing, so every stage should be a cache hit (``result.cached``); its cost is what the cache check costs:
digesting the stage inputs and outputs. Best of ``--repeats`` reruns. The same rerun is also timed in a new process
(``bench/_common.py stages``), as a user's ``lesionflow stage ...`` would pay it: start-up and imports included.

    .venv/bin/python bench/cache.py --cases 12 --size 96
    .venv/bin/python bench/cache.py --kind brain-mri --cases 12 --size 96
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import _common as c

PIPELINE = ["ingest", "validate-raw", "plan", "preprocess", "validate-processed"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="chest-ct", choices=["chest-ct", "brain-mri"])
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="no-change reruns; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    with c.workdir("bench-cache-", args.keep) as tmp:
        source = tmp / "demo"
        c.build_demo(args.kind, args.cases, args.size, source, args.seed)
        root = c.make_workspace(tmp / "ws")
        overrides = [f"ingest.source={source}", f"preprocess.workers={args.workers}"]
        t0 = time.perf_counter()
        first = c.run_stages(root, PIPELINE, overrides)
        first_s = time.perf_counter() - t0
        reruns = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            stages = c.run_stages(root, PIPELINE, overrides)
            reruns.append((time.perf_counter() - t0, stages))
        again_s, again = min(reruns, key=lambda r: r[0])
        # The same rerun as a user gets it: a new process (interpreter start-up and imports included).
        cmd = c.stage_command(root, PIPELINE, overrides, tmp / "rerun.json")
        fresh = []
        for _ in range(args.repeats):
            wall, rc, _sampler, lines = c.run_watched(cmd)
            if rc != 0:
                raise SystemExit("rerun in a new process failed:\n" + "\n".join(t for _, t in lines[-10:]))
            fresh.append(wall)
        fresh_s = min(fresh)
        fresh_stages = json.loads((tmp / "rerun.json").read_text())
        store = root / "data" / "processed" / "store.zarr"
        n_files = sum(1 for p in store.rglob("*") if p.is_file())
        mb = sum(p.stat().st_size for p in (root / "data").rglob("*") if p.is_file()) / 1e6

        print(f"\ndataset: {args.kind}, {args.cases} cases (train + test), size {args.size}")
        print(f"workspace after the first run: {mb:.1f} MB under data/, store.zarr {n_files} files")
        print(f"{'stage':<20} {'first run':>10} {'rerun':>10}  rerun did work?")
        for a, b in zip(first, again, strict=True):
            did = "no (cached)" if b["cached"] else "YES"
            print(f"{a['stage']:<20} {a['seconds']:>9.3f}s {b['seconds']:>9.3f}s  {did}")
        worked = [b["stage"] for b in again if not b["cached"]]
        print("results")
        print(f"  first run (fresh workspace): {first_s:.2f} s")
        print(f"  no-change rerun (best of {args.repeats}): {again_s:.3f} s")
        frac = again_s / first_s
        print(f"  rerun / first = {100 * frac:.2f}%  (target < 5%: {'meets' if frac < 0.05 else 'misses'})")
        print(
            f"  the same rerun in a new process (start-up + imports): {fresh_s:.2f} s = {100 * fresh_s / first_s:.1f}% "
            f"of the first run; stages that did work: {sum(not s['cached'] for s in fresh_stages)}"
        )
        print(f"  stages that did work on the rerun: {len(worked)} of {len(PIPELINE)} {worked if worked else ''}")


if __name__ == "__main__":
    sys.exit(main())
