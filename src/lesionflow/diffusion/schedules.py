"""DDPM noise schedules and the closed-form forward/posterior quantities.

References:

- [DDPM] J. Ho, A. Jain, P. Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020,
  https://arxiv.org/abs/2006.11239 -- Eq. 4 (``q(x_t | x_0)``), Eqs. 6-7 (the posterior ``q(x_{t-1} | x_t, x_0)``),
  Eq. 15 (``x0_hat`` from eps), Sec. 4 (the linear schedule, ``beta`` from 1e-4 to 0.02 over T = 1000).
- [IDDPM] A. Nichol, P. Dhariwal, "Improved Denoising Diffusion Probabilistic Models", ICML 2021,
  https://arxiv.org/abs/2102.09672 -- Eq. 17 (the cosine schedule), Sec. 3.2 (``beta`` clipped to 0.999), Sec. 4
  (sampling on a subsequence ``S`` of the training steps with ``beta_{S_t} = 1 - abar_{S_t} / abar_{S_{t-1}}``;
  the rule that picks ``S`` is ``space_timesteps`` in the authors' ``improved_diffusion/respace.py``,
  https://github.com/openai/improved-diffusion, which RePaint's configs use: ``timestep_respacing: '250'``).

Indexing: a schedule of ``T`` steps is indexed ``t = 0 .. T-1``; index ``t`` is the paper's step ``t + 1``
(so ``alphas_cumprod[0] = abar_1``), and "index -1" stands for the clean ``x_0`` (``abar = 1``).
All buffers are float64; every function returns tensors in the dtype (and on the device) of its input.

Respacing (:func:`respace_schedule`): a :class:`RespacedSchedule` holds an ordinary ``NoiseSchedule`` of ``N``
steps, indexed ``i = 0 .. N-1`` like any other, plus ``timestep_map[i]``, the training index the network must be
fed at respaced step ``i`` (the network was trained on ``0 .. T-1`` and never sees respaced indices). Its
``alphas_cumprod[i]`` equals the original ``alphas_cumprod[timestep_map[i]]`` (up to float64 rounding of the
cumulative product); keeping all ``T`` steps returns the original schedule object itself, so sampling is
bit-identical to not respacing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "NoiseSchedule",
    "RespacedSchedule",
    "cosine_schedule",
    "extract",
    "linear_schedule",
    "predict_x0_from_eps",
    "q_posterior_mean_variance",
    "q_sample",
    "respace_schedule",
    "space_timesteps",
]


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """Precomputed float64 buffers of one beta schedule (all shape ``(T,)``)."""

    betas: Tensor
    alphas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def from_betas(cls, betas: Tensor) -> NoiseSchedule:
        """All buffers from a 1-D beta sequence with ``0 < beta_t < 1``."""
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(f"betas must lie in (0, 1), got range [{betas.min():.3g}, {betas.max():.3g}]")
        # 1. alpha_t = 1 - beta_t ; abar_t = prod_{s<=t} alpha_s ([DDPM] Sec. 2, notation of Eq. 4)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        # 2. abar_{t-1}, with abar_0 = 1 for the first step (x_0 is noise-free)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # 3. posterior q(x_{t-1} | x_t, x_0): variance beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t) ([DDPM] Eq. 7)
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # 4. log variance with the first entry (exactly 0) replaced by the second, so log() stays finite
        first = posterior_variance[1] if betas.numel() > 1 else betas[0]
        posterior_log_variance_clipped = torch.log(torch.cat([first.reshape(1), posterior_variance[1:]]))
        # 5. posterior mean mu_t = c1 x_0 + c2 x_t, c1 = beta_t sqrt(abar_{t-1}) / (1 - abar_t),
        #    c2 = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) ([DDPM] Eq. 7, mu~_t(x_t, x_0))
        coef1 = betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        coef2 = (1.0 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - alphas_cumprod)
        return cls(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=torch.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=torch.sqrt(1.0 - alphas_cumprod),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            posterior_mean_coef1=coef1,
            posterior_mean_coef2=coef2,
        )


def linear_schedule(T: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> NoiseSchedule:
    """DDPM linear betas, scaled by ``1000 / T`` so any T spans the same noise range as T = 1000.

    [DDPM] Sec. 4 (https://arxiv.org/abs/2006.11239): ``beta_1 = 1e-4`` to ``beta_T = 0.02`` for T = 1000; the
    ``1000 / T`` scaling is the "linear" schedule of the [IDDPM] code (https://github.com/openai/improved-diffusion).
    """
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if not 0 < beta_start <= beta_end:
        raise ValueError(f"need 0 < beta_start <= beta_end, got {beta_start}, {beta_end}")
    scale = 1000.0 / T
    if scale * beta_end >= 1:
        raise ValueError(f"T = {T} too small for beta_end = {beta_end}: scaled beta_end {scale * beta_end:.3g} >= 1")
    # beta_t linear from scale*beta_start to scale*beta_end ([DDPM] Sec. 4)
    return NoiseSchedule.from_betas(torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64))


def cosine_schedule(T: int, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
    """Nichol & Dhariwal cosine schedule: ``abar(t) = f(t)/f(0)``, ``f(t) = cos^2(((t/T)+s)/(1+s) * pi/2)``.

    [IDDPM] Eq. 17 (https://arxiv.org/abs/2102.09672), ``s = 0.008``; betas clipped to ``max_beta = 0.999`` as in
    its Sec. 3.2.
    """
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if s < 0:
        raise ValueError(f"s must be >= 0, got {s}")
    if not 0 < max_beta < 1:
        raise ValueError(f"max_beta must lie in (0, 1), got {max_beta}")
    # 1. f(t) on t = 0..T and abar_t = f(t) / f(0) ([IDDPM] Eq. 17)
    steps = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos(((steps / T) + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    # 2. beta_t = min(1 - abar_t / abar_{t-1}, max_beta) ([IDDPM] Sec. 3.2)
    betas = torch.clamp(1.0 - abar[1:] / abar[:-1], min=1e-12, max=max_beta)
    return NoiseSchedule.from_betas(betas)


def extract(buffer: Tensor, t: int | Tensor, like: Tensor) -> Tensor:
    """``buffer[t]`` cast to ``like``'s dtype/device, shaped to broadcast over ``like`` (batch first).

    ``t`` is one int for the whole batch (returns a 0-d tensor) or a ``(B,)`` integer tensor.
    """
    T = buffer.shape[0]
    if isinstance(t, int):
        if not 0 <= t < T:
            raise ValueError(f"timestep {t} outside [0, {T})")
        return buffer[t].to(dtype=like.dtype, device=like.device)
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must have shape ({like.shape[0]},), got {tuple(t.shape)}")
    if bool(((t < 0) | (t >= T)).any()):
        raise ValueError(f"timesteps outside [0, {T})")
    values = buffer.to(device=t.device)[t.long()].to(dtype=like.dtype, device=like.device)
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def q_sample(schedule: NoiseSchedule, x0: Tensor, t: int | Tensor, noise: Tensor) -> Tensor:
    """Forward diffusion ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``: a draw of ``q(x_t | x_0)``, [DDPM] Eq. 4."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    return extract(schedule.sqrt_alphas_cumprod, t, x0) * x0 + extract(
        schedule.sqrt_one_minus_alphas_cumprod, t, x0
    ) * noise.to(x0.dtype)


def predict_x0_from_eps(schedule: NoiseSchedule, x_t: Tensor, t: int | Tensor, eps: Tensor) -> Tensor:
    """``x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (eps-prediction, [DDPM] Eq. 15)."""
    return (x_t - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / extract(
        schedule.sqrt_alphas_cumprod, t, x_t
    )


def q_posterior_mean_variance(
    schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: int | Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, variance and clipped log variance of ``q(x_{t-1} | x_t, x_0)`` ([DDPM] Eqs. 6-7)."""
    mean = extract(schedule.posterior_mean_coef1, t, x_t) * x0 + extract(schedule.posterior_mean_coef2, t, x_t) * x_t
    variance = extract(schedule.posterior_variance, t, x_t)
    log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t)
    return mean, variance, log_variance


# --------------------------------------------------------------------------- respacing


def space_timesteps(T: int, section_counts: str | int) -> tuple[int, ...]:
    """The training indices kept when sampling with fewer steps, ascending: improved-diffusion's rule.

    ``space_timesteps`` of https://github.com/openai/improved-diffusion (``improved_diffusion/respace.py``; [IDDPM]
    Sec. 4, https://arxiv.org/abs/2102.09672), the rule behind RePaint's ``timestep_respacing: '250'``:

    - ``"N"`` (or the int ``N``): ``N`` indices evenly spread over ``0 .. T-1``, both ends kept: ``round(k (T-1) /
      (N-1))`` for ``k = 0 .. N-1`` (Python's round, half to even, as the authors').
    - ``"N1,N2,..."``: ``T`` cut into equal sections (the first ``T mod len`` one step longer), ``N_k`` indices
      spread over section ``k`` as above.
    - ``"ddimN"``: ``range(0, T, s)`` for the smallest integer stride ``s`` (``1 <= s < T``) giving exactly ``N``
      indices (DDIM's uniform subsequence; the last kept index is ``T - s``, not ``T - 1``).
    """
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    spec = str(section_counts).strip()
    if spec.startswith("ddim"):
        try:
            desired = int(spec[len("ddim") :])
        except ValueError:
            raise ValueError(f"respacing {spec!r}: expected 'ddimN' with an integer N") from None
        if desired == T:
            return tuple(range(T))
        for step in range(1, T):
            if len(range(0, T, step)) == desired:
                return tuple(range(0, T, step))
        raise ValueError(f"respacing {spec!r}: no integer stride keeps exactly {desired} of {T} steps")
    try:
        counts = [int(part) for part in spec.split(",")]
    except ValueError:
        raise ValueError(f"respacing {spec!r}: expected 'N', 'N1,N2,...' or 'ddimN' with integers") from None
    if not counts or min(counts) < 1:
        raise ValueError(f"respacing {spec!r}: every section needs >= 1 step")
    # 1. equal sections, the first T mod len one step longer (the authors' size_per / extra)
    size_per, extra = divmod(T, len(counts))
    kept: list[int] = []
    start = 0
    for k, count in enumerate(counts):
        size = size_per + (1 if k < extra else 0)
        if size < count:
            raise ValueError(f"respacing {spec!r}: cannot take {count} steps from a section of {size} (T = {T})")
        # 2. a fractional stride (size-1)/(count-1) from the section start, rounded (both section ends kept)
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return tuple(sorted(set(kept)))


@dataclass(frozen=True, eq=False)
class RespacedSchedule:
    """A schedule of ``N`` kept steps plus ``timestep_map``: respaced index ``i`` -> training index.

    ``schedule`` is indexed ``0 .. N-1`` like any :class:`NoiseSchedule` (its betas are the respaced ones, so an
    ancestral or undo step at ``i`` jumps between two *kept* levels); the network is fed ``timestep_map[i]``.
    """

    schedule: NoiseSchedule
    timestep_map: tuple[int, ...]
    original_num_timesteps: int
    _map_tensor: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.timestep_map) != self.schedule.num_timesteps:
            raise ValueError(f"{len(self.timestep_map)} mapped steps for a schedule of {self.schedule.num_timesteps}")
        object.__setattr__(self, "_map_tensor", torch.tensor(self.timestep_map, dtype=torch.long))

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    @property
    def is_identity(self) -> bool:
        """All training steps kept: sampling on it is sampling on the original schedule."""
        return self.timestep_map == tuple(range(self.original_num_timesteps))

    def original_timesteps(self, t: Tensor) -> Tensor:
        """Training indices of the respaced indices ``t`` (any shape, integer), on ``t``'s device."""
        return self._map_tensor.to(t.device)[t.long()]


def respace_schedule(schedule: NoiseSchedule, section_counts: str | int) -> RespacedSchedule:
    """``schedule`` restricted to the indices :func:`space_timesteps` keeps, as improved-diffusion's
    ``SpacedDiffusion`` (https://github.com/openai/improved-diffusion, ``respace.py``; [IDDPM] Sec. 4,
    https://arxiv.org/abs/2102.09672).

    For kept indices ``t_0 < t_1 < ... < t_{N-1}`` the new betas are ``beta_i = 1 - abar_{t_i} / abar_{t_{i-1}}``
    (``abar_{t_{-1}} = 1``), so the respaced ``abar_i = abar_{t_i}``: the forward marginals at the kept steps are
    unchanged and every posterior / undo step spans one gap between kept steps. Keeping all ``T`` steps returns
    ``schedule`` itself (bit-identical sampling; the ratio form would round the betas differently).
    """
    T = schedule.num_timesteps
    kept = space_timesteps(T, section_counts)
    if kept == tuple(range(T)):
        return RespacedSchedule(schedule=schedule, timestep_map=kept, original_num_timesteps=T)
    abar = schedule.alphas_cumprod[list(kept)]
    # beta_i = 1 - abar_{t_i} / abar_{t_{i-1}} with abar before the first kept step = 1 ([IDDPM] Sec. 4)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    betas = 1.0 - abar / previous
    return RespacedSchedule(schedule=NoiseSchedule.from_betas(betas), timestep_map=kept, original_num_timesteps=T)
