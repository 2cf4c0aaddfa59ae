"""Benchmark: the GPU numbers of issue 18 item 5 in one run (LeFusion sampling, segmenter training, GPU busy).

Three measurements, sized from the project's presets (``presets/lefusion-lidc.yaml`` for the generator,
``presets/gpu.yaml`` for the segmenter, read through :func:`lesionflow.params.preset_overrides`):

1. **LeFusion sampling, seconds per ROI**: :func:`lesionflow.synth.lefusion.synthesize_batch` (the pipeline's
   call: RePaint with the jump schedule on the respaced schedule of ``sample_steps``, merge, paste) on ``--batch``
   lesions per network call, bf16 autocast on CUDA. The network is *randomly initialised* (the cost does not
   depend on the weights); network calls are counted and checked against
   :func:`lesionflow.diffusion.samplers.count_network_evaluations`.
2. **Segmenter training, patches/s**: the step of :func:`lesionflow.seg.training.train_loop` (network from
   :func:`lesionflow.seg.networks.build_network`, its optimizer, Dice+CE, AMP dtype, ``torch.compile`` when the
   preset asks for it) fed by ``PatchDataset`` through a ``DataLoader`` with the preset's workers, from a
   procedural Zarr store written by this script (``--cases`` noise volumes of ``--case-shape`` with ball lesions,
   chunked by the plan's rule). The patch is the preset's ``train.patch_size``, or when that is null (the GPU
   preset) what the planner's :func:`lesionflow.planning.plan.fit_patch` gives for ``--median-shape``.
3. **GPU busy while the loader feeds it**: NVML utilisation (``pynvml`` when importable, else ``nvidia-smi``
   polled in a thread) sampled during the timed training steps; also the CUDA-event share (forward + backward +
   step over wall time) and the **loader-wait share** (time blocked on the next batch over wall time), which needs
   no GPU.

Every random choice derives from ``--seed``; nothing is downloaded. ``--out`` writes the numbers as JSON.

    .venv/bin/python bench/gpu.py --device cuda --out reports/bench-gpu.json     # the issue's sizes (H100 target)
    .venv/bin/python bench/gpu.py --device cpu --tiny                             # smoke run, < 60 s on 2 cores
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _common as c
import numpy as np
import torch
from pydantic import ValidationError

from lesionflow.errors import LesionflowError
from lesionflow.params import Params, load_params, preset_overrides

SAMPLING_TARGET_S = 10.0  # s per ROI at 64x64x32 (x, y, z), j = r = 5, on an H100 (issue 18; authors ~40 s, A100)
BUSY_TARGET = 0.90  # GPU busy share while the loader feeds the segmenter (issue 18)
VALUE_RANGE = (-3.0, 3.0)  # x0 clamp of the untrained generator (a trained one records its own); cost-neutral
SMI_ERRORS: tuple[type[Exception], ...] = (OSError, subprocess.SubprocessError, ValueError, IndexError)
PRESETS = ("lefusion-lidc", "gpu")  # applied in this order: the GPU preset's train section wins
# --tiny: the same code at toy sizes (j = r = 5 kept), so that a CPU test runs every path in well under a minute
TINY = (
    "synth.roi_size=[16,16,16]",
    "synth.lefusion.base_channels=8",
    "synth.lefusion.channel_mults=[1,2]",
    "synth.lefusion.attention_levels=[false,false]",
    "synth.lefusion.timesteps=10",  # one jump point: 10 + 1 * 4 * 5 = 30 evaluations per ROI
    "synth.diffmask.channel_mults=[1,2]",
    "synth.diffmask.attention_levels=[false,false]",
    "train.channels=[8,16,32]",
    "train.patch_size=[32,32,32]",
    "train.compile=false",
    "train.num_workers=1",
)


@dataclass
class SamplingResult:
    roi_size: list[int]  # (x, y, z)
    parameters: int
    timesteps: int
    sample_steps: int  # N kept of T (RePaint's jump schedule runs on N)
    jump_length: int
    jump_n_sample: int
    batch: int
    rounds: int
    amp: str
    nfe_per_roi: int  # network evaluations per ROI (counted == formula)
    seconds: float
    seconds_per_roi: float


@dataclass
class TrainResult:
    network: str
    channels: list[int]
    patch_size: list[int]
    batch_size: int
    workers: int
    cache_mb: float
    compiled: bool
    amp: str
    steps: int
    wall_s: float
    patches_per_s: float
    loader_wait_share: float  # time blocked on the next batch / wall time of the timed steps
    cuda_busy_share: float | None  # CUDA-event time of forward+backward+step / wall (None on CPU)
    gpu_util_mean: float | None  # NVML / nvidia-smi utilisation.gpu, mean over the timed steps, 0..1
    gpu_util_samples: int
    gpu_util_source: str  # "nvml", "nvidia-smi", or why there is none


# -- GPU utilisation sampling ------------------------------------------------------------------------------


@dataclass
class UtilSampler:
    """Polls utilization.gpu of one GPU every ``interval`` s in a thread, between ``start()`` and ``stop()``.

    NVML through ``pynvml`` (the nvidia-ml-py package) when it imports, else one ``nvidia-smi --query-gpu`` call per
    sample; ``source`` says which, or why neither works (then no samples).
    """

    device: torch.device
    interval: float = 0.2
    samples: list[float] = field(default_factory=list)
    source: str = "not started"
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _gpu_ids(self) -> list[str]:
        """Names of this GPU for NVML / nvidia-smi, best first: its UUID, then its physical index.

        NVML and nvidia-smi see every GPU; torch sees those of CUDA_VISIBLE_DEVICES, renumbered from 0.
        """
        ids = []
        uuid = getattr(torch.cuda.get_device_properties(self.device), "uuid", None)
        if uuid is not None:
            text = str(uuid)
            ids.append(text if text.startswith("GPU-") else f"GPU-{text}")
        index = self.device.index or 0
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        ids.append(visible[index] if index < len(visible) else str(index))
        return ids

    def _reader(self) -> tuple[Callable[[], float], tuple[type[Exception], ...]] | None:
        """(read utilisation in %, the errors a failed poll raises), or None with ``source`` saying why."""
        ids = self._gpu_ids()
        why = "pynvml not installed"
        with suppress(ImportError):
            nvml: Any = importlib.import_module("pynvml")  # the nvidia-ml-py package; optional
            try:
                nvml.nvmlInit()
            except nvml.NVMLError as err:  # e.g. no driver library: fall back to the CLI
                why = f"pynvml: {err}"
            else:
                for gpu in ids:
                    with suppress(nvml.NVMLError, ValueError):
                        by_uuid = gpu.startswith("GPU-")
                        handle = (
                            nvml.nvmlDeviceGetHandleByUUID(gpu)
                            if by_uuid
                            else nvml.nvmlDeviceGetHandleByIndex(int(gpu))
                        )
                        self.source = f"nvml ({gpu})"
                        return (lambda h=handle: float(nvml.nvmlDeviceGetUtilizationRates(h).gpu)), (nvml.NVMLError,)
                why = f"pynvml: no handle for {ids}"
        smi = shutil.which("nvidia-smi")
        if smi is None:
            self.source = f"none ({why}; no nvidia-smi on PATH)"
            return None
        failed = ""
        for gpu in ids:
            cmd = [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", gpu]

            def query(cmd: list[str] = cmd) -> float:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True)
                return float(out.stdout.strip().splitlines()[0])

            try:
                query()
            except SMI_ERRORS as err:
                failed = f"{failed}{gpu}: {type(err).__name__}; "
                continue
            self.source = f"nvidia-smi ({gpu})"
            return query, SMI_ERRORS
        self.source = f"none ({why}; nvidia-smi failed for {failed.rstrip('; ')})"
        return None

    def start(self) -> None:
        if self.device.type != "cuda":
            self.source = "none (cpu run)"
            return
        reader = self._reader()
        if reader is None:
            return
        read, errors = reader

        def loop() -> None:
            while not self._stop.is_set():
                with suppress(*errors):  # a failed poll is a missing sample, not a failed benchmark
                    self.samples.append(read() / 100.0)
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


# -- helpers -----------------------------------------------------------------------------------------------


def load_bench_params(tiny: bool) -> Params:
    """params.yaml + the presets (+ the tiny overrides), validated like ``--preset`` on the CLI."""
    overrides = [o for name in PRESETS for o in preset_overrides(name, [c.REPO])]
    return load_params(c.REPO / "params.yaml", overrides + (list(TINY) if tiny else []))


def autocast(setting: str, device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA for ``setting`` auto/bf16 where the GPU supports it (the generator trainer's rule)."""
    if device.type != "cuda" or setting == "off" or not torch.cuda.is_bf16_supported():
        return nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def amp_name(ctx: AbstractContextManager[Any]) -> str:
    return "bf16" if isinstance(ctx, torch.autocast) else "off"


