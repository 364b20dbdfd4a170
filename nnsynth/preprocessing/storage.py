"""On-disk format of one preprocessed case, shared by preprocessing, training and inference.

A case ``c`` of a configuration folder (``nnSynth_preprocessed/DatasetXXX/{data_identifier}/``) is:

- ``c.b2nd``: float32 ``(C, Z, Y, X)`` (2D images: ``Z = 1``), every sequence of the plans in plans order;
  a sequence the case lacks is all zeros and marked unavailable in the properties.
- ``c_seg.b2nd``: int8 ``(1, Z, Y, X)``: -1 outside the case's nonzero (brain) mask, else the label value
  (0 where the case has no label file).
- ``c.json``: the properties (crop box, original geometry, availability, normalisation parameters, ...).
  It is written last and atomically, so its presence marks the case complete; a case whose ``.json``
  is missing was interrupted and is redone.

Arrays are blosc2-compressed and opened lazily, so a loader reads only the slices it needs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import blosc2
import numpy as np

from nnsynth.utils.files import atomic_path, load_json, save_json

PathLike = Union[str, os.PathLike]
_CPARAMS = {"codec": blosc2.Codec.ZSTD, "clevel": 5}


def _write_b2nd(array: np.ndarray, path: Path, chunks: Optional[Sequence[int]]) -> None:
    with atomic_path(path, suffix=".b2nd") as tmp:
        tmp.unlink()  # blosc2 refuses to open an existing path in mode 'w' on some versions
        kwargs: Dict[str, Any] = {"urlpath": str(tmp), "mode": "w", "cparams": _CPARAMS}
        if chunks is not None:
            kwargs["chunks"] = tuple(int(min(c, s)) for c, s in zip(chunks, array.shape))
        blosc2.asarray(np.ascontiguousarray(array), **kwargs)


def default_chunks(shape: Sequence[int]) -> Tuple[int, ...]:
    """One channel, a few slices, whole in-plane: cheap for 2.5D slice stacks and fine for 3D patches."""
    c, z, y, x = shape
    return (1, min(z, 4), y, x)


def save_case(folder: PathLike, case: str, data: np.ndarray, seg: np.ndarray, properties: dict,
              chunks: Optional[Sequence[int]] = None) -> None:
    """Write one case; the properties file goes last so a crash never leaves a case that looks complete."""
    folder = Path(folder)
    if data.ndim != 4 or seg.ndim != 4 or seg.shape[1:] != data.shape[1:] or seg.shape[0] != 1:
        raise ValueError(f"expected data (C,Z,Y,X) and seg (1,Z,Y,X), got {data.shape} and {seg.shape}")
    props_path = folder / f"{case}.json"
    if props_path.exists():
        props_path.unlink()  # invalidate first: a crash mid-rewrite must not leave old props over new data
    chunks = chunks or default_chunks(data.shape)
    _write_b2nd(data.astype(np.float32, copy=False), folder / f"{case}.b2nd", chunks)
    _write_b2nd(seg.astype(np.int8, copy=False), folder / f"{case}_seg.b2nd", (1,) + tuple(chunks[1:]))
    save_json(properties, props_path)


def case_is_complete(folder: PathLike, case: str) -> bool:
    folder = Path(folder)
    return all((folder / n).is_file() for n in (f"{case}.json", f"{case}.b2nd", f"{case}_seg.b2nd"))


def list_cases(folder: PathLike) -> List[str]:
    """Complete cases of a configuration folder, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = [p.stem for p in folder.glob("*.json") if not p.name.startswith(".")]
    return sorted(n for n in names if case_is_complete(folder, n))


def load_properties(folder: PathLike, case: str) -> dict:
    return load_json(Path(folder) / f"{case}.json")


def open_case(folder: PathLike, case: str, single_threaded: bool = False) -> Tuple[Any, Any, dict]:
    """Open a case lazily: (data, seg, properties); slicing the arrays returns numpy.

    ``single_threaded``: decompress on the calling thread only. Arrays that forked data-loading workers will read
    must be opened so: blosc2's decompression threads do not survive a fork, and a worker reading a box large
    enough for the threaded path waits on them forever (seen with 3d patches on a 16-core GPU machine).
    """
    folder = Path(folder)
    kwargs = {"dparams": {"nthreads": 1}} if single_threaded else {}
    data = blosc2.open(str(folder / f"{case}.b2nd"), mode="r", **kwargs)
    seg = blosc2.open(str(folder / f"{case}_seg.b2nd"), mode="r", **kwargs)
    return data, seg, load_properties(folder, case)


def load_case(folder: PathLike, case: str) -> Tuple[np.ndarray, np.ndarray, dict]:
    """Load a whole case into memory as numpy arrays."""
    data, seg, props = open_case(folder, case)
    return data[:], seg[:], props
