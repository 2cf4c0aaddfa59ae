"""Benchmark: LeFusion RePaint sampling speed (ROIs per second) for a preset, batching several lesions per pass.

The network is untrained (sampling cost does not depend on the weights). Each ROI gets a sphere mask (split
into ``--classes`` concentric class shells) and a histogram condition; ``--batch`` ROIs share one forward pass of
:func:`lesionflow.synth.lefusion.synthesize_batch` (the pipeline's sampling call, merge and paste included).
Reports network evaluations per sample (the formula of generative.md §2.6, checked against a call counter),
seconds per ROI and ROIs per second.

    .venv/bin/python bench/sampling.py --preset toy                      # 16³, base 8, T=50, j=r=2 (CPU)
    .venv/bin/python bench/sampling.py --preset toy --classes 2          # EMIDEC-like two-class model
    .venv/bin/python bench/sampling.py --preset lefusion-lidc --device cuda --batch 8 --amp bf16
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import numpy as np
import torch

from lesionflow.diffusion.samplers import count_network_evaluations
from lesionflow.params_synth import LeFusionParams
from lesionflow.seeding import torch_generator
from lesionflow.synth.lefusion import make_model, synthesize_batch
from lesionflow.synth.placement import sphere_mask

PRESETS = {
    # size (x, y, z), base width, mults, attention, T, jump length, resamples
    "toy": ((16, 16, 16), 8, (1, 2), (False, False), 50, 2, 2),
    "lefusion-lidc": ((64, 64, 32), 64, (1, 2, 4, 8), (False, False, False, True), 300, 2, 2),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="toy", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1, help="ROIs per forward pass")
    ap.add_argument("--classes", type=int, default=1, help="lesion classes (channel blocks) of the model")
    ap.add_argument("--rounds", type=int, default=2, help="timed batches (after one untimed warm-up batch)")
    ap.add_argument("--amp", default="off", choices=["off", "bf16"])
    args = ap.parse_args()

    size, base, mults, attention, timesteps, jump, resample = PRESETS[args.preset]
    settings = LeFusionParams(
        timesteps=timesteps, jump_length=jump, jump_n_sample=resample,
        base_channels=base, channel_mults=mults, attention_levels=attention,
        value_range=(-3.0, 3.0),  # the x0 clamp a trained generator records; fixed here (random weights, timing only)
    )  # fmt: skip
    classes = tuple(range(1, args.classes + 1))
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = make_model(1, settings, classes).to(device).eval()
    calls = 0
    forward = model.forward

    def counted(*a, **k):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return forward(*a, **k)

    model.forward = counted  # type: ignore[method-assign]
    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch, 1, *size)).astype(np.float32)
    # class k = the shell between radii r(k+1) and r(k) of a sphere of radius min(size) / 5 (class 0 outermost)
    radius = min(size) / 5
    balls = [sphere_mask(size, [s / 2 for s in size], radius * (1 - k / args.classes)) for k in range(args.classes)]
    shells = np.stack([balls[k] & ~balls[k + 1] if k + 1 < args.classes else balls[k] for k in range(args.classes)])
    masks = np.broadcast_to(shells, (args.batch, *shells.shape))
    hists = np.full((args.batch, len(classes) * settings.bins), 1.0 / settings.bins, dtype=np.float32)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if args.amp == "bf16" and device.type == "cuda" else nullcontext()
    )

    def one(round_index: int) -> None:
        gen = torch_generator(0, "bench-sampling", round_index, device=device)
        with autocast:
            synthesize_batch(model, settings, classes, images, masks, hists, gen)

    one(0)
    calls = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for r in range(1, args.rounds + 1):
        one(r)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    nfe = count_network_evaluations(timesteps, jump, resample)
    assert calls == nfe * args.rounds, (calls, nfe)
    rois = args.batch * args.rounds
    print(
        f"\npreset {args.preset}: ROI {list(size)}, base {base}, mults {list(mults)}, T={timesteps}, j=r={jump}, "
        f"{args.classes} class(es)"
    )
    print(f"device {device}, batch {args.batch}, amp {args.amp}, {torch.get_num_threads()} torch threads")
    print(f"network evaluations per sample: {nfe} (formula = counted)")
    print(f"seconds per ROI: {seconds / rois:.3f}   ROIs per second: {rois / seconds:.2f}")


if __name__ == "__main__":
    main()
