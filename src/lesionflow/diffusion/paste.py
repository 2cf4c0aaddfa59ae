"""The final hard paste: outside the generation mask the output *is* the original (generative.md §9.1, §9.7.1)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_mask_shape", "hard_paste", "paste_dtype"]


def check_mask_shape(mask: Tensor, target: Tensor) -> None:
    """Raise ValueError unless ``mask`` broadcasts to ``target``'s shape (without enlarging it)."""
    try:
        ok = torch.broadcast_shapes(mask.shape, target.shape) == target.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not broadcast to {tuple(target.shape)}")


def paste_dtype(generated: torch.dtype, original: torch.dtype) -> torch.dtype:
    """The output dtype of :func:`hard_paste`: the promoted dtype, widened until ``original`` fits exactly.

    Float originals promote losslessly on their own; integer originals need enough mantissa bits
    (int8/uint8/bool: any float; int16/uint16: float32; wider: float64, exact for ``|v| <= 2**53``).
    """
    out = torch.promote_types(generated, original)
    if original.is_floating_point or not out.is_floating_point:
        return out
    bits = torch.iinfo(original).bits if original != torch.bool else 1
    if bits > 8 and out in (torch.float16, torch.bfloat16):
        out = torch.float32
    if bits > 16 and out == torch.float32:
        out = torch.float64
    return out


def hard_paste(generated: Tensor, original: Tensor, mask: Tensor) -> Tensor:
    """``out = generated`` where ``mask != 0`` (generate), ``out = original`` bit for bit where ``mask == 0``.

    Call it in the units the caller wants to keep exact: the pipeline pastes into the *original* array
    (HU for CT, raw intensities for MR) after mapping the generated patch back from normalised units,
    never in the normalised [-1, 1] space, so the background makes no float round trip (§9.7 item 1).
    ``mask`` follows our convention (1 = generated voxel; RePaint's mask files use the opposite, 255 = keep)
    and must broadcast to ``original``. The output dtype is :func:`paste_dtype`; where that is wider than
    ``original``, casting the output back to ``original.dtype`` restores the background bytes exactly.
    """
    # 1. shapes: generated and original are the same array in two versions; the mask may broadcast
    if generated.shape != original.shape:
        raise ValueError(f"generated shape {tuple(generated.shape)} != original shape {tuple(original.shape)}")
    check_mask_shape(mask, original)
    # 2. out = M ⊙ gen + (1 - M) ⊙ x0, as a select (no arithmetic touches the kept voxels, NaN-safe)
    dtype = paste_dtype(generated.dtype, original.dtype)
    generate = (mask != 0).to(original.device)
    out = torch.where(generate, generated.to(device=original.device, dtype=dtype), original.to(dtype))
    # 3. guard: the kept voxels must survive the cast back to the original dtype unchanged
    keep = ~generate.expand(original.shape)
    if not torch.equal(out[keep].to(original.dtype), original[keep]):
        raise RuntimeError(f"pasting {original.dtype} through {dtype} is not exact")
    return out
