"""Whole-volume inference: gaussian-blended sliding windows, argmax to label values, and the way back to raw.

Array contract:

* Input image: channel-first ``(c, x, y, z)`` float32 in normalized intensity units on the preprocessed
  (RAS, resampled) grid, exactly what :func:`lesionflow.preprocess.ops.preprocess_arrays` returns.
* Network: the :mod:`lesionflow.seg.networks` contract, ``(batch, c, x, y, z)`` -> ``(batch, n_classes, x,
  y, z)`` logits; channel ``k`` is label value ``label_values[k]`` (channel 0 = background = value 0).
* Probabilities: ``(n_classes, x, y, z)`` float32 in [0, 1], summing to 1 over channels (softmax of the
  gaussian-blended logits, as nnU-Net v2 blends logits before the softmax).
* Labels: ``(x, y, z)`` uint8 holding label values (not channel indices).

Raw-grid labels are obtained by inverting the *labels* with nearest-neighbour sampling
(``invert_to_raw(labels, record, order=0)``), not by resampling probabilities (``order=1``) and taking the
argmax. Reasons: it is exact wherever preprocessing did not resample (flips, permutations and the crop are
undone voxel for voxel, so ground truth round-trips bit for bit); it needs one uint8 volume instead of
``n_classes`` float volumes on the raw grid (raw CT grids are the largest arrays of the pipeline); and it is
the same operation the evaluation applies to labels everywhere else. The cost is blockier boundaries when
the raw grid is finer than the preprocessed one (nnU-Net resamples probabilities instead); metrics are
computed on the preprocessed grid, so this affects only the exported raw-grid masks. Voxels outside the
preprocessing crop get label 0 (background).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lesionflow.preprocess.geometry import PreprocessRecord, invert_to_raw


@dataclass(frozen=True)
class Prediction:
    """Labels of one case: ``processed`` ``(x, y, z)`` uint8 on the preprocessed grid; ``raw`` ``(i, j, k)``
    uint8 on the raw grid (voxel geometry = ``record.raw_affine``), or None when no record was given."""

    processed: np.ndarray
    raw: np.ndarray | None


def _check_patch(patch_size: Sequence[int]) -> tuple[int, int, int]:
    if len(patch_size) != 3 or any(int(p) <= 0 for p in patch_size):
        raise ValueError(f"patch_size {tuple(patch_size)}: expected three positive voxel counts (x, y, z)")
    return int(patch_size[0]), int(patch_size[1]), int(patch_size[2])


def sliding_window_predict(
    network: torch.nn.Module,
    image: np.ndarray,
    patch_size: tuple[int, int, int],
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Softmax probabilities ``(n_classes, x, y, z)`` float32 (CPU) for a ``(c, x, y, z)`` float32 image.

    MONAI ``sliding_window_inference`` with ``patch_size`` windows overlapping by ``overlap`` (fraction in
    [0, 1)), gaussian blending of the logits (sigma 1/8 of the window), then a softmax over channels.
    Volumes smaller than the window along an axis are zero-padded (0 = the normalized mean) and the output
    is cropped back to the input's spatial shape. Runs under ``torch.inference_mode()`` with the network in
    eval mode (its previous train/eval mode is restored afterwards); the network is moved to ``device``
    (a no-op when it is already there). ``amp_dtype`` (e.g. ``torch.bfloat16``) enables autocast on CUDA
    only; it is ignored on the CPU, where results are deterministic (same input -> same bytes).
    """
    from monai.inferers import sliding_window_inference

    roi = _check_patch(patch_size)
    if image.ndim != 4 or min(image.shape) == 0:
        raise ValueError(f"image of shape {image.shape}: expected a non-empty channel-first (c, x, y, z)")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap {overlap}: expected a fraction in [0, 1)")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size {sw_batch_size}: expected at least 1")
    dev = torch.device(device)
    use_amp = amp_dtype is not None and dev.type == "cuda"
    autocast: Any = torch.autocast(device_type="cuda", dtype=amp_dtype) if use_amp else nullcontext()

    was_training = network.training
    network.to(dev)
    network.eval()
    try:
        inputs = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(dev)
        with torch.inference_mode(), autocast:
            logits = sliding_window_inference(
                inputs,
                roi_size=roi,
                sw_batch_size=sw_batch_size,
                predictor=network,
                overlap=overlap,
                mode="gaussian",
                padding_mode="constant",
                cval=0.0,
                sw_device=dev,
                device=dev,
            )
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"network returned {type(logits).__name__}: expected one logits tensor (eval mode)")
        probs = torch.softmax(logits.float(), dim=1)[0]
        return np.ascontiguousarray(probs.cpu().numpy(), dtype=np.float32)
    finally:
        network.train(was_training)


def probabilities_to_labels(probs: np.ndarray, label_values: Sequence[int]) -> np.ndarray:
    """Argmax over the channels of ``(n_classes, x, y, z)``, mapped to ``label_values`` (uint8 ``(x, y, z)``).

    Channel ``k`` is label value ``label_values[k]`` (values need not be contiguous, e.g. ``[0, 2, 5]``);
    ties go to the lowest channel index (numpy's argmax).
    """
    values = [int(v) for v in label_values]
    if probs.ndim != 4 or probs.shape[0] != len(values):
        raise ValueError(
            f"probabilities of shape {probs.shape}: expected (n_classes, x, y, z) with n_classes = {len(values)} "
            f"(label_values {values})"
        )
    if any(not 0 <= v <= 255 for v in values) or len(set(values)) != len(values):
        raise ValueError(f"label_values {values}: expected distinct integers in 0..255")
    lookup = np.asarray(values, dtype=np.uint8)
    return np.ascontiguousarray(lookup[np.argmax(probs, axis=0)])


def predict_case(
    network: torch.nn.Module,
    image: np.ndarray,
    patch_size: tuple[int, int, int],
    label_values: Sequence[int],
    record: PreprocessRecord | None,
    **sw_kwargs: Any,
) -> Prediction:
    """Labels of one preprocessed case ``(c, x, y, z)`` on its own grid and, given ``record``, on the raw grid.

    ``sw_kwargs`` go to :func:`sliding_window_predict` (overlap, sw_batch_size, device, amp_dtype). The raw
    labels are ``invert_to_raw(labels, record, order=0)`` (see the module docstring for why labels, not
    probabilities, are inverted); their shape is exactly ``record.raw_shape``.
    """
    if record is not None and tuple(image.shape[1:]) != record.final_shape:
        raise ValueError(f"image of shape {image.shape}: expected spatial shape {record.final_shape} from its record")
    probs = sliding_window_predict(network, image, patch_size, **sw_kwargs)
    labels = probabilities_to_labels(probs, label_values)
    raw = invert_to_raw(labels, record, order=0) if record is not None else None
    return Prediction(processed=labels, raw=raw)
