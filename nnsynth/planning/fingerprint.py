"""Label-free dataset fingerprint (``dataset_fingerprint.json``).

What the planner needs to know about a raw dataset, read one image at a time so memory stays bounded by
the largest case: per case spacing, shape, the union nonzero bounding box over its available sequences and
the relative size after cropping; per sequence how many cases hold it and foreground intensity statistics
from a bounded, seeded sample (and per case p0.5 / median / p99.5, which the normalisation plan needs); per pair of sequences how many cases hold both, and the pairing graph
derived from it (which targets a source reaches directly, which only through intermediate sequences).

Foreground is the sequence's own nonzero voxels (skull-stripped MRI), so no label is needed.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import multiprocessing
import numpy as np

from nnsynth.constants import FINGERPRINT_MAX_VOXELS_TOTAL, FINGERPRINT_PERCENTILES, FINGERPRINT_SEED
from nnsynth.dataset.cases import Case, discover_cases
from nnsynth.dataset.dataset_json import DatasetSpec, load_dataset_spec
from nnsynth.dataset.io import Geometry, read_image
from nnsynth.exceptions import DatasetFormatError
from nnsynth.preprocessing.normalization import anchor_statistics
from nnsynth.utils.log import progress_disabled

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

# --- constants of this module (listed in the final report; candidates for nnsynth/constants.py) ------------
#: spacing given to the missing through-plane axis of 2D images (nnU-Net's convention): it makes that axis
#: the coarsest one, so it is never transposed away from position 0 and never resampled.
PSEUDO_2D_SPACING = 999.0
#: version of the fingerprint layout; a fingerprint of another version is recomputed.
FINGERPRINT_VERSION = 2


def case_spacing_array_order(geometry: Geometry) -> List[float]:
    """(z, y, x) spacing of a case; 2D images get ``PSEUDO_2D_SPACING`` for their missing z axis."""
    sp = [float(s) for s in geometry.spacing_array_order]
    return sp if len(sp) == 3 else [PSEUDO_2D_SPACING] + sp


def case_shape_3d(shape: Sequence[int]) -> List[int]:
    """Array shape as (Z, Y, X): a 2D image ``(y, x)`` becomes ``(1, y, x)``."""
    return [int(s) for s in shape] if len(shape) == 3 else [1] + [int(s) for s in shape]


def nonzero_bbox(mask: np.ndarray) -> List[List[int]]:
    """Half-open bounding box ``[[z0, z1], ...]`` of a boolean mask; the whole array if the mask is empty."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append([int(hits[0]), int(hits[-1]) + 1] if hits.size else [0, int(mask.shape[axis])])
    return box


def source_signature(case: Case) -> Dict[str, Dict[str, Any]]:
    """``{channel_id: {path, size, mtime}}`` of a case's files: cheap way to tell whether it changed."""
    files = {str(cid): p for cid, p in case.images.items()}
    if case.label is not None:
        files["label"] = case.label
    out = {}
    for key, p in sorted(files.items()):
        st = os.stat(p)
        out[key] = {"path": str(p), "size": int(st.st_size), "mtime": float(st.st_mtime)}
    return out


def dataset_signature(cases: Dict[str, Case]) -> str:
    """Hash of every file's name, size and mtime: the fingerprint is reused while it is unchanged."""
    h = hashlib.sha1()
    for name, case in cases.items():
        for key, d in source_signature(case).items():
            h.update(f"{name}|{key}|{Path(d['path']).name}|{d['size']}|{d['mtime']}\n".encode())
    return h.hexdigest()


