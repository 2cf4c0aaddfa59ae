"""Schedule identities (generative.md §1, §9.7 item 4)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from lesionflow.diffusion.schedules import (
    NoiseSchedule,
    cosine_schedule,
    extract,
    linear_schedule,
    predict_x0_from_eps,
    q_posterior_mean_variance,
    q_sample,
    respace_schedule,
    space_timesteps,
)
from lesionflow.seeding import torch_generator

SCHEDULES = {
    "linear-1000": lambda: linear_schedule(1000),
    "linear-50": lambda: linear_schedule(50),
    "cosine-300": lambda: cosine_schedule(300),
    "cosine-50": lambda: cosine_schedule(50),
}


@pytest.fixture(params=sorted(SCHEDULES))
def schedule(request: pytest.FixtureRequest) -> NoiseSchedule:
    return SCHEDULES[request.param]()


def test_buffers_are_float64_and_length_t(schedule: NoiseSchedule) -> None:
    T = schedule.num_timesteps
    for name, value in vars(schedule).items():
        assert value.dtype == torch.float64, name
        assert value.shape == (T,), name
        assert torch.isfinite(value).all(), name


def test_alphas_cumprod_strictly_decreasing_in_unit_interval(schedule: NoiseSchedule) -> None:
    abar = schedule.alphas_cumprod
    assert (abar > 0).all()
    assert (abar <= 1).all()
    assert (abar[1:] < abar[:-1]).all()
    assert torch.allclose(abar, torch.cumprod(1 - schedule.betas, 0), rtol=0, atol=1e-15)
    assert schedule.alphas_cumprod_prev[0] == 1
    assert torch.equal(schedule.alphas_cumprod_prev[1:], abar[:-1])


def test_posterior_closed_forms(schedule: NoiseSchedule) -> None:
    b, abar, prev = schedule.betas, schedule.alphas_cumprod, schedule.alphas_cumprod_prev
    torch.testing.assert_close(schedule.posterior_variance, b * (1 - prev) / (1 - abar), rtol=1e-12, atol=0)
    assert schedule.posterior_variance[0] == 0
    torch.testing.assert_close(schedule.posterior_mean_coef1, b * prev.sqrt() / (1 - abar), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        schedule.posterior_mean_coef2, (1 - prev) * (1 - b).sqrt() / (1 - abar), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(schedule.posterior_log_variance_clipped[1:], schedule.posterior_variance[1:].log())
    # coefficients at t = 0: the posterior mean is x0 itself
    assert schedule.posterior_mean_coef1[0] == pytest.approx(1.0, abs=1e-12)
    assert schedule.posterior_mean_coef2[0] == 0


def test_linear_schedule_scaled_to_t() -> None:
    ref, small = linear_schedule(1000), linear_schedule(100)
    assert ref.betas[0].item() == pytest.approx(1e-4)
    assert ref.betas[-1].item() == pytest.approx(2e-2)
    assert small.betas[0].item() == pytest.approx(1e-3)
    assert small.betas[-1].item() == pytest.approx(2e-1)
    # same overall noise level at the end of the chain
    assert small.alphas_cumprod[-1].item() == pytest.approx(ref.alphas_cumprod[-1].item(), rel=0.5, abs=1e-4)


def test_cosine_endpoints() -> None:
    s = cosine_schedule(300)
    f = lambda t: math.cos((t / 300 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert s.alphas_cumprod[0].item() == pytest.approx(f(1) / f(0), rel=1e-12)
    assert s.alphas_cumprod[0].item() > 0.999
    assert s.alphas_cumprod[-1].item() < 1e-4
    assert s.betas.max().item() <= 0.999
    assert cosine_schedule(50, max_beta=0.5).betas.max().item() == 0.5


@pytest.mark.parametrize(
    "call",
    [
        lambda: linear_schedule(0),
        lambda: linear_schedule(10),  # scaled beta_end = 2.0
        lambda: cosine_schedule(0),
        lambda: cosine_schedule(10, max_beta=1.0),
        lambda: NoiseSchedule.from_betas(torch.tensor([0.1, 0.0])),
    ],
)
def test_invalid_arguments(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match=r"must|too small"):
        call()


def test_q_sample_statistics() -> None:
    s = cosine_schedule(50)
    x0 = torch.full((1, 200_000), 0.7)
    gen = torch_generator(0, "test", "q_sample")
    for t in (0, 10, 25, 49):
        xt = q_sample(s, x0, t, torch.randn(x0.shape, generator=gen))
        mean, var = s.sqrt_alphas_cumprod[t].item() * 0.7, 1 - s.alphas_cumprod[t].item()
        assert xt.mean().item() == pytest.approx(mean, abs=5 * math.sqrt(var / x0.numel()))
        assert xt.var().item() == pytest.approx(var, rel=0.02)


def test_dtype_follows_input_and_per_sample_t() -> None:
    s = linear_schedule(100)
    x0 = torch.randn(3, 1, 4, 4, 4, generator=torch_generator(1)).to(torch.float16)
    noise = torch.randn(x0.shape, generator=torch_generator(2)).to(torch.float16)
    t = torch.tensor([0, 50, 99])
    xt = q_sample(s, x0, t, noise)
    assert xt.dtype == torch.float16
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(xt[i], q_sample(s, x0[i : i + 1], ti, noise[i : i + 1])[0])
    assert extract(s.betas, t, x0).shape == (3, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="outside"):
        extract(s.betas, 100, x0)


def test_predict_x0_and_posterior_roundtrip() -> None:
    s = cosine_schedule(50)
    x0 = torch.rand(2, 1, 8, 8, 8, generator=torch_generator(3), dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=torch_generator(4), dtype=torch.float64)
    for t in (0, 7, 49):
        xt = q_sample(s, x0, t, eps)
        torch.testing.assert_close(predict_x0_from_eps(s, xt, t, eps), x0, rtol=1e-9, atol=1e-9)
        mean, var, log_var = q_posterior_mean_variance(s, x0, xt, t)
        assert mean.dtype == torch.float64
        assert var.item() == s.posterior_variance[t].item()
        assert log_var.item() == s.posterior_log_variance_clipped[t].item()
    # at t = 0 the posterior mean is exactly x0 (up to float)
    mean, _, _ = q_posterior_mean_variance(s, x0, q_sample(s, x0, 0, eps), 0)
    torch.testing.assert_close(mean, x0, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- respacing (improved-diffusion respace.py)


def test_space_timesteps_known_values() -> None:
    # "N": N indices evenly spread over 0 .. T-1, both ends kept; Python's round (half to even) as the authors'
    assert space_timesteps(10, "4") == (0, 3, 6, 9)
    assert space_timesteps(10, 3) == (0, 4, 9)  # 4.5 rounds to 4
    assert space_timesteps(10, "2,3") == (0, 4, 5, 7, 9)  # two sections of 5: {0, 4} and {5, 7, 9}
    assert space_timesteps(11, "1,1") == (0, 6)  # the first section is one step longer (6 + 5)
    rp = space_timesteps(1000, "250")  # RePaint's timestep_respacing
    assert len(rp) == 250
    assert rp[:4] == (0, 4, 8, 12)
    assert rp[-2:] == (995, 999)
    # "ddimN": the smallest integer stride giving exactly N indices, from 0
    assert space_timesteps(1000, "ddim50") == tuple(range(0, 1000, 20))
    assert space_timesteps(300, "ddim60") == tuple(range(0, 300, 5))
    assert space_timesteps(10, "ddim4") == (0, 3, 6, 9)
    for spec in ("50", "ddim50", 50):
        assert space_timesteps(50, spec) == tuple(range(50))


@pytest.mark.parametrize(("T", "spec"), [(10, "ddim7"), (10, "11"), (10, "0"), (10, "abc"), (10, "ddimx"), (10, "3,9")])
def test_space_timesteps_rejects_impossible_counts(T: int, spec: str) -> None:
    with pytest.raises(ValueError, match="respacing"):
        space_timesteps(T, spec)


@pytest.mark.parametrize("spec", ["ddim10", "25", "7", "3,4"])
def test_respaced_alphas_cumprod_equal_the_original_at_kept_steps(schedule: NoiseSchedule, spec: str) -> None:
    T = schedule.num_timesteps
    if spec == "ddim10" and T % 10:
        pytest.skip("ddim10 needs an integer stride")
    r = respace_schedule(schedule, spec)
    kept = list(r.timestep_map)
    assert kept == sorted(set(kept))
    assert r.original_num_timesteps == T
    assert r.num_timesteps == len(kept) < T
    # equal up to the float64 rounding of the cumulative product (relative 6e-12 at abar ~ 3e-8)
    torch.testing.assert_close(r.schedule.alphas_cumprod, schedule.alphas_cumprod[kept], rtol=1e-10, atol=0)
    # beta_i = 1 - abar_{t_i} / abar_{t_{i-1}}: a respaced beta spans one gap of kept steps (larger than any one)
    b = r.schedule.betas
    assert b[0].item() == pytest.approx(1 - schedule.alphas_cumprod[kept[0]].item(), rel=1e-12)
    assert bool((b[1:] >= schedule.betas[kept[1:]]).all())
    assert not r.is_identity
    mapped = r.original_timesteps(torch.arange(len(kept)))
    assert mapped.tolist() == kept
    assert mapped.dtype == torch.long


def test_respacing_to_all_steps_is_the_schedule_itself(schedule: NoiseSchedule) -> None:
    T = schedule.num_timesteps
    for spec in (T, str(T), f"ddim{T}"):
        r = respace_schedule(schedule, spec)
        assert r.schedule is schedule
        assert r.is_identity
        assert r.timestep_map == tuple(range(T))
