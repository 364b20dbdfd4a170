"""Training batches for synthesis: availability-aware pairs, 2.5D slice stacks or 3D patches, augmentation.

Each sample draws a case, then a source and a target sequence among the sequences that case has (both
uniformly and independently, so ``source == target`` self-reconstruction is included, as in the paper's
"all ordered pairs including i = j"). The patch centre is a foreground (brain) voxel with probability
``oversample_foreground`` and a uniform voxel otherwise; images smaller than the patch are zero-padded. Where a
case has a label map (a tumour segmentation), the plans' ``training.oversample_labels`` is the probability that
the centre is a labelled voxel instead (nnU-Net's foreground oversampling): a lesion covers a few percent of the
brain, so uniform centres would show the network few of the voxels a synthesis most often gets wrong.

Augmentation (batchgeneratorsv2, per sample, torch): the source goes in ``image``, the target in
``regression_target`` and the brain mask in ``segmentation``. Spatial transforms (rotation, scaling,
mirroring) move all three with one grid; intensity transforms (gamma, brightness, noise and the
multiplicative bias field written here) touch ``image`` only.

Randomness comes from the sampler's own ``numpy.random.Generator`` (state in the checkpoint) and, inside
batchgeneratorsv2, from numpy's and torch's global generators (also in the checkpoint). In-process loading
(``num_workers == 0``, the default on small machines) is therefore exactly reproducible; background workers
(``NonDetMultiThreadedAugmenter``) are faster on many cores but not reproducible.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy.ndimage import binary_dilation, gaussian_filter

from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, ImageOnlyTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform

from nnsynth.exceptions import NnsynthError
from nnsynth.preprocessing.storage import open_case

logger = logging.getLogger(__name__)

# --- constants of this module (data loading defaults; the plans' "augmentation" entries override them) ----
FOREGROUND_COORDS_PER_CASE = 20000   # subsample of brain voxels kept per case for foreground sampling
DEFAULT_OVERSAMPLE_FOREGROUND = 0.9  # brain-centred patches: the background carries no synthesis signal
SPATIAL_READ_MARGIN = 1.25           # read this much more than the patch so rotations have no empty corners
WORKER_PARENT_CHECK_S = 1.0          # how often a background worker checks that its trainer still runs
DEFAULT_AUGMENTATION: Dict[str, Any] = {
    "p_rotation": 0.2, "rotation_degrees": [-15.0, 15.0],
    "p_scaling": 0.2, "scaling": [0.85, 1.15],
    "mirror_axes": "inplane",         # "inplane", "all" or a list of axes of the patch; [] for none
    "p_mirror": 0.5,
    "p_gamma": 0.3, "gamma": [0.95, 1.05],
    "p_brightness": 0.15, "brightness": [0.9, 1.1],
    "p_noise": 0.1, "noise_sigma": [0.0, 0.05],
    "p_bias_field": 0.3, "bias_field_scale": 0.2, "bias_field_order": 3,
}
LESION_PASTE_EDGE_SIGMA = 1.0        # voxels: the pasted lesion's edge is blended over about this width


class BiasFieldTransform(ImageOnlyTransform):
    """Multiplicative smooth bias field ``x * exp(p(r))`` on the input image only.

    ``p`` is a random polynomial of degree ``order`` in the normalised coordinates ``r`` in [-1, 1] with
    coefficients in ``[-scale, scale]``; ``exp`` keeps the field positive, so zero background stays zero and
    the tissue contrast ordering inside a small neighbourhood is kept. All channels share one field
    (the channels of a 2.5D stack are adjacent slices of one sequence).
    """

    def __init__(self, scale: float = 0.2, order: int = 3) -> None:
        super().__init__()
        self.scale, self.order = float(scale), int(order)

    def get_parameters(self, **data_dict) -> dict:
        shape = data_dict["image"].shape[1:]
        exps = [e for e in np.ndindex(*([self.order + 1] * len(shape))) if 0 < sum(e) <= self.order]
        coefs = (torch.rand(len(exps)) * 2 - 1) * self.scale
        return {"field": self.make_field(shape, exps, coefs)}

    @staticmethod
    def make_field(shape: Sequence[int], exponents: Sequence[Tuple[int, ...]], coefs: torch.Tensor) -> torch.Tensor:
        axes = torch.meshgrid(*[torch.linspace(-1, 1, int(s)) for s in shape], indexing="ij")
        log_field = torch.zeros(tuple(int(s) for s in shape))
        for e, c in zip(exponents, coefs):
            term = torch.ones_like(log_field)
            for ax, p in zip(axes, e):
                if p:
                    term = term * ax ** p
            log_field += float(c) * term
        return torch.exp(log_field)

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        return img * params["field"].to(img.dtype)[None]


#: the plans' brightness keys (planner.SOURCE_BRIGHTNESS, synthesis inputs); trainers whose input is not a
#: synthesis source drop them and keep DEFAULT_AUGMENTATION's milder brightness
SOURCE_BRIGHTNESS_KEYS = ("p_brightness", "brightness")


def without_source_brightness(settings: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The plans' ``augmentation`` without the synthesis-input brightness, for CodeBrain (whose input stack is
    also its target) and the segmentation trainers: they were measured with DEFAULT_AUGMENTATION's brightness."""
    return {k: v for k, v in (settings or {}).items() if k not in SOURCE_BRIGHTNESS_KEYS}


