"""Atomic file writing: a crash or Ctrl-C never leaves a half-written file under its final name."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(final_path: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target folder; rename it onto ``final_path`` only on success.

    The temporary name keeps ``suffix`` (e.g. ``.nii.gz``) so writers that infer the format from the
    extension still work. On any exception the temporary file is removed and the old file, if any,
    stays untouched.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix or "".join(final_path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{final_path.name.split('.')[0]}.", suffix=".tmp" + suffix,
                               dir=final_path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final_path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


#: errno values that mean "this location cannot take the file" (not a bug in nnsynth)
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


def describe_write_error(path: PathLike, error: BaseException) -> str:
    """An actionable sentence for a failed write of ``path``: free space and writability of its folder."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    hints = []
    try:
        free = shutil.disk_usage(folder).free
        hints.append(f"{free / 2 ** 20:.1f} MiB free on that disk")
    except OSError:
        pass
    if not os.access(folder, os.W_OK):
        hints.append(f"{folder} is not writable")
    detail = getattr(error, "strerror", None) or str(error).strip().splitlines()[-1:] or [type(error).__name__]
    detail = detail if isinstance(detail, str) else detail[0]
    return (f"cannot write {path} ({detail}{'; ' + ', '.join(hints) if hints else ''}). Free disk space or "
            f"choose a writable output folder, then re-run; nothing partial was left behind")


def atomic_write(final_path: PathLike, writer: Callable[[Path], None], suffix: str = "") -> None:
    """Call ``writer(tmp_path)`` and move the result to ``final_path`` atomically."""
    with atomic_path(final_path, suffix) as tmp:
        writer(tmp)


def save_json(obj: Any, path: PathLike, indent: int = 2) -> None:
    """Write JSON atomically (sorted keys off, so plans keep their readable order)."""
    def _w(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, default=_json_default)
            f.write("\n")
    atomic_write(path, _w, suffix=".json")


def load_json(path: PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def _json_default(o: Any) -> Any:
    import numpy as np
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serialisable")
