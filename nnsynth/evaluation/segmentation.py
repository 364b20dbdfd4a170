"""Segmentation metrics and ``nnsynth_evaluate --seg``: Dice and ASSD of tumour regions per case.

Regions come from dataset.json ``labels``. With the BraTS names (``NCR`` or ``NET``, ``ED``, ``ET``) they are
the BraTS regions: ET (enhancing tumour), TC = NCR + ET (tumour core), WT = every non-background label (whole
tumour). Other label sets give one region per label plus ``WT`` (all foreground).

- Dice = 2 |P & R| / (|P| + |R|); a region empty in both prediction and reference counts as 1.
- ASSD (average symmetric surface distance, in mm using the voxel spacing) = (sum over the prediction's surface
  voxels of the distance to the reference surface + the same the other way) / (number of surface voxels of
  both). A surface voxel is a voxel of the region with a face neighbour outside it (the image border counts as
  outside). Both empty: 0; exactly one empty: undefined (NaN in the CSV, counted in the summary, left out of
  the mean).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from nnsynth.constants import SUPPORTED_FILE_ENDINGS
from nnsynth.exceptions import NnsynthError
from nnsynth.utils.files import atomic_path, load_json, save_json
from nnsynth.utils.log import progress_disabled

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

# --- constants of this module ------------------------------------------------------------------------------
SEG_METRICS = ("dice", "assd")
SEG_DEFAULT_CSV = "segmentation_metrics.csv"
SEG_SUMMARY_JSON = "segmentation_summary.json"
#: record written by ``nnsynth_predict --segment`` next to its label maps
SEGMENTATION_RECORD = "nnsynth_segmentations.json"
BRATS_CORE_NAMES = ("NCR", "NET", "NCR/NET", "NCR_NET")
BRATS_DEFAULT_LABELS = {"background": 0, "NCR": 1, "ED": 2, "ET": 3}
# ---------------------------------------------------------------------------------------------------------------


def class_lut(values: Sequence[int]) -> np.ndarray:
    """Label value -> class index for the sorted label ``values`` (class i is ``values[i]``); values in between
    that dataset.json does not declare map to class 0, the background. Index it with values clipped to its
    length."""
    lut = np.zeros(max(values) + 1, np.int64)
    for i, v in enumerate(values):
        lut[v] = i
    return lut


def label_values(labels: Mapping[str, Any]) -> Dict[str, int]:
    """dataset.json ``labels`` -> {name: int value}; region-style (list) values are refused with a reason."""
    out: Dict[str, int] = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)) or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or int(value) != value:
            raise NnsynthError(f"dataset.json labels: {name!r} has value {value!r}; segmentation needs one integer "
                               f"value per label (nnU-Net region lists are not supported)")
        out[str(name)] = int(value)
    if 0 not in out.values():
        raise NnsynthError("dataset.json labels must include the background with value 0, e.g. "
                           '{"background": 0, "NCR": 1, "ED": 2, "ET": 3}')
    return out


def tumour_regions(labels: Mapping[str, Any]) -> Dict[str, List[int]]:
    """Evaluation regions {name: [label values]}: ET, TC, WT for BraTS labels, else one per label plus WT."""
    values = label_values(labels)
    fg = {n: v for n, v in values.items() if v != 0}
    if not fg:
        raise NnsynthError("dataset.json labels hold no foreground label; nothing to segment")
    upper = {n.upper(): v for n, v in fg.items()}
    regions: Dict[str, List[int]] = {}
    if "ET" in upper:
        regions["ET"] = [upper["ET"]]
        core = [upper[n] for n in BRATS_CORE_NAMES if n in upper]
        regions["TC"] = sorted(set(core + [upper["ET"]]))
    else:
        for n, v in sorted(fg.items(), key=lambda item: item[1]):
            regions[n] = [v]
    regions["WT"] = sorted(fg.values())
    return regions


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """2 |P & R| / (|P| + |R|) of two boolean masks; 1.0 when both are empty."""
    p, r = np.asarray(prediction, bool), np.asarray(reference, bool)
    total = int(p.sum()) + int(r.sum())
    if total == 0:
        return 1.0
    return 2.0 * float(np.logical_and(p, r).sum()) / float(total)


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (the image border counts as outside)."""
    from scipy import ndimage
    m = np.asarray(mask, bool)
    if not m.any():
        return m
    eroded = ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(m.ndim, 1), border_value=0)
    return m & ~eroded


