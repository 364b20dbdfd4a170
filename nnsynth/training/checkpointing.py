"""Checkpoints: atomic save, validated load, RNG capture, and the resume order final > latest > best.

A checkpoint is one ``torch.save`` dict. It is written to a temporary file and renamed, so a crash leaves
either the old or the new file; a file damaged some other way (disk full, copied half) fails to load and
the next candidate is used with a warning.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from nnsynth.exceptions import OutputWriteError
from nnsynth.utils.files import atomic_path, describe_write_error

logger = logging.getLogger(__name__)

CHECKPOINT_FINAL = "checkpoint_final.pth"
CHECKPOINT_LATEST = "checkpoint_latest.pth"
CHECKPOINT_BEST = "checkpoint_best.pth"
#: the checkpoint_latest.pth before the current one, kept so a damaged latest file still leaves a recent state
CHECKPOINT_PREVIOUS = "checkpoint_previous.pth"
RESUME_ORDER = (CHECKPOINT_FINAL, CHECKPOINT_LATEST, CHECKPOINT_PREVIOUS, CHECKPOINT_BEST)
#: fallbacks when final and latest are unusable: the most advanced of these is used
FALLBACK_CHECKPOINTS = (CHECKPOINT_PREVIOUS, CHECKPOINT_BEST)
REQUIRED_KEYS = ("network_weights", "optimizer_state", "epoch", "trainer_name")


def save_checkpoint(state: Dict[str, Any], path: Union[str, Path], keep_previous: bool = False) -> None:
    """``torch.save`` through a temporary file and an atomic rename.

    ``keep_previous`` first moves an existing file at ``path`` to ``checkpoint_previous.pth`` (after the new
    state is completely on disk), so there is always one complete earlier state to fall back to."""
    path = Path(path)
    try:
        with atomic_path(path, suffix=".pth") as tmp:
            torch.save(state, tmp)
            if keep_previous and path.is_file():
                os.replace(path, path.with_name(CHECKPOINT_PREVIOUS))
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError
        raise OutputWriteError(describe_write_error(path, e)) from None


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load and sanity-check a checkpoint; any damage raises ``ValueError`` naming the file."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, pickle errors, ...: all mean "unusable"
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise ValueError(f"{path} is not an nnsynth checkpoint (missing keys)")
    return state


def find_resume_checkpoint(fold_folder: Union[str, Path], map_location: Union[str, torch.device] = "cpu"
                           ) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """First loadable checkpoint of final > latest; if neither loads, the most advanced loadable one of
    previous and best (by epoch and iteration); (None, None) when there is none. Damaged files are logged."""
    fold_folder = Path(fold_folder)
    problems: List[str] = []

    def _try(name: str) -> Optional[Dict[str, Any]]:
        path = fold_folder / name
        if not path.is_file():
            return None
        try:
            return load_checkpoint(path, map_location)
        except ValueError as e:
            logger.warning("Skipping a damaged checkpoint: %s. Trying the previous one.", e)
            problems.append(str(e))
            return None

    for name in RESUME_ORDER:
        if name in FALLBACK_CHECKPOINTS:
            break
        state = _try(name)
        if state is not None:
            return fold_folder / name, state
    fallbacks = [(name, s) for name in FALLBACK_CHECKPOINTS for s in [_try(name)] if s is not None]
    if fallbacks:
        name, state = max(fallbacks, key=lambda t: (int(t[1]["epoch"]), int(t[1].get("iteration_in_epoch", 0))))
        if problems:
            logger.warning("Using %s (epoch %s) instead of the damaged checkpoint(s)", fold_folder / name,
                           state["epoch"])
        return fold_folder / name, state
    if problems:
        logger.warning("No usable checkpoint in %s; starting from scratch", fold_folder)
    return None, None


# --- random number generators --------------------------------------------------------------------------
def capture_rng_state() -> Dict[str, Any]:
    """Every global generator the training loop touches (augmentations use numpy's and torch's)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except Exception as e:  # a different GPU count: not exact anymore, but still resumable
            logger.warning("Could not restore the CUDA random state (%s); resuming is not bit-exact", e)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
