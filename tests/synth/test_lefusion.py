"""LeFusion end to end on CPU (toy): train on lesion ROIs, then generate inside a mask with RePaint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lesionflow.diffusion.samplers import count_network_evaluations
from lesionflow.diffusion.trainer import GeneratorTrainConfig
from lesionflow.seeding import torch_generator
from lesionflow.synth.lefusion import (
    LeFusionSettings,
    lesion_conditions,
    synthesize_in_roi,
    train_lefusion,
    training_batches,
)
from lesionflow.synth.placement import sphere_mask
from lesionflow.synth.rois import lesion_rois

SIZE = (16, 16, 16)


def _case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 32³ z-scored-like image with two bright spheres (label 1) of different textures."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 0.3, (1, 32, 32, 32)).astype(np.float32)
    label = np.zeros((32, 32, 32), np.uint8)
    for centre, level in (((9, 10, 11), 1.5), ((22, 21, 20), 2.5)):
        ball = sphere_mask((32, 32, 32), centre, 3.5)
        label[ball] = 1
        image[0][ball] = level + rng.normal(0, 0.2, int(ball.sum()))
    return image, label


@pytest.fixture(scope="module")
def rois() -> list:  # type: ignore[type-arg]
    out = []
    for seed in range(3):
        image, label = _case(seed)
        out += lesion_rois(image, label, None, SIZE, case_id=f"c{seed}")
    return out


def test_conditions_and_batches_are_deterministic(rois: list) -> None:  # type: ignore[type-arg]
    settings = LeFusionSettings()
    conds = lesion_conditions(rois, settings)
    assert conds.shape == (6, 16)
    np.testing.assert_allclose(conds.sum(axis=1), 1.0)
    batches = training_batches(rois, conds, 4, seed=3)
    a, b = batches(7), batches(7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["image"].shape == (4, 1, *SIZE)
    assert a["mask"].shape == (4, 1, *SIZE)
    assert a["cond"].shape == (4, 16)
    assert not torch.equal(batches(8)["image"], a["image"])


def test_train_then_generate_keeps_the_background_exact(rois: list, tmp_path: Path) -> None:  # type: ignore[type-arg]
    settings = LeFusionSettings(timesteps=10, jump_length=2, jump_n_sample=2, bank_k=2)
    config = GeneratorTrainConfig(steps=6, batch_size=2, lr=1e-3, ema_decay=0.5, checkpoint_every=3)
    outcome, bank = train_lefusion(rois, settings, config, tmp_path / "ckpt", seed=0)
    assert outcome.steps_done == 6
    assert len(outcome.history) == 6
    assert bank.k == 2
    target = rois[0].image
    mask = sphere_mask(SIZE, (8, 8, 8), 3.0)
    hist = bank.sample("cluster", np.random.default_rng(0)).histogram
    calls = []
    model = outcome.ema
    original_forward = model.forward

    def counting_forward(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return original_forward(*args, **kwargs)

    model.forward = counting_forward  # type: ignore[method-assign]
    out = synthesize_in_roi(model, settings, target, mask, hist, torch_generator(0, "sample", 1))
    assert len(calls) == count_network_evaluations(10, 2, 2)
    assert out.shape == target.shape
    assert np.array_equal(out[0][~mask], target[0][~mask])  # bitwise, outside the lesion
    assert not np.array_equal(out[0][mask], target[0][mask])
    assert np.isfinite(out).all()
    again = synthesize_in_roi(model, settings, target, mask, hist, torch_generator(0, "sample", 1))
    assert np.array_equal(out, again)
    other = synthesize_in_roi(model, settings, target, mask, hist, torch_generator(0, "sample", 2))
    assert not np.array_equal(out, other)
    with pytest.raises(ValueError, match="empty"):
        synthesize_in_roi(model, settings, target, np.zeros(SIZE, bool), hist, torch_generator(0))