def _augmentation_settings(settings: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The plans' ``augmentation`` entries over ``DEFAULT_AUGMENTATION``; None when ``enabled`` is false."""
    if (settings or {}).get("enabled", True) is False:
        return None
    return {**DEFAULT_AUGMENTATION, **{k: v for k, v in (settings or {}).items() if k in DEFAULT_AUGMENTATION}}


def build_augmentation(patch_size: Sequence[int], spatial_dims: int, settings: Optional[Dict[str, Any]] = None
                       ) -> Optional[BasicTransform]:
    """The training transform for one patch; ``settings`` are the plans' ``augmentation`` entries."""
    cfg = _augmentation_settings(settings)
    if cfg is None:
        return None
    ndim = len(patch_size)
    deg = cfg["rotation_degrees"]
    rot = [math.radians(float(d)) for d in (deg if isinstance(deg, (list, tuple)) else (-deg, deg))]
    transforms: List[BasicTransform] = [SpatialTransform(
        tuple(int(p) for p in patch_size), patch_center_dist_from_border=0, random_crop=False,
        p_rotation=float(cfg["p_rotation"]), rotation=tuple(rot),
        # 3D: rotate in-plane only when the plan is anisotropic-agnostic; per-axis probability keeps it mild
        p_rot_per_axis=1.0 if ndim == 2 else 1.0 / 3, p_scaling=float(cfg["p_scaling"]),
        scaling=tuple(cfg["scaling"]), p_synchronize_scaling_across_axes=1.0, mode_seg="nearest",
        border_mode_seg="constant", padding_value_seg=0)]
    mirror = cfg["mirror_axes"]
    if mirror == "inplane":
        mirror = [ndim - 1]  # left-right in (y, x) or (z, y, x) patches
    elif mirror == "all":
        mirror = list(range(ndim))
    if mirror and float(cfg["p_mirror"]) > 0:
        # MirrorTransform flips each allowed axis with probability 0.5 once applied
        transforms.append(RandomTransform(MirrorTransform(allowed_axes=tuple(int(a) for a in mirror)),
                                          min(1.0, 2 * float(cfg["p_mirror"]))))
    transforms += _intensity_transforms(cfg)
    return ComposeTransforms(transforms)


def _intensity_transforms(cfg: Mapping[str, Any]) -> List[BasicTransform]:
    return [
        RandomTransform(GammaTransform(gamma=tuple(cfg["gamma"]), p_invert_image=0.0, synchronize_channels=True,
                                       p_per_channel=1.0, p_retain_stats=0.0), float(cfg["p_gamma"])),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=tuple(cfg["brightness"]),
                                                          synchronize_channels=True, p_per_channel=1.0),
                        float(cfg["p_brightness"])),
        RandomTransform(GaussianNoiseTransform(noise_variance=tuple(float(v) ** 2 for v in cfg["noise_sigma"]),
                                               p_per_channel=1.0,
                                               synchronize_channels=True), float(cfg["p_noise"])),
        RandomTransform(BiasFieldTransform(float(cfg["bias_field_scale"]), int(cfg["bias_field_order"])),
                        float(cfg["p_bias_field"])),
    ]


