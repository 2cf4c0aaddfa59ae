"""Bad study inputs stop with one line naming the value and the fix (no training happens)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lesionflow.errors import LesionflowError, ParamsError, SourceError
from lesionflow.params import load_params
from lesionflow.study.runner import check_ready, run_study
from lesionflow.workspace import Workspace
from tests.study.test_runner import QUIET, processed_workspace


def test_an_unprocessed_workspace_is_refused(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("{}\n")
    with pytest.raises(SourceError, match=r"data/processed/plans.json does not exist: the study starts from"):
        check_ready(Workspace.at(tmp_path))


def test_a_fraction_without_enough_lesion_cases_and_a_small_test_split_are_one_line(tmp_path: Path) -> None:
    ws = processed_workspace(tmp_path / "ws", n_train=4, n_test=2)
    few = load_params(ws.params_file, [*QUIET, "study.fractions=[0.2,1.0]", "study.arms=[real]"])
    with pytest.raises(ParamsError, match=r"study.fractions: 0.2 keeps 1 training case\(s\), 1 with lesions"):
        run_study(ws, few)
    with pytest.raises(LesionflowError, match=r"'study.arms.1' = 'gan' is invalid"):
        load_params(ws.params_file, ["study.arms=[real,gan]"])


def test_a_test_split_of_one_case_is_refused(tmp_path: Path) -> None:
    ws = processed_workspace(tmp_path / "ws", n_train=4, n_test=1)
    with pytest.raises(SourceError, match=r"the test split holds 1 accepted case\(s\)"):
        run_study(ws, load_params(ws.params_file, [*QUIET, "study.arms=[real]"]))
