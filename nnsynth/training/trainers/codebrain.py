"""CodeBrain (Wu et al., ``papers/codebrain_scalar_quantized_codes.md``): unified imputation through
scalar-quantised codes, trained in two stages with the shared engine.

Every sample is the whole channel stack of all N sequences (missing ones zero-filled). A random mask hides
k of the case's available sequences (``0 < k < available``, every one of the ``2^a - 2`` patterns equally
likely; a case with one sequence is kept whole), so cases that already miss sequences train too. Losses
only touch sequences the case really has.

- Stage I (``fold_X/stage1/``): posterior codes of every sequence (FSQ) + common features of the visible
  ones -> all sequences. Loss: PSNR loss, ``psnr_weight_available`` x visible + ``psnr_weight_missing`` x
  masked sequences, plus ``lambda_adv`` x LSGAN PatchGAN on the masked sequences after
  ``adv_start_fraction`` of the iterations.
- Stage II (``fold_X/``): stage I loaded from ``stage1/checkpoint_final.pth`` and frozen; the prior encoder
  learns the stage-I codes of all sequences from the masked stack with the grading loss (eq. 5-6).
  Validation logs the code-prediction accuracy per sequence and the code usage (``code_stats.json``).

Inference (stage II): predicted codes of the missing sequences (posterior codes of the given ones) + common
features -> every missing sequence in one decoder pass. ``fold_X/checkpoint_final.pth`` holds the complete
model. ``nnsynth_train DATASET codebrain FOLD`` runs stage I then stage II; ``stage=1|2`` runs one.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from nnsynth.exceptions import NnsynthError
from nnsynth.losses.codebrain import (SequencePatchDiscriminator, grading_loss, lsgan_discriminator_loss,
                                      lsgan_generator_loss, weighted_psnr_loss)
from nnsynth.training import checkpointing as ckpt
from nnsynth.training.dataloading import SynthesisSampler, build_augmentation, without_source_brightness
from nnsynth.training.engine import TrainingEngine
from nnsynth.utils.files import save_json

logger = logging.getLogger(__name__)

# --- constants of this module: fallbacks when the plans lack a key (authors' code / paper) -----------------
CODEBRAIN_LOSS_DEFAULTS: Dict[str, Any] = {
    "psnr_weight_available": 5.0,   # PSNR loss weight of the visible sequences
    "psnr_weight_missing": 20.0,    # ... and of the masked sequences the case has
    "lambda_adv": 0.1,              # LSGAN generator weight (0 switches the discriminator off)
    "adv_start_fraction": 0.2,      # adversarial term from this fraction of the stage-I iterations on
    "lambda_grading": 1.0,          # stage II grading loss weight
    "discriminator_lr": 2e-4,
}
CODEBRAIN_TRAINING_DEFAULTS: Dict[str, Any] = {  # used only when the plans have no per_trainer.codebrain entry
    "optimizer": "adamw", "lr": 5e-4, "weight_decay": 0.0, "betas": [0.9, 0.9], "schedule": "cosine",
    "min_lr": 5e-5,
}
STAGE1_TIME_FRACTION = 0.6   # share of --max-minutes given to stage I when both stages run in one call
STAGE1_FOLDER = "stage1"
CODE_STATS_FILE = "code_stats.json"
DISCRIMINATOR_BETAS = (0.5, 0.999)
PREVIEW_ROWS = 3             # validation samples in the preview PNGs (one hidden sequence each)
FULL_VOLUME_SLICE_BATCH = 8  # slices per forward pass of the one-pass full-volume imputation


# ===== data: whole channel stacks with a random visibility mask ============================================
def draw_keep(rng: np.random.Generator, available: Sequence[int], num_sequences: int) -> np.ndarray:
    """Visibility mask ``(N,)``: a uniformly drawn non-empty proper subset of ``available`` (all of it if only one)."""
    keep = np.zeros(num_sequences, bool)
    a = len(available)
    if a == 1:
        keep[available[0]] = True
        return keep
    while True:
        bits = rng.random(a) < 0.5
        if 0 < bits.sum() < a:
            keep[np.asarray(available)[bits]] = True
            return keep


class StackSampler(SynthesisSampler):
    """Batches of full sequence stacks: ``image`` ``(B, N*k, Y, X)`` (2D) / ``(B, N, Z, Y, X)`` (3D), ``mask``,
    ``available`` and ``keep`` ``(B, N)``. Random state (cases, centres, masks) is checkpointed by the engine."""

    def __init__(self, *args: Any, num_sequences: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_sequences = int(num_sequences)

    def draw(self) -> Tuple[str, np.ndarray, np.ndarray, Tuple[int, int, int]]:  # type: ignore[override]
        case = self.cases[int(self.rng.integers(len(self.cases)))]
        info = self.store.cases[case]
        available = np.zeros(self.num_sequences, bool)
        available[info.available] = True
        keep = draw_keep(self.rng, info.available, self.num_sequences)
        return case, available, keep, self._center(info)

    def sample_stack(self, case: str, center: Sequence[int]) -> Dict[str, np.ndarray]:
        arrays, mask = self.read_channels(case, range(self.num_sequences), center)
        if self.spatial_dims == 2:
            return {"image": np.concatenate(arrays), "mask": mask.astype(np.float32)}
        return {"image": np.stack(arrays), "mask": mask[None].astype(np.float32)}

    def _finish_stack(self, s: Dict[str, np.ndarray], available: np.ndarray) -> Dict[str, torch.Tensor]:
        img, mask = (torch.from_numpy(np.ascontiguousarray(s[k])) for k in ("image", "mask"))
        if self.transform is not None:
            out = self.transform(image=img, segmentation=mask.to(torch.int16))
            img, mask = out["image"], out["segmentation"].float()
            per_seq = img.shape[0] // self.num_sequences
            zero = torch.from_numpy(np.repeat(~available, per_seq))
            img[zero] = 0  # augmentation must not invent content in sequences the case lacks
        return {"image": img.float(), "mask": mask.float()}

    def next_batch(self) -> Dict[str, Any]:
        draws = [self.draw() for _ in range(self.batch_size)]
        samples = [self._finish_stack(self.sample_stack(c, ctr), av) for c, av, _, ctr in draws]
        batch: Dict[str, Any] = {k: torch.stack([smp[k] for smp in samples]) for k in ("image", "mask")}
        batch["available"] = torch.from_numpy(np.stack([d[1] for d in draws]))
        batch["keep"] = torch.from_numpy(np.stack([d[2] for d in draws]))
        batch["cases"] = [d[0] for d in draws]
        return batch


def fixed_stack_batches(sampler: StackSampler, num_batches: int) -> List[Dict[str, Any]]:
    return [sampler.next_batch() for _ in range(num_batches)]


# ===== the trainer =========================================================================================
class CodeBrainTrainer(TrainingEngine):
    trainer_name = "codebrain"

    def __init__(self, *args: Any, stage: Optional[int] = None, **kwargs: Any) -> None:
        if stage not in (None, 1, 2):
            raise NnsynthError(f"--stage must be 1 or 2, got {stage}")
        super().__init__(*args, **kwargs)
        self._ctor_args, self._ctor_kwargs = args, dict(kwargs)
        self.run_both = stage is None
        self.stage = 2 if stage is None else int(stage)
        self.stage_folder = self.fold_folder  # stage II (the complete model) lives in fold_X/
        self.stage1_folder = self.fold_folder / STAGE1_FOLDER
        if self.stage == 1:
            self.fold_folder = self.stage1_folder
        self.init_args["stage"] = self.stage
        self.loss_cfg = {**CODEBRAIN_LOSS_DEFAULTS, **self.loss_settings}
        self.code_stats: List[Dict[str, Any]] = []
        self.discriminator: Optional[nn.Module] = None
        self._fake: Optional[Tuple[Tensor, Tensor, Tensor]] = None

    def trainer_settings(self) -> Dict[str, Any]:
        settings = super().trainer_settings()
        if self.trainer_name not in self.config.get("training", {}).get("per_trainer", {}):
            settings.update(CODEBRAIN_TRAINING_DEFAULTS)
        return settings

    # ----- set-up ----------------------------------------------------------------------------------------
    def build_network(self) -> nn.Module:
        from nnsynth.networks.codebrain import CodeBrainNet
        net = CodeBrainNet(len(self.sequences), self.num_adjacent_slices, self.spatial_dims, self.config.get("fsq"))
        if self.stage == 1:
            for p in net.prior.parameters():
                p.requires_grad_(False)
            return net
        path, state = ckpt.find_resume_checkpoint(self.stage1_folder)
        if state is None:
            raise NnsynthError(f"CodeBrain stage II needs the stage-I model in {self.stage1_folder}; run stage I "
                               f"first (nnsynth_train ... codebrain FOLD, or --stage 1)")
        if path.name != ckpt.CHECKPOINT_FINAL:
            logger.warning("Stage I has no %s yet; stage II uses %s", ckpt.CHECKPOINT_FINAL, path.name)
        if state.get("extra", {}).get("stage", 1) != 1:
            raise NnsynthError(f"{path} is not a CodeBrain stage-I checkpoint")
        net.load_state_dict(state["network_weights"])
        for module in net.stage_one_modules():
            for p in module.parameters():
                p.requires_grad_(False)
        logger.info("Stage II: stage I loaded from %s and frozen", path)
        return net

    def build_sampler(self) -> "StackSampler":
        """All sequences of a case as one zero-filled stack; no noise augmentation (the image is also the target,
        so noise would have to be reproduced)."""
        patch = [int(p) for p in self.config["patch_size"]]
        aug = {**without_source_brightness(self.config.get("augmentation")), "p_noise": 0.0}
        return StackSampler(self.case_store, self.train_cases, patch, self.spatial_dims, self.num_adjacent_slices,
                            int(self.config.get("batch_size", 2)), seed=self.seed + 7919 * self.rank,
                            transform=build_augmentation(patch, self.spatial_dims, aug),
                            num_sequences=len(self.sequences))

    def initialize(self) -> None:
        if self.was_initialized:
            return
        super().initialize()
        patch = [int(p) for p in self.config["patch_size"]]
        batch_size = int(self.config.get("batch_size", 2))
        n = len(self.sequences)
        from nnsynth.training.engine import VALIDATION_SEED
        val_sampler = StackSampler(self.case_store, self.val_cases, patch, self.spatial_dims,
                                   self.num_adjacent_slices, batch_size, VALIDATION_SEED, transform=None,
                                   oversample_foreground=1.0, num_sequences=n)
        self.val_batches = fixed_stack_batches(val_sampler, int(self.training["val_iters"]))
        if self.stage == 1 and float(self.loss_cfg["lambda_adv"]) > 0:
            self.discriminator = SequencePatchDiscriminator(self.num_adjacent_slices, n,
                                                            self.spatial_dims).to(self.device)
            self.d_optimizer = torch.optim.AdamW(self.discriminator.parameters(),
                                                 lr=float(self.loss_cfg["discriminator_lr"]),
                                                 betas=DISCRIMINATOR_BETAS)
        if self.stage == 2:
            for module in self.network.stage_one_modules():
                module.eval()

    # ----- running one or both stages ---------------------------------------------------------------------
    def _stage_one_done(self) -> bool:
        """Stage II has a checkpoint, or stage I's final checkpoint completed its epochs."""
        if any((self.stage_folder / n).is_file() for n in ckpt.RESUME_ORDER):
            return True
        path = self.stage1_folder / ckpt.CHECKPOINT_FINAL
        if not path.is_file():
            return False
        try:
            state = ckpt.load_checkpoint(path)
        except ValueError:
            return False
        return int(state["epoch"]) >= int(state["num_epochs"])

    def run_training(self, continue_training: bool = False) -> None:
        if not self.run_both:
            logger.info("CodeBrain stage %d -> %s", self.stage, self.fold_folder)
            super().run_training(continue_training)
            return
        start = time.time()
        if continue_training and self._stage_one_done():
            logger.info("--c: CodeBrain stage I is complete; continuing with stage II")
        else:
            stage1 = type(self)(*self._ctor_args, **{**self._ctor_kwargs, "stage": 1})
            if self.max_minutes is not None:
                stage1.max_minutes = STAGE1_TIME_FRACTION * float(self.max_minutes)
            logger.info("CodeBrain stage I -> %s", stage1.fold_folder)
            stage1.run_training(continue_training)
            del stage1
        if self.max_minutes is not None:
            self.max_minutes = max(0.05, float(self.max_minutes) - (time.time() - start) / 60.0)
        logger.info("CodeBrain stage II -> %s", self.fold_folder)
        super().run_training(continue_training)

    # ----- losses ------------------------------------------------------------------------------------------
    def _adversarial_on(self) -> bool:
        if self.discriminator is None:
            return False
        done = self.epoch * self.iters_per_epoch + self.iteration_in_epoch
        return done >= float(self.loss_cfg["adv_start_fraction"]) * self.num_epochs * self.iters_per_epoch

    def compute_loss(self, batch: Dict[str, Any]) -> Tuple[Tensor, Dict[str, float]]:
        net = self.network
        x, keep, avail = batch["image"], batch["keep"], batch["available"]
        if self.stage == 2:
            xp, _ = net.pad(x)
            with torch.no_grad():
                target = net.fsq.codes_to_levels(net.encode_codes(xp).flatten(0, 1)).view(
                    x.shape[0], net.n, net.d, *[s // net.factor for s in xp.shape[2:]])
            logits = self.train_network(xp, keep, mode="prior")
            g = grading_loss(logits, target, weight=avail, valid=net.bit_valid)
            return float(self.loss_cfg["lambda_grading"]) * g, {"grading": float(g.detach())}
        recon, _ = self.train_network(x, keep)
        pred, ref = net.split(recon), net.split(x)
        loss, parts = weighted_psnr_loss(pred, ref, keep, avail, float(self.loss_cfg["psnr_weight_available"]),
                                         float(self.loss_cfg["psnr_weight_missing"]))
        missing = avail.bool() & ~keep.bool()
        if self._adversarial_on() and bool(missing.any()):
            seq = missing.nonzero()[:, 1]
            fake = pred[missing]
            for p in self.discriminator.parameters():
                p.requires_grad_(False)
            adv = lsgan_generator_loss(self.discriminator(fake, seq))
            loss = loss + float(self.loss_cfg["lambda_adv"]) * adv
            parts["adversarial"] = float(adv.detach())
            self._fake = (fake.detach(), ref[missing], seq)
        return loss, parts

    def train_step(self, batch: Dict[str, Any]) -> float:
        self._fake = None
        value = super().train_step(batch)
        if self._fake is not None:
            fake, real, seq = self._fake
            for p in self.discriminator.parameters():
                p.requires_grad_(True)
            self.d_optimizer.zero_grad(set_to_none=True)
            d_loss = lsgan_discriminator_loss(self.discriminator(real, seq), self.discriminator(fake, seq))
            d_loss.backward()
            self.d_optimizer.step()
            self._fake = None
        return value

    # ----- state -------------------------------------------------------------------------------------------
    def extra_state(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"stage": self.stage, "code_stats": self.code_stats}
        if self.discriminator is not None:
            state["discriminator"] = self.discriminator.state_dict()
            state["d_optimizer"] = self.d_optimizer.state_dict()
        return state

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        if int(state.get("stage", self.stage)) != self.stage:
            raise NnsynthError(f"The checkpoint is from CodeBrain stage {state.get('stage')}, not stage {self.stage}")
        self.code_stats = list(state.get("code_stats", []))
        if self.discriminator is not None and "discriminator" in state:
            self.discriminator.load_state_dict(state["discriminator"])
            self.d_optimizer.load_state_dict(state["d_optimizer"])

    # ----- prediction ----------------------------------------------------------------------------------------
    def forward_stack(self, x: Tensor, keep: Tensor) -> Tensor:
        """All N sequences ``(B, N*k, *s)`` from the stack ``x`` and visibility ``keep``: stage II imputes from
        the visible channels only; stage I reconstructs with the posterior codes of ``x`` (the upper bound:
        it reads the hidden sequences too)."""
        if self.stage == 1:
            return self.network(x, keep)[0]
        return self.network.impute(x, keep)

    @torch.no_grad()
    def impute_volume(self, data: np.ndarray, given: Sequence[int]) -> np.ndarray:
        """All sequences ``(C, Z, Y, X)`` of a preprocessed case from the sequences ``given`` (one pass per
        slice batch / tile). Stage I also reads the others for their codes (reconstruction upper bound)."""
        self.network.eval()
        n, z_len = data.shape[0], data.shape[1]
        keep = torch.zeros(1, n, dtype=torch.bool, device=self.device)
        keep[0, list(given)] = True
        visible = data if self.stage == 1 else data * keep[0].cpu().numpy()[:, None, None, None]
        out = np.zeros(data.shape, np.float32)
        if self.spatial_dims == 2:
            k, h = self.num_adjacent_slices, self.num_adjacent_slices // 2
            for z0 in range(0, z_len, FULL_VOLUME_SLICE_BATCH):
                zs = np.arange(z0, min(z0 + FULL_VOLUME_SLICE_BATCH, z_len))
                idx = np.clip(zs[:, None] + np.arange(-h, k - h)[None], 0, z_len - 1)        # (B, k)
                stack = np.ascontiguousarray(visible[:, idx].transpose(1, 0, 2, 3, 4))       # (B, C, k, Y, X)
                x = torch.from_numpy(stack).float().to(self.device).flatten(1, 2)
                pred = self.forward_stack(x, keep.expand(len(zs), -1)).float().clamp(0, 1)
                out[:, zs] = pred.view(len(zs), n, k, *pred.shape[2:])[:, :, h].transpose(0, 1).cpu().numpy()
        else:
            patch = [int(p) for p in self.config["patch_size"]]
            for lo in np.ndindex(*[int(math.ceil(s / p)) for s, p in zip(data.shape[1:], patch)]):
                box = tuple(slice(i * p, min((i + 1) * p, s)) for i, p, s in zip(lo, patch, data.shape[1:]))
                x = torch.from_numpy(np.ascontiguousarray(visible[(slice(None),) + box][None])).float().to(self.device)
                out[(slice(None),) + box] = self.forward_stack(x, keep).float().clamp(0, 1)[0].cpu().numpy()
        return out

    def synthesize_volume(self, data: np.ndarray, sources: Sequence[int], target: int) -> np.ndarray:
        return self.impute_volume(data, sources)[target]

    def synthesize_all(self, sources: Dict[int, Tensor]) -> Dict[int, Tensor]:
        """Every sequence not in ``sources`` from one pass: ``{sequence: (B, k, ...)}`` -> ``{missing: (B, k, ...)}``
        (predicted codes of the missing sequences, posterior codes of the given ones, common features)."""
        out = self._impute_stack(sources)
        return {t: out[:, t] for t in range(len(self.sequences)) if t not in sources}

    def _impute_stack(self, sources: Dict[int, Tensor]) -> Tensor:
        """Zero-filled channel stack of ``sources`` with its keep mask through the network: ``(B, N, k, ...)``."""
        any_src = next(iter(sources.values()))
        n = len(self.sequences)
        x = torch.zeros(any_src.shape[0], n, *any_src.shape[1:], device=any_src.device, dtype=any_src.dtype)
        keep = torch.zeros(any_src.shape[0], n, dtype=torch.bool, device=any_src.device)
        for s, v in sources.items():
            x[:, int(s)] = v
            keep[:, int(s)] = True
        return self.network.impute(x.flatten(1, 2), keep).view(x.shape)

    def synthesize_slices(self, sources: Dict[int, Tensor], target: int) -> Tensor:
        """Engine / predictor interface: ``{sequence: (B, k, ...)}`` -> target ``(B, k, ...)``."""
        if int(target) in sources:  # self-reconstruction: decode with the target's own posterior code
            return self._impute_stack(sources)[:, int(target)]
        return self.synthesize_all(sources)[int(target)]

    def load_for_inference(self, state: Dict[str, Any]) -> None:
        """Predictor hook: the complete stage-II model from its own checkpoint (no stage-I folder needed)."""
        from nnsynth.networks.codebrain import CodeBrainNet
        if int(state.get("extra", {}).get("stage", 2)) != 2:
            raise NnsynthError("This CodeBrain checkpoint is from stage I (reconstruction only, no code prediction); "
                               "train stage II (nnsynth_train ... codebrain FOLD --stage 2) before predicting")
        net = CodeBrainNet(len(self.sequences), self.num_adjacent_slices, self.spatial_dims, self.config.get("fsq"))
        net.load_state_dict(state["network_weights"])
        self._network = net.to(self.device).eval()

    def full_volume_method(self) -> str:
        what = "stage I reconstruction (posterior codes of the target: upper bound)" if self.stage == 1 else \
            "stage II imputation (predicted codes + common features)"
        return f"{super().full_volume_method()}, {what}"

    def final_validation(self) -> Optional[Dict[str, Any]]:
        if self.stage == 2:
            return super().final_validation()
        if not self.is_main:
            return None
        summary = self._own_full_volume_validation()
        save_json(summary, self.fold_folder / "validation" / "summary.json")
        logger.info("Stage I full-volume reconstruction (upper bound): mean PSNR %.2f dB, SSIM %.4f over %d "
                    "predictions", summary["mean"].get("psnr", float("nan")), summary["mean"].get("ssim", float("nan")),
                    len(summary["per_case"]))
        return summary

    # ----- per-epoch validation ----------------------------------------------------------------------------
    def _view(self, a: np.ndarray) -> np.ndarray:
        """One sequence of one sample, ``(k, y, x)`` -> centre slice ``(y, x)``; 3D ``(z, y, x)`` unchanged."""
        return a[a.shape[0] // 2] if self.spatial_dims == 2 else a

    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        """PSNR/SSIM of the masked sequences (stage I: reconstruction, stage II: imputation) on the fixed
        validation patches; code usage, and in stage II the code-prediction accuracy per sequence."""
        from nnsynth.evaluation.metrics import compute_metrics
        net = self.network
        net.eval()
        n = len(self.sequences)
        psnrs, ssims = [], []
        counts = np.zeros(net.fsq.codebook_size if net.fsq.codebook_size <= 2 ** 24 else 1, np.int64)
        used = set()
        correct, total = np.zeros(n), np.zeros(n)
        correct_m, total_m = np.zeros(n), np.zeros(n)
        for batch in self.val_batches:
            b = self._to_device(batch)
            x, keep, avail = b["image"], b["keep"], b["available"]
            xp, _ = net.pad(x)
            codes = net.encode_codes(xp)                                     # posterior (B, N, d, *h)
            idx = net.fsq.codes_to_indices(codes.flatten(0, 1)).view(x.shape[0], n, -1)
            if self.stage == 2:
                predicted = net.logits_to_codes(net.prior_logits(xp, keep))
                hit = (net.fsq.codes_to_levels(predicted.flatten(0, 1)) ==
                       net.fsq.codes_to_levels(codes.flatten(0, 1))).float().view(x.shape[0], n, -1).mean(2)
                hit, av, miss = hit.cpu().numpy(), avail.cpu().numpy(), (avail & ~keep).cpu().numpy()
                for s in range(n):
                    correct[s] += hit[av[:, s], s].sum()
                    total[s] += av[:, s].sum()
                    correct_m[s] += hit[miss[:, s], s].sum()
                    total_m[s] += miss[:, s].sum()
            av_np = avail.cpu().numpy()
            for i, s in zip(*np.nonzero(av_np)):
                vals = idx[i, s].cpu().numpy()
                used.update(vals.tolist())
                if len(counts) > 1:
                    np.add.at(counts, vals, 1)
            pred = net.split(self.forward_stack(x, keep)).float().clamp(0, 1).cpu().numpy()
            ref, mask = batch["image"].view(pred.shape).numpy(), batch["mask"].numpy()
            miss_np = (batch["available"] & ~batch["keep"]).numpy()
            for i, s in zip(*np.nonzero(miss_np)):
                m = self._view(mask[i]) > 0.5
                if m.sum() < 16:
                    continue
                r = compute_metrics(self._view(ref[i, s]), self._view(pred[i, s]), m, compute_lpips=False)
                psnrs.append(r["psnr"])
                ssims.append(r["ssim"])
        net.train()
        if self.stage == 2:
            for module in net.stage_one_modules():
                module.eval()
        self._log_code_stats(used, counts, correct, total, correct_m, total_m)
        if not psnrs:
            return {"psnr": float("nan"), "ssim": float("nan")}
        return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims))}

    def _log_code_stats(self, used: set, counts: np.ndarray, correct: np.ndarray, total: np.ndarray,
                        correct_m: np.ndarray, total_m: np.ndarray) -> None:
        size = self.network.fsq.codebook_size
        stats: Dict[str, Any] = {"epoch": self.epoch, "stage": self.stage, "codes_used": len(used),
                                 "codebook_size": size, "usage": len(used) / size}
        if len(counts) > 1 and counts.sum() > 0:
            p = counts[counts > 0] / counts.sum()
            stats["perplexity"] = float(np.exp(-(p * np.log(p)).sum()))
        if self.stage == 2:
            stats["accuracy"] = {s: (float(c / t) if t else None) for s, c, t in zip(self.sequences, correct, total)}
            stats["accuracy_masked"] = {s: (float(c / t) if t else None)
                                        for s, c, t in zip(self.sequences, correct_m, total_m)}
        self.code_stats.append(stats)
        msg = f"codes used {len(used)}/{size} ({100 * stats['usage']:.2f}%)"
        if "perplexity" in stats:
            msg += f", perplexity {stats['perplexity']:.1f}"
        if self.stage == 2:
            msg += "; code accuracy " + ", ".join(
                f"{s} {100 * v:.1f}%" for s, v in stats["accuracy"].items() if v is not None)
            msg += "; on masked " + ", ".join(
                f"{s} {100 * v:.1f}%" for s, v in stats["accuracy_masked"].items() if v is not None)
        logger.info("CodeBrain stage %d validation: %s", self.stage, msg)
        if self.is_main:
            save_json(self.code_stats, self.fold_folder / CODE_STATS_FILE)

    @torch.no_grad()
    def save_previews(self, path: Path) -> None:
        """Per sample: one visible input, and prediction / target / |error| of each masked sequence."""
        if not self.val_batches:
            return
        from nnsynth.training.progress import save_preview
        batch = self.val_batches[0]
        net = self.network
        net.eval()
        pred = net.split(self.forward_stack(*(t.to(self.device) for t in (batch["image"], batch["keep"]))))
        pred = pred.float().clamp(0, 1).cpu().numpy()
        ref = batch["image"].view(pred.shape).numpy()
        rows = []
        for i in range(min(PREVIEW_ROWS, pred.shape[0])):
            keep, avail = batch["keep"][i].numpy(), batch["available"][i].numpy()
            panels: Dict[str, np.ndarray] = {}
            shown = np.nonzero(keep)[0]
            if len(shown):
                panels[f"input {self.sequences[shown[0]]}"] = self._plane(ref[i, shown[0]])
            for s in np.nonzero(avail & ~keep)[0][:1]:
                p, t = self._plane(pred[i, s]), self._plane(ref[i, s])
                panels[f"pred {self.sequences[s]}"] = p
                panels[f"target {self.sequences[s]}"] = t
                panels[f"|error| {self.sequences[s]}"] = np.abs(p - t)
            rows.append((batch["cases"][i], panels))
        save_preview(rows, path)
        net.train()
        if self.stage == 2:
            for module in net.stage_one_modules():
                module.eval()

    def _plane(self, a: np.ndarray) -> np.ndarray:
        v = self._view(a)
        return v if v.ndim == 2 else v[v.shape[0] // 2]
