"""VQ-Seq2Seq (Han et al., ``papers/vq_seq2seq_common_latent_space.md``): Seq2Seq with a vector-quantised
latent, the VQC common latent space, latent consistency and random domain augmentation; no adversary.

One training batch holds, per sample, ALL sequences of one case at the same patch (``MultiSequenceSampler``),
so the per-case terms of eq. 8 can be formed:

- reconstruction from z_q: ``L_rec(G(z_q(X_i), c_j), X_j)`` for available i, j (i = j included); by default one
  random target j per source i (an unbiased estimate of the mean over j; ``targets_per_source: "all"`` forms
  every ordered pair like the paper);
- reconstruction from the VQC sample z_s (eq. 4-5) of every case with >= 2 sequences, to each available target
  (or one random target) — from ``vqc_start_epoch``;
- ``lambda_con * L_con(z_q(X_i), z_q(X_j))`` (eq. 7) over unordered pairs i != j — from
  ``contrastive_start_epoch``;
- ``lambda_vq * L_vq`` (eq. 2) over all encoded inputs;
- random domain augmentation of the inputs (sec. 2.4) — from ``augmentation_start_epoch`` (default: the VQC
  start, as in the authors' schedule).

``L_rec = lambda_l1 L1 + lambda_ssim (1 - SSIM) + lambda_perceptual LPIPS`` (eq. 6, 10 / 1 / 0.1); each term is
averaged over the pairs of the batch. The perceptual term runs only where local backbone weights exist.

Unpaired data works as is: a case with only (T1, T1Gd) contributes T1<->T1Gd pairs; T1 -> Flair is then
synthesised in one step through the common latent space.

Codebook usage and perplexity of each epoch's training assignments are logged and drawn in progress.png.
Multi-source synthesis decodes the VQC mean of the sources' z_q.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nnsynth.exceptions import NnsynthError, PlansError
from nnsynth.training.dataloading import MultiSequenceSampler
from nnsynth.training.engine import TrainingEngine

logger = logging.getLogger(__name__)

# --- constants of this module (paper defaults; the plans' "loss"/"training" entries override them) -----------
VQ_SEQ2SEQ_LOSS_DEFAULTS: Dict[str, Any] = {
    "lambda_l1": 10.0, "lambda_ssim": 1.0, "lambda_perceptual": 0.1,   # eq. 6
    "lambda_con": 10.0, "lambda_vq": 10.0,                             # eq. 8
    "tau": 0.07, "max_contrastive_positions": 4096, "contrastive_normalize": True,
    "contrastive_keep_fraction": 0.125,  # authors' code: the 1/8 least self-similar positions
    "contrastive_exclude_same_code": False,  # True: copies of the positive's code are no negatives (contrastive.py)
    "consistency_latent": "z_q",        # eq. 7 on the quantised latents (paper) or "z_e" (the encoder's, continuous)
    "contrastive_start_epoch": None,    # None: min(100, num_epochs // 10) (authors' code: epoch 100)
    "vqc_start_epoch": None,            # None: min(200, num_epochs // 5)  (authors' code: epoch 200)
    "augmentation_start_epoch": None,   # None: the VQC start (authors' code: augmented inputs from epoch 200)
    "targets_per_source": 1,            # int, or "all" for every ordered pair of eq. 8
}
# A run that --max-minutes cut to fewer epochs than this keeps the plans' start epochs (the terms then stay off):
# switched on after one epoch, the InfoNCE term at chance level swamps reconstruction (measured on the demo job,
# 3 fitted epochs: validation PSNR 11.7 -> 10.2 dB; test Flair 10.4 dB against 12.0 dB of an earlier 8-minute run
# without those terms; with 10 fitted epochs, contrastive from epoch 1 and VQC from epoch 2: validation PSNR
# 11.95 -> 9.8-10.5 dB, test Flair 10.58 dB against 12.08 with the terms off).
MIN_EPOCHS_TO_SCALE_SCHEDULE = 20
VQ_SEQ2SEQ_OPTIMIZER_DEFAULTS: Dict[str, Any] = {   # paper: AdamW 1e-4; authors' code betas 0.9/0.95, wd 0.05
    "optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.05, "betas": [0.9, 0.95],
}
# ---------------------------------------------------------------------------------------------------------------


def apply_optimizer_defaults(trainer: TrainingEngine, defaults: Dict[str, Any]) -> None:
    """Paper optimizer settings for keys the plans set neither globally nor in ``per_trainer``."""
    training = trainer.config.get("training", {}) or {}
    per = (training.get("per_trainer", {}) or {}).get(trainer.trainer_name, {}) or {}
    for key, value in defaults.items():
        if key not in training and key not in per:
            trainer.training[key] = value


def latent_mask(mask: torch.Tensor, latent_size) -> torch.Tensor:
    """Brain mask (B, C, *S) -> foreground at the latent resolution (B, *s): any brain voxel in the cell."""
    m = mask.amax(1, keepdim=True).float()
    pool = F.adaptive_max_pool2d if m.dim() == 4 else F.adaptive_max_pool3d
    return pool(m, tuple(int(s) for s in latent_size))[:, 0] > 0.5


class VQSeq2SeqTrainer(TrainingEngine):
    trainer_name = "vq_seq2seq"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        apply_optimizer_defaults(self, VQ_SEQ2SEQ_OPTIMIZER_DEFAULTS)
        cfg = {**VQ_SEQ2SEQ_LOSS_DEFAULTS, **{k: v for k, v in self.loss_settings.items() if not isinstance(v, dict)}}
        epochs = int(self.training["num_epochs"])
        if cfg["contrastive_start_epoch"] is None:
            cfg["contrastive_start_epoch"] = min(100, epochs // 10)
        if cfg["vqc_start_epoch"] is None:
            cfg["vqc_start_epoch"] = min(200, epochs // 5)
        if cfg["augmentation_start_epoch"] is None:
            cfg["augmentation_start_epoch"] = cfg["vqc_start_epoch"]
        if cfg["consistency_latent"] not in ("z_q", "z_e"):
            raise PlansError("loss.vq_seq2seq.consistency_latent must be 'z_q' (eq. 7) or 'z_e', got "
                             f"{cfg['consistency_latent']!r}")
        tps = cfg["targets_per_source"]
        if not (tps == "all" or (isinstance(tps, (int, float)) and int(tps) >= 1)):
            raise PlansError(f"loss.vq_seq2seq.targets_per_source must be 'all' or an int >= 1, got {tps!r}")
        self.loss_cfg = cfg
        self._epochs_planned = self.num_epochs   # before --max-minutes fits the schedule (also after a resume)
        self._parts_sum: Dict[str, float] = {}
        self._parts_n = 0

    # ----- set-up -------------------------------------------------------------------------------------------
    def build_network(self) -> nn.Module:
        from nnsynth.networks.vq_seq2seq import VQSeq2SeqNet
        return VQSeq2SeqNet(len(self.sequences), self.num_adjacent_slices, self.spatial_dims, self.config["network"],
                            self.config.get("vq", {}))

    def build_sampler(self) -> MultiSequenceSampler:
        return self.multi_sequence_sampler(1)

    def initialize(self) -> None:
        if self.was_initialized:
            return
        if self.world_size > 1:
            raise NnsynthError(f"{self.trainer_name} does not support --num-gpus > 1 yet (its loss calls the "
                               "network's parts directly, which DDP cannot synchronise); train on one device")
        super().initialize()
        from nnsynth.losses.contrastive import LatentConsistencyLoss
        from nnsynth.losses.ssim import SSIMLoss
        from nnsynth.training.augmentation_domain import DomainAugmenter
        self.ssim_loss = SSIMLoss()
        self.consistency = LatentConsistencyLoss(float(self.loss_cfg["tau"]),
                                                 int(self.loss_cfg["max_contrastive_positions"]),
                                                 bool(self.loss_cfg["contrastive_normalize"]),
                                                 float(self.loss_cfg["contrastive_keep_fraction"]),
                                                 bool(self.loss_cfg["contrastive_exclude_same_code"]))
        self.augmenter = DomainAugmenter(len(self.sequences), self.network.code_length,
                                         self.config.get("augmentation"))
        self.perceptual = self.build_perceptual_loss(float(self.loss_cfg["lambda_perceptual"]))
        logger.info("VQ-Seq2Seq schedule: contrastive from epoch %s, VQC sampling from epoch %s, domain "
                    "augmentation from epoch %s; D=%d, K=%d", self.loss_cfg["contrastive_start_epoch"],
                    self.loss_cfg["vqc_start_epoch"], self.loss_cfg["augmentation_start_epoch"],
                    self.network.quantizer.latent_dim, self.network.quantizer.codebook_size)

    def start_epoch(self, key: str) -> int:
        """Epoch at which a scheduled term (``contrastive_start_epoch``, ``vqc_start_epoch``,
        ``augmentation_start_epoch``) switches on. When ``--max-minutes`` shortened the run, the plans' value is
        scaled by the same factor, so a shortened run still reaches every term at the same fraction of training; a
        term planned after epoch 0 never starts before epoch 1, and runs cut below MIN_EPOCHS_TO_SCALE_SCHEDULE
        epochs keep the planned starts (see that constant)."""
        value = int(self.loss_cfg[key])
        if value > 0 and MIN_EPOCHS_TO_SCALE_SCHEDULE <= self.num_epochs < self._epochs_planned:
            return max(1, int(round(value * self.num_epochs / self._epochs_planned)))
        return value

    def on_schedule_fitted(self) -> None:
        if self.num_epochs < MIN_EPOCHS_TO_SCALE_SCHEDULE:
            logger.info("VQ-Seq2Seq: %d epochs are too few to scale the term schedule (needs %d); contrastive, VQC "
                        "and augmentation keep their planned start epochs", self.num_epochs,
                        MIN_EPOCHS_TO_SCALE_SCHEDULE)
            return
        logger.info("VQ-Seq2Seq schedule scaled to %d epochs: contrastive from epoch %d, VQC sampling from epoch %d, "
                    "domain augmentation from epoch %d", self.num_epochs, self.start_epoch("contrastive_start_epoch"),
                    self.start_epoch("vqc_start_epoch"), self.start_epoch("augmentation_start_epoch"))

    # ----- losses -------------------------------------------------------------------------------------------
    def reconstruction(self, pred: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Eq. 6, each term averaged over the batch of pairs."""
        l1 = F.l1_loss(pred, target)
        loss = float(self.loss_cfg["lambda_l1"]) * l1
        parts = {"l1": l1}
        if float(self.loss_cfg["lambda_ssim"]) > 0:
            s = self.ssim_loss(pred.float(), target.float())
            loss = loss + float(self.loss_cfg["lambda_ssim"]) * s
            parts["ssim_loss"] = s
        if self.perceptual is not None:
            p = self.perceptual(pred.float(), target.float())
            loss = loss + float(self.loss_cfg["lambda_perceptual"]) * p
            parts["perceptual"] = p
        return loss, parts

    def _choose_targets(self, avail_lists: List[List[int]], owners: List[int]) -> Tuple[List[int], List[int]]:
        """(row in the encoded batch, target sequence) pairs for the z_q reconstruction term."""
        rows, targets = [], []
        tps = self.loss_cfg["targets_per_source"]
        for m, b in enumerate(owners):
            av = avail_lists[b]
            if tps == "all" or int(tps) >= len(av):
                chosen = av
            else:
                perm = torch.randperm(len(av))[:int(tps)].tolist()
                chosen = [av[i] for i in perm]
            rows += [m] * len(chosen)
            targets += chosen
        return rows, targets

    def _translate(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """The network's own translation for domain augmentation: eval mode, so no codebook statistics change."""
        net = self.network
        net.eval()
        try:
            with torch.no_grad():
                return net(x, code)
        finally:
            net.train()

    def compute_loss(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, float]]:
        net = self.network
        images, avail, mask = batch["images"], batch["available"].bool(), batch["mask"]
        size = images.shape[3:]
        b_idx, s_idx = avail.nonzero(as_tuple=True)
        owners = b_idx.tolist()
        avail_lists = [avail[b].nonzero(as_tuple=True)[0].tolist() for b in range(images.shape[0])]
        x = images[b_idx, s_idx]
        x_in = x
        if self.epoch >= self.start_epoch("augmentation_start_epoch"):
            x_in, _ = self.augmenter(x, self._translate)
        vq = net.quantize(x_in)
        z_q = vq.z_q
        parts: Dict[str, torch.Tensor] = {"vq": vq.loss}
        total = float(self.loss_cfg["lambda_vq"]) * vq.loss

        # eq. 8, first term: G(z_q(X_i), c_j) vs X_j
        rows, targets = self._choose_targets(avail_lists, owners)
        tgt_t = torch.tensor(targets, device=images.device)
        pred = net.decode_latent(z_q[rows], tgt_t, output_size=size)
        truth = images[torch.tensor([owners[r] for r in rows], device=images.device), tgt_t]
        rec, rparts = self.reconstruction(pred, truth)
        total = total + rec
        parts.update({f"rec_{k}": v for k, v in rparts.items()})

        n_avail = avail.sum(1)
        multi = (n_avail >= 2).nonzero(as_tuple=True)[0].tolist()
        # eq. 8, second term: G(z_s, c_j) vs X_j with z_s from the VQC latent space of the case
        if multi and self.epoch >= self.start_epoch("vqc_start_epoch"):
            from nnsynth.networks.vq_seq2seq import sample_vqc
            dense = z_q.new_zeros((images.shape[0], images.shape[1]) + tuple(z_q.shape[1:]))
            dense = dense.index_put((b_idx, s_idx), z_q)
            sel = torch.tensor(multi, device=images.device)
            mu, spread = net.vqc(dense[sel], avail[sel])
            z_s = sample_vqc(mu, spread)
            srows, stargets = [], []
            for i, b in enumerate(multi):
                av = avail_lists[b]
                chosen = av if self.loss_cfg["targets_per_source"] == "all" else [av[int(torch.randint(len(av), (1,)))]]
                srows += [i] * len(chosen)
                stargets += chosen
            st = torch.tensor(stargets, device=images.device)
            pred_s = net.decode_latent(z_s[srows], st, output_size=size)
            truth_s = images[torch.tensor([multi[r] for r in srows], device=images.device), st]
            rec_s, sparts = self.reconstruction(pred_s, truth_s)
            total = total + rec_s
            parts["vqc_l1"] = sparts["l1"]

        # eq. 7 over unordered pairs of a case's sequences
        if multi and self.epoch >= self.start_epoch("contrastive_start_epoch") and float(self.loss_cfg["lambda_con"]) > 0:
            first, second, owner = [], [], []
            by_case: Dict[int, List[int]] = {}
            for m, b in enumerate(owners):
                by_case.setdefault(b, []).append(m)
            for b, ms in by_case.items():
                for i in range(len(ms)):
                    for j in range(i + 1, len(ms)):
                        first.append(ms[i])
                        second.append(ms[j])
                        owner.append(b)
            if first:
                lm = latent_mask(mask[torch.tensor(owner, device=images.device)], z_q.shape[2:])
                z_c = z_q if self.loss_cfg["consistency_latent"] == "z_q" else vq.z_e
                mse, nce = self.consistency(z_c[first], z_c[second], lm, vq.indices[first], vq.indices[second])
                total = total + float(self.loss_cfg["lambda_con"]) * (mse + nce)
                parts["con_mse"], parts["con_nce"] = mse, nce
        parts["perplexity"] = vq.perplexity
        floats = {k: float(v.detach()) for k, v in parts.items()}
        for k, v in floats.items():
            self._parts_sum[k] = self._parts_sum.get(k, 0.0) + v
        self._parts_n += 1
        return total, floats

    # ----- epochs, logs ---------------------------------------------------------------------------------------
    def _end_epoch(self) -> None:
        stats = self.network.quantizer.epoch_statistics()
        for key, value in stats.items():
            self.logs.setdefault(key, []).append(float(value))
        if self._parts_n:
            text = ", ".join(f"{k} {v / self._parts_n:.4f}" for k, v in sorted(self._parts_sum.items()))
            logger.info("epoch %d loss parts: %s", self.epoch + 1, text)
        logger.info("epoch %d codebook: usage %.3f of %d codes, perplexity %.1f, %d restarts so far", self.epoch + 1,
                    stats["codebook_usage"], self.network.quantizer.codebook_size, stats["codebook_perplexity"],
                    int(self.network.quantizer.restarts))
        self.network.quantizer.reset_epoch_statistics()
        self._parts_sum, self._parts_n = {}, 0
        super()._end_epoch()

    def progress_panels(self) -> List[Tuple[str, str, Optional[str], Optional[str]]]:
        return [("codebook_usage", "codebook usage (fraction of codes)", "codebook_perplexity", "perplexity")]

    # ----- synthesis ----------------------------------------------------------------------------------------
    def synthesize_slices(self, sources: Dict[int, torch.Tensor], target: int) -> torch.Tensor:
        """One source: G(z_q(X), c_t); several: G(mean_i z_q(X_i), c_t) (the VQC centre)."""
        net = self.network
        any_src = next(iter(sources.values()))
        tgt = torch.full((any_src.shape[0],), int(target), dtype=torch.long, device=any_src.device)
        z = torch.stack([net.quantize(x).z_q for x in sources.values()]).mean(0)
        return net.decode_latent(z, tgt, output_size=any_src.shape[2:])

    def full_volume_method(self) -> str:
        return f"{super().full_volume_method()}, several sources fused as the mean of their z_q (VQC centre)"


__all__ = ["VQSeq2SeqTrainer", "MultiSequenceSampler", "VQ_SEQ2SEQ_LOSS_DEFAULTS", "VQ_SEQ2SEQ_OPTIMIZER_DEFAULTS",
           "apply_optimizer_defaults", "latent_mask"]
