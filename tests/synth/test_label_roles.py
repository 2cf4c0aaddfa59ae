"""Which label values are lesions (issue 19 item 10): declared roles, and organ-sized or speck "lesions" refused."""

from __future__ import annotations

import numpy as np
import pytest

from lesionflow.errors import ParamsError
from lesionflow.synth.rois import LesionCensus, label_roles

SHAPE = (34, 26, 20)


def _brain(seed: int, *, specks: int = 0, lesion: bool = False) -> np.ndarray:
    """Label 1 = a whole-brain ellipsoid (~30% of the volume); value 3 = ``specks`` 2x2x1 / 3x2x1 noise specks
    beside it (like issue 19's: each a component of its own, none at the border); value 2 = a radius-3 lesion
    sphere inside the brain when ``lesion``."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1).astype(np.float32)
    label = np.zeros(SHAPE, np.uint8)
    label[(((grid - np.array([12.5, 12.5, 9.5])) / np.array([12.0, 12.0, 9.0])) ** 2).sum(-1) <= 1.0] = 1
    if lesion:
        label[np.linalg.norm(grid - np.array([8.0, 12.0, 10.0]), axis=-1) <= 3.0] = 2
    rng = np.random.default_rng(seed)
    for k in range(specks):
        x, y, z = 27 + 3 * (k % 2), 4 + 6 * (k // 2), int(rng.integers(4, 16))
        label[x : x + 2 + (k % 2), y : y + 2, z] = 3
    return label


def test_roles_default_to_every_value_and_follow_the_declaration() -> None:
    assert label_roles((0, 1, 2), (), ()).lesion == (1, 2)
    roles = label_roles((0, 1, 2, 3), (2,), (1,))
    assert (roles.lesion, roles.organ) == ((2,), (1,))
    label = _brain(0, specks=2, lesion=True)
    assert set(np.unique(roles.lesion_map(label))) == {0, 2}
    organ = roles.organ_map(label)
    assert organ is not None
    assert organ.sum() == np.isin(label, (1, 2)).sum()  # the organ holds its lesions; the specks (3) lie inside
    assert label_roles((0, 1, 2), (), ()).organ_map(label) is None
    assert label_roles((0, 1, 2, 3), (), (1,)).lesion == (2, 3)  # undeclared lesions: every non-organ value


@pytest.mark.parametrize(
    ("lesion", "organ", "message"),
    [
        ((2,), (2,), r"label value 2 is in both synth\.lesion_labels and synth\.organ_labels"),
        ((5,), (), r"synth\.lesion_labels names label value 5.*the plan's label values are \[1, 2\]"),
        ((), (7,), r"synth\.organ_labels names label value 7"),
        ((), (1, 2), r"no lesion label value left.*synth\.lesion_labels"),
    ],
)
def test_bad_declarations_are_one_line(lesion: tuple[int, ...], organ: tuple[int, ...], message: str) -> None:
    with pytest.raises(ParamsError, match=message) as info:
        label_roles((0, 1, 2), lesion, organ)
    assert "\n" not in str(info.value)


def test_a_whole_brain_label_is_organ_sized_and_names_the_value_the_cases_and_the_key() -> None:
    census = LesionCensus(min_voxels=4)
    for seed in range(3):
        census.add(label_roles((0, 1, 3), (), ()).lesion_map(_brain(seed, specks=6)))
    problem = census.problem(max_share=0.25, min_median_voxels=10)
    assert problem is not None
    assert "label value 1 is organ-sized" in problem
    assert "in 3 of 3 training cases" in problem
    assert "synth.lesion_labels" in problem
    assert "synth.max_lesion_share" in problem
    assert census.median_share(1) == pytest.approx(float(np.mean(_brain(0) == 1)), rel=0.05)
    assert census.median_share(1) > 0.25


def test_speck_lesions_are_refused_and_real_ones_pass() -> None:
    specks = LesionCensus(min_voxels=4)
    for seed in range(3):
        specks.add(label_roles((0, 1, 2, 3), (2, 3), (1,)).lesion_map(_brain(seed, specks=6, lesion=True)))
    problem = specks.problem(max_share=0.25, min_median_voxels=10)
    assert problem is not None
    assert "made of specks" in problem
    assert "21 components in 3 training cases have a median of 6 voxels" in problem  # 9 + 9 specks of 4 and 6
    assert "synth.min_median_lesion_voxels" in problem

    real = LesionCensus(min_voxels=4)
    for seed in range(3):
        real.add(label_roles((0, 1, 2, 3), (2,), (1,)).lesion_map(_brain(seed, specks=6, lesion=True)))
    assert real.problem(max_share=0.25, min_median_voxels=10) is None
    assert real.component_voxels == [123, 123, 123]

    assert LesionCensus(min_voxels=4).problem(max_share=0.25, min_median_voxels=10) is None  # nothing seen


def test_generators_and_gate_get_only_the_lesion_classes() -> None:
    """A liver-style label (1 = organ, 2 = tumour): the classes generators train on and the gate checks are the
    tumour's, never the organ's (catalog.readers.lesion_classes follows synth.lesion_labels / organ_labels)."""
    from lesionflow.catalog.readers import lesion_classes

    assert lesion_classes((0, 1, 2), multi_class=True) == (1, 2)  # nothing declared: every non-zero value
    assert lesion_classes((0, 1, 2), multi_class=True, organ_labels=(1,)) == (2,)
    assert lesion_classes((0, 1, 2), multi_class=False, organ_labels=(1,)) == (2,)
    assert lesion_classes((0, 1, 2, 3), multi_class=True, lesion_labels=(3,)) == (3,)
    assert lesion_classes((0, 1, 2, 3), multi_class=False, lesion_labels=(2, 3)) == (2,)
