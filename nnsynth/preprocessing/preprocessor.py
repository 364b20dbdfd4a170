"""Preprocessing: transpose, crop to the union nonzero mask, normalise, resample, store.

The same code path serves training data (:func:`preprocess_dataset`, files in, ``.b2nd`` out) and inference
(:func:`preprocess_case`, arrays in, arrays out), so the predictor sees exactly what the trainer saw.
:func:`revert_preprocessing` undoes the geometry part for export: resample back to the cropped shape,
insert into the uncropped shape, undo the transpose.

Cropping happens in the raw array order (the box is stored as such), then the axes are transposed into the
network order of the plans; both commute, so this equals nnU-Net's transpose-then-crop.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from nnsynth.dataset.cases import Case
from nnsynth.dataset.io import Geometry, read_image
from nnsynth.exceptions import DatasetFormatError, NnsynthError, PlansError
from nnsynth.planning.fingerprint import (_map, case_shape_3d, case_spacing_array_order, nonzero_bbox,
                                          source_signature)
from nnsynth.preprocessing import storage
from nnsynth.preprocessing.normalization import case_bounds, check_scheme, normalize
from nnsynth.preprocessing.resampling import (ANISOTROPY_THRESHOLD, compute_new_shape, resample_data,
                                              resample_image, resample_seg, separate_axis)

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

# --- constants of this module ---------------------------------------------------------------------------
#: bumped whenever the preprocessing code changes what it writes; part of the per-case plans hash
PREPROCESSING_VERSION = 1
#: seg value outside the nonzero (brain) mask
OUTSIDE_MASK = -1


def _config(plans: Mapping[str, Any], configuration: Union[str, Mapping[str, Any]]) -> Dict[str, Any]:
    if isinstance(configuration, Mapping):
        return dict(configuration)
    confs = plans.get("configurations", {})
    if configuration not in confs:
        raise PlansError(f"configuration {configuration!r} is not in the plans (available: "
                         f"{', '.join(confs) or 'none'})")
    return confs[configuration]


def preprocessing_hash(plans: Mapping[str, Any], configuration: Union[str, Mapping[str, Any]]) -> str:
    """Hash of the plan entries that change preprocessed arrays (not batch size, network, training...)."""
    conf = _config(plans, configuration)
    relevant = {"version": PREPROCESSING_VERSION, "sequences": plans.get("sequences"),
                "transpose_forward": plans.get("transpose_forward"), "normalization": plans.get("normalization"),
                "spacing": conf.get("spacing"), "spatial_dims": conf.get("spatial_dims"),
                "resampling": conf.get("resampling")}
    return hashlib.sha1(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def target_spacing_for_case(conf: Mapping[str, Any], spacing_transposed: Sequence[float]) -> List[float]:
    """Spacing a case is resampled to: the plan's; 2d keeps the case's own through-plane spacing (nnU-Net)."""
    target = [float(s) for s in conf["spacing"]]
    if int(conf.get("spatial_dims", 3)) == 2:
        target[0] = float(spacing_transposed[0])
    return target


def _resampling_settings(conf: Mapping[str, Any]) -> Tuple[int, int, float]:
    r = conf.get("resampling", {})
    return (int(r.get("order_data", 3)), int(r.get("order_data_through_plane_if_anisotropic", 0)),
            float(r.get("anisotropy_threshold", ANISOTROPY_THRESHOLD)))


def preprocess_case(images: Sequence[Optional[np.ndarray]], geometry: Geometry, plans: Mapping[str, Any],
                    configuration: Union[str, Mapping[str, Any]], label: Optional[np.ndarray] = None,
                    case: str = "case") -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
    """Preprocess one case from arrays (one per sequence in plans order, None where missing).

    Returns ``(data (C,Z,Y,X) float32, seg (1,Z,Y,X) int8, properties)`` exactly as stored on disk
    (without ``source_files``). Arrays are in SimpleITK order and share ``geometry``.
    """
    conf = _config(plans, configuration)
    sequences = list(plans["sequences"])
    if len(images) != len(sequences):
        raise PlansError(f"{case}: got {len(images)} images for the plans' {len(sequences)} sequences "
                         f"({', '.join(sequences)}); pass None for missing ones")
    available = [im is not None for im in images]
    if not any(available):
        raise DatasetFormatError([f"{case}: no sequence available"], header="Cannot preprocess case")
    shape3 = tuple(case_shape_3d(geometry.shape))
    for s, im in zip(sequences, images):
        if im is not None and tuple(case_shape_3d(im.shape)) != shape3:
            raise DatasetFormatError([f"{case}: {s} has shape {im.shape}, geometry says {geometry.shape}"],
                                     header="Cannot preprocess case")
    # crop box from the union nonzero mask (raw array order), computed one image at a time
    union = np.zeros(shape3, dtype=bool)
    for im in images:
        if im is not None:
            union |= im.reshape(shape3) != 0
    bbox = nonzero_bbox(union)
    sl = tuple(slice(a, b) for a, b in bbox)
    tf = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
    mask = union[sl].transpose(tf)
    del union
    spacing_t = [case_spacing_array_order(geometry)[a] for a in tf]
    cropped_shape = list(mask.shape)

    data = np.zeros((len(sequences),) + mask.shape, dtype=np.float32)
    norm: Dict[str, Dict[str, float]] = {}
    scheme = check_scheme(plans.get("normalization"))
    for c, (s, im) in enumerate(zip(sequences, images)):
        if im is None:
            continue
        x = im.reshape(shape3)[sl].transpose(tf)
        lo, hi = case_bounds(x, s, scheme)
        norm[s] = {"lower": lo, "upper": hi}
        data[c] = normalize(x, mask, lo, hi)

    seg = np.full(mask.shape, OUTSIDE_MASK, dtype=np.int8)
    has_label = label is not None
    if label is not None:
        lab = np.asarray(label).reshape(shape3)[sl].transpose(tf)
        if lab.size and (lab.min() < 0 or lab.max() > 127):
            raise DatasetFormatError([f"{case}: label values must be in 0..127, found {lab.min()}..{lab.max()}"],
                                     header="Cannot preprocess case")
        seg[mask] = lab[mask].astype(np.int8)
    else:
        seg[mask] = 0

    target = target_spacing_for_case(conf, spacing_t)
    new_shape = compute_new_shape(cropped_shape, spacing_t, target)
    order, order_sep, thr = _resampling_settings(conf)
    if tuple(new_shape) != tuple(cropped_shape):
        data = resample_data(data, spacing_t, target, new_shape, order, order_sep, thr)
        seg = resample_seg(seg, new_shape)
        np.clip(data, 0.0, 1.0, out=data)  # cubic overshoot must not leave the normalised range
        data[:, seg == OUTSIDE_MASK] = 0
    props = {
        "case": case,
        "sequences": sequences,
        "available": available,
        "original_geometry": geometry.to_dict(),
        "is_2d": geometry.ndim == 2,
        "shape_before_cropping": list(shape3),
        "bbox_used_for_cropping": bbox,
        "transpose_forward": tf,
        "shape_after_cropping_and_before_resampling": cropped_shape,
        "spacing_before_resampling": spacing_t,
        "spacing": target,
        "shape_after_resampling": list(new_shape),
        "normalization": norm,
        "has_label": has_label,
        "plans_hash": preprocessing_hash(plans, conf),
    }
    return data, seg[None], props


def revert_preprocessing(prediction: np.ndarray, properties: Mapping[str, Any],
                         plans: Optional[Mapping[str, Any]] = None,
                         configuration: Union[None, str, Mapping[str, Any]] = None,
                         order: Optional[int] = None, fill_value: float = 0.0) -> np.ndarray:
    """Map a network-space image (Z, Y, X) back to the case's original array (its raw shape and order).

    Resamples to the cropped shape (same order rules as preprocessing), undoes the transpose and inserts
    into the uncropped shape filled with ``fill_value``. 2D cases come back as (y, x). Intensities stay in
    the normalised space (see ``normalization.denormalize`` to map them back).
    """
    pred = np.asarray(prediction, dtype=np.float32)
    expected = tuple(properties["shape_after_resampling"])
    if pred.shape != expected:
        raise ValueError(f"prediction shape {pred.shape} != preprocessed shape {expected}")
    conf = _config(plans, configuration) if plans is not None and configuration is not None else {}
    order_data, order_sep, thr = _resampling_settings(conf)
    order = order_data if order is None else order
    cropped = tuple(properties["shape_after_cropping_and_before_resampling"])
    if pred.shape != cropped:
        sep = separate_axis(properties["spacing"], properties["spacing_before_resampling"], thr)
        pred = resample_image(pred, cropped, order, sep, order_sep if order > 0 else 0)
    tf = list(properties["transpose_forward"])
    backward = list(np.argsort(tf))
    pred = pred.transpose(backward)
    out = np.full(tuple(properties["shape_before_cropping"]), fill_value, dtype=np.float32)
    out[tuple(slice(a, b) for a, b in properties["bbox_used_for_cropping"])] = pred
    return out[0] if properties.get("is_2d") else out


# --- whole datasets -------------------------------------------------------------------------------------

def case_is_up_to_date(folder: Path, case: str, sources: Mapping[str, Any], plans_hash: str) -> bool:
    """Complete on disk, same plans hash, same source files (path, size, mtime)."""
    if not storage.case_is_complete(folder, case):
        return False
    try:
        props = storage.load_properties(folder, case)
    except (OSError, ValueError):
        return False
    return props.get("plans_hash") == plans_hash and props.get("source_files") == json.loads(json.dumps(sources))


def _preprocess_file_task(task: Tuple[str, Dict[str, Any], str, Dict[str, Any], str]) -> Tuple[str, str]:
    """Worker: read one case's files, preprocess, save. Returns (case, '' or an error message)."""
    name, files, out_folder, plans, conf_name = task
    try:
        images: List[Optional[np.ndarray]] = []
        geometry: Optional[Geometry] = None
        for cid in plans["channel_ids"]:
            p = files["images"].get(str(cid))
            if p is None:
                images.append(None)
                continue
            arr, geo = read_image(p, dtype=np.float32)
            if geometry is not None and geometry.mismatch(geo):
                raise DatasetFormatError([f"{p}: {geometry.mismatch(geo)} (other sequences of {name})"],
                                         header="Geometry mismatch within a case")
            geometry = geometry or geo
            images.append(arr)
        label = None
        if files.get("label"):
            label, _ = read_image(files["label"], dtype=None)
        data, seg, props = preprocess_case(images, geometry, plans, conf_name, label, name)
        del images, label
        props["source_files"] = files["signature"]
        chunks = _chunks(plans["configurations"][conf_name], data.shape)
        storage.save_case(out_folder, name, data, seg, props, chunks=chunks)
        return name, ""
    except NnsynthError as e:
        return name, str(e)


