"""Stage ``train``: a MONAI network on patches streamed from the Zarr store; resumable, optionally DDP.

Outputs: ``models/segmenter/`` (model.safetensors, config.json, metadata.json), ``reports/train/``
(curves.csv for ``dvc plots``, curves.png, summary.json). Checkpoints live in
``models/checkpoints/segmenter/<run key>/``; the run key digests everything that shapes the weights, so a
rerun after a crash resumes, while a run with other params or data starts fresh (old checkpoints stay).
With ``train.ddp_processes`` > 1 (or several GPUs and ``0``), the stage relaunches itself under torchrun.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from lesionflow.catalog.artifacts import (
    ACCEPTED,
    METADATA,
    PLANS,
    SEGMENTER,
    SEGMENTER_CHECKPOINTS,
    STORE,
    SYNTHETIC_STORE,
    TRAIN_CURVES,
    TRAIN_CURVES_PNG,
    TRAINING_SYNTHETIC,
    summary_artifact,
)
from lesionflow.catalog.digests import digest
from lesionflow.catalog.readers import (
    Splits,
    label_names,
    load_plan,
    read_metadata,
    splits,
    stage_summary,
    synthetic_samples_used,
    write_stage_summary,
)
from lesionflow.devices import cpu_threads, resolve_device
from lesionflow.errors import ParamsError, SourceError
from lesionflow.files import write_text_if_changed
from lesionflow.hashing import sha256_file, sha256_json
from lesionflow.params import Params
from lesionflow.stages.base import CODE_VERSION, StageResult
from lesionflow.workspace import Workspace

STAGE = "train"
# Params that do not change the weights (where and how fast they are computed) stay out of the run key.
_RUN_KEY_EXCLUDE = {"device", "num_workers", "compile", "keep_checkpoints", "cache_mb"}


def _run_inputs(ws: Workspace, params: Params) -> dict[str, str | None]:
    """What shapes the weights besides params, by the catalog's digest rules (part of the run key)."""
    return {
        name: digest(artifact, ws, params)
        for name, artifact in (
            ("plans", PLANS),
            ("metadata", METADATA),
            ("accepted", ACCEPTED),
            ("synthetic", TRAINING_SYNTHETIC),
        )
    }


def segmenter_seed(params: Params) -> int:
    """``train.seed``, else ``project.seed``: what draws the initial weights and the patches."""
    return params.train.seed if params.train.seed is not None else params.project.seed


def run_key(ws: Workspace, params: Params, world_size: int) -> str:
    train = {k: v for k, v in params.train.model_dump(mode="json").items() if k not in _RUN_KEY_EXCLUDE}
    train = {k: v for k, v in train.items() if not (k == "seed" and v is None)}  # unset: the key of before it existed
    parts = {"seed": segmenter_seed(params), "train": train, "inputs": _run_inputs(ws, params), "code": CODE_VERSION}
    return sha256_json({**parts, "world_size": world_size})


def _world_size(params: Params) -> int:
    import torch

    if params.train.ddp_processes:
        return params.train.ddp_processes
    gpus = torch.cuda.device_count() if params.train.device in ("auto", "cuda") else 0
    return gpus if gpus > 1 else 1


def check_patch(patch: tuple[int, int, int], rows: dict[str, dict[str, Any]], train: tuple[str, ...]) -> None:
    """A patch larger than every training volume along an axis only trains on padding: refuse it."""
    largest = [max(int(rows[c][f"shape_{a}"]) for c in train) for a in "xyz"]
    too_big = [a for a, p, n in zip("xyz", patch, largest, strict=True) if p > n]
    if too_big:
        fit = [min(p, n) for p, n in zip(patch, largest, strict=True)]
        raise ParamsError(
            f"train.patch_size = {list(patch)} is larger than every training volume along {', '.join(too_big)} "
            f"(largest volume {largest} voxels after preprocessing); use at most {fit}, rounded down to the "
            "network's downsampling multiple"
        )


def run(ws: Workspace, params: Params) -> StageResult:
    world = _world_size(params)
    if world > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_ddp(ws, params, world)
    with cpu_threads(params.train.cpu_threads):
        return train_in_process(ws, params)


def _launch_ddp(ws: Workspace, params: Params, world: int) -> StageResult:
    """Relaunch this stage under torchrun with ``world`` processes; rank 0 writes the outputs."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
        "-m", "lesionflow.stages.train", str(ws.root), params.model_dump_json(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise SourceError(f"DDP training with {world} processes failed: {tail}; see the torchrun output above")
    sys.stderr.write(proc.stderr[-4000:])
    return _result(ws, read_summary(ws))


def read_summary(ws: Workspace) -> dict[str, Any]:
    return stage_summary(ws, STAGE)


def _mean_foreground_dice(pred: np.ndarray, truth: np.ndarray, values: tuple[int, ...]) -> float:
    """Mean Dice over the non-zero label values, the test metrics' rule (lesionflow.seg.dice)."""
    from lesionflow.seg.dice import mean_foreground_dice

    return mean_foreground_dice(pred, truth, values)


