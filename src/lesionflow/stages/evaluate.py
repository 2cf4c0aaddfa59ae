"""Stage ``evaluate``: the trained model on the test split, scored on the original grid (unlabelled test cases,
such as an MSD imagesTs/ without labels, are predicted and listed in ``unlabelled_cases``, not scored).

Writes ``data/predictions/<case>.nii.gz`` (label values on the raw grid, raw affine),
``reports/metrics.json`` (DVC metrics, flat: means over the defined values overall and per class with their
counts and the (case, class) outcome counts of :mod:`lesionflow.seg.metrics`'s empty-mask convention, cases
without lesion and those with a false positive, lesion sensitivity overall and per size bin, false positives
per case, the test-split digest and the model digest), ``reports/evaluate/cases.csv`` (per case and class:
Dice, HD95 mm, NSD (empty where undefined), outcome, lesion and detection counts overall and per size bin, false
positives), ``reports/evaluate/lesions.csv`` (per truth lesion: size, size bin, detected),
``reports/evaluate/boxplot.png`` and ``reports/evaluate/montage.png`` (best and worst cases with a lesion).
Lesion detection follows :mod:`lesionflow.seg.detection` (26-connected components, any overlap is a hit).
:func:`evaluate_cases` is also what ``lesionflow evaluate --model REF --data DIR`` runs on any ingested
workspace with a registered model.
"""

from __future__ import annotations

from pathlib import Path

from lesionflow.catalog.artifacts import (
    EVALUATE_REPORT,
    METRICS,
    PREDICTIONS,
    RAW_MANIFEST,
    SEGMENTER,
)
from lesionflow.catalog.readers import splits, write_stage_metrics
from lesionflow.errors import SourceError
from lesionflow.files import write_json
from lesionflow.manifest import read_manifest
from lesionflow.params import Params
from lesionflow.seg.evaluation import evaluate_cases
from lesionflow.stages.base import StageResult
from lesionflow.workspace import Workspace

STAGE = "evaluate"


def run(ws: Workspace, params: Params) -> StageResult:
    model = SEGMENTER.at(ws)
    if not (model / "model.safetensors").exists():
        raise SourceError(f"{SEGMENTER.path} has no trained model; run `lesionflow stage train` first")
    test = set(splits(ws, params).test)
    if not test:
        raise SourceError(
            "the test split is empty; ingest a source with a test split (MSD imagesTs/labelsTs) "
            "or set ingest.test_fraction > 0"
        )
    records = [r for r in read_manifest(RAW_MANIFEST.at(ws)) if r.case_id in test]
    report = evaluate_cases(model, ws, records, params.evaluate, EVALUATE_REPORT.at(ws), PREDICTIONS.at(ws))
    write_json(METRICS.at(ws), report.summary)
    numbers = write_stage_metrics(ws, STAGE, report.summary)  # its numbers, for `dvc exp show`
    rel = {k: str(Path(v).relative_to(ws.root)) for k, v in report.outputs.items()}
    outputs = {"metrics": METRICS.path, "numbers": numbers, **rel}
    shown = {k: v for k, v in report.summary.items() if k != "cases"}
    return StageResult(STAGE, True, shown, outputs)
