"""Generator training loop: masked loss, loss decrease, EMA warm-up, EMA/raw choice, exact resume, generator files."""

from __future__ import annotations

import json
import math
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lesionflow.diffusion.schedules import cosine_schedule
from lesionflow.diffusion.trainer import (
    HELDOUT_BASE,
    SELECTION_BATCHES,
    GeneratorTrainOutcome,
    WeightChoice,
    _choose,
    ema_decay_at,
    eps_loss,
    heldout_loss,
    load_generator,
    masked_eps_loss,
    save_generator,
    train_generator,
)
from lesionflow.diffusion.unet import ConditionalUNet3D, UNetConfig
from lesionflow.params_synth import GeneratorNetParams

SCHEDULE = cosine_schedule(50)


def _model(cond_dim: int = 0, cond_dropout: float = 0.0) -> ConditionalUNet3D:
    torch.manual_seed(0)
    config = UNetConfig(
        in_channels=1,
        out_channels=1,
        base_channels=8,
        channel_mults=(1, 2),
        cond_dim=cond_dim,
        cond_dropout=cond_dropout,
    )
    return ConditionalUNet3D(config)


def _batches(index: int, *, batch_size: int = 2, cond_dim: int = 0) -> dict[str, torch.Tensor]:
    """Constant 8^3 images whose value depends only on the micro-batch index."""
    value = 0.5 if index % 2 == 0 else -0.5
    batch = {"image": torch.full((batch_size, 1, 8, 8, 8), value)}
    if cond_dim:
        batch["cond"] = torch.full((batch_size, cond_dim), value)
    return batch


def _train(root: Path, steps: int, **kwargs: float) -> tuple[GeneratorTrainOutcome, list[str]]:
    """``kwargs``: lr, ema_decay, checkpoint_every, grad_accum, ema_warmup (0 = off)."""
    warnings: list[str] = []
    config = GeneratorNetParams(
        steps=steps,
        batch_size=2,
        learning_rate=float(kwargs.get("lr", 1e-3)),
        ema_decay=float(kwargs.get("ema_decay", 0.9)),
        checkpoint_every=int(kwargs.get("checkpoint_every", 2)),
        keep_checkpoints=3,
        amp="off",
        grad_accum=int(kwargs.get("grad_accum", 1)),
    )
    warmup = bool(kwargs.get("ema_warmup", 1))
    outcome = train_generator(
        _model(), _batches, None, SCHEDULE, config, root, "cpu", 7, warnings.append, ema_warmup=warmup
    )
    return outcome, warnings


# --------------------------------------------------------------------------- masked loss


def test_masked_loss_gradient_is_zero_outside_mask_and_normalizations_differ_by_mask_fraction() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn((2, 2, 4, 4, 4), generator=gen, requires_grad=True)
    target = torch.randn((2, 2, 4, 4, 4), generator=gen)
    mask = (torch.rand((2, 1, 4, 4, 4), generator=gen) < 0.3).float()
    fraction = float(mask.mean())
    for kind in ("l1", "l2"):
        loss_all = masked_eps_loss(pred, target, mask, normalize="all", kind=kind)
        loss_mask = masked_eps_loss(pred, target, mask, normalize="mask", kind=kind)
        torch.testing.assert_close(loss_all, loss_mask * fraction)
        (grad,) = torch.autograd.grad(loss_all, pred)
        outside = (mask == 0).expand_as(pred)
        assert torch.equal(grad[outside], torch.zeros_like(grad[outside]))
        assert (grad[~outside] != 0).all()
    with pytest.raises(ValueError, match="normalize"):
        masked_eps_loss(pred, target, mask, normalize="voxels")  # type: ignore[arg-type]


def test_eps_loss_is_a_pure_function_of_the_generator() -> None:
    model = _model(cond_dim=3, cond_dropout=0.5).train()
    batch = _batches(0, cond_dim=3) | {"mask": torch.ones(2, 1, 8, 8, 8)}
    losses = [eps_loss(model, batch, torch.Generator().manual_seed(s), schedule=SCHEDULE).item() for s in (1, 1, 2)]
    assert losses[0] == losses[1] != losses[2]


# --------------------------------------------------------------------------- training loop


