"""Latent-space consistency of VQ-Seq2Seq (eq. 7): stop-gradient MSE both ways + symmetric InfoNCE.

    L_con(z1, z2) = ||sg[z1] - z2||^2 + ||sg[z2] - z1||^2
                    - sum_{p in M} log softmax_q(z1_p . z2_q / tau)[p] + log softmax_q(z2_p . z1_q / tau)[p]

over foreground latent positions M of one case, tau = 0.07. Choices (documented in trainers_vq_tsf.md):

- the InfoNCE terms are averaged over positions (not summed) so the weight does not depend on image size;
- at most ``max_positions`` foreground positions per sample are drawn at random (memory is O(M^2) otherwise);
  with ``keep_fraction < 1`` only that fraction of them, the least self-similar ones (lowest mean cosine
  similarity of z1 to the other drawn positions), enters the InfoNCE, as the authors' code did with 1/8 --
  quantised latents repeat codes a lot, and repeated codes are unresolvable negatives;
- ``normalize=True`` (default) scores cosine similarities (unit vectors, as in PatchNCE, ref. 15 of the paper);
  ``normalize=False`` uses the raw dot products of eq. 7;
- ``exclude_same_code=True`` (with the code index of every position): a position whose latent is the SAME code as
  the positive's is not a negative. Quantised latents repeat a few codes over the whole brain (64-256 codes,
  thousands of positions), and such a negative is the positive's exact copy: its logit equals the positive's
  whatever the encoder does, so the InfoNCE can never fall below log(number of copies) and its gradient, passed
  to z_e by the straight-through estimator, keeps pushing the encoder's vectors off their codes. Without the
  copies the term is satisfiable and stops pushing once the codes of different positions are told apart.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# --- module constants (paper values; the plans' "loss.vq_seq2seq" entry overrides them) ---------------------
CONTRASTIVE_TAU = 0.07
CONTRASTIVE_MAX_POSITIONS = 4096   # per sample (total positions per InfoNCE matrix)
CONTRASTIVE_KEEP_FRACTION = 0.125  # authors' code: the 1/8 least self-similar positions
CONTRASTIVE_MIN_POSITIONS = 2      # fewer foreground positions than this: the InfoNCE term is skipped (0)
# ---------------------------------------------------------------------------------------------------------------


def consistency_mse(z1: Tensor, z2: Tensor) -> Tensor:
    """``mse(sg[z1], z2) + mse(sg[z2], z1)``: each latent is pulled towards the other, never pushed."""
    return F.mse_loss(z2, z1.detach()) + F.mse_loss(z1, z2.detach())


def info_nce(a: Tensor, b: Tensor, tau: float = CONTRASTIVE_TAU, normalize: bool = True,
             codes_a: Optional[Tensor] = None, codes_b: Optional[Tensor] = None) -> Tensor:
    """Symmetric InfoNCE between matched rows of a and b (M, D): position p of a is the positive of position p
    of b, every other position of b is a negative (and the same the other way). Mean over positions, both
    directions summed (the product inside eq. 7's log). With the code indices ``codes_a``/``codes_b`` (M,), a
    position q is no negative of p where its code equals p's positive's code (module docstring)."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"info_nce expects two (M, D) tensors of the same shape, got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")
    if (codes_a is None) != (codes_b is None):
        raise ValueError("info_nce needs both code index vectors or neither")
    if normalize:
        a, b = F.normalize(a.float(), dim=1), F.normalize(b.float(), dim=1)
    logits = a.float() @ b.float().t() / float(tau)
    labels = torch.arange(a.shape[0], device=a.device)
    logits_t = logits.t()
    if codes_a is not None:
        eye = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
        # row p of a -> columns of b: drop the columns holding b's code at p (copies of the positive)
        copies_b = (codes_b[None, :] == codes_b[:, None]) & ~eye
        copies_a = (codes_a[None, :] == codes_a[:, None]) & ~eye
        logits = logits.masked_fill(copies_b, float("-inf"))
        logits_t = logits_t.masked_fill(copies_a, float("-inf"))
    return F.cross_entropy(logits, labels) + F.cross_entropy(logits_t, labels)


def least_self_similar(z: Tensor, keep: int) -> Tensor:
    """Indices of the ``keep`` rows of z (M, D) with the lowest mean cosine similarity to the other rows."""
    zn = F.normalize(z.detach().float(), dim=1)
    sim = (zn @ zn.t()).mean(1)
    return sim.argsort()[:keep]


def sample_positions(mask: Tensor, max_positions: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Indices of at most ``max_positions`` True entries of a flat bool mask, drawn without replacement."""
    idx = mask.reshape(-1).nonzero(as_tuple=True)[0]
    if idx.numel() > max_positions:
        perm = torch.randperm(idx.numel(), generator=generator, device="cpu")[:max_positions].to(idx.device)
        idx = idx[perm]
    return idx


class LatentConsistencyLoss(nn.Module):
    """Eq. 7 for a batch of latent pairs z1, z2 (B, D, *S) with a foreground mask (B, *S) or (B, 1, *S).

    Returns ``(mse_part, infonce_part)``; the eq. 7 value is their sum. Samples without enough foreground
    positions contribute 0 to the InfoNCE mean."""

    def __init__(self, tau: float = CONTRASTIVE_TAU, max_positions: int = CONTRASTIVE_MAX_POSITIONS,
                 normalize: bool = True, keep_fraction: float = 1.0, exclude_same_code: bool = False) -> None:
        super().__init__()
        if float(tau) <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if not 0.0 < float(keep_fraction) <= 1.0:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
        self.tau, self.max_positions, self.normalize = float(tau), int(max_positions), bool(normalize)
        self.keep_fraction = float(keep_fraction)
        self.exclude_same_code = bool(exclude_same_code)

    def forward(self, z1: Tensor, z2: Tensor, mask: Optional[Tensor] = None, codes1: Optional[Tensor] = None,
                codes2: Optional[Tensor] = None):
        """``codes1``/``codes2`` (B, *S): code index of every latent position, used with ``exclude_same_code``."""
        if z1.shape != z2.shape:
            raise ValueError(f"z1 and z2 differ in shape: {tuple(z1.shape)} vs {tuple(z2.shape)}")
        mse = consistency_mse(z1, z2)
        b = z1.shape[0]
        if mask is None:
            mask = torch.ones((b,) + tuple(z1.shape[2:]), dtype=torch.bool, device=z1.device)
        mask = mask.reshape(b, -1).bool()
        f1 = z1.reshape(b, z1.shape[1], -1)
        f2 = z2.reshape(b, z2.shape[1], -1)
        use_codes = self.exclude_same_code
        if use_codes and (codes1 is None or codes2 is None):
            raise ValueError("exclude_same_code needs the code index maps codes1 and codes2")
        c1 = codes1.reshape(b, -1) if use_codes else None
        c2 = codes2.reshape(b, -1) if use_codes else None
        terms = []
        for i in range(b):
            idx = sample_positions(mask[i], self.max_positions)
            if self.keep_fraction < 1.0 and idx.numel() > CONTRASTIVE_MIN_POSITIONS:
                keep = max(CONTRASTIVE_MIN_POSITIONS, int(round(idx.numel() * self.keep_fraction)))
                idx = idx[least_self_similar(f1[i][:, idx].t(), keep)]
            if idx.numel() < CONTRASTIVE_MIN_POSITIONS:
                continue
            terms.append(info_nce(f1[i][:, idx].t(), f2[i][:, idx].t(), self.tau, self.normalize,
                                  c1[i][idx] if use_codes else None, c2[i][idx] if use_codes else None))
        nce = torch.stack(terms).mean() if terms else (z1.sum() + z2.sum()) * 0.0   # 0, still in the graph
        return mse, nce


__all__ = ["LatentConsistencyLoss", "least_self_similar", "CONTRASTIVE_KEEP_FRACTION", "consistency_mse", "info_nce", "sample_positions", "CONTRASTIVE_TAU",
           "CONTRASTIVE_MAX_POSITIONS"]
