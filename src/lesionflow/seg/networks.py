"""MONAI networks chosen by a config value, with checks that fail before training starts.

Tensor contract: input (batch, in_channels, x, y, z) float32 in normalized intensity units; output
(batch, out_channels, x, y, z) logits, one channel per label value (index 0 = background), spatial shape
equal to the input's. Patch edges must be divisible by the network's total downsampling factor.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lesionflow.errors import ParamsError

NETWORKS = ("unet", "dynunet", "swinunetr")
SWIN_DOWNSAMPLING = 32  # patch embedding (2) x four merging stages (2^4)


@dataclass(frozen=True)
class NetworkConfig:
    """Everything needed to rebuild the network from its weights (saved as models/<name>/config.json)."""

    network: str
    in_channels: int
    out_channels: int
    channels: tuple[int, ...]
    num_res_units: int
    patch_size: tuple[int, int, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetworkConfig:
        return cls(
            network=str(d["network"]),
            in_channels=int(d["in_channels"]),
            out_channels=int(d["out_channels"]),
            channels=tuple(int(c) for c in d["channels"]),
            num_res_units=int(d["num_res_units"]),
            patch_size=(int(d["patch_size"][0]), int(d["patch_size"][1]), int(d["patch_size"][2])),
        )

    @property
    def downsampling(self) -> int:
        """Total downsampling factor: every patch edge must be a multiple of it."""
        if self.network == "swinunetr":
            return SWIN_DOWNSAMPLING
        return 2 ** (len(self.channels) - 1)


def check_config(config: NetworkConfig) -> None:
    """One-line ParamsError for a configuration the network cannot take."""
    if config.network not in NETWORKS:
        raise ParamsError(f"train.network = {config.network!r} is unknown; expected one of {', '.join(NETWORKS)}")
    factor = config.downsampling
    bad = [p for p in config.patch_size if p % factor]
    if bad:
        fixed = [max(factor, p // factor * factor) for p in config.patch_size]
        raise ParamsError(
            f"train.patch_size = {list(config.patch_size)} does not fit {config.network} with "
            f"{len(config.channels)} levels: every edge must be a multiple of {factor}; e.g. use {fixed}"
        )
    if math.prod(p // factor for p in config.patch_size) <= 1:
        raise ParamsError(
            f"train.patch_size = {list(config.patch_size)} leaves a 1-voxel bottleneck in {config.network} "
            f"(downsampling x{factor}); use edges of at least {2 * factor}"
        )
    if config.network == "swinunetr" and config.channels[0] % 12:
        raise ParamsError(
            f"train.channels[0] = {config.channels[0]} is SwinUNETR's feature_size and must be a multiple of 12"
        )


def build_network(config: NetworkConfig) -> torch.nn.Module:
    """The MONAI network for ``config`` (weights initialised from torch's global RNG: seed it first)."""
    from monai.networks.nets import DynUNet, SwinUNETR, UNet

    check_config(config)
    levels = len(config.channels)
    if config.network == "unet":
        return UNet(
            spatial_dims=3,
            in_channels=config.in_channels,
            out_channels=config.out_channels,
            channels=config.channels,
            strides=(2,) * (levels - 1),
            num_res_units=config.num_res_units,
            norm="instance",
        )
    if config.network == "dynunet":
        strides = [1] + [2] * (levels - 1)
        return DynUNet(
            spatial_dims=3,
            in_channels=config.in_channels,
            out_channels=config.out_channels,
            kernel_size=[3] * levels,
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=list(config.channels),
            res_block=config.num_res_units > 0,
        )
    return SwinUNETR(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        feature_size=config.channels[0],
        spatial_dims=3,
    )


def parameter_count(network: torch.nn.Module) -> int:
    return sum(math.prod(p.shape) for p in network.parameters())
