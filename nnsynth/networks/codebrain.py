"""CodeBrain network (Wu et al., ``papers/codebrain_scalar_quantized_codes.md``): modality- and instance-specific
scalar-quantised codes plus modality-agnostic common features, all sequences decoded at once.

Layout of the image stack ``x``: 2D (2.5D) ``(B, N * k, Y, X)``, sequence-major (the k adjacent slices of
sequence 0, then sequence 1, ...); 3D ``(B, N, Z, Y, X)`` (k = 1). ``keep`` ``(B, N)`` is 1 for the sequences
the network may see; every other channel is zeroed before it reaches ``E_s`` or ``E_prior``, and both
also get ``keep`` as N constant indicator channels (a zero-filled sequence is otherwise indistinguishable
from background).

- ``E_posterior`` (shared by all sequences, so modality-agnostic): one sequence's k slices -> d channels at
  1/8 resolution -> FSQ code (stage I; needs the sequence itself).
- ``E_s``: masked stack -> common features F_c at 1/8.
- ``D_a``: ``concat[codes of all N sequences, F_c]`` -> all N sequences (N * k channels), pixel-shuffle upsampling.
- ``E_prior``: masked stack -> ordinal logits of the codes of all N sequences, ``(L_max - 1)`` per code
  channel (stage II, grading loss).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnsynth.exceptions import PlansError
from nnsynth.networks.fsq import FSQ
from nnsynth.networks.nafnet import NAFDecoder, NAFEncoder

# --- constants of this module: fallbacks when the plans' "fsq" entry lacks a key (paper / BraTS values) -----
CODEBRAIN_NETWORK_DEFAULTS: Dict[str, Any] = {
    "levels": [5] * 7,             # L = 5, d = 7 for 4 sequences (BraTS); IXI: d = 9
    "downsample_factor": 8,        # codes and common features at 1/8 resolution
    "nafnet_width": 32,            # channels after the intro conv; doubled per level
    "nafnet_enc_blocks": [2, 2, 2],
    "nafnet_middle_blocks": 2,
    "nafnet_dec_blocks": [2, 2, 2],
    "common_channels": None,       # channels of F_c; None: the encoder's bottleneck width (width * 8)
}


def network_settings(fsq_cfg: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The plans' ``fsq`` entry completed with ``CODEBRAIN_NETWORK_DEFAULTS`` and checked."""
    cfg = {**CODEBRAIN_NETWORK_DEFAULTS, **{k: v for k, v in (fsq_cfg or {}).items() if v is not None}}
    factor = int(cfg["downsample_factor"])
    n_levels = int(round(math.log2(factor))) if factor > 0 else -1
    if factor < 1 or 2 ** n_levels != factor:
        raise PlansError(f"fsq.downsample_factor must be a power of 2, got {factor}")
    for key in ("nafnet_enc_blocks", "nafnet_dec_blocks"):
        blocks = cfg[key]
        if isinstance(blocks, int):
            blocks = [blocks] * n_levels
        if len(blocks) != n_levels:
            raise PlansError(f"fsq.{key} has {len(blocks)} entries but downsample_factor {factor} needs {n_levels} "
                             f"(one per 2x level)")
        cfg[key] = [int(b) for b in blocks]
    cfg["levels"] = [int(v) for v in cfg["levels"]]
    if "code_dim" in cfg and int(cfg["code_dim"]) != len(cfg["levels"]):
        raise PlansError(f"fsq.code_dim ({cfg['code_dim']}) differs from the number of fsq.levels "
                         f"({len(cfg['levels'])}); edit the plans so they agree")
    return cfg


