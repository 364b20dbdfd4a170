"""Python API for notebooks: load a trained model once, synthesise from SimpleITK images or numpy arrays.

    from nnsynth.inference.api import SynthesisModel
    model = SynthesisModel.from_results(dataset=501, trainer="seq2seq")      # or SynthesisModel(folder)
    flair = model.predict({"T1": sitk.ReadImage("t1.nii.gz"), "T2": t2_image}, target="Flair")
    out = model.predict_arrays({"T1": t1_array}, geometry, targets=["T2", "Flair"])   # numpy in, numpy out

Returned images share the input geometry (shape, spacing, origin, direction) and hold float32 intensities in the
dataset's normalised space (see ``documentation/prediction.md``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from nnsynth.dataset.io import Geometry, geometry_of
from nnsynth.exceptions import NnsynthError
from nnsynth.inference.predictor import CasePrediction, Predictor, find_model_folder
from nnsynth.inference.sliding_window import DEFAULT_STEP_SIZE

PathLike = Union[str, os.PathLike]


def _to_image(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    img = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))
    img.SetSpacing(geometry.spacing)
    img.SetOrigin(geometry.origin)
    img.SetDirection(geometry.direction)
    return img


class SynthesisModel:
    """A loaded nnsynth model (all requested folds); thread-unsafe, reuse it for many cases."""

    def __init__(self, model_folder: PathLike, folds: Optional[Sequence[Union[int, str]]] = None,
                 checkpoint: str = "final", device: Union[str, torch.device] = "auto",
                 step_size: float = DEFAULT_STEP_SIZE, tta: bool = False, progress: bool = False,
                 calibrate: bool = True) -> None:
        self.predictor = Predictor(model_folder, folds, checkpoint, device, step_size, tta, progress=progress,
                                   calibrate=calibrate)

    @classmethod
    def from_results(cls, dataset: Optional[Union[str, int]] = None, trainer: Optional[str] = None,
                     configuration: Optional[str] = None, plans: Optional[str] = None, checkpoint: str = "final",
                     **kwargs: Any) -> "SynthesisModel":
        """Find the model in ``nnSynth_results`` like ``nnsynth_predict`` does (no filters: the only one)."""
        model = find_model_folder(dataset, trainer, configuration, plans, checkpoint)
        return cls(model.path, checkpoint=checkpoint, **kwargs)

    @property
    def sequences(self) -> list:
        return list(self.predictor.sequences)

    @property
    def model_folder(self) -> Path:
        return self.predictor.model.path

    def predict_arrays(self, images: Mapping[str, np.ndarray], geometry: Geometry,
                       targets: Union[str, Sequence[str]] = "all", return_maps: bool = False) -> Dict[str, Any]:
        """``{sequence: array}`` (SimpleITK array order, sharing ``geometry``) -> ``{target: float32 array}``.

        ``targets``: a name, a list of names, or ``"all"`` (every sequence not given). With ``return_maps`` the
        result also holds ``"maps": {(sequence, name): array}`` and ``"contributions"``."""
        res = self._run(images, geometry, targets, return_maps)
        out: Dict[str, Any] = dict(res.predictions)
        if return_maps:
            out["maps"] = dict(res.maps)
            out["contributions"] = dict(res.contributions)
        return out

    def predict(self, images: Mapping[str, sitk.Image], target: Union[str, Sequence[str]] = "all",
                return_maps: bool = False) -> Any:
        """SimpleITK images in, SimpleITK images out (same geometry).

        A single target name returns one image; a list or ``"all"`` returns ``{target: image}``."""
        if not images:
            raise NnsynthError("predict needs at least one source image")
        arrays: Dict[str, np.ndarray] = {}
        geometry: Optional[Geometry] = None
        for name, img in images.items():
            if not isinstance(img, sitk.Image):
                raise NnsynthError(f"{name}: expected a SimpleITK image, got {type(img).__name__} (use "
                                   f"predict_arrays for numpy arrays)")
            geo = geometry_of(img)
            if geometry is None:
                geometry = geo
            elif geometry.mismatch(geo):
                raise NnsynthError(f"{name}: geometry differs from the other images ({geometry.mismatch(geo)})")
            arrays[name] = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)
        geo = geometry
        res = self._run(arrays, geo, target, return_maps)
        imgs = {t: _to_image(a, geo) for t, a in res.predictions.items()}
        if return_maps:
            maps = {k: _to_image(a, geo) for k, a in res.maps.items()}
            return {"images": imgs, "maps": maps, "contributions": dict(res.contributions)}
        if isinstance(target, str) and target.lower() != "all":
            return imgs[self.predictor.sequences[self.predictor.sequence_index(target)]]
        return imgs

    def _run(self, images: Mapping[str, np.ndarray], geometry: Optional[Geometry],
             targets: Union[str, Sequence[str]], maps: bool) -> CasePrediction:
        if geometry is None:
            raise NnsynthError("a geometry is needed (nnsynth.dataset.io.Geometry or read from an image)")
        resolved = self.predictor.resolve_targets(targets)
        if resolved is not None:
            names = {self.predictor.sequences[self.predictor.sequence_index(n)] for n in images}
            given = [t for t in resolved if t in names]
            if given and len(given) == len(resolved):
                raise NnsynthError(f"{', '.join(given)} given as input; nothing to synthesise")
        return self.predictor.predict_case(images, geometry, resolved, save_maps=maps)


__all__ = ["SynthesisModel"]
