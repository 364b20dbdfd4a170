"""CodeBrain losses: weighted PSNR loss (stage I), LSGAN PatchGAN (stage I, optional), grading loss (stage II).

- PSNR loss: ``10 / ln 10 * log(MSE + eps)`` per (sample, sequence) = minus the PSNR at data range 1; the
  mean over the visible (kept) sequences is weighted ``w_available`` and the mean over the masked sequences
  the case really has ``w_missing`` (authors' code: 5 and 20). Sequences a case lacks get weight 0.
- Grading loss (eq. 5-6): a level ``y`` in ``0 .. L-1`` becomes ``L - 1`` ordinal bits ``B^j = [j < y]``;
  binary cross-entropy with logits against them. A predicted level is the number of bits with
  ``sigmoid > 0.5``.
- PatchGAN: a small conv discriminator with one output map per sequence (map ``j`` judges sequence ``j``),
  least-squares targets.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --- constants of this module ----------------------------------------------------------------------------
PSNR_LOSS_EPS = 1e-5        # caps the PSNR loss at 50 dB so an almost perfect (e.g. empty) patch cannot dominate
PSNR_SCALE = 10.0 / math.log(10.0)


def per_sequence_mse(pred: Tensor, target: Tensor) -> Tensor:
    """``(B, N, ...)`` -> ``(B, N)`` mean squared error of each sample's sequence."""
    return (pred.float() - target.float()).pow(2).flatten(2).mean(2)


def weighted_psnr_loss(pred: Tensor, target: Tensor, kept: Tensor, available: Tensor, w_available: float,
                       w_missing: float, eps: float = PSNR_LOSS_EPS) -> Tuple[Tensor, dict]:
    """PSNR loss on ``(B, N, ...)`` stacks; ``kept``/``available`` are ``(B, N)`` booleans.

    Returns the weighted total and the mean PSNR (dB) of the visible and the masked sequences for logging."""
    neg_psnr = PSNR_SCALE * torch.log(per_sequence_mse(pred, target) + eps)   # (B, N) = -PSNR
    available = available.bool()
    visible = kept.bool() & available
    missing = ~kept.bool() & available
    total = pred.new_zeros((), dtype=torch.float32)
    parts = {}
    for name, sel, w in (("visible", visible, w_available), ("missing", missing, w_missing)):
        if bool(sel.any()):
            term = neg_psnr[sel].mean()
            total = total + float(w) * term
            parts[f"psnr_{name}"] = float(-term.detach())
    return total, parts


def ordinal_encode(levels: Tensor, num_bits: int) -> Tensor:
    """Levels ``(...)`` in ``0 .. num_bits`` -> bits ``(..., num_bits)`` with ``bit_j = [j < level]`` (eq. 6)."""
    j = torch.arange(num_bits, device=levels.device)
    return (j < levels.unsqueeze(-1)).float()


def ordinal_decode(logits: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Ordinal logits ``(..., num_bits)`` -> levels: the number of (valid) bits with sigmoid > 0.5."""
    bits = logits > 0
    if valid is not None:
        bits = bits & valid.bool()
    return bits.sum(-1)


def grading_loss(logits: Tensor, target_levels: Tensor, weight: Optional[Tensor] = None,
                 valid: Optional[Tensor] = None) -> Tensor:
    """Ordinal BCE (eq. 5) between ``logits`` ``(B, N, d, L-1, *h)`` and integer ``target_levels`` ``(B, N, d, *h)``.

    ``weight`` ``(B, N)`` selects the sequences that count (the ones the case has); ``valid`` ``(d, L-1)``
    marks the bits that exist for each code channel (channels with fewer levels than the largest)."""
    num_bits = logits.shape[3]
    target = ordinal_encode(target_levels, num_bits).movedim(-1, 3)            # (B, N, d, L-1, *h)
    bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    mask = torch.ones_like(bce)
    if valid is not None:
        mask = mask * valid.to(bce.dtype).view(1, 1, *valid.shape, *([1] * (bce.ndim - 4)))
    if weight is not None:
        mask = mask * weight.to(bce.dtype).view(*weight.shape, *([1] * (bce.ndim - 2)))
    denom = mask.sum()
    if float(denom) == 0:
        return bce.sum() * 0.0
    return (bce * mask).sum() / denom


class SequencePatchDiscriminator(nn.Module):
    """PatchGAN on one sequence's image (k slices or a 3D patch) with one output map per sequence."""

    def __init__(self, in_channels: int, num_sequences: int, spatial_dims: int, width: int = 32,
                 depth: int = 3) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
        layers, c = [conv(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)], width
        for _ in range(depth - 1):
            layers += [conv(c, 2 * c, 4, 2, 1), norm(2 * c, affine=True), nn.LeakyReLU(0.2)]
            c *= 2
        layers.append(conv(c, num_sequences, 3, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, sequence: Tensor) -> Tensor:
        """``x`` ``(M, in_channels, *s)`` in [0, 1], ``sequence`` ``(M,)`` -> the sequences' maps ``(M, *s')``."""
        out = self.net(x * 2 - 1)
        return out[torch.arange(x.shape[0], device=x.device), sequence]


def lsgan_generator_loss(fake_scores: Tensor) -> Tensor:
    return (fake_scores.float() - 1).pow(2).mean()


def lsgan_discriminator_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    return 0.5 * ((real_scores.float() - 1).pow(2).mean() + fake_scores.float().pow(2).mean())
