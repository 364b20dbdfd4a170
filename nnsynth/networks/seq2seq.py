"""Seq2Seq generator (paper sec. 3.2-3.3): a shared encoder E and a code-conditioned HyperDecoder G.

Images enter and leave in [0, 1] (the preprocessed, normalised space); inside, the network works on [-1, 1]
with a Tanh at the end as the paper does. 2.5D: ``in_channels`` = k adjacent slices of one sequence, the output
is the same k slices of the target sequence. 3D: ``spatial_dims=3`` and ``in_channels=1``.

``encode`` and ``decode`` are separate so that VQ-Seq2Seq can quantise between them and TSF-Seq2Seq can fuse
several encodings before decoding.

Skip connections (plans ``network.skip_connections``; off in the paper, on in nnsynth's default plans): the
encoder's higher-resolution feature maps reach the decoder level of the same resolution, where they are
concatenated with the upsampled features and mixed by one more HyperConv. Without them every detail has to
pass the 4x down-sampled bottleneck, which a short training run does not learn (blurry outputs, see
documentation/benchmarks.md). So that fusion code keeps working on one tensor, the skip maps travel inside the
encoding: each is folded to the bottleneck resolution (``space_to_depth``, a reshape) and stacked after the
bottleneck channels. Averaging or weighting encodings therefore averages or weights every skip map the same way.

Joint input (plans ``network.joint_input``; not in the paper, on in nnsynth's default plans): the encoder reads
all of a case's given sequences at once, one channel group per sequence of the dataset, each multiplied by its
availability, plus one availability plane per sequence. A single source is the stack with one group filled, so
``encode(x, source)`` still gives a per-source encoding (TSF weights those); several sources are encoded
together, and the encoder sees which intensities co-occur at a voxel. The paper's separate encodings meet only
as a mean in latent space, where that joint information is gone: on the demo data a 3-source latent mean was
no better than the best single source, while a voxelwise lookup over the three sources beats any one of them by
7 dB (documentation/benchmarks.md).

Pointwise intensity path (plans ``network.pointwise_width``; not in the paper, on in nnsynth's default plans):
every convolution of E and G is followed by instance normalisation, which removes each feature map's mean and
scale over the patch, so the absolute intensity of a voxel in the normalised space (CSF near 0, white matter
near its anchor, a lesion's real contrast) can only be guessed back from context. A voxelwise map of the source
intensities keeps it (the intensity-lookup baseline is one). The path is that map, learned: two 1x1
convolutions with LeakyReLU and no normalisation on the encoder's input (target-agnostic, so it travels in the
encoding like a skip map), then in the decoder a 1x1 HyperConv + LeakyReLU and a 1x1 HyperConv head on the
target's code, whose output is added to G's final convolution before the Tanh, so nothing normalises it on the
way to the output. (Concatenating it to the final 7x7 convolution's input instead made a CPU step 45 % slower.)

Global subject context (plans ``network.global_context_heads``; not in the paper, on in nnsynth's default plans,
needs the pointwise path): ``GlobalContext`` pools the pointwise features over the patch with learned attention
maps and shifts the target's code by a linear map of them, so every HyperConv can follow the subject's contrast.

Input unshuffle (plans ``network.input_unshuffle`` f; 1 = off): the encoder folds every f^d block of input
voxels into channels before its stem (``space_to_depth``, a permutation: nothing is lost) and the final HyperConv
gives f^d output channels per voxel that ``depth_to_space`` puts back, so every convolution, normalisation and
activation of E and G works on f^d times fewer voxels; only the pointwise intensity path stays at full
resolution. The down-sampling factor, and so the padding, grows by f.

Sizes that are not multiples of the down-sampling factor are padded with background (0) by ``encode`` and
cropped back by ``decode(..., output_size=...)`` / ``forward``.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnsynth.exceptions import PlansError
from nnsynth.networks.blocks import (ConvNormAct, HyperConvNormAct, HyperResBlock, HyperUpBlock, ResBlock,
                                     count_parameters, depth_to_space, space_to_depth)
from nnsynth.networks.hyperconv import HyperConv

logger = logging.getLogger(__name__)

# --- module constants (listed in the hand-over; candidates for nnsynth/constants.py) ---------------
# The paper's network (Seq2Seq public code); the planner writes these into plans["configurations"][c]["network"].
DEFAULT_SEQ2SEQ_NETWORK: Dict[str, Any] = {
    "encoder_channels": [64, 128, 256],
    "encoder_kernel_sizes": [7, 3, 3],
    "num_res_blocks": 6,
    "num_hyper_res_blocks": 6,
    "hyper_bank_size": 16,
    "code_length": 64,
    "norm": "instance",
    "negative_slope": 0.2,
    "padding_mode": "reflect",
    # optional keys (defaults used when absent from the plans):
    "upsample_mode": "nearest",      # 'nearest' or 'linear' (bi/trilinear)
    "hyper_mlp_hidden": 64,          # hidden width of the HyperConv code MLP (0/None: a single Linear)
    "res_kernel_size": 3,            # kernel of the (hyper) residual blocks
    "skip_connections": False,       # encoder -> decoder skips at every resolution (not in the paper)
    "source_conditioning": False,    # the encoder's first conv is a HyperConv on the source's code (not in the paper)
    "joint_input": False,            # the encoder reads every given sequence at once as channels (not in the paper)
    "pointwise_width": 0,            # channels of the un-normalised voxelwise intensity path (0: off; not in the paper)
    "global_context_heads": 0,       # heads of the pooled subject context in the decoder (0: off; not in the paper)
    "input_unshuffle": 1,            # E and G work at 1/f resolution, folded in and out by space_to_depth (1: off)
}
# small init of the last HyperConv so the Tanh starts in its linear range, not saturated
FINAL_LAYER_INIT_GAIN = 0.5
# -----------------------------------------------------------------------------------------------------

_REQUIRED_KEYS = ("encoder_channels", "encoder_kernel_sizes", "num_res_blocks", "num_hyper_res_blocks",
                  "hyper_bank_size", "code_length")


def resolve_network_config(network: Mapping[str, Any]) -> Dict[str, Any]:
    """Validate a plans ``network`` dict and fill optional keys; raises PlansError with what to fix."""
    if not isinstance(network, Mapping):
        raise PlansError(f"The plans' 'network' entry must be a dict, got {type(network).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in network]
    if missing:
        raise PlansError(f"The plans' 'network' entry lacks {missing}; re-run planning or add them "
                         f"(paper values: { {k: DEFAULT_SEQ2SEQ_NETWORK[k] for k in missing} })")
    cfg = dict(DEFAULT_SEQ2SEQ_NETWORK)
    cfg.update(network)
    chans = [int(c) for c in cfg["encoder_channels"]]
    kernels = [int(k) for k in cfg["encoder_kernel_sizes"]]
    problems = []
    if len(chans) < 1 or any(c < 1 for c in chans):
        problems.append(f"encoder_channels must be a non-empty list of positive ints, got {cfg['encoder_channels']}")
    if len(kernels) != len(chans):
        problems.append(f"encoder_kernel_sizes ({kernels}) must have one entry per encoder_channels entry ({chans})")
    if any(k < 1 or k % 2 == 0 for k in kernels):
        problems.append(f"encoder_kernel_sizes must be odd, got {kernels}")
    for key in ("num_res_blocks", "num_hyper_res_blocks", "pointwise_width", "global_context_heads"):
        if int(cfg[key] or 0) < 0:
            problems.append(f"{key} must be >= 0, got {cfg[key]}")
    if int(cfg["hyper_bank_size"]) < 1 or int(cfg["code_length"]) < 1:
        problems.append("hyper_bank_size and code_length must be >= 1")
    for key in ("skip_connections", "source_conditioning", "joint_input"):
        if not isinstance(cfg[key], bool):
            problems.append(f"{key} must be true or false, got {cfg[key]!r}")
    if cfg["joint_input"] is True and cfg["source_conditioning"] is True:
        problems.append("joint_input and source_conditioning exclude each other (a joint encoder already knows "
                        "which sequence each channel holds): switch source_conditioning off")
    if int(cfg["global_context_heads"] or 0) > 0 and int(cfg["pointwise_width"] or 0) <= 0:
        problems.append("global_context_heads pools the pointwise intensity path's features: it needs "
                        "pointwise_width > 0 (or set global_context_heads to 0)")
    if int(cfg["res_kernel_size"]) % 2 == 0:
        problems.append(f"res_kernel_size must be odd, got {cfg['res_kernel_size']}")
    unshuffle = cfg["input_unshuffle"]
    if isinstance(unshuffle, bool) or not isinstance(unshuffle, int) or unshuffle < 1 or unshuffle & (unshuffle - 1):
        problems.append(f"input_unshuffle must be a power of 2 (1: off, 2: the convolutions work at half "
                        f"resolution), got {unshuffle!r}")
    if problems:
        raise PlansError("Invalid network settings in the plans:\n" + "\n".join(f"  - {p}" for p in problems))
    cfg["encoder_channels"] = chans
    cfg["encoder_kernel_sizes"] = kernels
    cfg["pointwise_width"] = int(cfg["pointwise_width"] or 0)
    cfg["global_context_heads"] = int(cfg["global_context_heads"] or 0)
    for key in ("num_res_blocks", "num_hyper_res_blocks", "hyper_bank_size", "code_length", "res_kernel_size"):
        cfg[key] = int(cfg[key])
    cfg["negative_slope"] = float(cfg["negative_slope"])
    cfg["hyper_mlp_hidden"] = int(cfg["hyper_mlp_hidden"] or 0) or None
    return cfg


def downsample_factor(network: Mapping[str, Any]) -> int:
    """Spatial down-sampling of the encoder: 2 ** (number of stride-2 convolutions) x ``input_unshuffle``."""
    return 2 ** (len(network["encoder_channels"]) - 1) * int(network.get("input_unshuffle", 1) or 1)


class Encoder(nn.Module):
    """E: conv k7 (stride 1), then stride-2 convs (4x down for three levels), then residual blocks."""

    def __init__(self, in_channels: int, spatial_dims: int, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        chans, kernels = cfg["encoder_channels"], cfg["encoder_kernel_sizes"]
        common = dict(norm=cfg["norm"], negative_slope=cfg["negative_slope"], padding_mode=cfg["padding_mode"])
        self.source_conditioning = bool(cfg["source_conditioning"])
        #: input_unshuffle: the stem reads every f^d block of input voxels as channels (space_to_depth)
        self.unshuffle = int(cfg["input_unshuffle"])
        stem_in = in_channels * self.unshuffle ** spatial_dims
        stem: nn.Module
        if self.source_conditioning:
            stem = HyperConvNormAct(spatial_dims, stem_in, chans[0], kernels[0], cfg["code_length"],
                                    cfg["hyper_bank_size"], mlp_hidden=cfg["hyper_mlp_hidden"], **common)
        else:
            stem = ConvNormAct(spatial_dims, stem_in, chans[0], kernels[0], 1, **common)
        layers: List[nn.Module] = [stem]
        for i in range(1, len(chans)):
            layers.append(ConvNormAct(spatial_dims, chans[i - 1], chans[i], kernels[i], 2, **common))
        for _ in range(cfg["num_res_blocks"]):
            layers.append(ResBlock(spatial_dims, chans[-1], cfg["res_kernel_size"], **common))
        self.layers = nn.Sequential(*layers)
        self.out_channels = chans[-1]
        self.num_levels = len(chans)
        width = cfg["pointwise_width"]
        #: the voxelwise intensity path (module docstring): 1x1 convolutions without normalisation
        self.pointwise: Optional[nn.Module] = nn.Sequential(
            ConvNormAct(spatial_dims, in_channels, width, 1, 1, norm="none", negative_slope=cfg["negative_slope"]),
            ConvNormAct(spatial_dims, width, width, 1, 1, norm="none", negative_slope=cfg["negative_slope"]),
        ) if width else None

    def forward(self, x: Tensor, code: Optional[Tensor] = None) -> Tensor:
        return self.forward_with_skips(x, code)[0]

    def forward_with_skips(self, x: Tensor, code: Optional[Tensor] = None) -> Tuple[Tensor, List[Tensor]]:
        """Bottleneck features and the output of every level above it (full resolution first). ``code`` is the
        source sequence's code, needed (only) with ``source_conditioning``."""
        skips: List[Tensor] = []
        x = space_to_depth(x, self.unshuffle)
        for i, layer in enumerate(self.layers):
            x = layer(x, code) if (i == 0 and self.source_conditioning) else layer(x)
            if i < self.num_levels - 1:
                skips.append(x)
        return x, skips

    def encode(self, x: Tensor, code: Optional[Tensor] = None) -> Tuple[Tensor, List[Tensor], Optional[Tensor]]:
        """``forward_with_skips`` plus the pointwise path's features of the same input (None when it is off)."""
        bottleneck, skips = self.forward_with_skips(x, code)
        return bottleneck, skips, (self.pointwise(x) if self.pointwise is not None else None)


