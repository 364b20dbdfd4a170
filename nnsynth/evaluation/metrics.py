"""Image metrics, CONTRACT.md section 5 (binding), plus the papers' own conventions as named profiles.

Default profile ``'contract'``:
- reference and prediction are each mapped to [0, 1] inside the reference's nonzero mask by their OWN 0.5th and
  99.5th percentiles (computed inside the mask), clipped; voxels outside the mask are set to 0 in both;
- PSNR with data range 1, the MSE taken INSIDE the mask;
- SSIM 3D: ``skimage.metrics.structural_similarity`` (its defaults, data_range 1) over the mask's bounding box
  (2D images: 2D SSIM over the bounding box);
- MAE inside the mask;
- LPIPS slice-wise over the axial slices (first array axis, z) of the bounding box that hold mask voxels, mean x100,
  AlexNet backbone when its weights exist locally, else None.

Profiles ``'seq2seq'`` and ``'codebrain'`` reproduce how those papers computed their tables (see
``reference/methods.md``); ``register_profile`` lets later commands add more (e.g. BraSyn).
Arrays are numpy in array order ((z, y, x) or (y, x)).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from nnsynth.exceptions import NnsynthError

logger = logging.getLogger(__name__)

# --- module constants (listed in the hand-over; candidates for nnsynth/constants.py) ---------------
METRIC_PERCENTILES = (0.5, 99.5)     # CONTRACT.md section 5
LPIPS_SCALE = 100.0                  # LPIPS reported x100 as in the papers
SEQ2SEQ_PROFILE_PERCENTILE = 99.0    # Seq2Seq papers: clip to [0, 2 * P99] -> [-1, 1]
CODEBRAIN_MAE_SCALE = 1000.0
# -----------------------------------------------------------------------------------------------------

ProfileFn = Callable[..., Dict[str, Optional[float]]]
_PROFILES: Dict[str, ProfileFn] = {}
_DEFAULT_LPIPS: Dict[str, Any] = {}


def _as_float(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _check_pair(ref: np.ndarray, pred: np.ndarray, mask: Optional[np.ndarray]) -> np.ndarray:
    if ref.shape != pred.shape:
        raise NnsynthError(f"Reference and prediction differ in shape: {ref.shape} vs {pred.shape}")
    if ref.ndim not in (2, 3):
        raise NnsynthError(f"Metrics expect 2D or 3D images, got shape {ref.shape}")
    if mask is None:
        mask = ref != 0
    mask = np.asarray(mask).astype(bool)
    if mask.shape != ref.shape:
        raise NnsynthError(f"Mask shape {mask.shape} differs from the image shape {ref.shape}")
    if not mask.any():
        raise NnsynthError("The reference has no nonzero voxels (empty mask): metrics are undefined")
    return mask


def _percentile_map(x: np.ndarray, mask: np.ndarray, lo_hi: Tuple[float, float] = METRIC_PERCENTILES) -> np.ndarray:
    lo, hi = np.percentile(x[mask], lo_hi)
    out = np.clip((x - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    out[~mask] = 0.0
    return out


def normalize_pair(ref: np.ndarray, pred: np.ndarray,
                   mask: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ref01, pred01, mask): each image mapped to [0, 1] by its own P0.5/P99.5 inside the reference's nonzero
    mask (or the given mask), clipped, 0 outside the mask."""
    ref, pred = _as_float(ref), _as_float(pred)
    mask = _check_pair(ref, pred, mask)
    return _percentile_map(ref, mask), _percentile_map(pred, mask), mask


def bounding_box(mask: np.ndarray) -> Tuple[slice, ...]:
    """Tight bounding box of a nonzero mask as slices."""
    coords = np.nonzero(mask)
    return tuple(slice(int(c.min()), int(c.max()) + 1) for c in coords)


def psnr(ref01: np.ndarray, pred01: np.ndarray, mask: Optional[np.ndarray] = None, data_range: float = 1.0) -> float:
    """PSNR = 10 log10(data_range^2 / MSE), MSE inside the mask (whole array without one); inf if identical."""
    ref01, pred01 = _as_float(ref01), _as_float(pred01)
    diff = (ref01 - pred01) if mask is None else (ref01 - pred01)[np.asarray(mask, bool)]
    mse = float(np.mean(diff ** 2))
    return float("inf") if mse == 0 else float(10.0 * math.log10(data_range ** 2 / mse))


