"""Model discovery, the per-trainer inference adapter, and whole-folder prediction (``nnsynth_predict``).

A trained model folder is ``nnSynth_results/DatasetXXX_Name/{trainer}__{plans}__{configuration}/`` with
``plans.json``, ``dataset.json`` and ``fold_{k}/checkpoint_{final,best,latest}.pth``. For every requested fold
the trainer class recorded in the checkpoint is instantiated (no training state, no data) and builds its own
network from the plans; that trainer instance is the fold's **inference adapter** (see
``documentation/prediction.md``):

- required: ``synthesize_slices(sources: {sequence index: (B, k, *patch) tensor}, target: int) -> tensor``
  in [0, 1], the shape of one source tensor (the engine's hook, used by training's validation too);
- optional: ``synthesize_with_maps(sources, target) -> {"prediction": tensor, name: map, ...}`` for trainers
  with per-voxel explanations (TSF: ``"tsem"``); ``contribution_weights(sources: list, target) -> {index: w}``
  (TSF omega); ``min_sources`` (int, default 1); ``supports_differentiation_maps`` (default True: the
  imaging-differentiation map needs single-source synthesis); ``load_for_inference(state)``;
  ``full_volume_method()`` (a sentence naming how several sources are combined, for the log).

Each case is preprocessed exactly like training (``preprocessing.preprocessor.preprocess_case``), predicted with
a Gaussian-weighted sliding window per fold, the folds are averaged, the result is masked to the case's
nonzero region, mapped back to the case's original geometry (``revert_preprocessing``) and written as float32.
"""
from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from nnsynth.constants import DATASET_JSON, SUPPORTED_FILE_ENDINGS
from nnsynth.dataset.cases import image_filename, parse_image_filename
from nnsynth.dataset.dataset_json import DatasetSpec, parse_dataset_json_dict
from nnsynth.dataset.io import Geometry, read_image, write_image
from nnsynth.exceptions import DatasetFormatError, NnsynthError, OutputWriteError
from nnsynth.inference.calibration import apply_calibration, load_offsets
from nnsynth.inference.sliding_window import (DEFAULT_STEP_SIZE, PREDICTION_KEY, sliding_window_predict,
                                              with_mirroring)
from nnsynth.utils.files import describe_write_error, load_json, save_json
from nnsynth.utils.log import progress_disabled

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

# --- constants of this module ------------------------------------------------------------------------------
CHECKPOINT_FILES = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth",
                    "latest": "checkpoint_latest.pth"}
PLANS_FILE = "plans.json"
#: per-output record (sources used, model) written next to the predictions; read by nnsynth_evaluate
PREDICTIONS_RECORD = "nnsynth_predictions.json"
MAPS_FOLDER = "maps"
DIFFERENTIATION_MAP = "differentiation"
_FOLD_RE = re.compile(r"^fold_(\d+|all)$")


class ModelNotFoundError(NnsynthError):
    pass


class CaseError(NnsynthError):
    """A problem with one input case: it is reported and skipped, the other cases go on."""


# ============================================================================================================
# model discovery
# ============================================================================================================
@dataclasses.dataclass(frozen=True)
class ModelFolder:
    path: Path
    dataset: str
    trainer: str
    plans: str
    configuration: str

    def folds(self, checkpoint: str = "final") -> List[str]:
        """Fold names ('0', 'all', ...) holding the requested checkpoint, sorted."""
        name = CHECKPOINT_FILES[checkpoint]
        out = []
        for p in self.path.iterdir() if self.path.is_dir() else []:
            m = _FOLD_RE.match(p.name)
            if m and (p / name).is_file():
                out.append(m.group(1))
        return sorted(out, key=lambda f: (f == "all", int(f) if f.isdigit() else 0))

    def __str__(self) -> str:
        return f"{self.dataset}/{self.path.name}"


def parse_model_folder(path: PathLike) -> ModelFolder:
    """``.../DatasetXXX_Name/{trainer}__{plans}__{configuration}`` -> its parts."""
    path = Path(path)
    parts = path.name.split("__")
    if len(parts) != 3 or not all(parts):
        raise ModelNotFoundError(f"{path} is not a model folder; its name must be {{trainer}}__{{plans}}__"
                                 f"{{configuration}} (e.g. seq2seq__nnsynthPlans__2d)")
    return ModelFolder(path, path.parent.name, parts[0], parts[1], parts[2])


