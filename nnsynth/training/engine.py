"""The shared training engine: every nnsynth trainer is a small subclass of ``TrainingEngine``.

The engine owns what all trainers share: folds and data loading, the optimisation loop (AdamW, warm-up +
poly/cosine schedule, gradient clipping, AMP and torch.compile on CUDA), exact checkpoint/resume,
``--max-minutes``, Ctrl-C, DDP, logging, ``progress.png``, preview PNGs, per-epoch validation on fixed
patches and the final full-volume validation.

A trainer implements ``build_network`` and ``compute_loss`` and, for full-volume synthesis,
``synthesize_slices``; see ``nnsynth/training/trainers/seq2seq.py`` for the reference trainer.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from nnsynth.constants import DATASET_JSON, FINGERPRINT_JSON
from nnsynth.exceptions import NnsynthError, PlansError
from nnsynth.inference.calibration import CalibrationCollector, save_calibration
from nnsynth.preprocessing.storage import list_cases, load_case
from nnsynth.training import checkpointing as ckpt
from nnsynth.training import distributed as dist_utils
from nnsynth.training.dataloading import (INTENSITY_AUGMENTATION_OFF, CaseStore, MultiSequenceSampler,
                                          SynthesisSampler, build_augmentation, fixed_validation_batches,
                                          make_training_iterator)
from nnsynth.training.progress import plot_progress, save_preview
from nnsynth.training.schedules import WARMUP_MAX_FRACTION, WarmupSchedule
from nnsynth.training.splits import fold_cases, parse_fold
from nnsynth.utils.files import save_json
from nnsynth.utils.log import progress_disabled

logger = logging.getLogger(__name__)

# --- constants of this module (defaults used when the plans' "training" entry lacks a key) -------------------
TRAINING_DEFAULTS: Dict[str, Any] = {
    "optimizer": "adamw", "lr": 2e-4, "weight_decay": 1e-4, "betas": [0.9, 0.999], "schedule": "poly",
    "warmup_iters": 100, "num_epochs": 1000, "iters_per_epoch": 250, "val_iters": 10, "grad_clip": 12.0,
    "amp": True, "compile": False, "num_workers": 0, "fit_schedule_to_time_budget": True,
}
VALIDATION_SEED = 4242         # the fixed validation patches are drawn from this seed, the same every epoch
PREVIEW_EVERY_EPOCHS = 5       # validation preview PNGs in the fold folder every this many epochs
PREVIEW_ROWS = 4
FULL_VOLUME_WINDOW_BATCH = 8   # sliding windows per forward pass in the full-volume validation
UNUSED_BUDGET_NOTE_S = 60.0    # a --max-minutes run that ends its planned epochs this much early says so
#: optimizer steps in a row that may be skipped for a non-finite gradient norm before training stops
MAX_SKIPPED_STEPS_IN_A_ROW = 10
FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")   # devices whose Adam/AdamW steps use torch's fused kernel


def fused_optimizer(device: torch.device) -> Optional[bool]:
    """``fused`` for Adam/AdamW on ``device``: torch's fused kernel where it has one, else torch's default.

    The same update; on the CPU torch's default is a Python loop of small ops per tensor, 25 ms of a demo step on
    2 cores against 6 ms fused (documentation/benchmarks.md, twenty-sixth session)."""
    return True if device.type in FUSED_OPTIMIZER_DEVICES else None


def _probability(value: Any, key: str) -> float:
    """A plans value that must be a probability, or a PlansError naming its key."""
    try:
        value = float(value)
    except (TypeError, ValueError) as exc:
        raise PlansError(f"{key} must be a number in [0, 1], got {value!r}") from exc
    if not 0.0 <= value <= 1.0:
        raise PlansError(f"{key} must be within [0, 1], got {value}")
    return value


class TrainingEngine:
    """Base class of all trainers. Subclasses set ``trainer_name`` and implement the three hooks below."""

    trainer_name = "engine"

    def __init__(self, plans: Dict[str, Any], configuration: str, fold: Union[int, str],
                 preprocessed_dataset_folder: Union[str, Path], output_folder: Union[str, Path],
                 device: Union[str, torch.device] = "cpu", *, num_epochs: Optional[int] = None,
                 iters_per_epoch: Optional[int] = None, max_minutes: Optional[float] = None, seed: int = 0,
                 num_workers: Optional[int] = None, rank: int = 0, world_size: int = 1) -> None:
        if configuration not in plans.get("configurations", {}):
            raise PlansError(f"Configuration {configuration!r} is not in the plans "
                             f"(available: {', '.join(plans.get('configurations', {})) or 'none'})")
        self.plans, self.configuration_name = plans, configuration
        self.config: Dict[str, Any] = plans["configurations"][configuration]
        self.training: Dict[str, Any] = {**TRAINING_DEFAULTS, **self.trainer_settings()}
        self.loss_settings: Dict[str, Any] = dict(self.training.pop("loss", {}) or {})
        for key, value in (("num_epochs", num_epochs), ("iters_per_epoch", iters_per_epoch),
                           ("num_workers", num_workers)):
            if value is not None:
                self.training[key] = int(value)
        self.sequences: List[str] = list(plans["sequences"])
        self.spatial_dims = int(self.config["spatial_dims"])
        self.num_adjacent_slices = int(self.config.get("num_adjacent_slices", 1)) if self.spatial_dims == 2 else 1
        self.fold = parse_fold(fold)
        self.preprocessed_dataset_folder = Path(preprocessed_dataset_folder)
        self.output_folder = Path(output_folder)
        self.fold_folder = self.output_folder / f"fold_{self.fold}"
        self.device = torch.device(device)
        self.max_minutes, self.seed = max_minutes, int(seed)
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.num_epochs = int(self.training["num_epochs"])
        self.iters_per_epoch = int(self.training["iters_per_epoch"])
        self.use_amp = self.device.type == "cuda" and bool(self.training["amp"])
        self.init_args = {"configuration": configuration, "fold": self.fold, "device": str(self.device),
                          "num_epochs": num_epochs, "iters_per_epoch": iters_per_epoch, "max_minutes": max_minutes,
                          "seed": self.seed, "num_workers": num_workers, "world_size": world_size}
        self.logs: Dict[str, List[float]] = {k: [] for k in ("train_loss", "val_psnr", "val_ssim", "lr", "epoch_time")}
        self.epoch, self.iteration_in_epoch, self.best_psnr = 0, 0, -math.inf
        self._epoch_loss = [0.0, 0]
        #: optimizer steps skipped for a non-finite gradient norm, in this process and in a row (``_skip_step``)
        self.skipped_steps, self._skipped_in_a_row = 0, 0
        # (iteration, RNG, sampler, loss sums) taken before each step, so a checkpoint written mid-step (Ctrl-C)
        # resumes at that step; None between steps
        self._snapshot: Optional[tuple] = None
        self._log_handler: Optional[logging.Handler] = None
        self.was_initialized = False

    # ===== hooks for trainers ==============================================================================
    def trainer_settings(self) -> Dict[str, Any]:
        """The plans' ``training`` entry with ``per_trainer[trainer_name]`` applied, plus ``loss`` (this trainer's)."""
        training = {k: v for k, v in self.config.get("training", {}).items() if k != "per_trainer"}
        training.update(self.config.get("training", {}).get("per_trainer", {}).get(self.trainer_name, {}))
        loss = self.config.get("loss", {})
        training["loss"] = dict(loss[self.trainer_name]) if isinstance(loss.get(self.trainer_name), dict) else \
            {k: v for k, v in loss.items() if not isinstance(v, dict)}
        return training

    def build_network(self) -> nn.Module:
        """Return the network to train (on CPU; the engine moves it)."""
        raise NotImplementedError

    def compute_loss(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Total loss of one training batch and the named parts to log."""
        raise NotImplementedError

    def predict(self, batch: Dict[str, Any]) -> torch.Tensor:
        """Target prediction of a validation batch in [0, 1] (default: ``network(source, target_idx)``)."""
        return self.network(batch["source"], batch["target_idx"])

    def synthesize_slices(self, sources: Dict[int, torch.Tensor], target: int) -> torch.Tensor:
        """Predict ``target`` from several source stacks ``{sequence index: (B, k, ...) tensor}``."""
        raise NotImplementedError

    def extra_state(self) -> Dict[str, Any]:
        """Trainer-specific state to checkpoint (e.g. a discriminator and its optimizer)."""
        return {}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        pass

    def progress_panels(self) -> List[Tuple[str, str, Optional[str], Optional[str]]]:
        """Extra progress.png panels: (log key, label, twin-axis log key or None, its label or None)."""
        return []

    def on_epoch_end(self, epoch: int) -> None:
        """Called after every completed epoch (checkpoints already written)."""

    def on_schedule_fitted(self) -> None:
        """Called when ``--max-minutes`` shortened ``num_epochs``: rescale epoch-based switches here."""

    # ===== set-up ==========================================================================================
    @property
    def network(self) -> nn.Module:
        """The bare network (not the DDP / compiled wrapper): use it for evaluation and state dicts."""
        return self._network

    def load_for_inference(self, state: Dict[str, Any]) -> None:
        """Build the network and load a checkpoint's weights for inference (no data, no optimizer)."""
        self._network = self.build_network().to(self.device)
        self._network.load_state_dict(state["network_weights"])
        self._network.eval()

    def initialize(self) -> None:
        if self.was_initialized:
            return
        ckpt.seed_everything(self.seed + 1000 * self.rank)
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        data_folder = self.preprocessed_dataset_folder / self.config["data_identifier"]
        cases = list_cases(data_folder)
        if not cases:
            raise NnsynthError(f"No preprocessed cases in {data_folder}. Run nnsynth_plan_and_preprocess first.")
        self.train_cases, self.val_cases = fold_cases(self.preprocessed_dataset_folder, cases, self.fold)
        self.data_folder = data_folder
        self.case_store = CaseStore(data_folder, sorted(set(self.train_cases) | set(self.val_cases)))
        patch = [int(p) for p in self.config["patch_size"]]
        batch_size = int(self.config.get("batch_size", 2))
        self.sampler = self.build_sampler()
        self.val_batches = fixed_validation_batches(self.case_store, self.val_cases, patch, self.spatial_dims,
                                                    self.num_adjacent_slices, batch_size,
                                                    int(self.training["val_iters"]), VALIDATION_SEED)
        self._network = self.build_network().to(self.device)
        self.optimizer = self.build_optimizer(self._network.parameters())
        total = self.num_epochs * self.iters_per_epoch
        warmup = min(int(self.training["warmup_iters"]), int(WARMUP_MAX_FRACTION * total))
        self.scheduler = WarmupSchedule(self.optimizer, float(self.training["lr"]), total, warmup,
                                        str(self.training["schedule"]),
                                        exponent=float(self.training.get("poly_exponent", 0.9)),
                                        min_lr=float(self.training.get("min_lr", 0.0)))
        self.grad_scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        # parameters a trainer adds to the optimizer beside the network's (e.g. Seq2Seq's label head): DDP does
        # not see them, so the engine keeps them in step across ranks itself
        in_network = {id(p) for p in self._network.parameters()}
        self._optimized_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._trainer_params = [p for p in self._optimized_params if id(p) not in in_network]
        self.train_network: nn.Module = self._network
        if self.world_size > 1:
            dist_utils.broadcast_tensors(self._trainer_params)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_network = nn.parallel.DistributedDataParallel(self._network, device_ids=ids)
        if self.device.type == "cuda" and bool(self.training["compile"]):
            self.train_network = torch.compile(self.train_network)
        self.train_iter = make_training_iterator(self.sampler, int(self.training["num_workers"]))
        self.was_initialized = True

    @property
    def oversample_labels(self) -> float:
        """The plans' ``training.oversample_labels`` (absent: 0, as plans made before it existed)."""
        return _probability(self.training.get("oversample_labels", 0.0), "training.oversample_labels")

    @property
    def lesion_paste(self) -> float:
        """The plans' ``augmentation.p_lesion_paste`` (absent: 0, as plans made before it existed)."""
        return _probability((self.config.get("augmentation") or {}).get("p_lesion_paste", 0.0),
                            "augmentation.p_lesion_paste")

    def build_sampler(self) -> SynthesisSampler:
        """The training sampler (hook): (source, target) pairs with the plans' augmentation by default."""
        patch = [int(p) for p in self.config["patch_size"]]
        transform = build_augmentation(patch, self.spatial_dims, self.config.get("augmentation"))
        return SynthesisSampler(self.case_store, self.train_cases, patch, self.spatial_dims, self.num_adjacent_slices,
                                int(self.config.get("batch_size", 2)), seed=self.seed + 7919 * self.rank,
                                transform=transform, oversample_labels=self.oversample_labels)

    def multi_sequence_sampler(self, min_available: int = 1) -> MultiSequenceSampler:
        """Every sequence of a case per sample (for trainers whose sequences are sources and targets at once):
        spatial augmentation only, cases with at least ``min_available`` sequences."""
        patch = [int(p) for p in self.config["patch_size"]]
        aug = {**(self.config.get("augmentation") or {}), **INTENSITY_AUGMENTATION_OFF}
        return MultiSequenceSampler(self.case_store, self.train_cases, patch, self.spatial_dims,
                                    self.num_adjacent_slices, int(self.config.get("batch_size", 2)),
                                    seed=self.seed + 7919 * self.rank,
                                    transform=build_augmentation(patch, self.spatial_dims, aug),
                                    min_available=min_available, oversample_labels=self.oversample_labels,
                                    lesion_paste=self.lesion_paste)

    def build_perceptual_loss(self, weight: float) -> Optional[nn.Module]:
        """The perceptual (LPIPS-style) loss on the training device, or None when its weight is 0 or no local
        backbone weights exist (nnsynth never downloads; one log line says the term is off)."""
        if float(weight) <= 0:
            return None
        from nnsynth.losses.perceptual import PerceptualLoss
        loss = PerceptualLoss()
        if not loss.available:
            logger.info("Perceptual loss off: no pretrained backbone weights on this machine")
            return None
        return loss.to(self.device).eval()

    def build_optimizer(self, params) -> torch.optim.Optimizer:
        """The plans' optimizer over the trainable parameters (frozen ones, e.g. a pretrained encoder, are left out)."""
        params = [p for p in params if p.requires_grad]
        name = str(self.training["optimizer"]).lower()
        if name not in ("adamw", "adam"):
            raise PlansError(f"Unsupported optimizer {name!r} in the plans' training settings (use 'adamw' or 'adam')")
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return cls(params, lr=float(self.training["lr"]), betas=tuple(self.training["betas"]),
                   weight_decay=float(self.training["weight_decay"]), fused=fused_optimizer(self.device))

    # ===== training loop ===================================================================================
    def run_training(self, continue_training: bool = False) -> None:
        """Train (or continue) until ``num_epochs``, the time budget, or Ctrl-C; then validate full volumes."""
        self.initialize()
        self._start_file_logging()
        try:
            if continue_training:
                self.load_for_resume()
            self._write_model_folder_files()
            logger.info("Training %s, configuration %s, fold %s: %d train / %d val cases, %d epochs x %d iterations, "
                        "device %s", self.trainer_name, self.configuration_name, self.fold, len(self.train_cases),
                        len(self.val_cases), self.num_epochs, self.iters_per_epoch, self.device)
            self._run_start = time.time()
            self._snapshot = None
            try:
                while self.epoch < self.num_epochs:
                    if not self._train_epoch():
                        logger.info("Time budget of %.2f min reached; stopping with a final checkpoint",
                                    self.max_minutes)
                        break
                    self._end_epoch()
                    self.on_epoch_end(self.epoch - 1)
                else:
                    self._note_unused_budget()
            except KeyboardInterrupt:
                self._save_interrupted()
                raise
            if self.is_main:
                self.save_checkpoint(self.fold_folder / ckpt.CHECKPOINT_LATEST)
                self.save_checkpoint(self.fold_folder / ckpt.CHECKPOINT_FINAL)
            self.final_validation()
        finally:
            self._stop_file_logging()

    def _note_unused_budget(self) -> None:
        """Say so when the planned epochs, not ``--max-minutes``, ended a run: on a fast machine the ceiling can
        come first, and a user who asked for M minutes should know how to use the rest."""
        if self.max_minutes is None or not self.is_main:
            return
        left = self._budget_seconds_left()
        if left >= UNUSED_BUDGET_NOTE_S:
            logger.info("All %d planned epochs done with %.1f of --max-minutes %s left; --epochs (or the plans' "
                        "training.num_epochs) sets a higher ceiling", self.num_epochs, left / 60.0, self.max_minutes)

    def _budget_seconds_left(self) -> float:
        """Seconds of ``--max-minutes`` left in this run (infinite without a budget)."""
        if self.max_minutes is None:
            return math.inf
        return 60.0 * float(self.max_minutes) - (time.time() - self._run_start)

    def _time_left(self) -> bool:
        return self._budget_seconds_left() > 0

    def _train_epoch(self) -> bool:
        """One epoch (or its remainder after a resume); False when the time budget ran out mid-way."""
        from tqdm import tqdm
        self.train_network.train()
        self._epoch_start = time.time()
        bar = tqdm(range(self.iteration_in_epoch, self.iters_per_epoch), desc=f"epoch {self.epoch}", leave=False,
                   disable=progress_disabled(self.is_main), mininterval=1.0)
        for it in bar:
            if not self._time_left() and self.world_size == 1:
                return False
            self._snapshot = (it, ckpt.capture_rng_state(), self.sampler.state_dict(), list(self._epoch_loss))
            batch = self._to_device(next(self.train_iter))
            loss = self.train_step(batch)
            self._snapshot = None
            self.iteration_in_epoch = it + 1
            self._epoch_loss[0] += loss
            self._epoch_loss[1] += 1
            bar.set_postfix(loss=f"{loss:.4f}")
        return True

    def train_step(self, batch: Dict[str, Any]) -> float:
        """Forward, backward, clip, step; returns the loss value."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=self.use_amp):
            loss, _ = self.compute_loss(batch)
        if not torch.isfinite(loss):
            raise NnsynthError(f"The training loss became {loss.item()} at epoch {self.epoch}; lower the learning "
                               f"rate in the plans or disable amp")
        self.grad_scaler.scale(loss).backward()
        if self.world_size > 1 and self._trainer_params:
            dist_utils.all_reduce_gradients(self._trainer_params)
        self.grad_scaler.unscale_(self.optimizer)
        # one global norm over everything the optimizer steps (the network and any trainer-owned head)
        norm = nn.utils.clip_grad_norm_(self._optimized_params, float(self.training["grad_clip"]))
        if torch.isfinite(norm):
            self._skipped_in_a_row = 0
            self.grad_scaler.step(self.optimizer)
        else:
            self._skip_step(norm)
        self.grad_scaler.update()
        self.scheduler.step()
        return float(loss.detach().item())

    def _skip_step(self, norm: torch.Tensor) -> None:
        """A non-finite gradient norm: leave the weights as they are (one inf gradient would turn them into NaN).

        Instance normalisation divides by each feature map's spread, so a batch whose input is (nearly) constant,
        e.g. a patch of background only, multiplies the gradient by up to 1/sqrt(eps) per layer until it
        overflows. AMP's GradScaler skips such steps on CUDA; without it (CPU, float32) this does the same, and
        a run that keeps producing them stops with what to change instead of training on."""
        self.optimizer.zero_grad(set_to_none=True)
        self._skipped_in_a_row += 1
        self.skipped_steps += 1
        if self.use_amp:        # the scaler's own inf check skips and backs off as usual
            return
        logger.warning("Skipped an optimizer step at epoch %d: gradient norm %s (%d skipped in this run)",
                       self.epoch, float(norm), self.skipped_steps)
        if self._skipped_in_a_row >= MAX_SKIPPED_STEPS_IN_A_ROW:
            raise NnsynthError(
                f"{self._skipped_in_a_row} optimizer steps in a row had a non-finite gradient norm (epoch "
                f"{self.epoch}). Check the preprocessed data for NaN/inf values, lower the learning rate in the plans, "
                f"or use larger patches (plans '<configuration>.patch_size') if patches can hold background only")

    def _end_epoch(self) -> None:
        train_loss = dist_utils.all_reduce_mean(self._epoch_loss[0] / max(1, self._epoch_loss[1]), self.device)
        metrics = self.validate() if self.is_main else {"psnr": float("nan"), "ssim": float("nan")}
        epoch_time = time.time() - self._epoch_start
        for key, value in (("train_loss", train_loss), ("val_psnr", metrics["psnr"]), ("val_ssim", metrics["ssim"]),
                           ("lr", self.scheduler.current_lr()), ("epoch_time", epoch_time)):
            self.logs[key].append(float(value))
        self.epoch += 1
        self.iteration_in_epoch, self._epoch_loss = 0, [0.0, 0]
        # trainers without an image target (segmentation) log their own validation score instead of PSNR/SSIM
        val_text = (f", val PSNR {metrics['psnr']:.2f} dB, val SSIM {metrics['ssim']:.4f}"
                    if math.isfinite(metrics["psnr"]) else "")
        logger.info("epoch %d/%d: train loss %.4f%s, lr %.2e, %.1f s", self.epoch, self.num_epochs, train_loss,
                    val_text, self.logs["lr"][-1], epoch_time)
        self._fit_schedule_to_time_budget()
        if self.is_main:
            plot_progress(self.logs, self.fold_folder / "progress.png", self.progress_panels())
            if (self.epoch - 1) % PREVIEW_EVERY_EPOCHS == 0 or self.epoch == self.num_epochs:
                self.save_previews(self.fold_folder / f"preview_epoch_{self.epoch:04d}.png")
            self.save_checkpoint(self.fold_folder / ckpt.CHECKPOINT_LATEST)
            if metrics["psnr"] > self.best_psnr:
                self.best_psnr = float(metrics["psnr"])
                logger.info("New best validation PSNR %.2f dB", self.best_psnr)
                self.save_checkpoint(self.fold_folder / ckpt.CHECKPOINT_BEST)
        dist_utils.barrier()

    def _fit_schedule_to_time_budget(self) -> None:
        """With ``--max-minutes``, fit ``num_epochs`` to what the budget allows so the LR schedule completes in time."""
        if self.max_minutes is None or not self.training["fit_schedule_to_time_budget"]:
            return
        spent = time.time() - self._run_start
        per_epoch = spent / max(1, len(self.logs["epoch_time"]) - self._epochs_before_run)
        remaining = 60.0 * float(self.max_minutes) - spent
        # ceil: a started epoch that the budget cuts short still trains (it stops at the time check), so one
        # slow first epoch never ends a run that has minutes left
        fit = self.epoch + (int(math.ceil(remaining / max(per_epoch, 1e-6))) if remaining > 0 else 0)
        # never beyond the planned (or --epochs) count; may grow back when a slow first epoch (a busy machine)
        # made the earlier estimate too short
        fit = dist_utils.broadcast_object(min(fit, int(self.training["num_epochs"])))
        if fit != self.num_epochs and max(self.epoch, fit) != self.num_epochs:
            self.num_epochs = max(self.epoch, fit)
            self.scheduler.set_total(max(self.num_epochs * self.iters_per_epoch, self.scheduler.iteration + 1))
            logger.info("About %d epoch(s) fit in --max-minutes %s; the schedule now ends there",
                        self.num_epochs, self.max_minutes)
            self.on_schedule_fitted()

    def _to_device(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ===== validation ======================================================================================
    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        """Mean PSNR/SSIM (CONTRACT.md section 5) of the fixed validation patches (centre slice in 2.5D)."""
        from nnsynth.evaluation.metrics import compute_metrics
        self.network.eval()
        psnrs, ssims = [], []
        for batch in self.val_batches:
            b = self._to_device(batch)
            pred = self.predict(b).float().clamp(0, 1).cpu().numpy()
            for i in range(pred.shape[0]):
                ref, prd, mask = (self._metric_view(a[i]) for a in (batch["target"].numpy(), pred,
                                                                       batch["mask"].numpy()))
                if mask.sum() < 16:
                    continue
                m = compute_metrics(ref, prd, mask > 0.5, compute_lpips=False)
                psnrs.append(m["psnr"])
                ssims.append(m["ssim"])
        self.network.train()
        if not psnrs:
            return {"psnr": float("nan"), "ssim": float("nan")}
        return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims))}

    def _metric_view(self, sample: np.ndarray) -> np.ndarray:
        """(k, y, x) -> centre slice as (1, y, x); (1, z, y, x) -> (z, y, x)."""
        if self.spatial_dims == 2:
            c = sample.shape[0] // 2
            return sample[c:c + 1]
        return sample[0]

    @torch.no_grad()
    def save_previews(self, path: Path) -> None:
        """Sources, prediction, target and |error| of a few fixed validation samples."""
        if not self.val_batches:
            return
        self.network.eval()
        batch = self.val_batches[0]
        pred = self.predict(self._to_device(batch)).float().clamp(0, 1).cpu().numpy()
        rows = []
        for i in range(min(PREVIEW_ROWS, pred.shape[0])):
            src, tgt, prd = (self._preview_plane(a[i]) for a in (batch["source"].numpy(), batch["target"].numpy(), pred))
            s, t = int(batch["source_idx"][i]), int(batch["target_idx"][i])
            rows.append((f"{batch['cases'][i]}", {f"source {self.sequences[s]}": src, "prediction": prd,
                                                  f"target {self.sequences[t]}": tgt, "|error|": np.abs(prd - tgt)}))
        save_preview(rows, path)
        self.network.train()

    def _preview_plane(self, sample: np.ndarray) -> np.ndarray:
        view = self._metric_view(sample)
        return view[view.shape[0] // 2]

    # ===== full-volume synthesis and the final validation ==================================================
    @torch.no_grad()
    def synthesize_volume(self, data: np.ndarray, sources: Sequence[int], target: int) -> np.ndarray:
        """Synthesise ``target`` (Z, Y, X) of a preprocessed case ``data`` (C, Z, Y, X) from ``sources``, the way
        ``nnsynth_predict`` does (its sliding window, step size and Gaussian blending; 2.5D: every slice from the
        k stacks that hold it), so the validation scores, and the calibration learned from them, are those of
        what prediction outputs."""
        from nnsynth.inference.sliding_window import DEFAULT_STEP_SIZE, PREDICTION_KEY, sliding_window_predict
        self.network.eval()
        volumes = {int(s): np.ascontiguousarray(data[s], dtype=np.float32) for s in sources}

        def predict(inp: Dict[int, torch.Tensor]) -> Dict[str, torch.Tensor]:
            with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
                return {PREDICTION_KEY: self.synthesize_slices(inp, target).float()}
        out = sliding_window_predict(volumes, predict, self.spatial_dims, [int(p) for p in self.config["patch_size"]],
                                     getattr(self, "num_adjacent_slices", 1), DEFAULT_STEP_SIZE, self.device,
                                     FULL_VOLUME_WINDOW_BATCH)[PREDICTION_KEY]
        return np.clip(out, 0.0, 1.0)

    def final_validation(self) -> Optional[Dict[str, Any]]:
        """Every available target of every validation case from all its other available sequences, full volume.

        Synthesis as ``nnsynth_predict`` runs it (``synthesize_volume``) in the preprocessed space; writes
        ``validation/summary.json`` and the quantile calibration ``calibration.json``."""
        if not self.is_main:
            dist_utils.barrier()
            return None
        calibration = CalibrationCollector()
        summary = self._own_full_volume_validation(calibration)
        save_json(summary, self.fold_folder / "validation" / "summary.json")
        self._save_calibration(calibration)
        logger.info("Full-volume validation: mean PSNR %.2f dB, SSIM %.4f, MAE %.4f over %d predictions -> %s",
                    summary["mean"].get("psnr", float("nan")), summary["mean"].get("ssim", float("nan")),
                    summary["mean"].get("mae", float("nan")), len(summary["per_case"]),
                    self.fold_folder / "validation" / "summary.json")
        dist_utils.barrier()
        return summary

    def _save_calibration(self, calibration: CalibrationCollector) -> None:
        """``calibration.json`` from the full-volume validation (nnsynth.inference.calibration): what the
        predictor corrects in the histogram shape of every synthesis."""
        source = ("the training cases (fold all validates on them)" if self.fold == "all"
                  else f"the {len(self.val_cases)} validation cases of fold {self.fold}")
        content = calibration.result(source)
        path = save_calibration(content, self.fold_folder)
        if content["per_target"]:
            logger.info("Quantile calibration of %s from %s -> %s", ", ".join(content["per_target"]), source, path)

    def _own_full_volume_validation(self, calibration: Optional[CalibrationCollector] = None) -> Dict[str, Any]:
        from nnsynth.evaluation.metrics import compute_metrics
        per_case = []
        for case in self.val_cases:
            data, seg, props = load_case(self.data_folder, case)
            mask = seg[0] >= 0
            available = [i for i, a in enumerate(props["available"]) if a]
            for t in available:
                sources = [s for s in available if s != t]
                if not sources:
                    continue
                pred = self.synthesize_volume(data, sources, t)
                m = compute_metrics(data[t], pred, mask, compute_lpips=False)
                if calibration is not None:
                    calibration.add(self.sequences[t], pred, data[t], mask)
                per_case.append({"case": case, "target": self.sequences[t],
                                 "sources": [self.sequences[s] for s in sources],
                                 **{k: float(m[k]) for k in ("psnr", "ssim", "mae") if k in m}})
        keys = ("psnr", "ssim", "mae")
        mean = {k: float(np.mean([r[k] for r in per_case])) for k in keys if per_case and k in per_case[0]}
        per_target = {}
        for t in self.sequences:
            rows = [r for r in per_case if r["target"] == t]
            if rows:
                per_target[t] = {k: float(np.mean([r[k] for r in rows])) for k in keys if k in rows[0]}
        return {"trainer": self.trainer_name, "configuration": self.configuration_name, "fold": self.fold,
                "space": "preprocessed", "method": self.full_volume_method(), "metric": "CONTRACT.md section 5",
                "mean": mean, "per_target": per_target, "per_case": per_case}

    def full_volume_method(self) -> str:
        return f"sliding window as nnsynth_predict ({'2.5D stacks' if self.spatial_dims == 2 else '3D patches'})"

    # ===== checkpoints =====================================================================================
    def checkpoint_state(self) -> Dict[str, Any]:
        snapshot = self._snapshot
        state = {
            "network_weights": self.network.state_dict(), "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(), "grad_scaler_state": self.grad_scaler.state_dict(),
            "rng_state": snapshot[1] if snapshot else ckpt.capture_rng_state(),
            "sampler_state": snapshot[2] if snapshot else self.sampler.state_dict(),
            "epoch": self.epoch, "iteration_in_epoch": snapshot[0] if snapshot else self.iteration_in_epoch,
            "epoch_loss": snapshot[3] if snapshot else list(self._epoch_loss),
            "num_epochs": self.num_epochs, "iters_per_epoch": self.iters_per_epoch, "best_psnr": self.best_psnr,
            "logs": self.logs, "trainer_name": self.trainer_name, "trainer_class": type(self).__module__ + ":" +
            type(self).__qualname__, "init_args": self.init_args,
            "plans_identifier": self.plans.get("plans_name"), "configuration": self.configuration_name,
            "sequences": self.sequences, "extra": self.extra_state(),
        }
        return state

    def save_checkpoint(self, path: Path) -> None:
        """Write a checkpoint (rank 0 only); the replaced ``checkpoint_latest.pth`` becomes the previous one."""
        if self.is_main:
            state = self.checkpoint_state()
            position = (state["epoch"], state["iteration_in_epoch"])
            # re-saving the same position (end of run) must not turn the previous state into a duplicate
            rotate = path.name == ckpt.CHECKPOINT_LATEST and position != getattr(self, "_latest_position", None)
            ckpt.save_checkpoint(state, path, keep_previous=rotate)
            if path.name == ckpt.CHECKPOINT_LATEST:
                self._latest_position = position

    def load_checkpoint_state(self, state: Dict[str, Any]) -> None:
        if state["trainer_name"] != self.trainer_name:
            raise NnsynthError(f"The checkpoint was written by trainer {state['trainer_name']!r}, not "
                               f"{self.trainer_name!r}; use another output folder")
        self.network.load_state_dict(state["network_weights"])
        # the optimizer kernel is this machine's choice, not the checkpoint's (a run may continue on another
        # device); torch's loader then puts Adam's step counts where that kernel keeps them. Every group is built
        # with the optimizer's defaults, and a checkpoint with other groups still fails in torch's own check.
        saved = state["optimizer_state"]
        kernel = {k: self.optimizer.defaults.get(k) for k in ("fused", "foreach")}
        self.optimizer.load_state_dict({**saved, "param_groups": [{**g, **kernel} for g in saved["param_groups"]]})
        self.scheduler.load_state_dict(state["scheduler_state"])
        self.grad_scaler.load_state_dict(state["grad_scaler_state"])
        self.load_extra_state(state.get("extra", {}))
        self.epoch, self.iteration_in_epoch = int(state["epoch"]), int(state["iteration_in_epoch"])
        self._epoch_loss = list(state["epoch_loss"])
        self.num_epochs = int(state["num_epochs"]) if self.init_args["num_epochs"] is None else self.num_epochs
        self.best_psnr, self.logs = float(state["best_psnr"]), {k: list(v) for k, v in state["logs"].items()}
        self.sampler.load_state_dict(state["sampler_state"])
        ckpt.restore_rng_state(state["rng_state"])

    def load_for_resume(self) -> bool:
        path, state = ckpt.find_resume_checkpoint(self.fold_folder, self.device)
        if state is None:
            logger.info("--c: no checkpoint in %s; starting a new training", self.fold_folder)
            return False
        self.load_checkpoint_state(state)  # with DDP every rank loads rank 0's file (same weights, rank 0's RNG)
        logger.info("Resuming from %s (epoch %d, iteration %d)", path.name, self.epoch, self.iteration_in_epoch)
        return True

    def _save_interrupted(self) -> None:
        if self.is_main:
            self.save_checkpoint(self.fold_folder / ckpt.CHECKPOINT_LATEST)
            logger.warning("Interrupted at epoch %d; saved %s. Continue with --c.", self.epoch,
                           self.fold_folder / ckpt.CHECKPOINT_LATEST)

    # ===== files and logging ===============================================================================
    def _write_model_folder_files(self) -> None:
        self._epochs_before_run = len(self.logs["epoch_time"])
        if not self.is_main:
            return
        self.fold_folder.mkdir(parents=True, exist_ok=True)
        save_json(self.plans, self.output_folder / "plans.json")
        for name in (DATASET_JSON, FINGERPRINT_JSON):
            src = self.preprocessed_dataset_folder / name
            if src.is_file():
                from nnsynth.utils.files import atomic_path
                with atomic_path(self.output_folder / name, suffix=".json") as tmp:
                    shutil.copyfile(src, tmp)

    def _start_file_logging(self) -> None:
        if not self.is_main:
            return
        self.fold_folder.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.fold_folder / "training_log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logging.getLogger("nnsynth").addHandler(handler)
        if logging.getLogger("nnsynth").level == logging.NOTSET:
            logging.getLogger("nnsynth").setLevel(logging.INFO)
        self._log_handler = handler

    def _stop_file_logging(self) -> None:
        if self._log_handler is not None:
            logging.getLogger("nnsynth").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