def assd(prediction: np.ndarray, reference: np.ndarray, spacing: Optional[Sequence[float]] = None) -> float:
    """Average symmetric surface distance in the units of ``spacing`` (array order; default 1 per voxel).

    0 when both masks are empty, NaN when exactly one is."""
    from scipy import ndimage
    p, r = np.asarray(prediction, bool), np.asarray(reference, bool)
    if p.shape != r.shape:
        raise ValueError(f"prediction {p.shape} and reference {r.shape} differ in shape")
    if not p.any() and not r.any():
        return 0.0
    if not p.any() or not r.any():
        return float("nan")
    sampling = tuple(float(s) for s in spacing) if spacing is not None else None
    if sampling is not None and len(sampling) != p.ndim:
        raise ValueError(f"spacing {sampling} does not match a {p.ndim}D mask")
    sp, sr = surface(p), surface(r)
    to_ref = ndimage.distance_transform_edt(~sr, sampling=sampling)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=sampling)[sr]
    return float((to_ref.sum() + to_pred.sum()) / (to_ref.size + to_pred.size))


def region_scores(prediction: np.ndarray, reference: np.ndarray, regions: Mapping[str, Sequence[int]],
                  spacing: Optional[Sequence[float]] = None) -> Dict[str, float]:
    """``dice_{region}`` and ``assd_{region}`` of two label maps (same shape)."""
    pred, ref = np.asarray(prediction), np.asarray(reference)
    if pred.shape != ref.shape:
        raise NnsynthError(f"label map shape {pred.shape} differs from the reference {ref.shape}")
    out: Dict[str, float] = {}
    for name, values in regions.items():
        p, r = np.isin(pred, list(values)), np.isin(ref, list(values))
        out[f"dice_{name}"] = dice(p, r)
        out[f"assd_{name}"] = assd(p, r, spacing)
    return out