def _chunks(conf: Mapping[str, Any], shape: Sequence[int]) -> Tuple[int, ...]:
    if int(conf.get("spatial_dims", 2)) == 3:
        pz = int(conf.get("patch_size", [shape[1]])[0])
        return (1, max(1, min(shape[1], pz)), shape[2], shape[3])
    return storage.default_chunks(shape)


def preprocess_dataset(cases: Mapping[str, Case], plans: Mapping[str, Any], configuration: str,
                       output_folder: PathLike, num_workers: int = 0, clean: bool = False,
                       progress: bool = True) -> Dict[str, Any]:
    """Preprocess every case of one configuration into ``output_folder/{data_identifier}``.

    Up-to-date cases are skipped (see :func:`case_is_up_to_date`); ``clean`` deletes the folder first.
    Returns ``{"done": [...], "skipped": [...], "failed": {case: message}}``; failures never stop the
    other cases.
    """
    conf = _config(plans, configuration)
    folder = Path(output_folder) / conf["data_identifier"]
    if clean and folder.is_dir():
        logger.info("--clean: removing %s", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    phash = preprocessing_hash(plans, configuration)
    tasks, skipped = [], []
    cid_by_seq = dict(zip(plans["sequences"], plans["channel_ids"]))
    for name, case in cases.items():
        sig = source_signature(case)
        if case_is_up_to_date(folder, name, sig, phash):
            skipped.append(name)
            continue
        files = {"images": {str(cid): str(p) for cid, p in case.images.items() if cid in cid_by_seq.values()},
                 "label": str(case.label) if case.label else None, "signature": sig}
        tasks.append((name, files, str(folder), dict(plans), configuration))
    if skipped:
        logger.info("%s: %d of %d cases are up to date and skipped", configuration, len(skipped), len(cases))
    results = _map(_preprocess_file_task, tasks, num_workers, f"preprocess {configuration}", progress)
    failed = {n: msg for n, msg in results if msg}
    done = [n for n, msg in results if not msg]
    for n, msg in failed.items():
        logger.error("%s: case %s failed: %s", configuration, n, msg)
    # leftovers of cases no longer in the dataset would be trained on: remove them
    keep = set(cases)
    for p in folder.glob("*.json"):
        if p.stem not in keep and not p.name.startswith("."):
            for q in (p, folder / f"{p.stem}.b2nd", folder / f"{p.stem}_seg.b2nd"):
                if q.exists():
                    q.unlink()
            logger.info("%s: removed stale case %s (not in the raw dataset any more)", configuration, p.stem)
    return {"done": done, "skipped": skipped, "failed": failed}
