"""One-shot tumour segmentation from the VQC common latent space (VQ-Seq2Seq sec. 3.2, Table 3, Fig. 5) and
its image-space baseline.

``seg_from_latent`` freezes the encoder and quantiser of a trained ``vq_seq2seq`` (or the encoder of a
``seq2seq``) of the same dataset, plans, configuration and fold, found the way ``tsf_seq2seq --pretrained-from``
finds its backbone (``nnSynth_results/DatasetXXX/{latent_from}__{plans}__{configuration}/fold_{k}/``, final
checkpoint, else latest; or a checkpoint path). Each training patch is encoded per available sequence (z_q),
the maps are fused by their mean (the VQC centre, eq. 4), and a PlainConvUNet segments the fused map; its
logits are upsampled to image resolution and trained with Dice + cross-entropy against ``labelsTr`` (stored
by preprocessing in ``{case}_seg.b2nd``), on the chosen labelled cases only.

``seg_from_images`` is the fair baseline: the same PlainConvUNet family on the images themselves (missing
sequences all 0), the same labelled cases, sampler, augmentation, optimiser, schedule and loss. Both read the
plans' ``per_trainer.seg_from_latent`` training settings and ``loss.seg_from_latent`` weights (an entry under
their own name overrides), so the budget is identical.

Labelled cases: ``--cases A B`` names them; otherwise ``--labelled-cases N`` (default 1) takes the first N
training cases of the fold that have a label file, preferring cases with every sequence and with tumour
(the paper used "one subject containing all sequences"), in name order. Labels: dataset.json ``labels``,
one class per label value (sorted). Validation (monitoring and ``checkpoint_best`` only; prediction uses
``checkpoint_final`` by default) uses the fold's labelled validation cases: Dice per region on fixed patches
every epoch, and full-volume Dice/ASSD (ET, TC, WT) into ``validation/summary.json`` at the end.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from nnsynth.constants import DATASET_JSON
from nnsynth.exceptions import NnsynthError
from nnsynth.training import checkpointing as ckpt
from nnsynth.training import distributed as dist_utils
from nnsynth.training.dataloading import (DEFAULT_OVERSAMPLE_FOREGROUND, build_augmentation, read_box,
                                          without_source_brightness)
from nnsynth.training.engine import VALIDATION_SEED, TrainingEngine
from nnsynth.training.dataloading import MultiSequenceSampler
from nnsynth.training.trainers.vq_seq2seq import apply_optimizer_defaults
from nnsynth.utils.files import load_json, save_json

logger = logging.getLogger(__name__)

# --- constants of this module (defaults; the plans' "training"/"loss" entries override them) -----------------
SEGMENTATION_TRAINERS = ("seg_from_latent", "seg_from_images")
SETTINGS_SOURCE = "seg_from_latent"      # plans entries both segmentation trainers read (same budget)
SEG_LOSS_DEFAULTS: Dict[str, Any] = {
    "lambda_dice": 1.0, "lambda_ce": 1.0,
    "oversample_tumour": 0.5,   # fraction of training patches centred on a tumour voxel (nnU-Net: 0.33)
    "sequence_dropout": 0.0,    # probability of dropping a random subset of a sample's sequences (0: paper)
}
SEG_OPTIMIZER_DEFAULTS: Dict[str, Any] = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4,
                                          "betas": [0.9, 0.999]}
DEFAULT_LABELLED_CASES = 1
LATENT_SEARCH_ORDER = ("vq_seq2seq", "seq2seq")
TUMOUR_COORDS_PER_CASE = 20000
FINAL_VALIDATION_STEP = 0.5          # sliding-window step of the full-volume validation
# ---------------------------------------------------------------------------------------------------------------


class SegmentationSampler(MultiSequenceSampler):
    """Per-case batches of every sequence at one patch plus its label map: ``images`` (B, N, k, y, x) or
    (B, N, 1, z, y, x), ``available`` (B, N), ``labels`` (B, k, y, x) or (B, z, y, x) as class indices.
    Patches are centred on a tumour voxel with probability ``oversample_tumour``."""

    def __init__(self, *args: Any, label_lut: np.ndarray, oversample_tumour: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.label_lut = np.asarray(label_lut, np.int64)
        self.oversample_tumour = float(oversample_tumour)
        self.tumour: Dict[str, np.ndarray] = {}
        for case in self.cases:
            coords = np.argwhere(np.asarray(self.store.cases[case].seg[0]) > 0)
            if len(coords) > TUMOUR_COORDS_PER_CASE:
                pick = np.random.default_rng(0).choice(len(coords), TUMOUR_COORDS_PER_CASE, replace=False)
                coords = coords[np.sort(pick)]
            self.tumour[case] = coords

    def _labelled_center(self, case: str) -> Tuple[int, int, int]:
        coords = self.tumour.get(case)
        if coords is not None and len(coords) and self.rng.random() < self.oversample_tumour:
            return tuple(int(v) for v in coords[self.rng.integers(len(coords))])
        return self._center(self.store.cases[case])

    def read_labelled(self, case: str, center: Sequence[int]) -> Dict[str, np.ndarray]:
        """Every sequence (missing ones 0) and the class-index label map of one box."""
        info = self.store.cases[case]
        lo, size, idx = self.box(case, center)
        n = int(info.data.shape[0])
        lab = read_box(info.seg, 0, lo, size, fill=0)
        lab = self.label_lut[np.clip(np.rint(lab).astype(np.int64), 0, len(self.label_lut) - 1)]
        shape = tuple(size) if idx is None else (len(idx),) + tuple(size[1:])
        imgs = np.zeros((n,) + ((1,) + shape if idx is None else shape), np.float32)
        for s in info.available:
            box = read_box(info.data, s, lo, size)
            imgs[s] = box[None] if idx is None else box[idx]
        if idx is not None:
            lab = lab[idx]
        avail = np.zeros(n, bool)
        avail[info.available] = True
        return {"images": imgs, "labels": lab.astype(np.int16), "available": avail}

    def next_batch(self) -> Dict[str, Any]:
        names, images, labels, avails = [], [], [], []
        for _ in range(self.batch_size):
            case = self.cases[int(self.rng.integers(len(self.cases)))]
            s = self.read_labelled(case, self._labelled_center(case))
            img, lab = torch.from_numpy(s["images"]), torch.from_numpy(s["labels"])
            lab = lab if self.spatial_dims == 2 else lab[None]
            if self.transform is not None:
                n, c = img.shape[:2]
                out = self.transform(image=img.reshape(n * c, *img.shape[2:]), segmentation=lab)
                img = out["image"].reshape(n, c, *out["image"].shape[1:])
                lab = out["segmentation"]
            avail = torch.from_numpy(s["available"])
            img = img * avail.to(img.dtype).reshape(-1, *([1] * (img.dim() - 1)))   # missing stay 0
            names.append(case)
            images.append(img.float())
            labels.append((lab if self.spatial_dims == 2 else lab[0]).long())
            avails.append(avail)
        return {"images": torch.stack(images), "labels": torch.stack(labels), "available": torch.stack(avails),
                "cases": names}


class SegmentationTrainerBase(TrainingEngine):
    """Shared by ``seg_from_latent`` and ``seg_from_images``: labelled-case choice, sampler, Dice + CE,
    segmentation validation, the inference hook ``segment_windows``. Subclasses build the network."""

    trainer_name = "segmentation"
    is_segmentation = True
    supports_differentiation_maps = False

    def __init__(self, *args: Any, labelled_cases: Optional[int] = None,
                 labelled_case_names: Optional[Sequence[str]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        apply_optimizer_defaults(self, SEG_OPTIMIZER_DEFAULTS)
        self.loss_cfg = {**SEG_LOSS_DEFAULTS,
                         **{k: v for k, v in self.loss_settings.items() if not isinstance(v, dict)}}
        if labelled_cases is not None and int(labelled_cases) < 1:
            raise NnsynthError(f"--labelled-cases must be >= 1, got {labelled_cases}")
        names = [str(c) for c in labelled_case_names] if labelled_case_names else None
        if names and labelled_cases is not None and int(labelled_cases) != len(names):
            raise NnsynthError(f"--labelled-cases {labelled_cases} but --cases names {len(names)} case(s); give "
                               f"one of the two or make them agree")
        self.requested_cases = names
        self.num_labelled = len(names) if names else int(labelled_cases or DEFAULT_LABELLED_CASES)
        self.init_args.update({"labelled_cases": labelled_cases, "labelled_case_names": names})
        self.labels: Optional[Dict[str, int]] = None
        self.labelled_cases: List[str] = []
        self.best_dice = -math.inf
        self._val_improved = False

    # ----- settings -------------------------------------------------------------------------------------------
    def trainer_settings(self) -> Dict[str, Any]:
        """The plans' training settings with ``per_trainer.seg_from_latent`` then this trainer's own entry, and
        ``loss.seg_from_latent`` (then this trainer's): both segmentation trainers get the same budget."""
        training_cfg = self.config.get("training", {}) or {}
        per = training_cfg.get("per_trainer", {}) or {}
        training = {k: v for k, v in training_cfg.items() if k != "per_trainer"}
        training.update(per.get(SETTINGS_SOURCE, {}) or {})
        training.update(per.get(self.trainer_name, {}) or {})
        loss = self.config.get("loss", {}) or {}
        merged = dict(loss.get(SETTINGS_SOURCE, {}) or {}) if isinstance(loss.get(SETTINGS_SOURCE), dict) else {}
        if isinstance(loss.get(self.trainer_name), dict):
            merged.update(loss[self.trainer_name])
        training["loss"] = merged
        return training

    def _load_labels(self) -> Dict[str, int]:
        from nnsynth.evaluation.segmentation import label_values
        path = self.preprocessed_dataset_folder / DATASET_JSON
        labels = load_json(path).get("labels") if path.is_file() else None
        if not labels:
            raise NnsynthError(f"{self.trainer_name} needs labels: {path} has no 'labels' entry. Add "
                               f'"labels": {{"background": 0, ...}} to dataset.json, put label maps in labelsTr/ '
                               f"and re-run nnsynth_plan_and_preprocess")
        return label_values(labels)

    @property
    def class_values(self) -> List[int]:
        """Label values in class order (class i predicts ``class_values[i]``; class 0 is the background 0)."""
        if self.labels is None:
            self.labels = self._load_labels()
        return sorted(set(self.labels.values()))

    @property
    def num_classes(self) -> int:
        return len(self.class_values)

    def label_lut(self) -> np.ndarray:
        """Label value -> class index (values not in dataset.json labels map to the background)."""
        from nnsynth.evaluation.segmentation import class_lut
        return class_lut(self.class_values)

    # ----- set-up ---------------------------------------------------------------------------------------------
    def choose_labelled_cases(self) -> List[str]:
        """The labelled training cases: ``--cases`` as given, else the first N of the fold's training cases with
        a label (every sequence and tumour first, then by name)."""
        from nnsynth.preprocessing.storage import load_properties
        store = self.case_store.cases
        if self.requested_cases:
            problems = []
            for c in self.requested_cases:
                if c not in store:
                    problems.append(f"{c}: not a preprocessed case of this fold (known: "
                                    f"{', '.join(sorted(store)[:8])}{' ...' if len(store) > 8 else ''})")
                elif not load_properties(self.data_folder, c).get("has_label"):
                    problems.append(f"{c}: has no label file in labelsTr")
            if problems:
                raise NnsynthError("--cases: " + "; ".join(problems))
            in_val = [c for c in self.requested_cases if c in self.val_cases and c not in self.train_cases]
            if in_val:
                logger.warning("Labelled case(s) %s belong to the validation split of fold %s; they are left out "
                               "of validation", ", ".join(in_val), self.fold)
            return list(self.requested_cases)
        ranked = []
        for c in sorted(self.train_cases):
            if c not in store or not load_properties(self.data_folder, c).get("has_label"):
                continue
            complete = len(store[c].available) == len(self.sequences)
            tumour = bool((np.asarray(store[c].seg[0]) > 0).any())
            ranked.append((not complete, not tumour, c))
        if len(ranked) < self.num_labelled:
            raise NnsynthError(f"{self.trainer_name}: fold {self.fold} has {len(ranked)} labelled training case(s), "
                               f"{self.num_labelled} requested. Put label maps in labelsTr/, re-run "
                               f"nnsynth_plan_and_preprocess, or lower --labelled-cases")
        return [c for _, _, c in sorted(ranked)[:self.num_labelled]]

    def _sampler(self, cases: Sequence[str], train: bool, seed: int) -> SegmentationSampler:
        patch = [int(p) for p in self.config["patch_size"]]
        aug = without_source_brightness(self.config.get("augmentation"))
        transform = build_augmentation(patch, self.spatial_dims, aug) if train else None
        return SegmentationSampler(self.case_store, list(cases), patch, self.spatial_dims, self.num_adjacent_slices,
                                   int(self.config.get("batch_size", 2)), seed=seed, transform=transform,
                                   label_lut=self.label_lut(),
                                   oversample_tumour=float(self.loss_cfg["oversample_tumour"]),
                                   oversample_foreground=DEFAULT_OVERSAMPLE_FOREGROUND if train else 1.0)

    def build_sampler(self) -> SegmentationSampler:
        """Patches of the chosen labelled cases only (chosen here: the engine builds the sampler once)."""
        self.labelled_cases = self.choose_labelled_cases()
        logger.info("%s: %d labelled case(s): %s (classes %s from dataset.json labels)", self.trainer_name,
                    len(self.labelled_cases), ", ".join(self.labelled_cases), self.labels)
        return self._sampler(self.labelled_cases, True, self.seed + 7919 * self.rank)

    def initialize(self) -> None:
        if self.was_initialized:
            return
        if self.world_size > 1:
            raise NnsynthError(f"{self.trainer_name} trains on one or a few labelled cases; --num-gpus > 1 is not "
                               f"supported. Train on one device")
        _ = self.class_values          # fail early without labels
        super().initialize()
        from nnsynth.losses.segmentation import DiceCELoss
        from nnsynth.preprocessing.storage import load_properties
        self.seg_val_cases = [c for c in self.val_cases if c not in self.labelled_cases and c in self.case_store.cases
                              and load_properties(self.data_folder, c).get("has_label")]
        self.val_batches = []
        if self.seg_val_cases:
            val = self._sampler(self.seg_val_cases, False, VALIDATION_SEED)
            self.val_batches = [val.next_batch() for _ in range(int(self.training["val_iters"]))]
        self.seg_loss = DiceCELoss(float(self.loss_cfg["lambda_dice"]), float(self.loss_cfg["lambda_ce"]))

    # ----- training ---------------------------------------------------------------------------------------------
    def drop_sequences(self, available: torch.Tensor) -> torch.Tensor:
        """With probability ``sequence_dropout`` per sample keep a random non-empty subset of its sequences."""
        p = float(self.loss_cfg["sequence_dropout"])
        if p <= 0:
            return available
        out = available.clone()
        for i in range(out.shape[0]):
            av = out[i].nonzero(as_tuple=True)[0]
            if len(av) > 1 and float(torch.rand(())) < p:
                keep = int(torch.randint(1, len(av), ()))
                out[i] = False
                out[i, av[torch.randperm(len(av))[:keep]]] = True
        return out

    def compute_loss(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, float]]:
        available = self.drop_sequences(batch["available"].bool())
        logits = self.train_network(batch["images"], available)
        loss, parts = self.seg_loss(logits, batch["labels"])
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    # ----- inference --------------------------------------------------------------------------------------------
    def _stack(self, sources: Mapping[int, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        any_src = next(iter(sources.values()))
        images = any_src.new_zeros((any_src.shape[0], len(self.sequences)) + tuple(any_src.shape[1:]))
        available = torch.zeros((any_src.shape[0], len(self.sequences)), dtype=torch.bool, device=any_src.device)
        for s, x in sources.items():
            images[:, int(s)] = x
            available[:, int(s)] = True
        return images, available

    def segment_windows(self, sources: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Inference hook: class probabilities (B, C, *source shape) for source windows
        ``{sequence index: (B, k, y, x) or (B, 1, z, y, x)}``."""
        images, available = self._stack(sources)
        probs = torch.softmax(self.network(images, available).float(), 1)
        any_src = next(iter(sources.values()))
        return probs.reshape(probs.shape[0], probs.shape[1], *any_src.shape[1:])

    def synthesize_slices(self, sources: Dict[int, torch.Tensor], target: int) -> torch.Tensor:
        raise NnsynthError(f"{self.trainer_name} is a segmentation model; predict label maps with "
                           f"nnsynth_predict ... --segment (or -t seg)")

    def full_volume_method(self) -> str:
        return "segmentation of all available sequences"

    # ----- validation -------------------------------------------------------------------------------------------
    def regions(self) -> Dict[str, List[int]]:
        from nnsynth.evaluation.segmentation import tumour_regions
        if self.labels is None:
            self.labels = self._load_labels()
        return tumour_regions(self.labels)

    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        """Dice per region over the fixed validation patches (pooled), logged as ``val_dice_{region}`` and
        ``val_dice``; PSNR/SSIM do not apply (NaN)."""
        regions = self.regions()
        values = np.asarray(self.class_values)
        inter = {r: 0 for r in regions}
        total = {r: 0 for r in regions}
        self.network.eval()
        for batch in self.val_batches:
            b = self._to_device(batch)
            pred = values[self.network(b["images"], b["available"].bool()).argmax(1).cpu().numpy()]
            ref = values[batch["labels"].numpy()]
            for r, vals in regions.items():
                p, t = np.isin(pred, vals), np.isin(ref, vals)
                inter[r] += int((p & t).sum())
                total[r] += int(p.sum() + t.sum())
        self.network.train()
        if self.val_batches:
            dices = {r: (2.0 * inter[r] / total[r] if total[r] else 1.0) for r in regions}
            mean = float(np.mean(list(dices.values())))
        else:
            dices, mean = {r: float("nan") for r in regions}, float("nan")
        for r, d in dices.items():
            self.logs.setdefault(f"val_dice_{r}", []).append(float(d))
        self.logs.setdefault("val_dice", []).append(mean)
        logger.info("epoch %d validation Dice on %d patch batch(es): %s (mean %.4f)", self.epoch + 1,
                    len(self.val_batches), ", ".join(f"{r} {d:.4f}" for r, d in dices.items()), mean)
        self._val_improved = not math.isfinite(mean) or mean > self.best_dice
        if math.isfinite(mean) and mean > self.best_dice:
            self.best_dice = mean
        return {"psnr": float("nan"), "ssim": float("nan")}

    def on_epoch_end(self, epoch: int) -> None:
        if self.is_main and self._val_improved:
            self.save_checkpoint(self.fold_folder / ckpt.CHECKPOINT_BEST)
            if math.isfinite(self.best_dice):
                logger.info("New best validation Dice %.4f", self.best_dice)

    def progress_panels(self) -> List[Tuple[str, str, Optional[str], Optional[str]]]:
        return [("val_dice", "validation Dice (mean of regions, patches)", None, None)]

    @torch.no_grad()
    def save_previews(self, path: Path) -> None:
        """Inputs, predicted and true label maps of a few fixed validation patches (centre slice)."""
        from nnsynth.training.progress import save_preview
        if not self.val_batches:
            return
        batch = self.val_batches[0]
        self.network.eval()
        pred = self.network(self._to_device(batch)["images"], batch["available"].bool().to(self.device))
        pred = pred.argmax(1).cpu().numpy()
        self.network.train()
        rows = []
        c = pred.shape[1] // 2                    # centre slice of the stack (2.5D) or of the patch (3D)
        scale = max(1, self.num_classes - 1)
        for i in range(min(4, pred.shape[0])):
            panels = {}
            for s in range(len(self.sequences)):
                if bool(batch["available"][i, s]):
                    img = batch["images"][i, s]
                    panels[self.sequences[s]] = (img[c] if self.spatial_dims == 2 else img[0, c]).numpy()
            panels["prediction"] = pred[i, c] / scale
            panels["truth"] = batch["labels"][i, c].numpy() / scale
            rows.append((str(batch["cases"][i]), panels))
        save_preview(rows, path)

    def final_validation(self) -> Optional[Dict[str, Any]]:
        """Full-volume Dice and ASSD (mm) per region of the fold's labelled validation cases (preprocessed space)
        -> ``validation/summary.json``."""
        if not self.is_main:
            dist_utils.barrier()
            return None
        from nnsynth.evaluation.segmentation import region_scores, summarize_scores
        from nnsynth.preprocessing.storage import load_case
        if not getattr(self, "seg_val_cases", None):
            self.seg_val_cases = []
        regions = self.regions()
        values = np.asarray(self.class_values)
        lut = self.label_lut()
        rows = []
        for case in self.seg_val_cases:
            data, seg, props = load_case(self.data_folder, case)
            available = [i for i, a in enumerate(props["available"]) if a]
            probs = self.segment_volume(data, available)
            pred = values[probs.argmax(0)]
            pred[np.asarray(seg[0]) < 0] = 0
            ref = values[lut[np.clip(np.asarray(seg[0]).astype(np.int64), 0, len(lut) - 1)]]
            rows.append({"case": case, "sources": "+".join(self.sequences[s] for s in available),
                         **region_scores(pred, ref, regions, props.get("spacing"))})
        columns = [f"{m}_{r}" for m in ("dice", "assd") for r in regions]
        summary = {"trainer": self.trainer_name, "configuration": self.configuration_name, "fold": self.fold,
                   "space": "preprocessed", "labelled_cases": self.labelled_cases, "regions": regions,
                   "metric": "Dice, ASSD in mm (nnsynth.evaluation.segmentation)", **summarize_scores(rows, columns),
                   "per_case": rows}
        save_json(summary, self.fold_folder / "validation" / "summary.json")
        if rows:
            logger.info("Full-volume validation on %d case(s): %s -> %s", len(rows), ", ".join(
                f"{c} {summary['mean'][c]:.4g}" for c in columns if summary["mean"][c] is not None),
                self.fold_folder / "validation" / "summary.json")
        else:
            logger.info("No labelled validation case in fold %s; %s holds no scores", self.fold,
                        self.fold_folder / "validation" / "summary.json")
        dist_utils.barrier()
        return summary

    @torch.no_grad()
    def segment_volume(self, data: np.ndarray, available: Sequence[int]) -> np.ndarray:
        """Class probabilities (C, Z, Y, X) of a preprocessed case from its available sequences (sliding window)."""
        from nnsynth.inference.sliding_window import PREDICTION_KEY, sliding_window_predict
        self.network.eval()
        fn = segmentation_window_fn(self)
        out = sliding_window_predict({int(s): np.asarray(data[s], np.float32) for s in available}, fn,
                                     self.spatial_dims, [int(p) for p in self.config["patch_size"]],
                                     self.num_adjacent_slices, FINAL_VALIDATION_STEP, self.device,
                                     max(1, int(self.config.get("batch_size", 2))) * 2)
        self.network.train()
        return np.stack([out[PREDICTION_KEY]] + [out[f"class_{c}"] for c in range(1, self.num_classes)])

    # ----- checkpoints --------------------------------------------------------------------------------------------
    def extra_state(self) -> Dict[str, Any]:
        return {"labels": self.labels, "labelled_cases": self.labelled_cases, "best_dice": self.best_dice}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        self.best_dice = float(state.get("best_dice", -math.inf))

    def load_for_inference(self, state: Dict[str, Any]) -> None:
        extra = state.get("extra") or {}
        if extra.get("labels"):
            self.labels = {str(k): int(v) for k, v in extra["labels"].items()}
        self.labelled_cases = list(extra.get("labelled_cases") or [])
        super().load_for_inference(state)


def segmentation_window_fn(adapter: Any):
    """Sliding-window callable of a segmentation adapter: ``{"prediction": p(class 0), "class_c": p(c)}``."""
    from nnsynth.inference.sliding_window import PREDICTION_KEY

    def fn(inp: Dict[int, torch.Tensor]) -> Dict[str, torch.Tensor]:
        probs = adapter.segment_windows(inp).float()
        out = {PREDICTION_KEY: probs[:, 0]}
        out.update({f"class_{c}": probs[:, c] for c in range(1, probs.shape[1])})
        return out
    return fn


class SegFromLatentTrainer(SegmentationTrainerBase):
    """PlainConvUNet on the frozen VQC latent space (mean z_q of the available sequences), upsampled."""

    trainer_name = "seg_from_latent"

    def __init__(self, *args: Any, latent_from: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.latent_from = latent_from
        self.init_args["latent_from"] = latent_from
        self.backbone_info: Dict[str, Any] = {}

    def find_latent_checkpoint(self) -> Path:
        """The synthesis model whose latent space is used: a checkpoint path, a trainer name, or (None)
        vq_seq2seq then seq2seq, in this dataset's results with the same plans, configuration and fold."""
        from nnsynth.training.trainers.tsf_seq2seq import find_trained_checkpoint
        path, names, looked = find_trained_checkpoint(self.output_folder, self.fold, self.latent_from,
                                                      LATENT_SEARCH_ORDER, "--latent-from")
        if path is not None:
            return path
        raise NnsynthError(f"seg_from_latent needs a trained {' or '.join(names)} of the same dataset, plans, "
                           f"configuration and fold (looked in {looked}). Train one first, e.g. nnsynth_train "
                           f"{self.output_folder.parent.name} {names[0]} {self.fold} -c {self.configuration_name}, "
                           f"or pass --latent-from with a checkpoint path")

    def _backbone_config(self, path: Path, state: Mapping[str, Any]) -> Dict[str, Any]:
        """Network and VQ settings the backbone was trained with: its model folder's plans.json, else ours."""
        plans_file = path.parent.parent / "plans.json"
        configuration = str(state.get("configuration") or self.configuration_name)
        config = self.config
        if plans_file.is_file():
            plans = load_json(plans_file)
            config = plans.get("configurations", {}).get(configuration, self.config)
        if int(config.get("spatial_dims", self.spatial_dims)) != self.spatial_dims or \
                int(config.get("num_adjacent_slices", 1) if self.spatial_dims == 2 else 1) != self.num_adjacent_slices:
            raise NnsynthError(f"{path} was trained for another input layout (spatial_dims / num_adjacent_slices) "
                               f"than configuration {self.configuration_name!r}; use the same configuration")
        return {"network": dict(config["network"]), "vq": dict(config.get("vq", {}) or {})}

    def _make_network(self, kind: str, backbone_cfg: Mapping[str, Any]) -> nn.Module:
        from nnsynth.networks.segmentation import (LatentEncoder, LatentSegmentationNet, build_backbone,
                                                   segmentation_settings)
        backbone = build_backbone(kind, len(self.sequences), self.num_adjacent_slices, self.spatial_dims,
                                  backbone_cfg["network"], backbone_cfg.get("vq"))
        return LatentSegmentationNet(LatentEncoder(backbone, kind), self.num_classes, self.spatial_dims,
                                     self.num_adjacent_slices, self.config["patch_size"],
                                     segmentation_settings(self.config))

    def build_network(self) -> nn.Module:
        path = self.find_latent_checkpoint()
        state = ckpt.load_checkpoint(path, "cpu")
        kind = str(state.get("trainer_name", "vq_seq2seq"))
        if kind not in LATENT_SEARCH_ORDER:
            raise NnsynthError(f"{path} holds a {kind!r} model; seg_from_latent uses the latent space of "
                               f"vq_seq2seq or seq2seq")
        if list(state.get("sequences", self.sequences)) != self.sequences:
            raise NnsynthError(f"{path} was trained on sequences {state.get('sequences')}, these plans have "
                               f"{self.sequences}")
        cfg = self._backbone_config(path, state)
        net = self._make_network(kind, cfg)
        try:
            net.encoder.backbone.load_state_dict(state["network_weights"])
        except RuntimeError as e:
            raise NnsynthError(f"{path} does not fit the network of its plans ({e})") from e
        net.encoder.backbone.eval()
        self.backbone_info = {"kind": kind, "checkpoint": str(path), **cfg}
        logger.info("seg_from_latent: frozen %s encoder from %s (latent channels %d%s)", kind, path,
                    net.encoder.latent_channels,
                    f", K={net.encoder.backbone.quantizer.codebook_size}" if kind == "vq_seq2seq" else "")
        return net

    def extra_state(self) -> Dict[str, Any]:
        return {**super().extra_state(), "backbone": self.backbone_info}

    def load_for_inference(self, state: Dict[str, Any]) -> None:
        """Rebuild from the checkpoint alone (the synthesis model's folder is not needed)."""
        extra = state.get("extra") or {}
        if extra.get("labels"):
            self.labels = {str(k): int(v) for k, v in extra["labels"].items()}
        self.labelled_cases = list(extra.get("labelled_cases") or [])
        info = extra.get("backbone") or {}
        if not info.get("kind"):
            raise NnsynthError("This seg_from_latent checkpoint lacks its backbone description; retrain it")
        self.backbone_info = dict(info)
        net = self._make_network(str(info["kind"]), info)
        net.load_state_dict(state["network_weights"])
        self._network = net.to(self.device).eval()

    def full_volume_method(self) -> str:
        kind = self.backbone_info.get("kind", "vq_seq2seq")
        return f"segmentation of the mean latent map of all available sequences ({kind} encoder, frozen)"


class SegFromImagesTrainer(SegmentationTrainerBase):
    """The image-space baseline: the same PlainConvUNet family on the stacked images (missing ones 0)."""

    trainer_name = "seg_from_images"

    def build_network(self) -> nn.Module:
        from nnsynth.networks.segmentation import ImageSegmentationNet, segmentation_settings
        return ImageSegmentationNet(len(self.sequences), self.num_classes, self.spatial_dims,
                                    self.num_adjacent_slices, self.config["patch_size"],
                                    segmentation_settings(self.config))

    def full_volume_method(self) -> str:
        return "segmentation of the stacked images (missing sequences 0)"


__all__ = ["SegFromLatentTrainer", "SegFromImagesTrainer", "SegmentationTrainerBase", "SegmentationSampler",
           "segmentation_window_fn", "SEGMENTATION_TRAINERS", "SEG_LOSS_DEFAULTS", "SEG_OPTIMIZER_DEFAULTS"]
