"""Self-configuring plans: every setting derived from the fingerprint and the compute target.

``DefaultPlanner(fingerprint, dataset_name, device, memory_gb).plan()`` returns the plans dict
(``nnsynthPlans.json``, schema in documentation/architecture.md, rules and rationale in
documentation/plans.md). Each derivation is one method, so a custom planner subclasses and overrides only
what it changes; ``-pl`` selects it by registered name or by dotted path (``my_pkg.module.MyPlanner``).
"""
from __future__ import annotations

import difflib
import importlib
import logging
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import numpy as np

from nnsynth.constants import DEFAULT_PLANS_IDENTIFIER
from nnsynth.exceptions import PlansError
from nnsynth.planning.fingerprint import PSEUDO_2D_SPACING, default_num_workers
from nnsynth.preprocessing.normalization import NORMALIZATION_SCHEME, plan_normalization
from nnsynth.preprocessing.resampling import ANISOTROPY_THRESHOLD, separate_axis

logger = logging.getLogger(__name__)

# --- constants of this module (the planner's knobs; documented in documentation/plans.md) ---------------
#: patch edges are multiples of this: 2 stride-2 convs (Seq2Seq) and CodeBrain's /8 encoder
PATCH_DIVISOR = 8
#: spacing ratio above which the coarse axis gets the 10th-percentile rule (nnU-Net)
TARGET_SPACING_PERCENTILE = 10
#: transpose moves an axis ahead of axis 0 only if it is coarser by more than this relative margin
TRANSPOSE_TOLERANCE = 1e-3
#: CPU compute reference: one 2d iteration of the real Seq2Seq network of this size takes ~0.4 s on 2 cores
#: (benchmarks/bench_cpu_iteration.py, documentation/plans.md)
CPU_REFERENCE = {"encoder_channels": [16, 32, 64], "encoder_kernel_sizes": [7, 3, 3], "input_unshuffle": 1,
                 "num_res_blocks": 6, "num_hyper_res_blocks": 6,
                 "patch_size": [128, 128], "batch_size": 2, "num_adjacent_slices": 3}
#: the CPU_REFERENCE keys that replace a plan's network settings to give the reference network
CPU_REFERENCE_NETWORK_KEYS = ("encoder_channels", "encoder_kernel_sizes", "input_unshuffle", "num_res_blocks",
                              "num_hyper_res_blocks")
#: network widths per device and dimensionality
ENCODER_CHANNELS = {("cpu", 2): [16, 32, 64], ("cpu", 3): [8, 16, 32],
                    ("cuda", 2): [64, 128, 256], ("cuda", 3): [32, 64, 128]}
