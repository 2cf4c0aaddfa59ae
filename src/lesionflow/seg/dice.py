"""The one Dice of lesionflow: validation during training, test metrics and synthesis statistics all call it.

Pure numpy (no torch, no MONAI at import), so any layer may import it, synth/ included.

``dice(a, b) = 2 |a ∩ b| / (|a| + |b|)`` for two boolean masks of the same shape, computed from exact voxel
counts (one float division). Empty-mask rule (MONAI's ``compute_dice(..., ignore_empty=False)``), so a score is
never NaN (the test metrics instead leave a class empty in both undefined: :mod:`lesionflow.seg.metrics`):

* both masks empty: 1.0 (nothing to find, nothing found);
* exactly one empty: 0.0 (a missed or a hallucinated structure).

For label maps, :func:`mean_foreground_dice` averages ``dice(pred == v, truth == v)`` over every non-zero label
value, absent-in-both classes included (they score 1.0 by the rule above): the validation score of training,
equal to the test metrics' per-case Dice wherever every class is in the truth or the prediction.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

BOTH_EMPTY = 1.0  # the empty-mask rule; exactly one empty mask scores 0.0 by the formula (no overlap)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks of the same shape, in [0, 1]; empty masks per the module docstring."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes {a.shape} and {b.shape} differ: expected masks on the same grid")
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return BOTH_EMPTY
    return 2.0 * int(np.count_nonzero(a & b)) / total


def mean_foreground_dice(pred: np.ndarray, truth: np.ndarray, label_values: Iterable[int]) -> float:
    """Mean of :func:`dice` over the non-zero ``label_values`` of two label maps (1.0 when there are none)."""
    scores = [dice(pred == v, truth == v) for v in (int(x) for x in label_values) if v != 0]
    return float(np.mean(scores)) if scores else BOTH_EMPTY
