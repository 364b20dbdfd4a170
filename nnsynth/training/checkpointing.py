"""Checkpoints: atomic save, validated load, RNG capture, and the resume order final > latest > best.

A checkpoint is one ``torch.save`` dict. It is written to a temporary file and renamed, so a crash leaves
either the old or the new file; a file damaged some other way (disk full, copied half) fails to load and
the next candidate is used with a warning.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from nnsynth.utils.files import atomic_path

logger = logging.getLogger(__name__)

CHECKPOINT_FINAL = "checkpoint_final.pth"
CHECKPOINT_LATEST = "checkpoint_latest.pth"
CHECKPOINT_BEST = "checkpoint_best.pth"
RESUME_ORDER = (CHECKPOINT_FINAL, CHECKPOINT_LATEST, CHECKPOINT_BEST)
REQUIRED_KEYS = ("network_weights", "optimizer_state", "epoch", "trainer_name")


def save_checkpoint(state: Dict[str, Any], path: Union[str, Path]) -> None:
    """``torch.save`` through a temporary file and an atomic rename."""
    with atomic_path(path, suffix=".pth") as tmp:
        torch.save(state, tmp)


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
    """First loadable checkpoint in the order final > latest > best; (None, None) when there is none."""
    fold_folder = Path(fold_folder)
    problems: List[str] = []
    for name in RESUME_ORDER:
        path = fold_folder / name
        if not path.is_file():
            continue
        try:
            state = load_checkpoint(path, map_location)
        except ValueError as e:
            logger.warning("Skipping a damaged checkpoint: %s. Trying the previous one.", e)
            problems.append(str(e))
            continue
        return path, state
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