#: kernel of the encoder's stem and the decoder's final HyperConv, then of each stride-2 level (the paper's 7/3/3).
#: Demo, CPU 2d, 20 minutes (documentation/benchmarks.md, twenty-ninth session): 5/3/3 scored 23.96 and 23.64 dB
#: against 23.63 for 7/3/3 in the same session, within run-to-run spread, so the paper's kernels stay for now
ENCODER_KERNELS = {("cpu", 2): [7, 3, 3], ("cpu", 3): [7, 3, 3], ("cuda", 2): [7, 3, 3], ("cuda", 3): [7, 3, 3]}
#: residual + hyper-residual blocks at the bottleneck: the paper's 6 + 6 on a GPU; CPU runs are iteration-bound (a
#: 20-minute run is ~4 000 steps), and 2 + 2 blocks cost 40 % fewer multiply-adds per sample, so the budget buys
#: a larger batch. Demo (benchmarks/bench_seq2seq_quality.py, documentation/benchmarks.md), 20 minutes: 20.32 dB
#: against 19.33 with 6 + 6; 10 minutes, 1 thread: 6 + 6 17.44, 2 + 2 18.58 (batch 7, as planned) / 18.85
#: (batch 4), 1 + 1 18.44, 2 + 2 at 24/48/96 channels 17.71
RES_BLOCKS = {"cpu": 2, "cuda": 6}
#: channels of the Seq2Seq pointwise intensity path (networks/seq2seq.py; 1x1 convolutions, 17-20 % of a CPU
#: step). Demo (documentation/benchmarks.md): 20 minutes 20.79 dB / 0.916 SSIM against 20.32 / 0.883 without it;
#: 10 minutes on 1 thread, 32 channels beat 16 on validation slices (18.32 vs 17.73 dB; off 17.54) and on the
#: affine-calibrated test score (21.79 vs 21.21; off 20.33)
POINTWISE_WIDTH = 32
#: heads of the Seq2Seq decoder's global subject context (networks/seq2seq.py, GlobalContext; no measurable cost
#: per step). Demo, fold all, 20 minutes: 23.23 and 23.06 dB against 22.65 without it (documentation/benchmarks.md)
GLOBAL_CONTEXT_HEADS = 4
#: Seq2Seq backbone resolution (networks/seq2seq.py, ``input_unshuffle``): 2 folds every 2^d block of input voxels
#: into channels so that every convolution works at half resolution (the pointwise path stays at full resolution)
INPUT_UNSHUFFLE = 1
MAX_PATCH_EDGE = {("cpu", 2): 128, ("cpu", 3): 96, ("cuda", 2): 256, ("cuda", 3): 160}
#: CPU runs are time-bound and a CPU training step costs about the same per sample at any batch (inside
#: nnsynth_train on 2 cores, 45-46 ms per sample at batch 4 and 7), so a larger batch only buys fewer updates in
#: the same minutes: the CPU 2d batch stops at 4.
#: Demo, fold all, 20 minutes (documentation/benchmarks.md): batch 4 22.94 and 23.12 dB against 22.44 and 22.62
#: (batch 7) and 22.54 (batch 2, 58 ms per sample)
MAX_BATCH_SIZE = {("cpu", 2): 4, ("cpu", 3): 2, ("cuda", 2): 16, ("cuda", 3): 4}
MIN_BATCH_SIZE = 2
#: at most this fraction of the dataset's voxels in one batch (nnU-Net)
MAX_DATASET_FRACTION_PER_BATCH = 0.05
#: fraction of the memory budget given to activations (the estimate is rough; the rest is weights, optimiser,
#: cuDNN workspaces, the data loader)
ACTIVATION_MEMORY_FRACTION = 0.5
DEFAULT_GPU_MEMORY_GB = 8.0
#: VQ: latent dim 3 (paper, 4 sequences) + 1 per doubling of the number of sequences beyond 4
VQ_LATENT_DIM_ANCHOR = 3
VQ_ANCHOR_SEQUENCES = 4
#: VQ: at most 256 codes (paper, synthesis), at least 16 (paper, segmentation), and at least this many
#: training latent vectors per code so every code can be trained
VQ_CODEBOOK_MAX, VQ_CODEBOOK_MIN, VQ_VECTORS_PER_CODE = 256, 16, 1000
VQ_CODEBOOK_SEGMENTATION = 16
#: VQ: the quantised latent grid keeps at least this many cells across the smallest convolved axis of the median
#: image, giving up stride-2 levels where needed (paper: 1 mm BraTS slices, 4x down, 35-42 cells across the brain;
#: demo at 4 mm, 6 CPU minutes: 9-12 cells 11.80 dB, 18-24 cells 12.56 dB, a full-resolution grid on the
#: one-level 16-channel encoder 11.92 dB; documentation/benchmarks.md)
VQ_MIN_LATENT_CELLS = 16
#: FSQ: L = 5 (paper); N * d ~= 28 (paper: 3 x 9 = 27 IXI, 4 x 7 = 28 BraTS) so E_prior's N*d outputs stay
#: the same size; d within [4, 12]
FSQ_LEVEL, FSQ_TOTAL_DIMS, FSQ_MIN_DIM, FSQ_MAX_DIM = 5, 28, 4, 12
#: sequence-code length: paper code 64, always >= number of sequences
CODE_LENGTH_ANCHOR = 64
NUM_ADJACENT_SLICES = 3
# exponent of the intensity-balanced L1 of seq2seq / tsf_seq2seq (losses/reconstruction.py; 0 = the paper's
# plain L1): 0.5 weighs each voxel by 1/sqrt(share of its intensity bin), so lesions are not averaged away
INTENSITY_BALANCE = 0.5
#: (probability, multiplier range) of the brightness transform on synthesis inputs (one factor per source stack):
#: a scan's normalised intensities shift with its lesion load and tissue mix, and the oedema of unseen subjects came
#: out too dim without it (documentation/benchmarks.md, fifteenth session, demo, 20 CPU minutes: 22.44 dB against
#: 21.77-21.98 in four runs without it, oedema of unseen subjects at 0.88 of its brightness instead of 0.82-0.85)
SOURCE_BRIGHTNESS = (0.3, (0.75, 1.25))
#: weight of the Seq2Seq label head's cross-entropy (trainers/seq2seq.py; used where dataset.json has labels):
#: the shared features learn what a lesion is from every labelled case (documentation/benchmarks.md)
LABEL_HEAD_WEIGHT = 1.0
#: probability that a training patch is centred on a labelled voxel of a case with a label map (dataloading.py)
OVERSAMPLE_LABELS = 0.0
#: probability that a multi-sequence training sample receives another labelled case's lesion (dataloading.py);
#: off: 0.5 was level on the demo (documentation/benchmarks.md, twenty-second session: 23.38 dB against 23.24, the
#: case with the largest lesion +0.5 dB, another case -0.7)
LESION_PASTE = 0.0
# seq2seq learning rate of CPU plans (GPU plans: the paper's 2e-4): short runs of the 4x narrower CPU network
# learn faster with it (documentation/benchmarks.md, demo, 20 minutes: 2e-3 against 1e-3 over three and four runs:
# validation slices of all directions 20.9-21.6 dB against 20.3-20.5, full-volume validation 18.69 against 18.46,
# test Flair 21.16 against 20.95; earlier, 1e-3 19.33 dB / 0.865 SSIM, 5e-4 19.25 / 0.836, 2e-4 18.51 / 0.812)
SEQ2SEQ_CPU_LR = 2e-3
# seq2seq Adam betas of CPU plans (GPU plans: torch's default 0.9/0.999, which the paper's Adam implies): a
# 20-minute CPU run makes ~7 000 updates, and a second-moment average over ~100 steps instead of ~1 000 follows the
# shrinking gradients of such a short schedule (documentation/benchmarks.md, twenty-second session, demo, fold
# all, 20 minutes: 23.50 and 23.53 dB against 23.16-23.24 with 0.999; uncalibrated 22.96-22.99 against 22.55-22.57)
SEQ2SEQ_CPU_BETAS = (0.9, 0.99)
# seq2seq multi-source training: share of the non-self tasks whose sources are ALL other available sequences (the
# task nnsynth_predict runs when it imputes from everything a case has); the rest draw a random subset
# (trainers/seq2seq.py). Demo, 10 minutes: SSIM +0.016 at 5e-4 and PSNR +0.68 dB at 1e-3 against 0
SEQ2SEQ_ALL_SOURCES_FRACTION = 0.5
# seq2seq multi-source training: draw the target with weights one over the number of training cases that have each
# sequence, so the sequences most cases lack are trained about as often as the others (trainers/seq2seq.py). Demo,
# fold all, 20 minutes (documentation/benchmarks.md, twenty-eighth session): 23.93, 23.64 and 23.63 dB against 23.46
SEQ2SEQ_BALANCE_TARGETS = True
# epochs x iterations per epoch, and warm-up iterations. CPU runs are time-budgeted (--max-minutes fits the
# schedule to the budget, never beyond num_epochs), so the CPU count is a ceiling a budget should not hit: 50 was
# hit after 11 of 20 minutes on a 2-core machine that runs an epoch in 12.5 s, and using the other 9 minutes
# (89-92 epochs) gained 0.47 and 0.64 dB in two runs (documentation/benchmarks.md, tenth session). Warm-up
# stays one CPU epoch.
EPOCHS = {"cpu": (250, 100), "cuda": (1000, 250)}
WARMUP_ITERS = {"cpu": 100, "cuda": 1000}

