"""params.yaml: typed sections, one-line errors naming key, value and expectation, --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from lesionflow.errors import ParamsError
from lesionflow.params import Params, apply_overrides, load_params, parse_override

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_are_valid_and_match_defaults() -> None:
    params = load_params(REPO / "params.yaml")
    assert params == Params()  # the file documents the defaults; drift would surprise users
    assert params.quality.raw.spacing_mm == (0.1, 10.0)


def test_override_parses_yaml_values() -> None:
    assert parse_override("quality.max_reject_fraction=0.1") == (["quality", "max_reject_fraction"], 0.1)
    assert parse_override("quality.raw.spacing_mm=[0.5, 5]") == (["quality", "raw", "spacing_mm"], [0.5, 5])
    raw = apply_overrides({"ingest": {"source": "a"}}, ["ingest.source=s3://bucket/prefix"])
    assert raw["ingest"]["source"] == "s3://bucket/prefix"


def test_overrides_apply_on_load() -> None:
    params = load_params(REPO / "params.yaml", ["ingest.test_fraction=0.2", "ingest.deid.max_date_shift_days=30"])
    assert params.ingest.test_fraction == 0.2
    assert params.ingest.deid.max_date_shift_days == 30


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("quality.max_reject_fraction=1.5", ["quality.max_reject_fraction", "1.5", "less than or equal to 1"]),
        ("demo.kind=knee-xray", ["demo.kind", "knee-xray", "brain-mri"]),
        ("quality.raw.spacing_mm=[5, 1]", ["quality.raw.spacing_mm", "min < max"]),
        ("ingest.sourse=x", ["unknown key", "ingest.sourse"]),
        ("demo.cases=many", ["demo.cases", "'many'", "integer"]),
        ("storage.remote=/mnt/team", ["storage.remote", "/mnt/team", "expected s3://bucket/prefix"]),
        ("storage.remote=s3://", ["storage.remote", "expected s3://bucket/prefix"]),
        ("storage.remote=s3://AKIA:secret@team/ws", ["storage.remote", "credentials do not belong in the URL"]),
        ("storage.retries=-1", ["storage.retries", "greater than or equal to 0"]),
    ],
)
def test_bad_values_name_key_value_and_expectation(override: str, needles: list[str]) -> None:
    with pytest.raises(ParamsError) as info:
        load_params(REPO / "params.yaml", [override])
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    assert "secret" not in message  # a URL's credentials are never echoed


def test_malformed_override_and_file(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"expected section\.key=value"):
        parse_override("novalue")
    bad = tmp_path / "params.yaml"
    bad.write_text("ingest: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML at line"):
        load_params(bad)
    with pytest.raises(ParamsError, match="does not exist"):
        load_params(tmp_path / "missing.yaml")


def test_cross_key_synth_checks_name_the_keys() -> None:
    with pytest.raises(ParamsError) as info:
        load_params(REPO / "params.yaml", ["synth.remove_per_case=1"])
    assert str(info.value) == (
        "params: 'synth' is invalid: remove_per_case > 0 needs the ddpm generator: add 'ddpm' to synth.generators"
    )
    with pytest.raises(ParamsError, match=r"roi_size \[10, 16, 16\] must be a multiple of 4"):
        load_params(
            REPO / "params.yaml",
            [
                "synth.roi_size=[10, 16, 16]",
                "synth.lefusion.channel_mults=[1, 2, 4]",
                "synth.lefusion.attention_levels=[false, false, false]",
            ],
        )


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "presets").glob("*.yaml")))
def test_every_preset_applies_to_the_repository_params(preset: str) -> None:
    from lesionflow.params import preset_overrides

    overrides = preset_overrides(preset, [REPO])
    params = load_params(REPO / "params.yaml", overrides)  # validated, cross-key checks included
    assert overrides
    assert params != load_params(REPO / "params.yaml") or preset == "toy"  # toy = the defaults


def test_storage_remote_is_normalised_and_backoff_doubles() -> None:
    params = load_params(REPO / "params.yaml", ["storage.remote=s3://team/ws/", "storage.retry_delay_s=1.5"])
    assert params.storage.remote == "s3://team/ws"
    assert params.storage.retry_delays() == [1.5, 3.0, 6.0]


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("train.steps=true", ["train.steps", "True", "expected an integer"]),  # was read as 1 step
        ("train.steps=99999999999999999999999", ["train.steps", "99999999999999999999999", "at most"]),
        ("train.steps=20000000", ["train.steps", "less than or equal to 10000000"]),
        ("train.steps='250'", ["train.steps", "'250'", "expected an integer"]),
        ("train.steps=2.5", ["train.steps", "2.5", "expected an integer"]),
        ("train.compile=1", ["train.compile", "expected true or false"]),
        ("train.learning_rate=true", ["train.learning_rate", "expected a number"]),
        ("train.patch_size=[32, true, 32]", ["train.patch_size", "expected an integer"]),
        ("study.seeds=[0, false]", ["study.seeds", "expected an integer"]),
        ("synth.lefusion.steps=yes", ["synth.lefusion.steps", "expected an integer"]),  # YAML 1.1: yes is true
        ("demo.out=../../x", ["demo.out", "'../../x'", "leaves the workspace", "absolute path"]),
        ("demo.out=data/../../x", ["demo.out", "leaves the workspace"]),
    ],
)
def test_values_pydantic_would_coerce_or_that_escape_the_workspace_are_refused(
    override: str, needles: list[str]
) -> None:
    with pytest.raises(ParamsError) as info:
        load_params(REPO / "params.yaml", [override])
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_real_ints_floats_bools_and_explicit_paths_still_validate(tmp_path: Path) -> None:
    params = load_params(
        REPO / "params.yaml",
        [
            "train.steps=10000000",
            "train.learning_rate=1e-4",  # YAML 1.1 reads this as text: pydantic's float parsing stays
            "train.weight_decay=0",  # an int where a float is expected is exact
            "train.seed=null",
            "train.compile=true",
            f"demo.out={tmp_path / 'elsewhere'}",  # outside the workspace only when said explicitly
        ],
    )
    assert (params.train.steps, params.train.learning_rate, params.train.weight_decay) == (10_000_000, 1e-4, 0.0)
    assert params.train.compile is True
    assert params.demo.out == str(tmp_path / "elsewhere")
    inside = load_params(REPO / "params.yaml", ["demo.out=data/demo/../other"])  # normalises to a folder inside
    assert inside.demo.out == "data/demo/../other"
