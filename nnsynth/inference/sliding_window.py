"""Sliding-window synthesis over a preprocessed case: 2.5D slice stacks or 3D patches.

Networks are trained on patches, and InstanceNorm makes their output depend on the patch extent, so a whole
volume is predicted the nnU-Net way: overlapping windows of the training patch size (step = ``step_size`` x
patch), each weighted by a Gaussian importance map (sigma = patch / 8) that trusts window centres more than
borders, accumulated in float32 and divided by the summed weights.

2.5D (``spatial_dims=2``): a window is a stack of k adjacent slices (edge slices repeated, as in training) x an
in-plane patch. The network returns the same k slices of the target; every returned slice that lies inside the
volume is accumulated, so each slice is the (Gaussian-weighted in-plane, uniform across the stack) average of
the up to k stacks that contain it. 3D: windows are patches of the plan's ``patch_size``.

The predictor is a callable ``fn({sequence index: tensor (B, k or 1, *patch)}) -> {name: tensor}`` whose
``"prediction"`` entry has the input's shape; any further entry (e.g. ``"tsem"``) is accumulated the same way.
Volumes smaller than the patch are padded with background (0) and cropped back.
"""
from __future__ import annotations

import itertools
import logging
import math
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from nnsynth.utils.log import progress_disabled

logger = logging.getLogger(__name__)

# --- constants of this module ------------------------------------------------------------------------------
#: sigma of the Gaussian importance map as a fraction of the patch size (nnU-Net: 1/8)
GAUSSIAN_SIGMA_SCALE = 1.0 / 8.0
#: default overlap: windows advance by this fraction of the patch size (nnU-Net: 0.5)
DEFAULT_STEP_SIZE = 0.5
#: windows per forward pass when the caller does not choose
DEFAULT_WINDOW_BATCH = 8
PREDICTION_KEY = "prediction"

PredictFn = Callable[[Dict[int, torch.Tensor]], Dict[str, torch.Tensor]]


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = GAUSSIAN_SIGMA_SCALE) -> np.ndarray:
    """Separable Gaussian centred on the patch, max 1, strictly positive (float32).

    The minimum is lifted to the smallest positive value so that no voxel covered by a window ends up with
    zero total weight (which would divide by zero)."""
    if any(int(p) < 1 for p in patch_size):
        raise ValueError(f"patch size must be positive, got {tuple(patch_size)}")
    g = np.ones((), dtype=np.float64)
    for p in patch_size:
        p = int(p)
        sigma = max(p * sigma_scale, 1e-6)
        x = np.arange(p, dtype=np.float64) - (p - 1) / 2.0
        g = np.multiply.outer(g, np.exp(-0.5 * (x / sigma) ** 2))
    g = g / g.max()
    positive = g[g > 0]
    floor = positive.min() if positive.size else 1.0
    g = np.maximum(g, floor)
    return g.astype(np.float32)


def compute_steps(image_size: Sequence[int], patch_size: Sequence[int], step_size: float) -> List[List[int]]:
    """Window start positions per axis: evenly spaced, first at 0, last flush with the end, step <= patch*step.

    The image must be at least the patch size along every axis (pad first)."""
    if not 0 < step_size <= 1:
        raise ValueError(f"step_size must be in (0, 1], got {step_size}")
    steps = []
    for im, p in zip(image_size, patch_size):
        im, p = int(im), int(p)
        if im < p:
            raise ValueError(f"image size {im} is smaller than the patch size {p}; pad first")
        target = p * step_size
        n = int(math.ceil((im - p) / target)) + 1
        if n == 1:
            steps.append([0])
            continue
        actual = (im - p) / (n - 1)
        steps.append([int(round(actual * i)) for i in range(n)])
    return steps


