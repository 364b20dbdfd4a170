"""Per-case, per-sequence intensity normalisation: the dataset's "normalised space".

Each available sequence of a case is clipped to ``[lower, upper]`` and mapped linearly to [0, 1] inside the
case's (union) nonzero mask; background stays 0. The two values are stored in the case properties, so
``x_raw = lower + x * (upper - lower)`` maps any sequence back to its scanner scale (exactly, for voxels that
were not clipped). ``lower`` is always the 0.5th percentile of the image's nonzero voxels; the plans'
``normalization.scheme`` says how ``upper`` is found:

- ``percentile_clip``: the 99.5th percentile of the same voxels.
- ``median_anchor`` (default of new plans): ``lower + r_s * (median - lower)``, with one ratio ``r_s`` per
  sequence from the dataset fingerprint (the largest ``(p99.5 - p0.5) / (median - p0.5)`` among the training
  cases, so no training image is clipped more than by its own 99.5th percentile). Why: the 99.5th percentile
  of a FLAIR or T2 with a lesion IS the lesion, so under ``percentile_clip`` normal tissue lands at a different
  normalised level in every case depending on the lesion's size (0.39 to 0.69 on the demo Flairs), which the
  network must then guess from a few slices. The median of a brain image is normal tissue, so anchoring on it
  keeps tissue levels consistent across cases and leaves lesions their real contrast. A sequence whose ratio is
  unusable (above ``MEDIAN_ANCHOR_MAX_RATIO``, e.g. images whose nonzero region is mostly noisy air, or a
  non-positive median spread) falls back to ``percentile_clip``; a single case with ``median <= lower`` does too.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np

from nnsynth.constants import FINGERPRINT_PERCENTILES
from nnsynth.exceptions import PlansError

logger = logging.getLogger(__name__)

SCHEMES = ("percentile_clip", "median_anchor")
#: a ratio (p99.5 - p0.5) / (median - p0.5) above this means the median is not tissue: use percentile_clip
MEDIAN_ANCHOR_MAX_RATIO = 20.0

#: the plans' description of the percentile scheme (also what plans without per-sequence ratios get)
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


def anchor_statistics(values: np.ndarray, percentiles: Sequence[float] = FINGERPRINT_PERCENTILES
                      ) -> Dict[str, float]:
    """p0.5, median and p99.5 of nonzero intensities (the fingerprint keeps these per case and sequence)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[v != 0]
    if v.size == 0:
        return {"lower": 0.0, "median": 0.0, "upper": 0.0}
    lo, med, hi = np.percentile(v, [percentiles[0], 50.0, percentiles[1]])
    return {"lower": float(lo), "median": float(med), "upper": float(hi)}


def anchor_ratio(stats: Mapping[str, float]) -> Optional[float]:
    """(upper - lower) / (median - lower) of one image's statistics; None when the median spread is not positive."""
    spread = float(stats["median"]) - float(stats["lower"])
    if not spread > 0:
        return None
    return (float(stats["upper"]) - float(stats["lower"])) / spread


def plan_normalization(case_stats: Iterable[Mapping[str, Mapping[str, float]]], sequences: Sequence[str]
                       ) -> Dict[str, Any]:
    """The ``median_anchor`` scheme from per-case statistics (``{sequence: anchor_statistics}`` per case).

    A sequence without usable ratios keeps ``percentile_clip`` (its entry in ``upper_ratio`` is null)."""
    ratios: Dict[str, list] = {s: [] for s in sequences}
    for case in case_stats:
        for s, st in case.items():
            r = anchor_ratio(st)
            if s in ratios and r is not None:
                ratios[s].append(r)
    upper_ratio: Dict[str, Optional[float]] = {}
    for s in sequences:
        r = max(ratios[s]) if ratios[s] else None
        if r is not None and not (1.0 <= r <= MEDIAN_ANCHOR_MAX_RATIO):
            logger.info("Normalisation of %s: p99.5 is %.1f x the median spread in some training case; the median is "
                        "not tissue there, so %s keeps per-image percentile clipping", s, r, s)
            r = None
        upper_ratio[s] = None if r is None else float(round(r, 6))
    return {"scheme": "median_anchor", "percentiles": list(FINGERPRINT_PERCENTILES), "range": [0.0, 1.0],
            "upper_ratio": upper_ratio}


def check_scheme(scheme: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The plans' ``normalization`` entry validated (None -> percentile_clip); PlansError says what to fix."""
    if scheme is None:
        return dict(NORMALIZATION_SCHEME)
    if not isinstance(scheme, Mapping) or scheme.get("scheme") not in SCHEMES:
        raise PlansError(f"The plans' 'normalization' entry must be a dict with 'scheme' one of {SCHEMES}, got "
                         f"{scheme!r}; re-run nnsynth_plan_and_preprocess")
    if scheme["scheme"] == "median_anchor":
        ratios = scheme.get("upper_ratio")
        if not isinstance(ratios, Mapping):
            raise PlansError("normalization.scheme 'median_anchor' needs 'upper_ratio': {sequence: ratio or null}")
        for s, r in ratios.items():
            if r is not None and not (isinstance(r, (int, float)) and 1.0 <= float(r) <= MEDIAN_ANCHOR_MAX_RATIO):
                raise PlansError(f"normalization.upper_ratio[{s!r}] must be null or a number in "
                                 f"[1, {MEDIAN_ANCHOR_MAX_RATIO}], got {r!r}")
    return dict(scheme)


def case_bounds(image: np.ndarray, sequence: str, scheme: Optional[Mapping[str, Any]] = None) -> Tuple[float, float]:
    """``(lower, upper)`` of one image of ``sequence`` under the plans' scheme (module docstring)."""
    scheme = check_scheme(scheme)
    ratio = (scheme.get("upper_ratio") or {}).get(sequence) if scheme["scheme"] == "median_anchor" else None
    if ratio is None:
        return percentile_bounds(image)
    st = anchor_statistics(image)
    spread = st["median"] - st["lower"]
    if not spread > 0:
        return percentile_bounds(image)
    return st["lower"], st["lower"] + float(ratio) * spread


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
