"""Integrity checks that ITK does not do.

ITK's NIfTI reader silently accepts a truncated ``.nii``/``.nii.gz`` (missing voxels come back as zeros)
and turns NaN voxels into 0; its MetaImage reader accepts a corrupted zlib stream. These functions read
the file's own bytes, streamed in chunks (bounded memory), to catch that before the data is used.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from typing import Dict, Optional, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]

# Chunk size for streaming integrity checks of compressed files (bounded memory).
INTEGRITY_CHUNK_BYTES = 1 << 20
_MHA_ELEMENT_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
                      "MET_UINT": 4, "MET_LONG": 8, "MET_ULONG": 8, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8,
                      "MET_FLOAT": 4, "MET_DOUBLE": 8}


def check_file_integrity(path: PathLike) -> str:
    """Detect truncated or corrupted NIfTI / compressed MetaImage files ('' when intact)."""
    return scan_file(path)[0]


def scan_file(path: PathLike) -> Tuple[str, int, int]:
    """Return (integrity problem or '', NaN count, Inf count) from the file's own bytes.

    Needed because ITK's NIfTI reader silently accepts a truncated ``.nii``/``.nii.gz`` (missing voxels
    come back as zeros) and turns NaN voxels into 0, and its MetaImage reader accepts a corrupted zlib
    stream. The file is streamed in chunks, so memory stays small. NaN/Inf counts are only taken
    from NIfTI files here (other formats keep NaN through ITK and are checked on the array).
    """
    name = str(path).lower()
    try:
        if name.endswith(".nii.gz"):
            return _scan_nifti(path, gzip.open(path, "rb"), compressed=True)
        if name.endswith(".nii"):
            return _scan_nifti(path, open(path, "rb"), compressed=False)
        if name.endswith(".mha"):
            return _check_mha(path), 0, 0
    except (EOFError, OSError, zlib.error) as e:
        return f"{path}: corrupted or truncated file ({type(e).__name__}: {e})", 0, 0
    return "", 0, 0


def _scan_nifti(path: PathLike, f, compressed: bool) -> Tuple[str, int, int]:
    with f:
        head = f.read(540)
        info = _nifti_layout(head)
        total = len(head)
        n_nan = n_inf = 0
        dtype = info[1] if info is not None else None
        pending = head[info[0]:] if info is not None and dtype is not None else b""
        skip = max(0, info[0] - len(head)) if info is not None else 0  # header longer than 540 bytes
        while True:  # read to the end: gzip raises on a truncated stream or a bad CRC
            chunk = f.read(INTEGRITY_CHUNK_BYTES)
            if dtype is not None:
                data, skip = chunk[skip:], max(0, skip - len(chunk))
                pending += data
                usable = len(pending) - len(pending) % dtype.itemsize
                if usable:
                    values = np.frombuffer(pending[:usable], dtype=dtype)
                    finite = np.isfinite(values)
                    if not finite.all():
                        n_nan += int(np.isnan(values).sum())
                        n_inf += int(np.isinf(values).sum())
                    pending = pending[usable:]
            if not chunk:
                break
            total += len(chunk)
    if info is None:
        return "", 0, 0  # not a header we understand; leave the verdict to ITK
    expected = info[0] + info[2]
    if total < expected:
        what = "decompressed data" if compressed else "file"
        return (f"{path}: truncated file: {what} holds {total} bytes but the NIfTI header "
                f"announces {expected}", 0, 0)
    return "", n_nan, n_inf


def _nifti_layout(head: bytes) -> Optional[Tuple[int, Optional[np.dtype], int]]:
    """(vox_offset, float dtype or None, voxel bytes) from a NIfTI-1/2 header; None if not NIfTI."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            datatype = struct.unpack(endian + "h", head[70:72])[0]
            dim = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            datatype = struct.unpack(endian + "h", head[12:14])[0]
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            dim = struct.unpack(endian + "8q", head[16:80])
            offset = struct.unpack(endian + "q", head[168:176])[0]
            break
    else:
        return None
    n = int(dim[0])
    if not 1 <= n <= 7 or bitpix <= 0:
        return None
    nvox = int(np.prod([max(int(d), 1) for d in dim[1:n + 1]], dtype=np.int64))
    float_dtype = {16: np.dtype(endian + "f4"), 64: np.dtype(endian + "f8")}.get(int(datatype))
    return max(int(offset), 0), float_dtype, nvox * bitpix // 8


def _check_mha(path: PathLike) -> str:
    """Decompress the zlib payload of a compressed single-file MetaImage to check it."""
    fields: Dict[str, str] = {}
    with open(path, "rb") as f:
        while True:
            line = f.readline(4096)
            if not line:
                return ""  # no ElementDataFile line: ITK reports it
            key, _, value = line.decode("latin-1").partition("=")
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
        if fields.get("ElementDataFile", "").upper() != "LOCAL" or \
                fields.get("CompressedData", "False").lower() != "true":
            return ""
        d = zlib.decompressobj()
        total = 0
        while True:
            chunk = f.read(INTEGRITY_CHUNK_BYTES)
            if not chunk:
                break
            total += len(d.decompress(chunk))
            if d.eof:
                break
        if not d.eof:
            return f"{path}: truncated file: compressed voxel data ends early"
    try:
        dims = [int(x) for x in fields.get("DimSize", "").split()]
        expected = int(np.prod(dims, dtype=np.int64)) * _MHA_ELEMENT_BYTES[fields.get("ElementType", "")] * \
            int(fields.get("ElementNumberOfChannels", "1"))
    except (ValueError, KeyError):
        return ""
    if total < expected:
        return f"{path}: truncated file: decompressed voxel data holds {total} bytes, expected {expected}"
    return ""