TRAINERS = ("seq2seq", "vq_seq2seq", "tsf_seq2seq", "codebrain", "seg_from_latent")


# --- compute target ---------------------------------------------------------------------------------------

def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'mps' plans like 'cpu' (small, fp32)."""
    device = (device or "auto").lower()
    if device not in ("auto", "cpu", "cuda", "mps"):
        raise PlansError(f"--device must be auto, cpu, cuda or mps, got {device!r}")
    if device == "auto":
        try:
            import torch
            return "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:  # pragma: no cover - torch is a dependency
            return "cpu"
    return "cpu" if device == "mps" else device


def default_memory_gb(device: str) -> float:
    """GPU memory of device 0 (or 8 GB when planning for a GPU not present); half the RAM for CPU."""
    if device == "cuda":
        try:
            import torch
            if torch.cuda.is_available():
                return round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
        except ImportError:  # pragma: no cover
            pass
        return DEFAULT_GPU_MEMORY_GB
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 8.0
    return round(max(1.0, total / 2), 1)


# --- cost model of the Seq2Seq network --------------------------------------------------------------------

def _convs(channels: Sequence[int], kernels: Sequence[int], n_res: int, n_hyper: int, k_in: int,
           spatial_dims: int, skips: bool = False, enc_in: Optional[int] = None,
           pointwise: int = 0, unshuffle: int = 1) -> List[Tuple[int, int, int, int]]:
    """(level, kernel volume, c_in, c_out) of every convolution of encoder + HyperConv decoder, level = number of
    halvings of the input's resolution; ``enc_in`` is the encoder's input channels when they differ from the k_in
    output channels (joint input); ``pointwise`` the width of the voxelwise intensity path and ``unshuffle`` the
    network's input_unshuffle (networks/seq2seq.py)."""
    c = [int(v) for v in channels]
    last = len(c) - 1
    kv = [int(k) ** spatial_dims for k in kernels]
    k3 = 3 ** spatial_dims
    u = int(round(math.log2(max(int(unshuffle), 1))))
    fold = int(unshuffle) ** spatial_dims
    convs = [(u, kv[0], (enc_in or k_in) * fold, c[0])] + [(u + i, kv[i], c[i - 1], c[i]) for i in range(1, last + 1)]
    convs += [(u + last, k3, c[last], c[last])] * (2 * (n_res + n_hyper))
    convs += [(u + i - 1, k3, c[i], c[i - 1]) for i in range(last, 0, -1)] + [(u, kv[0], c[0], k_in * fold)]
    if pointwise:   # two 1x1 convs in the encoder, a 1x1 HyperConv and the 1x1 output head in the decoder
        convs += [(0, 1, enc_in or k_in, pointwise), (0, 1, pointwise, pointwise), (0, 1, pointwise, pointwise),
                  (0, 1, pointwise, k_in)]
    if skips:   # the merge HyperConv after each up-sampling (concatenated skip map in)
        convs += [(u + i - 1, k3, 2 * c[i - 1], c[i - 1]) for i in range(last, 0, -1)]
    return convs