def test_loss_decreases_on_constant_images(tmp_path: Path) -> None:
    outcome, _ = _train(tmp_path, 24, lr=3e-3, checkpoint_every=100)
    history = outcome.history
    assert len(history) == 24
    assert sum(history[-6:]) / 6 < 0.6 * sum(history[:6]) / 6  # observed ratio ~0.3


def test_ema_differs_from_weights_and_equals_them_at_decay_zero(tmp_path: Path) -> None:
    outcome, _ = _train(tmp_path / "a", 3, ema_decay=0.9)
    raw, ema = outcome.model.state_dict(), outcome.ema.state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    outcome, _ = _train(tmp_path / "b", 3, ema_decay=0.0)
    raw, ema = outcome.model.state_dict(), outcome.ema.state_dict()
    assert all(torch.equal(raw[k], ema[k]) for k in raw)


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    full, _ = _train(tmp_path / "full", 6, grad_accum=2)
    # stop at step 4, then continue to 6
    _train(tmp_path / "split", 4, grad_accum=2)
    resumed, _ = _train(tmp_path / "split", 6, grad_accum=2)
    assert resumed.resumed_from == 4
    # delete the final checkpoint of the uninterrupted run and rerun
    shutil.rmtree(tmp_path / "full" / "step-0000006")
    rerun, _ = _train(tmp_path / "full", 6, grad_accum=2)
    assert rerun.resumed_from == 4
    reference = full.ema.state_dict()
    for other in (resumed, rerun):
        assert other.history == full.history
        assert other.choice == full.choice
        state = other.ema.state_dict()
        assert all(torch.equal(reference[k], state[k]) for k in reference)


def test_finished_run_trains_nothing_and_checkpoint_holds_ema(tmp_path: Path) -> None:
    first, _ = _train(tmp_path, 2)
    again, warnings = _train(tmp_path, 2)
    assert again.resumed_from == 2
    assert again.steps_done == 2
    assert warnings == []
    assert again.history == first.history
    trainer_json = json.loads((tmp_path / "step-0000002" / "trainer.json").read_text())
    assert trainer_json["loop_state"]["seed"] == 7
    keys = load_file(str(tmp_path / "step-0000002" / "model.safetensors")).keys()
    assert any(k.startswith("ema.") for k in keys)
    assert any(k.startswith("model.") for k in keys)


def test_grad_accum_reads_consecutive_micro_batches(tmp_path: Path) -> None:
    seen: list[int] = []

    def batches(index: int) -> dict[str, torch.Tensor]:
        seen.append(index)
        return _batches(index)

    config = GeneratorNetParams(steps=2, batch_size=2, grad_accum=3, checkpoint_every=5, amp="off")
    train_generator(_model(), batches, None, SCHEDULE, config, tmp_path, "cpu", 0, print)
    # the training micro-batches, then (twice: EMA and raw weights) the held-out ones the loop never trains on
    held_out = [HELDOUT_BASE + j for j in range(SELECTION_BATCHES)]
    assert seen == [0, 1, 2, 3, 4, 5, *held_out, *held_out]
    wrong = GeneratorNetParams(steps=1, batch_size=3, amp="off")
    with pytest.raises(ValueError, match="batch dim 2, expected 3"):
        train_generator(_model(), _batches, None, SCHEDULE, wrong, tmp_path / "w", "cpu", 0, print)


def test_conditional_training_with_cfg_dropout_runs(tmp_path: Path) -> None:
    config = GeneratorNetParams(steps=2, batch_size=2, checkpoint_every=5, amp="off")
    outcome = train_generator(
        _model(cond_dim=3, cond_dropout=0.5), partial(_batches, cond_dim=3), None, SCHEDULE, config, tmp_path, "cpu", 0,
        print,
    )  # fmt: skip
    assert len(outcome.history) == 2


# --------------------------------------------------------------------------- EMA warm-up and weight choice


