"""presets/*.yaml: every preset validates and sizes everything it runs; each runs end to end (shrunken) on CPU.

The rule (issue 16): a preset that sets ``synth.roi_size`` sets, in its own file, the network size (base width,
levels, attention, T) of every generator it runs, with the coarsest UNet level at most 8 voxels per edge (the
toy UNet at 64³ would see 32³ at its bottleneck); a preset that sizes a generator for a GPU also sizes the
segmenter it trains (train, the acceptance filter's model). "Runs" = the ``synth.generators`` in effect after the
preset is applied to the repository's params.yaml, plus, for a study preset, the generators of its arms.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from lesionflow.caching import run_cached
from lesionflow.params import Params, load_params, preset_overrides
from lesionflow.stages.registry import STAGES
from lesionflow.study.runner import ARM_SYNTH
from lesionflow.workspace import Workspace
from tests.stages.test_synthesis import SYNTH

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (REPO / "presets").glob("*.yaml"))
NET_KEYS = ("base_channels", "channel_mults", "attention_levels", "timesteps")
GPU_TRAIN_KEYS = ("network", "channels", "patch_size", "batch_size", "steps")


def _raw(preset: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "presets" / f"{preset}.yaml").read_text()) or {}


def _params(preset: str, extra: list[str] | None = None) -> Params:
    return load_params(REPO / "params.yaml", preset_overrides(preset, [REPO]) + (extra or []))


def _runs(params: Params, raw: dict[str, Any]) -> set[str]:
    """Generators the preset runs: synth.generators in effect, plus those of the study arms it sets."""
    runs = set(params.synth.generators)
    if "study" in raw:
        runs |= {g for arm in params.study.arms for g in ARM_SYNTH.get(arm, {}).get("generators", [])}
    return runs


def test_presets_exist() -> None:
    assert {"gpu", "lefusion-lidc", "pie", "repaint", "study-gpu", "toy"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_sizes_every_generator_it_runs(preset: str) -> None:
    raw = _raw(preset)
    params = _params(preset)  # validates, cross-key checks (ROI multiples, method among generators) included
    synth = raw.get("synth", {})
    if "roi_size" not in synth:
        assert all(name not in synth for name in ("lefusion", "diffmask", "ddpm", "pie")), (
            f"{preset}: sizes a generator without setting synth.roi_size"
        )
        return
    roi = params.synth.roi_size
    assert tuple(synth["roi_size"]) == roi
    runs = _runs(params, raw)
    assert runs, f"{preset}: sets roi_size but runs no generator"
    for name in sorted(runs):
        section = synth.get(name)
        assert isinstance(section, dict), f"{preset}: runs {name} but has no synth.{name} section sized for {roi}"
        missing = [k for k in NET_KEYS if k not in section]
        assert not missing, f"{preset}: synth.{name} leaves {missing} at the params.yaml (toy) values"
        net = getattr(params.synth, name)
        coarsest = [s // 2 ** (len(net.channel_mults) - 1) for s in roi]
        assert max(coarsest) <= 8, f"{preset}: synth.{name} sees {coarsest} at its coarsest level for ROI {roi}"
    gpu_sized = max(getattr(params.synth, name).base_channels for name in runs) > 8
    if gpu_sized:  # the segmenter it trains (and the acceptance filter runs) is at GPU size too
        train = raw.get("train", {})
        assert all(k in train for k in GPU_TRAIN_KEYS), f"{preset}: GPU generators but a toy-sized segmenter"
        assert params.train.channels == _params("gpu").train.channels


# --------------------------------------------------------------------------- end to end, shrunken


def _shrunken(preset: str) -> list[str]:
    """The preset's overrides, then tiny sizes for every network it runs: its wiring (generators, method, counts,
    channel levels, attention) is kept, widths, T, steps and the ROI shrink to CPU-seconds values."""
    raw = _raw(preset)
    params = _params(preset)
    out = ["synth.roi_size=[16, 16, 16]", "synth.device=cpu", "synth.workers=1"]
    # gates are not wiring: the tiny workspace's thresholds (a 2-step generator makes noise)
    out += ["quality.synthetic.max_histogram_w1=10.0", "quality.synthetic.min_progression_rho=-1.0",
            "quality.synthetic.max_step_change_ratio=1000.0"]  # fmt: skip
    for name in sorted(_runs(params, raw) | set(params.synth.generators)):
        net = getattr(params.synth, name)
        out += [f"synth.{name}.{k}={v}" for k, v in
                {"base_channels": 8, "timesteps": 4, "steps": 1, "batch_size": 2, "grad_accum": 1,
                 "checkpoint_every": 2}.items()]  # fmt: skip
        if "sample_steps" in type(net).model_fields:  # fewer sampling steps than T (0 = all T)
            out += [f"synth.{name}.sample_steps=0"]
        if hasattr(net, "jump_length"):
            out += [f"synth.{name}.jump_length=1", f"synth.{name}.jump_n_sample=1"]
        if name in ("diffmask", "pie"):
            out += [f"synth.{name}.ddim_steps={2 if name == 'pie' else 0}"]
        if name == "pie":
            out += ["synth.pie.iterations=2", f"synth.pie.cases={min(params.synth.pie.cases, 1)}", "synth.pie.margin=2"]
    out += ["synth.candidates_per_case=2", "synth.batch_lesions=2"]
    out += ["train.network=unet", "train.channels=[8, 16]", "train.patch_size=[16, 16, 16]", "train.steps=2",
            "train.compile=false", "train.num_workers=0", "train.device=cpu"]  # fmt: skip
    return _repository_wiring() + preset_overrides(preset, [REPO]) + out


def _repository_wiring() -> list[str]:
    """The repository params.yaml's synth wiring over the tiny workspace's (which trains ddpm and removes), so the
    preset lands on what it lands on in a real project."""
    synth = load_params(REPO / "params.yaml").synth
    return [
        f"synth.generators={list(synth.generators)}".replace("'", ""),
        f"synth.method={synth.method}",
        *(f"synth.{k}={getattr(synth, k)}" for k in ("relesion_per_case", "new_per_case", "remove_per_case")),
        f"synth.lesions_per_sample={synth.lesions_per_sample}",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_end_to_end_shrunken(preset: str, prepared: Path, tmp_path: Path) -> None:
    root = tmp_path / "ws"
    shutil.copytree(prepared, root)
    ws = Workspace.at(root)
    params = load_params(ws.params_file, _shrunken(preset))
    wiring = _params(preset).synth
    assert (params.synth.generators, params.synth.method) == (wiring.generators, wiring.method)
    assert (params.synth.relesion_per_case, params.synth.new_per_case, params.synth.remove_per_case) == (
        wiring.relesion_per_case,
        wiring.new_per_case,
        wiring.remove_per_case,
    )
    for name in SYNTH:
        assert run_cached(name, ws, params, STAGES[name].run).ok, f"{preset}: {name} failed"
    generators = {p.name for p in (root / "models" / "generators").iterdir() if p.is_dir()}
    assert set(params.synth.generators) <= generators