def iteration_cost(patch: Sequence[int], net: Dict[str, Any], k_in: int = 1,
                   num_sequences: int = 1) -> Tuple[float, float]:
    """(multiply-adds, stored activation values) of one forward pass for ONE sample.

    Every conv stores its output, its normalised output and its activation for backward (3 values per
    output voxel per channel). Backward costs ~2x forward, which the budgets below absorb.
    """
    dims = len(patch)
    vox = float(np.prod(patch))
    flops, acts = 0.0, 0.0
    for level, kvol, cin, cout in _convs(net["encoder_channels"], net["encoder_kernel_sizes"],
                                         net["num_res_blocks"], net["num_hyper_res_blocks"], k_in, dims,
                                         bool(net.get("skip_connections", False)),
                                         num_sequences * (k_in + 1) if net.get("joint_input") else k_in,
                                         int(net.get("pointwise_width") or 0),
                                         int(net.get("input_unshuffle") or 1)):
        v = vox / (2 ** dims) ** level
        flops += kvol * cin * cout * v
        acts += 3 * cout * v
    return flops, acts


def _pow2_floor(x: float) -> int:
    return 2 ** int(math.floor(math.log2(max(x, 1.0))))


def _round_up(x: float, m: int) -> int:
    return int(max(m, m * math.ceil(x / m)))


# --- the planner ------------------------------------------------------------------------------------------

_REGISTRY: Dict[str, str] = {}


def register_planner(name: str) -> Callable[[type], type]:
    """Class decorator: make a planner selectable with ``-pl name``."""
    def deco(cls: type) -> type:
        _REGISTRY[name] = f"{cls.__module__}.{cls.__qualname__}"
        return cls
    return deco


