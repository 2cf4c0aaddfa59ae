"""A tiny segmentation dataset for training-loop tests: item i is a 16³ patch with a bright cube labelled 1."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset


class CubePatches(Dataset[dict[str, Any]]):
    """Item i: image (1, 16, 16, 16) float32 noise with a +3 cube, label (1, 16, 16, 16) int64; deterministic in i."""

    def __len__(self) -> int:
        return 10_000

    def __getitem__(self, i: int) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(i)
        image = torch.randn(1, 16, 16, 16, generator=gen)
        label = torch.zeros(1, 16, 16, 16, dtype=torch.int64)
        lo = int(torch.randint(2, 8, (1,), generator=gen))
        label[:, lo : lo + 6, lo : lo + 6, lo : lo + 6] = 1
        image[label.bool()] += 3.0
        return {"image": image, "label": label}