def list_trained_models(results_root: Optional[PathLike] = None, checkpoint: str = "final") -> List[ModelFolder]:
    """Every model folder under the results root with at least one fold holding ``checkpoint``."""
    from nnsynth import paths
    root = Path(results_root) if results_root is not None else paths.results_folder()
    found = []
    if not root.is_dir():
        return found
    for ds in sorted(root.iterdir()):
        if not ds.is_dir() or paths.dataset_name_from_folder(ds.name) is None:
            continue
        for mf in sorted(ds.iterdir()):
            if mf.is_dir() and mf.name.count("__") == 2:
                model = parse_model_folder(mf)
                if model.folds(checkpoint):
                    found.append(model)
    return found


def find_model_folder(dataset: Optional[Union[str, int]] = None, trainer: Optional[str] = None,
                      configuration: Optional[str] = None, plans: Optional[str] = None,
                      checkpoint: str = "final", results_root: Optional[PathLike] = None) -> ModelFolder:
    """The one trained model matching the given filters; none or several is an error that lists candidates."""
    from nnsynth import paths
    if checkpoint not in CHECKPOINT_FILES:
        raise NnsynthError(f"checkpoint must be one of {', '.join(CHECKPOINT_FILES)}, got {checkpoint!r}")
    models = list_trained_models(results_root, checkpoint)
    root = Path(results_root) if results_root is not None else paths.results_folder()
    dataset_name = None
    if dataset is not None:
        text = str(dataset).strip()
        if paths.dataset_name_from_folder(text) is not None:
            dataset_name = text
        elif text.isascii() and text.isdigit():
            ids = {m.dataset for m in models if paths.dataset_name_from_folder(m.dataset) == int(text)}
            dataset_name = ids.pop() if len(ids) == 1 else None
            if dataset_name is None:
                dataset_name = paths.resolve_dataset_name(text)
        else:
            raise NnsynthError(f"-d {text!r} is neither a dataset id (501) nor a name (Dataset501_BrainDemo)")
    chosen = [m for m in models
              if (dataset_name is None or m.dataset == dataset_name) and (trainer is None or m.trainer == trainer)
              and (configuration is None or m.configuration == configuration) and (plans is None or m.plans == plans)]
    filters = ", ".join(f"{k} {v}" for k, v in (("dataset", dataset_name), ("trainer", trainer),
                                                  ("configuration", configuration), ("plans", plans)) if v)
    if not chosen:
        listing = "\n".join(f"  - {m}" for m in models) or "  (none)"
        raise ModelNotFoundError(
            f"No trained model with a {CHECKPOINT_FILES[checkpoint]}{' for ' + filters if filters else ''} under "
            f"{root}. Trained models found:\n{listing}\nTrain one with nnsynth_train, or set nnSynth_results.")
    if len(chosen) > 1:
        listing = "\n".join(f"  - {m}  (-d {m.dataset} -tr {m.trainer} -c {m.configuration} -p {m.plans})"
                            for m in chosen)
        raise ModelNotFoundError(f"Several trained models match{' ' + filters if filters else ''}; choose one with "
                                 f"-d/-tr/-c/-p:\n{listing}")
    return chosen[0]


# ============================================================================================================
# inference adapters (one trainer instance per fold)
# ============================================================================================================
def _trainer_class(state: Mapping[str, Any], model: ModelFolder) -> type:
    from nnsynth.training.registry import get_trainer, load_class
    dotted = state.get("trainer_class")
    if dotted:
        try:
            return load_class(str(dotted))
        except NnsynthError as e:
            logger.warning("Cannot import the checkpoint's trainer class %s (%s); using the registered trainer %r",
                           dotted, e, state.get("trainer_name", model.trainer))
    return get_trainer(str(state.get("trainer_name", model.trainer)))


