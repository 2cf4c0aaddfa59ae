"""The utility study's grid: nested real fractions of the training split, arms, seeds, and one key per cell.

Contracts:
- ``nested_subsets`` draws one seeded permutation of the (sorted) training cases and takes prefixes, so the subset
  of a smaller fraction is always inside the subset of a larger one, and the same inputs give the same subsets.
  Cases with lesions are interleaved with lesion-free ones so every subset keeps the split's lesion share; a
  subset holds at least ``min_cases`` cases with lesions or the fraction is refused with one line.
- A cell is (arm, fraction, seed, synthetic ratio). The cell's stages run through the pipeline's cache in a
  workspace of their own, so what shapes its result (subset, arm settings, seed, budget, code) is its stages'
  cache keys: adding a seed, an arm or a dose adds cells and leaves the others to be served from their records.
- An arm is a value of one setting: ``ARM_SYNTH`` is what each synthetic arm sets in the synth section, and
  ``arm_of_synth`` reads it back (the synthetic gate uses it to find the study row of the data it is judging).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lesionflow.errors import ParamsError
from lesionflow.params import StudyArm
from lesionflow.params_synth import SynthParams
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


# What each synthetic arm changes in the synth section (one setting per arm, not a subclass per arm), and the
# generators it needs. "real" and "copies" synthesize nothing.
ARM_SYNTH: dict[StudyArm, dict[str, Any]] = {
    "lefusion": {"method": "lefusion", "generators": ["lefusion"], "new_per_case": 0, "remove_per_case": 0},
    "lefusion+diffmask": {"method": "lefusion", "generators": ["lefusion", "diffmask"], "remove_per_case": 0},
    "repaint": {"method": "ddpm", "generators": ["ddpm"], "relesion_per_case": 0, "remove_per_case": 0},
    "copy-paste": {"method": "copy-paste", "generators": [], "relesion_per_case": 0, "remove_per_case": 0},
}


def arm_generators(arms: Sequence[StudyArm]) -> list[str]:
    """The generators the arms need, in first-use order."""
    names: list[str] = []
    for arm in arms:
        for name in ARM_SYNTH.get(arm, {}).get("generators", []):
            if name not in names:
                names.append(name)
    return names


def arm_of_synth(synth: SynthParams) -> StudyArm | None:
    """The study arm whose samples these synth settings make (None for PIE trajectories: not a study arm)."""
    if synth.method == "copy-paste":
        return "copy-paste"
    if synth.method == "ddpm":
        return "repaint"
    if synth.method == "lefusion":
        new_lesions = "diffmask" in synth.generators and synth.new_per_case > 0
        return "lefusion+diffmask" if new_lesions else "lefusion"
    return None


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
    """One training run of the study: an arm at a real fraction with a segmenter seed and a synthetic ratio
    (the share of training patches drawn from the arm's synthetic data; 0 for ``real``)."""

    arm: str
    fraction: float
    seed: int
    ratio: float = 0.0
    dose: bool = False  # a point of the dose series (not the study's main synthetic_ratio)

    @property
    def cell_id(self) -> str:
        """``<arm>@<fraction %>#<seed>``, e.g. ``lefusion@025#1``; a dose cell adds ``x<ratio %>``: a table key."""
        dose = f"x{round(self.ratio * 100):03d}" if self.dose else ""
        return f"{self.arm}{dose}@{round(self.fraction * 100):03d}#{self.seed}"

    @property
    def folder(self) -> str:
        """Where the cell's workspace lives below its fraction's: ``cells/<arm>[/x<ratio %>]/seed<N>``."""
        dose = f"/x{round(self.ratio * 100):03d}" if self.dose else ""
        return f"cells/{self.arm}{dose}/seed{self.seed}"


def grid(
    arms: Sequence[str],
    fractions: Sequence[float],
    seeds: Sequence[int],
    ratio: float = 0.25,
    dose_ratios: Sequence[float] = (),
) -> list[Cell]:
    """Every cell, fraction-major (generators are trained once per fraction), then arm, then seed.

    Each synthetic arm (not ``real``) trains at ``ratio``; at the smallest fraction (where synthetic data is meant
    to help, and where a dose series costs least) it also trains at each of ``dose_ratios`` other than ``ratio``.
    """
    ordered = sorted(set(fractions))
    cells: list[Cell] = []
    for f in ordered:
        for a in arms:
            cells += [Cell(a, f, s, 0.0 if a == "real" else ratio) for s in seeds]
            if a != "real" and f == ordered[0]:
                doses = sorted({r for r in dose_ratios if r != ratio})
                cells += [Cell(a, f, s, r, dose=True) for r in doses for s in seeds]
    return cells
