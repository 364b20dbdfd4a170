"""Building blocks shared by the Seq2Seq family: conv/norm/activation factories, residual blocks and their
HyperConv counterparts (code-conditioned), for 2D and 3D."""
from __future__ import annotations

import logging
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from nnsynth.exceptions import PlansError
from nnsynth.networks.hyperconv import HyperConv

logger = logging.getLogger(__name__)

NORM_CHOICES = ("instance", "batch", "group", "none")
GROUP_NORM_GROUPS = 8


def conv_nd(spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
            padding_mode: str = "reflect", bias: bool = True) -> nn.Module:
    """Plain convolution with 'same' padding for odd kernels (stride-2 halves the size exactly for even sizes)."""
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
    return cls(in_channels, out_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2,
               padding_mode=padding_mode, bias=bias)


def norm_nd(norm: str, spatial_dims: int, channels: int) -> nn.Module:
    """Normalisation layer by name (``instance`` as in the paper; affine so it can be undone per channel)."""
    norm = (norm or "none").lower()
    if norm in ("instance", "instancenorm", "in"):
        cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[spatial_dims]
        return cls(channels, affine=True)
    if norm in ("batch", "batchnorm", "bn"):
        cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]
        return cls(channels)
    if norm in ("group", "groupnorm", "gn"):
        groups = GROUP_NORM_GROUPS if channels % GROUP_NORM_GROUPS == 0 else 1
        return nn.GroupNorm(groups, channels)
    if norm in ("none", "identity"):
        return nn.Identity()
    raise PlansError(f"Unknown norm {norm!r} in the plans' network settings; use one of {NORM_CHOICES}")


def _check_padding_mode(padding_mode: str) -> str:
    if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        raise PlansError(f"Unknown padding_mode {padding_mode!r} in the plans' network settings; "
                         "use 'reflect' (paper), 'zeros', 'replicate' or 'circular'")
    return padding_mode


class ConvNormAct(nn.Module):
    """conv -> norm -> LeakyReLU (activation optional)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 norm: str = "instance", negative_slope: float = 0.2, padding_mode: str = "reflect",
                 act: bool = True) -> None:
        super().__init__()
        self.conv = conv_nd(spatial_dims, in_channels, out_channels, kernel_size, stride,
                            _check_padding_mode(padding_mode))
        self.norm = norm_nd(norm, spatial_dims, out_channels)
        self.act = nn.LeakyReLU(negative_slope, inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class ResBlock(nn.Module):
    """x + norm(conv(act(norm(conv(x))))) with 3x3(x3) kernels (CycleGAN-style residual block, as in the paper)."""

    def __init__(self, spatial_dims: int, channels: int, kernel_size: int = 3, norm: str = "instance",
                 negative_slope: float = 0.2, padding_mode: str = "reflect") -> None:
        super().__init__()
        self.block = nn.Sequential(
            ConvNormAct(spatial_dims, channels, channels, kernel_size, 1, norm, negative_slope, padding_mode),
            ConvNormAct(spatial_dims, channels, channels, kernel_size, 1, norm, negative_slope, padding_mode,
                        act=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class HyperConvNormAct(nn.Module):
    """HyperConv -> norm -> LeakyReLU; the code conditions the convolution."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int, code_length: int,
                 bank_size: int = 16, stride: int = 1, norm: str = "instance", negative_slope: float = 0.2,
                 padding_mode: str = "reflect", act: bool = True, mlp_hidden: Optional[int] = 64) -> None:
        super().__init__()
        self.conv = HyperConv(in_channels, out_channels, kernel_size, code_length, spatial_dims=spatial_dims,
                              stride=stride, padding_mode=_check_padding_mode(padding_mode), bank_size=bank_size,
                              mlp_hidden=mlp_hidden)
        self.norm = norm_nd(norm, spatial_dims, out_channels)
        self.act = nn.LeakyReLU(negative_slope, inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor, code: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x, code)))


