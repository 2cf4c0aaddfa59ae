"""DDPM inpainting (RePaint) on CPU (toy): training on lesion + candidate patches, exact background, removal and
insertion, batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lesionflow.diffusion.samplers import count_network_evaluations
from lesionflow.diffusion.schedules import space_timesteps
from lesionflow.diffusion.unet import ConditionalUNet3D
from lesionflow.params import load_params, preset_overrides
from lesionflow.params_synth import DdpmParams
from lesionflow.seeding import torch_generator
from lesionflow.seg.checkpoint import latest_valid
from lesionflow.synth.inpaint import (
    inpaint,
    inpaint_batch,
    insert_lesion,
    make_ddpm_model,
    network_evaluations,
    noise_schedule,
    patch_batches,
    removal_mask,
    remove_lesion,
    sampling_schedule,
    train_ddpm,
)
from lesionflow.synth.placement import sphere_mask
from lesionflow.synth.rois import Roi, candidate_rois, lesion_rois
from tests.helpers.forward_hooks import fed_timesteps

SIZE = (16, 16, 16)
SETTINGS = DdpmParams(
    timesteps=10, jump_length=2, jump_n_sample=2, removal_dilation=1,
    steps=4, batch_size=2, learning_rate=1e-3, ema_decay=0.5, checkpoint_every=2,
)  # fmt: skip


def _volume(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 32³ image with one bright sphere (label 1) in a corner, so lesion-free 16³ windows exist."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 0.3, (1, 32, 32, 32)).astype(np.float32)
    label = np.zeros((32, 32, 32), np.uint8)
    ball = sphere_mask((32, 32, 32), (8, 9, 8), 3.0)
    label[ball] = 1
    image[0][ball] = 2.0 + rng.normal(0, 0.2, int(ball.sum()))
    return image, label, np.ones((32, 32, 32), np.uint8)


@pytest.fixture(scope="module")
def rois() -> list[Roi]:
    out: list[Roi] = []
    for seed in range(2):
        image, label, organ = _volume(seed)
        out += lesion_rois(image, label, organ, SIZE, case_id=f"c{seed}")
        out += candidate_rois(image, label, organ, SIZE, 2, np.random.default_rng(seed), case_id=f"c{seed}")
    assert [r.kind for r in out].count("candidate") == 4
    return out


@pytest.fixture(scope="module")
def trained(rois: list[Roi], tmp_path_factory: pytest.TempPathFactory) -> tuple[ConditionalUNet3D, Path, list[float]]:
    root = tmp_path_factory.mktemp("ddpm")
    outcome = train_ddpm(rois, SETTINGS, root, seed=0)
    assert outcome.steps_done == 4
    model = outcome.ema
    assert isinstance(model, ConditionalUNet3D)
    return model, root, outcome.history


def _lesion(rois: list[Roi]) -> Roi:
    return next(r for r in rois if r.kind == "lesion")


def test_settings_and_model() -> None:
    assert noise_schedule(SETTINGS).num_timesteps == 10
    assert noise_schedule(DdpmParams(timesteps=100, schedule="linear")).num_timesteps == 100
    with pytest.raises(ValueError, match="removal_dilation"):
        DdpmParams(removal_dilation=-1)
    with pytest.raises(ValueError, match="schedule"):
        DdpmParams(schedule="quadratic")  # type: ignore[arg-type]
    model = make_ddpm_model(2, DdpmParams())
    assert (model.config.in_channels, model.config.out_channels, model.config.cond_dim) == (2, 2, 0)


def test_patch_batches_are_deterministic(rois: list[Roi]) -> None:
    batches = patch_batches(rois, 3, seed=4)
    a = batches(5)
    assert list(a) == ["image"]
    assert a["image"].shape == (3, 1, *SIZE)
    assert a["image"].dtype == torch.float32
    assert torch.equal(a["image"], batches(5)["image"])
    assert torch.equal(a["image"], patch_batches(rois, 3, seed=4)(5)["image"])
    assert not torch.equal(a["image"], batches(6)["image"])
    with pytest.raises(ValueError, match="no ROIs"):
        patch_batches([], 2, seed=0)


def test_training_is_finite_and_checkpointed(trained: tuple[ConditionalUNet3D, Path, list[float]]) -> None:
    _, root, history = trained
    assert len(history) == 4
    assert all(np.isfinite(history))
    assert len([p for p in root.iterdir() if p.name.startswith("step-")]) == 2
    newest = latest_valid(root, warn=pytest.fail)
    assert newest is not None
    assert newest.step == 4


def test_inpaint_is_exact_outside_and_seeded(
    rois: list[Roi], trained: tuple[ConditionalUNet3D, Path, list[float]]
) -> None:
    model = trained[0]
    roi = next(r for r in rois if r.kind == "candidate")
    mask = sphere_mask(SIZE, (8, 8, 8), 3.0)
    out = inpaint(model, SETTINGS, roi.image, mask, torch_generator(0, "inpaint", 1))
    assert out.shape == roi.image.shape
    assert out.dtype == np.float32
    assert np.array_equal(out[:, ~mask], roi.image[:, ~mask])  # bitwise
    assert not np.array_equal(out[:, mask], roi.image[:, mask])
    assert np.isfinite(out).all()
    assert np.array_equal(out, inpaint(model, SETTINGS, roi.image, mask, torch_generator(0, "inpaint", 1)))
    assert not np.array_equal(out, inpaint(model, SETTINGS, roi.image, mask, torch_generator(0, "inpaint", 2)))
    inserted = insert_lesion(model, SETTINGS, roi.image, mask, torch_generator(0, "inpaint", 1))
    assert np.array_equal(inserted, out)  # insertion = inpainting the given mask, no dilation
    with pytest.raises(ValueError, match="mask shape"):
        inpaint(model, SETTINGS, roi.image, mask[:8], torch_generator(0))


def test_empty_mask_returns_the_input_without_the_network(rois: list[Roi]) -> None:
    model = make_ddpm_model(1, DdpmParams())
    calls: list[int] = []
    forward = model.forward

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return forward(*args, **kwargs)

    model.forward = counting  # type: ignore[method-assign]
    image = rois[0].image
    empty = np.zeros(SIZE, bool)
    assert np.array_equal(inpaint(model, SETTINGS, image, empty, torch_generator(0)), image)
    assert np.array_equal(insert_lesion(model, SETTINGS, image, empty, torch_generator(0)), image)
    batch = inpaint_batch(model, SETTINGS, np.stack([image, image]), np.stack([empty, empty]), torch_generator(0))
    assert np.array_equal(batch, np.stack([image, image]))
    assert calls == []
    with pytest.raises(ValueError, match="no lesion to remove"):
        remove_lesion(model, SETTINGS, image, empty, torch_generator(0))


def test_removal_mask_dilation() -> None:
    lesion = np.zeros((7, 7, 7), bool)
    lesion[3, 3, 3] = True
    assert np.array_equal(removal_mask(lesion, 0), lesion)
    one = removal_mask(lesion, 1)
    assert one.sum() == 27  # the 26-neighbourhood plus the voxel
    assert one[2:5, 2:5, 2:5].all()
    assert removal_mask(lesion, 2).sum() == 125
    corner = np.zeros((4, 4, 4), bool)
    corner[0, 0, 0] = True
    assert removal_mask(corner, 1).sum() == 8  # clipped to the ROI
    assert not removal_mask(np.zeros((4, 4, 4), bool), 2).any()
    with pytest.raises(ValueError, match="dilation"):
        removal_mask(lesion, -1)


def test_removal_changes_only_the_dilated_lesion(
    rois: list[Roi], trained: tuple[ConditionalUNet3D, Path, list[float]]
) -> None:
    roi = _lesion(rois)
    out, region = remove_lesion(trained[0], SETTINGS, roi.image, roi.mask, torch_generator(0, "remove"))
    assert np.array_equal(region, removal_mask(roi.mask, 1))
    assert region.sum() > roi.mask.sum()
    changed = np.any(out != roi.image, axis=0)
    assert changed.any()
    assert not changed[~region].any()  # only voxels of the dilated mask change
    assert np.array_equal(out[:, ~region], roi.image[:, ~region])


def test_batch_path_shapes_and_exactness(rois: list[Roi], trained: tuple[ConditionalUNet3D, Path, list[float]]) -> None:
    model = trained[0]
    images = np.stack([r.image for r in rois[:3]])
    masks = np.stack([sphere_mask(SIZE, (8, 8, 8), 2.5), np.zeros(SIZE, bool), removal_mask(_lesion(rois).mask, 1)])
    out = inpaint_batch(model, SETTINGS, images, masks, torch_generator(0, "batch"))
    single = inpaint(model, SETTINGS, images[0], masks[0], torch_generator(0, "single"))
    assert out.shape == images.shape
    assert out[0].shape == single.shape
    for i in range(3):
        assert np.array_equal(out[i][:, ~masks[i]], images[i][:, ~masks[i]])
    assert np.array_equal(out[1], images[1])  # the empty-mask item is the input
    assert not np.array_equal(out[0], images[0])
    assert not np.array_equal(out[2], images[2])
    assert np.array_equal(out, inpaint_batch(model, SETTINGS, images, masks, torch_generator(0, "batch")))
    with pytest.raises(ValueError, match="masks shape"):
        inpaint_batch(model, SETTINGS, images, masks[:2], torch_generator(0))
    with pytest.raises(ValueError, match="unconditional model"):
        inpaint_batch(make_ddpm_model(2, DdpmParams()), SETTINGS, images, masks, torch_generator(0))


def test_non_float32_input_keeps_the_background_exact(trained: tuple[ConditionalUNet3D, Path, list[float]]) -> None:
    image = np.random.default_rng(3).normal(size=(1, *SIZE))  # float64: no float32 round trip outside the mask
    mask = sphere_mask(SIZE, (5, 6, 7), 2.0)
    out = inpaint(trained[0], SETTINGS, image, mask, torch_generator(0, "f64"))
    assert out.dtype == np.float64
    assert np.array_equal(out[:, ~mask], image[:, ~mask])


# --------------------------------------------------------------------------- sampling steps (respacing)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("sample_steps", "kept"), [(5, (0, 5, 10, 14, 19)), (0, tuple(range(20)))])
def test_sample_steps_respace_and_count_the_network_evaluations(
    rois: list[Roi], sample_steps: int, kept: tuple[int, ...]
) -> None:
    params = DdpmParams(timesteps=20, sample_steps=sample_steps, jump_length=2, jump_n_sample=2)
    assert space_timesteps(20, sample_steps or 20) == kept
    assert sampling_schedule(params).timestep_map == kept
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = make_ddpm_model(1, params)
    fed = fed_timesteps(model)
    roi = next(r for r in rois if r.kind == "candidate")
    mask = sphere_mask(SIZE, (8, 8, 8), 3.0)
    out = inpaint(model, params, roi.image, mask, torch_generator(0, "respaced"))
    assert len(fed) == network_evaluations(params) == count_network_evaluations(len(kept), 2, 2)
    assert len(fed) == (9 if sample_steps else 38)
    assert set(fed) == set(kept)  # the network sees training indices, every kept one
    assert fed[0] == 19
    assert np.array_equal(out[:, ~mask], roi.image[:, ~mask])  # bitwise outside the mask
    assert np.isfinite(out).all()


def test_sample_steps_settings_and_the_repaint_preset() -> None:
    with pytest.raises(ValueError, match="sample_steps 60 exceeds timesteps 50"):
        DdpmParams(timesteps=50, sample_steps=60)
    assert DdpmParams().sample_steps == 0  # toy default: all T steps, as before
    assert network_evaluations(DdpmParams()) == 98
    preset = load_params(REPO / "params.yaml", preset_overrides("repaint", [REPO])).synth.ddpm
    assert (preset.timesteps, preset.sample_steps, preset.jump_length, preset.jump_n_sample) == (1000, 250, 10, 10)
    assert network_evaluations(preset) == 2410  # the authors' count (9910 without respacing)
    assert network_evaluations(preset.model_copy(update={"sample_steps": 0})) == 9910