class CodeBrainNet(nn.Module):
    """All four CodeBrain modules; the trainer decides which are trained in which stage."""

    def __init__(self, num_sequences: int, num_slices: int, spatial_dims: int,
                 fsq_cfg: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__()
        cfg = network_settings(fsq_cfg)
        self.cfg = cfg
        self.n, self.k, self.spatial_dims = int(num_sequences), int(num_slices), int(spatial_dims)
        if self.n < 2:
            raise PlansError("CodeBrain needs a dataset with at least 2 sequences")
        if self.spatial_dims == 3 and self.k != 1:
            raise PlansError("The 3d CodeBrain network takes one slice block per sequence (num_slices 1)")
        self.fsq = FSQ(cfg["levels"])
        self.d = self.fsq.dim
        self.max_level = max(cfg["levels"])
        self.factor = int(cfg["downsample_factor"])
        width, mid = int(cfg["nafnet_width"]), int(cfg["nafnet_middle_blocks"])
        enc, dec = cfg["nafnet_enc_blocks"], cfg["nafnet_dec_blocks"]
        bottleneck = width * self.factor
        self.common_channels = int(cfg["common_channels"] or bottleneck)
        masked_in = self.n * self.k + self.n
        self.posterior = NAFEncoder(spatial_dims, self.k, self.d, width, enc, mid)
        self.common = NAFEncoder(spatial_dims, masked_in, self.common_channels, width, enc, mid)
        self.decoder = NAFDecoder(spatial_dims, self.n * self.d + self.common_channels, self.n * self.k, width, dec,
                                  mid)
        self.prior = NAFEncoder(spatial_dims, masked_in, self.n * self.d * (self.max_level - 1), width, enc, mid)
        # bits j >= L_c - 1 of a code channel with fewer levels than L_max carry no information
        valid = torch.tensor([[j < lv - 1 for j in range(self.max_level - 1)] for lv in cfg["levels"]])
        self.register_buffer("bit_valid", valid, persistent=False)

    # --- helpers ---------------------------------------------------------------------------------------------
    def stage_one_modules(self) -> Tuple[nn.Module, ...]:
        return self.posterior, self.common, self.decoder

    def split(self, x: Tensor) -> Tensor:
        """``(B, N * k, *s)`` -> ``(B, N, k, *s)`` (3D: ``(B, N, 1, Z, Y, X)``)."""
        if x.shape[1] != self.n * self.k:
            raise ValueError(f"expected {self.n * self.k} channels (N={self.n} x k={self.k}), got {x.shape[1]}")
        return x.view(x.shape[0], self.n, self.k, *x.shape[2:])

    def masked_input(self, x: Tensor, keep: Tensor) -> Tensor:
        """Zero every sequence with ``keep == 0`` and append the N indicator channels."""
        keep = keep.to(x.dtype)
        stack = (self.split(x) * keep.view(*keep.shape, *([1] * (x.ndim - 1)))).flatten(1, 2)
        ind = keep.view(*keep.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
        return torch.cat([stack, ind], 1)

    def pad(self, x: Tensor) -> Tuple[Tensor, Tuple[int, ...]]:
        """Zero-pad the spatial axes to multiples of the downsample factor; returns the original size."""
        size = tuple(x.shape[2:])
        pads = []
        for s in reversed(size):
            pads += [0, (-s) % self.factor]
        if any(pads):
            x = F.pad(x, pads)
        return x, size

    @staticmethod
    def crop(x: Tensor, size: Sequence[int]) -> Tensor:
        return x[(slice(None), slice(None)) + tuple(slice(0, int(s)) for s in size)]

    # --- the four modules -----------------------------------------------------------------------------------
    def encode_codes(self, x: Tensor) -> Tensor:
        """Posterior FSQ codes of every sequence: ``(B, N, d, *s/8)``, normalised to [-1, 1]."""
        per_seq = self.split(x).flatten(0, 1)                      # (B N, k, *s)
        codes = self.fsq(self.posterior(per_seq))
        return codes.view(x.shape[0], self.n, self.d, *codes.shape[2:])

    def common_features(self, x: Tensor, keep: Tensor) -> Tensor:
        return self.common(self.masked_input(x, keep))

    def decode(self, codes: Tensor, features: Tensor) -> Tensor:
        """``(B, N, d, *h)`` codes + ``(B, C_fc, *h)`` features -> ``(B, N * k, *s)``."""
        return self.decoder(torch.cat([codes.flatten(1, 2).to(features.dtype), features], 1))

    def prior_logits(self, x: Tensor, keep: Tensor) -> Tensor:
        """Ordinal logits ``(B, N, d, L_max - 1, *s/8)`` of the codes of all sequences."""
        out = self.prior(self.masked_input(x, keep))
        return out.view(x.shape[0], self.n, self.d, self.max_level - 1, *out.shape[2:])

    def logits_to_codes(self, logits: Tensor) -> Tensor:
        """Decode ordinal logits: level = number of valid bits with sigmoid > 0.5; -> normalised codes."""
        valid = self.bit_valid.view(1, 1, self.d, self.max_level - 1, *([1] * (logits.ndim - 4)))
        digits = ((logits > 0) & valid).sum(3)                      # (B, N, d, *h)
        return self.fsq.levels_to_codes(digits.flatten(0, 1)).view(digits.shape)

    # --- full passes ----------------------------------------------------------------------------------------
    def forward(self, x: Tensor, keep: Tensor, mode: str = "reconstruct") -> Any:
        """``mode='reconstruct'`` (stage I): all sequences from their posterior codes + common features of the
        kept ones; returns ``(reconstruction (B, N*k, *s), codes (B, N, d, *h))``.
        ``mode='prior'`` (stage II): the prior's ordinal logits (``x`` already padded). One entry point so a
        DDP wrapper sees every trained forward pass."""
        if mode == "prior":
            return self.prior_logits(x, keep)
        if mode != "reconstruct":
            raise ValueError(f"unknown CodeBrainNet mode {mode!r}")
        xp, size = self.pad(x)
        codes = self.encode_codes(xp)
        out = self.decode(codes, self.common_features(xp, keep))
        return self.crop(out, size), codes

    def impute(self, x: Tensor, keep: Tensor, posterior_for_kept: bool = True) -> Tensor:
        """Stage II / inference: predicted codes (+ posterior codes of the kept sequences when
        ``posterior_for_kept``) and common features -> all N sequences in one pass. Only kept channels of
        ``x`` are read."""
        xp, size = self.pad(x)
        codes = self.logits_to_codes(self.prior_logits(xp, keep))
        if posterior_for_kept and bool(keep.any()):
            masked = (self.split(xp) * keep.to(xp.dtype).view(*keep.shape, *([1] * (xp.ndim - 1)))).flatten(1, 2)
            post = self.encode_codes(masked)
            sel = keep.bool().view(*keep.shape, *([1] * (codes.ndim - 2)))
            codes = torch.where(sel, post, codes)
        out = self.decode(codes, self.common_features(xp, keep))
        return self.crop(out, size)
