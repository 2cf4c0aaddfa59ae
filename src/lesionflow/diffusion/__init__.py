"""Shared diffusion core: noise schedules, model-agnostic samplers (DDPM, DDIM, RePaint) and the final paste.

Pure torch functions, no I/O; every random draw takes an explicit ``torch.Generator``
(:func:`lesionflow.seeding.torch_generator`). Reference: generative.md §1, §2.6, §3, §9.1.
"""

from lesionflow.diffusion.paste import hard_paste, paste_dtype
from lesionflow.diffusion.samplers import (
    EpsFn,
    count_network_evaluations,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    ddpm_sample,
    ddpm_step,
    noise_known,
    repaint_jump_schedule,
    repaint_sample,
    undo_step,
)
from lesionflow.diffusion.schedules import (
    NoiseSchedule,
    cosine_schedule,
    extract,
    linear_schedule,
    predict_x0_from_eps,
    q_posterior_mean_variance,
    q_sample,
)

__all__ = [
    "EpsFn",
    "NoiseSchedule",
    "cosine_schedule",
    "count_network_evaluations",
    "ddim_sample",
    "ddim_step",
    "ddim_timesteps",
    "ddpm_sample",
    "ddpm_step",
    "extract",
    "hard_paste",
    "linear_schedule",
    "noise_known",
    "paste_dtype",
    "predict_x0_from_eps",
    "q_posterior_mean_variance",
    "q_sample",
    "repaint_jump_schedule",
    "repaint_sample",
    "undo_step",
]
