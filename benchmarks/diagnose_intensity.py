"""Where does a synthesis lose intensity? Tails, tissue classes and the metric's own-percentile scaling.

CONTRACT.md section 5 maps truth and prediction each by its OWN 0.5th and 99.5th percentiles. A prediction whose
brightest 0.5 % (on a FLAIR with a lesion: the oedema) is too dim, or whose darkest 0.5 % (nulled CSF) is not dark
enough, is stretched differently from the truth, and every voxel of it pays, however well normal tissue was
synthesised. This puts each prediction on the truth's scale with the least-squares affine map fitted on normal
tissue (label 0 inside the mask; the whole mask without labels) and reports, per image:

- ``psnr``: the CONTRACT.md score; ``affine_psnr``: after the best affine map on the whole mask (the score with the
  intensity scale fixed and the spatial errors left);
- ``low_tail`` / ``high_tail``: the prediction's own 0.5th / 99.5th percentile on the truth's [0, 1] scale (ideal
  0 and 1: above 0 means its darkest voxels are too bright, below 1 that its brightest are too dim);
- per label (and per label eroded by 2 voxels, ``core``): mean truth and mean prediction on that scale and their
  ratio (``ratio`` 1: the class has its true brightness relative to normal tissue).

    python benchmarks/diagnose_intensity.py --truth RAW/imagesTs_truth --labels RAW/labelsTs PRED_DIR [PRED_DIR ...]
        [--json out.json]

Files are matched by name (``CASE_XXXX.nii.gz`` in the truth and prediction folders, ``CASE.nii.gz`` labels).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy import ndimage

from nnsynth.constants import SUPPORTED_FILE_ENDINGS
from nnsynth.dataset.io import read_image
from nnsynth.evaluation.metrics import normalize_pair, psnr
from nnsynth.utils.files import save_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score_prediction_average import common_names  # noqa: E402

logger = logging.getLogger("nnsynth.benchmarks.diagnose")
CORE_EROSION_VOXELS = 2     # a class's core: away from its partial-volume border


def _ending(name: str) -> str:
    return next(e for e in SUPPORTED_FILE_ENDINGS if name.endswith(e))


def _label_file(labels: Path, image_name: str) -> Path:
    """``CASE_XXXX.nii.gz`` -> ``labels/CASE.nii.gz`` (nnU-Net naming)."""
    ending = _ending(image_name)
    return labels / f"{image_name[: -len(ending)].rsplit('_', 1)[0]}{ending}"


def diagnose(ref: np.ndarray, pred: np.ndarray, label: Optional[np.ndarray] = None) -> Dict[str, object]:
    """The numbers of the module docstring for one image pair (``label`` optional, same shape, 0 = normal)."""
    ref01, pred01, mask = normalize_pair(ref, pred)
    mask = np.asarray(mask, bool)
    p = np.asarray(pred, np.float64)
    normal = mask & (label == 0) if label is not None else mask
    if normal.sum() < 2:
        normal = mask
    design = np.stack([p[normal], np.ones(int(normal.sum()))], 1)
    gain, offset = np.linalg.lstsq(design, ref01[normal], rcond=None)[0]
    on_truth = gain * p + offset                        # the prediction on the truth's [0, 1] scale
    lo, hi = np.percentile(p[mask], [0.5, 99.5])
    full = np.stack([p[mask], np.ones(int(mask.sum()))], 1)
    fit = full @ np.linalg.lstsq(full, ref01[mask], rcond=None)[0]
    affine = np.zeros_like(ref01)
    affine[mask] = fit
    out: Dict[str, object] = {"psnr": psnr(ref01, pred01, mask),            # CONTRACT.md section 5's PSNR
                              "affine_psnr": psnr(ref01, affine, mask),
                              "low_tail": float(gain * lo + offset), "high_tail": float(gain * hi + offset),
                              "classes": {}}
    if label is not None:
        for value in sorted(int(v) for v in np.unique(label[mask])):
            region = mask & (label == value)
            parts = [(str(value), region)]
            if value != 0:          # normal tissue has no core worth reporting
                parts.append((f"{value} core", ndimage.binary_erosion(region, iterations=CORE_EROSION_VOXELS) & mask))
            for key, sel in parts:
                if not sel.any():
                    continue
                t, q = float(ref01[sel].mean()), float(on_truth[sel].mean())
                out["classes"][key] = {"voxels": int(sel.sum()), "truth": t, "prediction": q,
                                       "ratio": q / t if t > 0 else float("nan")}
    return out


def run(truth: Path, folders: Sequence[Path], labels: Optional[Path] = None) -> Dict[str, object]:
    """Per folder and image: ``diagnose``; plus each folder's mean of the scalar numbers and of the class ratios."""
    names = common_names(truth, folders)
    if not names:
        raise SystemExit(f"No image name is present in all of {', '.join(map(str, folders))} and in {truth}")
    result: Dict[str, object] = {"truth": str(truth), "labels": str(labels) if labels else None, "folders": {}}
    for folder in folders:
        rows: List[Dict[str, object]] = []
        for name in names:
            ref = read_image(truth / name)[0]
            pred = read_image(folder / name)[0]
            lab = None
            if labels is not None and _label_file(labels, name).is_file():
                lab = np.asarray(read_image(_label_file(labels, name))[0]).astype(np.int64)
            rows.append({"image": name, **diagnose(ref, pred, lab)})
        mean = {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "affine_psnr", "low_tail", "high_tail")}
        ratios: Dict[str, List[float]] = {}
        for r in rows:
            for key, c in r["classes"].items():
                ratios.setdefault(key, []).append(c["ratio"])
        mean["class_ratio"] = {k: float(np.nanmean(v)) for k, v in sorted(ratios.items())}
        result["folders"][str(folder)] = {"per_image": rows, "mean": mean}
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="prediction folders")
    p.add_argument("--truth", type=Path, required=True, help="folder with the reference images, same file names")
    p.add_argument("--labels", type=Path, default=None, help="label maps (CASE.nii.gz) for the per-class numbers")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for f in [a.truth, *a.folders] + ([a.labels] if a.labels else []):
        if not f.is_dir():
            raise SystemExit(f"{f} is not a folder")
    res = run(a.truth, a.folders, a.labels)
    for folder, entry in res["folders"].items():
        logger.info("%s", folder)
        for r in entry["per_image"]:
            classes = "  ".join(f"{k}: {c['ratio']:.2f}" for k, c in r["classes"].items() if k != "0")
            logger.info("  %-28s PSNR %.2f  affine %.2f  tails %.3f / %.3f  %s", r["image"], r["psnr"],
                        r["affine_psnr"], r["low_tail"], r["high_tail"], classes)
        m = entry["mean"]
        logger.info("  %-28s PSNR %.2f  affine %.2f  tails %.3f / %.3f  %s", "mean", m["psnr"], m["affine_psnr"],
                    m["low_tail"], m["high_tail"],
                    "  ".join(f"{k}: {v:.2f}" for k, v in m["class_ratio"].items() if k != "0"))
    if a.json is not None:
        save_json(res, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
