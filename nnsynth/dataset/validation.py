"""Read-only validation of a raw nnsynth dataset (CONTRACT.md section 2).

Every problem is collected and reported at once, each naming its file, so a user fixes a dataset in
one round instead of one error per run. Nothing here writes to disk.

Images are checked one at a time (header first, then voxel data), so memory stays bounded by the
largest single image; ``num_workers > 0`` spreads the per-file checks over a process pool.

Problems (the dataset cannot be used as is) versus warnings (it can, with a limitation):

- a training case with a single sequence is a *warning*: it cannot serve as a paired synthesis
  example, but it is still useful for self-reconstruction (autoencoder / codebook) training;
- a sequence present in no training case, and pairs of sequences never seen together, are warnings;
- everything listed in CONTRACT.md section 2 is a problem.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import multiprocessing
import os
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from nnsynth.constants import DATASET_JSON, SUPPORTED_FILE_ENDINGS
from nnsynth.dataset.cases import Case, availability_table, discover_cases
from nnsynth.dataset.dataset_json import DatasetSpec, parse_dataset_json_dict
from nnsynth.dataset.integrity import scan_file
from nnsynth.dataset.io import Geometry, read_header, read_image
from nnsynth.exceptions import DatasetFormatError
from nnsynth.utils.log import progress_disabled

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

# Folder names of the raw format (nnU-Net v2).
IMAGES_TR = "imagesTr"
LABELS_TR = "labelsTr"
IMAGES_TS = "imagesTs"
# How many names a warning lists before abbreviating.
MAX_NAMES_IN_MESSAGE = 10

_IMAGE = "image"
_LABEL = "label"


@dataclasses.dataclass
class ValidationReport:
    """Outcome of :func:`validate_dataset`: what was found, every problem and every warning."""

    dataset_folder: Path
    spec: Optional[DatasetSpec]
    cases: Dict[str, Case]
    test_cases: Dict[str, Case]
    availability: pd.DataFrame
    test_availability: pd.DataFrame
    problems: List[str] = dataclasses.field(default_factory=list)
    warnings: List[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_problems(self) -> None:
        """Raise :class:`DatasetFormatError` listing every problem (no-op for a valid dataset)."""
        if self.problems:
            raise DatasetFormatError(self.problems, header=f"Dataset {self.dataset_folder} is not valid")


@dataclasses.dataclass
class _FileCheck:
    """Result of checking one file; small, so it travels cheaply back from a worker process."""

    path: str
    geometry: Optional[Geometry]
    problems: List[str]


# --------------------------------------------------------------------------------------------------
# per-file checks (run in worker processes when num_workers > 0)
# --------------------------------------------------------------------------------------------------
def _check_file(task: Tuple[str, str, bool, Optional[Tuple[int, ...]]]) -> _FileCheck:
    """Check one image or label file. ``geometry`` is None when the file is unreadable."""
    path, kind, check_voxels, allowed_labels = task
    try:
        geometry = read_header(path)
    except Exception as e:  # noqa: BLE001 - any failure to read is a problem of that file
        return _FileCheck(path, None, [_read_message(path, e, "header")])
    if geometry.ndim not in (2, 3):
        return _FileCheck(path, None, [f"{path}: {geometry.ndim}D image; nnsynth supports 2D and 3D only"])
    if not check_voxels:
        return _FileCheck(path, geometry, [])
    broken, n_nan, n_inf = scan_file(path)
    if broken:
        return _FileCheck(path, None, [broken])
    try:
        array, geometry = read_image(path, dtype=None, check_integrity=False)
    except Exception as e:  # noqa: BLE001
        return _FileCheck(path, None, [_read_message(path, e, "voxel data")])
    if kind == _LABEL:
        problems = _label_problems(path, array, allowed_labels, nonfinite=n_nan + n_inf)
    else:
        problems = _image_problems(path, array, n_nan, n_inf)
    return _FileCheck(path, geometry, problems)


def _read_message(path: str, e: Exception, what: str) -> str:
    text = str(e)
    if text.startswith(str(path)):  # ImageReadError already names the file
        return f"{text} (unreadable {what}: corrupted, truncated or not an image?)"
    return f"{path}: cannot read {what} ({type(e).__name__}: {text.splitlines()[0] if text else ''})"


def _image_problems(path: str, array: np.ndarray, n_nan: int = 0, n_inf: int = 0) -> List[str]:
    """NaN/Inf (counted from the file for NIfTI, whose reader zeroes NaN) and all-zero images."""
    problems: List[str] = []
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        n_nan, n_inf = max(n_nan, int(np.isnan(array).sum())), max(n_inf, int(np.isinf(array).sum()))
    if n_nan or n_inf:
        parts = [f"{n} {what} voxel{'s' if n != 1 else ''}" for n, what in ((n_nan, "NaN"), (n_inf, "Inf")) if n]
        problems.append(f"{path}: contains {' and '.join(parts)} (of {array.size}); "
                        "replace them (e.g. by 0) before using the dataset")
    if not array.any():
        problems.append(f"{path}: image is all zeros; delete the file to mark the sequence as missing")
    return problems


def _label_problems(path: str, array: np.ndarray, allowed: Optional[Tuple[int, ...]],
                    nonfinite: int = 0) -> List[str]:
    if np.issubdtype(array.dtype, np.floating):
        if nonfinite or not np.isfinite(array).all():
            return [f"{path}: label file contains NaN/Inf values; labels must be integers"]
        fractional = array != np.rint(array)
        if fractional.any():
            example = float(array[fractional].flat[0])
            return [f"{path}: label file has non-integer values (e.g. {example:g}); labels must be integers"]
    elif not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        return [f"{path}: label file has pixel type {array.dtype}; labels must be integers"]
    if allowed is None:
        return []
    values = np.unique(array).astype(np.int64)
    extra = sorted(set(values.tolist()) - set(allowed))
    if extra:
        return [f"{path}: label values {extra} are not in dataset.json 'labels' (allowed: {sorted(allowed)})"]
    return []


def _run_checks(tasks: Sequence[Tuple[str, str, bool, Optional[Tuple[int, ...]]]],
                num_workers: int) -> Dict[str, _FileCheck]:
    """Check every file, serially or with a spawn pool (fork is unsafe with ITK/torch threads)."""
    results: Dict[str, _FileCheck] = {}
    progress = _progress(len(tasks))
    if num_workers > 0 and len(tasks) > 1:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(num_workers, len(tasks))) as pool:
            for r in pool.imap_unordered(_check_file, tasks, chunksize=max(1, len(tasks) // (8 * num_workers))):
                results[r.path] = r
                progress.update(1)
    else:
        for t in tasks:
            r = _check_file(t)
            results[r.path] = r
            progress.update(1)
    progress.close()
    return results


def _progress(total: int):
    try:
        from tqdm import tqdm
        # disable=None: only shown on a terminal, so logs and tests stay clean
        return tqdm(total=total, desc="Checking images", unit="file", disable=progress_disabled(), leave=False)
    except ImportError:  # pragma: no cover - tqdm is a dependency, but validation should not need it
        class _NoProgress:
            def update(self, n: int) -> None:
                pass

            def close(self) -> None:
                pass
        return _NoProgress()


# --------------------------------------------------------------------------------------------------
# dataset.json
# --------------------------------------------------------------------------------------------------
def _load_spec(folder: Path, problems: List[str]) -> Tuple[Optional[DatasetSpec], Optional[DatasetSpec], bool]:
    """Return (strict spec, working spec, numTraining usable).

    The strict spec is None when dataset.json has any problem. The working spec is the best effort
    used to still check the images (e.g. ``file_ending`` inferred from the files), so that one run
    reports dataset.json problems *and* image problems.
    """
    path = folder / DATASET_JSON
    if not path.is_file():
        problems.append(f"{path}: file not found (every dataset needs a dataset.json with "
                        "channel_names, numTraining and file_ending)")
        return None, None, False
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.append(f"{path}: not valid JSON ({e})")
        return None, None, False
    except OSError as e:
        problems.append(f"{path}: cannot be read ({e})")
        return None, None, False
    spec, json_problems = _safe_parse(d, str(path))
    if spec is not None:
        return spec, spec, True
    problems.extend(json_problems)
    if not isinstance(d, dict):
        return None, None, False
    # best effort: repair what can be repaired without guessing the sequences
    repaired = dict(d)
    num_training_ok = isinstance(d.get("numTraining"), int) and not isinstance(d.get("numTraining"), bool) \
        and d.get("numTraining") >= 0
    if not num_training_ok:
        repaired["numTraining"] = 0
    if d.get("file_ending") not in SUPPORTED_FILE_ENDINGS:
        inferred = _infer_file_ending(folder / IMAGES_TR)
        if inferred is None:
            return None, None, False
        repaired["file_ending"] = inferred
    working, _ = _safe_parse(repaired, str(path))
    if working is None and "labels" in repaired:  # bad labels: still check the images, without labels
        repaired.pop("labels")
        working, _ = _safe_parse(repaired, str(path))
    return None, working, num_training_ok


def _safe_parse(d: object, where: str) -> Tuple[Optional[DatasetSpec], List[str]]:
    """parse_dataset_json_dict, turning an unexpected crash on odd input into a reported problem."""
    try:
        return parse_dataset_json_dict(d, where)
    except Exception as e:  # noqa: BLE001 - junk JSON must never produce a traceback
        return None, [f"{where}: cannot be interpreted ({type(e).__name__}: {e})"]


def _infer_file_ending(images_folder: Path) -> Optional[str]:
    if not images_folder.is_dir():
        return None
    counts: Counter = Counter()
    for p in images_folder.iterdir():
        for ending in SUPPORTED_FILE_ENDINGS:  # .nii.gz is listed before .nii, so it wins
            if p.name.lower().endswith(ending):
                counts[ending] += 1
                break
    return counts.most_common(1)[0][0] if counts else None


# --------------------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------------------
def validate_dataset(dataset_folder: PathLike, check_images: bool = True, num_workers: int = 0) -> ValidationReport:
    """Check a raw dataset folder and return a report with every problem and warning.

    ``check_images=False`` reads only image headers (names, readability of headers, geometry), which is
    fast; the default also reads voxel data (NaN/Inf, all-zero images, label values). Never writes.
    """
    folder = Path(dataset_folder)
    problems: List[str] = []
    warnings: List[str] = []
    empty = pd.DataFrame()
    if not folder.is_dir():
        problems.append(f"{folder}: dataset folder not found")
        return ValidationReport(folder, None, {}, {}, empty, empty, problems, warnings)

    spec, working, num_training_ok = _load_spec(folder, problems)
    images_tr = folder / IMAGES_TR
    if not images_tr.is_dir():
        problems.append(f"{images_tr}: folder not found (training images go in "
                        f"{IMAGES_TR}/{{case}}_{{XXXX}}{{file_ending}})")
    elif not any(p.is_file() and not p.name.startswith(".") for p in images_tr.iterdir()):
        problems.append(f"{images_tr}: folder is empty; a dataset needs at least one training case")
    if working is None:
        return ValidationReport(folder, spec, {}, {}, empty, empty, problems, warnings)

    labels_tr, images_ts = folder / LABELS_TR, folder / IMAGES_TS
    cases = discover_cases(images_tr, working, labels_tr, problems)
    test_cases = discover_cases(images_ts, working, None, problems) if images_ts.is_dir() else {}
    for sub in (images_tr, images_ts, labels_tr):
        if sub.is_dir():
            for p in sorted(sub.iterdir()):
                if p.is_dir() and not p.name.startswith("."):
                    warnings.append(f"{p}: sub-folder ignored (files must lie directly in {sub.name})")

    label_files = _check_label_names(labels_tr, cases, working, problems)
    if label_files and working.labels is None:
        warnings.append(f"{labels_tr}: label files found but dataset.json has no 'labels'; "
                        "label values are checked to be integers only")

    allowed = _allowed_label_values(working)
    tasks: List[Tuple[str, str, bool, Optional[Tuple[int, ...]]]] = []
    for c in itertools.chain(cases.values(), test_cases.values()):
        tasks.extend((str(p), _IMAGE, check_images, None) for _, p in sorted(c.images.items()))
        if c.label is not None:
            tasks.append((str(c.label), _LABEL, check_images, allowed))
    logger.info("Checking %d files of %d training and %d test cases in %s", len(tasks), len(cases),
                len(test_cases), folder)
    results = _run_checks(tasks, num_workers)

    for c in itertools.chain(cases.values(), test_cases.values()):
        problems.extend(_case_problems(c, results))

    if num_training_ok and working.num_training != len(cases):
        problems.append(f"{folder / DATASET_JSON}: numTraining is {working.num_training} but {IMAGES_TR} holds "
                        f"{len(cases)} case{'s' if len(cases) != 1 else ''} (numTraining counts cases, not files)")

    availability = availability_table(cases, working)
    test_availability = availability_table(test_cases, working)
    warnings.extend(_availability_warnings(availability, cases, labels_tr if label_files else None))
    _dimension_problem(cases, results, problems)
    return ValidationReport(folder, spec, cases, test_cases, availability, test_availability, problems, warnings)


def _allowed_label_values(spec: DatasetSpec) -> Optional[Tuple[int, ...]]:
    """Label values a label file may hold; nnU-Net region labels (lists of ints) count too."""
    raw = spec.raw.get("labels") if isinstance(spec.raw, dict) else None
    if not isinstance(raw, dict) or not spec.labels:
        return None
    values = set(spec.labels.values())
    for v in raw.values():
        if isinstance(v, (list, tuple)):
            values.update(x for x in v if isinstance(x, int) and not isinstance(x, bool))
    return tuple(sorted(values))


def _check_label_names(labels_tr: Path, cases: Dict[str, Case], spec: DatasetSpec,
                       problems: List[str]) -> List[Path]:
    """Report label files that are misnamed or belong to no case (a case without any sequence)."""
    if not labels_tr.is_dir():
        return []
    files = [p for p in sorted(labels_tr.iterdir()) if p.is_file() and not p.name.startswith(".")]
    for p in files:
        if not p.name.endswith(spec.file_ending):
            problems.append(f"{p}: label name does not follow {{case}}{spec.file_ending}")
            continue
        case = p.name[: -len(spec.file_ending)]
        if case not in cases:
            problems.append(f"{p}: label file without images: case {case!r} has no sequence in "
                            f"{IMAGES_TR} (a case needs at least one sequence)")
    return files


def _case_problems(case: Case, results: Dict[str, _FileCheck]) -> List[str]:
    """File problems plus geometry consistency within the case (images and label)."""
    problems: List[str] = []
    files = [p for _, p in sorted(case.images.items())] + ([case.label] if case.label is not None else [])
    for p in files:
        problems.extend(results[str(p)].problems)
    readable = [(p, results[str(p)].geometry) for _, p in sorted(case.images.items())
                if results[str(p)].geometry is not None]
    if not readable:
        return problems
    dims = {g.ndim for _, g in readable}
    if len(dims) > 1:
        listing = ", ".join(f"{p.name} ({g.ndim}D)" for p, g in readable)
        problems.append(f"case {case.name!r}: mixes 2D and 3D images: {listing}")
        return problems
    ref_path, ref = readable[0]
    for p, g in readable[1:]:
        diff = ref.mismatch(g)
        if diff:
            problems.append(f"{p}: geometry differs from {ref_path} within case {case.name!r}: {diff}")
    if case.label is not None and results[str(case.label)].geometry is not None:
        g = results[str(case.label)].geometry
        diff = f"{g.ndim}D label, {ref.ndim}D images" if g.ndim != ref.ndim else ref.mismatch(g)
        if diff:
            problems.append(f"{case.label}: label geometry differs from its image {ref_path}: {diff}")
    return problems


def _names(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(names[:MAX_NAMES_IN_MESSAGE])
    return shown + (f", ... ({len(names)} in all)" if len(names) > MAX_NAMES_IN_MESSAGE else "")


def _availability_warnings(df: pd.DataFrame, cases: Dict[str, Case], labels_tr: Optional[Path]) -> List[str]:
    warnings: List[str] = []
    if df.empty:
        return warnings
    counts = df.sum(axis=0)
    for seq, n in counts.items():
        if n == 0:
            warnings.append(f"sequence {seq!r} is present in no training case: nnsynth can neither learn to "
                            "synthesize it nor use it as an input")
    single = df.index[df.sum(axis=1) == 1].tolist()
    if single:
        warnings.append(f"{len(single)} training case{'s have' if len(single) != 1 else ' has'} only one sequence "
                        f"({_names(single)}): used for self-reconstruction only, not as paired synthesis examples")
    present = [s for s in df.columns if counts[s] > 0]
    never = [f"{a}+{b}" for a, b in itertools.combinations(present, 2) if not (df[a] & df[b]).any()]
    if never:
        warnings.append(f"sequence pairs never present together in one training case: {_names(never)}; "
                        "synthesis between them has no direct paired example")
    if labels_tr is not None:
        unlabelled = [n for n, c in cases.items() if c.label is None]
        if unlabelled:
            warnings.append(f"{len(unlabelled)} training case(s) have no label in {labels_tr} "
                            f"({_names(unlabelled)}); label-based training uses labelled cases only")
    return warnings


def _dimension_problem(cases: Dict[str, Case], results: Dict[str, _FileCheck], problems: List[str]) -> None:
    """2D and 3D training cases in one dataset cannot share one plan: a problem (planning refuses it too)."""
    by_dim: Dict[int, List[str]] = {}
    for name, c in cases.items():
        for p in c.images.values():
            g = results[str(p)].geometry
            if g is not None:
                by_dim.setdefault(g.ndim, []).append(name)
                break
    if len(by_dim) > 1:
        problems.append("the dataset mixes " + " and ".join(
            f"{d}D cases ({_names(sorted(set(n)))})" for d, n in sorted(by_dim.items())) +
            "; one plan cannot serve both: put the 2D and the 3D images in separate datasets")

