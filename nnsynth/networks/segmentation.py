"""Segmentation networks for one-shot tumour segmentation (VQ-Seq2Seq sec. 3.2, Table 3, Fig. 5).

Both networks take the same batch, ``images`` (B, N, k, *S) (all N sequences in plans order, missing ones all 0;
2.5D: k adjacent slices, 3D: k = 1) and ``available`` (B, N) bool, and return class logits (B, C, *T) where
``T = (k, y, x)`` in 2.5D (one label map per slice of the stack) and ``T = (z, y, x)`` in 3D.

- ``LatentSegmentationNet``: the frozen encoder (+ quantiser) of a trained VQ-Seq2Seq (or Seq2Seq) maps every
  available sequence to its latent map (z_q, or E(x) for Seq2Seq); the maps are fused by their mean over the
  available sequences (the VQC centre, eq. 4), a ``PlainConvUNet`` from dynamic-network-architectures segments
  the fused map at the latent resolution, and its logits are upsampled (bi/trilinear) to image resolution.
- ``ImageSegmentationNet``: the same ``PlainConvUNet`` family directly on the stacked images (the baseline).

The U-Net topology follows nnU-Net's rule: pool an axis while it is at least ``2 * min_feature_edge`` long, up
to ``max_stages`` stages, features doubling per stage from ``base_features`` up to ``max_features``. Inputs are
padded to a multiple of the total stride and the output is cropped back.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnsynth.exceptions import PlansError

logger = logging.getLogger(__name__)

# --- module constants (the plans' configuration may override them under "segmentation") ----------------------
SEGMENTATION_NETWORK_DEFAULTS: Dict[str, Any] = {
    "base_features": 32,      # features of the first stage (nnU-Net: 32)
    "max_features": 320,      # cap (nnU-Net: 320 in 3D, 512 in 2D)
    "max_stages": 6,          # stages including the bottleneck
    "min_feature_edge": 4,    # do not pool an axis below this length (nnU-Net: 4)
    "n_conv_per_stage": 2,
    "upsample_mode": "linear",  # how latent-space logits reach image resolution: 'linear' or 'nearest'
}
LATENT_KINDS = ("vq_seq2seq", "seq2seq")
MIN_UNET_STAGES = 2           # PlainConvUNet needs an encoder stage and a decoder stage
# ---------------------------------------------------------------------------------------------------------------


def segmentation_settings(config: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """``SEGMENTATION_NETWORK_DEFAULTS`` updated with a plans configuration's ``segmentation`` entry."""
    extra = dict((config or {}).get("segmentation", {}) or {})
    unknown = sorted(set(extra) - set(SEGMENTATION_NETWORK_DEFAULTS))
    if unknown:
        raise PlansError(f"Unknown keys {unknown} in the plans' 'segmentation' entry; known: "
                         f"{sorted(SEGMENTATION_NETWORK_DEFAULTS)}")
    out = {**SEGMENTATION_NETWORK_DEFAULTS, **extra}
    if out["upsample_mode"] not in ("linear", "nearest"):
        raise PlansError(f"segmentation.upsample_mode must be 'linear' or 'nearest', got {out['upsample_mode']!r}")
    return out


