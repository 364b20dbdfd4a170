"""Cross-validation splits by case, stored as ``splits_final.json`` in the preprocessed dataset folder.

Same convention as nnU-Net: cases sorted by name, shuffled with ``RandomState(SPLIT_SEED)`` and cut into
``NUM_FOLDS`` folds (the first ``n % k`` folds one case larger). With fewer than ``NUM_FOLDS`` cases the
split falls back to leave-one-out (``n`` folds); with a single case only fold ``all`` exists.
An existing file is never rewritten, so users can edit it to choose their own folds.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np

from nnsynth.constants import NUM_FOLDS, SPLIT_SEED, SPLITS_JSON
from nnsynth.exceptions import NnsynthError
from nnsynth.utils.files import load_json, save_json

logger = logging.getLogger(__name__)

Fold = Union[int, str]


def make_splits(cases: Sequence[str], num_folds: int = NUM_FOLDS, seed: int = SPLIT_SEED) -> List[Dict[str, List[str]]]:
    """KFold-like split (shuffled, seeded) of sorted case names into ``min(num_folds, n)`` folds."""
    names = sorted(cases)
    n = len(names)
    k = min(num_folds, n)
    if k < 2:
        return []
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(k, n // k, dtype=int)
    sizes[: n % k] += 1
    splits, start = [], 0
    for size in sizes:
        val_idx = set(order[start:start + size].tolist())
        start += size
        splits.append({"train": [names[i] for i in range(n) if i not in val_idx],
                       "val": [names[i] for i in range(n) if i in val_idx]})
    return splits


def load_or_create_splits(preprocessed_dataset_folder: Union[str, Path], cases: Sequence[str]) -> List[Dict[str, List[str]]]:
    """Read ``splits_final.json``; create it from ``cases`` when missing."""
    path = Path(preprocessed_dataset_folder) / SPLITS_JSON
    if path.is_file():
        return load_json(path)
    splits = make_splits(cases)
    if len(cases) < NUM_FOLDS:
        logger.warning("Only %d case(s): %s", len(cases),
                       f"using {len(splits)} leave-one-out folds" if splits else "only fold 'all' is possible")
    save_json(splits, path)
    logger.info("Created %s with %d folds", path, len(splits))
    return splits


def parse_fold(fold: Fold) -> Fold:
    """``'all'`` or a non-negative integer; anything else is a user error."""
    if isinstance(fold, str):
        if fold.strip().lower() == "all":
            return "all"
        if not (fold.strip().isascii() and fold.strip().isdigit()):
            raise NnsynthError(f"Fold must be 0-{NUM_FOLDS - 1} or 'all', got {fold!r}")
        fold = int(fold)
    if fold < 0:
        raise NnsynthError(f"Fold must be 0-{NUM_FOLDS - 1} or 'all', got {fold}")
    return fold


def fold_cases(preprocessed_dataset_folder: Union[str, Path], cases: Sequence[str], fold: Fold) -> Tuple[List[str], List[str]]:
    """(train, val) case lists of a fold. Fold ``all`` trains on every case and validates on every case."""
    fold = parse_fold(fold)
    if not cases:
        raise NnsynthError(f"No preprocessed cases in {preprocessed_dataset_folder}; run nnsynth_plan_and_preprocess first")
    if fold == "all":
        return sorted(cases), sorted(cases)
    splits = load_or_create_splits(preprocessed_dataset_folder, cases)
    if fold >= len(splits):
        raise NnsynthError(
            f"Fold {fold} does not exist: {Path(preprocessed_dataset_folder) / SPLITS_JSON} has {len(splits)} "
            f"fold(s) for {len(cases)} case(s). Use a fold below {len(splits)} or 'all'." if splits else
            f"Fold {fold} does not exist: a dataset with {len(cases)} case cannot be split; use fold 'all'.")
    known = set(cases)
    train = [c for c in splits[fold]["train"] if c in known]
    val = [c for c in splits[fold]["val"] if c in known]
    missing = [c for c in splits[fold]["train"] + splits[fold]["val"] if c not in known]
    if missing:
        logger.warning("%d case(s) of %s are not preprocessed and are skipped: %s", len(missing), SPLITS_JSON,
                       ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if not train or not val:
        raise NnsynthError(f"Fold {fold} has no training or no validation cases left; check {SPLITS_JSON}")
    return train, val
