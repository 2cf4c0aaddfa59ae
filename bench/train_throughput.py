"""Benchmark: training patches/s fed by our Zarr patch loader vs the same network fed from memory (the ceiling).

Setup (untimed): the demo dataset is ingested, planned and preprocessed into ``data/processed/store.zarr``
in a temp workspace. Both runs then train the same network (same init, Dice+CE, AdamW, AMP on CUDA) for
``--steps`` steps after ``--warmup`` untimed steps:

* loader: ``PatchDataset`` (random patches read from the Zarr shards, 33% foreground oversampling, the
  params.yaml augmentation, ``--cache-mb`` of decoded cases per process) through a ``DataLoader`` with
  ``--workers`` worker processes, as ``train`` does;
* ceiling: ``--cached-batches`` batches produced by that same dataset beforehand and kept as tensors in memory
  (on the device), cycled: no reading, no augmentation, no host-to-device copy.

ratio = loader patches/s / ceiling patches/s (1.0 = the loader costs nothing). On CUDA the script also reports
GPU busy time: the CUDA-event time of forward+backward+step over the wall time of the step loop.

    .venv/bin/python bench/train_throughput.py --network unet --patch 32 --steps 60 --workers 1
    .venv/bin/python bench/train_throughput.py --network dynunet --patch planned --device cuda --workers 8
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from typing import Any

import _common as c
import torch


def _prepare(tmp: Path, args: argparse.Namespace) -> tuple[Path, list[str], Any]:
    root = c.make_workspace(tmp / "ws")
    c.build_demo(args.kind, args.cases, args.size, root / "data" / "demo")
    c.run_stages(root, ["ingest", "validate-raw", "plan", "preprocess", "validate-processed"], ["preprocess.workers=2"])
    from lesionflow.catalog.readers import load_plan, splits
    from lesionflow.params import load_params
    from lesionflow.workspace import Workspace

    ws = Workspace.at(root)
    split = splits(ws, load_params(ws.params_file))
    return root, list(split.train + split.val), load_plan(ws)


def _network(args: argparse.Namespace, plan: Any, patch: tuple[int, int, int], device: torch.device) -> Any:
    from lesionflow.seg.networks import NetworkConfig, build_network

    channels = tuple(int(x) for x in args.channels.split(","))
    config = NetworkConfig(args.network, plan.n_channels, len(plan.label_values), channels, 1, patch)
    torch.manual_seed(0)
    return build_network(config).to(device)


def _run(
    network: Any, batches: Any, steps: int, warmup: int, device: torch.device, lut: torch.Tensor
) -> dict[str, float]:
    from monai.losses import DiceCELoss

    from lesionflow.params import TrainParams
    from lesionflow.seg.training import amp_dtype, make_optimizer

    tp = TrainParams()
    optimizer = make_optimizer(network, tp)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    dtype = amp_dtype("auto", device)
    lut = lut.to(device)
    cuda = device.type == "cuda"
    events: list[tuple[Any, Any]] = []
    patches, t0 = 0, 0.0
    network.train()
    for i, batch in enumerate(itertools.islice(batches, warmup + steps)):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
            t0, patches, events = time.perf_counter(), 0, []
        image = batch["image"].to(device, non_blocking=True)
        target = lut[batch["label"].to(device, non_blocking=True)]
        start = torch.cuda.Event(enable_timing=True) if cuda else None
        end = torch.cuda.Event(enable_timing=True) if cuda else None
        if start is not None:
            start.record()
        with torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast("cpu", enabled=False):
            loss = loss_fn(network(image), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if end is not None:
            end.record()
            events.append((start, end))
        patches += image.shape[0]
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    busy = sum(s.elapsed_time(e) for s, e in events) / 1000.0 if cuda else float("nan")
    return {"patches_per_s": patches / wall, "wall_s": wall, "gpu_busy": busy / wall if cuda else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="brain-mri")
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--network", default="unet", choices=["unet", "dynunet", "swinunetr"])
    ap.add_argument("--channels", default="16,32,64,128")
    ap.add_argument("--patch", default="32", help="edge (e.g. 32), x,y,z, or 'planned'")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--cached-batches", type=int, default=8)
    ap.add_argument("--cache-mb", type=float, default=1024.0, help="train.cache_mb of the loader (0 = off)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    from torch.utils.data import DataLoader

    from lesionflow.params import AugmentParams
    from lesionflow.seg.patches import PatchDataset, batch_items, index_cases

    device = torch.device(args.device)
    with c.workdir("lesionflow-bench-train-", args.keep) as tmp:
        root, cases, plan = _prepare(tmp, args)
        if args.patch == "planned":
            patch = tuple(plan.patch_size)
        elif "," in args.patch:
            patch = tuple(int(v) for v in args.patch.split(","))
        else:
            patch = (int(args.patch),) * 3
        store = root / "data" / "processed" / "store.zarr"
        total = args.warmup + args.steps
        dataset = PatchDataset(
            index_cases(store, cases, seed=0),
            patch_size=patch,
            batch_size=args.batch,
            seed=0,
            length=total * args.batch,
            augmentation=AugmentParams(),
            cache_mb=args.cache_mb,
        )
        lut = torch.zeros(256, dtype=torch.int64)
        lut[list(plan.label_values)] = torch.arange(len(plan.label_values))
        sampler = [list(batch_items(s, args.batch)) for s in range(total)]

        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=args.workers,
            pin_memory=device.type == "cuda",
            persistent_workers=args.workers > 0,
        )
        fed = _run(_network(args, plan, patch, device), iter(loader), args.steps, args.warmup, device, lut)

        cached = [
            {k: v.to(device) for k, v in b.items() if isinstance(v, torch.Tensor)}
            for b in itertools.islice(DataLoader(dataset, batch_sampler=sampler, num_workers=0), args.cached_batches)
        ]
        ceiling = _run(
            _network(args, plan, patch, device), itertools.cycle(cached), args.steps, args.warmup, device, lut
        )

    ratio = fed["patches_per_s"] / ceiling["patches_per_s"]
    print(
        f"\ncache {args.cache_mb:g} MiB, {args.network} channels {args.channels}, patch {list(patch)}, "
        f"batch {args.batch}, device {device}, "
        f"{args.workers} loader worker(s), {torch.get_num_threads()} torch threads, {args.steps} timed steps"
    )
    print(f"{'feed':<26}{'patches/s':>12}{'wall s':>10}{'GPU busy':>10}")
    for name, r in (("zarr loader (ours)", fed), ("in-memory tensors (ceiling)", ceiling)):
        busy = "-" if r["gpu_busy"] != r["gpu_busy"] else f"{100 * r['gpu_busy']:.0f}%"
        print(f"{name:<26}{r['patches_per_s']:>12.2f}{r['wall_s']:>10.2f}{busy:>10}")
    print(f"ratio loader / ceiling: {ratio:.2f}  (target >= 0.8)")


if __name__ == "__main__":
    main()