class HyperResBlock(nn.Module):
    """Residual block with HyperConv in place of both convolutions (paper's hyper-residual block)."""

    def __init__(self, spatial_dims: int, channels: int, code_length: int, bank_size: int = 16,
                 kernel_size: int = 3, norm: str = "instance", negative_slope: float = 0.2,
                 padding_mode: str = "reflect", mlp_hidden: Optional[int] = 64) -> None:
        super().__init__()
        self.first = HyperConvNormAct(spatial_dims, channels, channels, kernel_size, code_length, bank_size, 1,
                                      norm, negative_slope, padding_mode, True, mlp_hidden)
        self.second = HyperConvNormAct(spatial_dims, channels, channels, kernel_size, code_length, bank_size, 1,
                                       norm, negative_slope, padding_mode, False, mlp_hidden)

    def forward(self, x: Tensor, code: Tensor) -> Tensor:
        return x + self.second(self.first(x, code), code)


class HyperUpBlock(nn.Module):
    """2x upsampling followed by HyperConv -> norm -> LeakyReLU."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int, code_length: int,
                 bank_size: int = 16, norm: str = "instance", negative_slope: float = 0.2,
                 padding_mode: str = "reflect", upsample_mode: str = "nearest",
                 mlp_hidden: Optional[int] = 64) -> None:
        super().__init__()
        if upsample_mode not in ("nearest", "linear"):
            raise PlansError(f"Unknown upsample_mode {upsample_mode!r}; use 'nearest' or 'linear'")
        self.upsample_mode = upsample_mode
        self.spatial_dims = spatial_dims
        self.conv = HyperConvNormAct(spatial_dims, in_channels, out_channels, kernel_size, code_length, bank_size,
                                     1, norm, negative_slope, padding_mode, True, mlp_hidden)

    def forward(self, x: Tensor, code: Tensor) -> Tensor:
        if self.upsample_mode == "nearest":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        else:
            mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[self.spatial_dims]
            x = F.interpolate(x, scale_factor=2, mode=mode, align_corners=False)
        return self.conv(x, code)


def space_to_depth(x: Tensor, factor: int) -> Tensor:
    """(B, C, *S) -> (B, C * factor**d, *S / factor): every factor^d block of voxels becomes channels (2D or 3D).

    Linear and position-wise, so averaging or weighting several maps commutes with it; ``depth_to_space``
    inverts it exactly."""
    if factor == 1:
        return x
    b, c, *size = x.shape
    if any(s % factor for s in size):
        raise ValueError(f"space_to_depth needs sizes divisible by {factor}, got {tuple(size)}")
    d = len(size)
    split = [b, c]
    for s in size:
        split += [s // factor, factor]
    x = x.reshape(split)
    # (B, C, s1, f, s2, f, ...) -> (B, C, f, f, ..., s1, s2, ...)
    order = [0, 1] + [3 + 2 * i for i in range(d)] + [2 + 2 * i for i in range(d)]
    return x.permute(order).reshape([b, c * factor ** d] + [s // factor for s in size])


def depth_to_space(x: Tensor, factor: int) -> Tensor:
    """Inverse of ``space_to_depth``: (B, C * factor**d, *S) -> (B, C, *S * factor)."""
    if factor == 1:
        return x
    b, cf, *size = x.shape
    d = len(size)
    c = cf // factor ** d
    if c * factor ** d != cf:
        raise ValueError(f"depth_to_space needs channels divisible by {factor ** d}, got {cf}")
    x = x.reshape([b, c] + [factor] * d + list(size))
    # (B, C, f, f, ..., s1, s2, ...) -> (B, C, s1, f, s2, f, ...)
    order = [0, 1]
    for i in range(d):
        order += [2 + d + i, 2 + i]
    return x.permute(order).reshape([b, c] + [s * factor for s in size])


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of a module."""
    return int(sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only))


__all__ = ["ConvNormAct", "ResBlock", "HyperConvNormAct", "HyperResBlock", "HyperUpBlock", "conv_nd", "norm_nd",
           "space_to_depth", "depth_to_space", "count_parameters", "NORM_CHOICES"]