def build_intensity_augmentation(settings: Optional[Dict[str, Any]] = None) -> Optional[BasicTransform]:
    """The plans' intensity transforms alone (gamma, brightness, noise, bias field), for trainers that pick the
    sources of a task only after loading every sequence of a case (multi-source Seq2Seq): they apply it to each
    source stack, (C, *spatial), and leave the target clean. None when every probability is 0."""
    cfg = _augmentation_settings(settings)
    if cfg is None or all(float(cfg[k]) <= 0 for k in INTENSITY_AUGMENTATION_OFF):
        return None
    return ComposeTransforms(_intensity_transforms(cfg))


@dataclass
class CaseInfo:
    name: str
    data: Any                 # lazy (C, Z, Y, X) array
    seg: Any                  # lazy (1, Z, Y, X) int8 array
    available: List[int]      # indices of the sequences the case has
    shape: Tuple[int, int, int]
    foreground: np.ndarray    # (N, 3) subsample of brain voxel coordinates (z, y, x)
    labelled: np.ndarray      # (M, 3) subsample of labelled (label > 0) voxel coordinates; M = 0 without labels
    has_label: bool = False   # the case had a label map (labelsTr): its 0 voxels are known to be unlabelled


def _coordinate_sample(mask: np.ndarray) -> np.ndarray:
    """(N, 3) coordinates of the mask's voxels, a fixed subsample of ``FOREGROUND_COORDS_PER_CASE`` when more."""
    coords = np.argwhere(mask)
    if len(coords) > FOREGROUND_COORDS_PER_CASE:
        pick = np.random.default_rng(0).choice(len(coords), FOREGROUND_COORDS_PER_CASE, replace=False)
        coords = coords[np.sort(pick)]
    return coords


class CaseStore:
    """Opens the preprocessed cases once and keeps what sampling needs (availability, brain voxels)."""

    def __init__(self, folder: Union[str, Path], cases: Sequence[str]) -> None:
        self.folder = Path(folder)
        self.cases: Dict[str, CaseInfo] = {}
        for name in cases:
            # background workers are forked with these arrays open: keep blosc2 off its thread pool
            data, seg, props = open_case(self.folder, name, single_threaded=True)
            available = [i for i, a in enumerate(props["available"]) if a]
            if not available:
                logger.warning("Case %s has no available sequence and is skipped", name)
                continue
            labels = np.asarray(seg[0])
            self.cases[name] = CaseInfo(name, data, seg, available, tuple(int(s) for s in data.shape[1:]),
                                        _coordinate_sample(labels >= 0), _coordinate_sample(labels > 0),
                                        bool(props.get("has_label", False)))
        if not self.cases:
            raise NnsynthError(f"None of the {len(cases)} cases in {self.folder} has an available sequence")

    @property
    def names(self) -> List[str]:
        return list(self.cases)


def read_box(array: Any, channel: int, lo: Sequence[int], size: Sequence[int], fill: float = 0.0) -> np.ndarray:
    """``array[channel, lo:lo+size]`` over (z, y, x), padded with ``fill`` where the box leaves the image."""
    shape = array.shape[1:]
    src, dst = [], []
    for l, s, n in zip(lo, size, shape):
        a, b = max(l, 0), min(l + s, n)
        if b <= a:
            return np.full(tuple(size), fill, np.float32)
        src.append(slice(a, b))
        dst.append(slice(a - l, b - l))
    out = np.full(tuple(size), fill, dtype=np.float32)
    out[tuple(dst)] = np.asarray(array[(channel,) + tuple(src)], dtype=np.float32)
    return out