def load_adapter(model: ModelFolder, fold: str, checkpoint: str, device: torch.device,
                 plans: Mapping[str, Any]) -> Any:
    """Instantiate the fold's trainer without data, build its network from the plans and load the weights."""
    from nnsynth.training.checkpointing import load_checkpoint
    path = model.path / f"fold_{fold}" / CHECKPOINT_FILES[checkpoint]
    try:
        state = load_checkpoint(path, map_location="cpu")
    except ValueError as e:
        raise ModelNotFoundError(f"{e}. Retrain this fold or pick another checkpoint with -chk.") from None
    cls = _trainer_class(state, model)
    configuration = str(state.get("configuration") or model.configuration)
    trainer = cls(plans=dict(plans), configuration=configuration, fold=fold,
                  preprocessed_dataset_folder=model.path, output_folder=model.path, device=device)
    trainer.load_for_inference(state)
    trainer.checkpoint_path = path
    return trainer


def multi_source_rule(adapter: Any) -> str:
    """How the adapter combines several sources, for the log and the predictions record."""
    fn = getattr(adapter, "full_volume_method", None)
    if callable(fn):
        try:
            return str(fn())
        except Exception:  # a description must never break prediction
            pass
    return "trainer-specific (synthesize_slices)"


def resolve_device(name: Union[str, torch.device]) -> torch.device:
    if isinstance(name, torch.device):
        return name
    from nnsynth.cli.train import resolve_device as _resolve
    return _resolve(str(name))


# ============================================================================================================
# the predictor
# ============================================================================================================
@dataclasses.dataclass
class CasePrediction:
    """Outputs of one case in its original array shape ((z, y, x), or (y, x) for 2D), float32."""

    predictions: Dict[str, np.ndarray]                     # target sequence -> image
    sources: Dict[str, List[str]]                          # target sequence -> source sequences used
    maps: Dict[Tuple[str, str], np.ndarray]                # (sequence, map name) -> image
    contributions: Dict[str, Dict[str, float]]             # target -> {source: weight}
    kept: List[str]                                        # requested targets already present (not predicted)


