"""Folder conventions (CONTRACT.md section 1) and dataset id <-> name resolution.

Nothing is read at import: each accessor looks at the environment when called, so an unset variable
never breaks ``import nnsynth``. A variable that is unset falls back to ``./nnsynth_data/<sub>`` and
says so once.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import List, Optional, Set, Union

from nnsynth.constants import (DATASET_ID_DIGITS, DEFAULT_DATA_ROOT, DEFAULT_SUBFOLDERS, ENV_PREPROCESSED,
                               ENV_RAW, ENV_RESULTS)
from nnsynth.exceptions import DatasetNotFoundError, NnsynthError

logger = logging.getLogger(__name__)
_warned: Set[str] = set()
_DATASET_RE = re.compile(r"^Dataset(\d{3})_(.+)$")


def _folder(var: str) -> Path:
    value = os.environ.get(var)
    if value:
        return Path(value)
    default = Path.cwd() / DEFAULT_DATA_ROOT / DEFAULT_SUBFOLDERS[var]
    if var not in _warned:
        logger.info("%s is not set; using %s (export %s=/path to choose another folder)", var, default, var)
        _warned.add(var)
    return default


def use_data_root(root: Union[str, Path], create: bool = False) -> None:
    """Point the three folder variables at ``root``/raw, /preprocessed and /results (the layout of the default
    ./nnsynth_data), for scripts and benchmarks that keep a whole run in one work folder; ``create`` makes the
    three folders."""
    for var, sub in DEFAULT_SUBFOLDERS.items():
        os.environ[var] = str(Path(root) / sub)
        if create:
            (Path(root) / sub).mkdir(parents=True, exist_ok=True)


def raw_folder() -> Path:
    return _folder(ENV_RAW)


def preprocessed_folder() -> Path:
    return _folder(ENV_PREPROCESSED)


def results_folder() -> Path:
    return _folder(ENV_RESULTS)


def dataset_name_from_folder(name: str) -> Optional[int]:
    """Return the id of a ``DatasetXXX_Name`` folder name, or None if the name does not match."""
    m = _DATASET_RE.match(name)
    return int(m.group(1)) if m else None


def make_dataset_name(dataset_id: int, name: str) -> str:
    if not 0 <= dataset_id < 10 ** DATASET_ID_DIGITS:
        raise NnsynthError(f"Dataset id must be between 0 and 999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise NnsynthError(f"Dataset name {name!r} may only contain letters, digits, '_' and '-'")
    return f"Dataset{dataset_id:03d}_{name}"


def _candidates(dataset_id: int) -> List[str]:
    found: Set[str] = set()
    for base in (raw_folder(), preprocessed_folder(), results_folder()):
        if base.is_dir():
            for p in base.iterdir():
                if p.is_dir() and dataset_name_from_folder(p.name) == dataset_id:
                    found.add(p.name)
    return sorted(found)


def resolve_dataset_name(dataset: Union[str, int]) -> str:
    """Turn ``501``, ``"501"``, ``"Dataset501_BrainDemo"`` into the dataset's folder name.

    Ids are looked up in the raw, preprocessed and results folders; zero or several matching names
    are an error that lists what was searched or found.
    """
    text = str(dataset).strip()
    if _DATASET_RE.match(text):
        return text
    if not (text.isascii() and text.isdigit()):
        raise DatasetNotFoundError(
            f"{text!r} is neither a dataset id (e.g. 501) nor a dataset name (e.g. Dataset501_BrainDemo)")
    dataset_id = int(text)
    names = _candidates(dataset_id)
    if not names:
        raise DatasetNotFoundError(
            f"No dataset with id {dataset_id:03d} in {raw_folder()}, {preprocessed_folder()} or "
            f"{results_folder()}. Create one (e.g. nnsynth_make_demo_dataset -d {dataset_id}) or set "
            f"{ENV_RAW}/{ENV_PREPROCESSED}/{ENV_RESULTS}.")
    if len(names) > 1:
        raise DatasetNotFoundError(
            f"Dataset id {dataset_id:03d} is ambiguous: {', '.join(names)}. Pass the full name instead "
            f"(-d {names[0]}) or remove the stale folder.")
    return names[0]


def raw_dataset_folder(dataset: Union[str, int]) -> Path:
    """The raw folder of a dataset, which must exist."""
    name = resolve_dataset_name(dataset)
    folder = raw_folder() / name
    if not folder.is_dir():
        raise DatasetNotFoundError(f"Raw dataset folder {folder} does not exist (check {ENV_RAW})")
    return folder


def preprocessed_dataset_folder(dataset: Union[str, int]) -> Path:
    return preprocessed_folder() / resolve_dataset_name(dataset)


def results_dataset_folder(dataset: Union[str, int]) -> Path:
    return results_folder() / resolve_dataset_name(dataset)


def model_folder(dataset: Union[str, int], trainer: str, plans: str, configuration: str) -> Path:
    """``nnSynth_results/DatasetXXX_Name/{trainer}__{plans}__{configuration}``."""
    return results_dataset_folder(dataset) / f"{trainer}__{plans}__{configuration}"
