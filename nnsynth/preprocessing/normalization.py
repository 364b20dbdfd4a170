"""Per-case, per-sequence intensity normalisation: the dataset's "normalised space".

Each available sequence of a case is clipped to the 0.5th/99.5th percentiles of its own nonzero voxels
and mapped linearly to [0, 1] inside the case's (union) nonzero mask; background stays 0. The two
percentile values are stored in the case properties, so ``x_raw = lower + x * (upper - lower)`` maps any
sequence back to its scanner scale (exactly, for voxels that were not clipped).
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np

from nnsynth.constants import FINGERPRINT_PERCENTILES

#: the plans' description of this scheme
NORMALIZATION_SCHEME = {"scheme": "percentile_clip", "percentiles": list(FINGERPRINT_PERCENTILES),
                        "range": [0.0, 1.0]}


def percentile_bounds(image: np.ndarray, percentiles: Sequence[float] = FINGERPRINT_PERCENTILES
                      ) -> Tuple[float, float]:
    """Lower/upper clipping values from the image's nonzero voxels; a constant image gets upper = lower + 1."""
    fg = image[image != 0]
    if fg.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(fg.astype(np.float64, copy=False), list(percentiles))
    lo, hi = float(lo), float(hi)
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


def normalize(image: np.ndarray, mask: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Clip to [lower, upper], map to [0, 1] inside ``mask``; 0 outside. Returns float32."""
    out = np.clip(image, lower, upper).astype(np.float32, copy=False)
    out -= np.float32(lower)
    out /= np.float32(upper - lower)
    np.clip(out, 0.0, 1.0, out=out)  # float rounding must not leave [0, 1]
    out[~mask] = 0
    return out


def denormalize(image: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Map a normalised image back to the scanner scale of a sequence (its stored bounds)."""
    return (np.float32(lower) + image.astype(np.float32) * np.float32(upper - lower)).astype(np.float32)


def normalization_properties(bounds: Dict[str, Tuple[float, float]]) -> Dict[str, Dict[str, float]]:
    return {k: {"lower": float(lo), "upper": float(hi)} for k, (lo, hi) in bounds.items()}
