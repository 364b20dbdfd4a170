"""Quantile calibration: where a model puts the bulk of its intensities between its own darkest and brightest
voxels, corrected with what its own validation cases show.

Why: a synthesis network trained with L1 predicts a conditional median. It cannot predict the target's noise and
hedges on intensities it is unsure of, so its darkest and brightest voxels are less extreme than the truth's.
Images are compared after each is mapped by its OWN 0.5th / 99.5th percentiles (CONTRACT.md section 5, and any
reader who windows an image by its range); compressed tails then put the whole bulk of the prediction at the
wrong place of that range, even where every tissue was synthesised at the right relative brightness.

How: a monotone intensity map of the prediction that keeps its 0.5th and 99.5th percentiles where they are and
moves its quantiles in between (knots at ``CALIBRATION_PERCENTILES`` of the image itself, piecewise linear
between them). On the image's own percentile scale the map is linear in the knots' offsets, so the offsets that
minimise the squared error against the truth (each image on its own scale, as the metric compares them) over all
full-volume validation predictions of a target are one small least-squares problem (``CalibrationCollector``).
Training writes them to the fold folder as ``calibration.json``; prediction applies them (``apply_calibration``).
``nnsynth_predict --no-calibration`` switches it off; a model without ``calibration.json`` (trained before it
existed) predicts as before.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from nnsynth.exceptions import NnsynthError
from nnsynth.utils.files import load_json, save_json

logger = logging.getLogger(__name__)

# --- module constants ---------------------------------------------------------------------------------------
CALIBRATION_FILE = "calibration.json"
#: the map's knots, as percentiles of the image itself; the first and last are the fixed anchors
CALIBRATION_PERCENTILES = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 98.0,
                           99.0, 99.5)
#: ridge weight of the least-squares fit, relative to the mean diagonal of its normal matrix: offsets that the
#: data do not determine stay near 0 (no change)
CALIBRATION_RIDGE = 1e-3
#: voxels per image that enter the fit (a fixed random subsample; the fit has 15 unknowns)
CALIBRATION_VOXELS_PER_IMAGE = 200_000
# -------------------------------------------------------------------------------------------------------------


def _knots(values: np.ndarray) -> Optional[Tuple[np.ndarray, float, float]]:
    """The image's knots (quantiles at ``CALIBRATION_PERCENTILES``) and its anchors (first and last knot);
    None when the image is flat between the anchors."""
    q = np.percentile(values, CALIBRATION_PERCENTILES)
    lo, hi = float(q[0]), float(q[-1])
    if not hi > lo:
        return None
    return q, lo, hi


def _increasing(knots: np.ndarray) -> np.ndarray:
    """The knots with ties broken (np.interp needs increasing x); a plateau of the image keeps one value."""
    span = max(float(knots[-1] - knots[0]), 1e-12)
    return knots + np.arange(len(knots)) * 1e-9 * span


def _basis(x: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """(N, K) hat functions of the piecewise-linear map at ``knots``: the map is ``_basis(x, knots) @ values``."""
    k, eye = _increasing(knots), np.eye(len(knots))
    return np.stack([np.interp(x, k, eye[i]) for i in range(len(k))], axis=1)


class CalibrationCollector:
    """Accumulates the least-squares problem per target over validation predictions; ``result`` solves it."""

    def __init__(self, seed: int = 0) -> None:
        self._normal: Dict[str, List[Any]] = {}     # target -> [A (K x K), b (K), images]
        self._rng = np.random.default_rng(seed)

    def add(self, target: str, prediction: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> None:
        """One validation image: both inside ``mask``, each on its own percentile scale."""
        mask = np.asarray(mask, bool)
        pred = np.asarray(prediction, np.float64)[mask]
        ref = np.asarray(truth, np.float64)[mask]
        if pred.size == 0:
            return
        knots, truth_anchors = _knots(pred), _knots(ref)
        if knots is None or truth_anchors is None:
            return
        if pred.size > CALIBRATION_VOXELS_PER_IMAGE:
            pick = self._rng.choice(pred.size, CALIBRATION_VOXELS_PER_IMAGE, replace=False)
            pred, ref = pred[pick], ref[pick]
        q, lo, hi = knots
        _, tlo, thi = truth_anchors
        p01 = (pred - lo) / (hi - lo)
        t01 = np.clip((ref - tlo) / (thi - tlo), 0.0, 1.0)
        inside = (p01 >= 0) & (p01 <= 1)            # outside the anchors the metric clips: no say in the fit
        phi = _basis(p01[inside], (q - lo) / (hi - lo))
        residual = t01[inside] - p01[inside]
        entry = self._normal.setdefault(target, [np.zeros((len(q), len(q))), np.zeros(len(q)), 0])
        entry[0] += phi.T @ phi
        entry[1] += phi.T @ residual
        entry[2] += 1

    def offsets(self, target: str) -> Optional[np.ndarray]:
        """Least-squares offsets of every knot on the image's own scale (anchors 0); None without images."""
        if target not in self._normal:
            return None
        a, b, _ = self._normal[target]
        free = slice(1, len(b) - 1)
        a_free = a[free, free]
        ridge = CALIBRATION_RIDGE * max(float(np.trace(a_free)) / a_free.shape[0], 1e-12)
        out = np.zeros(len(b))
        out[free] = np.linalg.solve(a_free + ridge * np.eye(a_free.shape[0]), b[free])
        return out

    def result(self, source: str) -> Dict[str, Any]:
        """The ``calibration.json`` content: per target, the offsets and how many images gave them."""
        per_target = {}
        for target in sorted(self._normal):
            per_target[target] = {"offsets": [float(v) for v in self.offsets(target)],
                                  "images": int(self._normal[target][2])}
        return {"percentiles": list(CALIBRATION_PERCENTILES), "source": source, "per_target": per_target}


