"""The Prefect "Custom run" form of a flow replaces only the keys a user fills in (issue 19, item 1).

Prefect's form (its schema form, ``SchemaFormProperty``) pre-fills every key that has a ``default`` in the flow's
parameter schema once a section is opened, and submits what it shows. :func:`submitted` follows that rule on the
real schema of a flow; the browser test (tests/flows/test_ui_browser.py) drives the real form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.exceptions import ParameterTypeError

from lesionflow.errors import LesionflowError
from lesionflow.flows.common import resolve_params, section_overrides
from lesionflow.flows.forms import Overrides
from lesionflow.flows.ingest import ingest_flow
from lesionflow.flows.pipeline import training_pipeline
from lesionflow.flows.study import utility_study
from lesionflow.flows.synthesis import synthesis_flow
from lesionflow.params import Params, QualityParams, RawQualityParams, TrainParams, load_params
from lesionflow.workspace import Workspace

FLOWS = (training_pipeline, ingest_flow, synthesis_flow, utility_study)


def _target(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any] | None:
    """The object schema a property opens to (through ``$ref`` / ``anyOf``), or None for a leaf."""
    for option in [node, *node.get("anyOf", []), *node.get("allOf", [])]:
        if "$ref" in option:
            return dict(schema["definitions"][option["$ref"].split("/")[-1]])
        if option.get("type") == "object" and "properties" in option:
            return option
    return None


def prefilled(schema: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """What the form holds for an opened section: each key's schema default, nested sections opened too."""
    values: dict[str, Any] = {}
    for key, node in model["properties"].items():
        if "default" in node:
            values[key] = node["default"]
        elif (inner := _target(schema, node)) is not None and (nested := prefilled(schema, inner)):
            values[key] = nested  # a nested section holds a value once one of its keys does
    return values


def submitted(schema: dict[str, Any], section: str, edits: dict[str, Any]) -> dict[str, Any]:
    """The section value the form submits after opening ``section`` and typing ``edits`` (nested dicts)."""
    model = _target(schema, schema["properties"][section])
    assert model is not None, f"{section} is not a section of the form"
    values = prefilled(schema, model)

    def put(into: dict[str, Any], change: dict[str, Any]) -> None:
        for key, value in change.items():
            if isinstance(value, dict):
                put(into.setdefault(key, {}), value)
            else:
                into[key] = value

    put(values, edits)
    return values


def _params_file(workspace: Path) -> dict[str, Any]:
    raw = yaml.safe_load((workspace / "params.yaml").read_text())
    raw["quality"]["max_reject_fraction"] = 0.4  # the params file: a value that differs from the code
    raw["quality"]["raw"]["spacing_mm"] = [0.2, 9.0]
    raw["train"]["steps"] = 7
    raw["train"]["augmentation"]["flip_prob"] = 0.3
    (workspace / "params.yaml").write_text(yaml.safe_dump(raw))
    return raw


def test_custom_run_with_one_key_changed_keeps_every_other_key_of_params_yaml(workspace: Path) -> None:
    raw = _params_file(workspace)
    schema = ingest_flow.parameters.model_dump()
    form = submitted(schema, "quality", {"raw": {"min_cases": 3}})
    assert form == {"raw": {"min_cases": 3}}  # nothing else is pre-filled, so nothing else is submitted
    given = ingest_flow.validate_parameters({"quality": form})
    params = resolve_params(Workspace.at(workspace), "params.yaml", None, {"quality": given["quality"]})
    assert params.quality.raw.min_cases == 3
    expected = load_params(workspace / "params.yaml").model_dump()
    expected["quality"]["raw"]["min_cases"] = 3
    assert params.model_dump() == expected  # every other key is params.yaml's, 0.4 among them
    assert params.quality.max_reject_fraction == raw["quality"]["max_reject_fraction"] == 0.4


def test_a_nested_key_of_the_pipeline_form_changes_only_that_key(workspace: Path) -> None:
    _params_file(workspace)
    schema = training_pipeline.parameters.model_dump()
    form = submitted(schema, "train", {"augmentation": {"noise_prob": 0.5}})
    assert form == {"augmentation": {"noise_prob": 0.5}}
    given = training_pipeline.validate_parameters({"train": form})
    params = resolve_params(Workspace.at(workspace), "params.yaml", None, {"train": given["train"]})
    assert (params.train.steps, params.train.augmentation.flip_prob, params.train.augmentation.noise_prob) == (
        7,
        0.3,
        0.5,
    )


@pytest.mark.parametrize("the_flow", FLOWS, ids=lambda f: f.name)
def test_no_key_of_a_section_is_prefilled_and_each_keeps_its_type_and_description(the_flow: Any) -> None:
    schema = the_flow.parameters.model_dump()
    sections = [name for name in schema["properties"] if name in Params.model_fields]
    assert sections
    for name in sections:
        node = schema["properties"][name]
        assert node["default"] is None  # closed: params.yaml as it is
        assert "only the keys given" in node["description"]
        assert submitted(schema, name, {}) == {}, name  # opened and left alone: nothing to submit
        model = _target(schema, node)
        assert model is not None
        source = type(getattr(Params(), name))
        for key, info in source.model_fields.items():
            field = model["properties"][key]
            if info.description:
                assert field["description"] == info.description, (name, key)
    train = _target(schema, schema["properties"]["train"]) if "train" in schema["properties"] else None
    if train is not None:  # the input keeps its type and bounds: the form checks them before submitting
        assert train["properties"]["steps"]["type"] == "integer"
        assert train["properties"]["steps"]["minimum"] == 1
        assert train["properties"]["network"]["enum"] == ["unet", "dynunet", "swinunetr"]


def test_section_overrides_keep_only_filled_keys() -> None:
    quality = Overrides[QualityParams].model_validate({"raw": {"min_cases": 3, "spacing_mm": None}, "metrics": {}})
    assert section_overrides({"quality": quality, "train": None}) == {"quality": {"raw": {"min_cases": 3}}}
    # a Python caller may hand the section model itself: only the keys it set count
    from_model = Overrides[QualityParams].model_validate(QualityParams(raw=RawQualityParams(min_cases=4)))
    assert section_overrides({"quality": from_model}) == {"quality": {"raw": {"min_cases": 4}}}
    assert Overrides[TrainParams] is Overrides[TrainParams]  # one model per section: one form definition


def test_override_values_are_taken_as_they_are(workspace: Path) -> None:
    """Like params.yaml, a form or --param value is never converted silently (true is not 1, "5" not 5)."""
    with pytest.raises(ValueError, match="expected an integer"):
        Overrides[TrainParams].model_validate({"steps": True})
    with pytest.raises(ValueError, match="extra"):
        Overrides[TrainParams].model_validate({"stepz": 5})
    with pytest.raises(ParameterTypeError, match="greater than or equal to 1"):  # bounds: the form checks them
        ingest_flow.validate_parameters({"quality": {"raw": {"min_cases": 0}}})
    # rules between keys are the params models' own, checked once on the merged params: one line naming the key
    given = ingest_flow.validate_parameters({"quality": {"raw": {"spacing_mm": [9.0, 0.2]}}})
    with pytest.raises(LesionflowError, match=r"quality\.raw\.spacing_mm"):
        resolve_params(Workspace.at(workspace), "params.yaml", None, {"quality": given["quality"]})