class Predictor:
    """A loaded model (all requested folds). Create once, predict many cases."""

    def __init__(self, model_folder: PathLike, folds: Optional[Sequence[Union[int, str]]] = None,
                 checkpoint: str = "final", device: Union[str, torch.device] = "auto",
                 step_size: float = DEFAULT_STEP_SIZE, tta: bool = False, window_batch: Optional[int] = None,
                 progress: bool = True, calibrate: bool = True) -> None:
        self.model = parse_model_folder(model_folder)
        if checkpoint not in CHECKPOINT_FILES:
            raise NnsynthError(f"checkpoint must be one of {', '.join(CHECKPOINT_FILES)}, got {checkpoint!r}")
        if not 0 < float(step_size) <= 1:
            raise NnsynthError(f"--step-size must be in (0, 1], got {step_size}")
        for name in (PLANS_FILE, DATASET_JSON):
            if not (self.model.path / name).is_file():
                raise ModelNotFoundError(f"{self.model.path / name} is missing; is {self.model.path} a model "
                                         f"folder written by nnsynth_train?")
        self.plans: Dict[str, Any] = load_json(self.model.path / PLANS_FILE)
        spec, problems = parse_dataset_json_dict(load_json(self.model.path / DATASET_JSON),
                                                 str(self.model.path / DATASET_JSON))
        if problems or spec is None:
            raise DatasetFormatError(problems, header="The model folder's dataset.json is invalid")
        self.spec: DatasetSpec = spec
        self.configuration = self.model.configuration
        if self.configuration not in self.plans.get("configurations", {}):
            raise ModelNotFoundError(f"{self.model.path / PLANS_FILE} has no configuration {self.configuration!r}")
        self.config = self.plans["configurations"][self.configuration]
        self.sequences: List[str] = list(self.plans["sequences"])
        self.channel_ids: List[int] = [int(c) for c in self.plans["channel_ids"]]
        self.spatial_dims = int(self.config["spatial_dims"])
        self.k = int(self.config.get("num_adjacent_slices", 1)) if self.spatial_dims == 2 else 1
        self.patch_size = [int(p) for p in self.config["patch_size"]]
        self.step_size, self.tta, self.progress = float(step_size), bool(tta), bool(progress)
        self.window_batch = int(window_batch or max(1, int(self.config.get("batch_size", 2))) * 2)
        self.device = resolve_device(device)
        available = self.model.folds(checkpoint)
        wanted = [str(f) for f in folds] if folds else available
        missing = [f for f in wanted if f not in available]
        if missing:
            raise ModelNotFoundError(f"{self.model.path}: fold(s) {', '.join(missing)} have no "
                                     f"{CHECKPOINT_FILES[checkpoint]} (available: {', '.join(available) or 'none'})")
        if not wanted:
            raise ModelNotFoundError(f"{self.model.path} has no fold with a {CHECKPOINT_FILES[checkpoint]}")
        self.folds, self.checkpoint = wanted, checkpoint
        self.adapters = [load_adapter(self.model, f, checkpoint, self.device, self.plans) for f in wanted]
        self.min_sources = max(int(getattr(a, "min_sources", 1)) for a in self.adapters)
        self.rule = multi_source_rule(self.adapters[0])
        # the folds' quantile calibration (nnsynth.inference.calibration): {target name: offsets}
        self.calibration = load_offsets([self.model.path / f"fold_{f}" for f in wanted]) if calibrate else {}
        logger.info("Model %s, fold(s) %s, %s checkpoint, device %s%s; several sources: %s; quantile calibration: %s",
                    self.model, ", ".join(wanted), checkpoint, self.device, ", mirroring TTA" if tta else "",
                    self.rule, ", ".join(self.calibration) if self.calibration else
                    ("off" if not calibrate else "none in the model folder"))

    # ----- helpers ----------------------------------------------------------------------------------------
    def sequence_index(self, name: str) -> int:
        for i, s in enumerate(self.sequences):
            if s.lower() == str(name).lower():
                return i
        raise DatasetFormatError([f"unknown sequence {name!r}; this model knows {', '.join(self.sequences)}"],
                                 header="Unknown sequence")

    def resolve_targets(self, target: Union[str, Sequence[str]]) -> Optional[List[str]]:
        """Sequence names for ``-t``; None means 'all' (every sequence missing from each case)."""
        names = [target] if isinstance(target, str) else list(target)
        if any(str(n).lower() == "all" for n in names):
            return None
        return [self.sequences[self.sequence_index(n)] for n in names]

    def preprocess(self, images: Sequence[Optional[np.ndarray]], geometry: Geometry, case: str = "case"
                   ) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
        from nnsynth.preprocessing.preprocessor import preprocess_case
        return preprocess_case(images, geometry, self.plans, self.configuration, case=case)

    def export(self, volume: np.ndarray, properties: Mapping[str, Any], clip01: bool = True) -> np.ndarray:
        """Preprocessed-space (Z, Y, X) image -> the case's original array (shape, axis order), float32."""
        from nnsynth.preprocessing.preprocessor import revert_preprocessing
        out = revert_preprocessing(volume, properties, self.plans, self.configuration)
        return np.clip(out, 0.0, 1.0 if clip01 else None, out=out)

    def _fold_fn(self, adapter: Any, target: int, with_maps: bool) -> Callable:
        use_maps = with_maps and callable(getattr(adapter, "synthesize_with_maps", None))
        autocast = self.device.type == "cuda"

        def fn(inp: Dict[int, torch.Tensor]) -> Dict[str, torch.Tensor]:
            with torch.autocast(self.device.type, enabled=autocast):
                if use_maps:
                    out = dict(adapter.synthesize_with_maps(inp, target))
                else:
                    out = {PREDICTION_KEY: adapter.synthesize_slices(inp, target)}
            return {k: v.float() for k, v in out.items()}
        return with_mirroring(fn, self.spatial_dims) if self.tta else fn

    @torch.no_grad()
    def predict_preprocessed(self, data: np.ndarray, seg: np.ndarray, sources: Sequence[int], target: int,
                             with_maps: bool = False, desc: Optional[str] = None, calibrate: bool = False
                             ) -> Dict[str, np.ndarray]:
        """Fold-averaged synthesis of ``target`` from ``sources`` in the preprocessed space (Z, Y, X).

        ``data`` (C, Z, Y, X) and ``seg`` (1, Z, Y, X) as returned by preprocessing; the prediction is clipped
        to [0, 1] and set to 0 outside the case's nonzero mask (the normalised space's background).
        ``calibrate``: apply the model's quantile calibration of ``target`` where it has one (imputation does;
        analyses that compare raw synthesis errors, such as the differentiation maps, do not)."""
        if len(sources) < self.min_sources:
            raise CaseError(f"{len(sources)} source(s) given, the model needs at least {self.min_sources}")
        for a in self.adapters:
            a.network.eval()
        volumes = {int(s): np.asarray(data[s], dtype=np.float32) for s in sources}
        total: Dict[str, np.ndarray] = {}
        for fi, adapter in enumerate(self.adapters):
            d = None if desc is None or not self.progress else (
                f"{desc} fold {self.folds[fi]}" if len(self.adapters) > 1 else desc)
            out = sliding_window_predict(volumes, self._fold_fn(adapter, int(target), with_maps), self.spatial_dims,
                                         self.patch_size, self.k, self.step_size, self.device, self.window_batch, d)
            for name, v in out.items():
                if name in total:
                    total[name] += v
                else:
                    total[name] = v
        mask = np.asarray(seg[0]) >= 0
        for name in total:
            total[name] /= len(self.adapters)
            total[name][~mask] = 0
        offsets = self.calibration.get(self.sequences[int(target)]) if calibrate else None
        if offsets is not None:
            total[PREDICTION_KEY] = apply_calibration(total[PREDICTION_KEY], mask, offsets)
        np.clip(total[PREDICTION_KEY], 0.0, 1.0, out=total[PREDICTION_KEY])
        return total

    def differentiation_map(self, data: np.ndarray, seg: np.ndarray, available: Sequence[int], sequence: int
                            ) -> np.ndarray:
        """M_d(X_i) = mean over the other available sources j of |X'_{j->i} - X_i| (Seq2Seq eq. 5, j = i
        excluded), in the preprocessed space."""
        others = [j for j in available if j != sequence]
        if not others:
            raise CaseError(f"{self.sequences[sequence]}: no other sequence to synthesise it from")
        acc = np.zeros(data.shape[1:], np.float32)
        for j in others:
            pred = self.predict_preprocessed(data, seg, [j], sequence)[PREDICTION_KEY]
            acc += np.abs(pred - data[sequence])
        acc /= len(others)
        acc[np.asarray(seg[0]) < 0] = 0
        return acc

    def contribution_weights(self, sources: Sequence[int], target: int) -> Optional[Dict[str, float]]:
        """Fold-averaged source weights from adapters that have them (TSF omega), else None."""
        values = []
        for a in self.adapters:
            fn = getattr(a, "contribution_weights", None)
            if callable(fn):
                values.append({int(k): float(v) for k, v in dict(fn(list(sources), int(target))).items()})
        if not values:
            return None
        return {self.sequences[s]: float(np.mean([v.get(s, 0.0) for v in values])) for s in sources}

    def predict_case(self, images: Mapping[str, np.ndarray], geometry: Geometry,
                     targets: Optional[Sequence[str]] = None, save_maps: bool = False, case: str = "case"
                     ) -> CasePrediction:
        """Synthesise ``targets`` (None: every sequence the case lacks) of one case given as arrays.

        ``images``: {sequence name: array in SimpleITK order sharing ``geometry``}. Returned images are in the
        case's original array shape and the dataset's normalised intensity space."""
        by_index: List[Optional[np.ndarray]] = [None] * len(self.sequences)
        for name, arr in images.items():
            idx = self.sequence_index(name)
            if arr is None:
                continue
            arr = np.asarray(arr)
            if tuple(arr.shape) != tuple(geometry.shape):
                raise CaseError(f"{case}: {name} has shape {arr.shape}, the geometry says {tuple(geometry.shape)}")
            by_index[idx] = arr
        available = [i for i, a in enumerate(by_index) if a is not None]
        if targets is None:
            wanted = [i for i in range(len(self.sequences)) if i not in available]
        else:
            wanted = [self.sequence_index(t) for t in targets]
        kept = [self.sequences[t] for t in wanted if t in available]
        todo = [t for t in wanted if t not in available]
        result = CasePrediction({}, {}, {}, {}, kept)
        if len(available) < self.min_sources:
            raise CaseError(f"{case}: no usable source sequence (has {len(available)}, the model needs "
                            f"{self.min_sources}; known sequences: {', '.join(self.sequences)})")
        if not todo and not save_maps:
            return result
        data, seg, props = self.preprocess(by_index, geometry, case)
        del by_index
        for t in todo:
            out = self.predict_preprocessed(data, seg, available, t, with_maps=save_maps,
                                            desc=f"{case} -> {self.sequences[t]}", calibrate=True)
            result.predictions[self.sequences[t]] = self.export(out.pop(PREDICTION_KEY), props)
            result.sources[self.sequences[t]] = [self.sequences[s] for s in available]
            for name, m in out.items():
                result.maps[(self.sequences[t], name)] = self.export(m, props, clip01=False)
            if save_maps:
                w = self.contribution_weights(available, t)
                if w is not None:
                    result.contributions[self.sequences[t]] = w
        if save_maps and len(available) >= 2 and all(getattr(a, "supports_differentiation_maps", True)
                                                     for a in self.adapters):
            for i in available:
                m = self.differentiation_map(data, seg, available, i)
                result.maps[(self.sequences[i], DIFFERENTIATION_MAP)] = self.export(m, props, clip01=False)
        return result


