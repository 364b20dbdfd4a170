"""``dataset.json`` parsing (nnU-Net v2 keys) into a typed ``DatasetSpec``.

Every problem is collected, so the user sees all of them at once.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from nnsynth.constants import (CHANNEL_ID_DIGITS, DATASET_JSON, MIN_SEQUENCES_IN_DATASET,
                               REQUIRED_DATASET_JSON_KEYS, SUPPORTED_FILE_ENDINGS)
from nnsynth.exceptions import DatasetFormatError

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass
class DatasetSpec:
    """What ``dataset.json`` says: sequences by channel id, optional labels, case count, file ending."""

    channel_names: Dict[int, str]
    file_ending: str
    num_training: int
    labels: Optional[Dict[str, int]] = None
    raw: dict = dataclasses.field(default_factory=dict)

    @property
    def sequences(self) -> List[str]:
        """Sequence names ordered by channel id: the channel order used everywhere in nnsynth."""
        return [self.channel_names[k] for k in sorted(self.channel_names)]

    @property
    def channel_ids(self) -> List[int]:
        return sorted(self.channel_names)

    def channel_id_of(self, sequence: str) -> int:
        """Channel id of a sequence name (case-insensitive), or raise with the valid names."""
        for cid, name in self.channel_names.items():
            if name.lower() == sequence.lower():
                return cid
        raise DatasetFormatError([f"unknown sequence {sequence!r}; this dataset has "
                                  f"{', '.join(self.sequences)}"], header="Unknown sequence")

    def channel_tag(self, channel_id: int) -> str:
        return f"{channel_id:0{CHANNEL_ID_DIGITS}d}"


def parse_dataset_json_dict(d: object, where: str = DATASET_JSON) -> Tuple[Optional[DatasetSpec], List[str]]:
    """Validate a loaded dataset.json; return (spec or None, problems)."""
    problems: List[str] = []
    if not isinstance(d, dict):
        return None, [f"{where}: top level must be a JSON object, got {type(d).__name__}"]
    for key in REQUIRED_DATASET_JSON_KEYS:
        if key not in d:
            problems.append(f"{where}: missing required key {key!r}")

    channel_names: Dict[int, str] = {}
    cn = d.get("channel_names", d.get("modality"))
    if cn is not None:
        if not isinstance(cn, dict) or not cn:
            problems.append(f"{where}: 'channel_names' must be a non-empty object like {{\"0\": \"T1\"}}")
        else:
            for k, v in cn.items():
                if not (isinstance(k, str) and re.fullmatch(r"[0-9]+", k.strip())):
                    problems.append(f"{where}: channel id {k!r} in 'channel_names' is not a non-negative integer")
                    continue
                if int(k) >= 10 ** CHANNEL_ID_DIGITS:
                    problems.append(f"{where}: channel id {k!r} has more than {CHANNEL_ID_DIGITS} digits")
                    continue
                if not isinstance(v, str) or not v.strip():
                    problems.append(f"{where}: name of channel {k} must be a non-empty string, got {v!r}")
                    continue
                channel_names[int(k)] = v.strip()
            names = [n.lower() for n in channel_names.values()]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                problems.append(f"{where}: sequence names must be unique (case-insensitive), repeated: {dupes}")
            if len(channel_names) < MIN_SEQUENCES_IN_DATASET and len(channel_names) == len(cn):
                problems.append(f"{where}: synthesis needs at least {MIN_SEQUENCES_IN_DATASET} sequences in "
                                f"'channel_names', found {len(channel_names)}")

    ending = d.get("file_ending")
    if "file_ending" in d and ending not in SUPPORTED_FILE_ENDINGS:
        problems.append(f"{where}: 'file_ending' {ending!r} is not one of {', '.join(SUPPORTED_FILE_ENDINGS)}")

    num_training = d.get("numTraining")
    if "numTraining" in d and (isinstance(num_training, bool) or not isinstance(num_training, int)
                                or num_training < 0):
        problems.append(f"{where}: 'numTraining' must be a non-negative integer, got {num_training!r}")

    labels = d.get("labels")
    parsed_labels: Optional[Dict[str, int]] = None
    if labels is not None:
        if not isinstance(labels, dict):
            problems.append(f"{where}: 'labels' must be an object like {{\"background\": 0, \"tumour\": 1}}")
        else:
            parsed_labels = {}
            for name, value in labels.items():
                # nnU-Net region labels are lists/tuples of ints; accept them but keep ints only
                if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
                    problems.append(f"{where}: label {name!r} must be an integer, got {value!r}")
                elif isinstance(value, int):
                    parsed_labels[str(name)] = value
            if parsed_labels and 0 not in parsed_labels.values():
                problems.append(f"{where}: 'labels' must map a name (e.g. 'background') to 0")

    if problems:
        return None, problems
    spec = DatasetSpec(channel_names=channel_names, file_ending=ending, num_training=num_training,
                       labels=parsed_labels or None, raw=d)
    return spec, []


def load_dataset_spec(dataset_folder: PathLike) -> DatasetSpec:
    """Load and validate ``dataset_folder/dataset.json``; raise listing every problem."""
    path = Path(dataset_folder) / DATASET_JSON
    if not path.is_file():
        raise DatasetFormatError([f"{path}: file not found"], header="dataset.json is missing")
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError([f"{path}: not valid JSON ({e})"], header="dataset.json is unreadable") from None
    spec, problems = parse_dataset_json_dict(d, str(path))
    if problems:
        raise DatasetFormatError(problems, header="dataset.json is invalid")
    return spec