# -- 1. LeFusion sampling ----------------------------------------------------------------------------------


def bench_sampling(params: Params, args: argparse.Namespace, device: torch.device) -> SamplingResult:
    from lesionflow.diffusion.samplers import count_network_evaluations
    from lesionflow.seeding import derive_seed, torch_generator
    from lesionflow.synth.lefusion import make_model, sampling_settings, synthesize_batch
    from lesionflow.synth.placement import sphere_mask

    update: dict[str, Any] = {} if args.sample_steps is None else {"sample_steps": args.sample_steps}
    lefusion = params.synth.lefusion
    try:  # re-checks sample_steps against T (only ceil(T / s) steps are reachable)
        lp = type(lefusion).model_validate({**lefusion.model_dump(mode="json"), **update})
    except ValidationError as err:
        raise LesionflowError(f"--sample-steps {args.sample_steps}: {err.errors()[0]['msg']}") from None
    settings = sampling_settings(lp, VALUE_RANGE)
    size = tuple(params.synth.roi_size)
    classes = (1,)  # one lesion class (LIDC nodules)
    torch.manual_seed(derive_seed(args.seed, "bench-gpu", "lefusion-init"))
    model = make_model(1, settings, classes).to(device).eval()
    calls = 0
    forward = model.forward

    def counted(*a: Any, **k: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return forward(*a, **k)

    model.forward = counted
    rng = np.random.default_rng(derive_seed(args.seed, "bench-gpu", "rois"))
    images = rng.standard_normal((args.batch, 1, *size), dtype=np.float32)
    radius = min(size) / 4 * rng.uniform(0.6, 1.0)
    masks = np.broadcast_to(sphere_mask(size, [s / 2 for s in size], radius), (args.batch, *size))
    hists = np.full((args.batch, settings.bins), 1.0 / settings.bins, dtype=np.float32)
    amp = autocast(lp.amp, device)
    # warm-up (untimed): a few forward passes at the timed shapes pick the kernels and fill the allocator
    x = torch.from_numpy(images).to(device)
    t = torch.zeros(args.batch, dtype=torch.long, device=device)
    with torch.no_grad(), autocast(lp.amp, device):
        for _ in range(3):
            forward(x, t, torch.from_numpy(hists).to(device))
    sync(device)
    calls, t0 = 0, time.perf_counter()
    for r in range(args.rounds):
        gen = torch_generator(args.seed, "bench-gpu-sampling", r, device=device)
        with autocast(lp.amp, device):
            synthesize_batch(model, settings, classes, images, masks, hists, gen)
    sync(device)
    seconds = time.perf_counter() - t0
    n_steps = settings.sample_steps or settings.timesteps
    nfe = count_network_evaluations(n_steps, settings.jump_length, settings.jump_n_sample)
    if calls != nfe * args.rounds:
        raise RuntimeError(f"counted {calls} network calls for {args.rounds} round(s), formula says {nfe} each")
    rois = args.batch * args.rounds
    return SamplingResult(
        roi_size=list(size),
        parameters=sum(p.numel() for p in model.parameters()),
        timesteps=settings.timesteps,
        sample_steps=n_steps,
        jump_length=settings.jump_length,
        jump_n_sample=settings.jump_n_sample,
        batch=args.batch,
        rounds=args.rounds,
        amp=amp_name(amp),
        nfe_per_roi=nfe,
        seconds=seconds,
        seconds_per_roi=seconds / rois,
    )


# -- 2 + 3. segmenter training fed by the Zarr loader --------------------------------------------------------


def write_store(store: Path, args: argparse.Namespace, chunk: tuple[int, int, int]) -> list[str]:
    """``--cases`` procedural cases: N(0, 1) noise with 3 ball lesions (label 1) each; returns the case ids."""
    from lesionflow.seeding import derive_seed
    from lesionflow.store.zarr_store import CaseArrays, write_case
    from lesionflow.synth.placement import sphere_mask

    shape = args.case_shape
    ids = []
    for i in range(args.cases):
        rng = np.random.default_rng(derive_seed(args.seed, "bench-gpu", "case", i))
        image = rng.standard_normal((1, *shape), dtype=np.float32)
        label = np.zeros(shape, dtype=np.uint8)
        for _ in range(3):
            radius = rng.uniform(3, max(4.0, min(shape) / 8))
            centre = [rng.uniform(radius, s - radius) for s in shape]
            ball = sphere_mask(shape, centre, radius)
            label[ball] = 1
            image[0][ball] += 2.0
        case_id = f"case{i:03d}"
        write_case(
            store, case_id, CaseArrays(image=image, label=label), {"spacing": [1.0, 1.0, 1.0]}, chunk_shape=chunk
        )
        ids.append(case_id)
    return ids


def training_patch(params: Params, median_shape: Sequence[int]) -> tuple[int, int, int]:
    from lesionflow.planning.plan import fit_patch

    tp = params.train
    if tp.patch_size is not None:
        return tp.patch_size
    ms = (int(median_shape[0]), int(median_shape[1]), int(median_shape[2]))
    return fit_patch(ms, params.plan.gpu_memory_gb)


def bench_training(params: Params, args: argparse.Namespace, device: torch.device, tmp: Path) -> TrainResult:
    from monai.losses import DiceCELoss
    from torch.utils.data import DataLoader

    from lesionflow.planning.plan import MAX_CHUNK_EDGE
    from lesionflow.seeding import derive_seed
    from lesionflow.seg.networks import NetworkConfig, build_network
    from lesionflow.seg.patches import PatchDataset, batch_items, index_cases
    from lesionflow.seg.training import amp_dtype, make_optimizer

    tp = params.train
    patch = training_patch(params, args.median_shape)
    chunk = (min(patch[0], MAX_CHUNK_EDGE), min(patch[1], MAX_CHUNK_EDGE), min(patch[2], MAX_CHUNK_EDGE))
    store = tmp / "store.zarr"
    cases = write_store(store, args, chunk)
    workers = tp.num_workers if args.workers is None else args.workers
    total = args.warmup + args.steps
    dataset = PatchDataset(
        index_cases(store, cases, seed=args.seed),  # both derive their draws from (seed, purpose, item)
        patch_size=patch,
        batch_size=tp.batch_size,
        seed=args.seed,
        length=total * tp.batch_size,
        foreground_fraction=tp.foreground_fraction,
        augmentation=tp.augmentation,
        cache_mb=tp.cache_mb,
    )
    config = NetworkConfig(tp.network, 1, 2, tuple(tp.channels), tp.num_res_units, patch)
    torch.manual_seed(derive_seed(args.seed, "bench-gpu", "segmenter-init"))
    network = build_network(config).to(device)
    optimizer = make_optimizer(network, tp)
    compiled = bool(tp.compile and device.type == "cuda" and not args.no_compile)
    step_net = torch.compile(network) if compiled else network
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=tp.dice_weight, lambda_ce=tp.ce_weight)
    dtype = amp_dtype(tp.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    lut = torch.tensor([0, 1] + [0] * 254, dtype=torch.int64, device=device)  # label value -> class index
    loader = DataLoader(
        dataset,
        batch_sampler=[list(batch_items(s, tp.batch_size)) for s in range(total)],
        num_workers=workers,
        pin_memory=device.type == "cuda",
        multiprocessing_context="spawn" if workers > 0 else None,  # as train_loop: no fork of a threaded parent
    )
    sampler = UtilSampler(device)
    cuda = device.type == "cuda"
    events: list[tuple[Any, Any]] = []
    wait, t0 = 0.0, time.perf_counter()
    network.train()
    batches: Iterator[dict[str, Any]] = iter(loader)
    for step in range(total):
        if step == args.warmup:  # compile, worker start-up and the first case decodes fall in the warm-up
            sync(device)
            sampler.start()
            events, wait, t0 = [], 0.0, time.perf_counter()
        tick = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - tick
        image = batch["image"].to(device, non_blocking=True)
        target = lut[batch["label"].to(device, non_blocking=True)]
        start = torch.cuda.Event(enable_timing=True) if cuda else None
        end = torch.cuda.Event(enable_timing=True) if cuda else None
        if start is not None:
            start.record()
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
            loss = loss_fn(step_net(image), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if end is not None:
            end.record()
            events.append((start, end))
        float(loss.detach())  # train_loop reads the loss every step: the host waits for the GPU here as there
    sync(device)
    wall = time.perf_counter() - t0
    sampler.stop()
    busy = sum(s.elapsed_time(e) for s, e in events) / 1000.0 / wall if cuda else None
    return TrainResult(
        network=tp.network,
        channels=list(tp.channels),
        patch_size=list(patch),
        batch_size=tp.batch_size,
        workers=workers,
        cache_mb=tp.cache_mb,
        compiled=compiled,
        amp=str(dtype).replace("torch.", "") if dtype is not None else "off",
        steps=args.steps,
        wall_s=wall,
        patches_per_s=args.steps * tp.batch_size / wall,
        loader_wait_share=wait / wall,
        cuda_busy_share=busy,
        gpu_util_mean=sampler.mean(),
        gpu_util_samples=len(sampler.samples),
        gpu_util_source=sampler.source,
    )


# -- report --------------------------------------------------------------------------------------------------


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def print_table(s: SamplingResult, t: TrainResult, device: torch.device, name: str) -> None:
    from rich.console import Console
    from rich.table import Table

    roi = "x".join(map(str, s.roi_size))
    table = Table(title=f"bench/gpu.py on {name} (random-init weights: timing only)")
    for col in ("measurement", "value", "target", "setting"):
        table.add_column(col, no_wrap=col != "setting")
    busy_ok = t.gpu_util_mean is not None and t.gpu_util_mean >= BUSY_TARGET
    sampling_setting = (
        f"ROI {roi} (x,y,z), {s.parameters / 1e6:.1f} M params, T={s.timesteps} run on N={s.sample_steps}, "
        f"j={s.jump_length} r={s.jump_n_sample}, batch {s.batch}, amp {s.amp}, {s.rounds} round(s)"
    )
    train_setting = (
        f"{t.network} {t.channels}, patch {t.patch_size}, batch {t.batch_size}, amp {t.amp}, "
        f"compile {t.compiled}, {t.workers} loader worker(s), cache {t.cache_mb:g} MiB, {t.steps} steps"
    )
    rows = [
        ("sampling s/ROI", f"{s.seconds_per_roi:.3f}", f"<= {SAMPLING_TARGET_S:g} s on H100 (authors ~40 s, A100)",
         sampling_setting),
        ("sampling NFE/ROI", str(s.nfe_per_roi), "-", "network calls counted == N + (N/j - 1)(r - 1)j"),
        ("train patches/s", f"{t.patches_per_s:.2f}", "-", train_setting),
        ("GPU busy (util)", pct(t.gpu_util_mean), f">= {BUSY_TARGET:.0%}" + (" met" if busy_ok else ""),
         f"{t.gpu_util_source}, {t.gpu_util_samples} samples"),
        ("GPU busy (events)", pct(t.cuda_busy_share), f">= {BUSY_TARGET:.0%}", "fwd+bwd+step CUDA time / wall"),
        ("loader wait", pct(t.loader_wait_share), f"<= {1 - BUSY_TARGET:.0%}", "time blocked on next batch / wall"),
    ]  # fmt: skip
    for row in rows:
        table.add_row(*row)
    Console(width=200).print(table)
    print(f"device {device}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")


def parse_shape(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected three positive ints x,y,z, got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cpu, cuda or cuda:N")
    ap.add_argument("--tiny", action="store_true", help="toy sizes and few steps (the CPU smoke test)")
    ap.add_argument("--seed", type=int, default=0, help="every random choice derives from it")
    ap.add_argument("--batch", type=int, default=None, help="lesions per network call (default synth.batch_lesions)")
    ap.add_argument("--rounds", type=int, default=1, help="timed sampling batches")
    ap.add_argument("--sample-steps", type=int, default=None, help="respace RePaint to N of T steps (default preset)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (default 100, tiny 6)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed training steps first (default 10, tiny 2)")
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default train.num_workers)")
    ap.add_argument("--cases", type=int, default=None, help="procedural cases in the store (default 4, tiny 2)")
    ap.add_argument("--case-shape", type=parse_shape, default=None, help="x,y,z (default 256,256,160; tiny 48,48,40)")
    ap.add_argument("--median-shape", type=parse_shape, default=(512, 512, 300), help="planner input for the patch")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile even if the preset asks for it")
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the temp store")
    args = ap.parse_args(argv)
    tiny = args.tiny
    args.steps = args.steps if args.steps is not None else (6 if tiny else 100)
    args.warmup = args.warmup if args.warmup is not None else (2 if tiny else 10)
    args.cases = args.cases if args.cases is not None else (2 if tiny else 4)
    args.case_shape = args.case_shape or ((48, 48, 40) if tiny else (256, 256, 160))

    from lesionflow.devices import cpu_threads, resolve_device

    try:
        params = load_bench_params(tiny)
        device = resolve_device(args.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if args.batch is None:
            args.batch = 2 if tiny else params.synth.batch_lesions
        if min(args.batch, args.rounds, args.steps, args.cases) < 1 or args.warmup < 0:
            raise LesionflowError("--batch, --rounds, --steps and --cases must be >= 1 and --warmup >= 0")
        with cpu_threads(params.train.cpu_threads), c.workdir("lesionflow-bench-gpu-", args.keep) as tmp:
            sampling = bench_sampling(params, args, device)
            training = bench_training(params, args, device, tmp)
    except LesionflowError as err:
        sys.exit(f"error: {err}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print_table(sampling, training, device, name + (" (--tiny)" if tiny else ""))
    if args.out is not None:
        doc = {
            "device": name,
            "tiny": tiny,
            "seed": args.seed,
            "weights": "random init (timing only)",
            "torch": torch.__version__,
            "sampling": asdict(sampling),
            "training": asdict(training),
            "targets": {"sampling_s_per_roi_h100": SAMPLING_TARGET_S, "gpu_busy": BUSY_TARGET},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