def save_calibration(content: Mapping[str, Any], fold_folder: Path) -> Path:
    path = Path(fold_folder) / CALIBRATION_FILE
    save_json(dict(content), path)
    return path


def load_offsets(fold_folders: Sequence[Path]) -> Dict[str, np.ndarray]:
    """Per-target offsets averaged over the folds; {} when a fold has no calibration. A target is calibrated
    only when every fold has offsets for it."""
    found: List[Dict[str, np.ndarray]] = []
    for folder in fold_folders:
        path = Path(folder) / CALIBRATION_FILE
        if not path.is_file():
            return {}
        content = load_json(path)
        if [float(p) for p in content.get("percentiles", [])] != list(CALIBRATION_PERCENTILES):
            raise NnsynthError(f"{path} was written with other percentiles than this version of nnsynth uses; "
                               f"re-create it with nnsynth_train ... --val-only, or predict with --no-calibration")
        found.append({t: np.asarray(v["offsets"], np.float64) for t, v in content.get("per_target", {}).items()})
    common = set.intersection(*(set(f) for f in found)) if found else set()
    return {t: np.mean([f[t] for f in found], axis=0) for t in sorted(common)}


def apply_calibration(image: np.ndarray, mask: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Move the image's knots inside ``mask`` by ``offsets`` (on its own anchor scale): a monotone piecewise-linear
    map, shifted by the end offsets beyond the anchors. Voxels outside the mask are returned unchanged."""
    offsets = np.asarray(offsets, np.float64)
    if offsets.shape != (len(CALIBRATION_PERCENTILES),):
        raise NnsynthError(f"Calibration offsets need {len(CALIBRATION_PERCENTILES)} values, got {offsets.shape}")
    mask = np.asarray(mask, bool)
    out = np.array(image, dtype=np.float32, copy=True)
    values = out[mask].astype(np.float64)
    knots = _knots(values) if values.size else None
    if knots is None:
        return out
    q, lo, hi = knots
    # monotone (the voxels' order is kept) and inside the anchors, which stay where they are
    moved = np.maximum.accumulate(np.clip(q + offsets * (hi - lo), lo, hi))
    mapped = np.interp(values, _increasing(q), moved)          # = _basis(values, q) @ moved, in O(N) memory
    below, above = values < q[0], values > q[-1]
    mapped[below] = values[below] + (moved[0] - q[0])
    mapped[above] = values[above] + (moved[-1] - q[-1])
    out[mask] = mapped.astype(np.float32)
    return out