class GlobalContext(nn.Module):
    """What the whole input says about the subject, as a shift of the decoder's code (not in the paper).

    Instance normalisation hides each feature map's level over the patch, and the pointwise path sees one voxel,
    so nothing in the network compares, say, this subject's white matter on T1 with its grey matter on T2, which
    is what fixes the target's contrast when tissue properties vary between subjects. Here ``heads`` learned 1x1
    scores weight the un-normalised pointwise features in a softmax over the patch (each head can pick a tissue
    and read its levels); the pooled vectors go through a linear map into the code space and are added to the
    target's code, so every HyperConv's kernel adapts to them. The map starts at zero: a new network behaves
    exactly as one without the context until training finds it useful."""

    def __init__(self, spatial_dims: int, channels: int, heads: int, code_length: int) -> None:
        super().__init__()
        self.score = (nn.Conv2d, nn.Conv3d)[spatial_dims - 2](channels, int(heads), 1)
        self.project = nn.Linear(int(heads) * channels, code_length)
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)

    def forward(self, pointwise: Tensor) -> Tensor:
        """pointwise features (B, C, *S) -> code shift (B, code_length)."""
        weights = torch.softmax(self.score(pointwise).flatten(2).float(), dim=-1).to(pointwise.dtype)  # (B, H, V)
        pooled = torch.bmm(weights, pointwise.flatten(2).transpose(1, 2))                             # (B, H, C)
        return self.project(pooled.flatten(1))


