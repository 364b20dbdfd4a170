"""TSF-Seq2Seq (paper ``tsf_seq2seq_task_specific_fusion.md``): task-specific fusion of several encoded sources.

Task code ``c = [c_src (N), c_tgt (N)]`` (zero-one). With E and G from a trained Seq2Seq (or VQ-Seq2Seq):

- eq. 1: ``omega_0 = softmax(c W + b) + eps`` (eps = 1e-5);
- eq. 2: ``omega = omega_0 * c_src / <omega_0, c_src>``: exactly 0 for missing sources, sums to 1;
- eq. 3: ``f = sum_i omega_i E(X_i)``; with one source i, omega_i = omega_0i / omega_0i = 1 exactly and
  f == E(X_i) bit for bit (the sum starts at 0 and adds only the available sources);
- eq. 4: ``f_A = G_A(f | c)``: CBAM (channel attention with reduction 16 on avg- and max-pooled features
  through a shared two-layer MLP, spatial attention with a k7 convolution on the channel-wise [mean, max])
  where every convolution is a HyperConv conditioned on the task code c;
- both ``X' = G(f | c_tgt)`` and ``X'_A = G(f + f_A | c_tgt)`` are decoded (loss eq. 5 on both);
- eq. 6: ``TSEM = |X'_A - X'|`` (``tsem``).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnsynth.exceptions import PlansError
from nnsynth.networks.hyperconv import HyperConv

logger = logging.getLogger(__name__)

# --- module constants (paper values; the plans' "tsf" entry overrides them) -----------------------------------
TSF_DEFAULTS: Dict[str, Any] = {
    "attention_reduction": 16,   # CBAM channel-attention ratio
    "spatial_kernel": 7,         # CBAM spatial-attention kernel
    "omega_eps": 1e-5,           # eq. 1 epsilon
    "hyper_bank_size": 16,       # c_w of the attention HyperConvs (the network's value when present)
}
# ---------------------------------------------------------------------------------------------------------------


def task_code(sources: Tensor, target: Tensor, num_sequences: int) -> Tensor:
    """``[c_src, c_tgt]`` (B, 2N) from a source mask (B, N) and target indices (B,)."""
    c_src = sources.to(torch.float32)
    c_tgt = F.one_hot(target.long(), num_sequences).to(c_src.dtype)
    return torch.cat([c_src, c_tgt], dim=1)


def tsem(x_prime: Tensor, x_prime_attention: Tensor) -> Tensor:
    """Task-specific enhanced map, eq. 6: ``|X'_A - X'|`` (same shape as the images)."""
    return (x_prime_attention - x_prime).abs()


class TaskSpecificWeighting(nn.Module):
    """Eq. 1-2: sequence-contribution weights omega (B, N) from the task code."""

    def __init__(self, num_sequences: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_sequences, self.eps = int(num_sequences), float(eps)
        self.fc = nn.Linear(2 * self.num_sequences, self.num_sequences)

    def forward(self, c_src: Tensor, c_tgt: Tensor) -> Tensor:
        c_src = c_src.to(self.fc.weight.dtype)
        if bool((c_src.sum(1) <= 0).any()):
            raise ValueError("every task needs at least one source sequence (c_src is all zero)")
        omega0 = torch.softmax(self.fc(torch.cat([c_src, c_tgt.to(c_src.dtype)], 1)), dim=1) + self.eps
        masked = omega0 * c_src
        return masked / masked.sum(1, keepdim=True)


class HyperChannelAttention(nn.Module):
    """CBAM channel attention with HyperConv 1x1 layers (shared MLP on avg- and max-pooled features)."""

    def __init__(self, channels: int, reduction: int, code_length: int, spatial_dims: int, bank_size: int) -> None:
        super().__init__()
        hidden = max(1, channels // max(1, int(reduction)))
        common = dict(code_length=code_length, spatial_dims=spatial_dims, bank_size=bank_size, padding_mode="zeros")
        self.fc1 = HyperConv(channels, hidden, 1, **common)
        self.fc2 = HyperConv(hidden, channels, 1, **common)
        self.spatial_dims = spatial_dims

    def _mlp(self, x: Tensor, code: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x, code)), code)

    def forward(self, x: Tensor, code: Tensor) -> Tensor:
        dims = tuple(range(2, x.dim()))
        avg = x.mean(dim=dims, keepdim=True)
        mx = x.amax(dim=dims, keepdim=True)
        return torch.sigmoid(self._mlp(avg, code) + self._mlp(mx, code))


class HyperSpatialAttention(nn.Module):
    """CBAM spatial attention: HyperConv (k7) on the channel-wise [mean, max] maps."""

    def __init__(self, kernel_size: int, code_length: int, spatial_dims: int, bank_size: int) -> None:
        super().__init__()
        if int(kernel_size) % 2 == 0:
            raise PlansError(f"tsf.spatial_kernel must be odd, got {kernel_size}")
        self.conv = HyperConv(2, 1, int(kernel_size), code_length, spatial_dims=spatial_dims, bank_size=bank_size,
                              padding_mode="zeros", init_gain=1.0)

    def forward(self, x: Tensor, code: Tensor) -> Tensor:
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled, code))


class HyperCBAM(nn.Module):
    """G_A: ``f_A = Ms(f') * f'`` with ``f' = Mc(f) * f``; HyperConvs conditioned on the task code."""

    def __init__(self, channels: int, code_length: int, spatial_dims: int, reduction: int = 16,
                 spatial_kernel: int = 7, bank_size: int = 16) -> None:
        super().__init__()
        self.channel = HyperChannelAttention(channels, reduction, code_length, spatial_dims, bank_size)
        self.spatial = HyperSpatialAttention(spatial_kernel, code_length, spatial_dims, bank_size)

    def forward(self, f: Tensor, code: Tensor) -> Tensor:
        f1 = f * self.channel(f, code)
        return f1 * self.spatial(f1, code)


class TSFNet(nn.Module):
    """E and G of a (VQ-)Seq2Seq backbone with the task-specific fusion module in between.

    ``forward(images, sources, target)``: ``images`` (B, N, k, *S) with every sequence slot (missing ones may
    hold anything: they are never encoded), ``sources`` (B, N) zero-one mask, ``target`` (B,) indices.
    Returns ``(X', X'_A, omega)``."""

    def __init__(self, backbone: nn.Module, tsf: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__()
        cfg = {**TSF_DEFAULTS, **{k: v for k, v in (tsf or {}).items() if k in TSF_DEFAULTS}}
        net_cfg = getattr(backbone, "network_config", {})
        if "hyper_bank_size" not in (tsf or {}) and "hyper_bank_size" in net_cfg:
            cfg["hyper_bank_size"] = int(net_cfg["hyper_bank_size"])
        self.backbone = backbone
        self.num_sequences = int(backbone.num_sequences)
        self.spatial_dims = int(backbone.spatial_dims)
        self.in_channels = int(backbone.in_channels)
        self.tsf_config = cfg
        self.weighting = TaskSpecificWeighting(self.num_sequences, float(cfg["omega_eps"]))
        # attention acts on the bottleneck channels; skip maps folded into an encoding are fused by omega only
        self.bottleneck_channels = int(getattr(backbone, "bottleneck_channels", backbone.latent_channels))
        self.attention = HyperCBAM(self.bottleneck_channels, 2 * self.num_sequences, self.spatial_dims,
                                   int(cfg["attention_reduction"]), int(cfg["spatial_kernel"]),
                                   int(cfg["hyper_bank_size"]))

    # ----- freezing ---------------------------------------------------------------------------------------
    def encoder_modules(self) -> Sequence[nn.Module]:
        """What 'E' is: the encoder, plus the quantiser for a VQ-Seq2Seq backbone (features = post(z_q))."""
        mods = [self.backbone.encoder]
        if hasattr(self.backbone, "quantizer"):
            mods.append(self.backbone.quantizer)
        return mods

    def freeze_encoder(self) -> None:
        for m in self.encoder_modules():
            for p in m.parameters():
                p.requires_grad_(False)
            m.eval()

    def train(self, mode: bool = True) -> "TSFNet":
        super().train(mode)
        for m in self.encoder_modules():
            if not any(p.requires_grad for p in m.parameters()):
                m.eval()      # a frozen encoder stays in eval mode (no codebook updates, no running stats)
        return self

    # ----- fusion -----------------------------------------------------------------------------------------
    def omega(self, sources: Tensor, target: Tensor) -> Tensor:
        c_tgt = F.one_hot(target.long(), self.num_sequences).to(self.weighting.fc.weight.dtype)
        return self.weighting(sources, c_tgt)

    def fuse(self, images: Tensor, sources: Tensor, omega: Tensor) -> Tensor:
        """Eq. 3, encoding only the available sources: ``f = 0 + sum_i omega_i E(X_i)``."""
        fused: Optional[Tensor] = None
        for s in range(self.num_sequences):
            rows = sources[:, s] > 0
            if not bool(rows.any()):
                continue
            feats = self.backbone.encode(images[rows, s], s)
            if fused is None:
                fused = feats.new_zeros((images.shape[0],) + tuple(feats.shape[1:]))
            w = omega[rows, s].to(feats.dtype).reshape(-1, *([1] * (feats.dim() - 1)))
            fused = fused.index_put((rows.nonzero(as_tuple=True)[0],), fused[rows] + w * feats)
        if fused is None:
            raise ValueError("no source sequence to fuse")
        return fused

    def forward(self, images: Tensor, sources: Tensor, target: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        if images.dim() != self.spatial_dims + 3 or images.shape[1] != self.num_sequences:
            raise ValueError(f"images must be (B, {self.num_sequences}, {self.in_channels}, *S), "
                             f"got {tuple(images.shape)}")
        sources = sources.to(images.dtype)
        omega = self.omega(sources, target)
        f = self.fuse(images, sources, omega)
        code = torch.cat([sources, F.one_hot(target.long(), self.num_sequences).to(sources.dtype)], 1)
        b = self.bottleneck_channels
        f_a = self.attention(f[:, :b], code.to(f.dtype))
        tgt = target.long()
        size = images.shape[3:]
        x_prime = self.backbone.decode(f, tgt, output_size=size)
        x_prime_a = self.backbone.decode(torch.cat([f[:, :b] + f_a, f[:, b:]], 1), tgt, output_size=size)
        return x_prime, x_prime_a, omega


__all__ = ["TSFNet", "TaskSpecificWeighting", "HyperCBAM", "HyperChannelAttention", "HyperSpatialAttention",
           "task_code", "tsem", "TSF_DEFAULTS"]
