"""HyperConv: a convolution whose kernel is mixed from a weight bank by the target-sequence code.

Seq2Seq paper, Algorithm 1: ``kernel = param @ f(s)`` with ``param`` of shape ``(*kshape, c_w)`` and ``f`` a
small MLP from the code ``s`` to ``c_w`` mixing coefficients; the bias is mixed the same way.

Every sample of a batch may carry its own code. Instead of looping over samples, the batch is folded into the
channel axis and ONE grouped convolution runs with ``groups = batch * groups`` (each sample sees only its own
kernel). Two defects of the paper's public code are avoided on purpose: ``groups`` is honoured, and a batch
mismatch between ``x`` and ``code`` raises instead of returning ``None``.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# --- module constants (listed in the hand-over; candidates for nnsynth/constants.py) ---------------
HYPERCONV_DEFAULT_BANK_SIZE = 16      # c_w in the paper's code
HYPERCONV_DEFAULT_MLP_HIDDEN = 64     # paper code: Linear(code_length, 64) + LeakyReLU first
HYPERCONV_MLP_NEGATIVE_SLOPE = 0.2
HYPERCONV_INIT_NEGATIVE_SLOPE = 0.2   # kaiming gain of the mixed kernel (decoder uses LeakyReLU(0.2))
#: on CPU the grouped convolution's output channels per group are zero-padded to a multiple of this for kernels
#: larger than 1 voxel: oneDNN's grouped kernels are 4-5x slower forward+backward otherwise (the decoder's final
#: 7x7 HyperConv with 3 outputs per sample took 114 of 430 ms per training step; documentation/benchmarks.md)
CPU_GROUP_CHANNEL_MULTIPLE = 8
# -----------------------------------------------------------------------------------------------------

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_IntOrSeq = Union[int, Sequence[int]]


def _tuple(value: _IntOrSeq, n: int, name: str) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (int(value),) * n
    values = tuple(int(v) for v in value)
    if len(values) != n:
        raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {value!r}")
    return values


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


class HyperConv(nn.Module):
    """Code-conditioned convolution (2D or 3D) with a mixed weight bank; see the module docstring.

    ``padding=None`` means 'same' for odd kernels (``dilation * (k - 1) // 2`` per side).
    ``init_gain`` scales the mixed kernel's init std (``gain / sqrt(fan_in)``; default: kaiming for
    LeakyReLU(0.2)). A ``code`` with batch size 1 is broadcast to the whole batch (a plain convolution then runs).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntOrSeq,
        code_length: int,
        spatial_dims: int = 2,
        stride: _IntOrSeq = 1,
        padding: Optional[_IntOrSeq] = None,
        padding_mode: str = "reflect",
        groups: int = 1,
        bias: bool = True,
        bank_size: int = HYPERCONV_DEFAULT_BANK_SIZE,
        mlp_hidden: Optional[int] = HYPERCONV_DEFAULT_MLP_HIDDEN,
        dilation: _IntOrSeq = 1,
        init_gain: Optional[float] = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be "
                             f"divisible by groups ({groups})")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        if code_length < 1 or bank_size < 1:
            raise ValueError("code_length and bank_size must be >= 1")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.spatial_dims = int(spatial_dims)
        self.kernel_size = _tuple(kernel_size, spatial_dims, "kernel_size")
        self.stride = _tuple(stride, spatial_dims, "stride")
        self.dilation = _tuple(dilation, spatial_dims, "dilation")
        if padding is None:
            if any(k % 2 == 0 for k in self.kernel_size):
                raise ValueError(f"padding=None ('same') needs odd kernel sizes, got {self.kernel_size}; "
                                 "pass an explicit padding")
            padding = tuple(d * (k - 1) // 2 for k, d in zip(self.kernel_size, self.dilation))
        self.padding = _tuple(padding, spatial_dims, "padding")
        self.padding_mode = padding_mode
        self.groups = int(groups)
        self.code_length = int(code_length)
        self.bank_size = int(bank_size)
        self.mlp_hidden = mlp_hidden
        self.init_gain = init_gain

        kshape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        self.weight_bank = nn.Parameter(torch.empty(*kshape, self.bank_size))
        self.bias_bank = nn.Parameter(torch.empty(self.out_channels, self.bank_size)) if bias else None
        if mlp_hidden:
            self.mlp = nn.Sequential(
                nn.Linear(self.code_length, int(mlp_hidden)),
                nn.LeakyReLU(HYPERCONV_MLP_NEGATIVE_SLOPE),
                nn.Linear(int(mlp_hidden), self.bank_size),
            )
        else:
            self.mlp = nn.Sequential(nn.Linear(self.code_length, self.bank_size))
        self._conv = (F.conv1d, F.conv2d, F.conv3d)[self.spatial_dims - 1]
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Kaiming-like bank: for the one-hot codes the mixed kernel has a conv-like variance at init.

        ``Var(kernel) = Var(bank) * |f(s)|^2``, so the bank's std is divided by the RMS norm of the MLP's
        output over the one-hot codes (the MLP is initialised first, with torch's defaults).
        """
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        with torch.no_grad():
            f = self.mlp(torch.eye(self.code_length))
            rms = float(f.pow(2).sum(dim=1).mean().sqrt().clamp_min(1e-6))
        fan_in = (self.in_channels // self.groups) * math.prod(self.kernel_size)
        gain = self.init_gain
        if gain is None:
            gain = math.sqrt(2.0 / (1.0 + HYPERCONV_INIT_NEGATIVE_SLOPE ** 2))
        nn.init.normal_(self.weight_bank, 0.0, gain / math.sqrt(fan_in) / rms)
        if self.bias_bank is not None:
            bound = 1.0 / math.sqrt(fan_in) / rms
            nn.init.uniform_(self.bias_bank, -bound, bound)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, padding_mode={self.padding_mode}, "
                f"groups={self.groups}, code_length={self.code_length}, bank_size={self.bank_size}, "
                f"bias={self.bias_bank is not None}")

    # ------------------------------------------------------------------------------------------------
    def mixing_coefficients(self, code: Tensor) -> Tensor:
        """f(s): (B, code_length) -> (B, c_w)."""
        if code.dim() != 2 or code.shape[1] != self.code_length:
            raise ValueError(f"HyperConv expects a code of shape (B, {self.code_length}), "
                             f"got {tuple(code.shape)}")
        return self.mlp(code.to(self.weight_bank.dtype))

    def mixed_weight(self, code: Tensor) -> Tensor:
        """Per-sample kernels ``param @ f(s)``: (B, out, in/groups, *k)."""
        f = self.mixing_coefficients(code)
        bank = self.weight_bank.reshape(-1, self.bank_size)            # (numel, c_w)
        kernels = f @ bank.t()                                          # (B, numel)
        return kernels.reshape(f.shape[0], *self.weight_bank.shape[:-1])

    def mixed_bias(self, code: Tensor) -> Optional[Tensor]:
        """Per-sample biases: (B, out), or None without bias."""
        if self.bias_bank is None:
            return None
        return self.mixing_coefficients(code) @ self.bias_bank.t()

    def _pad(self, x: Tensor) -> Tuple[Tensor, Tuple[int, ...]]:
        """Explicit padding for non-zero modes; returns the conv's own padding argument."""
        if self.padding_mode == "zeros" or not any(self.padding):
            return x, self.padding
        pads = []
        for p in reversed(self.padding):          # F.pad wants the last dim first
            pads += [p, p]
        mode = self.padding_mode
        if mode == "reflect" and any(p >= s for p, s in zip(self.padding, x.shape[2:])):
            # reflect needs pad < size; tiny feature maps fall back to replicate instead of crashing
            logger.debug("HyperConv: feature map %s too small for reflect padding %s, using replicate",
                         tuple(x.shape[2:]), self.padding)
            mode = "replicate"
        return F.pad(x, pads, mode=mode), (0,) * self.spatial_dims

    def forward(self, x: Tensor, code: Tensor) -> Tensor:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f"HyperConv({self.spatial_dims}D) expects input (B, C, *{self.spatial_dims} dims), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"HyperConv expects {self.in_channels} input channels, got {x.shape[1]}")
        if code.dim() != 2:
            raise ValueError(f"HyperConv expects a code of shape (B, {self.code_length}), got {tuple(code.shape)}")
        batch = x.shape[0]
        if code.shape[0] not in (1, batch):
            raise ValueError(f"HyperConv: batch size of the code ({code.shape[0]}) does not match the batch size "
                             f"of the input ({batch}); pass one code per sample or a single code (1, L)")
        if code.shape[0] > 1 and x.device.type == "cpu" and not _is_compiling() and bool((code == code[:1]).all()):
            code = code[:1]   # one shared code: a plain batched convolution is faster than the grouped one on CPU
        weight = self.mixed_weight(code).to(x.dtype)
        bias = self.mixed_bias(code)
        bias = bias.to(x.dtype) if bias is not None else None
        x, conv_padding = self._pad(x)
        if code.shape[0] == 1:
            return self._conv(x, weight[0], None if bias is None else bias[0], self.stride, conv_padding,
                              self.dilation, self.groups)
        # fold the batch into channels: sample b only sees its own kernel through groups = B * groups
        folded = x.reshape(1, batch * self.in_channels, *x.shape[2:])
        out_per_group = self.out_channels // self.groups
        padded = self._padded_group_channels(x)
        if padded != out_per_group:
            # exact: the extra output channels have zero kernels and biases and are dropped again below
            weight = weight.reshape(batch, self.groups, out_per_group, *weight.shape[2:])
            weight = F.pad(weight, (0, 0) * (weight.dim() - 3) + (0, padded - out_per_group))
            if bias is not None:
                bias = F.pad(bias.reshape(batch, self.groups, out_per_group), (0, padded - out_per_group))
        y = self._conv(folded, weight.reshape(batch * self.groups * padded, *weight.shape[-self.spatial_dims - 1:]),
                       None if bias is None else bias.reshape(-1), self.stride, conv_padding,
                       self.dilation, batch * self.groups)
        spatial = y.shape[2:]
        if padded != out_per_group:
            y = y.reshape(batch, self.groups, padded, *spatial)[:, :, :out_per_group]
        return y.reshape(batch, self.out_channels, *spatial)

    def _padded_group_channels(self, x: Tensor) -> int:
        """Output channels per group the grouped convolution runs with (see ``CPU_GROUP_CHANNEL_MULTIPLE``)."""
        out_per_group = self.out_channels // self.groups
        if x.device.type != "cpu" or math.prod(self.kernel_size) == 1:
            return out_per_group
        return -(-out_per_group // CPU_GROUP_CHANNEL_MULTIPLE) * CPU_GROUP_CHANNEL_MULTIPLE