def train_in_process(ws: Workspace, params: Params) -> StageResult:
    import torch

    from lesionflow.seeding import derive_seed
    from lesionflow.seg.model_files import SegmenterConfig, save_segmenter
    from lesionflow.seg.networks import NetworkConfig, build_network, check_config, parameter_count
    from lesionflow.seg.patches import PatchDataset, index_cases
    from lesionflow.seg.training import amp_dtype, train_loop

    tp = params.train
    plan = load_plan(ws)
    split = splits(ws, params)
    rows = read_metadata(ws)
    patch = tp.patch_size or plan.patch_size
    values = tuple(int(v) for v in plan.label_values)
    config = NetworkConfig(tp.network, plan.n_channels, len(values), tp.channels, tp.num_res_units, patch)
    check_config(config)
    check_patch(patch, rows, split.train)
    rank, world = _init_distributed(tp.device)
    device = resolve_device(tp.device)
    store = STORE.at(ws)
    seed = segmenter_seed(params)
    real = index_cases(store, split.train, seed=seed)
    synthetic = _synthetic_cases(ws, params)
    dataset = PatchDataset(
        real,
        patch_size=patch,
        batch_size=tp.batch_size,
        seed=derive_seed(seed, "train-patches"),
        length=tp.steps * tp.batch_size * world,
        foreground_fraction=tp.foreground_fraction,
        synthetic=synthetic,
        synthetic_ratio=tp.synthetic_ratio,
        augmentation=tp.augmentation if tp.augmentation.enabled else None,
        cache_mb=tp.cache_mb,
    )
    torch.manual_seed(derive_seed(seed, "segmenter-init"))
    network = build_network(config).to(device)
    wrapped: torch.nn.Module = network
    if world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.index is not None else None
        )
    if tp.compile:
        wrapped = torch.compile(wrapped)  # type: ignore[assignment]
    lut = torch.zeros(256, dtype=torch.int64)
    lut[list(values)] = torch.arange(len(values))
    key = run_key(ws, params, world)
    validate = _make_validator(store, split.val, patch, values, params, device) if split.val else None
    try:
        outcome = train_loop(
            wrapped,
            dataset,
            params=tp,
            label_lut=lut,
            checkpoint_root=SEGMENTER_CHECKPOINTS.at(ws) / key[:16],
            device=device,
            validate=validate,
            warn=lambda line: print(f"train: {line}", file=sys.stderr),
            rank=rank,
            world_size=world,
        )
    except torch.OutOfMemoryError:
        total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 0.0
        raise ParamsError(
            f"train.batch_size = {tp.batch_size} with patch {list(patch)} ({tp.network}, channels {list(tp.channels)}) "
            f"ran out of GPU memory ({total:.1f} GiB on {device}); lower train.batch_size or train.patch_size"
        ) from None
    if rank != 0:
        return StageResult(STAGE, True, {"rank": rank})
    folder = SEGMENTER.at(ws)
    seg_config = SegmenterConfig(
        network=config,
        label_values=values,
        label_names=label_names(ws, values),
        target_spacing=plan.target_spacing,
        normalization=plan.normalization,
        plan_hash=plan.plan_hash,
        modalities=tuple(plan.modalities),
    )
    save_segmenter(folder, network, seg_config, bundle_metadata(seg_config, params, split))
    summary = {
        "network": tp.network,
        "parameters": parameter_count(network),
        "patch_size": list(patch),
        "steps": tp.steps,
        "steps_done": outcome.steps_done,
        "resumed_from": outcome.resumed_from,
        "stopped_early": outcome.stopped_early,
        "final_loss": outcome.history[-1]["loss"] if outcome.history else None,
        "last_val_dice": outcome.validations[-1]["val_dice"] if outcome.validations else None,
        "best_val_dice": max((v["val_dice"] for v in outcome.validations), default=None),
        "n_train": len(split.train),
        "n_val": len(split.val),
        "n_synthetic": len(synthetic),
        "device": str(device),
        "world_size": world,
        "cpu_threads": torch.get_num_threads(),
        "amp": str(amp_dtype(tp.amp, device)).replace("torch.", "") if amp_dtype(tp.amp, device) else "off",
        "patches_per_s": round(outcome.patches_per_s, 2),
        "seconds": round(outcome.seconds, 2),
        "run_key": key,
        "model_sha256": sha256_file(folder / "model.safetensors"),
    }
    _write_curves(ws, outcome.history)
    write_stage_summary(ws, STAGE, summary)
    return _result(ws, summary)


