"""The synthetic gate: what each generated lesion (one row per sample) and the generated set must meet.

Table (id column ``sample_id``), built by ``validate-synthetic`` with :mod:`lesionflow.quality.synthetic_checks`:

- ``background_max_abs_diff``: max |synthetic - original| outside the mask, must be 0 (check 1)
- ``mask_binary``: 1 if the mask is binary, else 0 (a bool column is converted) (check 7)
- ``components``: connected components of the mask, must be 1 (check 7)
- ``inside_organ``: share of the mask inside the organ mask, must be 1 (1.0 without an organ mask) (check 7)
- ``histogram_w1``: W1 of the lesion histogram vs its condition, or (no condition: DDPM insertion, pasted
  copies) vs the nearest real training lesion's histogram (check 8); which one is ``histogram_reference``
  (``"condition"``, ``"real"``, or ``"none"``: not applicable, e.g. a removal sample)
- ``boundary_gradient_ratio``: boundary gradient / median real-lesion boundary gradient (check 10)
- ``nn_similarity``: NCC with the nearest training lesion (check 11, memorisation)
- ``detected_fraction``: share of the lesion the segmenter finds (check 15; NaN = no segmenter)

Every column check is *row-level*: a failing row is a rejected sample, named by its ``sample_id``. GX skips
null values in column-map expectations, so a NaN in the last two columns means "not measured" and passes;
the others carry an explicit not-null check (``histogram_w1`` where ``histogram_reference`` is not "none"),
so a missing or non-finite statistic (the stage writes NaN for either) rejects the sample instead of passing
as a perfect score; the optional ``notes`` column (why a value is not finite) is appended to that finding.
Dataset level: at least one row, unique ids, the population statistics of
:class:`SyntheticStats` (KS p-value of volumes, diversity, acceptance rate; added to the table as constant
columns so they show in the same report and Data Docs with their ``quality.synthetic.*`` key), and the reject
policy ``quality.synthetic.max_reject_fraction``. A NaN statistic (not measured: fewer than two samples per
condition, no segmenter) is checked with ``expect_column_values_to_be_null``, which passes and says so in
the report, instead of an aggregate over nothing, which GX would fail, but only when
``SyntheticStats.not_measured`` gives the reason; a non-finite statistic without one fails its check.
``SyntheticStats.distribution`` adds the distribution-level statistics the same way (:data:`DISTRIBUTION_COLUMNS`:
feature MMD ratio, nearest-neighbour copy rate, seed diversity; :mod:`lesionflow.quality.synthetic_distribution`),
their measured values in the report's "why" column.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lesionflow.quality.gate import run_gate
from lesionflow.quality.result import GatePolicy, GateResult

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.expectations import Expectation

    from lesionflow.quality.synthetic_distribution import DistributionStats

GATE = "synthetic"
ID_COLUMN = "sample_id"  # a lesion row's id: "<synthetic sample id>#<lesion index>" (lesion_row_id)
PARAM_PREFIX = "quality.synthetic."

#: per-sample columns the stage must provide (besides ``sample_id``)
ROW_COLUMNS = (
    "background_max_abs_diff",
    "mask_binary",
    "components",
    "inside_organ",
    "histogram_w1",
    "boundary_gradient_ratio",
    "nn_similarity",
    "detected_fraction",
)
#: statistics that must be present (finite) in every row (the others may be NaN = not measured); histogram_w1
#: only where ``histogram_reference`` is not "none"
REQUIRED_COLUMNS = ROW_COLUMNS[:6]
#: optional text columns: which histogram ``histogram_w1`` compares with, and why a statistic is not finite
TEXT_DEFAULTS = {"histogram_reference": "condition", "notes": ""}
#: constant columns :func:`with_stats_columns` adds from :class:`SyntheticStats`
STATS_COLUMNS = ("volume_ks_pvalue", "diversity", "acceptance_rate")
#: constant columns of :class:`~lesionflow.quality.synthetic_distribution.DistributionStats` (when given)
DISTRIBUTION_COLUMNS = ("mmd_ratio", "copy_rate", "seed_diversity")


@dataclass(frozen=True)
class SyntheticThresholds:
    """Bounds of the synthetic gate; mirrors ``params.quality.synthetic`` (keys ``quality.synthetic.<field>``)."""

    max_histogram_w1: float = 0.5  # normalised intensity units
    min_volume_ks_pvalue: float = 0.01
    boundary_gradient_ratio: tuple[float, float] = (0.25, 4.0)  # (min, max) of sample / median real
    max_nn_similarity: float = 0.99
    max_diversity: float = 0.99  # mean pairwise NCC of samples with the same condition
    min_detected_fraction: float = 0.7  # per sample; the acceptance rate must reach 1 - max_reject_fraction
    max_reject_fraction: float = 0.5
    max_mmd_ratio: float = 3.0  # feature MMD synthetic vs real-train over real-train halves (~1 = as real)
    max_copy_rate: float = 0.1  # share of new-texture lesions matching a training lesion (NCC >= copy_ncc)
    min_seed_diversity: float = 0.01  # mean pairwise 1 - NCC of one ROI and condition over seeds

    def __post_init__(self) -> None:
        lo, hi = self.boundary_gradient_ratio
        if not 0 <= lo < hi:
            raise ValueError(f"boundary_gradient_ratio must be (min, max) with 0 <= min < max, got {(lo, hi)}")
        for name in ("min_volume_ks_pvalue", "min_detected_fraction", "max_reject_fraction", "max_copy_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class SyntheticStats:
    """Population statistics of one generated set (NaN = not measured, which passes)."""

    volume_ks_pvalue: float  # KsResult.pvalue of synthetic vs real lesion volumes
    diversity: float  # mean pairwise NCC of samples sharing a condition (NaN with < 2 per condition)
    acceptance_rate: float  # share of samples the segmenter accepted (NaN without a segmenter)
    #: statistic name -> why it was not measured (its NaN then passes, with the reason in the report)
    not_measured: Mapping[str, str] = field(default_factory=dict)
    #: the distribution-level checks (MMD ratio, copy rate, seed diversity); the stage always gives them
    distribution: DistributionStats | None = None


def lesion_row_id(sample_id: str, lesion: int) -> str:
    """The gate table's id of a sample's ``lesion``-th generated lesion (the gate rejects lesion rows)."""
    return f"{sample_id}#{lesion}"


def sample_of_row(row_id: str) -> str:
    """The synthetic sample a gate row (:func:`lesion_row_id`) belongs to: a rejected row rejects its sample."""
    return str(row_id).split("#")[0]


def with_stats_columns(table: pd.DataFrame, stats: SyntheticStats) -> pd.DataFrame:
    """A copy of ``table`` with the :data:`STATS_COLUMNS` set to the ``stats`` values (float64) on every row,
    and a bool ``mask_binary`` converted to 0/1 (int64) so its check reads "exactly 1"."""
    out = table.copy()
    constants = {c: float(getattr(stats, c)) for c in STATS_COLUMNS}
    if stats.distribution is not None:
        constants.update({c: float(getattr(stats.distribution, c)) for c in DISTRIBUTION_COLUMNS})
    for column, value in constants.items():
        out[column] = value if math.isfinite(value) else math.nan  # inf would pass a one-sided bound
        out[column] = out[column].astype("float64")
    for column, default in TEXT_DEFAULTS.items():
        if column not in out.columns:
            out[column] = default
    if "mask_binary" in out.columns and out["mask_binary"].dtype == bool:
        out["mask_binary"] = out["mask_binary"].astype("int64")
    return out


def _param(name: str) -> str:
    return PARAM_PREFIX + name


def _stat_expectation(
    column: str,
    value: float,
    *,
    min_value: float | None = None,
    max_value: float | None = None,
    param: str,
    why: str,
    reason: str | None = None,
) -> Expectation:
    """A dataset-level check of one constant stats column; for a non-finite value a passing "not measured"
    check when ``reason`` says why it was not measured, else a failing one that says the value is not finite."""
    import great_expectations.expectations as gxe

    meta: dict[str, str] = {"param": param, "scope": "dataset", "label": column}
    if not math.isfinite(value) and reason:
        return gxe.ExpectColumnValuesToBeNull(
            column=column, notes=f"Not measured in this run (NaN), so not checked: {reason}. {why}", meta=meta
        )
    if not math.isfinite(value):
        # the column holds NaN (with_stats_columns): GX's mean over no values fails, with this explanation
        meta["explain"] = f"{column} = {value} is not finite and nothing says it was not measured; it fails"
    return gxe.ExpectColumnMeanToBeBetween(
        column=column, min_value=min_value, max_value=max_value, notes=why, meta=meta
    )


def synthetic_expectations(t: SyntheticThresholds, stats: SyntheticStats) -> list[Expectation]:
    """The suite over :func:`with_stats_columns` of the per-sample table (see the module docstring)."""
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    lo, hi = t.boundary_gradient_ratio
    exps: list[Expectation] = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1, meta={"explain": "no synthetic samples ({observed} rows)"}),
        gxe.ExpectColumnValuesToBeUnique(column=ID_COLUMN, meta={"scope": "both"}),
    ]
    exps += [
        gxe.ExpectColumnValuesToNotBeNull(
            column=column,
            row_condition=Column("histogram_reference") != "none" if column == "histogram_w1" else None,
            notes="A check whose statistic was not computed or is not finite cannot be trusted to hold.",
            meta={"explain": "{notes}"},
        )
        for column in REQUIRED_COLUMNS
    ]
    exps += [
        gxe.ExpectColumnValuesToBeBetween(
            column="background_max_abs_diff",
            min_value=0,
            max_value=0,
            notes="The paste must leave every voxel outside the lesion mask bit-exact (§9.7 check 1).",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="mask_binary", min_value=1, max_value=1, notes="The generated mask must be binary (check 7)."
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="components",
            min_value=1,
            max_value=1,
            notes="One lesion per sample: exactly one connected component, not empty (check 7).",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="inside_organ",
            min_value=1,
            max_value=1,
            notes="The whole lesion must lie inside the organ mask (check 7).",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="histogram_w1",
            max_value=t.max_histogram_w1,
            notes="The lesion's intensity histogram must follow its condition (Wasserstein-1, check 8).",
            meta={"param": _param("max_histogram_w1")},
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="boundary_gradient_ratio",
            min_value=lo,
            max_value=hi,
            notes="Edge sharpness vs real lesions: too high is a pasted sticker, too low a smear (check 10).",
            meta={"param": _param("boundary_gradient_ratio")},
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="nn_similarity",
            max_value=t.max_nn_similarity,
            notes="Correlation with the nearest training lesion: near 1 means a memorised copy (check 11).",
            meta={"param": _param("max_nn_similarity")},
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="detected_fraction",
            min_value=t.min_detected_fraction,
            notes="FreeTumor acceptance: the real-data segmenter must find the lesion (check 15; "
            "missing = no segmenter, skipped).",
            meta={"param": _param("min_detected_fraction")},
        ),
    ]
    exps += [
        _stat_expectation(
            "volume_ks_pvalue",
            stats.volume_ks_pvalue,
            reason=stats.not_measured.get("volume_ks_pvalue"),
            min_value=t.min_volume_ks_pvalue,
            param=_param("min_volume_ks_pvalue"),
            why="KS test of synthetic vs real lesion volumes: a tiny p-value means different size distributions "
            "(check 9).",
        ),
        _stat_expectation(
            "diversity",
            stats.diversity,
            reason=stats.not_measured.get("diversity"),
            max_value=t.max_diversity,
            param=_param("max_diversity"),
            why="Mean pairwise correlation of samples sharing a condition: near 1 means mode collapse (check 11).",
        ),
        _stat_expectation(
            "acceptance_rate",
            stats.acceptance_rate,
            reason=stats.not_measured.get("acceptance_rate"),
            min_value=1.0 - t.max_reject_fraction,
            param=_param("max_reject_fraction"),
            why="Share of samples the segmenter accepted must reach 1 - the tolerated reject fraction (check 15).",
        ),
    ]
    if stats.distribution is not None:
        exps += _distribution_expectations(t, stats.distribution)
    return exps


def _g(value: float) -> str:
    return f"{value:.4g}"


def _distribution_expectations(t: SyntheticThresholds, d: DistributionStats) -> list[Expectation]:
    """The dataset-level checks of :mod:`lesionflow.quality.synthetic_distribution`, each with its measured
    values in the report's "why" column."""
    from lesionflow.quality.synthetic_distribution import MAX_SHIFT

    m = d.mmd
    paste = (
        f" Pasted lesions (copy-paste) are copies by construction and not gated: {_g(d.paste_copy_rate)} of "
        f"{d.n_pasted} match a training lesion."
        if d.n_pasted
        else ""
    )
    return [
        _stat_expectation(
            "mmd_ratio",
            m.ratio,
            reason=d.not_measured.get("mmd_ratio"),
            max_value=t.max_mmd_ratio,
            param=_param("max_mmd_ratio"),
            why="Kernel MMD (RBF, median-heuristic bandwidth) of the synthetic vs real training lesion ROIs' "
            "encoder features, over the MMD of two seeded halves of the real training ROIs (size-normalised; "
            f"~1 = as close as real data is to itself). Measured: ratio {_g(m.ratio)}, unbiased MMD² "
            f"{_g(m.mmd2)} ({m.n_synthetic} synthetic vs {m.n_real} real) vs baseline {_g(m.baseline_mmd2)}; "
            f"features: {d.encoder}.",
        ),
        _stat_expectation(
            "copy_rate",
            d.copy_rate,
            reason=d.not_measured.get("copy_rate"),
            max_value=t.max_copy_rate,
            param=_param("max_copy_rate"),
            why=f"Share of lesions claiming a new texture (LeFusion, DDPM/RePaint, DiffMask) whose voxels match a "
            f"real training lesion with NCC >= {_g(d.copy_ncc)} (quality.synthetic.copy_ncc) over shifts of up "
            f"to {MAX_SHIFT} voxels and the 8 axis flips. Measured: {d.n_copies} of {d.n_copy_checked}.{paste}",
        ),
        _stat_expectation(
            "seed_diversity",
            d.seed_diversity,
            reason=d.not_measured.get("seed_diversity"),
            min_value=t.min_seed_diversity,
            param=_param("min_seed_diversity"),
            why="Mean pairwise 1 - NCC inside the lesion of samples of the same ROI and condition with "
            f"different seeds: near 0 means mode collapse. Measured: {_g(d.seed_diversity)} over "
            f"{d.n_seed_groups} repeated ROI/condition group(s).",
        ),
    ]


def run_synthetic_gate(
    table: pd.DataFrame, stats: SyntheticStats, t: SyntheticThresholds, report_dir: Path, *, data_docs: bool = True
) -> GateResult:
    """Validate the per-sample ``table`` plus ``stats`` and write the gate reports under ``report_dir``.

    ``GateResult.rejected`` is keyed by ``sample_id``; a sample is rejected by any failing row-level check, and
    the gate fails above ``t.max_reject_fraction`` rejected samples or on any dataset-level failure.
    """
    policy = GatePolicy(
        max_reject_fraction=t.max_reject_fraction, max_reject_fraction_param=_param("max_reject_fraction")
    )
    return run_gate(
        GATE,
        with_stats_columns(table, stats),
        synthetic_expectations(t, stats),
        policy,
        report_dir,
        id_column=ID_COLUMN,
        data_docs=data_docs,
    )