def _fingerprint_case(task: Tuple[str, Dict[int, str], List[int], Dict[int, str], int, int]) -> Dict[str, Any]:
    """Fingerprint one case (runs in a worker): reads its images one at a time."""
    name, images, channel_ids, seq_names, samples_per_image, seed = task
    union: Optional[np.ndarray] = None
    geometry: Optional[Geometry] = None
    samples: Dict[int, np.ndarray] = {}
    rs = np.random.RandomState(seed)
    for cid in channel_ids:
        if cid not in images:
            continue
        array, geometry = read_image(images[cid], dtype=np.float32)
        nz = array != 0
        union = nz if union is None else (union | nz)
        fg = array[nz]
        if fg.size > samples_per_image:
            fg = fg[np.sort(rs.choice(fg.size, samples_per_image, replace=False))]
        samples[cid] = fg.astype(np.float32, copy=False)
        del array, nz
    if union is None or geometry is None:
        raise DatasetFormatError([f"case {name} has no image"], header="Cannot fingerprint the dataset")
    if union.ndim == 2:
        union = union[None]
    bbox = nonzero_bbox(union)
    shape = case_shape_3d(geometry.shape)
    shape_after = [b[1] - b[0] for b in bbox]
    intensity = {seq_names[cid]: anchor_statistics(v) for cid, v in samples.items()}
    return {"case": name, "spacing": case_spacing_array_order(geometry), "shape": shape,
            "is_2d": geometry.ndim == 2, "bbox": bbox, "shape_after_crop": shape_after,
            "relative_size_after_crop": float(np.prod(shape_after) / np.prod(shape)),
            "channel_ids": sorted(samples), "direction": list(geometry.direction), "intensity": intensity,
            "_samples": samples}


def intensity_statistics(values: np.ndarray) -> Dict[str, float]:
    """Mean, median, std, min, max, p0.5, p99.5 of a 1D sample (NaN-free; empty -> zeros)."""
    if values.size == 0:
        keys = ("mean", "median", "std", "min", "max", "percentile_00_5", "percentile_99_5")
        return {k: 0.0 for k in keys}
    v = values.astype(np.float64, copy=False)
    lo, hi = np.percentile(v, FINGERPRINT_PERCENTILES)
    return {"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()),
            "min": float(v.min()), "max": float(v.max()),
            "percentile_00_5": float(lo), "percentile_99_5": float(hi)}


def pairing_graph(available: Dict[str, List[str]], sequences: Sequence[str]) -> Dict[str, Any]:
    """Pair counts and reachability between sequences.

    Two sequences are *directly* paired when at least one case holds both (a model sees that translation in
    training). A target reachable only through a chain of paired sequences is *indirect* (e.g. T1->Flair
    when only (T1,T1Gd), (T1Gd,T2), (T2,Flair) co-occur; the VQ paper's unpaired setting). The shortest
    chain is reported. Anything else is unreachable.
    """
    counts = {a: {b: 0 for b in sequences} for a in sequences}
    for seqs in available.values():
        for a in seqs:
            for b in seqs:
                counts[a][b] += 1
    neighbours = {a: [b for b in sequences if b != a and counts[a][b] > 0] for a in sequences}
    direct, indirect, unreachable = {}, {}, {}
    for src in sequences:
        prev: Dict[str, Optional[str]] = {src: None}
        queue = deque([src])
        while queue:
            cur = queue.popleft()
            for nb in neighbours[cur]:
                if nb not in prev:
                    prev[nb] = cur
                    queue.append(nb)
        direct[src] = list(neighbours[src])
        indirect[src] = {}
        unreachable[src] = []
        for tgt in sequences:
            if tgt == src or tgt in neighbours[src]:
                continue
            if tgt in prev:
                path, node = [], tgt
                while node is not None:
                    path.append(node)
                    node = prev[node]
                indirect[src][tgt] = path[::-1]
            else:
                unreachable[src].append(tgt)
    return {"pair_counts": counts, "direct": direct, "indirect": indirect, "unreachable": unreachable}


