"""Seeds derived from explicit inputs: (global seed, what, case, index, ...) -> one reproducible stream.

No global RNG is ever touched. Strings (case ids, purposes) are hashed to 32-bit words, so the same
inputs give the same stream on every machine, in every Dask worker and after every retry.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def _word(part: int | str) -> int:
    if isinstance(part, bool) or not isinstance(part, (int, str)):
        raise TypeError(f"seed parts must be int or str, got {type(part).__name__}")
    if isinstance(part, int):
        if part < 0:
            raise ValueError(f"seed parts must be >= 0, got {part}")
        return part
    return int.from_bytes(hashlib.sha256(part.encode()).digest()[:4], "little")


def seed_sequence(*parts: int | str) -> np.random.SeedSequence:
    """A numpy SeedSequence over the parts (ints as they are, strings hashed)."""
    return np.random.SeedSequence([_word(p) for p in parts])


def rng_for(*parts: int | str) -> np.random.Generator:
    """A numpy Generator for exactly these parts, e.g. ``rng_for(seed, "patch", item_index)``."""
    return np.random.default_rng(seed_sequence(*parts))


def derive_seed(*parts: int | str) -> int:
    """A 63-bit int seed for APIs that want one (torch, MONAI), derived from the parts."""
    low, high = (int(w) for w in seed_sequence(*parts).generate_state(2, dtype=np.uint32))
    return (low | high << 32) >> 1


def torch_generator(*parts: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded from the parts (per sample: same parts, same noise)."""
    import torch  # lazily: the CLI imports this module and must not pay for torch

    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(*parts))
    return gen
