"""Reconstruction losses: masked L1 and the Seq2Seq eq. 1 combination ``lambda_r * L1 + lambda_p * perceptual``."""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional, Tuple

from torch import Tensor, nn

from nnsynth.exceptions import PlansError
from nnsynth.losses.perceptual import PerceptualLoss

logger = logging.getLogger(__name__)

# --- module constants (listed in the hand-over; candidates for nnsynth/constants.py) ---------------
SEQ2SEQ_LAMBDA_L1 = 10.0           # paper eq. 1, lambda_r
SEQ2SEQ_LAMBDA_PERCEPTUAL = 0.01   # paper eq. 1, lambda_p
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


def _weights_from_config(loss: Optional[Mapping[str, Any]], trainer: str) -> Dict[str, float]:
    cfg: Mapping[str, Any] = loss or {}
    if isinstance(cfg.get(trainer), Mapping):        # per-trainer sub-dict
        cfg = cfg[trainer]
    out = {}
    for key, aliases, default in (("lambda_l1", ("lambda_r", "lambda_rec"), SEQ2SEQ_LAMBDA_L1),
                                  ("lambda_perceptual", ("lambda_p",), SEQ2SEQ_LAMBDA_PERCEPTUAL)):
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
    return out


class Seq2SeqLoss(nn.Module):
    """Eq. 1 for one (source, target) pair: ``lambda_l1 * L1 + lambda_perceptual * LPIPS``.

    The perceptual term is skipped (and reported as 0) when ``perceptual`` is None, unavailable (no local
    weights) or its weight is 0. Sum over ordered pairs is the trainer's job (one pair per sample)."""

    def __init__(self, lambda_l1: float = SEQ2SEQ_LAMBDA_L1, lambda_perceptual: float = SEQ2SEQ_LAMBDA_PERCEPTUAL,
                 perceptual: Optional[PerceptualLoss] = None) -> None:
        super().__init__()
        self.lambda_l1 = float(lambda_l1)
        self.lambda_perceptual = float(lambda_perceptual)
        self.perceptual = perceptual

    @classmethod
    def from_config(cls, loss: Optional[Mapping[str, Any]], perceptual: Optional[PerceptualLoss] = None,
                    trainer: str = "seq2seq") -> "Seq2SeqLoss":
        """From the plans' ``loss`` dict (flat, or with a ``{trainer: {...}}`` entry); paper defaults fill gaps."""
        return cls(perceptual=perceptual, **_weights_from_config(loss, trainer))

    @property
    def uses_perceptual(self) -> bool:
        return self.perceptual is not None and self.perceptual.available and self.lambda_perceptual > 0

    def terms(self, pred: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Total ('loss') and unweighted terms ('l1', 'perceptual') as tensors (no device sync)."""
        l1 = masked_l1(pred, target, mask)
        total = self.lambda_l1 * l1
        p = pred.new_zeros(())
        if self.uses_perceptual:
            p = self.perceptual(pred, target)
            total = total + self.lambda_perceptual * p
        return {"loss": total, "l1": l1, "perceptual": p}

    def forward_with_terms(self, pred: Tensor, target: Tensor,
                           mask: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, float]]:
        """Total loss and its terms as floats (for logging; syncs the device)."""
        t = self.terms(pred, target, mask)
        return t["loss"], {k: float(v.detach()) for k, v in t.items()}

    def forward(self, pred: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return self.terms(pred, target, mask)["loss"]


__all__ = ["masked_l1", "Seq2SeqLoss", "SEQ2SEQ_LAMBDA_L1", "SEQ2SEQ_LAMBDA_PERCEPTUAL"]
