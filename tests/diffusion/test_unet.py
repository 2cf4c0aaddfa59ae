"""Conditional 3D UNet: shapes, divisibility check, vector condition, null embedding, CFG, config round trip."""

from __future__ import annotations

import pytest
import torch

from lesionflow.diffusion.unet import ConditionalUNet3D, UNetConfig, guided_eps, make_eps_fn


def _model(cond_dim: int = 4, in_channels: int = 2, attention: bool = True) -> ConditionalUNet3D:
    torch.manual_seed(0)
    config = UNetConfig(
        in_channels=in_channels,
        out_channels=1,
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_levels=(False, attention),
        cond_dim=cond_dim,
    )
    model = ConditionalUNet3D(config).eval()
    with torch.no_grad():  # a non-zero null embedding, as after training
        if model.null_cond is not None:
            model.null_cond.normal_()
    return model


def _inputs(b: int = 2, c: int = 2, size: tuple[int, int, int] = (8, 8, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn((b, c, *size), generator=gen), torch.tensor([3, 40][:b])


@pytest.mark.parametrize("size", [(8, 8, 8), (16, 8, 12)])
def test_output_shape_matches_input(size: tuple[int, int, int]) -> None:
    model = _model()
    x, t = _inputs(size=size)
    with torch.no_grad():
        eps = model(x, t, torch.rand(2, 4))
    assert eps.shape == (2, 1, *size)
    assert torch.isfinite(eps).all()


def test_indivisible_shape_is_a_one_line_error() -> None:
    model = _model()
    x, t = _inputs(size=(8, 9, 8))
    with pytest.raises(ValueError, match=r"input shape \(2, 2, 8, 9, 8\).*multiples of 2") as err:
        model(x, t)
    assert "\n" not in str(err.value)


def test_condition_changes_output_and_drop_gives_unconditional() -> None:
    model = _model()
    x, t = _inputs()
    cond = torch.rand(2, 4)
    with torch.no_grad():
        eps_cond = model(x, t, cond)
        eps_other = model(x, t, torch.rand(2, 4))
        eps_uncond = model(x, t)
        eps_dropped = model(x, t, cond, drop_cond=torch.tensor([True, True]))
        eps_half = model(x, t, cond, drop_cond=torch.tensor([True, False]))
    assert not torch.allclose(eps_cond, eps_other)
    assert not torch.allclose(eps_cond, eps_uncond)
    assert torch.equal(eps_dropped, eps_uncond)
    torch.testing.assert_close(eps_half[0], eps_uncond[0])
    torch.testing.assert_close(eps_half[1], eps_cond[1])


def test_guided_eps_scales() -> None:
    model = _model()
    x, t = _inputs()
    cond = torch.rand(2, 4)
    with torch.no_grad():
        eps_cond, eps_uncond = model(x, t, cond), model(x, t)
        assert torch.equal(guided_eps(model, x, t, cond, 1.0), eps_cond)
        assert torch.equal(guided_eps(model, x, t, cond, 0.0), eps_uncond)
        torch.testing.assert_close(
            guided_eps(model, x, t, cond, 3.0), eps_uncond + 3.0 * (eps_cond - eps_uncond), atol=1e-5, rtol=1e-4
        )


def test_make_eps_fn_concatenates_condition_channels() -> None:
    model = _model(cond_dim=0, attention=False)
    x, t = _inputs()
    eps_fn = make_eps_fn(model, channels=x[:, 1:])
    with torch.no_grad():
        assert torch.equal(eps_fn(x[:, :1], t), model(x, t))


def test_wrong_condition_shapes_are_rejected() -> None:
    x, t = _inputs()
    with pytest.raises(ValueError, match="cond_dim = 0"):
        _model(cond_dim=0)(x, t, torch.rand(2, 4))
    with pytest.raises(ValueError, match=r"cond must have shape \(2, 4\)"):
        _model()(x, t, torch.rand(2, 3))


def test_config_round_trip_and_validation() -> None:
    config = _model().config
    assert UNetConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="groups"):
        UNetConfig(in_channels=1, out_channels=1, base_channels=12, groups=8)
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(in_channels=1, out_channels=1, attention_levels=(False,))
