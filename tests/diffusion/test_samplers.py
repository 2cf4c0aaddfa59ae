"""Samplers: RePaint jump schedule, single steps, and exact recovery with an oracle noise predictor.

The oracle ``eps_fn`` knows the clean target ``x0`` and returns the true noise ``(x_t - sqrt(abar_t) x0) /
sqrt(1 - abar_t)``, so ``x0_hat = x0`` at every step and every sampler must end at ``x0`` (generative.md §9.7).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from lesionflow.diffusion.samplers import (
    CountingEpsFn,
    EpsFn,
    count_network_evaluations,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    ddpm_sample,
    ddpm_step,
    repaint_jump_schedule,
    repaint_sample,
    undo_step,
)
from lesionflow.diffusion.schedules import (
    NoiseSchedule,
    cosine_schedule,
    linear_schedule,
    q_sample,
    respace_schedule,
)
from lesionflow.seeding import torch_generator

SHAPE = (2, 1, 8, 8, 8)


def oracle(schedule: NoiseSchedule, x0: Tensor, calls: list[tuple[int, Tensor]] | None = None) -> EpsFn:
    def eps_fn(x_t: Tensor, t: Tensor) -> Tensor:
        assert t.dtype == torch.long
        assert t.shape == (x_t.shape[0],)
        if calls is not None:
            calls.append((int(t[0]), x_t.clone()))
        abar = schedule.alphas_cumprod[t].to(x_t.dtype).reshape(-1, 1, 1, 1, 1)
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    return eps_fn


def _volumes(dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """(known, target, mask): target differs from known inside a cube; mask 1 = generate."""
    gen = torch_generator(0, "samplers", "volumes")
    known = (torch.rand(SHAPE, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
    mask = torch.zeros(SHAPE, dtype=dtype)
    mask[..., 2:6, 2:6, 1:5] = 1
    lesion = torch.full(SHAPE, 0.8, dtype=dtype)
    target = torch.where(mask.bool(), lesion, known)
    return known, target, mask


# --------------------------------------------------------------------------- jump schedule


def _runs(steps: list[int]) -> list[tuple[int, tuple[bool, list[int]]]]:
    """(start index, (is_up, steps)) for each maximal run of equal-direction steps."""
    out, start = [], 0
    for up, group in itertools.groupby(steps, key=lambda d: d > 0):
        block = list(group)
        out.append((start, (up, block)))
        start += len(block)
    return out


CASES = [(10, 1, 1), (6, 2, 2), (50, 2, 2), (300, 5, 5), (300, 2, 2), (300, 10, 10), (250, 10, 10), (1, 1, 1)]
IRREGULAR = [(30, 7, 3), (5, 10, 3), (17, 4, 1)]


@pytest.mark.parametrize(("T", "j", "r"), CASES + IRREGULAR)
def test_jump_schedule_shape(T: int, j: int, r: int) -> None:
    times = repaint_jump_schedule(T, j, r)
    assert times[0] == T - 1
    assert times[-1] == -1
    assert min(times) == -1
    assert max(times) == T - 1
    steps = [b - a for a, b in itertools.pairwise(times)]
    assert set(steps) <= {-1, 1}
    downs = steps.count(-1)
    assert downs == count_network_evaluations(T, j, r)
    assert downs - steps.count(1) == T  # every undo step is walked down again
    # upward runs are exactly j long, r - 1 of them per jump point (multiples of j below T - j)
    runs = [(times[i], len(g)) for i, (up, g) in _runs(steps) if up]
    assert all(length == j for _, length in runs)
    expected_points = sorted(p for p in range(0, T - j, j) for _ in range(r - 1))
    assert sorted(start for start, _ in runs) == expected_points


@pytest.mark.parametrize(("T", "j", "r"), CASES)
def test_evaluation_formula(T: int, j: int, r: int) -> None:
    assert count_network_evaluations(T, j, r) == T + (T // j - 1) * (r - 1) * j


def test_known_counts_and_small_example() -> None:
    assert count_network_evaluations(300, 5, 5) == 1480
    assert count_network_evaluations(300, 2, 2) == 598
    assert count_network_evaluations(300, 10, 10) == 2910
    assert count_network_evaluations(250, 10, 10) == 2410
    assert count_network_evaluations(50, 2, 2) == 98
    assert repaint_jump_schedule(6, 2, 2) == [5, 4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, -1]
    assert repaint_jump_schedule(5, 1, 1) == [4, 3, 2, 1, 0, -1]
    with pytest.raises(ValueError, match="T must be"):
        repaint_jump_schedule(0, 1, 1)
    with pytest.raises(ValueError, match="jump_length"):
        count_network_evaluations(10, 0, 2)


# --------------------------------------------------------------------------- single steps


def test_ddpm_step_no_noise_at_zero_and_noise_above() -> None:
    s = cosine_schedule(50)
    x0 = _volumes()[0]
    xt = q_sample(s, x0, 0, torch.randn(SHAPE, generator=torch_generator(1), dtype=torch.float64))
    eps = torch.zeros(SHAPE, dtype=torch.float64)
    a = ddpm_step(s, eps, xt, 0, torch_generator(2))
    b = ddpm_step(s, eps, xt, 0, torch_generator(3))
    assert torch.equal(a, b)
    assert not torch.equal(ddpm_step(s, eps, xt, 5, torch_generator(2)), ddpm_step(s, eps, xt, 5, torch_generator(3)))


def test_ddim_eta0_is_exact_on_the_forward_trajectory() -> None:
    s = linear_schedule(100)
    x0 = _volumes()[0]
    eps = torch.randn(SHAPE, generator=torch_generator(4), dtype=torch.float64)
    xt = q_sample(s, x0, 80, eps)
    out = ddim_step(s, eps, xt, 80, 30, 0.0, torch_generator(5))
    torch.testing.assert_close(out, q_sample(s, x0, 30, eps), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ddim_step(s, eps, xt, 80, -1, 0.7, torch_generator(5)), x0, rtol=1e-9, atol=1e-9)


def test_undo_step_statistics() -> None:
    s = cosine_schedule(50)
    x = torch.full((1, 100_000), 0.5, dtype=torch.float64)
    out = undo_step(s, x, 20, torch_generator(6))
    beta = s.betas[20].item()
    assert out.mean().item() == pytest.approx((1 - beta) ** 0.5 * 0.5, abs=5 * (beta / x.numel()) ** 0.5)
    assert out.var().item() == pytest.approx(beta, rel=0.02)


def test_ddim_timesteps() -> None:
    assert ddim_timesteps(50, 50) == list(range(49, -1, -1))
    ts = ddim_timesteps(50, 10)
    assert len(ts) == 10
    assert ts[0] == 49
    assert ts[-1] == 0
    assert ddim_timesteps(50, 1) == [49]
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(50, 51)


# --------------------------------------------------------------------------- oracle recovery


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ddpm_and_ddim_recover_x0(dtype: torch.dtype) -> None:
    s = cosine_schedule(50)
    x0 = _volumes(dtype)[1]
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    out = ddpm_sample(oracle(s, x0), SHAPE, s, generator=torch_generator(7), dtype=dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out, x0, rtol=0, atol=tol)
    for eta in (0.0, 1.0):
        out = ddim_sample(oracle(s, x0), SHAPE, s, steps=10, eta=eta, generator=torch_generator(8), dtype=dtype)
        torch.testing.assert_close(out, x0, rtol=0, atol=tol)


@pytest.mark.parametrize(("j", "r"), [(1, 1), (2, 2), (5, 3)])
def test_repaint_recovers_target_and_keeps_background(j: int, r: int) -> None:
    s = cosine_schedule(50)
    known, target, mask = _volumes()
    calls: list[tuple[int, Tensor]] = []
    out = repaint_sample(
        oracle(s, target, calls), known, mask, s, jump_length=j, jump_n_sample=r, generator=torch_generator(9)
    )
    assert len(calls) == count_network_evaluations(50, j, r)
    torch.testing.assert_close(out, target, rtol=0, atol=1e-9)  # inside: the oracle's lesion
    keep = mask == 0
    assert torch.equal(out[keep], known[keep])  # outside: bitwise


def test_repaint_empty_mask_returns_known_exactly() -> None:
    s = cosine_schedule(50)
    known, _, mask = _volumes(torch.float32)
    bad_model = lambda x, t: torch.full_like(x, 3.0)  # noqa: E731 - anything, the mask keeps everything
    out = repaint_sample(
        bad_model, known, torch.zeros_like(mask), s, jump_length=2, jump_n_sample=2, generator=torch_generator(10)
    )
    assert torch.equal(out, known)


def test_repaint_full_mask_is_unconditional_generation() -> None:
    s = cosine_schedule(50)
    known, target, mask = _volumes()
    other = -target
    out = repaint_sample(
        oracle(s, other), known, torch.ones_like(mask), s, jump_length=2, jump_n_sample=2, generator=torch_generator(11)
    )
    torch.testing.assert_close(out, other, rtol=0, atol=1e-9)


def test_repaint_known_noised_to_the_level_of_the_next_model_call() -> None:
    """With everything known (x0 = 0) the model input at index t must have variance 1 - abar_t (the known part is
    diffused to the level of the next model call, RePaint Algorithm 1 line 5, https://arxiv.org/abs/2201.09865)."""
    s = cosine_schedule(50)
    shape = (2, 1, 16, 16, 16)
    zeros = torch.zeros(shape, dtype=torch.float64)
    calls: list[tuple[int, Tensor]] = []
    repaint_sample(
        oracle(s, zeros, calls),
        zeros,
        torch.zeros(shape),
        s,
        jump_length=2,
        jump_n_sample=2,
        generator=torch_generator(12),
    )
    # Without this the loop below checks nothing when the sampler never calls the model (or calls it once).
    assert len(calls) > 1, f"repaint_sample called the model {len(calls)} time(s); the variance check needs >= 2 calls"
    assert len(calls) == count_network_evaluations(50, 2, 2)
    for t, x in calls[1:]:  # the first call sees x_T ~ N(0, I)
        assert x.var().item() / (1 - s.alphas_cumprod[t].item()) == pytest.approx(1.0, abs=0.15), t


def test_repaint_seeds() -> None:
    s = cosine_schedule(20)
    known, _, mask = _volumes(torch.float32)
    model = lambda x, t: 0.5 * x  # noqa: E731 - a crude, non-oracle predictor

    def run(seed: int) -> Tensor:
        return repaint_sample(
            model, known, mask, s, jump_length=2, jump_n_sample=2, generator=torch_generator(seed, "case")
        )

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert not torch.equal(a[mask == 1], c[mask == 1])
    assert torch.equal(a[mask == 0], known[mask == 0])
    assert torch.equal(c[mask == 0], known[mask == 0])


def test_ddpm_ddim_seeds() -> None:
    s = cosine_schedule(20)
    model = lambda x, t: 0.5 * x  # noqa: E731
    for sample in (
        lambda g: ddpm_sample(model, SHAPE, s, generator=g),
        lambda g: ddim_sample(model, SHAPE, s, steps=5, eta=0.0, generator=g),
    ):
        a, b, c = sample(torch_generator(1)), sample(torch_generator(1)), sample(torch_generator(2))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_repaint_rejects_bad_inputs() -> None:
    s = cosine_schedule(20)
    known, _, mask = _volumes()
    with pytest.raises(ValueError, match="mask shape"):
        repaint_sample(
            oracle(s, known), known, mask[..., :3], s, jump_length=1, jump_n_sample=1, generator=torch_generator(0)
        )
    with pytest.raises(ValueError, match="floating"):
        repaint_sample(
            oracle(s, known), known.long(), mask, s, jump_length=1, jump_n_sample=1, generator=torch_generator(0)
        )


# --------------------------------------------------------------------------- respaced sampling (RePaint's 250 steps)


def _crude(x: Tensor, t: Tensor) -> Tensor:
    """A non-oracle predictor whose output depends on the timestep it is fed."""
    return 0.5 * x + 1e-3 * t.to(x.dtype).reshape(-1, 1, 1, 1, 1)


@pytest.mark.parametrize("spec", ["50", "ddim50"])
def test_respacing_to_all_steps_is_bit_identical(spec: str) -> None:
    s = cosine_schedule(50)
    known, _, mask = _volumes(torch.float32)
    plain = repaint_sample(_crude, known, mask, s, jump_length=2, jump_n_sample=2, generator=torch_generator(1, "x"))
    spaced = repaint_sample(
        _crude,
        known,
        mask,
        respace_schedule(s, spec),
        jump_length=2,
        jump_n_sample=2,
        generator=torch_generator(1, "x"),
    )
    assert torch.equal(plain.view(torch.int32), spaced.view(torch.int32))
    a = ddpm_sample(_crude, SHAPE, s, generator=torch_generator(2))
    b = ddpm_sample(_crude, SHAPE, respace_schedule(s, spec), generator=torch_generator(2))
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize(("spec", "j", "r"), [("25", 1, 1), ("25", 5, 3), ("ddim20", 2, 2), ("10,5", 3, 2)])
def test_respaced_repaint_recovers_target_and_keeps_background(spec: str, j: int, r: int) -> None:
    """The oracle computes the true noise from the *training* schedule at the index it is fed: recovery proves the
    network sees training indices and the respaced buffers step between the kept levels."""
    s = cosine_schedule(100)
    spaced = respace_schedule(s, spec)
    known, target, mask = _volumes()
    calls: list[tuple[int, Tensor]] = []
    out = repaint_sample(
        oracle(s, target, calls), known, mask, spaced, jump_length=j, jump_n_sample=r, generator=torch_generator(9)
    )
    assert len(calls) == count_network_evaluations(spaced.num_timesteps, j, r)
    assert {t for t, _ in calls} == set(spaced.timestep_map)  # training indices, every kept one
    assert calls[0][0] == spaced.timestep_map[-1]
    torch.testing.assert_close(out, target, rtol=0, atol=1e-9)
    keep = mask == 0
    assert torch.equal(out[keep], known[keep])  # the known region is the known input, bit for bit
    assert ddpm_sample(oracle(s, target), SHAPE, spaced, generator=torch_generator(3), dtype=torch.float64).allclose(
        target, rtol=0, atol=1e-9
    )


def test_respaced_known_region_noised_to_the_kept_level() -> None:
    """Everything known (x0 = 0): the model input at training index t has variance 1 - abar_t, also after the undo
    steps, which must use the respaced betas (one jump = one gap between kept steps)."""
    s = cosine_schedule(100)
    spaced = respace_schedule(s, "25")
    shape = (2, 1, 16, 16, 16)
    zeros = torch.zeros(shape, dtype=torch.float64)
    calls: list[tuple[int, Tensor]] = []
    repaint_sample(
        oracle(s, zeros, calls),
        zeros,
        torch.zeros(shape),
        spaced,
        jump_length=3,
        jump_n_sample=3,
        generator=torch_generator(12),
    )
    assert len(calls) == count_network_evaluations(25, 3, 3)
    for t, x in calls[1:]:
        assert x.var().item() / (1 - s.alphas_cumprod[t].item()) == pytest.approx(1.0, abs=0.15), t


@pytest.mark.parametrize(
    ("T", "spec", "j", "r", "expected"),
    [
        (1000, "250", 10, 10, 2410),  # RePaint's configs (timestep_respacing '250', j = r = 10)
        (1000, "1000", 10, 10, 9910),  # the same without respacing
        (300, "ddim60", 5, 5, 280),  # LeFusion, T = 300 cosine, j = r = 5, 60 DDIM-style steps (1480 on all 300)
        (50, "50", 2, 2, 98),  # the toy defaults
    ],
)
def test_network_evaluations_are_counted(T: int, spec: str, j: int, r: int, expected: int) -> None:
    s = cosine_schedule(T)
    spaced = respace_schedule(s, spec)
    shape = (1, 1, 2, 2, 2)
    known = torch.zeros(shape)
    mask = torch.zeros(shape)
    mask[..., 0] = 1
    counted = CountingEpsFn(lambda x, t: 0.1 * x)
    out = repaint_sample(counted, known, mask, spaced, jump_length=j, jump_n_sample=r, generator=torch_generator(4))
    assert counted.calls == expected == count_network_evaluations(spaced.num_timesteps, j, r)
    assert torch.equal(out[mask == 0], known[mask == 0])
