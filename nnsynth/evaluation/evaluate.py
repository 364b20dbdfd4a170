"""``nnsynth_evaluate``: compare synthesised images with their truth, per case and per (sources -> target) task.

Each prediction ``PRED/{case}_{XXXX}{ending}`` is paired with ``REF/{case}_{XXXX}{ending}``. Metrics follow
CONTRACT.md section 5 (profile ``contract``, the default) or a paper's convention (``seq2seq``, ``codebrain``,
``brasyn``; see ``nnsynth.evaluation.metrics`` and ``reference/methods.md``). The sources of each prediction are
read from the record ``nnsynth_predict`` writes next to its outputs (or from ``--sources-from IN``), so the
summary can group results by task, e.g. ``T1+T1Gd+T2 -> Flair``.

LPIPS needs the AlexNet trunk weights on this machine (nothing is downloaded): without them the ``lpips``
column is left out and one message says why. With a label folder, every metric is also computed inside the
tumour (label > 0) and in the rest of the brain (BraSyn style): columns ``*_tumour`` and ``*_non_tumour``.
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
from nnsynth.dataset.cases import parse_image_filename
from nnsynth.dataset.io import read_image
from nnsynth.evaluation import metrics as M
from nnsynth.exceptions import NnsynthError
from nnsynth.utils.files import atomic_path, load_json, save_json
from nnsynth.utils.log import progress_disabled

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

# --- constants of this module ------------------------------------------------------------------------------
PROFILES = ("contract", "seq2seq", "codebrain", "brasyn")
DEFAULT_PROFILE = "contract"
METRIC_COLUMNS = ("psnr", "ssim", "mae", "lpips")
REGIONS = ("tumour", "non_tumour")
DEFAULT_CSV = "metrics.csv"
SUMMARY_JSON = "summary.json"
UNKNOWN_SOURCES = "?"
#: the BraSyn challenge clips each image to its own percentiles
BRASYN_PERCENTILES = (0.5, 99.5)


# ============================================================================================================
# metric helpers
# ============================================================================================================
def _own_percentile01(x: np.ndarray, lo_hi: Sequence[float] = BRASYN_PERCENTILES) -> np.ndarray:
    """Clip to the image's own percentiles over its nonzero voxels and map to [0, 1] (background stays 0)."""
    x = np.asarray(x, dtype=np.float64)
    nz = x[x != 0]
    if nz.size == 0:
        return np.zeros_like(x)
    lo, hi = np.percentile(nz, list(lo_hi))
    out = np.clip((x - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    out[x == 0] = 0.0
    return out


def ssim_map(ref01: np.ndarray, pred01: np.ndarray, box_mask: np.ndarray) -> Tuple[np.ndarray, Tuple[slice, ...]]:
    """Full SSIM map (skimage, data range 1) over the bounding box of ``box_mask``, and that box.

    The window shrinks to the thinnest axis (odd) as in ``metrics.ssim``; singleton axes are squeezed."""
    from skimage.metrics import structural_similarity
    box = M.bounding_box(box_mask)
    r, p = np.asarray(ref01, np.float64)[box], np.asarray(pred01, np.float64)[box]
    shape = r.shape
    r2, p2 = np.squeeze(r), np.squeeze(p)
    smallest = min(r2.shape) if r2.ndim else 0
    win = min(7, smallest if smallest % 2 == 1 else smallest - 1)
    if r2.ndim < 2 or win < 3:
        return np.full(shape, np.nan), box
    _, full = structural_similarity(r2, p2, data_range=1.0, win_size=win, full=True)
    return full.reshape(shape), box


def region_metrics(ref01: np.ndarray, pred01: np.ndarray, brain: np.ndarray, regions: Mapping[str, np.ndarray]
                   ) -> Dict[str, Optional[float]]:
    """PSNR, MAE and mean SSIM (from one SSIM map over the brain's box) inside each region, suffixed by name.

    A region without voxels gives None (e.g. a case without tumour)."""
    out: Dict[str, Optional[float]] = {}
    smap, box = ssim_map(ref01, pred01, brain)
    for name, region in regions.items():
        region = np.asarray(region, bool) & brain
        if not region.any():
            out.update({f"psnr_{name}": None, f"ssim_{name}": None, f"mae_{name}": None})
            continue
        out[f"psnr_{name}"] = M.psnr(ref01, pred01, region)
        out[f"mae_{name}"] = M.mae(ref01, pred01, region)
        vals = smap[region[box]]
        out[f"ssim_{name}"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else None
    return out


def brasyn_profile(ref: np.ndarray, pred: np.ndarray, mask: Optional[np.ndarray] = None, lpips_model: Any = None
                   ) -> Dict[str, Optional[float]]:
    """BraSyn challenge convention: each image clipped to its OWN P0.5/P99.5 and mapped to [0, 1]; SSIM from a
    3D SSIM map (skimage, window 7) averaged inside the brain; PSNR and MAE inside the brain."""
    r, p = _own_percentile01(ref), _own_percentile01(pred)
    brain = np.asarray(ref) != 0 if mask is None else np.asarray(mask, bool)
    if not brain.any():
        raise NnsynthError("The reference has no nonzero voxels (empty mask): metrics are undefined")
    smap, box = ssim_map(r, p, brain)
    vals = smap[brain[box]]
    return {"psnr": M.psnr(r, p, brain), "ssim": float(np.nanmean(vals)) if np.isfinite(vals).any() else None,
            "mae": M.mae(r, p, brain), "lpips": M.lpips_score(r, p, brain, lpips_model) if lpips_model else None}


if "brasyn" not in M.available_profiles():
    M.register_profile("brasyn", brasyn_profile)


def _normalised_for_regions(ref: np.ndarray, pred: np.ndarray, brain: np.ndarray, profile: str
                            ) -> Tuple[np.ndarray, np.ndarray]:
    """The [0, 1] pair a profile's metrics are computed on, for the tumour/non-tumour split."""
    if profile == "brasyn":
        return _own_percentile01(ref), _own_percentile01(pred)
    r, p, _ = M.normalize_pair(ref, pred, brain)
    return r, p


def lpips_available() -> Tuple[bool, str]:
    """Whether the AlexNet LPIPS weights exist locally, and a sentence saying so."""
    from nnsynth.losses.perceptual import BACKBONE_WEIGHT_FILES, ENV_LPIPS_WEIGHTS, find_backbone_weights
    try:
        path = find_backbone_weights("alex")
    except NnsynthError as e:
        return False, str(e)
    if path is None:
        return False, (f"LPIPS column left out: no local AlexNet weights ({BACKBONE_WEIGHT_FILES['alex']}); put "
                       f"torchvision's file in the torch hub cache or point {ENV_LPIPS_WEIGHTS} to it (nnsynth "
                       f"never downloads weights)")
    return True, f"LPIPS with AlexNet weights from {path}"


# ============================================================================================================
# pairing files and sources
# ============================================================================================================
def _ending(name: str) -> Optional[str]:
    return next((e for e in SUPPORTED_FILE_ENDINGS if name.lower().endswith(e)), None)


def list_images(folder: PathLike) -> Dict[str, Tuple[str, int, Path]]:
    """``{file name: (case, channel id, path)}`` of the ``{case}_{XXXX}{ending}`` images directly in ``folder``."""
    out = {}
    folder = Path(folder)
    if not folder.is_dir():
        raise NnsynthError(f"Folder {folder} does not exist")
    for p in sorted(folder.iterdir()):
        e = _ending(p.name)
        if p.name.startswith(".") or not p.is_file() or e is None:
            continue
        parsed = parse_image_filename(p.name, p.name[-len(e):])
        if parsed is not None:
            out[p.name] = (parsed[0], parsed[1], p)
    return out


def read_prediction_records(prediction_folder: PathLike) -> Dict[str, Any]:
    """Merge every ``nnsynth_predictions*.json`` of a prediction folder (several parts allowed)."""
    from nnsynth.inference.predictor import PREDICTIONS_RECORD
    merged: Dict[str, Any] = {"cases": {}}
    stem = PREDICTIONS_RECORD[:-len(".json")]
    for p in sorted(Path(prediction_folder).glob(f"{stem}*.json")):
        try:
            rec = load_json(p)
        except ValueError:
            logger.warning("%s is not valid JSON; ignored", p)
            continue
        for k, v in rec.items():
            if k == "cases":
                for case, targets in v.items():
                    merged["cases"].setdefault(case, {}).update(targets)
            else:
                merged.setdefault(k, v)
    return merged


def channel_names_for(dataset: Optional[Union[str, int]], records: Mapping[str, Any],
                      reference_folder: PathLike) -> Dict[int, str]:
    """Sequence names by channel id: from ``-d``, else the prediction record, else a dataset.json next to
    REF; without any, the 4-digit ids themselves."""
    from nnsynth.dataset.dataset_json import load_dataset_spec
    if dataset is not None:
        from nnsynth import paths
        name = paths.resolve_dataset_name(dataset)
        for base in (paths.raw_folder(), paths.preprocessed_folder(), paths.results_folder()):
            if (base / name / "dataset.json").is_file():
                return dict(load_dataset_spec(base / name).channel_names)
        raise NnsynthError(f"No dataset.json for {name} in the raw, preprocessed or results folders")
    if records.get("channel_names"):
        return {int(k): str(v) for k, v in records["channel_names"].items()}
    for cand in (Path(reference_folder), Path(reference_folder).parent):
        if (cand / "dataset.json").is_file():
            try:
                return dict(load_dataset_spec(cand).channel_names)
            except NnsynthError:
                pass
    logger.info("No dataset.json found (pass -d): sequences are named by their channel ids")
    return {}


def _seq_name(cid: int, names: Mapping[int, str]) -> str:
    return names.get(cid, f"{cid:04d}")


def sources_from_folder(folder: PathLike, names: Mapping[int, str]) -> Dict[str, List[str]]:
    """``{case: [sequence, ...]}`` of the files in a prediction input folder."""
    out: Dict[str, List[str]] = {}
    for case, cid, _ in list_images(folder).values():
        out.setdefault(case, []).append(_seq_name(cid, names))
    return out


def task_name(sources: Optional[Sequence[str]], target: str) -> str:
    return f"{'+'.join(sources) if sources else UNKNOWN_SOURCES} -> {target}"


# ============================================================================================================
# evaluation
# ============================================================================================================
def evaluate_pair(ref: np.ndarray, pred: np.ndarray, profile: str = DEFAULT_PROFILE, label: Optional[np.ndarray] = None,
                  lpips: bool = False) -> Dict[str, Optional[float]]:
    """All metric columns for one (reference, prediction) pair; ``label`` adds the tumour/non-tumour split."""
    if profile not in PROFILES:
        raise NnsynthError(f"Unknown profile {profile!r}; use one of {', '.join(PROFILES)}")
    ref = np.asarray(ref, np.float32)
    pred = np.asarray(pred, np.float32)
    brain = ref != 0
    row = dict(M.compute_metrics(ref, pred, brain, profile=profile, compute_lpips=lpips))
    if not lpips:
        row.pop("lpips", None)
    if label is not None:
        label = np.asarray(label)
        if label.shape != ref.shape:
            raise NnsynthError(f"label shape {label.shape} differs from the image shape {ref.shape}")
        r01, p01 = _normalised_for_regions(ref, pred, brain, profile)
        row.update(region_metrics(r01, p01, brain, {"tumour": label > 0, "non_tumour": label == 0}))
    return row


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def summarize(df: pd.DataFrame, metric_columns: Sequence[str]) -> Dict[str, Any]:
    """Mean and std (sample std, ddof 1; None for a single value) per metric: overall, per task, per target."""
    def stats(sub: pd.DataFrame) -> Dict[str, Any]:
        num = sub[list(metric_columns)].apply(pd.to_numeric, errors="coerce")
        num = num.replace([np.inf, -np.inf], np.nan)
        return {"n": int(len(sub)),
                "mean": {c: _clean(float(num[c].mean())) for c in metric_columns},
                "std": {c: _clean(float(num[c].std(ddof=1))) if num[c].count() > 1 else None for c in metric_columns}}
    out: Dict[str, Any] = {"all": stats(df) if len(df) else {"n": 0, "mean": {}, "std": {}}}
    out["tasks"] = {t: stats(g) for t, g in df.groupby("task", sort=True)} if len(df) else {}
    out["targets"] = {t: stats(g) for t, g in df.groupby("target", sort=True)} if len(df) else {}
    return out


def evaluate_folders(reference_folder: PathLike, prediction_folder: PathLike,
                     dataset: Optional[Union[str, int]] = None, labels_folder: Optional[PathLike] = None,
                     profile: str = DEFAULT_PROFILE, output_csv: Optional[PathLike] = None,
                     sources_folder: Optional[PathLike] = None, progress: bool = True
                     ) -> Tuple[pd.DataFrame, Dict[str, Any]]:
    """Evaluate every prediction of ``prediction_folder`` against ``reference_folder``.

    Writes the per-case CSV (``output_csv``, default ``PRED/metrics.csv``) and ``summary.json`` beside it;
    returns both. Predictions without a reference or with an unreadable/mismatching file are listed in the
    summary (``problems``) and left out of the statistics."""
    if profile not in PROFILES:
        raise NnsynthError(f"Unknown profile {profile!r}; use one of {', '.join(PROFILES)}")
    pred_folder, ref_folder = Path(prediction_folder), Path(reference_folder)
    preds = list_images(pred_folder)
    if not preds:
        raise NnsynthError(f"No prediction named {{case}}_{{XXXX}}{{ending}} in {pred_folder}")
    refs = list_images(ref_folder)
    records = read_prediction_records(pred_folder)
    names = channel_names_for(dataset, records, ref_folder)
    folder_sources = sources_from_folder(sources_folder, names) if sources_folder else {}
    use_lpips, why = lpips_available()
    if use_lpips:
        logger.info("%s", why)
    else:
        logger.warning("%s", why)
    columns = [c for c in METRIC_COLUMNS if use_lpips or c != "lpips"]
    if labels_folder is not None:
        columns += [f"{m}_{r}" for r in REGIONS for m in ("psnr", "ssim", "mae")]
    rows: List[Dict[str, Any]] = []
    problems: Dict[str, str] = {}
    from tqdm import tqdm
    for fname, (case, cid, path) in tqdm(sorted(preds.items()), desc="evaluate", unit="image",
                                         disable=progress_disabled(progress)):
        target = _seq_name(cid, names)
        if fname not in refs:
            problems[fname] = f"no reference {ref_folder / fname}"
            continue
        try:
            pred, pgeo = read_image(path)
            ref, rgeo = read_image(refs[fname][2])
            why_geo = rgeo.mismatch(pgeo)
            if why_geo:
                raise NnsynthError(f"geometry differs from the reference: {why_geo}")
            label = None
            if labels_folder is not None:
                lp = Path(labels_folder) / f"{case}{_ending(fname)}"
                if lp.is_file():
                    label, lgeo = read_image(lp, dtype=None)
                    if rgeo.mismatch(lgeo):
                        raise NnsynthError(f"label {lp.name}: geometry differs from the reference")
                else:
                    logger.warning("%s: no label file %s; tumour columns left empty", case, lp)
                    label = np.zeros(ref.shape, np.uint8)
            values = evaluate_pair(ref, pred, profile, label, use_lpips)
        except NnsynthError as e:
            problems[fname] = str(e)
            logger.error("%s: %s", fname, e)
            continue
        srcs = records["cases"].get(case, {}).get(target, {}).get("sources") or folder_sources.get(case)
        srcs = [s for s in (srcs or []) if s != target]
        rows.append({"case": case, "target": target, "sources": "+".join(srcs) if srcs else UNKNOWN_SOURCES,
                     "task": task_name(srcs, target), "file": fname,
                     **{c: values.get(c) for c in columns}})
    df = pd.DataFrame(rows, columns=["case", "target", "sources", "task", "file", *columns])
    summary = {"profile": profile, "reference_folder": str(ref_folder), "prediction_folder": str(pred_folder),
               "labels_folder": str(labels_folder) if labels_folder else None, "metrics": columns,
               "lpips": why, "std": "sample standard deviation (ddof 1)", **summarize(df, columns),
               "problems": problems}
    csv_path = Path(output_csv) if output_csv else pred_folder / DEFAULT_CSV
    with atomic_path(csv_path, suffix=".csv") as tmp:
        df.to_csv(tmp, index=False)
    save_json(summary, csv_path.parent / SUMMARY_JSON)
    logger.info("%d prediction(s) evaluated (%s profile) -> %s, %s", len(df), profile, csv_path,
                csv_path.parent / SUMMARY_JSON)
    return df, summary


__all__ = ["evaluate_folders", "evaluate_pair", "summarize", "brasyn_profile", "region_metrics", "ssim_map",
           "lpips_available", "PROFILES", "task_name"]