@register_planner("default")
class DefaultPlanner:
    """nnU-Net-style rule-based planner for synthesis; see documentation/plans.md for every rule."""

    def __init__(self, fingerprint: Dict[str, Any], dataset_name: str, device: str = "auto",
                 memory_gb: Optional[float] = None, plans_name: str = DEFAULT_PLANS_IDENTIFIER) -> None:
        self.fp = fingerprint
        self.dataset_name = dataset_name
        self.device = resolve_device(device)
        self.memory_gb = float(memory_gb) if memory_gb else default_memory_gb(self.device)
        if self.memory_gb <= 0:
            raise PlansError(f"--memory-gb must be positive, got {memory_gb}")
        self.plans_name = plans_name
        self.sequences: List[str] = list(fingerprint["sequences"])
        self.num_sequences = len(self.sequences)
        self.spacings = np.asarray(fingerprint["spacings"], dtype=float)
        self.shapes = np.asarray(fingerprint["shapes_after_crop"], dtype=float)
        self.num_cases = int(fingerprint["num_cases"])
        self.is_2d = bool(fingerprint.get("is_2d", False))

    # -- geometry ------------------------------------------------------------------------------------------
    def target_spacing(self) -> List[float]:
        """Median spacing; a much coarser axis (> 3x, with > 3x fewer voxels) takes its 10th percentile."""
        target = np.median(self.spacings, axis=0)
        if self.is_2d:
            return [PSEUDO_2D_SPACING] + [float(s) for s in target[1:]]
        size = np.median(self.shapes * self.spacings / target, axis=0)
        worst = int(np.argmax(target))
        other = [i for i in range(3) if i != worst]
        aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * min(target[other])
        aniso_voxels = size[worst] * ANISOTROPY_THRESHOLD < min(size[other])
        if aniso_spacing and aniso_voxels:
            p = float(np.percentile(self.spacings[:, worst], TARGET_SPACING_PERCENTILE))
            target[worst] = max(p, float(max(target[other])) + 1e-5)
        return [float(s) for s in target]

    def transpose(self, target_spacing: Sequence[float]) -> Tuple[List[int], List[int]]:
        """Coarsest axis first (the 2.5D slicing axis), others in order; identity when isotropic."""
        sp = np.asarray(target_spacing)
        worst = int(np.argmax(sp))
        if sp[worst] <= sp[0] * (1 + TRANSPOSE_TOLERANCE):
            worst = 0
        forward = [worst] + [i for i in range(3) if i != worst]
        return forward, [int(i) for i in np.argsort(forward)]

    def median_shape(self, target_spacing: Sequence[float], keep_z: bool = False) -> List[float]:
        """Median shape after cropping and resampling (array order, before transposing)."""
        target = np.asarray(target_spacing, dtype=float)
        factors = self.spacings / target
        if keep_z or self.is_2d:
            factors[:, 0] = 1.0
        return [float(s) for s in np.median(np.round(self.shapes * factors), axis=0)]

    # -- network ---------------------------------------------------------------------------------------------
    def network(self, spatial_dims: int) -> Dict[str, Any]:
        blocks = RES_BLOCKS[self.device]
        return {"encoder_channels": list(ENCODER_CHANNELS[(self.device, spatial_dims)]),
                "encoder_kernel_sizes": list(ENCODER_KERNELS[(self.device, spatial_dims)]),
                "num_res_blocks": blocks, "num_hyper_res_blocks": blocks,
                "hyper_bank_size": 16, "code_length": self.code_length(),
                "hyper_mlp_hidden": 64, "norm": "instance", "negative_slope": 0.2, "padding_mode": "reflect",
                "upsample_mode": "nearest", "res_kernel_size": 3, "skip_connections": True,
                "source_conditioning": False, "joint_input": True, "pointwise_width": POINTWISE_WIDTH,
                "global_context_heads": GLOBAL_CONTEXT_HEADS,
                "input_unshuffle": INPUT_UNSHUFFLE}

    def normalization(self) -> Dict[str, Any]:
        """``median_anchor`` with per-sequence ratios from the fingerprint (preprocessing/normalization.py); a
        fingerprint without per-case intensities (written by an older nnsynth) gives ``percentile_clip``."""
        cases = list(self.fp.get("cases", {}).values())
        if not cases or any("intensity" not in c for c in cases):
            logger.info("The fingerprint has no per-case intensities: normalisation by per-image percentiles")
            return dict(NORMALIZATION_SCHEME)
        return plan_normalization([c["intensity"] for c in cases], self.sequences)

    def code_length(self) -> int:
        """One-hot sequence-code length: 64 as in the paper code, or the next power of 2 >= N."""
        return max(CODE_LENGTH_ANCHOR, 2 ** int(math.ceil(math.log2(max(self.num_sequences, 1)))))

    def _budget(self, spatial_dims: int) -> Tuple[str, float]:
        """('flops', budget) on CPU (time-bound), ('bytes', budget) on a GPU (memory-bound)."""
        if self.device == "cpu":
            ref = dict(self.network(2), **{k: CPU_REFERENCE[k] for k in CPU_REFERENCE_NETWORK_KEYS})
            flops, _ = iteration_cost(CPU_REFERENCE["patch_size"], ref, CPU_REFERENCE["num_adjacent_slices"],
                                      self.num_sequences)
            return "flops", flops * CPU_REFERENCE["batch_size"]
        return "bytes", self.memory_gb * 2 ** 30 * ACTIVATION_MEMORY_FRACTION

    def _sample_cost(self, patch: Sequence[int], net: Dict[str, Any], k_in: int) -> Tuple[float, float]:
        flops, acts = iteration_cost(patch, net, k_in, self.num_sequences)
        bytes_per_value = 2 if self.device == "cuda" else 4  # AMP on CUDA
        # backward keeps the forward activations and builds as many gradients
        return flops, acts * bytes_per_value * 2

    def patch_and_batch(self, median: Sequence[float], net: Dict[str, Any], spatial_dims: int, k_in: int,
                        dataset_voxels: float) -> Tuple[List[int], int]:
        """nnU-Net's rule: start from the median shape, shrink the axis with the largest patch/median ratio
        until MIN_BATCH_SIZE samples fit the budget, then fill the budget with the batch size."""
        key = (self.device, spatial_dims)
        kind, budget = self._budget(spatial_dims)
        mem_budget = self.memory_gb * 2 ** 30 * ACTIVATION_MEMORY_FRACTION
        patch = [min(_round_up(m, PATCH_DIVISOR), MAX_PATCH_EDGE[key]) for m in median]

        def fits(p: Sequence[int], b: int) -> bool:
            flops, mem = self._sample_cost(p, net, k_in)
            ok = mem * b <= mem_budget
            return ok and (flops * b <= budget if kind == "flops" else True)

        while not fits(patch, MIN_BATCH_SIZE) and max(patch) > PATCH_DIVISOR:
            ratios = [p / max(m, 1.0) if p > PATCH_DIVISOR else -1 for p, m in zip(patch, median)]
            axis = int(np.argmax(ratios))
            patch[axis] -= PATCH_DIVISOR
        batch = MIN_BATCH_SIZE
        while batch < MAX_BATCH_SIZE[key] and fits(patch, batch + 1):
            batch += 1
        cap = int(MAX_DATASET_FRACTION_PER_BATCH * dataset_voxels / float(np.prod(patch)))
        batch = max(MIN_BATCH_SIZE, min(batch, cap))
        return patch, batch

    # -- VQ / FSQ ---------------------------------------------------------------------------------------------
    def latent_dim(self) -> int:
        extra = max(0, math.ceil(math.log2(self.num_sequences / VQ_ANCHOR_SEQUENCES))) \
            if self.num_sequences > VQ_ANCHOR_SEQUENCES else 0
        return VQ_LATENT_DIM_ANCHOR + extra

    @staticmethod
    def codebook_size(latent_vectors_total: float) -> int:
        k = _pow2_floor(latent_vectors_total / VQ_VECTORS_PER_CODE)
        return int(min(VQ_CODEBOOK_MAX, max(VQ_CODEBOOK_MIN, k)))

    @staticmethod
    def vq_downsampling_levels(shape: Sequence[float], max_levels: int) -> int:
        """Stride-2 levels before the quantiser: the most (at most the network's) that leave VQ_MIN_LATENT_CELLS
        cells across the smallest axis of ``shape`` (the median image, in-plane for 2d)."""
        levels = 0
        while levels < max_levels and min(shape) / 2 ** (levels + 1) >= VQ_MIN_LATENT_CELLS:
            levels += 1
        return levels

    @staticmethod
    def latent_vectors_per_case(shape: Sequence[float], spatial_dims: int, levels: int) -> float:
        """Quantised latent vectors of a median image ``shape`` (network axes; 2d: the slice axis first, not
        convolved) on a grid ``2**levels`` times coarser along each convolved axis."""
        return float(np.prod(shape)) / (2 ** levels) ** (2 if spatial_dims == 2 else len(shape))

    def vq(self, shape: Sequence[float], spatial_dims: int, max_levels: int) -> Dict[str, Any]:
        """VQ settings for a median image ``shape`` (network axes; 2d: the slice axis first, not convolved) and a
        network with ``max_levels`` stride-2 levels."""
        plane = list(shape[1:]) if spatial_dims == 2 else list(shape)
        levels = self.vq_downsampling_levels(plane, max_levels)
        latent_vectors_per_case = self.latent_vectors_per_case(shape, spatial_dims, levels)
        total = latent_vectors_per_case * self.num_cases
        k = self.codebook_size(total)
        return {"latent_dim": self.latent_dim(), "codebook_size": k, "downsampling_levels": levels,
                "codebook_size_segmentation": min(VQ_CODEBOOK_SEGMENTATION, k), "beta": 0.25,
                "latent_vectors_per_case": int(latent_vectors_per_case),
                "dead_code_restart": True, "dead_code_ema_decay": 0.99, "dead_code_threshold": 1.0,
                "init": "kmeans", "vqc_variance": "std"}

    def fsq(self) -> Dict[str, Any]:
        d = int(min(FSQ_MAX_DIM, max(FSQ_MIN_DIM, round(FSQ_TOTAL_DIMS / self.num_sequences))))
        width = 32 if self.device == "cuda" else 16
        blocks = [2, 2, 2] if self.device == "cuda" else [1, 1, 1]
        return {"levels": [FSQ_LEVEL] * d, "code_dim": d, "downsample_factor": 8, "nafnet_width": width,
                "nafnet_enc_blocks": blocks, "nafnet_middle_blocks": blocks[0], "nafnet_dec_blocks": blocks,
                "mask_patterns": "all"}

    # -- schedules, losses, augmentation ------------------------------------------------------------------
    def training(self) -> Dict[str, Any]:
        gpu = self.device == "cuda"
        epochs, iters = EPOCHS[self.device]
        per_trainer = {
            "seq2seq": {"optimizer": "adam", "lr": 2e-4 if gpu else SEQ2SEQ_CPU_LR, "weight_decay": 0.0,
                        "betas": [0.9, 0.999] if gpu else list(SEQ2SEQ_CPU_BETAS), "schedule": "poly",
                        "multi_source": True,
                        "all_sources_fraction": SEQ2SEQ_ALL_SOURCES_FRACTION,
                        "balance_targets": SEQ2SEQ_BALANCE_TARGETS},
            "vq_seq2seq": {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.05, "betas": [0.9, 0.95],
                           "schedule": "poly"},
            "tsf_seq2seq": {"optimizer": "adam", "lr": 1e-4, "weight_decay": 0.0, "betas": [0.9, 0.999],
                            "schedule": "poly"},
            "codebrain": {"optimizer": "adamw", "lr": 5e-4, "weight_decay": 0.0, "betas": [0.9, 0.9],
                          "schedule": "cosine", "min_lr": 5e-5},
            "seg_from_latent": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "betas": [0.9, 0.999],
                                "schedule": "poly"},
        }
        return {"optimizer": "adam", "lr": 2e-4, "weight_decay": 0.0, "betas": [0.9, 0.999], "schedule": "poly",
                "poly_exponent": 0.9, "min_lr": 0.0, "warmup_iters": WARMUP_ITERS[self.device],
                "num_epochs": epochs, "iters_per_epoch": iters, "val_iters": 50 if gpu else 10,
                "grad_clip": 12.0, "amp": gpu, "compile": False, "num_workers": default_num_workers(),
                "oversample_labels": OVERSAMPLE_LABELS, "per_trainer": per_trainer}

    def loss(self, num_epochs: int) -> Dict[str, Any]:
        return {
            "seq2seq": {"lambda_l1": 10.0, "lambda_perceptual": 0.01, "lambda_ssim": 0.0,
                        "lambda_adv": 0.0, "lambda_cycle": 0.0,
                        "intensity_balance": INTENSITY_BALANCE, "lambda_seg": LABEL_HEAD_WEIGHT},
            "vq_seq2seq": {"lambda_l1": 10.0, "lambda_ssim": 1.0, "lambda_perceptual": 0.1, "lambda_con": 10.0,
                           "lambda_vq": 10.0, "tau": 0.07, "max_contrastive_positions": 4096,
                           "contrastive_start_epoch": min(100, num_epochs // 10),
                           "vqc_start_epoch": min(200, num_epochs // 5)},
            "tsf_seq2seq": {"lambda_l1": 10.0, "lambda_perceptual": 0.01, "omega_eps": 1e-5,
                            "intensity_balance": INTENSITY_BALANCE},
            "codebrain": {"psnr_weight_available": 5.0, "psnr_weight_missing": 20.0, "lambda_adv": 0.1,
                          "adv_start_fraction": 0.2, "lambda_grading": 1.0},
            "seg_from_latent": {"lambda_dice": 1.0, "lambda_ce": 1.0},
        }

    def augmentation(self, spatial_dims: int, transpose_forward: Sequence[int]) -> Dict[str, Any]:
        x_axis = list(transpose_forward).index(2)  # left-right axis in network order
        if spatial_dims == 2:  # patch axes are network axes 1, 2; an x axis used for slicing is not mirrored
            mirror = [x_axis - 1] if x_axis > 0 else []
        else:
            mirror = [x_axis]
        return {"p_rotation": 0.2, "rotation_degrees": [-15.0, 15.0], "p_scaling": 0.2, "scaling": [0.85, 1.15],
                "mirror_axes": mirror, "p_mirror": 0.5,
                "p_gamma": 0.3, "gamma": [0.95, 1.05],
                "p_brightness": SOURCE_BRIGHTNESS[0], "brightness": list(SOURCE_BRIGHTNESS[1]),
                "p_noise": 0.1, "noise_sigma": [0.0, 0.1],
                "p_bias_field": 0.3, "bias_field_scale": 0.2, "bias_field_alpha": [0.0, 2.0],
                "p_domain_augmentation": 0.5, "p_lesion_paste": LESION_PASTE}

    def resampling(self, spacing: Sequence[float]) -> Dict[str, Any]:
        return {"order_data": 3, "order_seg": 0, "anisotropy_threshold": ANISOTROPY_THRESHOLD,
                "order_data_through_plane_if_anisotropic": 0,
                "separate_through_plane": separate_axis(spacing, spacing) is not None}

    # -- configurations ------------------------------------------------------------------------------------
    def configuration(self, spatial_dims: int, target: Sequence[float], tf: Sequence[int]) -> Dict[str, Any]:
        median = self.median_shape(target, keep_z=spatial_dims == 2)
        median_t = [median[a] for a in tf]
        spacing_t = [float(target[a]) for a in tf]
        if spatial_dims == 2:
            spacing_t[0] = float(np.median(self.spacings[:, tf[0]]))
        net = self.network(spatial_dims)
        k = NUM_ADJACENT_SLICES if spatial_dims == 2 and median_t[0] >= NUM_ADJACENT_SLICES else 1
        dataset_voxels = float(np.prod(median_t)) * self.num_cases
        plane = median_t[1:] if spatial_dims == 2 else median_t
        patch, batch = self.patch_and_batch(plane, net, spatial_dims, k, dataset_voxels)
        training = self.training()
        return {
            "data_identifier": f"{self.plans_name}_{spatial_dims}d",
            "spatial_dims": spatial_dims,
            "spacing": spacing_t,
            "median_shape": [int(round(m)) for m in median_t],
            "patch_size": patch,
            "num_adjacent_slices": k,
            "batch_size": batch,
            "resampling": self.resampling(spacing_t),
            "network": net,
            "vq": self.vq(median_t, spatial_dims, len(net["encoder_channels"]) - 1),
            "fsq": self.fsq(),
            "tsf": {"attention_reduction": 16, "spatial_kernel": 7},
            "training": training,
            "loss": self.loss(training["num_epochs"]),
            "augmentation": self.augmentation(spatial_dims, tf),
        }

    def plan(self, configurations: Sequence[str] = ("2d", "3d")) -> Dict[str, Any]:
        target = self.target_spacing()
        tf, tb = self.transpose(target)
        confs: Dict[str, Any] = {}
        for name in configurations:
            if name not in ("2d", "3d"):
                raise PlansError(f"unknown configuration {name!r}; choose from 2d, 3d")
            if name == "3d" and self.is_2d:
                logger.info("The dataset's images are 2D: configuration 3d is left out")
                continue
            confs[name] = self.configuration(2 if name == "2d" else 3, target, tf)
        median_sp = np.median(self.spacings, axis=0)
        median_sh = np.median(self.shapes, axis=0)
        return {
            "dataset_name": self.dataset_name,
            "plans_name": self.plans_name,
            "planner": f"{type(self).__module__}.{type(self).__qualname__}",
            "sequences": self.sequences,
            "channel_ids": list(self.fp["channel_ids"]),
            "num_training_cases": self.num_cases,
            "transpose_forward": tf,
            "transpose_backward": tb,
            "original_median_spacing_after_transp": [float(median_sp[a]) for a in tf],
            "original_median_shape_after_transp": [int(round(median_sh[a])) for a in tf],
            "normalization": self.normalization(),
            "compute": {"device": self.device, "memory_gb": self.memory_gb},
            "configurations": confs,
        }


def available_planners() -> Dict[str, str]:
    return dict(_REGISTRY)


def get_planner_class(name: str) -> Type[DefaultPlanner]:
    """A registered planner name (``default``) or a dotted path ``package.module.Class``."""
    if name in _REGISTRY:
        name = _REGISTRY[name]
    if "." not in name:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise PlansError(f"unknown planner {name!r}. Registered: {', '.join(sorted(_REGISTRY))}; or pass a "
                         f"dotted path like my_package.my_module.MyPlanner.{hint}")
    module_name, _, cls_name = name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PlansError(f"cannot import planner module {module_name!r} ({e})") from None
    cls = getattr(module, cls_name, None)
    if cls is None or not isinstance(cls, type):
        raise PlansError(f"module {module_name!r} has no class {cls_name!r}")
    if not hasattr(cls, "plan"):
        raise PlansError(f"{name} is not a planner (it has no plan() method); subclass DefaultPlanner")
    return cls
