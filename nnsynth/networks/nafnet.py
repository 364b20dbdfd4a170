"""NAFNet building blocks (Chen et al., "Simple Baselines for Image Restoration"), 2D and 3D.

A NAF block is activation-free: channel LayerNorm -> 1x1 conv (x2 channels) -> depthwise 3x3 conv ->
SimpleGate (split in two halves, multiply) -> simplified channel attention (global average pool, 1x1 conv,
multiply) -> 1x1 conv, added back with a learnt per-channel scale; then a gated feed-forward part the same
way. The scales start at 0 so every block starts as the identity, which keeps deep stacks stable.

``NAFEncoder`` downsamples by 2 per level (2x2 strided conv, channels doubled) and has no skip connections
(CodeBrain's bottleneck must carry all information); ``NAFDecoder`` upsamples with 1x1 conv + pixel shuffle.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnsynth.exceptions import PlansError


def _conv(spatial_dims: int):
    if spatial_dims not in (2, 3):
        raise PlansError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of ``(B, C, *spatial)`` (per position), with affine parameters."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # the fused layer_norm on a channels-last view is ~3x faster on CPU than the explicit formula
        y = F.layer_norm(x.movedim(1, -1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)


class SimpleGate(nn.Module):
    """Split the channels in two halves and multiply them (NAFNet's replacement for a nonlinearity)."""

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class SimplifiedChannelAttention(nn.Module):
    """Global average pool -> 1x1 conv -> per-channel multiplicative weights (no nonlinearity)."""

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.conv = _conv(spatial_dims)(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.conv(self.pool(x))


class NAFBlock(nn.Module):
    """One NAF block; shape-preserving."""

    def __init__(self, spatial_dims: int, channels: int, dw_expand: int = 2, ffn_expand: int = 2) -> None:
        super().__init__()
        conv = _conv(spatial_dims)
        dw = channels * dw_expand
        self.norm1 = ChannelLayerNorm(channels)
        self.conv1 = conv(channels, dw, 1)
        self.conv2 = conv(dw, dw, 3, padding=1, groups=dw)
        self.gate = SimpleGate()
        self.sca = SimplifiedChannelAttention(spatial_dims, dw // 2)
        self.conv3 = conv(dw // 2, channels, 1)
        ffn = channels * ffn_expand
        self.norm2 = ChannelLayerNorm(channels)
        self.conv4 = conv(channels, ffn, 1)
        self.conv5 = conv(ffn // 2, channels, 1)
        shape = (1, channels) + (1,) * spatial_dims
        self.beta = nn.Parameter(torch.zeros(shape))
        self.gamma = nn.Parameter(torch.zeros(shape))

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv3(self.sca(self.gate(self.conv2(self.conv1(self.norm1(x))))))
        x = x + y * self.beta
        y = self.conv5(self.gate(self.conv4(self.norm2(x))))
        return x + y * self.gamma


def pixel_shuffle_nd(x: Tensor, factor: int) -> Tensor:
    """``(B, C r^n, *s)`` -> ``(B, C, *(s r))`` for n = 2 or 3 spatial axes (torch has no 3D pixel shuffle)."""
    n = x.ndim - 2
    if n == 2:
        return nn.functional.pixel_shuffle(x, factor)
    b, c, *s = x.shape
    c_out = c // factor ** n
    x = x.view(b, c_out, *([factor] * n), *s)                 # (B, C, r, r, r, D, H, W)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).contiguous()        # (B, C, D, r, H, r, W, r)
    return x.view(b, c_out, *[d * factor for d in s])


class NAFEncoder(nn.Module):
    """Intro conv -> [NAF blocks, 2x downsample] per level -> middle NAF blocks -> 1x1 projection."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, width: int,
                 enc_blocks: Sequence[int], middle_blocks: int) -> None:
        super().__init__()
        conv = _conv(spatial_dims)
        self.intro = conv(in_channels, width, 3, padding=1)
        stages, c = [], width
        for n in enc_blocks:
            stages.append(nn.Sequential(*[NAFBlock(spatial_dims, c) for _ in range(int(n))],
                                        conv(c, 2 * c, 2, stride=2)))
            c *= 2
        self.stages = nn.Sequential(*stages)
        self.middle = nn.Sequential(*[NAFBlock(spatial_dims, c) for _ in range(int(middle_blocks))])
        self.out = conv(c, out_channels, 1)
        self.bottleneck_channels = c
        self.downsample_factor = 2 ** len(enc_blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.middle(self.stages(self.intro(x))))


class NAFDecoder(nn.Module):
    """1x1 conv to the bottleneck width -> middle NAF blocks -> [1x1 conv + pixel shuffle, NAF blocks] per level."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, width: int,
                 dec_blocks: Sequence[int], middle_blocks: int) -> None:
        super().__init__()
        conv = _conv(spatial_dims)
        c = width * 2 ** len(dec_blocks)
        self.intro = conv(in_channels, c, 1)
        self.middle = nn.Sequential(*[NAFBlock(spatial_dims, c) for _ in range(int(middle_blocks))])
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        r = 2 ** spatial_dims
        for n in dec_blocks:
            self.ups.append(conv(c, (c // 2) * r, 1, bias=False))
            c //= 2
            self.blocks.append(nn.Sequential(*[NAFBlock(spatial_dims, c) for _ in range(int(n))]))
        self.out = conv(c, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.middle(self.intro(x))
        for up, blocks in zip(self.ups, self.blocks):
            x = blocks(pixel_shuffle_nd(up(x), 2))
        return self.out(x)