def mae(ref01: np.ndarray, pred01: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Mean absolute error inside the mask (whole array without one)."""
    diff = np.abs(_as_float(ref01) - _as_float(pred01))
    return float(diff.mean() if mask is None else diff[np.asarray(mask, bool)].mean())


def ssim(ref01: np.ndarray, pred01: np.ndarray, mask: Optional[np.ndarray] = None, data_range: float = 1.0) -> float:
    """skimage structural_similarity (default 7-voxel uniform window) over the mask's bounding box.

    Singleton axes are dropped; the window shrinks to the smallest axis (odd) when the box is thinner than 7;
    a box thinner than 3 voxels gives NaN."""
    from skimage.metrics import structural_similarity

    ref01, pred01 = _as_float(ref01), _as_float(pred01)
    if mask is not None:
        box = bounding_box(np.asarray(mask, bool))
        ref01, pred01 = ref01[box], pred01[box]
    ref01, pred01 = np.squeeze(ref01), np.squeeze(pred01)
    smallest = min(ref01.shape) if ref01.ndim else 0
    win = min(7, smallest if smallest % 2 == 1 else smallest - 1)
    if ref01.ndim < 2 or win < 3:
        logger.warning("SSIM undefined for a bounding box of shape %s (thinner than 3 voxels)", ref01.shape)
        return float("nan")
    return float(structural_similarity(ref01, pred01, data_range=data_range, win_size=win))


def get_default_lpips_model():
    """A cached LPIPS (AlexNet) model when its weights exist locally, else None (logged once)."""
    if "alex" not in _DEFAULT_LPIPS:
        from nnsynth.losses.perceptual import PerceptualLoss

        model = PerceptualLoss("alex")
        _DEFAULT_LPIPS["alex"] = model if model.available else None
    return _DEFAULT_LPIPS["alex"]


def _lpips_per_slice(ref01: np.ndarray, pred01: np.ndarray, lpips_model, slice_mask: Optional[np.ndarray],
                     batch: int = 16) -> Optional[np.ndarray]:
    import torch

    if lpips_model is None or not getattr(lpips_model, "available", True):
        return None
    ref3 = ref01[None] if ref01.ndim == 2 else ref01
    pred3 = pred01[None] if pred01.ndim == 2 else pred01
    keep = np.arange(ref3.shape[0]) if slice_mask is None else np.nonzero(slice_mask)[0]
    if keep.size == 0:
        return None
    device = next(lpips_model.parameters()).device
    values = []
    with torch.no_grad():
        for start in range(0, keep.size, batch):
            idx = keep[start:start + batch]
            a = torch.as_tensor(ref3[idx], dtype=torch.float32, device=device)[:, None]
            b = torch.as_tensor(pred3[idx], dtype=torch.float32, device=device)[:, None]
            values.append(lpips_model.per_slice(b, a).double().cpu().numpy())
    return np.concatenate(values)


def lpips_score(ref01: np.ndarray, pred01: np.ndarray, mask: Optional[np.ndarray] = None, lpips_model=None,
                reduction: str = "mean") -> Optional[float]:
    """LPIPS over axial slices (first axis of 3D arrays) of [0, 1] images, x100; None without a model.

    With a mask: slices of its bounding box that hold mask voxels. ``reduction='sum'`` sums (Seq2Seq papers)."""
    ref01, pred01 = _as_float(ref01), _as_float(pred01)
    slice_mask = None
    if mask is not None:
        mask = np.asarray(mask, bool)
        box = bounding_box(mask)
        ref01, pred01, mask = ref01[box], pred01[box], mask[box]
        slice_mask = mask.reshape(mask.shape[0], -1).any(1) if mask.ndim == 3 else None
    values = _lpips_per_slice(ref01, pred01, lpips_model, slice_mask)
    if values is None:
        return None
    return float((values.sum() if reduction == "sum" else values.mean() * LPIPS_SCALE))


# --- profiles ---------------------------------------------------------------------------------------
def register_profile(name: str, fn: ProfileFn) -> None:
    """Add a metric profile ``fn(ref, pred, mask=None, lpips_model=None) -> dict``."""
    _PROFILES[name] = fn


def available_profiles() -> Tuple[str, ...]:
    return tuple(_PROFILES)


def _contract_profile(ref, pred, mask=None, lpips_model=None) -> Dict[str, Optional[float]]:
    r, p, m = normalize_pair(ref, pred, mask)
    return {"psnr": psnr(r, p, m), "ssim": ssim(r, p, m), "mae": mae(r, p, m),
            "lpips": lpips_score(r, p, m, lpips_model)}


def _seq2seq_profile(ref, pred, mask=None, lpips_model=None) -> Dict[str, Optional[float]]:
    """Seq2Seq/VQ/TSF papers: each volume clipped to [0, 2 P99] -> [-1, 1] (P99 of its nonzero voxels),
    skimage PSNR/SSIM with data_range 2 on the whole array, LPIPS summed over axial slices (not x100).
    The papers' dataset-specific crop (central 128 slices, 192^2) is left to the caller."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ref, pred = _as_float(ref), _as_float(pred)
    _check_pair(ref, pred, None if mask is None else mask)

    def scale(x: np.ndarray) -> np.ndarray:
        nz = x[x != 0]
        top = 2.0 * (np.percentile(nz, SEQ2SEQ_PROFILE_PERCENTILE) if nz.size else 1.0)
        return np.clip(x, 0.0, max(top, 1e-12)) / max(top, 1e-12) * 2.0 - 1.0

    r, p = scale(ref), scale(pred)
    out: Dict[str, Optional[float]] = {
        "psnr": float(peak_signal_noise_ratio(r, p, data_range=2.0)),
        "ssim": float(structural_similarity(r, p, data_range=2.0)),
        "mae": float(np.abs(r - p).mean()),
        "lpips": None,
    }
    if lpips_model is not None:
        values = _lpips_per_slice((r + 1) / 2, (p + 1) / 2, lpips_model, None)
        out["lpips"] = None if values is None else float(values.sum())
    return out


def _codebrain_profile(ref, pred, mask=None, lpips_model=None) -> Dict[str, Optional[float]]:
    """CodeBrain: every axial slice holding reference signal min-max scaled to [0, 1] on its own; PSNR (data
    range 1) over all those slices together, SSIM (Gaussian 11, sigma 1.5) averaged over slices, MAE x1000."""
    import torch

    from nnsynth.losses.ssim import ssim as torch_ssim

    ref, pred = _as_float(ref), _as_float(pred)
    m = _check_pair(ref, pred, mask)
    ref3, pred3, m3 = (ref[None], pred[None], m[None]) if ref.ndim == 2 else (ref, pred, m)
    keep = m3.reshape(m3.shape[0], -1).any(1)
    ref3, pred3 = ref3[keep], pred3[keep]

    def per_slice01(x: np.ndarray) -> np.ndarray:
        lo = x.reshape(x.shape[0], -1).min(1)[:, None, None]
        hi = x.reshape(x.shape[0], -1).max(1)[:, None, None]
        return (x - lo) / np.maximum(hi - lo, 1e-12)

    r, p = per_slice01(ref3), per_slice01(pred3)
    s = torch_ssim(torch.as_tensor(p)[:, None], torch.as_tensor(r)[:, None], data_range=1.0, reduction="none")
    out: Dict[str, Optional[float]] = {
        "psnr": psnr(r, p), "ssim": float(s.mean()), "mae": mae(r, p) * CODEBRAIN_MAE_SCALE, "lpips": None,
    }
    if lpips_model is not None:
        values = _lpips_per_slice(r, p, lpips_model, None)
        out["lpips"] = None if values is None else float(values.mean() * LPIPS_SCALE)
    return out


register_profile("contract", _contract_profile)
register_profile("seq2seq", _seq2seq_profile)
register_profile("codebrain", _codebrain_profile)


def compute_metrics(ref: np.ndarray, pred: np.ndarray, mask: Optional[np.ndarray] = None, lpips_model=None,
                    profile: str = "contract", compute_lpips: bool = True) -> Dict[str, Optional[float]]:
    """{'psnr', 'ssim', 'mae', 'lpips'} for one image pair under ``profile`` (default: CONTRACT.md section 5).

    ``lpips_model=None`` uses the local AlexNet LPIPS when its weights exist (else 'lpips' is None);
    ``compute_lpips=False`` skips LPIPS (fast validation during training)."""
    if profile not in _PROFILES:
        raise NnsynthError(f"Unknown metric profile {profile!r}; available: {', '.join(_PROFILES)}")
    if compute_lpips and lpips_model is None:
        lpips_model = get_default_lpips_model()
    if not compute_lpips:
        lpips_model = None
    return _PROFILES[profile](ref, pred, mask=mask, lpips_model=lpips_model)


__all__ = ["normalize_pair", "psnr", "ssim", "mae", "lpips_score", "compute_metrics", "bounding_box",
           "register_profile", "available_profiles", "get_default_lpips_model"]
