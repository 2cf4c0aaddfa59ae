"""Final hard paste: the kept voxels are the original, bit for bit (generative.md §9.7 item 1)."""

from __future__ import annotations

import pytest
import torch

from lesionflow.diffusion.paste import hard_paste, paste_dtype
from lesionflow.seeding import torch_generator


def _case(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch_generator(0, "paste", str(dtype))
    original = torch.randint(-1024, 3072, (1, 1, 12, 12, 12), generator=gen).to(dtype)
    generated = torch.randn(original.shape, generator=gen) * 500.0
    mask = torch.zeros(original.shape)
    mask[..., 3:8, 2:9, 4:10] = 1.0
    return generated, original, mask


def test_hu_values_in_float32_bitwise() -> None:
    generated, original, mask = _case(torch.float32)
    out = hard_paste(generated, original, mask)
    keep = mask == 0
    assert out.dtype == torch.float32
    assert torch.equal(out[keep].view(torch.int32), original[keep].view(torch.int32))
    assert torch.equal(out[~keep], generated[~keep])


def test_int16_original_widened_exactly() -> None:
    generated, original, mask = _case(torch.int16)
    out = hard_paste(generated.half(), original, mask)  # float16 cannot hold 3071; the paste widens
    assert out.dtype == torch.float32
    assert torch.equal(out.to(torch.int16)[mask == 0], original[mask == 0])
    assert paste_dtype(torch.float32, torch.int32) == torch.float64
    assert paste_dtype(torch.float16, torch.uint8) == torch.float16


def test_float16_input_bitwise() -> None:
    generated, original, mask = _case(torch.float16)
    keep = mask == 0
    out32 = hard_paste(generated, original, mask)  # float32 generated, float16 original
    assert out32.dtype == torch.float32
    assert torch.equal(out32.half()[keep].view(torch.int16), original[keep].view(torch.int16))
    out16 = hard_paste(generated.half(), original, mask)
    assert out16.dtype == torch.float16
    assert torch.equal(out16[keep].view(torch.int16), original[keep].view(torch.int16))


def test_broadcast_mask_bool_and_nan_safe() -> None:
    generated, original, _ = _case(torch.float32)
    generated[..., 0, 0, 0] = float("nan")  # outside the mask below: must not leak
    mask = torch.zeros(12, 12, 12, dtype=torch.bool)
    mask[6:, :, :] = True
    out = hard_paste(generated, original, mask)
    assert torch.equal(out[..., :6, :, :], original[..., :6, :, :])
    assert torch.equal(out[..., 6:, :, :], generated[..., 6:, :, :])


def test_empty_and_full_mask() -> None:
    generated, original, mask = _case(torch.float32)
    assert torch.equal(hard_paste(generated, original, torch.zeros_like(mask)), original)
    assert torch.equal(hard_paste(generated, original, torch.ones_like(mask)), generated)


def test_shape_errors() -> None:
    generated, original, mask = _case(torch.float32)
    with pytest.raises(ValueError, match="generated shape"):
        hard_paste(generated[..., :-1], original, mask)
    with pytest.raises(ValueError, match="mask shape"):
        hard_paste(generated, original, mask[..., :5])
