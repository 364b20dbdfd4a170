"""Trainer names -> classes: an explicit table, plus two ways to add a trainer without editing nnsynth.

1. ``nnsynth_train 501 my_name 0 --trainer-class my_pkg.my_module:MyTrainer`` (any importable class).
2. Name it once for every command: ``export NNSYNTH_TRAINERS="my_name=my_pkg.my_module:MyTrainer;other=..."``,
   or declare an entry point in your package (group ``nnsynth.trainers``, ``my_name = my_pkg.my_module:MyTrainer``).

Only the one module that holds the requested trainer is imported: no discovery by importing everything.
A built-in name whose module does not exist yet raises ``TrainerNotAvailableError`` (the CLI exits with 2).
"""
from __future__ import annotations

import importlib
import logging
import os
from importlib import metadata
from typing import Dict, Optional, Type

from nnsynth.exceptions import NnsynthError

logger = logging.getLogger(__name__)

# --- constants of this module ----------------------------------------------------------------------------
ENV_TRAINERS = "NNSYNTH_TRAINERS"
ENTRY_POINT_GROUP = "nnsynth.trainers"
TRAINERS: Dict[str, str] = {
    "seq2seq": "nnsynth.training.trainers.seq2seq:Seq2SeqTrainer",
    "vq_seq2seq": "nnsynth.training.trainers.vq_seq2seq:VQSeq2SeqTrainer",
    "tsf_seq2seq": "nnsynth.training.trainers.tsf_seq2seq:TSFSeq2SeqTrainer",
    "codebrain": "nnsynth.training.trainers.codebrain:CodeBrainTrainer",
    "seg_from_latent": "nnsynth.training.trainers.seg_from_latent:SegFromLatentTrainer",
    "seg_from_images": "nnsynth.training.trainers.seg_from_latent:SegFromImagesTrainer",
}


class TrainerNotAvailableError(NnsynthError):
    """A registered trainer whose implementation is not part of this version yet."""


def load_class(dotted: str, builtin: bool = False) -> type:
    """Import ``package.module:ClassName`` (``package.module.ClassName`` also accepted)."""
    module_name, sep, attr = dotted.partition(":")
    if not sep:
        module_name, _, attr = dotted.rpartition(".")
    if not module_name or not attr:
        raise NnsynthError(f"{dotted!r} is not a class path; write it as package.module:ClassName")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if builtin and e.name is not None and module_name.startswith(e.name):
            raise TrainerNotAvailableError(f"{dotted} is not available yet in this version of nnsynth") from e
        raise NnsynthError(f"Cannot import {module_name!r} for trainer class {dotted!r}: {e}") from e
    cls = getattr(module, attr, None)
    if cls is None or not isinstance(cls, type):
        raise NnsynthError(f"{module_name} has no class {attr!r} (from {dotted!r})")
    return cls


def _env_trainers() -> Dict[str, str]:
    table: Dict[str, str] = {}
    for item in filter(None, (p.strip() for p in os.environ.get(ENV_TRAINERS, "").split(";"))):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise NnsynthError(f"{ENV_TRAINERS} entries must look like name=package.module:Class, got {item!r}")
        table[name.strip()] = path.strip()
    return table


def _entry_point(name: str) -> Optional[str]:
    try:
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP, name=name)
    except TypeError:  # very old importlib.metadata
        eps = [e for e in metadata.entry_points().get(ENTRY_POINT_GROUP, []) if e.name == name]
    for ep in eps:
        return ep.value
    return None


def trainer_names() -> Dict[str, str]:
    """Built-in names and those from ``NNSYNTH_TRAINERS`` (entry points are looked up by name only)."""
    return {**TRAINERS, **_env_trainers()}


def get_trainer(name: str, trainer_class: Optional[str] = None) -> Type:
    """The trainer class for ``name``; ``trainer_class`` (a class path) overrides every table."""
    from nnsynth.training.engine import TrainingEngine
    if trainer_class:
        cls = load_class(trainer_class)
    else:
        env = _env_trainers()
        if name in env:
            cls = load_class(env[name])
        elif name in TRAINERS:
            cls = load_class(TRAINERS[name], builtin=True)
        else:
            path = _entry_point(name)
            if path is None:
                raise NnsynthError(
                    f"Unknown trainer {name!r}. Known: {', '.join(sorted(trainer_names()))}. Register your own with "
                    f"--trainer-class package.module:Class, {ENV_TRAINERS}=name=package.module:Class or an entry "
                    f"point in the group {ENTRY_POINT_GROUP!r}.")
            cls = load_class(path)
    if not issubclass(cls, TrainingEngine):
        raise NnsynthError(f"{cls.__module__}.{cls.__qualname__} is not a subclass of "
                           f"nnsynth.training.engine.TrainingEngine")
    return cls
