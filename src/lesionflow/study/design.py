"""The utility study's grid: nested real fractions of the training split, arms, seeds, and one key per cell.

Contracts:
- ``nested_subsets`` draws one seeded permutation of the (sorted) training cases and takes prefixes, so the subset
  of a smaller fraction is always inside the subset of a larger one, and the same inputs give the same subsets.
  Cases with lesions are interleaved with lesion-free ones so every subset keeps the split's lesion share; a
  subset holds at least ``min_cases`` cases with lesions or the fraction is refused with one line.
- A cell is (arm, fraction, seed). Its key digests everything that shapes its result: the arm's settings, the
  subset (by case id and content digest), the seed and the code version; adding a seed or an arm adds cells
  and leaves the keys of the others unchanged (they are served from their records).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lesionflow.errors import ParamsError
from lesionflow.hashing import sha256_json
from lesionflow.params import StudyArm
from lesionflow.seeding import rng_for

# Each arm is a value of one setting (not a subclass, params.StudyArm): what fills the synthetic share of the
# training patches. params.StudyParams refuses unknown arms and a grid without "real".
ARMS: dict[StudyArm, str] = {
    "real": "real patches only (the baseline every other arm is paired with)",
    "copies": "the synthetic share filled with unmodified real lesion patches (controls for foreground frequency)",
    "copy-paste": "real lesions pasted at new positions inside the organ with the exact paste (non-learned baseline)",
    "repaint": "lesions inserted by the RePaint DDPM (synth.method ddpm)",
    "lefusion": "real lesions re-textured by LeFusion",
    "lefusion+diffmask": "re-textured real lesions plus new DiffMask lesions",
}


def nested_subsets(
    cases: Mapping[str, bool], fractions: Sequence[float], seed: int, *, min_cases: int = 2
) -> dict[float, tuple[str, ...]]:
    """fraction -> sorted case ids; ``cases`` maps each training case id to whether it holds a lesion.

    The subset of fraction f holds ceil(f * n) cases (at least ``min_cases`` with lesions), taken as a prefix of one
    seeded order that alternates lesion and lesion-free cases in proportion, so smaller subsets are nested in larger.
    """
    if not cases:
        raise ParamsError("the training split is empty: nothing to draw study fractions from")
    for f in fractions:
        if not 0 < f <= 1:
            raise ParamsError(f"study.fractions: {f} is not in (0, 1]; use e.g. [0.25, 0.5, 1.0]")
    ids = sorted(cases)
    rng = rng_for(seed, "study-subsets")
    with_lesion = [ids[i] for i in rng.permutation(len(ids)) if cases[ids[i]]]
    without = [c for c in (ids[i] for i in rng.permutation(len(ids))) if not cases[c]]
    order = _interleave(with_lesion, without)
    out: dict[float, tuple[str, ...]] = {}
    for f in sorted(set(fractions)):
        n = max(1, math.ceil(f * len(order)))
        subset = order[:n]
        n_lesion = sum(cases[c] for c in subset)
        if n_lesion < min_cases:
            raise ParamsError(
                f"study.fractions: {f} keeps {n} training case(s), {n_lesion} with lesions; at least {min_cases} "
                "with lesions are needed (generators and validation): raise the fraction or add cases"
            )
        out[f] = tuple(sorted(subset))
    return out


def _interleave(a: list[str], b: list[str]) -> list[str]:
    """a and b merged so that every prefix holds them in about their overall proportion (a first)."""
    out: list[str] = []
    i = j = 0
    total = len(a) + len(b)
    for k in range(1, total + 1):
        want_a = math.ceil(k * len(a) / total)
        if i < want_a or j >= len(b):
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    return out


@dataclass(frozen=True)
class Cell:
    """One training run of the study: an arm at a real fraction with a segmenter seed."""

    arm: str
    fraction: float
    seed: int

    @property
    def cell_id(self) -> str:
        """``<arm>@<fraction %>#<seed>``, e.g. ``lefusion@025#1``: a folder name, a table key."""
        return f"{self.arm}@{round(self.fraction * 100):03d}#{self.seed}"


def grid(arms: Sequence[str], fractions: Sequence[float], seeds: Sequence[int]) -> list[Cell]:
    """Every cell, fraction-major (generators are trained once per fraction), then arm, then seed."""
    return [Cell(a, f, s) for f in sorted(set(fractions)) for a in arms for s in seeds]


def cell_key(cell: Cell, subset_digest: str, arm_settings: Mapping[str, Any], code_version: str) -> str:
    """What shapes the cell's result; equal keys mean its recorded result can be reused."""
    return sha256_json(
        {
            "arm": cell.arm,
            "fraction": cell.fraction,
            "seed": cell.seed,
            "subset": subset_digest,
            "settings": dict(arm_settings),
            "code": code_version,
        }
    )
