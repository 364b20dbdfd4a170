"""Finite scalar quantisation (FSQ) with an implicit codebook, as CodeBrain uses it (eq. 1).

Every channel ``j`` of a latent map is bounded and rounded to one of ``L_j`` integer levels:

    half_l = (L - 1) * (1 + eps) / 2
    offset = 0.5 if L is even else 0
    shift  = atanh(offset / half_l)
    z      = tanh(F + shift) * half_l - offset          # in (-(L-1)/2 - offset, (L-1)/2 - offset)
    q      = z + sg[round(z) - z]                       # straight-through rounding

so ``round(z)`` takes exactly ``L`` values: ``-(L//2) .. (L-1)//2`` (odd L: symmetric; even L: one more on the
negative side). The quantiser returns codes divided by ``L // 2`` (in [-1, 1]); level indices
``0 .. L-1`` are ``round(q) + L // 2`` and one integer index over all channels is the mixed-radix number
of the level digits (basis ``1, L_0, L_0 L_1, ...``). The codebook is implicit: nothing is learnt here.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import Tensor, nn

from nnsynth.exceptions import PlansError

# --- constants of this module -------------------------------------------------------------------------
FSQ_EPS = 1e-3   # widens the tanh range a little so the extreme levels are reachable with finite inputs


class FSQ(nn.Module):
    """Scalar-quantise the channels of ``(B, d, *spatial)`` maps to ``levels[j]`` values each."""

    def __init__(self, levels: Sequence[int], eps: float = FSQ_EPS) -> None:
        super().__init__()
        levels = [int(v) for v in levels]
        if not levels or any(v < 2 for v in levels):
            raise PlansError(f"FSQ levels must be a non-empty list of integers >= 2, got {list(levels)}")
        self.levels: List[int] = levels
        self.dim = len(levels)
        self.eps = float(eps)
        lv = torch.tensor(levels, dtype=torch.float64)
        half_l = (lv - 1) * (1 + self.eps) / 2
        offset = torch.where(lv % 2 == 0, torch.full_like(lv, 0.5), torch.zeros_like(lv))
        shift = torch.atanh(offset / half_l)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.int64), 0)
        self.register_buffer("_half_l", half_l.float(), persistent=False)
        self.register_buffer("_offset", offset.float(), persistent=False)
        self.register_buffer("_shift", shift.float(), persistent=False)
        self.register_buffer("_half_width", (lv // 2).float(), persistent=False)
        self.register_buffer("_levels", lv.float(), persistent=False)
        self.register_buffer("_basis", basis, persistent=False)

    @property
    def codebook_size(self) -> int:
        return int(math.prod(self.levels))

    def _view(self, t: Tensor, ndim: int) -> Tensor:
        return t.view(1, -1, *([1] * (ndim - 2)))

    def bound(self, x: Tensor) -> Tensor:
        """The bounded, not yet rounded values ``z`` (channel axis 1)."""
        if x.shape[1] != self.dim:
            raise ValueError(f"FSQ expects {self.dim} channels, got {x.shape[1]}")
        n = x.ndim
        return torch.tanh(x + self._view(self._shift, n)) * self._view(self._half_l, n) - self._view(self._offset, n)

    def forward(self, x: Tensor) -> Tensor:
        """Quantised codes normalised to [-1, 1]; gradients pass straight through the rounding."""
        z = self.bound(x.float())
        q = z + (torch.round(z) - z).detach()
        return q / self._view(self._half_width, x.ndim)

    # --- codes <-> level digits <-> indices ---------------------------------------------------------------
    def codes_to_levels(self, codes: Tensor) -> Tensor:
        """Normalised codes -> level digits in ``0 .. L-1`` (int64), channel axis 1."""
        hw = self._view(self._half_width, codes.ndim)
        return (codes * hw + hw).round().long()

    def levels_to_codes(self, digits: Tensor) -> Tensor:
        """Level digits (channel axis 1) -> normalised codes."""
        hw = self._view(self._half_width, digits.ndim)
        return (digits.float() - hw) / hw

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """Normalised codes ``(B, d, *s)`` -> one implicit-codebook index per position ``(B, *s)``."""
        digits = self.codes_to_levels(codes)
        return (digits * self._view(self._basis, codes.ndim)).sum(1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Indices ``(B, *s)`` -> normalised codes ``(B, d, *s)``."""
        idx = indices.long().unsqueeze(1)
        n = idx.ndim
        digits = torch.div(idx, self._view(self._basis, n), rounding_mode="floor") % self._view(
            self._levels.long(), n)
        return self.levels_to_codes(digits)

    def all_codes(self) -> Tensor:
        """The whole implicit codebook ``(codebook_size, d)`` in index order."""
        return self.indices_to_codes(torch.arange(self.codebook_size, device=self._basis.device)).view(
            self.codebook_size, self.dim)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, codebook_size={self.codebook_size}"