def _pad_to(volume: np.ndarray, min_size: Sequence[int]) -> Tuple[np.ndarray, Tuple[slice, ...]]:
    """Zero-pad a (Z, Y, X) volume (symmetrically) to at least ``min_size`` on the trailing axes."""
    pads = [(0, 0)] * (volume.ndim - len(min_size))
    crop = [slice(None)] * (volume.ndim - len(min_size))
    for s, m in zip(volume.shape[-len(min_size):], min_size):
        d = max(0, int(m) - int(s))
        pads.append((d // 2, d - d // 2))
        crop.append(slice(d // 2, d // 2 + s))
    if not any(a or b for a, b in pads):
        return volume, tuple(crop)
    return np.pad(volume, pads, mode="constant", constant_values=0), tuple(crop)


def _windows(shape: Sequence[int], patch: Sequence[int], step_size: float) -> List[Tuple[int, ...]]:
    return list(itertools.product(*compute_steps(shape, patch, step_size)))


def mirror_axes_combinations(spatial_dims: int) -> List[Tuple[int, ...]]:
    """Flip combinations for test-time mirroring, as tensor axes of (B, C, *spatial): in-plane (y, x) for
    2.5D, (z, y, x) for 3D. The identity () comes first."""
    axes = [2, 3] if spatial_dims == 2 else [2, 3, 4]
    combos: List[Tuple[int, ...]] = []
    for r in range(len(axes) + 1):
        combos.extend(itertools.combinations(axes, r))
    return combos


def with_mirroring(fn: PredictFn, spatial_dims: int) -> PredictFn:
    """Wrap ``fn`` so that it averages its outputs over every mirrored version of the input."""
    combos = mirror_axes_combinations(spatial_dims)

    def mirrored(sources: Dict[int, torch.Tensor]) -> Dict[str, torch.Tensor]:
        total: Dict[str, torch.Tensor] = {}
        for axes in combos:
            inp = {s: (torch.flip(x, axes) if axes else x) for s, x in sources.items()}
            out = fn(inp)
            for k, v in out.items():
                v = (torch.flip(v, axes) if axes else v).float()
                total[k] = v if k not in total else total[k] + v
        return {k: v / len(combos) for k, v in total.items()}
    return mirrored


def _progress(total: int, desc: Optional[str]) -> "object":
    from tqdm import tqdm
    disable = progress_disabled(desc is not None)
    return tqdm(total=total, desc=desc, leave=False, disable=disable, mininterval=1.0, unit="win")


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def sliding_window_predict(volumes: Mapping[int, np.ndarray], predict_fn: PredictFn, spatial_dims: int,
                           patch_size: Sequence[int], num_adjacent_slices: int = 1,
                           step_size: float = DEFAULT_STEP_SIZE, device: torch.device = torch.device("cpu"),
                           batch_size: int = DEFAULT_WINDOW_BATCH, progress_desc: Optional[str] = None
                           ) -> Dict[str, np.ndarray]:
    """Predict whole (Z, Y, X) volumes from source volumes ``{sequence index: (Z, Y, X) float32}``.

    Returns ``{name: (Z, Y, X) float32}`` for every output of ``predict_fn`` (at least ``"prediction"``).
    Accumulation is float32 on the CPU; only one batch of windows lives on ``device`` at a time.
    """
    if not volumes:
        raise ValueError("sliding_window_predict needs at least one source volume")
    shapes = {tuple(v.shape) for v in volumes.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"source volumes must share one (Z, Y, X) shape, got {sorted(shapes)}")
    shape = next(iter(shapes))
    if spatial_dims == 2:
        if len(patch_size) != 2:
            raise ValueError(f"2.5D prediction needs a [y, x] patch size, got {list(patch_size)}")
        return _predict_2p5d(volumes, predict_fn, shape, [int(p) for p in patch_size], int(num_adjacent_slices),
                             step_size, device, batch_size, progress_desc)
    if spatial_dims != 3 or len(patch_size) != 3:
        raise ValueError(f"3D prediction needs spatial_dims=3 and a [z, y, x] patch size, got "
                         f"{spatial_dims} and {list(patch_size)}")
    return _predict_3d(volumes, predict_fn, shape, [int(p) for p in patch_size], step_size, device, batch_size,
                       progress_desc)


def _accumulate(acc: Dict[str, np.ndarray], name: str, shape: Sequence[int]) -> np.ndarray:
    if name not in acc:
        acc[name] = np.zeros(shape, np.float32)
    return acc[name]


def _predict_3d(volumes: Mapping[int, np.ndarray], fn: PredictFn, shape: Tuple[int, ...], patch: List[int],
                step_size: float, device: torch.device, batch_size: int, desc: Optional[str]
                ) -> Dict[str, np.ndarray]:
    padded: Dict[int, np.ndarray] = {}
    crop: Tuple[slice, ...] = ()
    for s, v in volumes.items():
        padded[s], crop = _pad_to(np.asarray(v, dtype=np.float32), patch)
    pshape = next(iter(padded.values())).shape
    gauss = gaussian_importance_map(patch)
    weight = np.zeros(pshape, np.float32)
    acc: Dict[str, np.ndarray] = {}
    windows = _windows(pshape, patch, step_size)
    bar = _progress(len(windows), desc)
    for batch in _batches(windows, max(1, batch_size)):
        boxes = [tuple(slice(a, a + p) for a, p in zip(w, patch)) for w in batch]
        inp = {s: torch.from_numpy(np.stack([v[b] for b in boxes])[:, None]).to(device) for s, v in padded.items()}
        out = fn(inp)
        if PREDICTION_KEY not in out:
            raise ValueError(f"the predictor must return a {PREDICTION_KEY!r} entry, got {sorted(out)}")
        outs = {k: v.float().cpu().numpy() for k, v in out.items()}
        for i, b in enumerate(boxes):
            weight[b] += gauss
            for k, v in outs.items():
                _accumulate(acc, k, pshape)[b] += v[i, 0] * gauss
        bar.update(len(batch))
    bar.close()
    return {k: (v / weight)[crop] for k, v in acc.items()}


def _predict_2p5d(volumes: Mapping[int, np.ndarray], fn: PredictFn, shape: Tuple[int, ...], patch: List[int],
                  k: int, step_size: float, device: torch.device, batch_size: int, desc: Optional[str]
                  ) -> Dict[str, np.ndarray]:
    if k < 1:
        raise ValueError(f"num_adjacent_slices must be >= 1, got {k}")
    padded: Dict[int, np.ndarray] = {}
    crop: Tuple[slice, ...] = ()
    for s, v in volumes.items():
        padded[s], crop = _pad_to(np.asarray(v, dtype=np.float32), patch)  # in-plane only
    pshape = next(iter(padded.values())).shape
    z_len, h = pshape[0], k // 2
    gauss = gaussian_importance_map(patch)
    weight = np.zeros(pshape, np.float32)
    acc: Dict[str, np.ndarray] = {}
    inplane = _windows(pshape[1:], patch, step_size)
    windows = [(z, w) for z in range(z_len) for w in inplane]
    bar = _progress(len(windows), desc)
    for batch in _batches(windows, max(1, batch_size)):
        zs = [np.arange(z - h, z - h + k) for z, _ in batch]                  # wanted slice indices
        boxes = [tuple(slice(a, a + p) for a, p in zip(w, patch)) for _, w in batch]
        inp = {}
        for s, v in padded.items():
            stack = np.stack([v[np.clip(z, 0, z_len - 1)][(slice(None),) + b] for z, b in zip(zs, boxes)])
            inp[s] = torch.from_numpy(stack).to(device)
        out = fn(inp)
        if PREDICTION_KEY not in out:
            raise ValueError(f"the predictor must return a {PREDICTION_KEY!r} entry, got {sorted(out)}")
        outs = {name: v.float().cpu().numpy() for name, v in out.items()}
        for i, (z_idx, b) in enumerate(zip(zs, boxes)):
            inside = (z_idx >= 0) & (z_idx < z_len)            # repeated edge slices are not accumulated
            sel = np.nonzero(inside)[0]
            box = (z_idx[sel],) + b
            weight[box] += gauss[None]
            for name, v in outs.items():
                _accumulate(acc, name, pshape)[box] += v[i, sel] * gauss[None]
        bar.update(len(batch))
    bar.close()
    return {name: (v / weight)[crop] for name, v in acc.items()}


__all__ = ["gaussian_importance_map", "compute_steps", "sliding_window_predict", "with_mirroring",
           "mirror_axes_combinations", "GAUSSIAN_SIGMA_SCALE", "DEFAULT_STEP_SIZE", "PREDICTION_KEY"]
