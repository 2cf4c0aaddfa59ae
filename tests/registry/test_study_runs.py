"""A utility study in MLflow: a parent run with the effects, one child per cell, logged once per summary."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from lesionflow.registry.study_runs import PARENT_RUN_ID, log_study, metric_key
from lesionflow.registry.tracking import resolve_tracking_uri


def _cells() -> pd.DataFrame:
    rows = []
    for arm, ratio, dose in (
        ("real", 0.0, False),
        ("lefusion+diffmask", 0.25, False),
        ("lefusion+diffmask", 0.5, True),
    ):
        for seed in (0, 1):
            for case, dice in (("c1", 0.4), ("c2", 0.6)):
                rows.append(
                    {"arm": arm, "fraction": 0.5, "ratio": ratio, "dose": dose, "seed": seed, "case_id": case,
                     "dice": dice + 0.1 * seed, "hd95_mm": 2.0, "nsd": 0.5, "lesions": 2, "detected": 1,
                     "false_positives": 1}
                )  # fmt: skip
    return pd.DataFrame(rows)


def test_parent_and_child_runs_are_logged_once(tmp_path: Path) -> None:
    uri = resolve_tracking_uri("", tmp_path / "ws")
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"effects": []}))
    effects = [
        {"arm": "lefusion+diffmask", "fraction": 0.5, "ratio": 0.25, "dose": False, "mean": 0.01, "ci_low": -0.02,
         "ci_high": 0.04, "p_holm": 0.6},
        {"arm": "lefusion+diffmask", "fraction": 0.5, "ratio": 0.5, "dose": True, "mean": -0.01, "ci_low": -0.03,
         "ci_high": 0.01, "p_holm": 0.9},
    ]  # fmt: skip
    study = {"arms": ["real", "lefusion+diffmask"], "seeds": [0, 1]}
    first = log_study(uri, "exp-study", summary, study, _cells(), effects, [summary, tmp_path / "missing.png"])
    assert (first.logged, first.n_children) == (True, 6)  # 3 (arm, ratio) x 2 seeds
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(first.parent_run_id)
    assert parent.data.params["study.arms"] == '["real", "lefusion+diffmask"]'
    assert parent.data.metrics[metric_key("effect", "lefusion+diffmask", "f050") + ".mean"] == pytest.approx(0.01)
    assert parent.data.metrics["effect.lefusion_and_diffmask.x050.f050.ci_low"] == pytest.approx(-0.03)
    assert [a.path for a in client.list_artifacts(first.parent_run_id)] == ["summary.json"]
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_RUN_ID}` = '{first.parent_run_id}'"
    )
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {
        "real@050#0", "real@050#1", "lefusion+diffmask@050#0", "lefusion+diffmask@050#1",
        "lefusion+diffmaskx050@050#0", "lefusion+diffmaskx050@050#1",
    }  # fmt: skip
    one = by_name["real@050#1"].data
    assert one.metrics["test_dice_mean"] == pytest.approx(0.6)  # (0.5 + 0.7) / 2
    assert one.metrics["test_lesion_sensitivity"] == pytest.approx(0.5)
    assert (one.params["arm"], one.params["seed"], one.params["n_test_cases"]) == ("real", "1", "2")
    assert all(r.info.status == "FINISHED" for r in [parent, *children])

    again = log_study(uri, "exp-study", summary, study, _cells(), effects, [summary])
    assert (again.logged, again.parent_run_id) == (False, first.parent_run_id)  # same summary: nothing new
    summary.write_text(json.dumps({"effects": [1]}))
    assert log_study(uri, "exp-study", summary, study, _cells(), effects, []).parent_run_id != first.parent_run_id
