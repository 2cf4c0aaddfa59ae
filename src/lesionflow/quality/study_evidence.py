"""Utility in the loop: admit synthetic data only when a utility study showed that it does not hurt.

With ``quality.synthetic.study_evidence`` set to a study's ``summary.json`` (``lesionflow study`` writes
``reports/study/summary.json``), the synthetic gate reads the effect of the arm that the current synth settings
make (:func:`lesionflow.study.design.arm_of_synth`) at the study's largest real fraction — the training data the
pipeline itself uses — and admits the samples only when

- the study measured *these* generators: its generator weight digests at that fraction equal the workspace's
  (new data or retrained generators need a new study), and
- the lower bound of the effect's 95% CI (Dice, arm minus real, paired by case and seed) is at least
  ``quality.synthetic.min_study_effect`` (0: not worse than real-only training, with 95% confidence).

Every refusal is one line naming the value and the fix. Pure: the stage reads the files and passes them in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lesionflow.errors import GateFailed


def study_verdict(
    summary: Mapping[str, Any],
    arm: str | None,
    generators: Mapping[str, str],
    min_effect: float,
    *,
    source: str,
) -> str:
    """The one line saying why the study admits the data; raises GateFailed (one line) when it does not.

    ``generators`` maps each generator the current settings use to its weights digest (``catalog.readers.
    generator_digest``); ``source`` names the summary file in messages.
    """
    if arm is None:
        raise GateFailed(
            f"quality.synthetic.study_evidence = {source}: the current synth.method makes no study arm (PIE "
            "trajectories are not measured by the study); clear quality.synthetic.study_evidence"
        )
    fractions = summary.get("fractions") or {}
    if not fractions:
        raise GateFailed(f"{source} holds no study fractions; run `lesionflow study` and point at its summary.json")
    largest = max(fractions, key=float)
    studied = (fractions[largest].get("generators") or {}) if isinstance(fractions[largest], Mapping) else {}
    differ = sorted(n for n in generators if studied.get(n) != generators[n])
    if differ:
        pairs = ", ".join(f"{n} {str(studied.get(n, 'absent'))[:12]} vs {generators[n][:12]}" for n in differ)
        raise GateFailed(
            f"{source} measured other {', '.join(differ)} weights than this workspace's (fraction {largest}: "
            f"{pairs}); "
            "rerun `lesionflow study` for the current generators"
        )
    rows = [
        e
        for e in summary.get("effects", [])
        if e.get("arm") == arm and not e.get("dose") and float(e.get("fraction", -1)) == float(largest)
    ]
    if not rows:
        raise GateFailed(
            f"{source} has no effect for arm {arm!r} at fraction {largest}; add {arm!r} to study.arms and rerun "
            "`lesionflow study`"
        )
    effect = rows[0]
    low, mean, high = float(effect["ci_low"]), float(effect["mean"]), float(effect["ci_high"])
    shown = f"{100 * mean:+.2f} Dice points (95% CI {100 * low:+.2f} to {100 * high:+.2f})"
    if low < min_effect:
        raise GateFailed(
            f"synthetic data refused by the utility study {source}: arm {arm!r} at fraction {largest} changes test "
            f"Dice by {shown}, CI lower bound below quality.synthetic.min_study_effect = {min_effect:g}; improve "
            "the generators (or lower min_study_effect) and rerun `lesionflow study`"
        )
    return f"utility study {source}: arm {arm!r} at fraction {largest}: {shown} >= {min_effect:g}"
