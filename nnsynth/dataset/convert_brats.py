"""Convert a BraTS-2023-style folder into an nnsynth raw dataset (``nnSynth_raw/DatasetXXX_Name``).

Input: one sub-folder per case (any depth below the given folders), files ``{case}-t1n.nii.gz``,
``-t1c``, ``-t2w``, ``-t2f`` and optionally ``-seg.nii.gz`` (BraTS 2023/2024 GLI, MEN, MET, PED, SSA
naming). Cases may lack any sequence (BraSyn validation data): a case keeps what it has.

The input is only read. The dataset is assembled in a hidden temporary folder next to the target,
validated there, and renamed into place only when valid, so a failed or interrupted conversion
leaves nothing behind under the final name.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import SimpleITK as sitk

from nnsynth.constants import DATASET_JSON
from nnsynth.dataset.cases import image_filename
from nnsynth.dataset.validation import IMAGES_TR, IMAGES_TS, LABELS_TR, validate_dataset
from nnsynth.exceptions import DatasetFormatError, NnsynthError
from nnsynth.paths import make_dataset_name, raw_folder, resolve_dataset_name
from nnsynth.utils.files import save_json

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

# BraTS 2023 suffix -> (channel id, nnsynth sequence name)
BRATS_SEQUENCES = {"t1n": (0, "T1"), "t1c": (1, "T1Gd"), "t2w": (2, "T2"), "t2f": (3, "Flair")}
BRATS_CHANNEL_NAMES = {str(cid): name for cid, name in sorted(BRATS_SEQUENCES.values())}
# BraTS 2023 label convention: 1 necrotic tumour core, 2 peritumoral oedema, 3 enhancing tumour
BRATS_LABELS = {"background": 0, "NCR": 1, "ED": 2, "ET": 3}
BRATS_SEG_SUFFIX = "seg"
BRATS_FILE_ENDING = ".nii.gz"
_BRATS_FILE_RE = re.compile(r"^(?P<case>.+)-(?P<kind>t1n|t1c|t2w|t2f|seg)\.nii(?P<gz>\.gz)?$", re.IGNORECASE)


@dataclasses.dataclass
class BratsCase:
    """Source files of one BraTS case."""

    name: str
    images: Dict[int, Path]
    seg: Optional[Path] = None
    test: bool = False


def find_brats_cases(folders: Sequence[PathLike], test: bool = False) -> Dict[str, BratsCase]:
    """Find every BraTS case below ``folders``; raise listing every naming conflict."""
    cases: Dict[str, BratsCase] = {}
    problems: List[str] = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            problems.append(f"{folder}: input folder not found")
            continue
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                m = _BRATS_FILE_RE.match(fn)
                if not m:
                    if not fn.startswith("."):
                        logger.debug("ignoring %s (not a BraTS image name)", Path(dirpath) / fn)
                    continue
                path = Path(dirpath) / fn
                name, kind = m.group("case"), m.group("kind").lower()
                case = cases.setdefault(name, BratsCase(name, {}, test=test))
                if case.test != test:
                    problems.append(f"{path}: case {name!r} appears both in training and test input folders")
                    continue
                if kind == BRATS_SEG_SUFFIX:
                    if case.seg is not None and case.seg != path:
                        problems.append(f"{path}: case {name!r} has two segmentations ({case.seg})")
                    case.seg = path
                else:
                    cid = BRATS_SEQUENCES[kind][0]
                    if cid in case.images and case.images[cid] != path:
                        problems.append(f"{path}: case {name!r} has two {kind} files ({case.images[cid]})")
                    case.images[cid] = path
    for c in cases.values():
        if not c.images:
            problems.append(f"{c.seg}: case {c.name!r} has a segmentation but no image "
                            f"(-t1n/-t1c/-t2w/-t2f{BRATS_FILE_ENDING}); a case needs at least one sequence")
    if problems:
        raise DatasetFormatError(problems, header="Cannot convert the BraTS folder")
    return dict(sorted(cases.items()))


def _transfer(src: Path, dst: Path, mode: str) -> None:
    """Copy or symlink ``src`` to ``dst``; an uncompressed .nii is re-written as .nii.gz."""
    if not src.name.lower().endswith(".gz"):
        image = sitk.ReadImage(str(src))  # keeps pixel type and geometry
        sitk.WriteImage(image, str(dst), useCompression=True)
    elif mode == "symlink":
        os.symlink(src.resolve(), dst)
    else:
        shutil.copyfile(src, dst)


def convert_brats(input_folders: Sequence[PathLike], dataset_id: int, name: str = "BraTS",
                  mode: str = "copy", test_folders: Sequence[PathLike] = (), overwrite: bool = False,
                  num_workers: int = 0) -> Path:
    """Write ``nnSynth_raw/Dataset{id}_{name}`` from BraTS folders and return it (validated).

    ``input_folders`` go to imagesTr (with labelsTr where a segmentation exists); ``test_folders`` go
    to imagesTs. ``mode`` is ``copy`` or ``symlink``.
    """
    if mode not in ("copy", "symlink"):
        raise NnsynthError(f"mode must be 'copy' or 'symlink', got {mode!r}")
    dataset_name = make_dataset_name(dataset_id, name)
    try:
        existing = resolve_dataset_name(dataset_id)
    except NnsynthError:
        existing = None
    if existing is not None and existing != dataset_name:
        raise NnsynthError(f"Dataset id {dataset_id:03d} is already used by {existing}; pick another id "
                           f"or remove that dataset")
    target = raw_folder() / dataset_name
    if target.exists() and not overwrite:
        raise NnsynthError(f"{target} already exists; pass --overwrite to replace it")

    cases = find_brats_cases(input_folders)
    test_cases = find_brats_cases(test_folders, test=True) if test_folders else {}
    clash = sorted(set(cases) & set(test_cases))
    if clash:
        raise DatasetFormatError([f"case {c!r} is in both training and test folders" for c in clash],
                                 header="Cannot convert the BraTS folder")
    if not cases:
        raise NnsynthError(f"No BraTS case found in {', '.join(map(str, input_folders))} (expected files like "
                           f"BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n{BRATS_FILE_ENDING})")

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dataset_name}.tmp-", dir=target.parent))
    sources: Dict[str, str] = {}  # written file -> its source, to name the source in problems
    try:
        n_labels = 0
        for c in list(cases.values()) + list(test_cases.values()):
            images_dir = tmp / (IMAGES_TS if c.test else IMAGES_TR)
            images_dir.mkdir(exist_ok=True)
            for cid, src in sorted(c.images.items()):
                dst = images_dir / image_filename(c.name, cid, BRATS_FILE_ENDING)
                _transfer(src, dst, mode)
                sources[str(dst)] = str(src)
            if c.seg is not None and not c.test:
                (tmp / LABELS_TR).mkdir(exist_ok=True)
                dst = tmp / LABELS_TR / f"{c.name}{BRATS_FILE_ENDING}"
                _transfer(c.seg, dst, mode)
                sources[str(dst)] = str(c.seg)
                n_labels += 1
        spec = {"channel_names": BRATS_CHANNEL_NAMES, "labels": BRATS_LABELS, "numTraining": len(cases),
                "file_ending": BRATS_FILE_ENDING, "name": name,
                "description": "Converted from BraTS 2023 by nnsynth_convert_brats (t1n->T1, t1c->T1Gd, "
                               "t2w->T2, t2f->Flair; labels 1 NCR, 2 ED, 3 ET)"}
        save_json(spec, tmp / DATASET_JSON)
        logger.info("Wrote %d training cases (%d with labels) and %d test cases; validating...", len(cases),
                    n_labels, len(test_cases))
        report = validate_dataset(tmp, num_workers=num_workers)
        if report.problems:
            raise DatasetFormatError([_to_source(p, sources, tmp, target) for p in report.problems],
                                     header="The converted dataset would not be valid; nothing was written")
        for w in report.warnings:
            logger.warning("%s", _to_source(w, sources, tmp, target))
        _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Created %s", target)
    return target


def _to_source(message: str, sources: Dict[str, str], tmp: Path, target: Path) -> str:
    """Name the user's input file instead of the temporary copy in a validation message."""
    for dst in sorted(sources, key=len, reverse=True):
        message = message.replace(dst, sources[dst])
    return message.replace(str(tmp), str(target))


def _publish(tmp: Path, target: Path) -> None:
    """Move the finished dataset into place; an old one is swapped out first, then removed."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
