"""Case discovery in ``imagesTr``/``imagesTs``: which case has which sequence.

A case may lack any sequence: a missing sequence is a missing file (CONTRACT.md section 2).
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import pandas as pd

from nnsynth.constants import CHANNEL_ID_DIGITS
from nnsynth.dataset.dataset_json import DatasetSpec

PathLike = Union[str, os.PathLike]
_NAME_RE = re.compile(rf"^(?P<case>.+)_(?P<channel>[0-9]{{{CHANNEL_ID_DIGITS}}})$", re.DOTALL)


@dataclasses.dataclass
class Case:
    """One subject: its identifier, its image files by channel id and its optional label file."""

    name: str
    images: Dict[int, Path]
    label: Optional[Path] = None

    def sequences(self, spec: DatasetSpec) -> List[str]:
        return [spec.channel_names[c] for c in sorted(self.images) if c in spec.channel_names]


def parse_image_filename(filename: str, file_ending: str) -> Optional[Tuple[str, int]]:
    """``'sub_001_0002.nii.gz'`` -> ``('sub_001', 2)``; None if the name does not follow the convention."""
    if not filename.endswith(file_ending):
        return None
    m = _NAME_RE.match(filename[: -len(file_ending)])
    if not m:
        return None
    return m.group("case"), int(m.group("channel"))


def image_filename(case: str, channel_id: int, file_ending: str) -> str:
    return f"{case}_{channel_id:0{CHANNEL_ID_DIGITS}d}{file_ending}"


def discover_cases(images_folder: PathLike, spec: DatasetSpec, labels_folder: Optional[PathLike] = None,
                   problems: Optional[List[str]] = None) -> Dict[str, Case]:
    """Group the files of ``images_folder`` into cases.

    Files that do not follow ``{case}_{XXXX}{ending}`` or name an unknown channel id are reported in
    ``problems`` (when given) and left out. Hidden files (e.g. our own temporary files) are ignored.
    """
    images_folder = Path(images_folder)
    cases: Dict[str, Case] = {}
    if not images_folder.is_dir():
        return cases
    for p in sorted(images_folder.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        parsed = parse_image_filename(p.name, spec.file_ending)
        if parsed is None:
            if problems is not None:
                problems.append(f"{p}: name does not follow {{case}}_{{XXXX}}{spec.file_ending} "
                                f"(XXXX = 4-digit channel id)")
            continue
        case, channel = parsed
        if channel not in spec.channel_names:
            if problems is not None:
                known = ", ".join(f"{spec.channel_tag(c)}={n}" for c, n in sorted(spec.channel_names.items()))
                problems.append(f"{p}: unknown channel id {channel:04d} (dataset.json channel_names: {known})")
            continue
        cases.setdefault(case, Case(case, {})).images[channel] = p
    if labels_folder is not None and Path(labels_folder).is_dir():
        for name, c in cases.items():
            lp = Path(labels_folder) / f"{name}{spec.file_ending}"
            if lp.is_file():
                c.label = lp
    return dict(sorted(cases.items()))


def availability_table(cases: Dict[str, Case], spec: DatasetSpec) -> pd.DataFrame:
    """Boolean DataFrame, one row per case and one column per sequence (in channel order)."""
    data = {name: [cid in c.images for c in cases.values()] for cid, name in sorted(spec.channel_names.items())}
    df = pd.DataFrame(data, index=pd.Index(list(cases), name="case"), dtype=bool)
    return df


def summarize_availability(df: pd.DataFrame) -> str:
    """Human summary: per-sequence counts and the most common availability patterns."""
    lines = [f"{len(df)} cases, {df.shape[1]} sequences"]
    counts = df.sum(axis=0)
    lines.append("cases per sequence: " + ", ".join(f"{k}={int(v)}" for k, v in counts.items()))
    if len(df):
        patterns = df.apply(lambda r: "+".join(c for c in df.columns if r[c]) or "(none)", axis=1)
        lines.append("availability patterns:")
        for pat, n in patterns.value_counts().items():
            lines.append(f"  {n:4d} x {pat}")
    return "\n".join(lines)