def summarize_scores(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Dict[str, Any]:
    """n, mean, sample std (ddof 1) over finite values, and the count of undefined (NaN) values per column."""
    mean, std, undefined = {}, {}, {}
    for c in columns:
        vals = np.array([float(r[c]) for r in rows if r.get(c) is not None], np.float64)
        finite = vals[np.isfinite(vals)]
        mean[c] = float(finite.mean()) if finite.size else None
        std[c] = float(finite.std(ddof=1)) if finite.size > 1 else None
        undefined[c] = int(vals.size - finite.size)
    return {"n": len(rows), "mean": mean, "std": std, "undefined": undefined}


# ============================================================================================================
# folders
# ============================================================================================================
def _ending(name: str) -> Optional[str]:
    return next((e for e in SUPPORTED_FILE_ENDINGS if name.lower().endswith(e)), None)


def list_label_maps(folder: PathLike) -> Dict[str, Path]:
    """``{case: path}`` of the ``{case}{ending}`` files directly in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NnsynthError(f"Folder {folder} does not exist")
    out = {}
    for p in sorted(folder.iterdir()):
        e = _ending(p.name)
        if p.is_file() and not p.name.startswith(".") and e is not None:
            out[p.name[:-len(e)]] = p
    return out


def labels_for(dataset: Optional[Union[str, int]], record: Mapping[str, Any], reference_folder: PathLike
               ) -> Dict[str, int]:
    """dataset.json ``labels``: from ``-d``, else the prediction record, else a dataset.json next to REF,
    else the BraTS convention (background 0, NCR 1, ED 2, ET 3) with a log line."""
    if dataset is not None:
        from nnsynth import paths
        name = paths.resolve_dataset_name(dataset)
        for base in (paths.raw_folder(), paths.preprocessed_folder(), paths.results_folder()):
            if (base / name / "dataset.json").is_file():
                labels = load_json(base / name / "dataset.json").get("labels")
                if not labels:
                    raise NnsynthError(f"{base / name / 'dataset.json'} has no 'labels'; --seg needs them")
                return label_values(labels)
        raise NnsynthError(f"No dataset.json for {name} in the raw, preprocessed or results folders")
    if record.get("labels"):
        return label_values(record["labels"])
    for cand in (Path(reference_folder), Path(reference_folder).parent):
        if (cand / "dataset.json").is_file():
            labels = load_json(cand / "dataset.json").get("labels")
            if labels:
                return label_values(labels)
    logger.info("No dataset.json labels found (pass -d): using the BraTS convention %s", BRATS_DEFAULT_LABELS)
    return dict(BRATS_DEFAULT_LABELS)


def evaluate_segmentation_folders(reference_folder: PathLike, prediction_folder: PathLike,
                                  dataset: Optional[Union[str, int]] = None, output_csv: Optional[PathLike] = None,
                                  progress: bool = True) -> Tuple[pd.DataFrame, Dict[str, Any]]:
    """Dice and ASSD per region of every label map ``PRED/{case}{ending}`` against ``REF/{case}{ending}``.

    Writes the per-case CSV (default ``PRED/segmentation_metrics.csv``) and ``segmentation_summary.json``
    beside it. Predictions without a reference, unreadable files and geometry mismatches are listed under
    ``problems`` and left out of the statistics."""
    from nnsynth.dataset.io import read_image
    pred_folder, ref_folder = Path(prediction_folder), Path(reference_folder)
    preds = list_label_maps(pred_folder)
    if not preds:
        raise NnsynthError(f"No label map named {{case}}{{ending}} in {pred_folder}")
    refs = list_label_maps(ref_folder)
    record = load_json(pred_folder / SEGMENTATION_RECORD) if (pred_folder / SEGMENTATION_RECORD).is_file() else {}
    labels = labels_for(dataset, record, ref_folder)
    regions = tumour_regions(labels)
    columns = [f"{m}_{r}" for m in SEG_METRICS for r in regions]
    rows: List[Dict[str, Any]] = []
    problems: Dict[str, str] = {}
    from tqdm import tqdm
    for case, path in tqdm(sorted(preds.items()), desc="evaluate --seg", unit="case",
                           disable=progress_disabled(progress)):
        if case not in refs:
            problems[path.name] = f"no reference label map {ref_folder / path.name}"
            continue
        try:
            pred, pgeo = read_image(path, dtype=None)
            ref, rgeo = read_image(refs[case], dtype=None)
            why = rgeo.mismatch(pgeo)
            if why:
                raise NnsynthError(f"geometry differs from the reference: {why}")
            scores = region_scores(np.rint(pred).astype(np.int64), np.rint(ref).astype(np.int64), regions,
                                   rgeo.spacing_array_order)
        except NnsynthError as e:
            problems[path.name] = str(e)
            logger.error("%s: %s", path.name, e)
            continue
        sources = (record.get("cases", {}).get(case) or {}).get("sources")
        rows.append({"case": case, "sources": "+".join(sources) if sources else "?", **scores})
    df = pd.DataFrame(rows, columns=["case", "sources", *columns])
    summary = {"reference_folder": str(ref_folder), "prediction_folder": str(pred_folder), "labels": labels,
               "regions": regions, "metrics": columns,
               "conventions": "Dice: both empty = 1. ASSD in mm (voxel spacing); both empty = 0, one empty = "
                              "undefined (NaN, counted under 'undefined', left out of mean/std). std: ddof 1.",
               "all": summarize_scores(rows, columns),
               "by_sources": {s: summarize_scores([r for r in rows if r["sources"] == s], columns)
                              for s in sorted({r["sources"] for r in rows})},
               "problems": problems}
    csv_path = Path(output_csv) if output_csv else pred_folder / SEG_DEFAULT_CSV
    with atomic_path(csv_path, suffix=".csv") as tmp:
        df.to_csv(tmp, index=False)
    save_json(summary, csv_path.parent / SEG_SUMMARY_JSON)
    logger.info("%d label map(s) evaluated -> %s, %s", len(df), csv_path, csv_path.parent / SEG_SUMMARY_JSON)
    return df, summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """One line per metric: mean (std) over the cases, and the undefined count where there are some."""
    s = summary["all"]
    lines = []
    for c in summary["metrics"]:
        m, sd, u = s["mean"].get(c), s["std"].get(c), s["undefined"].get(c, 0)
        text = "n/a" if m is None else (f"{m:.4g}" + (f" ({sd:.3g})" if sd is not None and math.isfinite(sd) else ""))
        lines.append(f"{c:<10} {text}" + (f"  [{u} undefined]" if u else ""))
    return "\n".join(lines)


__all__ = ["dice", "assd", "surface", "region_scores", "tumour_regions", "label_values", "summarize_scores",
           "evaluate_segmentation_folders", "list_label_maps", "format_summary", "SEGMENTATION_RECORD",
           "SEG_DEFAULT_CSV", "SEG_SUMMARY_JSON"]