def _result(ws: Workspace, summary: dict[str, Any]) -> StageResult:
    outputs = {
        "model": SEGMENTER.path,
        "curves": TRAIN_CURVES_PNG.path,
        "curves_data": TRAIN_CURVES.path,
        "summary": summary_artifact(STAGE).path,
    }
    return StageResult(STAGE, True, summary, outputs)


def _make_validator(
    store: Path, val: tuple[str, ...], patch: tuple[int, int, int], values: tuple[int, ...], params: Params, device: Any
) -> Any:
    from lesionflow.seg.inference import probabilities_to_labels, sliding_window_predict
    from lesionflow.seg.training import amp_dtype
    from lesionflow.store.zarr_store import read_case

    cases = {c: read_case(store, c) for c in val}  # small: validation cases stay in memory between rounds

    def validate(network: Any) -> float:
        scores = []
        for arrays in cases.values():
            probs = sliding_window_predict(
                network,
                arrays.image.astype(np.float32),
                patch,
                overlap=params.train.sw_overlap,
                sw_batch_size=2,
                device=device,
                amp_dtype=amp_dtype(params.train.amp, device),
            )
            pred = probabilities_to_labels(probs, values)
            truth = arrays.label if arrays.label is not None else np.zeros(pred.shape, np.uint8)
            scores.append(_mean_foreground_dice(pred, truth, values))
        return float(np.mean(scores))

    return validate


def _synthetic_cases(ws: Workspace, params: Params) -> list[Any]:
    from lesionflow.seg.patches import index_cases

    if not params.train.synthetic_store:
        if params.train.synthetic_ratio > 0:
            raise ParamsError(
                f"train.synthetic_ratio = {params.train.synthetic_ratio} but train.synthetic_store is empty; "
                f"set the store (e.g. {SYNTHETIC_STORE.path}) or the ratio to 0"
            )
        return []

    root = ws.path(params.train.synthetic_store)
    # only a verdict on the store's current content admits samples; rejected ones never reach the segmenter
    ids = synthetic_samples_used(root, params.train.synthetic_store)
    if not ids:
        raise SourceError(
            f"train.synthetic_store = {params.train.synthetic_store!r} holds no complete (accepted) cases; run "
            "`lesionflow stage synthesize` and `validate-synthetic`, or set train.synthetic_ratio=0"
        )
    return index_cases(root, ids, seed=segmenter_seed(params))


def _init_distributed(device_setting: str) -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        import torch

        backend = "nccl" if torch.cuda.is_available() and device_setting != "cpu" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def _write_curves(ws: Workspace, history: list[dict[str, float]]) -> None:
    from lesionflow.seg.plots import training_curves_png

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["step", "loss", "lr", "val_dice"], lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in ("step", "loss", "lr", "val_dice")})
    write_text_if_changed(TRAIN_CURVES.at(ws), buffer.getvalue())
    training_curves_png(history, TRAIN_CURVES_PNG.at(ws))


def bundle_metadata(config: Any, params: Params, split: Splits) -> dict[str, Any]:
    """MONAI-bundle-style metadata.json: data formats, spacing, labels, versions, intended use."""
    import monai
    import torch

    from lesionflow import __version__

    net = config.network
    channel_def = {str(i): m for i, m in enumerate(config.modalities)}
    return {
        "schema": "lesionflow-metadata/1 (after MONAI bundle metadata.json)",
        "version": CODE_VERSION,
        "lesionflow_version": __version__,
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "task": "3D lesion segmentation",
        "description": f"{net.network} trained by lesionflow on {len(split.train)} cases ({len(split.val)} val)",
        "intended_use": params.registry.intended_use,
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "+".join(config.modalities),
                    "num_channels": net.in_channels,
                    "channel_def": channel_def,
                    "spatial_shape": list(net.patch_size),
                    "dtype": "float32",
                    "value_range": "normalized per plans.json (z-score or CT clip + z-score)",
                    "is_patch_data": True,
                    "axis_order": "channel, x, y, z (RAS+)",
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": net.out_channels,
                    "channel_def": {str(i): config.label_names[str(v)] for i, v in enumerate(config.label_values)},
                    "label_values": list(config.label_values),
                    "spatial_shape": list(net.patch_size),
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                }
            },
        },
        "spacing_mm": list(config.target_spacing),
        "preprocessing": config.normalization,
        "plan_hash": config.plan_hash,
        "labels": config.label_names,
    }


if __name__ == "__main__":  # torchrun entry: python -m lesionflow.stages.train <workspace> <params json>
    import json as _json

    from lesionflow.params import validate_params

    _params = validate_params(_json.loads(sys.argv[2]))
    with cpu_threads(_params.train.cpu_threads):
        train_in_process(Workspace.at(sys.argv[1]), _params)
