"""Dice + cross-entropy, the nnU-Net segmentation loss, for the one-shot segmentation trainers.

``loss = lambda_ce * CE(logits, labels) + lambda_dice * (1 - mean_c Dice_c)`` with the soft Dice of the
softmax probabilities over the foreground classes c >= 1, pooled over the whole batch ("batch Dice") and
smoothed by ``DICE_SMOOTH`` so that a class absent from both prediction and batch counts as perfect.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --- module constants ------------------------------------------------------------------------------------------
DICE_SMOOTH = 1e-5
# ---------------------------------------------------------------------------------------------------------------


def soft_dice_per_class(logits: Tensor, labels: Tensor, smooth: float = DICE_SMOOTH) -> Tensor:
    """Soft Dice of each class (C,) from logits (B, C, *T) and integer labels (B, *T), pooled over the batch."""
    probs = torch.softmax(logits.float(), 1)
    onehot = F.one_hot(labels.long(), logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    axes = [0] + list(range(2, logits.dim()))
    inter = (probs * onehot).sum(axes)
    denom = probs.sum(axes) + onehot.sum(axes)
    return (2.0 * inter + smooth) / (denom + smooth)


class DiceCELoss(nn.Module):
    """``lambda_ce * CE + lambda_dice * (1 - mean foreground soft Dice)``; returns the loss and its parts."""

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0) -> None:
        super().__init__()
        self.lambda_dice, self.lambda_ce = float(lambda_dice), float(lambda_ce)

    def forward(self, logits: Tensor, labels: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        ce = F.cross_entropy(logits.float(), labels.long())
        dice = soft_dice_per_class(logits, labels)
        fg = dice[1:] if dice.numel() > 1 else dice
        dice_loss = 1.0 - fg.mean()
        return self.lambda_ce * ce + self.lambda_dice * dice_loss, {"ce": ce, "dice_loss": dice_loss}


__all__ = ["DiceCELoss", "soft_dice_per_class", "DICE_SMOOTH"]
