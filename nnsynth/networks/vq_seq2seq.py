"""VQ-Seq2Seq network (paper ``vq_seq2seq_common_latent_space.md``): the Seq2Seq encoder and HyperDecoder with a
vector quantiser between them, and the VQC common latent space (eq. 4-5).

``encode(x)`` keeps Seq2SeqNet's contract (decoder-ready features, so TSF-Seq2Seq and multi-source fusion work
unchanged): ``post(z_q(pre(E(x))))``. The pieces are exposed for the trainer: ``encode_continuous`` (E),
``quantize`` (1x1 conv + eq. 1-2), ``decode_latent`` (1x1 conv back + G).

VQC latent (eq. 4-5), over the available sequences of one case:
``mu = mean_i z_q(X_i)``, ``sigma^2 = sum_i (z_q(X_i) - mu)^2 / (n - 1)`` (unbiased), ``z_s = mu + eps * s``.
The paper text writes ``s = sigma^2`` and the authors' code used a sum of squares; following
``reference/methods.md`` the default is the standard deviation ``s = sigma`` (the reparameterisation of a
Gaussian with variance sigma^2). ``variance="variance"`` and ``variance="sum_squares"`` give the other two.

Latent grid (plans ``vq.downsampling_levels``, written by the planner): the quantiser sits after that many
stride-2 levels of the encoder (the paper: 2, a 4x coarser grid for 1 mm BraTS slices, about 35-40 cells across
the brain). One code of K per cell is all the decoder gets (no skips), so a grid too coarse for the images loses
the anatomy: the planner keeps at least ``VQ_MIN_LATENT_CELLS`` cells across the median image.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from nnsynth.exceptions import PlansError
from nnsynth.networks.quantization import VQOutput, VectorQuantizer
from nnsynth.networks.seq2seq import Seq2SeqNet

logger = logging.getLogger(__name__)

# --- module constants ----------------------------------------------------------------------------------------
VQC_VARIANCE_CHOICES = ("std", "variance", "sum_squares")
VQC_DEFAULT_VARIANCE = "std"
# ---------------------------------------------------------------------------------------------------------------


def vqc_statistics(z: Tensor, available: Tensor, variance: str = VQC_DEFAULT_VARIANCE) -> Tuple[Tensor, Tensor]:
    """Eq. 4: mean and spread of z (B, N, D, *S) over the available sequences (B, N bool) of each case.

    Returns ``(mu, s)`` of shape (B, D, *S) where ``s`` is the unbiased standard deviation (``"std"``), the
    unbiased variance (``"variance"``, the paper's text) or the sum of squared deviations (``"sum_squares"``,
    the authors' code). Entries of missing sequences are ignored whatever they hold. Every case needs >= 2
    available sequences (the unbiased estimate divides by n - 1)."""
    if variance not in VQC_VARIANCE_CHOICES:
        raise PlansError(f"vq.vqc_variance must be one of {VQC_VARIANCE_CHOICES}, got {variance!r}")
    if z.dim() < 3 or available.shape != z.shape[:2]:
        raise ValueError(f"z must be (B, N, D, ...) and available (B, N); got {tuple(z.shape)} and "
                         f"{tuple(available.shape)}")
    mask = available.to(z.dtype).reshape(*available.shape, *([1] * (z.dim() - 2)))
    n = available.sum(1)
    if bool((n < 2).any()):
        raise ValueError("the VQC latent space needs at least 2 available sequences per case; got "
                         f"{n.tolist()}")
    n = n.to(z.dtype).reshape(-1, *([1] * (z.dim() - 2)))
    zm = torch.where(mask > 0, z, torch.zeros_like(z))
    mu = zm.sum(1) / n
    sq = (torch.where(mask > 0, z - mu[:, None], torch.zeros_like(z)) ** 2).sum(1)
    if variance == "sum_squares":
        return mu, sq
    var = sq / (n - 1)
    if variance == "variance":
        return mu, var
    positive = var > 0        # sqrt has an infinite derivative at 0: keep those entries exactly 0, gradient 0
    std = torch.where(positive, torch.sqrt(torch.where(positive, var, torch.ones_like(var))), torch.zeros_like(var))
    return mu, std


def sample_vqc(mu: Tensor, spread: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Eq. 5 with the reparameterisation trick: ``z_s = mu + eps * spread``, eps ~ N(0, 1)."""
    eps = torch.randn(mu.shape, generator=generator, device="cpu" if generator is not None else mu.device,
                      dtype=mu.dtype).to(mu.device)
    return mu + eps * spread


def vq_network(network: Mapping[str, Any], levels: Optional[int]) -> Dict[str, Any]:
    """The network settings with only the first ``levels`` stride-2 levels (``vq.downsampling_levels``): the
    quantised latent grid is 2**levels times coarser than the image. None keeps every level of the plans."""
    network = dict(network)
    if levels is None:
        return network
    chans, kernels = list(network["encoder_channels"]), list(network["encoder_kernel_sizes"])
    if isinstance(levels, bool) or not isinstance(levels, int) or not 0 <= levels <= len(chans) - 1:
        raise PlansError(f"vq.downsampling_levels must be an int from 0 to {len(chans) - 1} (the network has "
                         f"{len(chans) - 1} stride-2 levels), got {levels!r}")
    network["encoder_channels"], network["encoder_kernel_sizes"] = chans[:levels + 1], kernels[:levels + 1]
    return network


class VQSeq2SeqNet(Seq2SeqNet):
    """Seq2SeqNet + ``VectorQuantizer`` after the encoder; see the module docstring."""

    def __init__(self, num_sequences: int, in_channels: int, spatial_dims: int, network: Mapping[str, Any],
                 vq: Optional[Mapping[str, Any]] = None) -> None:
        # the quantised common latent space must be the only way from a source to the decoder: skip connections
        # and the pointwise intensity path would bypass the codebook and eq. 7's consistency, so the plans'
        # settings for them do not apply here
        # (nor is its encoder told which sequence it reads, nor does it read several at once: z_q must be a
        # property of the anatomy, one per sequence, for the common latent space of eq. 4-5; and its grid is the
        # paper's, vq.downsampling_levels below the image, so input_unshuffle does not apply either)
        vq = dict(vq or {})
        super().__init__(num_sequences, in_channels, spatial_dims,
                         {**vq_network(network, vq.get("downsampling_levels")), "skip_connections": False,
                          "source_conditioning": False, "joint_input": False, "pointwise_width": 0,
                          "global_context_heads": 0, "input_unshuffle": 1})
        self.vqc_variance = str(vq.get("vqc_variance", VQC_DEFAULT_VARIANCE))
        if self.vqc_variance not in VQC_VARIANCE_CHOICES:
            raise PlansError(f"vq.vqc_variance must be one of {VQC_VARIANCE_CHOICES}, got {self.vqc_variance!r}")
        self.quantizer = VectorQuantizer.from_config(self.latent_channels, self.spatial_dims, vq)
        self.latent_dim = self.quantizer.latent_dim

    # ----- pieces ---------------------------------------------------------------------------------------------
    def encode_continuous(self, x: Tensor) -> Tensor:
        """E(x) before quantisation (B, C, *S/4)."""
        return super().encode(x)

    def quantize(self, x: Tensor) -> VQOutput:
        """Image (B, k, *S) in [0, 1] -> VQOutput (z_e, straight-through z_q, indices, eq. 2 loss, statistics)."""
        return self.quantizer.quantize(self.quantizer.to_latent(self.encode_continuous(x)))

    def decode_latent(self, z: Tensor, code: Tensor, output_size: Optional[Sequence[int]] = None) -> Tensor:
        """G(post(z) | code) in [0, 1] for a latent map z (B, D, *S/4) (z_q or a VQC sample z_s)."""
        return self.decode(self.quantizer.to_features(z), code, output_size=output_size)

    def encode(self, x: Tensor, source: Optional[Tensor] = None) -> Tensor:
        """Decoder-ready features ``post(z_q)`` (same contract as Seq2SeqNet.encode; ``source`` is not used)."""
        return self.quantizer.to_features(self.quantize(x).z_q)

    def forward(self, x: Tensor, target: Tensor, groups: None = None, source: Optional[Tensor] = None) -> Tensor:
        if groups is not None:
            raise ValueError("VQ-Seq2Seq fuses sources through its common latent space, not through groups")
        code = self._as_code(target)
        return self.decode_latent(self.quantize(x).z_q, code, output_size=x.shape[2:])

    # ----- VQC ------------------------------------------------------------------------------------------------
    def vqc(self, z: Tensor, available: Tensor) -> Tuple[Tensor, Tensor]:
        """(mu, spread) of eq. 4 over z (B, N, D, *S) with this network's variance choice."""
        return vqc_statistics(z, available, self.vqc_variance)

    @torch.no_grad()
    def common_latent(self, images: Sequence[Tensor]) -> Tensor:
        """Mean z_q over several sequences of the same case (the VQC centre, used for multi-source synthesis)."""
        return torch.stack([self.quantize(x).z_q for x in images]).mean(0)


__all__ = ["VQSeq2SeqNet", "vq_network", "vqc_statistics", "sample_vqc", "VQC_VARIANCE_CHOICES"]
