"""Tiny synthetic raw datasets for tests (written with SimpleITK, a few KB each).

``write_tiny_dataset`` is shared by the test modules: it writes a valid nnsynth dataset in the raw
format of CONTRACT.md section 2, with optional missing sequences, labels and test images.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

DEFAULT_SEQUENCES = ("T1", "T1Gd", "T2", "Flair")
DEFAULT_SPACING_3D = (1.0, 1.2, 1.5)
DEFAULT_ORIGIN_3D = (-10.0, 5.0, 2.5)


def write_array(array: np.ndarray, path: Union[str, Path], spacing: Optional[Sequence[float]] = None,
                origin: Optional[Sequence[float]] = None,
                direction: Optional[Sequence[float]] = None) -> Path:
    """Write ``array`` (numpy order) with the given geometry; defaults depend on 2D/3D."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    nd = array.ndim
    image.SetSpacing(tuple(spacing) if spacing is not None else (DEFAULT_SPACING_3D[:nd]))
    image.SetOrigin(tuple(origin) if origin is not None else (DEFAULT_ORIGIN_3D[:nd]))
    if direction is not None:
        image.SetDirection(tuple(direction))
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def tiny_image(shape: Tuple[int, ...], seed: int) -> np.ndarray:
    """A 'brain': positive noise inside a centred box, zero outside."""
    rng = np.random.default_rng(seed)
    arr = np.zeros(shape, np.float32)
    inner = tuple(slice(max(1, s // 4), max(2, s - s // 4)) for s in shape)
    arr[inner] = rng.uniform(10, 100, size=arr[inner].shape).astype(np.float32)
    return arr


def tiny_label(shape: Tuple[int, ...], seed: int, values: Iterable[int] = (0, 1, 2, 3)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(np.asarray(list(values), np.uint8), size=shape).astype(np.uint8)


def write_tiny_dataset(root: Union[str, Path], sequences: Sequence[str] = DEFAULT_SEQUENCES,
                       cases: Union[int, Sequence[str]] = 4, shape: Tuple[int, ...] = (6, 8, 10),
                       missing: Optional[Dict[str, Iterable[str]]] = None, name: str = "Dataset501_Tiny",
                       file_ending: str = ".nii.gz", labels: bool = False, test_cases: int = 0,
                       seed: int = 0) -> Path:
    """Write a valid tiny dataset into ``root/name`` and return its folder.

    ``cases``: a count (names ``case_000``...) or explicit names. ``missing``: ``{case: [sequence, ...]}``
    sequences left out of that case (a missing sequence is a missing file). ``labels=True`` writes
    ``labelsTr`` with values 0..3 and ``labels`` in dataset.json. ``test_cases`` writes complete
    cases ``test_000``... into ``imagesTs``.
    """
    folder = Path(root) / name
    missing = {k: set(v) for k, v in (missing or {}).items()}
    names: List[str] = [f"case_{i:03d}" for i in range(cases)] if isinstance(cases, int) else list(cases)
    for ci, case in enumerate(names):
        for si, seq in enumerate(sequences):
            if seq in missing.get(case, set()):
                continue
            write_array(tiny_image(shape, seed + 100 * ci + si), folder / "imagesTr" / f"{case}_{si:04d}{file_ending}")
        if labels:
            write_array(tiny_label(shape, seed + ci), folder / "labelsTr" / f"{case}{file_ending}")
    for ti in range(test_cases):
        for si, _ in enumerate(sequences):
            write_array(tiny_image(shape, seed + 10_000 + 100 * ti + si),
                        folder / "imagesTs" / f"test_{ti:03d}_{si:04d}{file_ending}")
    spec = {"channel_names": {str(i): s for i, s in enumerate(sequences)}, "numTraining": len(names),
            "file_ending": file_ending}
    if labels:
        spec["labels"] = {"background": 0, "NCR": 1, "ED": 2, "ET": 3}
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    with open(folder / "dataset.json", "w") as f:
        json.dump(spec, f, indent=2)
    return folder


def tree_snapshot(root: Union[str, Path]) -> Dict[str, Tuple[float, int]]:
    """{relative path: (mtime_ns, size)} of everything under ``root``: compare before/after a command."""
    root = Path(root)
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size if p.is_file() else -1)
            for p in sorted(root.rglob("*"))} if root.exists() else {}