def _box_start(center: int, size: int, extent: int) -> int:
    """Patch start around ``center``, kept inside the image when it fits, centred on the image when not."""
    if size >= extent:
        return -((size - extent) // 2)
    return int(np.clip(center - size // 2, 0, extent - size))


class SynthesisSampler:
    """Draws (source, target) training/validation batches; iterable, with a checkpointable random state."""

    def __init__(self, store: CaseStore, cases: Sequence[str], patch_size: Sequence[int], spatial_dims: int,
                 num_adjacent_slices: int, batch_size: int, seed: int, transform: Optional[BasicTransform] = None,
                 oversample_foreground: float = DEFAULT_OVERSAMPLE_FOREGROUND,
                 oversample_labels: float = 0.0) -> None:
        self.store = store
        self.cases = [c for c in cases if c in store.cases]
        if not self.cases:
            raise NnsynthError("No usable case to sample from")
        self.patch_size = [int(p) for p in patch_size]
        self.spatial_dims, self.k = int(spatial_dims), int(num_adjacent_slices) if spatial_dims == 2 else 1
        if len(self.patch_size) != self.spatial_dims:
            raise NnsynthError(f"patch_size {self.patch_size} does not match spatial_dims {spatial_dims}")
        self.batch_size, self.transform = int(batch_size), transform
        self.oversample_foreground = float(oversample_foreground)
        self.oversample_labels = float(oversample_labels)
        if not 0.0 <= self.oversample_labels <= 1.0:
            raise NnsynthError(f"training.oversample_labels must be within [0, 1], got {oversample_labels}")
        self.seed = int(seed)
        self.rng = np.random.default_rng(seed)
        self.thread_id = 0
        self.trainer_pid: Optional[int] = None  # set by make_training_iterator before workers start

    # --- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]

    def set_thread_id(self, thread_id: int) -> None:
        """Called by batchgenerators in each worker: give every worker its own stream."""
        self.thread_id = thread_id
        self.rng = np.random.default_rng([self.seed, thread_id + 1])
        if self.trainer_pid is not None and os.getpid() != self.trainer_pid:
            exit_with_process(self.trainer_pid)

    # --- sampling ---------------------------------------------------------------------------------------
    def _center(self, info: CaseInfo) -> Tuple[int, int, int]:
        # no draw when off, so plans without label oversampling sample exactly as before it existed
        if self.oversample_labels > 0 and len(info.labelled) and self.rng.random() < self.oversample_labels:
            return tuple(int(v) for v in info.labelled[self.rng.integers(len(info.labelled))])
        if len(info.foreground) and self.rng.random() < self.oversample_foreground:
            return tuple(int(v) for v in info.foreground[self.rng.integers(len(info.foreground))])
        return tuple(int(self.rng.integers(s)) for s in info.shape)

    def box(self, case: str, center: Sequence[int]) -> Tuple[List[int], List[int], Optional[np.ndarray]]:
        """The box read around ``center``: start and size (with a margin for spatial augmentation), and in 2.5D the
        indices of the k slices inside it (edge slices repeat at the volume's ends); None in 3D."""
        info = self.store.cases[case]
        z, y, x = center
        scale = SPATIAL_READ_MARGIN if self.transform is not None else 1.0
        size_inplane = [int(math.ceil(p * scale)) for p in self.patch_size[-2:]]
        lo_inplane = [_box_start(c, s, n) for c, s, n in zip((y, x), size_inplane, info.shape[1:])]
        if self.spatial_dims == 2:
            zs = np.clip(np.arange(z - self.k // 2, z - self.k // 2 + self.k), 0, info.shape[0] - 1)
            z0 = int(zs.min())
            return [z0] + lo_inplane, [int(zs.max()) + 1 - z0] + size_inplane, zs - z0
        pz = int(math.ceil(self.patch_size[0] * scale))
        return [_box_start(z, pz, info.shape[0])] + lo_inplane, [pz] + size_inplane, None

    def read_channels_and_labels(self, case: str, channels: Sequence[int], center: Sequence[int]
                                 ) -> Tuple[List[np.ndarray], np.ndarray]:
        """Read ``channels`` of a case around ``center``: ``(k, y, x)`` stacks (2D) or ``(z, y, x)`` patches (3D)
        (with a margin for spatial augmentation), plus the seg array of the same box (no channel axis): the
        label value inside the brain, -1 outside."""
        info = self.store.cases[case]
        lo, size, idx = self.box(case, center)
        arrays = [read_box(info.data, c, lo, size) for c in channels]
        seg = read_box(info.seg, 0, lo, size, fill=-1)
        if idx is not None:
            arrays, seg = [a[idx] for a in arrays], seg[idx]
        return arrays, seg

    def read_channels(self, case: str, channels: Sequence[int], center: Sequence[int]
                      ) -> Tuple[List[np.ndarray], np.ndarray]:
        """``read_channels_and_labels`` with the brain mask (bool) instead of the labels."""
        arrays, seg = self.read_channels_and_labels(case, channels, center)
        return arrays, seg >= 0

    def sample(self, case: str, source: int, target: int, center: Sequence[int]) -> Dict[str, np.ndarray]:
        """One un-augmented sample: source/target ``(k, y, x)`` (2D) or ``(1, z, y, x)`` (3D) and its mask."""
        (src, tgt), mask = self.read_channels(case, (source, target), center)
        if self.spatial_dims == 3:
            src, tgt, mask = src[None], tgt[None], mask[None]
        return {"source": src, "target": tgt, "mask": mask.astype(np.float32)}

    def draw(self) -> Tuple[str, int, int, Tuple[int, int, int]]:
        case = self.cases[int(self.rng.integers(len(self.cases)))]
        available = self.store.cases[case].available
        source = available[int(self.rng.integers(len(available)))]
        target = available[int(self.rng.integers(len(available)))]
        return case, source, target, self._center(self.store.cases[case])

    def _finish(self, s: Dict[str, np.ndarray]) -> Dict[str, torch.Tensor]:
        img, tgt, mask = (torch.from_numpy(np.ascontiguousarray(s[k])) for k in ("source", "target", "mask"))
        if self.transform is not None:
            out = self.transform(image=img, regression_target=tgt, segmentation=mask.to(torch.int16))
            img, tgt, mask = out["image"], out["regression_target"], out["segmentation"].float()
        return {"source": img.float(), "target": tgt.float(), "mask": mask.float()}

    def next_batch(self) -> Dict[str, Any]:
        draws = [self.draw() for _ in range(self.batch_size)]
        samples = [self._finish(self.sample(c, s, t, ctr)) for c, s, t, ctr in draws]
        batch: Dict[str, Any] = {k: torch.stack([smp[k] for smp in samples]) for k in ("source", "target", "mask")}
        batch["source_idx"] = torch.tensor([d[1] for d in draws], dtype=torch.long)
        batch["target_idx"] = torch.tensor([d[2] for d in draws], dtype=torch.long)
        batch["cases"] = [d[0] for d in draws]
        return batch

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return self

    def __next__(self) -> Dict[str, Any]:
        return self.next_batch()


#: spatial augmentation only: for samplers whose sequences are sources and targets at once
INTENSITY_AUGMENTATION_OFF = {"p_gamma": 0.0, "p_brightness": 0.0, "p_noise": 0.0, "p_bias_field": 0.0}


class MultiSequenceSampler(SynthesisSampler):
    """Per-case batches: every sequence of a case at one patch, ``images`` (B, N, k, y, x) or (B, N, 1, z, y, x)
    with missing sequences all 0, ``available`` (B, N) bool, the brain ``mask``, ``labels`` (the label value
    inside the brain, -1 outside) and ``has_label`` (B,) bool (the case came with a label map). Only spatial
    augmentation (one grid for all sequences and the labels); intensity augmentation is the trainer's business."""

    def __init__(self, *args: Any, min_available: int = 1, lesion_paste: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cases = [c for c in self.cases if len(self.store.cases[c].available) >= int(min_available)]
        if not self.cases:
            raise NnsynthError(f"No training case holds at least {min_available} sequences; this trainer needs "
                               f"them (check the dataset's missing sequences)")
        self.lesion_paste = float(lesion_paste)
        if not 0.0 <= self.lesion_paste <= 1.0:
            raise NnsynthError(f"augmentation.p_lesion_paste must be within [0, 1], got {lesion_paste}")
        # where each case's pasted lesions come from: the other training cases whose label map shows a lesion and
        # which have every sequence this case has (so no sequence of a sample is left half-pasted)
        labelled = [c for c in self.cases if self.store.cases[c].has_label and len(self.store.cases[c].labelled)]
        self.donors: Dict[str, List[str]] = {
            c: [d for d in labelled if d != c and set(self.store.cases[c].available) <= set(self.store.cases[d].available)]
            for c in self.cases}
        if self.lesion_paste > 0 and not any(self.donors.values()):
            logger.info("Lesion pasting off: no training case has a labelled lesion and the sequences of another")

    def _paste_lesion(self, case: str, s: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Lesion copy-paste: another labelled case's lesion, every sequence and its labels, blended into this
        sample at the same place of the box (so at a random brain position of this case).

        Why: a lesion's appearance on the sequence to synthesise is what a model most often gets wrong in an
        unseen subject, and a small dataset shows it few lesions, each always inside the same brain. Pasting
        puts each lesion into other brains, so its appearance cannot be learned from the context around it.
        All sequences get the same blend (partial volume is linear in the signal), so inputs and target agree.
        Donors have every sequence of the case (``self.donors``). No random draw when ``lesion_paste`` is 0."""
        if self.lesion_paste <= 0 or self.rng.random() >= self.lesion_paste or not self.donors[case]:
            return s
        donor = self.donors[case][int(self.rng.integers(len(self.donors[case])))]
        info = self.store.cases[donor]
        center = tuple(int(v) for v in info.labelled[self.rng.integers(len(info.labelled))])
        keep = self.store.cases[case].available
        arrays, seg = self.read_channels_and_labels(donor, keep, center)
        seg = seg if self.spatial_dims == 2 else seg[None]
        lesion = (seg > 0) & (s["seg"] >= 0)          # the donor's lesion where this case has brain
        if not lesion.any():
            return s
        # no blur along the first axis: the k slices of a 2.5D stack (each blended on its own), or 3D's channel
        sigma = [0.0] + [LESION_PASTE_EDGE_SIGMA] * (lesion.ndim - 1)
        grown = binary_dilation(lesion, iterations=1) & (s["seg"] >= 0) & (seg >= 0)
        alpha = np.maximum(np.clip(gaussian_filter(grown.astype(np.float32), sigma), 0.0, 1.0) * grown, lesion)
        images = s["images"].copy()
        for i, box in zip(keep, arrays):
            images[i] = (1.0 - alpha) * images[i] + alpha * (box if self.spatial_dims == 2 else box[None])
        return {**s, "images": images, "seg": np.where(lesion, seg, s["seg"])}

    def _read_all(self, case: str, center) -> Dict[str, np.ndarray]:
        """Every sequence of the case around ``center`` (missing ones stay 0), its labels and availability."""
        info = self.store.cases[case]
        n = int(info.data.shape[0])
        arrays, seg = self.read_channels_and_labels(case, info.available, center)
        seg = seg if self.spatial_dims == 2 else seg[None]
        shape = arrays[0].shape if self.spatial_dims == 2 else (1,) + arrays[0].shape
        imgs = np.zeros((n,) + shape, np.float32)
        for s, box in zip(info.available, arrays):
            imgs[s] = box if self.spatial_dims == 2 else box[None]
        avail = np.zeros(n, bool)
        avail[info.available] = True
        return {"images": imgs, "seg": seg, "available": avail, "has_label": info.has_label}

    def next_batch(self) -> Dict[str, Any]:
        names, images, segs, avails, has_label = [], [], [], [], []
        for _ in range(self.batch_size):
            case = self.cases[int(self.rng.integers(len(self.cases)))]
            s = self._paste_lesion(case, self._read_all(case, self._center(self.store.cases[case])))
            img = torch.from_numpy(s["images"])
            # shifted by one so that what spatial augmentation moves in from outside (0) is outside the brain
            seg = torch.from_numpy(s["seg"] + 1).to(torch.int16)
            if self.transform is not None:
                n, c = img.shape[:2]
                out = self.transform(image=img.reshape(n * c, *img.shape[2:]), segmentation=seg)
                img = out["image"].reshape(n, c, *out["image"].shape[1:])
                seg = out["segmentation"]
            names.append(case)
            images.append(img.float())
            segs.append(seg.long() - 1)
            avails.append(torch.from_numpy(s["available"]))
            has_label.append(bool(s["has_label"]))
        seg_batch = torch.stack(segs)
        # labels: the label value inside the brain, -1 outside; has_label: the case came with a label map
        return {"images": torch.stack(images), "mask": (seg_batch >= 0).float(), "labels": seg_batch,
                "has_label": torch.tensor(has_label), "available": torch.stack(avails), "cases": names}


def exit_with_process(pid: int, interval_s: float = WORKER_PARENT_CHECK_S) -> None:
    """End this (worker) process once process ``pid`` is gone.

    batchgenerators' producers only stop on an abort event, which a SIGKILLed or OOM-killed trainer never sets:
    its workers would loop on their full queue forever, holding memory and the trainer's output pipes. A daemon
    thread checks every ``interval_s``: a forked worker is re-parented the moment the trainer dies; a spawned
    one (forkserver, Python >= 3.14) asks the kernel whether ``pid`` still exists.
    """
    forked = os.getppid() == pid
    if not forked and os.name == "nt":
        # there os.kill(pid, 0) sends CTRL_C_EVENT instead of asking: no watch rather than a wrong one
        return

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if forked:
                gone = os.getppid() != pid
            else:
                try:
                    os.kill(pid, 0)
                    gone = False
                except (ProcessLookupError, PermissionError):  # PermissionError: the pid is another user's now
                    gone = True
            if gone:
                os._exit(0)

    threading.Thread(target=watch, name="nnsynth-trainer-watch", daemon=True).start()


def make_training_iterator(sampler: SynthesisSampler, num_workers: int) -> Iterator[Dict[str, Any]]:
    """In-process iteration for ``num_workers == 0`` (reproducible), else batchgenerators background workers."""
    if num_workers <= 0:
        return sampler
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    sampler.trainer_pid = os.getpid()
    seeds = [sampler.seed + 1000 * (i + 1) for i in range(num_workers)]
    return NonDetMultiThreadedAugmenter(sampler, None, num_workers, num_cached=max(2, num_workers), seeds=seeds,
                                        pin_memory=torch.cuda.is_available())


def fixed_validation_batches(store: CaseStore, cases: Sequence[str], patch_size: Sequence[int], spatial_dims: int,
                             num_adjacent_slices: int, batch_size: int, num_batches: int, seed: int
                             ) -> List[Dict[str, Any]]:
    """The same brain-centred, un-augmented batches every epoch, so validation curves are comparable."""
    sampler = SynthesisSampler(store, cases, patch_size, spatial_dims, num_adjacent_slices, batch_size, seed,
                               transform=None, oversample_foreground=1.0)
    return [sampler.next_batch() for _ in range(num_batches)]
