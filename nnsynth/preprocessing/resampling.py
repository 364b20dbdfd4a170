"""Resampling between spacings (nnU-Net's rules, done in float32 with scipy.ndimage).

Images: cubic B-spline (order 3). When the spacing is strongly anisotropic (coarsest axis more than
``anisotropy_threshold`` times the finest, old or new spacing) the coarse axis is interpolated on its own
with order 0, the other axes with order 3, so thick slices are not smeared into each other. Masks and
label maps: nearest neighbour (order 0). Resampling is skipped when the shape does not change.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

# --- constants of this module ---------------------------------------------------------------------------
#: coarsest/finest spacing ratio above which the coarse axis is resampled separately (nnU-Net: 3)
ANISOTROPY_THRESHOLD = 3.0


def compute_new_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]
                      ) -> Tuple[int, ...]:
    """Shape after resampling ``shape`` from ``spacing`` to ``new_spacing`` (rounded, at least 1)."""
    return tuple(max(1, int(round(s * sp / nsp))) for s, sp, nsp in zip(shape, spacing, new_spacing))


def separate_axis(spacing: Sequence[float], new_spacing: Sequence[float],
                  threshold: float = ANISOTROPY_THRESHOLD) -> Optional[int]:
    """Axis to resample on its own with order 0, or None (no strong anisotropy)."""
    for sp in (spacing, new_spacing):
        sp = np.asarray(sp, dtype=float)
        if sp.max() / sp.min() > threshold:
            axis = int(np.argmax(sp))
            # only one axis may be coarse; with two coarse axes there is no "through-plane" axis
            if np.sum(sp > sp.min() * threshold) == 1:
                return axis
    return None


def _zoom(x: np.ndarray, new_shape: Sequence[int], order: int) -> np.ndarray:
    factors = [n / o for n, o in zip(new_shape, x.shape)]
    out = ndimage.zoom(x, factors, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
    if out.shape != tuple(new_shape):  # zoom rounds; never let a rounding difference leak out
        raise RuntimeError(f"resampling produced {out.shape}, expected {tuple(new_shape)}")
    return out


def resample_image(image: np.ndarray, new_shape: Sequence[int], order: int = 3,
                   separate: Optional[int] = None, order_separate: int = 0) -> np.ndarray:
    """Resample one 3D float image to ``new_shape``; ``separate``: axis done alone with ``order_separate``."""
    new_shape = tuple(int(s) for s in new_shape)
    if image.shape == new_shape:
        return image.astype(np.float32, copy=False)
    x = image.astype(np.float32, copy=False)
    if separate is None or image.shape[separate] == new_shape[separate]:
        return _zoom(x, new_shape, order)
    inplane = list(new_shape)
    inplane[separate] = x.shape[separate]
    if tuple(inplane) != x.shape:
        x = _zoom(x, inplane, order)  # factor 1 along ``separate``: spline interpolation there is exact
    return _zoom(x, new_shape, order_separate)


def resample_seg(seg: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resampling of an integer map (keeps its dtype and its label values)."""
    new_shape = tuple(int(s) for s in new_shape)
    if seg.shape == new_shape:
        return seg
    return _zoom(seg, new_shape, 0)


def resample_data(data: np.ndarray, spacing: Sequence[float], new_spacing: Sequence[float],
                  new_shape: Optional[Sequence[int]] = None, order: int = 3, order_separate: int = 0,
                  threshold: float = ANISOTROPY_THRESHOLD) -> np.ndarray:
    """Resample a (C, Z, Y, X) stack channel by channel (bounded extra memory: one channel)."""
    new_shape = tuple(new_shape or compute_new_shape(data.shape[1:], spacing, new_spacing))
    if tuple(data.shape[1:]) == new_shape:
        return data
    sep = separate_axis(spacing, new_spacing, threshold)
    out = np.empty((data.shape[0],) + new_shape, dtype=np.float32)
    for c in range(data.shape[0]):
        if not np.any(data[c]):
            out[c] = 0
        else:
            out[c] = resample_image(data[c], new_shape, order, sep, order_separate)
    return out
