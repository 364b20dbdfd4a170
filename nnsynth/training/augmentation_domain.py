"""Random domain augmentation of VQ-Seq2Seq (paper sec. 2.4 and 3.1), applied to network inputs on the fly.

Three kinds; during training an input X_i is replaced by ONE augmented version (the targets stay clean):

1. intensity transform T (on images in [0, 1]): gamma ``x ** g``, g ~ U(0.95, 1.05); a smooth multiplicative
   bias field; additive Gaussian noise with sigma ~ U(0, 0.1);
2. cross-sequence translation ``X_aug = G(z_q(X_i), c_r)`` with a random one-hot code c_r;
3. random-domain translation ``X_aug = G(z_q(X_i), c_r)`` with ``c_r ~ U(0, 1)`` (first N code entries).

Bias field (the paper gives "scale 0.2, degree of inhomogeneity alpha ~ U(0, 2)" without a formula):
``field = exp(alpha * scale * q(r))`` where q is a random polynomial of order 3 in the normalised coordinates
r in [-1, 1]^d (coefficients U(-1, 1)), rescaled to max |q| = 1 over the patch. So alpha = 2, scale = 0.2 gives
a field between exp(-0.4) = 0.67 and exp(0.4) = 1.49. The field is shared by the channels of a sample (the
k slices of a 2.5D stack) and varies along every spatial axis of the patch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# --- module constants (paper values; the plans' "augmentation" entry overrides them) -------------------------
DOMAIN_AUGMENTATION_DEFAULTS: Dict[str, Any] = {
    "gamma": [0.95, 1.05],
    "noise_sigma": [0.0, 0.1],
    "bias_field_scale": 0.2,
    "bias_field_alpha": [0.0, 2.0],
    "bias_field_order": 3,
    "p_domain_augmentation": 0.5,           # probability that an input is replaced by an augmented version
    # relative frequency of the three kinds when an input is augmented
    "domain_augmentation_kinds": {"intensity": 1.0, "cross_sequence": 1.0, "random_code": 1.0},
}
AUGMENTATION_KINDS = ("intensity", "cross_sequence", "random_code")
# ---------------------------------------------------------------------------------------------------------------


def _uniform(lo_hi: Sequence[float], n: int, generator: Optional[torch.Generator]) -> Tensor:
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def polynomial_exponents(ndim: int, order: int) -> List[Tuple[int, ...]]:
    """Exponent tuples of the non-constant monomials of total degree <= order."""
    return [e for e in np.ndindex(*([order + 1] * ndim)) if 0 < sum(e) <= order]


def random_polynomial(shape: Sequence[int], order: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """A random polynomial field over ``shape`` with max |q| = 1 (coefficients U(-1, 1))."""
    axes = torch.meshgrid(*[torch.linspace(-1.0, 1.0, int(s)) for s in shape], indexing="ij")
    q = torch.zeros(tuple(int(s) for s in shape))
    exps = polynomial_exponents(len(shape), int(order))
    coefs = torch.rand(len(exps), generator=generator) * 2 - 1
    for e, c in zip(exps, coefs):
        term = torch.ones_like(q)
        for ax, p in zip(axes, e):
            if p:
                term = term * ax ** p
        q = q + float(c) * term
    peak = q.abs().max()
    return q / peak if float(peak) > 0 else q


def bias_field(shape: Sequence[int], alpha: float, scale: float = 0.2, order: int = 3,
               generator: Optional[torch.Generator] = None) -> Tensor:
    """``exp(alpha * scale * q)``: a positive smooth field between exp(-alpha*scale) and exp(alpha*scale)."""
    return torch.exp(float(alpha) * float(scale) * random_polynomial(shape, order, generator))


@dataclass
class IntensityParameters:
    gamma: float
    noise_sigma: float
    alpha: float


def intensity_transform(x: Tensor, settings: Optional[Mapping[str, Any]] = None,
                        generator: Optional[torch.Generator] = None,
                        params: Optional[List[IntensityParameters]] = None) -> Tuple[Tensor, List[IntensityParameters]]:
    """T(x) for a batch (B, C, *S) in [0, 1]: gamma, then bias field, then Gaussian noise, per sample.

    Returns the transformed batch and the drawn parameters (pass ``params`` to reuse fixed ones)."""
    cfg = {**DOMAIN_AUGMENTATION_DEFAULTS, **(settings or {})}
    b = x.shape[0]
    if params is None:
        gammas = _uniform(cfg["gamma"], b, generator)
        sigmas = _uniform(cfg["noise_sigma"], b, generator)
        alphas = _uniform(cfg["bias_field_alpha"], b, generator)
        params = [IntensityParameters(float(g), float(s), float(a)) for g, s, a in zip(gammas, sigmas, alphas)]
    out = []
    for i in range(b):
        p = params[i]
        xi = x[i].clamp_min(0.0) ** p.gamma
        field = bias_field(x.shape[2:], p.alpha, float(cfg["bias_field_scale"]), int(cfg["bias_field_order"]),
                           generator).to(x.device, x.dtype)
        xi = xi * field[None]
        noise = torch.randn(xi.shape, generator=generator).to(x.device, x.dtype)
        out.append(xi + p.noise_sigma * noise)
    return torch.stack(out), params


def random_one_hot_code(batch: int, num_sequences: int, code_length: int,
                        generator: Optional[torch.Generator] = None) -> Tensor:
    """One-hot target codes of random sequences (cross-sequence translation)."""
    idx = torch.randint(num_sequences, (batch,), generator=generator)
    code = torch.zeros(batch, code_length)
    code[torch.arange(batch), idx] = 1.0
    return code


def random_uniform_code(batch: int, num_sequences: int, code_length: int,
                        generator: Optional[torch.Generator] = None) -> Tensor:
    """Random-domain codes c_r ~ U(0, 1) on the N sequence entries (the rest of the code stays 0, as in one-hot)."""
    code = torch.zeros(batch, code_length)
    code[:, :num_sequences] = torch.rand(batch, num_sequences, generator=generator)
    return code


class DomainAugmenter:
    """Replaces each input, with probability ``p_domain_augmentation``, by one augmented version (kinds drawn by
    their relative frequency). ``translate(x, code)`` is the network's own translation (no gradient)."""

    def __init__(self, num_sequences: int, code_length: int, settings: Optional[Mapping[str, Any]] = None) -> None:
        cfg = {**DOMAIN_AUGMENTATION_DEFAULTS, **{k: v for k, v in (settings or {}).items()
                                                  if k in DOMAIN_AUGMENTATION_DEFAULTS}}
        self.cfg = cfg
        self.num_sequences, self.code_length = int(num_sequences), int(code_length)
        self.p = float(cfg["p_domain_augmentation"])
        kinds = cfg["domain_augmentation_kinds"]
        self.kinds = [k for k in AUGMENTATION_KINDS if float(kinds.get(k, 0.0)) > 0]
        weights = torch.tensor([float(kinds[k]) for k in self.kinds]) if self.kinds else torch.zeros(0)
        self.weights = weights / weights.sum() if self.kinds else weights

    def __call__(self, x: Tensor, translate: Callable[[Tensor, Tensor], Tensor],
                 generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Dict[str, int]]:
        """Augmented copy of x (B, C, *S) and how many samples got each kind."""
        b = x.shape[0]
        counts = {k: 0 for k in AUGMENTATION_KINDS}
        if not self.kinds or self.p <= 0 or b == 0:
            return x, counts
        chosen = torch.rand(b, generator=generator) < self.p
        kind = torch.multinomial(self.weights, b, replacement=True, generator=generator)
        out = x.clone()
        for ki, name in enumerate(self.kinds):
            rows = (chosen & (kind == ki)).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            counts[name] = int(rows.numel())
            sel = rows.to(x.device)
            if name == "intensity":
                out[sel] = intensity_transform(x[sel], self.cfg, generator)[0]
                continue
            maker = random_one_hot_code if name == "cross_sequence" else random_uniform_code
            code = maker(rows.numel(), self.num_sequences, self.code_length, generator).to(x.device, x.dtype)
            with torch.no_grad():
                out[sel] = translate(x[sel], code).to(x.dtype)
        return out, counts


__all__ = ["DomainAugmenter", "intensity_transform", "bias_field", "random_polynomial", "random_one_hot_code",
           "random_uniform_code", "DOMAIN_AUGMENTATION_DEFAULTS", "AUGMENTATION_KINDS", "IntensityParameters"]