class HyperDecoder(nn.Module):
    """G: hyper-residual blocks, then per level (upsample 2x + HyperConv), then a final HyperConv k7 (plus the
    pointwise path's 1x1 head when it is on) and Tanh.

    Output is in [-1, 1]."""

    def __init__(self, out_channels: int, spatial_dims: int, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        chans, kernels = cfg["encoder_channels"], cfg["encoder_kernel_sizes"]
        hyper = dict(code_length=cfg["code_length"], bank_size=cfg["hyper_bank_size"],
                     mlp_hidden=cfg["hyper_mlp_hidden"])
        common = dict(norm=cfg["norm"], negative_slope=cfg["negative_slope"], padding_mode=cfg["padding_mode"])
        self.code_length = cfg["code_length"]
        self.res_blocks = nn.ModuleList(
            HyperResBlock(spatial_dims, chans[-1], kernel_size=cfg["res_kernel_size"], **hyper, **common)
            for _ in range(cfg["num_hyper_res_blocks"]))
        self.up_blocks = nn.ModuleList(
            HyperUpBlock(spatial_dims, chans[i], chans[i - 1], kernels[i], upsample_mode=cfg["upsample_mode"],
                         **hyper, **common)
            for i in range(len(chans) - 1, 0, -1))
        self.pointwise_width = cfg["pointwise_width"]
        self.pointwise: Optional[nn.ModuleList] = nn.ModuleList([
            HyperConvNormAct(spatial_dims, self.pointwise_width, self.pointwise_width, 1, norm="none",
                             negative_slope=cfg["negative_slope"], **hyper),
            HyperConv(self.pointwise_width, out_channels, 1, cfg["code_length"], spatial_dims=spatial_dims,
                      bank_size=cfg["hyper_bank_size"], mlp_hidden=cfg["hyper_mlp_hidden"],
                      init_gain=FINAL_LAYER_INIT_GAIN)]) if self.pointwise_width else None
        self.context: Optional[GlobalContext] = (
            GlobalContext(spatial_dims, self.pointwise_width, cfg["global_context_heads"], cfg["code_length"])
            if cfg["global_context_heads"] else None)
        #: input_unshuffle: the final HyperConv gives every f^d block of output voxels as channels
        self.unshuffle = int(cfg["input_unshuffle"])
        self.final = HyperConv(chans[0], out_channels * self.unshuffle ** spatial_dims, kernels[0],
                               cfg["code_length"], spatial_dims=spatial_dims,
                               padding_mode=cfg["padding_mode"], bank_size=cfg["hyper_bank_size"],
                               mlp_hidden=cfg["hyper_mlp_hidden"], init_gain=FINAL_LAYER_INIT_GAIN)
        self.skip_connections = bool(cfg["skip_connections"])
        self.bottleneck_channels = chans[-1]
        # per up level (coarse to fine): channels of the skip map it receives and its fold factor in the encoding
        self.skip_layout: List[Tuple[int, int]] = [(chans[i - 1], 2 ** (len(chans) - i))
                                                   for i in range(len(chans) - 1, 0, -1)]
        self.skip_blocks = nn.ModuleList(
            HyperConvNormAct(spatial_dims, 2 * c, c, cfg["res_kernel_size"], **hyper, **common)
            for c, _ in (self.skip_layout if self.skip_connections else []))
        self.divisor = downsample_factor(cfg)
        self.in_channels = (chans[-1] + (sum(c * f ** spatial_dims for c, f in self.skip_layout)
                                         if self.skip_connections else 0)
                            + self.pointwise_width * self.divisor ** spatial_dims)

    def split(self, features: Tensor) -> Tuple[Tensor, List[Tensor], Optional[Tensor]]:
        """An encoding -> (bottleneck features, skip maps at their own resolution, coarse to fine, pointwise
        features at full resolution or None)."""
        dims = features.dim() - 2
        layout = list(self.skip_layout) if self.skip_connections else []
        if self.pointwise_width:
            layout.append((self.pointwise_width, self.divisor))
        if not layout:
            return features, [], None
        parts = torch.split(features, [self.bottleneck_channels] + [c * f ** dims for c, f in layout], dim=1)
        maps = [depth_to_space(p, f) for p, (_, f) in zip(parts[1:], layout)]
        if self.pointwise_width:
            return parts[0], maps[:-1], maps[-1]
        return parts[0], maps, None

    def pack(self, bottleneck: Tensor, skips: Sequence[Tensor], pointwise: Optional[Tensor] = None) -> Tensor:
        """Inverse of ``split``: ``skips`` full resolution first, as ``Encoder.forward_with_skips`` returns them
        (ignored without skip connections); ``pointwise`` is required exactly when the path is on."""
        if (pointwise is not None) != bool(self.pointwise_width):
            raise ValueError("pack() needs the pointwise features exactly when network.pointwise_width > 0")
        folded = ([space_to_depth(s, f) for s, (_, f) in zip(reversed(skips), self.skip_layout)]
                  if self.skip_connections else [])
        if pointwise is not None:
            folded.append(space_to_depth(pointwise, self.divisor))
        return torch.cat([bottleneck] + folded, dim=1) if folded else bottleneck

    def forward(self, features: Tensor, code: Tensor) -> Tensor:
        x, skips, pointwise = self.split(features)
        if self.context is not None:
            code = code.expand(x.shape[0], -1) + self.context(pointwise)
        for block in self.res_blocks:
            x = block(x, code)
        for i, block in enumerate(self.up_blocks):
            x = block(x, code)
            if skips:
                x = self.skip_blocks[i](torch.cat([x, skips[i]], dim=1), code)
        out = depth_to_space(self.final(x, code), self.unshuffle)
        if self.pointwise is not None:
            out = out + self.pointwise[1](self.pointwise[0](pointwise, code), code)
        return torch.tanh(out)


class Seq2SeqNet(nn.Module):
    """Seq2Seq generator: ``forward(x, target) = G(E(x) | s_target)``; see the module docstring."""

    def __init__(self, num_sequences: int, in_channels: int, spatial_dims: int, network: Mapping[str, Any]) -> None:
        super().__init__()
        cfg = resolve_network_config(network)
        if spatial_dims not in (2, 3):
            raise PlansError(f"spatial_dims must be 2 (2.5D slice stacks) or 3, got {spatial_dims}")
        if in_channels < 1:
            raise PlansError(f"in_channels must be >= 1, got {in_channels}")
        if not 1 <= num_sequences <= cfg["code_length"]:
            raise PlansError(f"The network's code_length ({cfg['code_length']}) must be at least the number of "
                             f"sequences ({num_sequences}); raise 'code_length' in the plans' network settings")
        self.num_sequences = int(num_sequences)
        self.in_channels = int(in_channels)
        self.spatial_dims = int(spatial_dims)
        self.network_config = cfg
        self.code_length = cfg["code_length"]
        self.divisor = downsample_factor(cfg)
        self.joint_input = bool(cfg["joint_input"])
        #: encoder input channels: one stack, or (joint) every sequence's stack plus its availability plane
        self.encoder_in_channels = (self.num_sequences * (self.in_channels + 1) if self.joint_input
                                    else self.in_channels)
        self.encoder = Encoder(self.encoder_in_channels, self.spatial_dims, cfg)
        self.decoder = HyperDecoder(self.in_channels, self.spatial_dims, cfg)
        self.skip_connections = bool(cfg["skip_connections"])
        self.source_conditioning = bool(cfg["source_conditioning"])
        #: channels of the bottleneck (what attention or quantisation acts on) and of a whole encoding
        self.bottleneck_channels = self.encoder.out_channels
        self.latent_channels = self.decoder.in_channels

    # ------------------------------------------------------------------------------------------------
    def sequence_code(self, target: Tensor) -> Tensor:
        """One-hot code (B, code_length) of the target sequence indices (B,); only the first N entries are used."""
        target = torch.as_tensor(target, device=self._device())
        if target.dim() == 0:
            target = target[None]
        if target.dim() != 1 or target.dtype.is_floating_point:
            raise ValueError(f"target must be a 1D integer tensor of sequence indices, got {target.dtype} "
                             f"with shape {tuple(target.shape)}")
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= self.num_sequences):
            raise ValueError(f"target sequence indices must be in [0, {self.num_sequences - 1}], "
                             f"got {target.tolist()}")
        return F.one_hot(target.long(), self.code_length).to(self._dtype())

    def _device(self) -> torch.device:
        return self.decoder.final.weight_bank.device

    def _dtype(self) -> torch.dtype:
        return self.decoder.final.weight_bank.dtype

    def _as_code(self, target: Tensor) -> Tensor:
        """Integer indices -> one-hot code; a float (B, code_length) tensor is taken as a code as is
        (VQ-Seq2Seq feeds random codes c_r ~ U(0, 1))."""
        if torch.is_tensor(target) and target.is_floating_point() and target.dim() == 2:
            if target.shape[1] != self.code_length:
                raise ValueError(f"a code must have shape (B, {self.code_length}), got {tuple(target.shape)}")
            return target
        return self.sequence_code(target)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"Seq2SeqNet({self.spatial_dims}D, {self.in_channels} channels) expects input of shape "
                             f"(B, {self.in_channels}, *{self.spatial_dims} spatial dims), got {tuple(x.shape)}")

    def padded_size(self, spatial_size: Sequence[int]) -> Tuple[int, ...]:
        """Spatial size after padding up to a multiple of the down-sampling factor."""
        d = self.divisor
        return tuple(int(math.ceil(s / d) * d) for s in spatial_size)

    # ------------------------------------------------------------------------------------------------
    def encode(self, x: Tensor, source: Optional[Tensor] = None) -> Tensor:
        """E(x): x (B, in_channels, *S) in [0, 1] -> features (B, C_lat, *ceil(S / divisor)).

        ``source`` (indices (B,), one int, or codes) names x's sequence; required with ``source_conditioning``
        and ``joint_input`` (x then fills its sequence's channel group, the others are absent), ignored otherwise
        (the paper's encoder does not know what it reads).

        Sizes that are not multiples of the down-sampling factor are padded at the end with 0 (background).
        With skip connections the folded skip maps follow the bottleneck channels (module docstring)."""
        self._check_input(x)
        if self.joint_input:
            if source is None:
                raise ValueError("this network's encoder reads every sequence in its own channels "
                                 "(network.joint_input): pass encode(x, source)")
            rows = torch.arange(x.shape[0], device=x.device)
            return self.encode_joint(*self.joint_stack(x, rows, self._source_indices(source, x.shape[0]),
                                                       x.shape[0]))
        x = self._pad(x)
        code = self._source_code(source, x.shape[0])
        return self.decoder.pack(*self.encoder.encode(x * 2.0 - 1.0, code))

    def _pad(self, x: Tensor) -> Tensor:
        """Pad the trailing spatial dims with 0 up to multiples of the down-sampling factor."""
        size = tuple(x.shape[-self.spatial_dims:])
        target = self.padded_size(size)
        if target == size:
            return x
        pads: List[int] = []
        for s, t in zip(reversed(size), reversed(target)):
            pads += [0, t - s]
        return F.pad(x, pads, mode="constant", value=0.0)

    def joint_stack(self, x: Tensor, rows: Tensor, sources: Tensor, num_rows: int) -> Tuple[Tensor, Tensor]:
        """Scatter source stacks x (M, k, *S) into per-row sequence slots: -> images (num_rows, N, k, *S) and
        availability (num_rows, N); stack m goes to row ``rows[m]``, slot ``sources[m]``."""
        rows = torch.as_tensor(rows, device=x.device).long()
        sources = torch.as_tensor(sources, device=x.device).long()
        if rows.shape != (x.shape[0],) or sources.shape != (x.shape[0],):
            raise ValueError(f"rows and sources need one entry per source stack ({x.shape[0]}), got "
                             f"{tuple(rows.shape)} and {tuple(sources.shape)}")
        images = x.new_zeros((num_rows, self.num_sequences) + tuple(x.shape[1:]))
        images[rows, sources] = x
        available = x.new_zeros((num_rows, self.num_sequences))
        available[rows, sources] = 1.0
        return images, available

    def encode_joint(self, images: Tensor, available: Tensor) -> Tensor:
        """Joint encoding of several sequences (``joint_input`` networks): images (B, N, k, *S) in [0, 1] with
        every sequence slot (absent ones may hold anything), available (B, N) zero-one -> (B, C_lat, ...)."""
        if not self.joint_input:
            raise ValueError("encode_joint needs a network with joint_input; encode each source and fuse instead")
        b, n = images.shape[:2]
        if images.dim() != self.spatial_dims + 3 or n != self.num_sequences or images.shape[2] != self.in_channels:
            raise ValueError(f"images must be (B, {self.num_sequences}, {self.in_channels}, "
                             f"*{self.spatial_dims} spatial dims), got {tuple(images.shape)}")
        if tuple(available.shape) != (b, n):
            raise ValueError(f"available must be ({b}, {n}), got {tuple(available.shape)}")
        if not bool((available.sum(1) > 0).all()):
            raise ValueError("every row needs at least one available sequence")
        images = self._pad(images)
        m = available.to(images.dtype).view((b, n) + (1,) * (images.dim() - 2))
        # absent sequences read as 0 whatever their slot holds (where, not a product: a NaN there stays out)
        scaled = torch.where(m > 0, images * 2.0 - 1.0, torch.zeros((), dtype=images.dtype,
                                                                    device=images.device)).flatten(1, 2)
        planes = (m[:, :, 0] * 2.0 - 1.0).expand((b, n) + tuple(images.shape[3:]))
        return self.decoder.pack(*self.encoder.encode(torch.cat([scaled, planes], 1)))

    def encode_sources(self, sources: Mapping[int, Tensor]) -> Tensor:
        """One encoding from several sources {sequence index: (B, k, *S)}: the joint encoding with
        ``joint_input``, else the mean of the per-source encodings (the TSF paper's "average" fusion)."""
        if not sources:
            raise ValueError("no source sequence given")
        if not self.joint_input:
            return torch.stack([self.encode(x, int(s)) for s, x in sources.items()]).mean(0)
        stacks = list(sources.values())
        for x in stacks:
            self._check_input(x)
        b = stacks[0].shape[0]
        rows = torch.arange(b, device=stacks[0].device).repeat(len(stacks))
        seqs = torch.tensor([int(s) for s in sources for _ in range(b)], device=stacks[0].device)
        return self.encode_joint(*self.joint_stack(torch.cat(stacks), rows, seqs, b))

    def _source_indices(self, source: Any, batch: int) -> Tensor:
        if isinstance(source, int) or (torch.is_tensor(source) and source.dim() == 0):
            return torch.full((batch,), int(source), dtype=torch.long, device=self._device())
        source = torch.as_tensor(source, device=self._device())
        if source.dim() != 1 or source.shape[0] != batch or source.dtype.is_floating_point:
            raise ValueError(f"source must be {batch} integer sequence indices, got {tuple(source.shape)}")
        if source.numel() and (int(source.min()) < 0 or int(source.max()) >= self.num_sequences):
            raise ValueError(f"source sequence indices must be in [0, {self.num_sequences - 1}], "
                             f"got {source.tolist()}")
        return source.long()

    def _source_code(self, source: Optional[Tensor], batch: int) -> Optional[Tensor]:
        if not self.source_conditioning:
            return None
        if source is None:
            raise ValueError("this network's encoder is conditioned on the source sequence "
                             "(network.source_conditioning): pass encode(x, source)")
        if isinstance(source, int) or (torch.is_tensor(source) and source.dim() == 0):
            source = self._source_indices(source, batch)
        code = self._as_code(source)
        if code.shape[0] != batch:
            raise ValueError(f"source has {code.shape[0]} entries for a batch of {batch}")
        return code

    def decode(self, features: Tensor, code: Tensor, output_size: Optional[Sequence[int]] = None) -> Tensor:
        """G(features | code) -> (B, in_channels, *S) in [0, 1]; ``output_size`` crops encode()'s padding away.

        ``code`` is a float (B, code_length) tensor (see ``sequence_code``) or integer sequence indices (B,)."""
        if features.dim() != self.spatial_dims + 2 or features.shape[1] != self.latent_channels:
            raise ValueError(f"decode expects features of shape (B, {self.latent_channels}, ...), "
                             f"got {tuple(features.shape)}")
        out = (self.decoder(features, self._as_code(code)) + 1.0) * 0.5
        if output_size is not None:
            output_size = tuple(int(s) for s in output_size)
            if len(output_size) != self.spatial_dims or any(o > s for o, s in zip(output_size, out.shape[2:])):
                raise ValueError(f"output_size {output_size} does not fit the decoded size {tuple(out.shape[2:])}")
            out = out[(slice(None), slice(None)) + tuple(slice(0, o) for o in output_size)]
        return out

    def forward(self, x: Tensor, target: Tensor, groups: Optional[Tensor] = None,
                source: Optional[Tensor] = None) -> Tensor:
        """Synthesise the target sequence (indices (B,) or codes (B, code_length)) from x; same shape as x.

        ``groups`` (M,) fuses several sources per output: x then holds M source stacks, ``groups[m]`` names the
        output row (0..B-1, B = len(target)) that stack m belongs to, and each row decodes the mean of its
        sources' encodings (multi-source training, the TSF paper's "average" fusion), or with ``joint_input`` the
        joint encoding of its sources (a sequence given twice in one row counts once). Without ``groups`` every
        stack is its own row, which is exactly the paper's one-to-one Seq2Seq. ``source`` (one per stack) names
        the input sequences; only a network with ``source_conditioning`` needs it."""
        code = self._as_code(target)
        if groups is None and code.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"batch size of target ({code.shape[0]}) does not match the input ({x.shape[0]})")
        if self.joint_input and groups is not None:
            self._check_input(x)
            if source is None:
                raise ValueError("a joint_input network needs the source sequence of every stack: pass source")
            features = self.encode_joint(*self.joint_stack(x, groups, self._source_indices(source, x.shape[0]),
                                                           code.shape[0]))
        else:
            features = self.encode(x, source)
            if groups is not None:
                features = fuse_mean(features, groups, code.shape[0])
        return self.decode(features, code, output_size=x.shape[2:])

    # ------------------------------------------------------------------------------------------------
    def estimate_feature_map_voxels(self, patch_size: Sequence[int]) -> int:
        """Activation elements kept per sample for one forward/backward at ``patch_size`` (planner memory model)."""
        return estimate_feature_map_voxels(patch_size, self.network_config, self.in_channels,
                                           self.num_sequences)

    def count_parameters(self, trainable_only: bool = True) -> int:
        return count_parameters(self, trainable_only)


