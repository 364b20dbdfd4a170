"""Seq2Seq (Han et al., ``papers/seq2seq_imaging_differentiation.md``): one encoder, a code-conditioned
HyperConv decoder, any source -> any target.

Loss (eq. 1), per training sample (a random ordered pair (i, j) of the case's available sequences, i = j
included): ``lambda_r * L1(X'_{i->j}, X_j) + lambda_p * perceptual(X'_{i->j}, X_j)``, lambda_r = 10 and
lambda_p = 0.01 by default (plans ``loss``). The perceptual term runs only where pretrained backbone weights
exist on this machine (``nnsynth.losses.perceptual``); otherwise one log line says it is off.

Optional, for severely unpaired data (plans ``loss.cycle`` / ``loss.adversarial``, both off by default):
the cycle term of eq. 3, ``L1(G(E(X'_{i->j}) | s_i), X_i)`` over pairs with i != j, and the adversarial
term of eq. 2 as a least-squares PatchGAN with one output map per sequence (D_j = channel j).

Multi-source training (plans ``training.per_trainer.seq2seq.multi_source``, on by default in new plans): each
sample draws a target among the case's available sequences (with ``balance_targets``, on in new plans, weighted
by one over the number of training cases that have it, so a sequence many cases lack is the target nearly as
often as the others: the sequences a dataset lacks most often are the ones users will impute, and uniform draws
train them least) and, as sources, either the target itself
(self-reconstruction, with the paper's 1/|available| odds) or a random non-empty subset of the other available
sequences (with probability ``training.per_trainer.seq2seq.all_sources_fraction``: all of them, the task
``nnsynth_predict`` runs when it imputes a sequence from everything a case has); the decoder reads the mean of
the sources' encodings (the "average" fusion the TSF paper compares with), or with ``network.joint_input``
(default in new plans) their joint encoding. With one source this is exactly eq. 1's one-to-one pair; with
several it teaches the one decoder to use what every given sequence shows (a lesion seen only on T2, say).
Prediction then fuses the same way. The plans' intensity augmentation (gamma, brightness, noise, bias field)
is applied to each chosen source stack here, after the sources are drawn, so the target stays clean.
With ``multi_source`` off the trainer is the paper's one-to-one Seq2Seq, and prediction from several sources
averages the per-source outputs (output space).

Label head (plans ``loss.seq2seq.lambda_seg``, not in the paper): when the dataset has label maps (e.g. tumour
segmentations in labelsTr), a 1x1 convolution on the decoder's last feature map predicts the label of every
voxel, and ``lambda_seg`` times its cross-entropy (brain voxels of labelled cases) joins the loss. It teaches the
shared features what a lesion is from every labelled case, including those that lack the sequence a lesion is
bright on; the head is for training only (prediction never builds it).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nnsynth.constants import DATASET_JSON
from nnsynth.exceptions import NnsynthError, PlansError
from nnsynth.networks.blocks import depth_to_space
from nnsynth.training.dataloading import SynthesisSampler, build_intensity_augmentation
from nnsynth.training.engine import TrainingEngine
from nnsynth.utils.files import load_json

logger = logging.getLogger(__name__)

# --- constants of this module (paper defaults; the plans' "loss" entry overrides them) -----------------------
# lambda_l1 / lambda_perceptual defaults live in nnsynth.losses.reconstruction (10 and 0.01, eq. 1).
#: seed offset of the label head's initialisation (drawn apart from the network's)
LABEL_HEAD_SEED = 4099
SEQ2SEQ_LOSS_DEFAULTS: Dict[str, Any] = {"lambda_cycle": 0.0, "lambda_adv": 0.0, "discriminator_lr": 2e-4,
                                         "lambda_seg": 0.0}


class PatchDiscriminator(nn.Module):
    """Small PatchGAN (LSGAN targets): strided conv-norm-LeakyReLU, one output map per sequence."""

    def __init__(self, in_channels: int, num_sequences: int, spatial_dims: int, width: int = 32, depth: int = 3) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
        layers, c = [conv(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)], width
        for _ in range(depth - 1):
            layers += [conv(c, c * 2, 4, 2, 1), norm(c * 2, affine=True), nn.LeakyReLU(0.2)]
            c *= 2
        layers.append(conv(c, num_sequences, 3, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
        out = self.net(x * 2 - 1)
        return out[torch.arange(x.shape[0], device=x.device), sequence]


class Seq2SeqTrainer(TrainingEngine):
    trainer_name = "seq2seq"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_cfg = {**SEQ2SEQ_LOSS_DEFAULTS, **self.loss_settings}
        self.lambda_cycle = float(self.loss_cfg["lambda_cycle"])
        self.lambda_adv = float(self.loss_cfg["lambda_adv"])
        self.lambda_seg = float(self.loss_cfg["lambda_seg"])
        if not (math.isfinite(self.lambda_seg) and self.lambda_seg >= 0):
            raise PlansError(f"loss.seq2seq.lambda_seg must be a number >= 0, got {self.loss_cfg['lambda_seg']!r}")
        self.label_head: Optional[nn.Module] = None
        self.multi_source = bool(self.training.get("multi_source", False))
        self.all_sources_fraction = float(self.training.get("all_sources_fraction", 0.0))
        if not 0.0 <= self.all_sources_fraction <= 1.0:
            raise PlansError("training.per_trainer.seq2seq.all_sources_fraction must be within [0, 1], got "
                             f"{self.all_sources_fraction}")
        self.balance_targets = self.training.get("balance_targets", False)
        if not isinstance(self.balance_targets, bool):
            raise PlansError("training.per_trainer.seq2seq.balance_targets must be true or false, got "
                             f"{self.balance_targets!r}")
        #: per sequence, the weight of drawing it as the target (balance_targets); None: uniform among a case's
        #: sequences
        self.target_weights: Optional[torch.Tensor] = None
        if self.multi_source and (self.lambda_cycle > 0 or self.lambda_adv > 0):
            logger.info("Cycle/adversarial terms need one source per sample: multi-source training is off")
            self.multi_source = False

    @property
    def fusion(self) -> str:
        """How prediction combines several sources when the model was trained to fuse them: one joint encoding
        ("joint", ``network.joint_input``) or the mean of the encodings ("latent"); otherwise the per-source
        outputs are averaged ("output")."""
        if not self.multi_source:
            return "output"
        return "joint" if bool(self.config["network"].get("joint_input", False)) else "latent"

    # ----- network and losses ------------------------------------------------------------------------------
    def build_network(self) -> nn.Module:
        from nnsynth.networks.seq2seq import Seq2SeqNet
        return Seq2SeqNet(len(self.sequences), self.num_adjacent_slices, self.spatial_dims, self.config["network"])

    def label_classes(self) -> List[int]:
        """Label values the head predicts, in class order (dataset.json ``labels``); [] when the head is off."""
        from nnsynth.evaluation.segmentation import label_values
        if self.lambda_seg <= 0:
            return []
        if not self.multi_source:
            logger.info("Label head off: it needs multi-source training")
            return []
        path = self.preprocessed_dataset_folder / DATASET_JSON
        labels = load_json(path).get("labels") if path.is_file() else None
        try:
            values = sorted(set(label_values(labels).values())) if labels else []
        except NnsynthError as exc:
            logger.info("Label head off: %s", exc)
            return []
        if len(values) < 2:
            logger.info("Label head off: dataset.json declares no label besides the background")
            return []
        return values

    def _unshuffle(self) -> int:
        """network.input_unshuffle f: the decoder's last feature map holds every f^d block of voxels as channels."""
        return int(self.config["network"].get("input_unshuffle", 1) or 1)

    def build_optimizer(self, params) -> torch.optim.Optimizer:
        """The plans' optimizer over the network and, when it is on, the label head."""
        extra = list(self.label_head.parameters()) if self.label_head is not None else []
        return super().build_optimizer(list(params) + extra)

    def initialize(self) -> None:
        if self.was_initialized:
            return
        values = self.label_classes()
        if values:
            conv = nn.Conv2d if self.spatial_dims == 2 else nn.Conv3d
            width = int(self.config["network"]["encoder_channels"][0])
            from nnsynth.evaluation.segmentation import class_lut
            self.label_lut = torch.from_numpy(class_lut(values))   # label value -> class index
            with torch.random.fork_rng(devices=[]):   # its own seed: the network's initialisation stays as it was
                torch.manual_seed(self.seed + LABEL_HEAD_SEED)
                # with network.input_unshuffle the head, like the final HyperConv, gives every f^d voxel block
                blocks = self._unshuffle() ** self.spatial_dims
                self.label_head = conv(width, len(values) * self.num_adjacent_slices * blocks, 1).to(self.device)
        super().initialize()
        if self.label_head is not None:
            labelled = sum(self.case_store.cases[c].has_label for c in self.train_cases if c in self.case_store.cases)
            logger.info("Label head on: %d classes (label values %s), weight %s, %d of %d training cases labelled",
                        len(values), ", ".join(str(v) for v in values), self.lambda_seg, labelled,
                        len(self.train_cases))
        from nnsynth.losses.reconstruction import Seq2SeqLoss
        self.recon_loss = Seq2SeqLoss.from_config(self.loss_cfg)
        self.recon_loss.perceptual = self.build_perceptual_loss(self.recon_loss.lambda_perceptual)
        self.discriminator = None
        if self.lambda_adv > 0:
            self.discriminator = PatchDiscriminator(self.num_adjacent_slices, len(self.sequences),
                                                    self.spatial_dims).to(self.device)
            self.d_optimizer = torch.optim.AdamW(self.discriminator.parameters(),
                                                 lr=float(self.loss_cfg["discriminator_lr"]), betas=(0.5, 0.999))
            logger.info("Adversarial (LSGAN PatchGAN) term on, weight %s", self.lambda_adv)
        if self.lambda_cycle > 0:
            logger.info("Cycle-consistency term on, weight %s", self.lambda_cycle)
        self.source_augmentation = None
        if self.multi_source:
            logger.info("Multi-source training: sources are random subsets of each case's sequences, %s",
                        "encoded jointly" if self.fusion == "joint" else "fused by the mean of their encodings")
            self.source_augmentation = build_intensity_augmentation(self.config.get("augmentation"))
            if self.balance_targets:
                counts = self.target_availability()
                # a sequence no training case has is never available in a draw, so its weight does not matter
                self.target_weights = 1.0 / counts.clamp(min=1)
                logger.info("Targets balanced: drawn with weights one over the training cases that have each "
                            "sequence (%s)", ", ".join(f"{name} {int(n)}" for name, n in
                                                       zip(self.sequences, counts.tolist())))

    def target_availability(self) -> torch.Tensor:
        """How many of this fold's training cases have each sequence (N,)."""
        counts = torch.zeros(len(self.sequences))
        for case in self.train_cases:
            if case in self.case_store.cases:
                counts[self.case_store.cases[case].available] += 1
        return counts

    def build_sampler(self) -> SynthesisSampler:
        """Multi-source training needs every sequence of a case per sample; else the engine's pair sampler."""
        return self.multi_sequence_sampler(1) if self.multi_source else super().build_sampler()

    @staticmethod
    def draw_multi_source(available: torch.Tensor, generator: Optional[torch.Generator] = None,
                          all_sources_fraction: float = 0.0, target_weights: Optional[torch.Tensor] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row of ``available`` (B, N) bool: a random available target (uniform, or with probability
        proportional to ``target_weights`` (N,) among the row's sequences) and its sources, the target alone
        with probability 1/|available| (self-reconstruction, as the paper's uniform pairs give), else every other
        available sequence with probability ``all_sources_fraction`` and otherwise a random non-empty subset of
        them (its size uniform). Returns (rows, sequences, targets): source m is sequence ``sequences[m]`` of row
        ``rows[m]``."""
        rows, seqs, targets = [], [], []
        for i in range(available.shape[0]):
            av = available[i].nonzero(as_tuple=True)[0].tolist()
            if target_weights is None:
                t = av[int(torch.randint(len(av), (1,), generator=generator))]
            else:
                t = av[int(torch.multinomial(target_weights[av], 1, generator=generator))]
            others = [s for s in av if s != t]
            if not others or float(torch.rand((), generator=generator)) < 1.0 / len(av):
                chosen = [t]
            elif all_sources_fraction > 0 and float(torch.rand((), generator=generator)) < all_sources_fraction:
                chosen = others
            else:
                r = int(torch.randint(1, len(others) + 1, (1,), generator=generator))
                chosen = sorted(others[j] for j in torch.randperm(len(others), generator=generator)[:r].tolist())
            rows += [i] * len(chosen)
            seqs += chosen
            targets.append(t)
        return torch.tensor(rows), torch.tensor(seqs), torch.tensor(targets)

    def _multi_source_loss(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, float]]:
        images = batch["images"]
        rows, seqs, targets = self.draw_multi_source(batch["available"].bool().cpu(),
                                                     all_sources_fraction=self.all_sources_fraction,
                                                     target_weights=self.target_weights)
        rows, seqs, targets = rows.to(images.device), seqs.to(images.device), targets.to(images.device)
        sources = images[rows, seqs]
        if self.source_augmentation is not None:
            # the plans' intensity transforms on the inputs only (each source stack on its own); the target
            # below is read from the untouched batch
            sources = torch.stack([self.source_augmentation(image=s.cpu())["image"] for s in sources]).to(images)
        features: Dict[str, torch.Tensor] = {}
        hook = None
        if self.label_head is not None and bool(batch["has_label"].any()):
            # the decoder's last feature map, the input of its final HyperConv
            hook = self._network.decoder.final.register_forward_hook(
                lambda module, args, out: features.__setitem__("x", args[0]))
        try:
            pred = self.train_network(sources, targets, rows, seqs)
        finally:
            if hook is not None:
                hook.remove()
        truth = images[torch.arange(images.shape[0], device=images.device), targets]
        terms = self.recon_loss.terms(pred.float(), truth)
        parts = {"sources_per_sample": float(seqs.numel()) / images.shape[0]}
        loss = terms["loss"]
        if "x" in features:
            ce = self._label_loss(features["x"], batch)
            loss = loss + self.lambda_seg * ce
            parts["label_ce"] = float(ce.detach())
        return loss, parts

    def _label_loss(self, features: torch.Tensor, batch: Dict[str, Any]) -> torch.Tensor:
        """Cross-entropy of the label head over the brain voxels of the samples whose case has a label map."""
        keep = batch["has_label"].to(features.device)
        logits = depth_to_space(self.label_head(features[keep]).float(), self._unshuffle())
        labels = batch["labels"].to(features.device)[keep]          # (b, k, y, x) or (b, 1, z, y, x)
        if self.spatial_dims == 2:                                  # one class map per slice of the stack
            logits = logits.reshape(logits.shape[0], -1, self.num_adjacent_slices, *logits.shape[2:])
        else:
            labels = labels[:, 0]
        lut = self.label_lut.to(labels.device)
        target = lut[labels.clamp(0, len(lut) - 1)]            # outside the brain (-1) is masked below
        inside = (labels >= 0).float()
        ce = F.cross_entropy(logits, target, reduction="none")
        return (ce * inside).sum() / inside.sum().clamp(min=1.0)

    def compute_loss(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, float]]:
        if "images" in batch:
            return self._multi_source_loss(batch)
        pred = self.train_network(batch["source"], batch["target_idx"], None, batch["source_idx"])
        terms = self.recon_loss.terms(pred.float(), batch["target"])  # eq. 1 over the whole patch, as the paper
        loss, parts = terms["loss"], {}
        cross = batch["source_idx"] != batch["target_idx"]
        if self.lambda_cycle > 0 and bool(cross.any()):
            back = self.train_network(pred[cross], batch["source_idx"][cross], None, batch["target_idx"][cross])
            cyc = F.l1_loss(back.float(), batch["source"][cross])
            loss = loss + self.lambda_cycle * cyc
            parts["cycle"] = float(cyc.detach())
        if self.discriminator is not None and bool(cross.any()):
            for p in self.discriminator.parameters():
                p.requires_grad_(False)
            adv = ((self.discriminator(pred[cross], batch["target_idx"][cross]) - 1) ** 2).mean()
            loss = loss + self.lambda_adv * adv
            parts["adversarial"] = float(adv.detach())
            self._fake = (pred[cross].detach(), batch["target_idx"][cross])
        return loss, parts

    def train_step(self, batch: Dict[str, Any]) -> float:
        self._fake = None
        value = super().train_step(batch)
        if self.discriminator is not None and self._fake is not None:
            fake, seq = self._fake
            for p in self.discriminator.parameters():
                p.requires_grad_(True)
            self.d_optimizer.zero_grad(set_to_none=True)
            real = batch["target"][batch["source_idx"] != batch["target_idx"]]
            d_loss = 0.5 * (((self.discriminator(real, seq) - 1) ** 2).mean() + (self.discriminator(fake, seq) ** 2).mean())
            d_loss.backward()
            self.d_optimizer.step()
        return value

    def extra_state(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if getattr(self, "discriminator", None) is not None:
            out.update(discriminator=self.discriminator.state_dict(), d_optimizer=self.d_optimizer.state_dict())
        if self.label_head is not None:
            out["label_head"] = self.label_head.state_dict()
        return out

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        if getattr(self, "discriminator", None) is not None and "discriminator" in state:
            self.discriminator.load_state_dict(state["discriminator"])
            self.d_optimizer.load_state_dict(state["d_optimizer"])
        if self.label_head is not None and "label_head" in state:
            self.label_head.load_state_dict(state["label_head"])

    # ----- synthesis ------------------------------------------------------------------------------------------
    def predict(self, batch: Dict[str, Any]) -> torch.Tensor:
        return self.network(batch["source"], batch["target_idx"], None, batch["source_idx"])

    def synthesize_slices(self, sources: Dict[int, torch.Tensor], target: int) -> torch.Tensor:
        net = self.network
        any_src = next(iter(sources.values()))
        tgt = torch.full((any_src.shape[0],), int(target), dtype=torch.long, device=any_src.device)
        if self.fusion != "output":
            return net.decode(net.encode_sources(sources), tgt, output_size=any_src.shape[2:])
        return torch.stack([net(x, tgt, None, torch.full_like(tgt, int(s))) for s, x in sources.items()]).mean(0)

    def full_volume_method(self) -> str:
        how = "encoded jointly" if self.fusion == "joint" else f"averaged in {self.fusion} space"
        return f"{super().full_volume_method()}, sources {how}"
