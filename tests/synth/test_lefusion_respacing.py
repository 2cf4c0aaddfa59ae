"""LeFusion sampling on DDIM-style respaced steps (issue 16): ``synth.lefusion.sample_steps`` keeps ``range(0, T, s)``
of the T training steps, the jump schedule runs over them, the background is merged in at every kept step, and the
network sees training indices. Network evaluations are counted with a forward pre-hook on a real (untrained) model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lesionflow.diffusion.samplers import count_network_evaluations
from lesionflow.params_synth import LeFusionParams
from lesionflow.seeding import torch_generator
from lesionflow.synth.lefusion import make_model, synthesize_in_roi
from lesionflow.synth.placement import sphere_mask
from tests.helpers.forward_hooks import fed_timesteps

SIZE = (16, 16, 16)


@pytest.mark.parametrize(("sample_steps", "kept"), [(5, (0, 4, 8, 12, 16)), (0, tuple(range(20)))])
def test_lefusion_samples_on_the_kept_steps(sample_steps: int, kept: tuple[int, ...]) -> None:
    params = LeFusionParams(
        timesteps=20, sample_steps=sample_steps, jump_length=2, jump_n_sample=2, value_range=(-3.0, 3.0)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = make_model(1, params, (1,))
    fed = fed_timesteps(model)
    image = np.random.default_rng(0).normal(0.0, 0.3, (1, *SIZE)).astype(np.float32)
    mask = sphere_mask(SIZE, (8, 8, 8), 3.0)
    hist = np.full(params.bins, 1.0 / params.bins, np.float32)
    out = synthesize_in_roi(model, params, (1,), image, mask, hist, torch_generator(0, "lefusion-respaced"))
    assert len(fed) == count_network_evaluations(len(kept), 2, 2) == (9 if sample_steps else 38)
    assert set(fed) == set(kept)  # DDIM-style stride 4 (20 / 5), training indices
    assert fed[0] == kept[-1]
    assert np.array_equal(out[:, ~mask], image[:, ~mask])  # bitwise outside the lesion
    assert np.isfinite(out).all()


def test_lefusion_sample_steps_must_be_reachable_by_an_integer_stride() -> None:
    assert LeFusionParams().sample_steps == 0  # the toy default and the authors' LeFusion: all T steps
    assert LeFusionParams(timesteps=300, sample_steps=60).sample_steps == 60
    assert LeFusionParams(timesteps=300, sample_steps=300).sample_steps == 300
    with pytest.raises(ValueError, match=r"sample_steps 250 .* timesteps 300 .*use 150 or 300"):
        LeFusionParams(timesteps=300, sample_steps=250)
    with pytest.raises(ValueError, match="sample_steps 400"):
        LeFusionParams(timesteps=300, sample_steps=400)
    with pytest.raises(ValueError, match="sample_steps 1 "):
        LeFusionParams(timesteps=300, sample_steps=1)
