"""Loading, saving and editing plans (``nnsynthPlans.json``).

Overrides use dotted keys relative to the top level or to a configuration:
``latent_dim=4`` (a leaf name, set wherever it is unambiguous, in every configuration), ``vq.latent_dim=4``,
``2d.batch_size=8``, ``configurations.3d.patch_size=[64,64,64]``, ``compute.device=cpu``. Values are parsed
as JSON when possible (``8``, ``[64,64]``, ``true``), else kept as strings. Unknown keys are an error that
lists close matches.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Tuple, Union

from nnsynth.constants import DEFAULT_PLANS_IDENTIFIER
from nnsynth.exceptions import PlansError
from nnsynth.utils.files import load_json, save_json

PathLike = Union[str, os.PathLike]


def plans_path(preprocessed_dataset_folder: PathLike, plans_name: str = DEFAULT_PLANS_IDENTIFIER) -> Path:
    return Path(preprocessed_dataset_folder) / f"{plans_name}.json"


def load_plans(path: PathLike) -> Dict[str, Any]:
    """Load a plans file; a missing or broken file is a user error that says how to make one."""
    path = Path(path)
    if not path.is_file():
        raise PlansError(f"{path}: plans not found. Run nnsynth_plan_and_preprocess -d <dataset> first.")
    try:
        plans = load_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlansError(f"{path}: not valid JSON ({e}); fix the edit or re-run nnsynth_plan_and_preprocess") \
            from None
    if not isinstance(plans, dict) or "configurations" not in plans:
        raise PlansError(f"{path}: not an nnsynth plans file (no 'configurations')")
    return plans


def save_plans(plans: Mapping[str, Any], path: PathLike) -> None:
    save_json(dict(plans), path)


def get_configuration(plans: Mapping[str, Any], name: str) -> Dict[str, Any]:
    """The configuration dict ``name`` ('2d' or '3d'), or an error naming the ones there are."""
    confs = plans.get("configurations", {})
    if name not in confs:
        raise PlansError(f"configuration {name!r} is not in the plans {plans.get('plans_name', '')} "
                         f"(available: {', '.join(confs) or 'none'})")
    return confs[name]


def get_trainer_settings(configuration: Mapping[str, Any], trainer: str) -> Dict[str, Any]:
    """Training settings for one trainer: the shared ``training`` keys updated by ``per_trainer[trainer]``,
    plus ``loss`` = that trainer's loss weights."""
    training = {k: v for k, v in configuration.get("training", {}).items() if k != "per_trainer"}
    training.update(configuration.get("training", {}).get("per_trainer", {}).get(trainer, {}))
    training["loss"] = dict(configuration.get("loss", {}).get(trainer, {}))
    return training


def parse_value(text: str) -> Any:
    """JSON where possible (numbers, lists, true/false/null), otherwise the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _leaf_paths(d: Mapping[str, Any], prefix: Tuple[str, ...] = ()) -> List[Tuple[str, ...]]:
    out = []
    for k, v in d.items():
        p = prefix + (str(k),)
        out.append(p)
        if isinstance(v, Mapping):
            out.extend(_leaf_paths(v, p))
    return out


def _resolve(plans: Mapping[str, Any], key: str) -> List[Tuple[str, ...]]:
    """Full paths an override key refers to (see module docstring); empty if none."""
    parts = tuple(key.split("."))
    all_paths = _leaf_paths(plans)
    exact = [p for p in all_paths if p == parts]
    if exact:
        return exact
    confs = list(plans.get("configurations", {}))
    if parts[0] in confs:  # '2d.batch_size'
        full = ("configurations",) + parts
        return [full] if full in all_paths else []
    # suffix match: 'latent_dim' or 'vq.latent_dim' anywhere (typically once per configuration)
    hits = [p for p in all_paths if p[-len(parts):] == parts]
    return hits


def apply_overrides(plans: Mapping[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """Return a copy of ``plans`` with ``key=value`` overrides applied (see the module docstring)."""
    out = copy.deepcopy(dict(plans))
    for item in overrides:
        if "=" not in item:
            raise PlansError(f"override {item!r} must look like key=value (e.g. latent_dim=4 or 2d.batch_size=8)")
        key, text = item.split("=", 1)
        key = key.strip()
        value = parse_value(text.strip())
        paths = _resolve(out, key)
        if not paths:
            names = sorted({".".join(p) for p in _leaf_paths(out)} | {p[-1] for p in _leaf_paths(out)})
            close = difflib.get_close_matches(key, names, n=5, cutoff=0.5)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise PlansError(f"unknown plans key {key!r}.{hint} Keys are dotted paths into nnsynthPlans.json, "
                             f"e.g. latent_dim, vq.codebook_size, 2d.batch_size.")
        # the same leaf in several configurations is fine; several different leaves is ambiguous
        tails = {p[2:] if p[0] == "configurations" else p for p in paths}
        if len(tails) > 1:
            raise PlansError(f"plans key {key!r} is ambiguous: {', '.join('.'.join(p) for p in paths)}; "
                             f"use a longer dotted key")
        for p in paths:
            node = out
            for part in p[:-1]:
                node = node[part]
            old = node[p[-1]]
            if isinstance(old, Mapping):   # replacing a whole section could drop keys the trainers need
                raise PlansError(f"plans key {'.'.join(p)} is a section; override one of its keys: "
                                 f"{', '.join(old)}")
            why = _type_problem(old, value)
            if why:
                raise PlansError(f"plans key {'.'.join(p)}: {why} (current value {json.dumps(old)}, got {text!r})")
            node[p[-1]] = value
    return out


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _type_problem(old: Any, new: Any) -> str:
    """Why ``new`` cannot replace ``old`` in the plans ('' when it can): the kind of value must stay the same."""
    if old is None:
        return ""
    if _is_number(new) and not math.isfinite(new):
        return "expects a finite number"
    if isinstance(old, bool):
        return "" if isinstance(new, bool) else "expects true or false"
    if _is_number(old):
        return "" if _is_number(new) else "expects a number"
    if isinstance(old, str):
        return "" if isinstance(new, str) else "expects a text value"
    if isinstance(old, list):
        if not isinstance(new, list):
            return "expects a list like [64, 64]"
        if old and all(_is_number(x) for x in old) and \
                not all(_is_number(x) and math.isfinite(x) for x in new):
            return "expects a list of finite numbers"
    return ""