# ============================================================================================================
# folders of cases
# ============================================================================================================
@dataclasses.dataclass
class InputCase:
    name: str
    files: Dict[int, Path]            # channel id -> file
    ending: str
    problems: List[str] = dataclasses.field(default_factory=list)


def discover_input_cases(folder: PathLike, spec: DatasetSpec) -> Tuple[Dict[str, InputCase], List[str]]:
    """Group ``{case}_{XXXX}{ending}`` files of a prediction input folder into cases.

    Any supported ending is accepted (the output keeps the case's own). A file with an unknown channel id marks
    its case as failed; a file whose name does not follow the convention is ignored with a warning."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NnsynthError(f"Input folder {folder} does not exist")
    cases: Dict[str, InputCase] = {}
    ignored: List[str] = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        ending = next((e for e in SUPPORTED_FILE_ENDINGS if p.name.lower().endswith(e)), None)
        parsed = parse_image_filename(p.name, p.name[-len(ending):]) if ending else None
        if parsed is None:
            ignored.append(p.name)
            continue
        name, cid = parsed
        c = cases.setdefault(name, InputCase(name, {}, ending))
        if ending != c.ending:
            c.problems.append(f"{p.name}: file ending {ending} differs from the case's {c.ending}")
        if cid not in spec.channel_names:
            known = ", ".join(f"{spec.channel_tag(k)}={v}" for k, v in sorted(spec.channel_names.items()))
            c.problems.append(f"{p.name}: unknown sequence (channel id {cid:04d}; the model knows {known})")
            continue
        c.files[cid] = p
    return dict(sorted(cases.items())), ignored


def read_input_case(case: InputCase, spec: DatasetSpec) -> Tuple[Dict[str, np.ndarray], Geometry]:
    """Read every file of a case; unreadable files and geometry mismatches raise ``CaseError`` (all listed)."""
    problems = list(case.problems)
    images: Dict[str, np.ndarray] = {}
    geometry: Optional[Geometry] = None
    for cid, path in sorted(case.files.items()):
        try:
            arr, geo = read_image(path, dtype=np.float32)
        except NnsynthError as e:
            problems.append(str(e))
            continue
        if not np.all(np.isfinite(arr)):
            problems.append(f"{path.name}: contains NaN or Inf voxels")
            continue
        if geometry is None:
            geometry = geo
        else:
            why = geometry.mismatch(geo)
            if why:
                problems.append(f"{path.name}: geometry mismatch with the case's other files ({why})")
                continue
        images[spec.channel_names[cid]] = arr
    if problems:
        raise CaseError("; ".join(problems))
    if geometry is None:
        raise CaseError("no usable source file")
    return images, geometry


def output_paths(case: InputCase, targets: Sequence[str], spec: DatasetSpec, out: Path) -> List[Path]:
    cid = {v: k for k, v in spec.channel_names.items()}
    return [out / image_filename(case.name, cid[t], case.ending) for t in targets]


@dataclasses.dataclass
class PredictionReport:
    predicted: Dict[str, List[str]] = dataclasses.field(default_factory=dict)   # case -> targets written
    kept: Dict[str, List[str]] = dataclasses.field(default_factory=dict)        # case -> targets already there
    skipped_done: List[str] = dataclasses.field(default_factory=list)           # --continue
    failed: Dict[str, str] = dataclasses.field(default_factory=dict)            # case -> why
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"{len(self.predicted)} case(s) predicted ({sum(map(len, self.predicted.values()))} image(s)), "
                 f"{len(self.skipped_done)} already done (--continue), {len(self.failed)} failed, "
                 f"{self.seconds:.1f} s"]
        for c, ts in self.kept.items():
            lines.append(f"  kept (already present, not overwritten): {c}: {', '.join(ts)}")
        for c, why in self.failed.items():
            lines.append(f"  FAILED {c}: {why}")
        return "\n".join(lines)


def _part(cases: List[str], num_parts: int, part_id: int) -> List[str]:
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise NnsynthError(f"--part-id must be in 0..{num_parts - 1} for --num-parts {num_parts}, got {part_id}")
    return cases[part_id::num_parts]


def record_name(num_parts: int, part_id: int) -> str:
    return PREDICTIONS_RECORD if num_parts == 1 else \
        PREDICTIONS_RECORD.replace(".json", f"_part{part_id}of{num_parts}.json")


def predict_folder(predictor: Predictor, input_folder: PathLike, output_folder: PathLike,
                   target: Union[str, Sequence[str]], save_maps: bool = False, continue_prediction: bool = False,
                   num_parts: int = 1, part_id: int = 0, num_workers: int = 0) -> PredictionReport:
    """Predict every case of ``input_folder`` into ``output_folder`` (CONTRACT.md section 4).

    Bad cases are reported and skipped; the others are predicted. ``num_workers`` background threads read
    upcoming cases and write finished ones while the network runs (0: all in this thread)."""
    t0 = time.time()
    out = Path(output_folder)
    spec = predictor.spec
    targets = predictor.resolve_targets(target)
    cases, ignored = discover_input_cases(input_folder, spec)
    if ignored:
        logger.warning("Ignored %d file(s) not named {case}_{XXXX}{ending}: %s", len(ignored),
                       ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else ""))
    if not cases:
        raise NnsynthError(f"No case found in {input_folder} (files must be named {{case}}_{{XXXX}}{spec.file_ending}, "
                           f"XXXX = channel id of {', '.join(f'{k:04d}={v}' for k, v in sorted(spec.channel_names.items()))})")
    names = _part(list(cases), num_parts, part_id)
    report = PredictionReport()
    record_path = out / record_name(num_parts, part_id)
    record: Dict[str, Any] = {}
    if record_path.is_file():
        try:
            record = load_json(record_path)
        except ValueError:
            record = {}
    record.setdefault("model", str(predictor.model.path))
    record.update({"folds": predictor.folds, "checkpoint": predictor.checkpoint, "multi_source_rule": predictor.rule,
                   "calibrated_targets": sorted(predictor.calibration),
                   "channel_names": {str(k): v for k, v in spec.channel_names.items()},
                   "file_ending": spec.file_ending, "intensity_space": "normalised (see documentation/prediction.md)"})
    record.setdefault("cases", {})
    check_writable_folder(out)
    logger.info("Predicting %s for %d case(s) of %s (part %d of %d) -> %s", "all missing sequences"
                if targets is None else ", ".join(targets), len(names), input_folder, part_id + 1, num_parts, out)

    def case_targets(c: InputCase) -> List[str]:
        present = {spec.channel_names[k] for k in c.files}
        return [s for s in predictor.sequences if s not in present] if targets is None else \
            [t for t in targets if t not in present]

    def case_kept(c: InputCase) -> List[str]:
        present = {spec.channel_names[k] for k in c.files}
        return [] if targets is None else [t for t in targets if t in present]

    todo = []
    for n in names:
        c = cases[n]
        if continue_prediction and not c.problems:
            expected = output_paths(c, case_targets(c), spec, out)
            if expected and all(p.is_file() for p in expected) and \
                    (not save_maps or (out / MAPS_FOLDER / f".{n}.done").is_file()):
                report.skipped_done.append(n)
                continue
        todo.append(n)
    if report.skipped_done:
        logger.info("--continue: %d case(s) already done are skipped", len(report.skipped_done))

    def load(n: str):
        c = cases[n]
        images, geometry = read_input_case(c, spec)
        return images, geometry

    def write(n: str, res: CasePrediction, geometry: Geometry) -> None:
        c = cases[n]
        cid = {v: k for k, v in spec.channel_names.items()}
        for t, img in res.predictions.items():
            write_image(img, geometry, out / image_filename(n, cid[t], c.ending))
        if save_maps:
            for (s, mname), img in res.maps.items():
                write_image(img, geometry, out / MAPS_FOLDER / f"{n}_{cid[s]:04d}_{mname}{c.ending}")
            for t, w in res.contributions.items():
                save_json({"case": n, "target": t, "weights": w},
                          out / MAPS_FOLDER / f"{n}_{cid[t]:04d}_contributions.json")
            save_json({"case": n}, out / MAPS_FOLDER / f".{n}.done")

    from tqdm import tqdm
    bar = tqdm(total=len(todo), desc="cases", unit="case", disable=progress_disabled(predictor.progress))
    pool = futures.ThreadPoolExecutor(max_workers=num_workers) if num_workers > 0 else None
    pending_writes: List[Tuple[str, futures.Future]] = []
    try:
        loads: Dict[str, futures.Future] = {}

        def schedule(i: int) -> None:
            if pool is not None and i < len(todo) and todo[i] not in loads:
                loads[todo[i]] = pool.submit(load, todo[i])

        for i in range(num_workers):
            schedule(i)
        for i, n in enumerate(todo):
            schedule(i + num_workers)
            bar.set_postfix_str(n)
            try:
                kept = case_kept(cases[n])
                if kept:
                    report.kept[n] = kept
                    logger.info("%s: %s already present; not overwritten", n, ", ".join(kept))
                if not case_targets(cases[n]) and not save_maps and not cases[n].problems:
                    loads.pop(n, None)
                    bar.update(1)
                    continue
                images, geometry = loads.pop(n).result() if n in loads else load(n)
                res = predictor.predict_case(images, geometry, case_targets(cases[n]), save_maps, case=n)
                del images
                if pool is not None:
                    pending_writes.append((n, pool.submit(write, n, res, geometry)))
                else:
                    try:
                        write(n, res, geometry)
                    except OSError as e:
                        raise OutputWriteError(describe_write_error(out, e)) from None
                if res.predictions or res.maps:
                    report.predicted[n] = list(res.predictions)
                record["cases"][n] = {t: {"sources": res.sources[t],
                                          "file": image_filename(n, {v: k for k, v in spec.channel_names.items()}[t],
                                                                 cases[n].ending)}
                                      for t in res.predictions}
            except NnsynthError as e:
                report.failed[n] = str(e)
                logger.error("%s: skipped: %s", n, e)
            bar.update(1)
            pending_writes = _collect_writes(pending_writes, report, wait=False)
        pending_writes = _collect_writes(pending_writes, report, wait=True)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True)
        for n in report.failed:
            record["cases"].pop(n, None)
        try:
            save_json(record, record_path)
        except OSError as e:
            report.failed["(record)"] = describe_write_error(record_path, e)
            logger.error("%s", report.failed["(record)"])
    report.seconds = time.time() - t0
    return report


def check_writable_folder(folder: Path) -> None:
    """Create ``folder`` and make sure a file can be written there, before any work is done."""
    import tempfile
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".nnsynth_write_test.", dir=folder) as f:
            f.write(b"ok")
            f.flush()
    except OSError as e:
        raise OutputWriteError(f"Output folder: {describe_write_error(folder / '.nnsynth_write_test', e)}") from None


def _collect_writes(pending: List[Tuple[str, futures.Future]], report: PredictionReport, wait: bool
                    ) -> List[Tuple[str, futures.Future]]:
    left = []
    for n, f in pending:
        if not wait and not f.done():
            left.append((n, f))
            continue
        try:
            f.result()
        except (NnsynthError, OSError, RuntimeError) as e:
            report.failed[n] = f"writing the outputs failed: {e}"
            report.predicted.pop(n, None)
            logger.error("%s: writing failed: %s", n, e)
    return left


__all__ = ["Predictor", "CasePrediction", "ModelFolder", "find_model_folder", "list_trained_models",
           "parse_model_folder", "predict_folder", "PredictionReport", "discover_input_cases", "CaseError",
           "ModelNotFoundError", "PREDICTIONS_RECORD", "MAPS_FOLDER", "CHECKPOINT_FILES"]
