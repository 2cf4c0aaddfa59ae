"""Watching a real network: which diffusion timesteps it is fed (a forward pre-hook, no mock)."""

from __future__ import annotations

import torch


def fed_timesteps(model: torch.nn.Module) -> list[int]:
    """A list that fills with the timestep of every forward pass of ``model`` (``model(x, t, ...)``)."""
    fed: list[int] = []

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], kwargs: dict[str, object]) -> None:
        t = args[1] if len(args) > 1 else kwargs["t"]
        assert isinstance(t, torch.Tensor)
        fed.append(int(t[0]))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return fed
