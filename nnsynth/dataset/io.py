"""Image I/O through SimpleITK for .nii.gz, .nii, .mha and .nrrd, 2D and 3D.

Arrays are numpy in SimpleITK's array order ((z, y, x) for 3D, (y, x) for 2D). ``Geometry`` keeps
SimpleITK's physical order (x, y, z), exactly as read, so writing back reproduces the input geometry.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Tuple, Union

import numpy as np
import SimpleITK as sitk

from nnsynth.constants import GEOMETRY_RELATIVE_TOLERANCE, SUPPORTED_FILE_ENDINGS
from nnsynth.exceptions import ImageReadError, OutputWriteError
from nnsynth.utils.files import atomic_path, describe_write_error

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Physical geometry of an image in SimpleITK order (x, y[, z])."""

    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]
    direction: Tuple[float, ...]
    shape: Tuple[int, ...]  # array order, as returned by ``read_image``

    @property
    def ndim(self) -> int:
        return len(self.spacing)

    @property
    def spacing_array_order(self) -> Tuple[float, ...]:
        """Spacing matching the numpy array axes ((z, y, x) for 3D)."""
        return tuple(self.spacing[::-1])

    def to_dict(self) -> dict:
        return {"spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(tuple(float(x) for x in d["spacing"]), tuple(float(x) for x in d["origin"]),
                   tuple(float(x) for x in d["direction"]), tuple(int(x) for x in d["shape"]))

    def mismatch(self, other: "Geometry", rtol: float = GEOMETRY_RELATIVE_TOLERANCE) -> str:
        """Describe how ``other`` differs from this geometry ('' when they agree within ``rtol``)."""
        if self.shape != other.shape:
            return f"shape {other.shape} != {self.shape}"
        with np.errstate(all="ignore"):  # NaN/Inf in a header: reported as a mismatch, not a warning
            return self._value_mismatch(other, rtol)

    def _value_mismatch(self, other: "Geometry", rtol: float) -> str:
        for name in ("spacing", "origin", "direction"):
            a, b = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            if a.shape != b.shape:
                return f"{name} has {b.size} values, expected {a.size}"
            scale = max(float(np.abs(a).max(initial=0.0)), 1.0)
            if not np.allclose(a, b, rtol=0.0, atol=rtol * scale):
                return (f"{name} {tuple(float(x) for x in np.round(b, 6))} != "
                        f"{tuple(float(x) for x in np.round(a, 6))}")
        return ""


def file_ending_of(path: PathLike) -> str:
    name = Path(path).name.lower()
    for ending in SUPPORTED_FILE_ENDINGS:
        if name.endswith(ending):
            return ending
    raise ImageReadError(f"{path}: unsupported file ending; use one of {', '.join(SUPPORTED_FILE_ENDINGS)}")


def geometry_of(image: sitk.Image) -> Geometry:
    return Geometry(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()),
                    tuple(reversed(image.GetSize())))


def read_header(path: PathLike) -> Geometry:
    """Read only the geometry (fast; no voxel data)."""
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ImageReadError(f"{path}: cannot read image header ({_first_line(e)})") from None
    return Geometry(tuple(reader.GetSpacing()), tuple(reader.GetOrigin()), tuple(reader.GetDirection()),
                    tuple(reversed(reader.GetSize())))


def read_image(path: PathLike, dtype: np.dtype = np.float32,
               check_integrity: bool = True) -> Tuple[np.ndarray, Geometry]:
    """Read an image; return (array in ``dtype``, geometry). Multi-component images are refused.

    ``check_integrity`` first streams the file's bytes to refuse truncated/corrupted files and NaN/Inf
    voxels that ITK would otherwise hand back silently as zeros (see ``nnsynth.dataset.integrity``).
    """
    if check_integrity:
        from nnsynth.dataset.integrity import scan_file
        broken, n_nan, n_inf = scan_file(path)
        if broken:
            raise ImageReadError(broken)
        if n_nan or n_inf:
            raise ImageReadError(f"{path}: contains {n_nan} NaN and {n_inf} Inf voxels; replace them "
                                 "(e.g. by 0 outside the brain) before using the image")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ImageReadError(f"{path}: cannot read image ({_first_line(e)})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                             "nnsynth expects one sequence per file")
    if image.GetDimension() not in (2, 3):
        raise ImageReadError(f"{path}: {image.GetDimension()}D images are not supported (2D or 3D only)")
    array = sitk.GetArrayFromImage(image)
    if check_integrity and array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ImageReadError(f"{path}: contains NaN or Inf voxels; replace them before using the image")
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    return array, geometry_of(image)


def write_image(array: np.ndarray, geometry: Geometry, path: PathLike, dtype: np.dtype = np.float32) -> None:
    """Write ``array`` with ``geometry`` atomically; the file ending picks the format."""
    array = np.asarray(array)
    if tuple(array.shape) != tuple(geometry.shape):
        raise ValueError(f"array shape {array.shape} does not match geometry shape {geometry.shape}")
    image = sitk.GetImageFromArray(array.astype(dtype, copy=False))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    try:
        with atomic_path(path, suffix=file_ending_of(path)) as tmp:
            sitk.WriteImage(image, str(tmp), useCompression=True)
            _verify_written(tmp)
    except (OSError, RuntimeError) as e:  # ITK reports a full disk or a read-only folder as RuntimeError
        raise OutputWriteError(describe_write_error(path, e)) from None


def _verify_written(path: Path) -> None:
    """ITK's gzip writer ignores a full disk and leaves a truncated file: check it before it gets its name."""
    from nnsynth.dataset.integrity import check_file_integrity
    problem = check_file_integrity(path) if path.stat().st_size else f"{path}: empty file"
    if not problem and path.name.lower().endswith(".nrrd"):
        try:
            sitk.ReadImage(str(path))
        except RuntimeError as e:
            problem = _first_line(e)
    if problem:
        import errno
        free = os.statvfs(path.parent)
        raise OSError(errno.ENOSPC if free.f_bavail == 0 else errno.EIO,
                      f"the written file is incomplete (disk full or a write limit?): {problem}")


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # SimpleITK errors carry the useful sentence near the end
    for ln in reversed(lines):
        if "ERROR" not in ln.upper() or ":" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else type(e).__name__
