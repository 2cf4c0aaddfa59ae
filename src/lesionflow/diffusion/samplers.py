"""Model-agnostic DDPM / DDIM / RePaint samplers.

References (equation and algorithm numbers are the papers' own; the numbered steps in the code cite them):

- [DDPM] J. Ho, A. Jain, P. Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020,
  https://arxiv.org/abs/2006.11239 -- Algorithm 2 (sampling), Eq. 4 (``q(x_t | x_0)``), Eqs. 6-7 (the posterior
  ``q(x_{t-1} | x_t, x_0)``: mean ``mu~_t`` and variance ``beta~_t``), Eq. 11 (``mu_theta`` from eps), Eq. 15
  (``x0_hat`` from eps).
- [DDIM] J. Song, C. Meng, S. Ermon, "Denoising Diffusion Implicit Models", ICLR 2021,
  https://arxiv.org/abs/2010.02502 -- Eq. 12 (the generalised step), Eq. 16 (``sigma_t(eta)``).
- [RePaint] A. Lugmayr, M. Danelljan, A. Romero, F. Yu, R. Timofte, L. Van Gool, "RePaint: Inpainting using
  Denoising Diffusion Probabilistic Models", CVPR 2022, https://arxiv.org/abs/2201.09865 -- Algorithm 1,
  Eqs. 8a-8c (known part, unknown part, merge), Sec. 4.2 (resampling, jump length ``j`` and ``r`` repeats);
  authors' code: https://github.com/andreas128/RePaint (``get_schedule_jump`` in ``guided_diffusion/scheduler.py``).
- [IDDPM] A. Nichol, P. Dhariwal, "Improved Denoising Diffusion Probabilistic Models", ICML 2021,
  https://arxiv.org/abs/2102.09672 -- Sec. 4, sampling on a respaced subsequence of the training steps
  (:func:`lesionflow.diffusion.schedules.respace_schedule`), as RePaint's configs do (T = 1000 -> 250 steps).

Conventions
- Timestep indices ``t = 0 .. T-1`` as in :mod:`lesionflow.diffusion.schedules`; index ``-1`` is the clean ``x_0``.
- ``eps_fn(x_t, t_batch) -> eps`` is the trained noise predictor; ``t_batch`` is a ``(B,)`` long tensor.
- Every random draw takes the explicit ``generator`` (see :func:`lesionflow.seeding.torch_generator`); noise is
  drawn on ``x``'s device in ``x``'s dtype, so the generator must live on that device.
- ``mask``: **1 = generate, 0 = keep**. RePaint's mask files use the inverse (255 = keep, 0 = generate); convert
  them with ``mask = (repaint_mask == 0)``.
- Respacing: :func:`ddpm_sample` and :func:`repaint_sample` take a :class:`RespacedSchedule` wherever they take a
  ``NoiseSchedule``. The loop (and RePaint's jump schedule) then runs over the ``N`` kept steps with the respaced
  betas, and ``eps_fn`` is fed the *training* index ``timestep_map[i]`` ([IDDPM] Sec. 4; the authors'
  ``_WrappedModel``). Keeping all ``T`` steps is bit-identical to passing the plain schedule.
- Network evaluations: wrap ``eps_fn`` in :class:`CountingEpsFn` to count the calls a sampler makes (one call =
  one forward pass of the whole batch, i.e. one evaluation per item); :func:`count_network_evaluations` is the
  closed form for RePaint on ``N`` (respaced) steps.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lesionflow.diffusion.paste import check_mask_shape, hard_paste
from lesionflow.diffusion.schedules import (
    NoiseSchedule,
    RespacedSchedule,
    extract,
    predict_x0_from_eps,
    q_posterior_mean_variance,
)

__all__ = [
    "CountingEpsFn",
    "EpsFn",
    "count_network_evaluations",
    "ddim_sample",
    "ddim_step",
    "ddim_timesteps",
    "ddpm_sample",
    "ddpm_step",
    "noise_known",
    "repaint_jump_schedule",
    "repaint_sample",
    "respaced_eps_fn",
    "undo_step",
]

EpsFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class CountingEpsFn:
    """``eps_fn`` that counts its calls (``calls``): the network evaluations of a sampling run, per batch item."""

    eps_fn: EpsFn
    calls: int = 0

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.eps_fn(x_t, t)


def respaced_eps_fn(eps_fn: EpsFn, schedule: NoiseSchedule | RespacedSchedule) -> tuple[NoiseSchedule, EpsFn]:
    """The buffers to step with and the network as the loop must call it: for a :class:`RespacedSchedule`, the
    respaced buffers and ``eps_fn`` fed the training index of each respaced index ([IDDPM] Sec. 4,
    https://arxiv.org/abs/2102.09672; improved-diffusion's ``_WrappedModel`` without ``rescale_timesteps``: our
    networks are trained on indices ``0 .. T-1``). Identity respacing and plain schedules pass through unchanged.
    """
    if not isinstance(schedule, RespacedSchedule):
        return schedule, eps_fn
    if schedule.is_identity:
        return schedule.schedule, eps_fn
    respaced = schedule

    def mapped(x_t: Tensor, t: Tensor) -> Tensor:
        return eps_fn(x_t, respaced.original_timesteps(t))

    return schedule.schedule, mapped


# ``clip_denoised``: False = no clamp, True = clamp x0_hat to [-1, 1] (data scaled like the DDPM papers), or a
# (low, high) range in the data's own units (z-scored volumes). Without a clamp, an undertrained network's eps
# error is amplified by 1/sqrt(alpha_t) (~30x at the cosine schedule's last step) and samples diverge.
Clip = bool | tuple[float, float]


def _clip(x0_hat: Tensor, clip: Clip) -> Tensor:
    if clip is False:
        return x0_hat
    low, high = (-1.0, 1.0) if clip is True else clip
    return x0_hat.clamp(float(low), float(high))


def _randn_like(x: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _alpha_bar(schedule: NoiseSchedule, t: int, like: Tensor) -> Tensor:
    """``abar`` at index t, with ``abar(-1) = 1`` (the clean image)."""
    if t == -1:
        return torch.ones((), dtype=like.dtype, device=like.device)
    return extract(schedule.alphas_cumprod, t, like)


def _t_batch(x: Tensor, t: int) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def _check_jump_args(T: int, jump_length: int, jump_n_sample: int) -> None:
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError(f"jump_length and jump_n_sample must be >= 1, got {jump_length}, {jump_n_sample}")


# --------------------------------------------------------------------------- RePaint time list


def repaint_jump_schedule(T: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """RePaint's time list: ``[T-1, ..., -1]`` with upward "undo" jumps ([RePaint] Sec. 4.2, resampling).

    Walk down from ``T-1`` one index at a time; each time the walk *arrives* at a jump point (a multiple of
    ``jump_length`` below ``T - jump_length``) that still has jumps left, go back up ``jump_length`` indices one
    at a time and walk down again; each jump point does this ``jump_n_sample - 1`` times. Consecutive pairs
    ``(t_last, t_cur)`` are a reverse step at ``t_last`` when ``t_cur < t_last`` and an undo step otherwise.
    ``jump_length = jump_n_sample = 1`` gives the plain list ``T-1, ..., 0, -1``. Same walk as the authors'
    ``get_schedule_jump(t_T, n_sample=1, jump_length, jump_n_sample)`` (its nested jump levels left at their default 1).
    """
    _check_jump_args(T, jump_length, jump_n_sample)
    # 1. jump budget per jump point: multiples of j in [0, T - j)
    jumps_left = {point: jump_n_sample - 1 for point in range(0, T - jump_length, jump_length)}
    # 2. the walk: start at T-1 (x_T is pure noise), one index down per reverse step, j up per jump
    times = [T - 1]
    t = T - 1
    while t >= 0:
        t -= 1
        times.append(t)
        if jumps_left.get(t, 0) > 0:
            jumps_left[t] -= 1
            for _ in range(jump_length):
                t += 1
                times.append(t)
    return times


def count_network_evaluations(T: int, jump_length: int, jump_n_sample: int) -> int:
    """Reverse (denoising) steps in :func:`repaint_jump_schedule`: ``N = T + (T/j - 1)(r - 1) j``.

    The closed form assumes ``j`` divides ``T``; in general the number of jump points is ``ceil((T - j) / j)``.
    With respacing, ``T`` is the number of *kept* steps: RePaint's configs (T = 1000 respaced to 250, j = r = 10)
    give ``count_network_evaluations(250, 10, 10) = 2410`` evaluations per image, 9910 without respacing.
    """
    _check_jump_args(T, jump_length, jump_n_sample)
    jump_points = len(range(0, T - jump_length, jump_length))
    return T + jump_points * (jump_n_sample - 1) * jump_length


# --------------------------------------------------------------------------- single steps


def ddpm_step(
    schedule: NoiseSchedule,
    model_eps: Tensor,
    x_t: Tensor,
    t: int,
    generator: torch.Generator,
    *,
    clip_denoised: Clip = False,
) -> Tensor:
    """Ancestral step ``x_{t-1} = mu_t(x_t, x0_hat) + sigma_t z``, ``sigma_t^2 = beta~_t``, no noise at t = 0.

    [DDPM] Algorithm 2 lines 3-4 (https://arxiv.org/abs/2006.11239), with ``sigma_t^2 = beta~_t`` (Sec. 3.2). The
    mean goes through ``x0_hat`` (Eq. 15) and the posterior mean (Eq. 7), which without a clamp equals Eq. 11's
    ``mu_theta``; the clamp is the authors' code's ``clip_denoised``.
    """
    # 1. x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) ([DDPM] Eq. 15), optionally clamped to the data range
    x0_hat = _clip(predict_x0_from_eps(schedule, x_t, t, model_eps), clip_denoised)
    # 2. mu_t = c1 x0_hat + c2 x_t ; variance beta~_t ([DDPM] Eqs. 6-7)
    mean, variance, _ = q_posterior_mean_variance(schedule, x0_hat, x_t, t)
    if t == 0:
        return mean
    # 3. x_{t-1} = mu_t + sigma_t z, z ~ N(0, I) ([DDPM] Algorithm 2 lines 3-4; z = 0 at the last step)
    return mean + torch.sqrt(variance) * _randn_like(x_t, generator)


def ddim_step(
    schedule: NoiseSchedule,
    model_eps: Tensor,
    x_t: Tensor,
    t: int,
    t_prev: int,
    eta: float,
    generator: torch.Generator,
    *,
    clip_denoised: Clip = False,
) -> Tensor:
    """DDIM step from index ``t`` to ``t_prev < t`` (``-1`` = clean image); ``eta = 0`` is deterministic.

    ``x_{t'} = sqrt(abar_{t'}) x0_hat + sqrt(1 - abar_{t'} - sigma^2) eps + sigma z`` ([DDIM] Eq. 12,
    https://arxiv.org/abs/2010.02502; the paper writes ``alpha`` for our ``abar``) with
    ``sigma = eta sqrt((1 - abar_{t'}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t'})`` ([DDIM] Eq. 16).
    """
    if not -1 <= t_prev < t:
        raise ValueError(f"need -1 <= t_prev < t, got t={t}, t_prev={t_prev}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    abar_t = _alpha_bar(schedule, t, x_t)
    abar_prev = _alpha_bar(schedule, t_prev, x_t)
    # 1. x0_hat from eps ("predicted x_0" of [DDIM] Eq. 12), optionally clamped; re-derive eps so it is consistent
    #    with the clamped x0_hat
    x0_hat = predict_x0_from_eps(schedule, x_t, t, model_eps)
    eps = model_eps
    if clip_denoised is not False:
        x0_hat = _clip(x0_hat, clip_denoised)
        eps = (x_t - torch.sqrt(abar_t) * x0_hat) / torch.sqrt(1.0 - abar_t)
    # 2. sigma_t(eta) ([DDIM] Eq. 16)
    sigma = eta * torch.sqrt((1.0 - abar_prev) / (1.0 - abar_t)) * torch.sqrt(1.0 - abar_t / abar_prev)
    # 3. deterministic part of [DDIM] Eq. 12: sqrt(abar_{t'}) x0_hat + sqrt(1 - abar_{t'} - sigma^2) eps
    out = torch.sqrt(abar_prev) * x0_hat + torch.sqrt((1.0 - abar_prev - sigma**2).clamp(min=0.0)) * eps
    if eta == 0 or t_prev == -1:
        return out
    # 4. + sigma z (the random-noise term of [DDIM] Eq. 12)
    return out + sigma * _randn_like(x_t, generator)


def undo_step(schedule: NoiseSchedule, x_prev: Tensor, t: int, generator: torch.Generator) -> Tensor:
    """RePaint's forward jump ``x_t ~ q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)``.

    [RePaint] Algorithm 1 line 10 (https://arxiv.org/abs/2201.09865), the one-step forward process of [DDPM].
    """
    beta_t = extract(schedule.betas, t, x_prev)
    return torch.sqrt(1.0 - beta_t) * x_prev + torch.sqrt(beta_t) * _randn_like(x_prev, generator)


def noise_known(schedule: NoiseSchedule, known: Tensor, t: int, generator: torch.Generator) -> Tensor:
    """The known region diffused to index ``t``: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) z`` (``t = -1``: ``known``).

    ``q(x_t | x_0)`` of [DDPM] Eq. 4 (https://arxiv.org/abs/2006.11239); [RePaint] Algorithm 1 line 5 / Eq. 8a.
    """
    if t == -1:
        return known
    return extract(schedule.sqrt_alphas_cumprod, t, known) * known + extract(
        schedule.sqrt_one_minus_alphas_cumprod, t, known
    ) * _randn_like(known, generator)


# --------------------------------------------------------------------------- full samplers


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """``steps`` distinct indices evenly spread from ``T-1`` down to 0 (``steps = 1``: just ``T-1``).

    The increasing sub-sequence ``tau`` of [DDIM]'s accelerated sampling (https://arxiv.org/abs/2010.02502), read
    from its end.
    """
    if not 1 <= steps <= T:
        raise ValueError(f"steps must lie in [1, {T}], got {steps}")
    grid = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    return sorted(set(grid), reverse=True)


def ddpm_sample(
    eps_fn: EpsFn,
    shape: tuple[int, ...],
    schedule: NoiseSchedule | RespacedSchedule,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    clip_denoised: Clip = False,
) -> Tensor:
    """Unconditional ancestral sampling over all ``T`` steps (the ``N`` kept ones of a :class:`RespacedSchedule`),
    ``x_T ~ N(0, I)`` on the generator's device.

    [DDPM] Algorithm 2, https://arxiv.org/abs/2006.11239 (our index ``t`` is the paper's ``t + 1``); respaced as in
    [IDDPM] Sec. 4, https://arxiv.org/abs/2102.09672.
    """
    schedule, eps_fn = respaced_eps_fn(eps_fn, schedule)
    # 1. x_T ~ N(0, I) ([DDPM] Algorithm 2 line 1)
    x = torch.randn(shape, generator=generator, dtype=dtype, device=generator.device)
    # 2. t = T-1 .. 0: x_{t-1} = mu_t + sigma_t z ([DDPM] Algorithm 2 lines 2-5)
    for t in range(schedule.num_timesteps - 1, -1, -1):
        x = ddpm_step(schedule, eps_fn(x, _t_batch(x, t)), x, t, generator, clip_denoised=clip_denoised)
    return x


def ddim_sample(
    eps_fn: EpsFn,
    shape: tuple[int, ...],
    schedule: NoiseSchedule,
    *,
    steps: int,
    eta: float = 0.0,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    clip_denoised: Clip = False,
) -> Tensor:
    """Unconditional DDIM sampling over :func:`ddim_timesteps` (``steps`` network evaluations).

    [DDIM] Eq. 12 applied along the sub-sequence, https://arxiv.org/abs/2010.02502.
    """
    timesteps = ddim_timesteps(schedule.num_timesteps, steps)
    # 1. x_T ~ N(0, I)
    x = torch.randn(shape, generator=generator, dtype=dtype, device=generator.device)
    # 2. consecutive pairs (t, t'), the last one to the clean image (t' = -1): one [DDIM] Eq. 12 step each
    for t, t_prev in zip(timesteps, [*timesteps[1:], -1], strict=True):
        eps = eps_fn(x, _t_batch(x, t))
        x = ddim_step(schedule, eps, x, t, t_prev, eta, generator, clip_denoised=clip_denoised)
    return x


def repaint_sample(
    eps_fn: EpsFn,
    known: Tensor,
    mask: Tensor,
    schedule: NoiseSchedule | RespacedSchedule,
    *,
    jump_length: int,
    jump_n_sample: int,
    generator: torch.Generator,
    clip_denoised: Clip = False,
) -> Tensor:
    """RePaint inpainting ([RePaint] Algorithm 1 with resampling): generate where ``mask != 0``, keep the rest.

    Lugmayr et al., CVPR 2022, https://arxiv.org/abs/2201.09865: Algorithm 1, Eqs. 8a-8c, the jump schedule of
    Sec. 4.2 (:func:`repaint_jump_schedule`).

    ``known`` is the volume in normalised units, batch first (e.g. ``(B, C, D, H, W)``); ``mask`` broadcasts to it
    (**1 = generate**, the inverse of RePaint's files). Each reverse step from ``x_t`` produces the unknown part
    ``x_{t-1} ~ p(x_{t-1} | x_t)`` and merges it with the known part diffused to the *same* level ``t-1`` (the
    level of ``x_{t-1}``, not ``t``); the last merge (``t-1 = -1``) uses ``known`` itself. Undo steps
    diffuse the whole volume one level up. The result is finally hard-pasted (not part of Algorithm 1), so voxels
    with ``mask == 0`` equal ``known`` bitwise.

    With a :class:`RespacedSchedule` of ``N`` kept steps (RePaint's configs: T = 1000, ``timestep_respacing:
    '250'``) the jump schedule runs over the ``N`` respaced indices, the known part is merged at every kept step,
    undo steps use the respaced betas (one jump = one gap between kept steps) and ``eps_fn`` sees training indices
    ([IDDPM] Sec. 4, https://arxiv.org/abs/2102.09672): ``count_network_evaluations(N, j, r)`` model calls.
    """
    if not known.is_floating_point():
        raise ValueError(f"known must be a floating tensor (normalised units), got {known.dtype}")
    check_mask_shape(mask, known)
    generate = (mask != 0).to(known.device)
    # 0. respacing: step on the kept levels, feed the network training indices ([IDDPM] Sec. 4)
    schedule, eps_fn = respaced_eps_fn(eps_fn, schedule)
    times = repaint_jump_schedule(schedule.num_timesteps, jump_length, jump_n_sample)
    # 1. x_T ~ N(0, I) (Alg. 1 line 1)
    x = _randn_like(known, generator)
    for t_last, t_cur in itertools.pairwise(times):
        if t_cur < t_last:
            # 2. unknown part: x_{t-1}^unknown = mu_t + sigma_t z ([RePaint] Alg. 1 lines 6-7, Eq. 8b)
            eps = eps_fn(x, _t_batch(x, t_last))
            unknown = ddpm_step(schedule, eps, x, t_last, generator, clip_denoised=clip_denoised)
            # 3. known part at level t-1: sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1}) eps ([RePaint] Alg. 1 line 5,
            #    Eq. 8a)
            known_t = noise_known(schedule, known, t_cur, generator)
            # 4. x_{t-1} = m ⊙ known + (1 - m) ⊙ unknown, m = keep ([RePaint] Alg. 1 line 8, Eq. 8c)
            x = torch.where(generate, unknown, known_t)
        else:
            # 5. resampling: x_t ~ N(sqrt(1 - beta_t) x_{t-1}, beta_t I) ([RePaint] Alg. 1 line 10, Sec. 4.2)
            x = undo_step(schedule, x, t_cur, generator)
    # 6. final hard paste (ours, not a step of [RePaint] Alg. 1): the known region is returned bit for bit
    return hard_paste(x, known, mask)