def test_ema_warmup_decay_values() -> None:
    # min(ema_decay, (1 + t) / (10 + t)), t = 0-based optimizer step
    assert ema_decay_at(0, 0.99) == pytest.approx(0.1)
    assert ema_decay_at(1, 0.99) == pytest.approx(2 / 11)
    assert ema_decay_at(10, 0.99) == pytest.approx(11 / 20)
    assert ema_decay_at(90, 0.99) == pytest.approx(0.91)
    assert ema_decay_at(890, 0.99) == 0.99  # 891/900 = 0.99: the cap takes over from here on
    assert ema_decay_at(10_000, 0.99) == 0.99
    assert ema_decay_at(5, 0.0) == 0.0
    # share of the initialisation left in the EMA after 12 steps: 0.99**12 = 0.89 without warm-up
    assert math.prod(ema_decay_at(t, 0.99) for t in range(12)) < 1e-5


def test_saved_weights_beat_raw_and_unwarmed_ema_on_heldout_loss(tmp_path: Path) -> None:
    """A tiny DDPM at 12 steps with the default decay 0.99: without warm-up the EMA is ~89% initialisation."""
    warm, _ = _train(tmp_path / "warm", 12, lr=3e-3, ema_decay=0.99, checkpoint_every=100)
    cold, _ = _train(tmp_path / "cold", 12, lr=3e-3, ema_decay=0.99, checkpoint_every=100, ema_warmup=0)
    assert all(torch.equal(a, b) for a, b in zip(warm.model.parameters(), cold.model.parameters(), strict=True))
    # the trainer's record: both losses on its held-out draws, the lower one kept
    choice = warm.choice
    assert choice is not None
    assert choice.batches == SELECTION_BATCHES
    assert (warm.best is warm.ema) == (choice.weights == "ema")
    recorded = {"ema": choice.ema_loss, "raw": choice.raw_loss}
    assert recorded[choice.weights] == min(recorded.values())
    loss = partial(eps_loss, schedule=SCHEDULE)
    cpu = torch.device("cpu")
    assert choice.raw_loss == heldout_loss(warm.model, _batches, loss, cpu, 7)
    # an independent held-out set (other noise, timesteps, twice as many batches)
    scores = {
        name: heldout_loss(net, _batches, loss, cpu, 12345, n=16)
        for name, net in (("best", warm.best), ("raw", warm.model), ("ema", warm.ema), ("cold_ema", cold.ema))
    }
    assert scores["best"] <= scores["raw"]
    assert scores["best"] <= scores["cold_ema"]
    # observed: raw 0.32, warmed EMA 0.33, un-warmed EMA 0.95
    assert scores["ema"] < 0.5 * scores["cold_ema"]
    assert cold.choice is not None
    assert cold.choice.weights == "raw"
    save_generator(tmp_path / "gen", warm.best, warm.best.config, {}, warm.choice)
    record = json.loads((tmp_path / "gen" / "config.json").read_text())["weights"]
    assert record == {"saved": choice.weights, "ema_loss": choice.ema_loss, "raw_loss": choice.raw_loss,
                      "batches": SELECTION_BATCHES}  # fmt: skip


def test_choice_never_keeps_weights_with_a_non_finite_loss() -> None:
    ema, raw = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)

    def scored(ema_loss: float, raw_loss: float) -> WeightChoice:
        return _choose(raw, ema, lambda net: ema_loss if net is ema else raw_loss)

    assert scored(0.2, 0.2).weights == "ema"  # a tie keeps the EMA
    assert scored(0.3, 0.2).weights == "raw"
    assert scored(math.nan, 0.2).weights == "raw"
    assert scored(math.inf, 0.2).weights == "raw"
    assert scored(0.2, math.nan).weights == "ema"
    with pytest.raises(FloatingPointError, match="not finite"):
        scored(math.nan, math.inf)


# --------------------------------------------------------------------------- generator files


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    model = _model(cond_dim=3)
    save_generator(tmp_path / "gen", model, model.config, {"timesteps": 50, "window": [-1000, 400]})
    loaded, config, extra = load_generator(tmp_path / "gen")
    assert config == model.config
    assert extra == {"timesteps": 50, "window": [-1000, 400]}
    ref = model.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in loaded.state_dict().items())
    x, t, cond = torch.randn(1, 1, 8, 8, 8), torch.tensor([5]), torch.rand(1, 3)
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t, cond), loaded(x, t, cond))
    weights = tmp_path / "gen" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ValueError, match="sha256"):
        load_generator(tmp_path / "gen")
