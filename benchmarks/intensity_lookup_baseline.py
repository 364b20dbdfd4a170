"""Voxelwise intensity-lookup baseline for synthesis: the bar a learned model has to clear.

Learned on the training cases (``imagesTr``): every source image is mapped to [0, 1] inside the case's
nonzero mask (``--normalization percentile_clip``: by its own 0.5/99.5 percentiles, the issue's original
baseline; ``median_anchor``: nnsynth's default scheme, ratios learned from the training cases, see
``nnsynth/preprocessing/normalization.py``), quantised into ``bins`` levels, and each cell of the joint
source quantisation (3 sources x 16 bins = 4096 cells) stores the mean normalised target intensity.
Cells never seen in training fall back to coarser grids (8, 4, 2 bins per source), then the global mean.
Applied to held-out cases (default ``imagesTs_truth``, which holds every sequence), scored per CONTRACT.md
section 5 with ``nnsynth.evaluation.metrics.compute_metrics``.

    python benchmarks/intensity_lookup_baseline.py RAW_DATASET_FOLDER [--sources T1 T1Gd T2] [--target Flair]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnsynth.dataset.io import read_image
from nnsynth.evaluation.metrics import compute_metrics
from nnsynth.preprocessing.normalization import (NORMALIZATION_SCHEME, anchor_statistics, case_bounds, normalize,
                                                 plan_normalization)

logger = logging.getLogger("nnsynth.benchmarks.lookup")
LEVELS = (16, 8, 4, 2)


def _channel_ids(folder: Path) -> Tuple[Dict[str, str], str]:
    spec = json.loads((folder / "dataset.json").read_text())
    return {name: f"{int(cid):04d}" for cid, name in spec["channel_names"].items()}, spec["file_ending"]


def load_cases(image_folder: Path, names: Sequence[str], ids: Dict[str, str], ending: str,
               scheme: Optional[Dict[str, object]] = None) -> Dict[str, List[np.ndarray]]:
    """{case: [normalised image per name]} for cases that have every requested sequence."""
    cases: Dict[str, List[np.ndarray]] = {}
    stems = sorted({p.name[: -len(ending) - 5] for p in image_folder.glob(f"*{ending}")})
    for case in stems:
        files = [image_folder / f"{case}_{ids[n]}{ending}" for n in names]
        if not all(f.is_file() for f in files):
            continue
        images = [read_image(f)[0].astype(np.float32) for f in files]
        mask = np.any([im != 0 for im in images], axis=0)
        out = []
        for name, im in zip(names, images):
            lo, hi = case_bounds(im[mask], name, scheme)
            out.append(normalize(im, mask, lo, hi))
        cases[case] = out
    return cases


METRICS = ("psnr", "ssim", "mae")


def score_predictions(truth: Path, predictions: Path, cases: Sequence[str], file_suffix: str
                      ) -> Tuple[List[Dict[str, object]], Dict[str, float]]:
    """Per-case CONTRACT.md section 5 metrics of ``predictions/{case}{file_suffix}`` against the truth, and their mean."""
    rows: List[Dict[str, object]] = []
    for case in cases:
        ref = read_image(truth / f"{case}{file_suffix}")[0]
        pred = read_image(predictions / f"{case}{file_suffix}")[0]
        m = compute_metrics(ref, pred, None, compute_lpips=False)
        rows.append({"case": case, **{k: float(m[k]) for k in METRICS}})
    return rows, _mean(rows)


def calibration_diagnostics(truth: Path, predictions: Path, cases: Sequence[str], file_suffix: str
                            ) -> Dict[str, float]:
    """Why a prediction scores what it scores under CONTRACT.md section 5, where each image is scaled by its OWN
    0.5/99.5 percentiles: the median brain intensity of truth and prediction after that scaling (if the
    prediction's brightest 0.5 % -- a lesion -- is too dim, its whole brain sits too high), and the PSNR the
    prediction would reach after the best affine intensity map onto the truth (least squares inside the mask),
    i.e. with its intensity scale fixed and its spatial errors left. Means over the cases."""
    from nnsynth.evaluation.metrics import normalize_pair
    rows = []
    for case in cases:
        ref = read_image(truth / f"{case}{file_suffix}")[0]
        pred = read_image(predictions / f"{case}{file_suffix}")[0]
        r, p, m = normalize_pair(ref, pred)
        m = np.asarray(m, bool)
        design = np.stack([p[m], np.ones(int(m.sum()))], 1)
        fit = design @ np.linalg.lstsq(design, r[m], rcond=None)[0]
        rows.append({"truth_median": float(np.median(r[m])), "prediction_median": float(np.median(p[m])),
                     "affine_psnr": float(10 * np.log10(1.0 / max(float(np.mean((fit - r[m]) ** 2)), 1e-12)))})
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def _mean(rows: Sequence[Dict[str, object]]) -> Dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in METRICS} if rows else {}


def _cells(sources: Sequence[np.ndarray], bins: int) -> np.ndarray:
    idx = np.zeros(sources[0].shape, np.int64)
    for s in sources:
        idx = idx * bins + np.clip((s * bins).astype(np.int64), 0, bins - 1)
    return idx


class IntensityLookup:
    """Mean target per joint source-intensity cell, with coarser fallbacks for empty cells."""

    def fit(self, pairs: Sequence[Tuple[Sequence[np.ndarray], np.ndarray, np.ndarray]]) -> "IntensityLookup":
        n = len(pairs[0][0])
        self.tables = []
        values = np.concatenate([t[m] for _, t, m in pairs])
        self.global_mean = float(values.mean())
        for bins in LEVELS:
            sums = np.zeros(bins ** n)
            counts = np.zeros(bins ** n)
            for srcs, tgt, m in pairs:
                cells = _cells([s[m] for s in srcs], bins)
                sums += np.bincount(cells, tgt[m], minlength=bins ** n)
                counts += np.bincount(cells, minlength=bins ** n)
            with np.errstate(invalid="ignore", divide="ignore"):
                self.tables.append((bins, np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)))
        return self

    def predict(self, sources: Sequence[np.ndarray], mask: np.ndarray) -> np.ndarray:
        out = np.zeros(mask.shape, np.float32)
        pred = np.full(int(mask.sum()), np.nan)
        for bins, table in self.tables:
            todo = np.isnan(pred)
            if not todo.any():
                break
            pred[todo] = table[_cells([s[mask] for s in sources], bins)][todo]
        pred[np.isnan(pred)] = self.global_mean
        out[mask] = pred
        return out


def learn_scheme(folder: Path, names: Sequence[str], ids: Dict[str, str], ending: str,
                 normalization: str) -> Dict[str, object]:
    """The normalisation scheme: per-image percentiles, or median_anchor with ratios from ``folder``'s images."""
    if normalization == "percentile_clip":
        return dict(NORMALIZATION_SCHEME)
    stats = []
    for case_file in sorted(folder.glob(f"*{ending}")):
        name = next((n for n in names if case_file.name.endswith(f"_{ids[n]}{ending}")), None)
        if name is not None:
            stats.append({name: anchor_statistics(read_image(case_file)[0])})
    return plan_normalization(stats, names)


def run(raw: Path, sources: Sequence[str], target: str, test_folder: Optional[str] = None,
        normalization: str = "percentile_clip") -> Dict[str, object]:
    ids, ending = _channel_ids(raw)
    names = list(sources) + [target]
    scheme = learn_scheme(raw / "imagesTr", names, ids, ending, normalization)
    train = load_cases(raw / "imagesTr", names, ids, ending, scheme)
    if not train:
        raise SystemExit(f"No training case in {raw / 'imagesTr'} has all of {names}")
    pairs = []
    for imgs in train.values():
        mask = np.any([im != 0 for im in imgs[:-1]], axis=0) & (imgs[-1] != 0)
        pairs.append((imgs[:-1], imgs[-1], mask))
    model = IntensityLookup().fit(pairs)
    folder = raw / (test_folder or ("imagesTs_truth" if (raw / "imagesTs_truth").is_dir() else "imagesTs"))
    test = load_cases(folder, names, ids, ending, scheme)
    per_case = []
    for case, imgs in sorted(test.items()):
        mask = np.any([im != 0 for im in imgs[:-1]], axis=0)
        pred = model.predict(imgs[:-1], mask)
        ref = read_image(folder / f"{case}_{ids[target]}{ending}")[0].astype(np.float32)
        m = compute_metrics(ref, pred, None, compute_lpips=False)
        per_case.append({"case": case, **{k: float(m[k]) for k in METRICS}})
    mean = _mean(per_case)
    return {"method": "intensity lookup (16 bins per source)", "normalization": normalization,
            "sources": list(sources), "target": target,
            "train_cases": len(train), "test_folder": folder.name, "mean": mean, "per_case": per_case}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("raw_dataset", type=Path)
    p.add_argument("--sources", nargs="+", default=["T1", "T1Gd", "T2"])
    p.add_argument("--target", default="Flair")
    p.add_argument("--test-folder", default=None, help="default: imagesTs_truth if present, else imagesTs")
    p.add_argument("--normalization", choices=("percentile_clip", "median_anchor"), default="percentile_clip")
    p.add_argument("-o", "--output", type=Path, default=None, help="write the result JSON here")
    a = p.parse_args(argv)
    result = run(a.raw_dataset, a.sources, a.target, a.test_folder, a.normalization)
    text = json.dumps(result, indent=2)
    if a.output:
        a.output.write_text(text + "\n")
    sys.stdout.write(json.dumps({"baseline_mean": result["mean"], "test_cases": len(result["per_case"])}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
