"""Reconstruction losses: masked L1 and the Seq2Seq eq. 1 combination ``lambda_r * L1 + lambda_p * perceptual``,
optionally with VQ-Seq2Seq's eq. 6 structural term ``lambda_ssim * (1 - SSIM)``."""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from nnsynth.exceptions import PlansError
from nnsynth.losses.perceptual import PerceptualLoss
from nnsynth.losses.ssim import ssim

logger = logging.getLogger(__name__)

# --- module constants (listed in the hand-over; candidates for nnsynth/constants.py) ---------------
SEQ2SEQ_LAMBDA_L1 = 10.0           # paper eq. 1, lambda_r
SEQ2SEQ_LAMBDA_PERCEPTUAL = 0.01   # paper eq. 1, lambda_p
SEQ2SEQ_LAMBDA_SSIM = 0.0          # not in eq. 1 (0: the paper's loss); VQ-Seq2Seq eq. 6 uses 1 beside L1's 10
INTENSITY_BALANCE_BINS = 20        # histogram bins over [0, 1] for intensity-balanced L1
INTENSITY_BALANCE_MAX_WEIGHT = 10.0  # cap on one voxel's weight (relative to the sample's mean weight 1)
# -----------------------------------------------------------------------------------------------------


def masked_l1(pred: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean |pred - target|; with a mask (bool or weights, broadcastable), the weighted mean over the mask.

    An empty mask gives 0 (still attached to the graph) rather than NaN."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    diff = (pred - target).abs()
    if mask is None:
        return diff.mean()
    weights = mask.to(diff.dtype).expand_as(diff)
    return (diff * weights).sum() / weights.sum().clamp_min(1e-12)     # sync-free; empty mask -> 0 / eps = 0


def intensity_balance_weights(target: Tensor, alpha: float, bins: int = INTENSITY_BALANCE_BINS,
                              max_weight: float = INTENSITY_BALANCE_MAX_WEIGHT) -> Tensor:
    """Per-voxel L1 weights that counter regression to the mean: inside each sample's foreground (target > 0) a
    voxel weighs ``p(bin)^-alpha``, p = the share of the sample's foreground voxels whose target intensity falls
    in the same of ``bins`` bins over [0, 1], rescaled to mean 1 over the foreground and capped at
    ``max_weight``; background voxels weigh 1. Rare intensities (a lesion, a thin bright structure) then count
    as much as their contrast deserves, not as little as their volume. No gradient flows through the weights.

    alpha = 0 gives all ones (plain L1); 0.5 is the inverse-square-root re-weighting of imbalanced regression."""
    with torch.no_grad():
        b = target.shape[0]
        flat = target.detach().reshape(b, -1).float()
        fg = flat > 0
        idx = (flat.clamp(0.0, 1.0) * bins).long().clamp_max(bins - 1)
        counts = torch.zeros(b, bins, device=flat.device).scatter_add_(1, idx, fg.float())
        share = counts / counts.sum(1, keepdim=True).clamp_min(1.0)
        w = share.gather(1, idx).clamp_min(1e-6).pow(-float(alpha)) * fg
        mean = w.sum(1, keepdim=True) / fg.sum(1, keepdim=True).clamp_min(1)
        w = (w / mean.clamp_min(1e-12)).clamp_max(float(max_weight))
        w = torch.where(fg, w, torch.ones_like(w))
        return w.reshape(target.shape).to(target.dtype)


def _weights_from_config(loss: Optional[Mapping[str, Any]], trainer: str) -> Dict[str, float]:
    cfg: Mapping[str, Any] = loss or {}
    if isinstance(cfg.get(trainer), Mapping):        # per-trainer sub-dict
        cfg = cfg[trainer]
    out = {}
    for key, aliases, default in (("lambda_l1", ("lambda_r", "lambda_rec"), SEQ2SEQ_LAMBDA_L1),
                                  ("lambda_perceptual", ("lambda_p",), SEQ2SEQ_LAMBDA_PERCEPTUAL),
                                  ("lambda_ssim", (), SEQ2SEQ_LAMBDA_SSIM)):
        value = cfg.get(key)
        for alias in aliases:
            if value is None:
                value = cfg.get(alias)
        try:
            out[key] = float(default if value is None else value)
        except (TypeError, ValueError) as exc:
            raise PlansError(f"loss weight {key} in the plans must be a number, got {value!r}") from exc
        if out[key] < 0:
            raise PlansError(f"loss weight {key} in the plans must be >= 0, got {out[key]}")
    out["intensity_balance"] = intensity_balance_from_config(cfg)
    return out


def intensity_balance_from_config(cfg: Mapping[str, Any]) -> float:
    """The plans' ``intensity_balance`` exponent (absent: 0, plain L1, as plans made before it existed)."""
    balance = cfg.get("intensity_balance", 0.0)
    try:
        value = float(balance)
    except (TypeError, ValueError) as exc:
        raise PlansError(f"loss intensity_balance in the plans must be a number (0 = plain L1), got {balance!r}") from exc
    if not 0.0 <= value <= 1.0:
        raise PlansError(f"loss intensity_balance must be in [0, 1] (0 = plain L1, 0.5 = inverse square root "
                         f"frequency), got {value}")
    return value


class Seq2SeqLoss(nn.Module):
    """Eq. 1 for one (source, target) pair: ``lambda_l1 * L1 + lambda_perceptual * LPIPS``, plus
    ``lambda_ssim * (1 - SSIM)`` when that weight is above 0 (SSIM over each output channel, Gaussian window).

    The perceptual term is skipped (and reported as 0) when ``perceptual`` is None, unavailable (no local
    weights) or its weight is 0. Sum over ordered pairs is the trainer's job (one pair per sample)."""

    def __init__(self, lambda_l1: float = SEQ2SEQ_LAMBDA_L1, lambda_perceptual: float = SEQ2SEQ_LAMBDA_PERCEPTUAL,
                 perceptual: Optional[PerceptualLoss] = None, intensity_balance: float = 0.0,
                 lambda_ssim: float = SEQ2SEQ_LAMBDA_SSIM) -> None:
        super().__init__()
        self.lambda_l1 = float(lambda_l1)
        self.lambda_perceptual = float(lambda_perceptual)
        self.lambda_ssim = float(lambda_ssim)
        self.perceptual = perceptual
        #: exponent of ``intensity_balance_weights`` for the L1 term when no mask is given (0: plain L1)
        self.intensity_balance = float(intensity_balance)

    @classmethod
    def from_config(cls, loss: Optional[Mapping[str, Any]], perceptual: Optional[PerceptualLoss] = None,
                    trainer: str = "seq2seq") -> "Seq2SeqLoss":
        """From the plans' ``loss`` dict (flat, or with a ``{trainer: {...}}`` entry); paper defaults fill gaps."""
        return cls(perceptual=perceptual, **_weights_from_config(loss, trainer))

    @property
    def uses_perceptual(self) -> bool:
        return self.perceptual is not None and self.perceptual.available and self.lambda_perceptual > 0

    def terms(self, pred: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Total ('loss') and unweighted terms ('l1', 'perceptual', 'ssim' = 1 - SSIM when on) as tensors (no
        device sync)."""
        if mask is None and self.intensity_balance > 0:
            mask = intensity_balance_weights(target, self.intensity_balance)
        l1 = masked_l1(pred, target, mask)
        total = self.lambda_l1 * l1
        p = pred.new_zeros(())
        if self.uses_perceptual:
            p = self.perceptual(pred, target)
            total = total + self.lambda_perceptual * p
        parts = {"l1": l1, "perceptual": p}
        if self.lambda_ssim > 0:
            parts["ssim"] = 1.0 - ssim(pred, target)
            total = total + self.lambda_ssim * parts["ssim"]
        return {"loss": total, **parts}

    def forward_with_terms(self, pred: Tensor, target: Tensor,
                           mask: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, float]]:
        """Total loss and its terms as floats (for logging; syncs the device)."""
        t = self.terms(pred, target, mask)
        return t["loss"], {k: float(v.detach()) for k, v in t.items()}

    def forward(self, pred: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return self.terms(pred, target, mask)["loss"]


__all__ = ["masked_l1", "intensity_balance_weights", "intensity_balance_from_config", "Seq2SeqLoss",
           "SEQ2SEQ_LAMBDA_L1", "SEQ2SEQ_LAMBDA_PERCEPTUAL", "SEQ2SEQ_LAMBDA_SSIM"]
