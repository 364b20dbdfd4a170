"""``nnsynth_predict --segment`` (or ``-t seg``): label maps from a trained segmentation model.

A segmentation model is a model folder of a trainer that provides the adapter hook
``segment_windows(sources) -> (B, C, *window) class probabilities`` (``seg_from_latent``,
``seg_from_images``). Each case is preprocessed like training, segmented with the Gaussian-weighted sliding
window (folds averaged, optional mirroring TTA), the class probabilities are mapped back to the case's own
geometry (linear interpolation; background outside the cropped region) and the argmax is written as
``OUT/{case}{ending}`` (uint8, or int16 for label values above 255) holding dataset.json label values, in the
case's original geometry, like ``labelsTr``. Cases may miss any sequences: every available one is used.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from nnsynth.dataset.io import Geometry, write_image
from nnsynth.evaluation.segmentation import SEGMENTATION_RECORD, tumour_regions
from nnsynth.exceptions import NnsynthError
from nnsynth.inference.predictor import (CaseError, ModelFolder, ModelNotFoundError, PredictionReport, Predictor,
                                         discover_input_cases, list_trained_models, read_input_case)
from nnsynth.inference.sliding_window import PREDICTION_KEY, sliding_window_predict, with_mirroring
from nnsynth.utils.files import save_json
from nnsynth.utils.log import progress_disabled

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

# --- constants of this module ------------------------------------------------------------------------------
SEGMENT_TARGETS = ("seg", "segmentation")      # ``-t`` values that ask for label maps
PROBABILITY_RESAMPLING_ORDER = 1                # class probabilities back to the case geometry: linear
# ---------------------------------------------------------------------------------------------------------------


def is_segment_target(target: Union[None, str, Sequence[str]]) -> bool:
    """Whether ``-t`` asks for segmentation (``seg``); mixing it with sequence names is an error."""
    if target is None:
        return False
    names = [target] if isinstance(target, str) else list(target)
    seg = [n for n in names if str(n).lower() in SEGMENT_TARGETS]
    if seg and len(seg) != len(names):
        raise NnsynthError("-t seg cannot be combined with sequence names; run nnsynth_predict once per task")
    return bool(seg)


def find_segmentation_model(dataset: Optional[Union[str, int]] = None, trainer: Optional[str] = None,
                            configuration: Optional[str] = None, plans: Optional[str] = None,
                            checkpoint: str = "final") -> ModelFolder:
    """The one trained segmentation model matching the filters (synthesis models are ignored)."""
    from nnsynth import paths
    from nnsynth.inference.predictor import find_model_folder
    from nnsynth.training.trainers.seg_from_latent import SEGMENTATION_TRAINERS
    if trainer is not None:
        return find_model_folder(dataset, trainer, configuration, plans, checkpoint)
    dataset_name = paths.resolve_dataset_name(dataset) if dataset is not None else None
    chosen = [m for m in list_trained_models(None, checkpoint) if m.trainer in SEGMENTATION_TRAINERS
              and (dataset_name is None or m.dataset == dataset_name)
              and (configuration is None or m.configuration == configuration) and (plans is None or m.plans == plans)]
    if len(chosen) == 1:
        return chosen[0]
    if not chosen:
        raise ModelNotFoundError(f"No trained segmentation model ({', '.join(SEGMENTATION_TRAINERS)}) under "
                                 f"{paths.results_folder()}; train one with nnsynth_train DATASET seg_from_latent 0")
    listing = "\n".join(f"  - {m}  (-d {m.dataset} -tr {m.trainer} -c {m.configuration} -p {m.plans})"
                        for m in chosen)
    raise ModelNotFoundError(f"Several trained segmentation models match; choose one with -d/-tr/-c/-p:\n{listing}")


def _check_adapters(predictor: Predictor) -> None:
    bad = [a for a in predictor.adapters if not callable(getattr(a, "segment_windows", None))]
    if bad:
        raise NnsynthError(f"{predictor.model} is a synthesis model ({predictor.model.trainer}); --segment needs a "
                           f"segmentation model (seg_from_latent or seg_from_images): pass -tr seg_from_latent")


def segment_preprocessed(predictor: Predictor, data: np.ndarray, seg: np.ndarray, available: Sequence[int]
                         ) -> np.ndarray:
    """Fold-averaged class probabilities (C, Z, Y, X) of a preprocessed case; background outside the brain."""
    from nnsynth.training.trainers.seg_from_latent import segmentation_window_fn
    volumes = {int(s): np.asarray(data[s], np.float32) for s in available}
    total: Optional[np.ndarray] = None
    for adapter in predictor.adapters:
        adapter.network.eval()
        fn = segmentation_window_fn(adapter)
        if predictor.tta:
            fn = with_mirroring(fn, predictor.spatial_dims)
        autocast = predictor.device.type == "cuda"

        def run(inp: Dict[int, torch.Tensor], fn=fn) -> Dict[str, torch.Tensor]:
            with torch.autocast(predictor.device.type, enabled=autocast):
                return {k: v.float() for k, v in fn(inp).items()}
        out = sliding_window_predict(volumes, run, predictor.spatial_dims, predictor.patch_size, predictor.k,
                                     predictor.step_size, predictor.device, predictor.window_batch)
        probs = np.stack([out[PREDICTION_KEY]] + [out[f"class_{c}"] for c in range(1, len(out))])
        total = probs if total is None else total + probs
    total /= len(predictor.adapters)
    outside = np.asarray(seg[0]) < 0
    total[:, outside] = 0.0
    total[0, outside] = 1.0
    return total


def segment_case(predictor: Predictor, images: Mapping[str, np.ndarray], geometry: Geometry, case: str = "case"
                 ) -> Tuple[np.ndarray, List[str]]:
    """Label map of one case (its original array shape, dataset.json label values) and the sequences used."""
    from nnsynth.preprocessing.preprocessor import revert_preprocessing
    by_index: List[Optional[np.ndarray]] = [None] * len(predictor.sequences)
    for name, arr in images.items():
        if arr is not None:
            by_index[predictor.sequence_index(name)] = np.asarray(arr)
    available = [i for i, a in enumerate(by_index) if a is not None]
    if not available:
        raise CaseError(f"{case}: no usable sequence (known: {', '.join(predictor.sequences)})")
    data, seg, props = predictor.preprocess(by_index, geometry, case)
    del by_index
    probs = segment_preprocessed(predictor, data, seg, available)
    values = np.asarray(predictor.adapters[0].class_values)
    back = np.stack([revert_preprocessing(p, props, predictor.plans, predictor.configuration,
                                          order=PROBABILITY_RESAMPLING_ORDER, fill_value=1.0 if c == 0 else 0.0)
                     for c, p in enumerate(probs)])
    labels = values[back.argmax(0)]
    return labels, [predictor.sequences[s] for s in available]


def segment_folder(predictor: Predictor, input_folder: PathLike, output_folder: PathLike,
                   continue_prediction: bool = False, num_parts: int = 1, part_id: int = 0) -> PredictionReport:
    """Write ``OUT/{case}{ending}`` label maps for every case of ``input_folder`` (bad cases reported, skipped)."""
    from tqdm import tqdm
    _check_adapters(predictor)
    t0 = time.time()
    out = Path(output_folder)
    spec = predictor.spec
    cases, ignored = discover_input_cases(input_folder, spec)
    if ignored:
        logger.warning("Ignored %d file(s) not named {case}_{XXXX}{ending}: %s", len(ignored),
                       ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else ""))
    if not cases:
        raise NnsynthError(f"No case found in {input_folder} (files must be named {{case}}_{{XXXX}}{spec.file_ending})")
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise NnsynthError(f"--part-id must be in 0..{num_parts - 1} for --num-parts {num_parts}, got {part_id}")
    names = list(cases)[part_id::num_parts]
    adapter = predictor.adapters[0]
    labels = dict(adapter.labels or {})
    values = adapter.class_values
    dtype = np.uint8 if max(values) <= 255 else np.int16
    record_path = out / (SEGMENTATION_RECORD if num_parts == 1 else
                         SEGMENTATION_RECORD.replace(".json", f"_part{part_id}of{num_parts}.json"))
    record: Dict[str, Any] = {"model": str(predictor.model.path), "folds": predictor.folds,
                              "checkpoint": predictor.checkpoint, "labels": labels,
                              "regions": tumour_regions(labels) if labels else {},
                              "rule": predictor.rule, "cases": {}}
    report = PredictionReport()
    out.mkdir(parents=True, exist_ok=True)
    logger.info("Segmenting %d case(s) of %s with %s -> %s", len(names), input_folder, predictor.model, out)
    bar = tqdm(names, desc="segment", unit="case", disable=progress_disabled(predictor.progress))
    try:
        for n in bar:
            c = cases[n]
            target = out / f"{n}{c.ending}"
            if continue_prediction and target.is_file() and not c.problems:
                report.skipped_done.append(n)
                continue
            try:
                images, geometry = read_input_case(c, spec)
                label_map, used = segment_case(predictor, images, geometry, n)
                write_image(label_map, geometry, target, dtype=dtype)
                report.predicted[n] = ["seg"]
                record["cases"][n] = {"sources": used, "file": target.name}
            except NnsynthError as e:
                report.failed[n] = str(e)
                logger.error("%s: skipped: %s", n, e)
    finally:
        bar.close()
        save_json(record, record_path)
    report.seconds = time.time() - t0
    return report


__all__ = ["segment_folder", "segment_case", "segment_preprocessed", "find_segmentation_model",
           "is_segment_target", "SEGMENT_TARGETS"]