def extract_fingerprint(raw_dataset_folder: PathLike, num_workers: int = 0,
                        max_voxels_total: int = FINGERPRINT_MAX_VOXELS_TOTAL, seed: int = FINGERPRINT_SEED,
                        cases: Optional[Dict[str, Case]] = None, spec: Optional[DatasetSpec] = None,
                        progress: bool = True) -> Dict[str, Any]:
    """Fingerprint the training cases of a raw dataset (``imagesTr``); see the module docstring.

    At most ``max_voxels_total`` foreground voxels are sampled over the whole dataset (evenly per image,
    ``RandomState(seed)`` per case, so the result does not depend on ``num_workers``).
    """
    folder = Path(raw_dataset_folder)
    spec = spec or load_dataset_spec(folder)
    if cases is None:
        cases = discover_cases(folder / "imagesTr", spec, folder / "labelsTr")
    if not cases:
        raise DatasetFormatError([f"{folder / 'imagesTr'}: no training case found"],
                                 header="Cannot fingerprint the dataset")
    channel_ids = spec.channel_ids
    n_images = sum(len(c.images) for c in cases.values())
    per_image = max(1, int(max_voxels_total // max(n_images, 1)))
    seq_of = dict(zip(channel_ids, spec.sequences))
    tasks = [(name, {cid: str(p) for cid, p in c.images.items()}, channel_ids, seq_of, per_image, seed)
             for name, c in cases.items()]
    results = _map(_fingerprint_case, tasks, num_workers, "fingerprint", progress)

    per_case: Dict[str, Any] = {}
    pooled: Dict[int, List[np.ndarray]] = {cid: [] for cid in channel_ids}
    for r in results:
        for cid, s in r.pop("_samples").items():
            pooled[cid].append(s)
        r["sequences"] = [seq_of[c] for c in r.pop("channel_ids")]
        per_case[r.pop("case")] = r
    stats, counts = {}, {}
    for cid in channel_ids:
        name = seq_of[cid]
        counts[name] = sum(1 for r in per_case.values() if name in r["sequences"])
        values = np.concatenate(pooled[cid]) if pooled[cid] else np.zeros(0, np.float32)
        stats[name] = dict(intensity_statistics(values), num_cases=counts[name], num_samples=int(values.size))
    available = {k: v["sequences"] for k, v in per_case.items()}
    is_2d = [r["is_2d"] for r in per_case.values()]
    if any(is_2d) and not all(is_2d):
        two = sorted(k for k, r in per_case.items() if r["is_2d"])
        three = sorted(k for k, r in per_case.items() if not r["is_2d"])
        raise DatasetFormatError([f"the training cases mix 2D images ({', '.join(two[:5])}"
                                  f"{' ...' if len(two) > 5 else ''}) and 3D images ({', '.join(three[:5])}"
                                  f"{' ...' if len(three) > 5 else ''}); put them in separate datasets"],
                                 header="Cannot fingerprint the dataset")
    fp = {
        "fingerprint_version": FINGERPRINT_VERSION,
        "dataset_signature": dataset_signature(cases),
        "sequences": spec.sequences,
        "channel_ids": channel_ids,
        "num_cases": len(per_case),
        "is_2d": bool(all(is_2d)),
        "spacings": [r["spacing"] for r in per_case.values()],
        "shapes_after_crop": [r["shape_after_crop"] for r in per_case.values()],
        "median_relative_size_after_crop": float(np.median([r["relative_size_after_crop"]
                                                             for r in per_case.values()])),
        "sequence_counts": counts,
        "intensity_statistics_per_sequence": stats,
        "pairing": pairing_graph(available, spec.sequences),
        "cases": per_case,
    }
    logger.info("Fingerprint: %d cases; cases per sequence: %s", len(per_case),
                ", ".join(f"{k}={v}" for k, v in counts.items()))
    for src, tgts in fp["pairing"]["unreachable"].items():
        if tgts:
            logger.warning("No case pairs %s with %s, directly or through other sequences: "
                           "translations %s -> them cannot be learned", src, ", ".join(tgts), src)
    return fp


def default_num_workers() -> int:
    """Worker processes a machine can take: 0 (in-process) on <= 2 cores, else min(cores - 1, 8)."""
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(cores - 1, 8)


def _map(fn, tasks: List[Any], num_workers: int, desc: str, progress: bool) -> List[Any]:
    """Run ``fn`` over ``tasks`` in order, in-process (0) or in ``num_workers`` spawned processes."""
    from tqdm import tqdm
    bar = tqdm(total=len(tasks), desc=desc, disable=progress_disabled(progress), leave=False, unit="case")
    out = []
    try:
        if num_workers <= 0 or len(tasks) <= 1:
            for t in tasks:
                out.append(fn(t))
                bar.update(1)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(num_workers, len(tasks)), mp_context=ctx) as ex:
                for r in ex.map(fn, tasks):
                    out.append(r)
                    bar.update(1)
    finally:
        bar.close()
    return out