def plan_unet(input_size: Sequence[int], settings: Mapping[str, Any]) -> Dict[str, Any]:
    """Stages, per-stage strides and features of a PlainConvUNet for inputs of ``input_size`` (nnU-Net rule)."""
    size = [int(s) for s in input_size]
    edge = int(settings["min_feature_edge"])
    strides: List[List[int]] = [[1] * len(size)]
    while len(strides) < int(settings["max_stages"]):
        step = [2 if s >= 2 * edge else 1 for s in size]
        if not any(v == 2 for v in step) and len(strides) < MIN_UNET_STAGES:
            step = [2 if s >= 2 else 1 for s in size]      # tiny inputs (e.g. latent maps): pool once anyway
        if not any(v == 2 for v in step):
            break
        strides.append(step)
        size = [s // v for s, v in zip(size, step)]
    if len(strides) < MIN_UNET_STAGES:
        raise PlansError(f"input size {list(input_size)} is too small for a segmentation U-Net (needs >= 2 voxels "
                         f"along an axis); enlarge the patch size in the plans")
    features = [min(int(settings["base_features"]) * 2 ** i, int(settings["max_features"]))
                for i in range(len(strides))]
    divisor = [int(math.prod(s[a] for s in strides)) for a in range(len(input_size))]
    return {"n_stages": len(strides), "strides": strides, "features": features, "divisor": divisor}


class PaddedUNet(nn.Module):
    """A ``PlainConvUNet`` (dynamic-network-architectures) that pads its input to a multiple of its total
    stride (with 0) and crops its output back to the input size."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int, input_size: Sequence[int],
                 settings: Mapping[str, Any]) -> None:
        super().__init__()
        from dynamic_network_architectures.architectures.unet import PlainConvUNet
        if spatial_dims not in (2, 3) or len(input_size) != spatial_dims:
            raise PlansError(f"segmentation U-Net: spatial_dims {spatial_dims} does not match the input size "
                             f"{list(input_size)}")
        self.topology = plan_unet(input_size, settings)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
        n = self.topology["n_stages"]
        self.unet = PlainConvUNet(
            in_channels, n, self.topology["features"], conv, 3, self.topology["strides"],
            int(settings["n_conv_per_stage"]), out_channels, int(settings["n_conv_per_stage"]), conv_bias=True,
            norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
            nonlin_kwargs={"inplace": True}, deep_supervision=False)
        self.divisor = self.topology["divisor"]

    def forward(self, x: Tensor) -> Tensor:
        size = tuple(x.shape[2:])
        padded = tuple(int(math.ceil(s / d) * d) for s, d in zip(size, self.divisor))
        if padded != size:
            pads: List[int] = []
            for s, p in zip(reversed(size), reversed(padded)):
                pads += [0, p - s]
            x = F.pad(x, pads)
        out = self.unet(x)
        return out[(slice(None), slice(None)) + tuple(slice(0, s) for s in size)]


def _split_slices(logits: Tensor, num_classes: int, k: int) -> Tensor:
    """(B, C*k, y, x) -> (B, C, k, y, x) in 2.5D; 3D logits (B, C, z, y, x) pass through."""
    if logits.dim() == 4:
        return logits.reshape(logits.shape[0], num_classes, k, *logits.shape[2:])
    return logits


class LatentEncoder(nn.Module):
    """Frozen encoder (+ quantiser) of a trained synthesis network; always in eval mode, never trained.

    ``forward(images (B, N, k, *S), available (B, N))`` -> the mean over the available sequences of their
    latent maps (B, D, *s): z_q for VQ-Seq2Seq (the VQC centre), E(x) for Seq2Seq; a Seq2Seq with
    ``joint_input`` encodes the available sequences together, as its own prediction does."""

    def __init__(self, backbone: nn.Module, kind: str) -> None:
        super().__init__()
        if kind not in LATENT_KINDS:
            raise PlansError(f"the latent space comes from one of {LATENT_KINDS}, not {kind!r}")
        self.backbone, self.kind = backbone, kind
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()
        self.latent_channels = int(backbone.latent_dim if kind == "vq_seq2seq" else backbone.latent_channels)
        self.divisor = int(backbone.divisor)

    def train(self, mode: bool = True) -> "LatentEncoder":
        """Stays in eval mode: a VQ quantiser in training mode would change its codebook."""
        return super().train(False)

    @torch.no_grad()
    def encode_one(self, x: Tensor, sequence: Tensor) -> Tensor:
        """(M, k, *S) images of single sequences (indices ``sequence`` (M,)) -> (M, D, *s) latent maps."""
        if self.kind == "vq_seq2seq":
            return self.backbone.quantize(x).z_q
        return self.backbone.encode(x, sequence)

    @torch.no_grad()
    def forward(self, images: Tensor, available: Tensor) -> Tensor:
        available = available.bool()
        if bool((available.sum(1) == 0).any()):
            raise ValueError("every sample needs at least one available sequence")
        if getattr(self.backbone, "joint_input", False):
            return self.backbone.encode_joint(images.float(), available.float())
        b_idx, s_idx = available.nonzero(as_tuple=True)
        z = self.encode_one(images[b_idx, s_idx].float(), s_idx)
        fused = z.new_zeros((images.shape[0],) + tuple(z.shape[1:]))
        fused.index_add_(0, b_idx, z)
        counts = available.sum(1).to(z.dtype).reshape(-1, *([1] * (z.dim() - 1)))
        return fused / counts


class LatentSegmentationNet(nn.Module):
    """Frozen latent encoder -> PlainConvUNet at the latent resolution -> logits upsampled to the images."""

    def __init__(self, encoder: LatentEncoder, num_classes: int, spatial_dims: int, num_adjacent_slices: int,
                 patch_size: Sequence[int], settings: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__()
        settings = {**SEGMENTATION_NETWORK_DEFAULTS, **dict(settings or {})}
        self.encoder = encoder
        self.num_classes, self.spatial_dims = int(num_classes), int(spatial_dims)
        self.k = int(num_adjacent_slices) if spatial_dims == 2 else 1
        latent_size = [int(math.ceil(int(p) / encoder.divisor)) for p in patch_size]
        self.upsample_mode = str(settings["upsample_mode"])
        self.unet = PaddedUNet(encoder.latent_channels, self.num_classes * self.k, spatial_dims, latent_size,
                               settings)

    def forward(self, images: Tensor, available: Tensor) -> Tensor:
        size = tuple(images.shape[3:]) if self.spatial_dims == 2 else tuple(images.shape[-3:])
        latent = self.encoder(images, available)
        logits = self.unet(latent)
        full = tuple(s * self.encoder.divisor for s in logits.shape[2:])
        if self.upsample_mode == "nearest":
            logits = F.interpolate(logits, size=full, mode="nearest")
        else:
            mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
            logits = F.interpolate(logits, size=full, mode=mode, align_corners=False)
        logits = logits[(slice(None), slice(None)) + tuple(slice(0, s) for s in size)]
        return _split_slices(logits, self.num_classes, self.k)


class ImageSegmentationNet(nn.Module):
    """The image-space baseline: PlainConvUNet on all sequences stacked as channels (missing ones 0)."""

    def __init__(self, num_sequences: int, num_classes: int, spatial_dims: int, num_adjacent_slices: int,
                 patch_size: Sequence[int], settings: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__()
        settings = {**SEGMENTATION_NETWORK_DEFAULTS, **dict(settings or {})}
        self.num_classes, self.spatial_dims = int(num_classes), int(spatial_dims)
        self.k = int(num_adjacent_slices) if spatial_dims == 2 else 1
        self.unet = PaddedUNet(int(num_sequences) * self.k, self.num_classes * self.k, spatial_dims,
                               [int(p) for p in patch_size], settings)

    def forward(self, images: Tensor, available: Tensor) -> Tensor:
        x = images.float() * available.to(images.dtype).reshape(*available.shape, *([1] * (images.dim() - 2)))
        x = x.reshape(x.shape[0], -1, *x.shape[3:])     # (B, N*k, y, x) or (B, N, z, y, x)
        return _split_slices(self.unet(x), self.num_classes, self.k)


def build_backbone(kind: str, num_sequences: int, in_channels: int, spatial_dims: int,
                   network: Mapping[str, Any], vq: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """An untrained synthesis network of ``kind`` whose encoder provides the latent space."""
    if kind == "vq_seq2seq":
        from nnsynth.networks.vq_seq2seq import VQSeq2SeqNet
        return VQSeq2SeqNet(num_sequences, in_channels, spatial_dims, network, vq or {})
    if kind == "seq2seq":
        from nnsynth.networks.seq2seq import Seq2SeqNet
        return Seq2SeqNet(num_sequences, in_channels, spatial_dims, network)
    raise PlansError(f"the latent space comes from one of {LATENT_KINDS}, not {kind!r}")


__all__ = ["LatentEncoder", "LatentSegmentationNet", "ImageSegmentationNet", "PaddedUNet", "plan_unet",
           "segmentation_settings", "build_backbone", "SEGMENTATION_NETWORK_DEFAULTS", "LATENT_KINDS"]
