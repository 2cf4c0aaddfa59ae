"""Synthetic demo datasets in Medical Segmentation Decathlon layout.

``build_demo_dataset("brain-mri", ...)`` deforms the MNI152 template into a pseudo-cohort with edema and
enhancing lesions; ``build_demo_dataset("chest-ct", ...)`` draws a procedural chest CT in HU with lung
nodules. Both write images, labels and an organ mask per case (see :mod:`lesionflow.demo.msd`).

Determinism: the output bytes depend only on ``(kind, cases, seed, size, test_fraction)``. Case ``i`` draws
from ``default_rng(SeedSequence([seed, kind_index, i]))``; the split and the lesion-free set draw from
``default_rng(SeedSequence([seed, kind_index]))``. There is no global RNG and no clock.

Every third case (``i % 3 == 2``) is stored in another voxel orientation (brain: LAS, chest: LPS) with the
same world geometry, so downstream code must honour the affine rather than assume RAS arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

import numpy as np

from lesionflow.demo import brain_mri, chest_ct, msd
from lesionflow.errors import ParamsError

__all__ = ["DEMO_KINDS", "DemoCase", "DemoResult", "build_demo_dataset"]

DEMO_KINDS: tuple[str, ...] = ("brain-mri", "chest-ct")
_MODULES: dict[str, ModuleType] = {"brain-mri": brain_mri, "chest-ct": chest_ct}
LESION_FREE_FRACTION = 0.25


@dataclass(frozen=True)
class DemoCase:
    """One generated case: id, split and voxel count per lesion label (all foreground labels, zeros kept)."""

    case_id: str
    split: Literal["train", "test"]
    lesion_voxels: dict[int, int]


@dataclass(frozen=True)
class DemoResult:
    """What :func:`build_demo_dataset` wrote: the folder, the kind, the cases (by index) and dataset.json."""

    out: Path
    kind: str
    cases: tuple[DemoCase, ...]
    dataset_json: Path


def _check_args(kind: str, cases: int, seed: int, size: int | None, test_fraction: float) -> None:
    if kind not in DEMO_KINDS:
        raise ParamsError(f"demo kind {kind!r} is unknown; expected one of {', '.join(DEMO_KINDS)}")
    if isinstance(cases, bool) or not isinstance(cases, int) or cases < 2:
        raise ParamsError(f"demo cases={cases!r} is too few; expected an integer >= 2 (one train and one test case)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ParamsError(f"demo seed={seed!r} is invalid; expected an integer >= 0")
    low = _MODULES[kind].MIN_SIZE
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < low):
        raise ParamsError(
            f"demo size={size!r} is invalid for {kind}; expected an integer >= {low} (longest edge, voxels)"
        )
    if not 0.0 < test_fraction < 1.0:
        raise ParamsError(f"demo test_fraction={test_fraction!r} is invalid; expected a number in (0, 1)")


def plan_cases(cases: int, rng: np.random.Generator, test_fraction: float) -> tuple[list[bool], list[bool]]:
    """(is_test, lesion_free) flags per case index, drawn from ``rng``.

    ``round(cases * test_fraction)`` test cases, clamped to ``[1, cases - 1]``; ``round(cases / 4)`` lesion-free
    cases, at least one when ``cases >= 3``. The first test case picked is a lesion case, so a test split never
    consists of lesion-free cases only (metrics on it would be degenerate).
    """
    n_test = min(max(round(cases * test_fraction), 1), cases - 1)
    n_free = max(round(cases * LESION_FREE_FRACTION), 1 if cases >= 3 else 0)
    lesion_free = [False] * cases
    for i in rng.permutation(cases)[:n_free]:
        lesion_free[int(i)] = True
    order = [int(i) for i in rng.permutation(cases)]
    first = next(i for i in order if not lesion_free[i])
    picked = [first, *[i for i in order if i != first][: n_test - 1]]
    is_test = [i in picked for i in range(cases)]
    return is_test, lesion_free


def build_demo_dataset(
    kind: str,
    cases: int,
    out: Path,
    seed: int,
    *,
    size: int | None = None,
    test_fraction: float = 0.25,
    progress: Callable[[int, int], None] | None = None,
) -> DemoResult:
    """Generate ``cases`` synthetic cases of ``kind`` into ``out`` (MSD layout) and return what was written.

    ``size`` is the longest spatial edge in voxels (default: brain 64, chest 80). ``progress(done, total)``
    is called after each case. Raises :class:`ParamsError` for invalid arguments; files are overwritten
    in place on a rerun (see :mod:`lesionflow.demo.msd`).
    """
    _check_args(kind, cases, seed, size, test_fraction)
    module = _MODULES[kind]
    kind_index = DEMO_KINDS.index(kind)
    size = module.DEFAULT_SIZE if size is None else size
    if kind == "brain-mri":
        brain_mri.template_dir()  # fail before touching ``out`` when the template is missing
    out = Path(out)
    is_test, lesion_free = plan_cases(
        cases, np.random.default_rng(np.random.SeedSequence([seed, kind_index])), test_fraction
    )
    msd.begin(out)
    training: list[dict[str, str]] = []
    test: list[dict[str, str]] = []
    results: list[DemoCase] = []
    for index in range(cases):
        case_id = f"{module.CASE_PREFIX}_{index:03d}"
        split: Literal["train", "test"] = "test" if is_test[index] else "train"
        rng = np.random.default_rng(np.random.SeedSequence([seed, kind_index, index]))
        volumes = module.synthesize(rng, size, lesions=not lesion_free[index])
        if index % 3 == 2:  # exercise orientation handling downstream; world content is unchanged
            volumes = volumes.reoriented(module.STORED_ORIENTATION)
        entry = msd.write_case(out, case_id, split, volumes)
        (test if split == "test" else training).append(entry)
        counts = np.bincount(volumes.label.array.ravel(), minlength=len(module.META["labels"]))
        results.append(DemoCase(case_id, split, {lab: int(counts[lab]) for lab in range(1, len(counts))}))
        if progress is not None:
            progress(index + 1, cases)
    msd.remove_stale(out, module.CASE_PREFIX, {p for e in training + test for p in e.values()})
    dataset_json = msd.write_dataset_json(out, module.META, training, test)
    return DemoResult(out=out, kind=kind, cases=tuple(results), dataset_json=dataset_json)
