"""A compact conditional 3D UNet noise predictor (generative.md §2.4, §9.1, §9.6).

Shapes: images are ``(B, C, X, Y, Z)`` float tensors; timesteps ``t`` are ``(B,)`` schedule indices ``0 .. T-1``
(unitless); the vector condition is ``(B, cond_dim)``. The network returns eps with ``out_channels`` channels.

Two conditioning paths (§9.1):
(a) **channel concatenation**: extra condition channels (masks, spheres, masked images) are part of
    ``in_channels``; the caller concatenates them to ``x_t`` (see :func:`make_eps_fn`).
(b) **vector condition** (histograms, class one-hot, severity): a 2-layer MLP maps it to the time-embedding
    width and the result is *added* to the time embedding, which every residual block turns into a
    FiLM scale/shift. A dropped condition (classifier-free guidance, ``drop_cond`` true, or ``cond=None``) is
    replaced by a **learned null embedding** (a parameter of the time-embedding width, initialised to zeros),
    so the unconditional model is the same network evaluated with that embedding.

``forward`` never draws random numbers: CFG dropout during training is decided by the loss (with the step's
generator) and passed in as ``drop_cond``. This is a plain 3D conv UNet, not LeFusion's factorised video UNet.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConditionalUNet3D", "UNetConfig", "guided_eps", "make_eps_fn"]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of :class:`ConditionalUNet3D` (stored in a generator's ``config.json``).

    ``in_channels`` = image channels + extra condition channels; ``out_channels`` = image channels (eps).
    ``base_channels`` is the width of the first level, independent of the patch size; level ``i`` has
    ``base_channels * channel_mults[i]`` channels and there are ``len(channel_mults) - 1`` downsamplings by 2.
    ``attention_levels[i]`` adds full self-attention over the voxels of level ``i`` (cost grows with the square
    of the voxel count: enable it only on coarse levels, a few thousand voxels at most); the bottleneck has
    attention when the last level has. ``cond_dim = 0`` means no vector condition. ``cond_dropout`` is the
    probability that the training loss replaces a sample's condition with the null embedding.
    """

    in_channels: int
    out_channels: int
    base_channels: int = 8
    channel_mults: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attention_levels: tuple[bool, ...] = (False, False)
    cond_dim: int = 0
    cond_dropout: float = 0.0
    groups: int = 8
    attention_head_channels: int = 32

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.out_channels < 1 or self.base_channels < 1:
            raise ValueError("in_channels, out_channels and base_channels must be >= 1")
        if not self.channel_mults or any(m < 1 for m in self.channel_mults):
            raise ValueError(f"channel_mults must be non-empty positive ints, got {self.channel_mults}")
        if len(self.attention_levels) != len(self.channel_mults):
            raise ValueError(
                f"attention_levels has {len(self.attention_levels)} entries, channel_mults {len(self.channel_mults)}"
            )
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if self.cond_dim < 0 or not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"need cond_dim >= 0 and 0 <= cond_dropout < 1, got {self.cond_dim}, {self.cond_dropout}")
        bad = [self.base_channels * m for m in self.channel_mults if (self.base_channels * m) % self.groups]
        if self.groups < 1 or bad:
            raise ValueError(f"GroupNorm groups {self.groups} must divide every level width, not {bad}")
        if self.attention_head_channels < 1:
            raise ValueError(f"attention_head_channels must be >= 1, got {self.attention_head_channels}")

    @property
    def levels(self) -> int:
        return len(self.channel_mults)

    @property
    def size_multiple(self) -> int:
        """Every spatial edge must be a multiple of this (``2 ** (levels - 1)``)."""
        return 2 ** (self.levels - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channel_mults"] = list(self.channel_mults)
        d["attention_levels"] = list(self.attention_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["channel_mults"] = tuple(int(m) for m in known.get("channel_mults", (1, 2)))
        known["attention_levels"] = tuple(bool(a) for a in known.get("attention_levels", (False,) * 2))
        return cls(**known)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding ``(B,) -> (B, dim)`` of (float) timestep indices, cos half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / max(half, 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv, FiLM from the embedding, GroupNorm-SiLU-Conv, plus a (1x1x1 conv) skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.skip: nn.Module = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class _Attention(nn.Module):
    """Multi-head self-attention over all voxels of a ``(B, C, X, Y, Z)`` map, residual."""

    def __init__(self, channels: int, groups: int, head_channels: int) -> None:
        super().__init__()
        self.heads = max(1, channels // head_channels)
        if channels % self.heads:
            self.heads = 1
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv3d(channels, 3 * channels, 1)
        self.proj = nn.Conv3d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, -1).transpose(-1, -2)
        h = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])  # (B, heads, N, C/heads)
        return x + self.proj(h.transpose(-1, -2).reshape(b, c, *spatial))


class ConditionalUNet3D(nn.Module):
    """eps-predicting 3D UNet; see the module docstring for the conditioning paths."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        emb_dim = 4 * c.base_channels
        self.time_mlp = nn.Sequential(nn.Linear(c.base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond_mlp: nn.Module | None = None
        self.null_cond: nn.Parameter | None = None
        if c.cond_dim > 0:
            self.cond_mlp = nn.Sequential(nn.Linear(c.cond_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            self.null_cond = nn.Parameter(torch.zeros(emb_dim))
        self.init_conv = nn.Conv3d(c.in_channels, c.base_channels, 3, padding=1)

        widths = [c.base_channels * m for m in c.channel_mults]
        self.down = nn.ModuleList()
        skip_widths = [c.base_channels]
        ch = c.base_channels
        for level, width in enumerate(widths):
            for _ in range(c.num_res_blocks):
                self.down.append(self._block(ch, width, emb_dim, c.attention_levels[level]))
                ch = width
                skip_widths.append(ch)
            if level < c.levels - 1:
                self.down.append(nn.Conv3d(ch, ch, 3, stride=2, padding=1))
                skip_widths.append(ch)
        self.mid = self._block(ch, ch, emb_dim, c.attention_levels[-1])
        self.mid2 = _ResBlock(ch, ch, emb_dim, c.groups)
        self.up = nn.ModuleList()
        for level in reversed(range(c.levels)):
            for _ in range(c.num_res_blocks + 1):
                self.up.append(self._block(ch + skip_widths.pop(), widths[level], emb_dim, c.attention_levels[level]))
                ch = widths[level]
            if level > 0:
                self.up.append(
                    nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(ch, ch, 3, padding=1))
                )
        self.out = nn.Sequential(nn.GroupNorm(c.groups, ch), nn.SiLU(), nn.Conv3d(ch, c.out_channels, 3, padding=1))

    def _block(self, cin: int, cout: int, emb_dim: int, attention: bool) -> nn.ModuleList:
        parts: list[nn.Module] = [_ResBlock(cin, cout, emb_dim, self.config.groups)]
        if attention:
            parts.append(_Attention(cout, self.config.groups, self.config.attention_head_channels))
        return nn.ModuleList(parts)

    @staticmethod
    def _run_block(block: nn.ModuleList, h: Tensor, emb: Tensor) -> Tensor:
        h = block[0](h, emb)
        for extra in block[1:]:
            h = extra(h)
        return h

    def embed(self, t: Tensor, cond: Tensor | None, drop_cond: Tensor | None) -> Tensor:
        """Time (+ condition or null) embedding ``(B, 4 * base_channels)``."""
        b = t.shape[0]
        emb: Tensor = self.time_mlp(timestep_embedding(t, self.config.base_channels))
        if self.cond_mlp is None or self.null_cond is None:
            if cond is not None:
                raise ValueError("this UNet has cond_dim = 0 but a condition vector was given")
            return emb
        null = self.null_cond.to(emb.dtype).expand(b, -1)
        if cond is None:
            return emb + null
        if cond.shape != (b, self.config.cond_dim):
            raise ValueError(f"cond must have shape ({b}, {self.config.cond_dim}), got {tuple(cond.shape)}")
        cond_emb = self.cond_mlp(cond.to(emb.dtype))
        if drop_cond is not None:
            if drop_cond.shape != (b,):
                raise ValueError(f"drop_cond must have shape ({b},), got {tuple(drop_cond.shape)}")
            cond_emb = torch.where(drop_cond.to(torch.bool)[:, None], null.to(cond_emb.dtype), cond_emb)
        return emb + cond_emb

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None, *, drop_cond: Tensor | None = None) -> Tensor:
        """eps ``(B, out_channels, X, Y, Z)`` for ``x`` ``(B, in_channels, X, Y, Z)``, ``t`` ``(B,)``.

        ``cond`` ``(B, cond_dim)`` or None (= unconditional); ``drop_cond`` ``(B,)`` bool: true replaces that
        sample's condition by the null embedding. Every spatial edge must be a multiple of ``2 ** (levels - 1)``.
        """
        m = self.config.size_multiple
        if x.ndim != 5 or x.shape[1] != self.config.in_channels or any(s % m for s in x.shape[2:]):
            raise ValueError(
                f"input shape {tuple(x.shape)} must be (B, {self.config.in_channels}, X, Y, Z) "
                f"with X, Y, Z multiples of {m}"
            )
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        emb = self.embed(t, cond, drop_cond)
        h = self.init_conv(x)
        skips = [h]
        for module in self.down:
            h = self._run_block(module, h, emb) if isinstance(module, nn.ModuleList) else module(h)
            skips.append(h)
        h = self.mid2(self._run_block(self.mid, h, emb), emb)
        for module in self.up:
            if isinstance(module, nn.ModuleList):
                h = self._run_block(module, torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = module(h)
        out: Tensor = self.out(h)
        return out


def guided_eps(model: ConditionalUNet3D, x: Tensor, t: Tensor, cond: Tensor | None, scale: float) -> Tensor:
    """Classifier-free guidance ``eps = eps_uncond + scale * (eps_cond - eps_uncond)``, shapes as ``forward``.

    ``scale = 1`` is the plain conditional eps and ``scale = 0`` the unconditional one (each a single
    evaluation, returned exactly); other scales evaluate both halves in one batch of ``2B``.
    """
    if cond is None or scale == 0.0:
        return model(x, t, None)
    if scale == 1.0:
        return model(x, t, cond)
    b = x.shape[0]
    drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x.device)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, cond]), drop_cond=drop)
    eps_cond, eps_uncond = both[:b], both[b:]
    return eps_uncond + scale * (eps_cond - eps_uncond)


def make_eps_fn(
    model: ConditionalUNet3D, cond: Tensor | None = None, channels: Tensor | None = None, scale: float = 1.0
) -> Callable[[Tensor, Tensor], Tensor]:
    """``eps_fn(x_t, t_batch)`` for the samplers: concatenates the condition ``channels`` ``(B, C_extra, X, Y, Z)``
    to ``x_t`` and applies classifier-free guidance with ``scale`` (see :func:`guided_eps`). Runs without grad.
    """

    def eps_fn(x_t: Tensor, t: Tensor) -> Tensor:
        x_in = x_t if channels is None else torch.cat([x_t, channels.to(x_t.dtype)], dim=1)
        with torch.no_grad():
            return guided_eps(model, x_in, t, cond, scale)

    return eps_fn