def fuse_mean(features: Tensor, groups: Tensor, rows: int) -> Tensor:
    """Mean of ``features`` (M, C, ...) per row: ``groups`` (M,) in [0, rows) -> (rows, C, ...). Every row needs at
    least one member; a row with one member gets that member's features unchanged (bit for bit)."""
    groups = torch.as_tensor(groups, device=features.device).long()
    if groups.dim() != 1 or groups.numel() != features.shape[0]:
        raise ValueError(f"groups must have one entry per feature map ({features.shape[0]}), "
                         f"got shape {tuple(groups.shape)}")
    counts = torch.bincount(groups, minlength=rows)
    if counts.numel() != rows or bool((counts == 0).any()):
        raise ValueError(f"every output row 0..{rows - 1} needs at least one source; counts {counts.tolist()}")
    summed = features.new_zeros((rows,) + tuple(features.shape[1:])).index_add(0, groups, features)
    shape = (rows,) + (1,) * (features.dim() - 1)
    return summed / counts.to(features.dtype).view(shape)


def estimate_feature_map_voxels(patch_size: Sequence[int], network: Mapping[str, Any], in_channels: int = 1,
                                num_sequences: int = 1) -> int:
    """Sum over the feature maps a training step stores (conv, norm, padding copies, residual sums) of
    channels x voxels, per sample. Multiply by 4 bytes x batch size (x ~1.3 for workspace) for memory."""
    cfg = resolve_network_config(network)
    enc_in = num_sequences * (in_channels + 1) if cfg["joint_input"] else in_channels
    chans, kernels = cfg["encoder_channels"], cfg["encoder_kernel_sizes"]
    d = downsample_factor(cfg)
    padded = [int(math.ceil(int(s) / d) * d) for s in patch_size]
    reflect = cfg["padding_mode"] != "zeros"
    unshuffle = cfg["input_unshuffle"]
    u = int(round(math.log2(unshuffle)))

    def vox(level: int, pad: int = 0, full: bool = False) -> int:
        """Voxels of a map at encoder level ``level`` (of the input when ``full``), padded by ``pad``."""
        return int(math.prod((s >> (level + (0 if full else u))) + 2 * pad for s in padded))

    r = cfg["res_kernel_size"] // 2
    total = enc_in * vox(0, full=True)                                         # scaled input
    # encoder: (the unshuffled input,) padded input copy + conv output + norm output per ConvNormAct
    total += enc_in * vox(0, full=True) if unshuffle > 1 else 0
    enc_in *= unshuffle ** len(padded)
    total += (enc_in * vox(0, kernels[0] // 2) if reflect else 0) + 2 * chans[0] * vox(0)
    for i in range(1, len(chans)):
        total += (chans[i - 1] * vox(i - 1, kernels[i] // 2) if reflect else 0) + 2 * chans[i] * vox(i)
    last = len(chans) - 1
    per_res = 2 * ((chans[-1] * vox(last, r) if reflect else 0) + 2 * chans[-1] * vox(last)) + chans[-1] * vox(last)
    total += per_res * (cfg["num_res_blocks"] + cfg["num_hyper_res_blocks"])
    # decoder up blocks: upsampled map + padded copy + conv + norm
    for i in range(len(chans) - 1, 0, -1):
        total += chans[i] * vox(i - 1) + (chans[i] * vox(i - 1, kernels[i] // 2) if reflect else 0)
        total += 2 * chans[i - 1] * vox(i - 1)
        if cfg["skip_connections"]:   # concatenation + padded copy + conv + norm of the skip merge
            total += 2 * chans[i - 1] * vox(i - 1) + (2 * chans[i - 1] * vox(i - 1, r) if reflect else 0)
            total += 2 * chans[i - 1] * vox(i - 1)
    # pointwise path (full resolution): three 1x1 conv + activation pairs, the 1x1 output head and the sum with
    # the final conv
    width = cfg["pointwise_width"]
    total += 2 * 3 * width * vox(0, full=True) + (2 * in_channels * vox(0, full=True) if width else 0)
    # final conv (+ its folded-back copy) + tanh
    total += (chans[0] * vox(0, kernels[0] // 2) if reflect else 0) + 2 * in_channels * vox(0, full=True)
    total += in_channels * vox(0, full=True) if unshuffle > 1 else 0
    return int(total)


__all__ = ["Seq2SeqNet", "fuse_mean", "Encoder", "HyperDecoder", "DEFAULT_SEQ2SEQ_NETWORK", "resolve_network_config",
           "estimate_feature_map_voxels", "downsample_factor", "count_parameters"]
