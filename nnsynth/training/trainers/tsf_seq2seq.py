"""TSF-Seq2Seq (Han et al., ``papers/tsf_seq2seq_task_specific_fusion.md``): many sources -> one target through
task-specific fusion of the encoded sources (``nnsynth.networks.tsf``), on top of a trained Seq2Seq or VQ-Seq2Seq.

- Initialisation: the ``checkpoint_final.pth`` (else ``checkpoint_latest.pth``) of ``pretrained_from`` in the same
  results layout: ``nnSynth_results/DatasetXXX/{pretrained_from}__{plans}__{configuration}/fold_{k}/``.
  ``pretrained_from`` is ``seq2seq``, ``vq_seq2seq`` or a checkpoint path; by default seq2seq is looked for
  first, then vq_seq2seq. The encoder (and the quantiser of a VQ backbone) is frozen; G and the fusion module
  are trained with Adam 1e-4 (paper).
- Tasks: per sample a case with >= 2 sequences, a random available target and a random non-empty subset of
  its other available sequences as sources.
- Loss eq. 5: ``lambda_r L1 + lambda_p perceptual`` on both X' = G(f) and X'_A = G(f + f_A) (10 / 0.01).
- Explainability, written into the fold folder at the end of training (and by ``--val-only``):
  ``sequence_contributions.csv`` and ``sequence_contributions.png``: omega for every non-empty source subset x
  target not in it (paper Fig. 3). ``synthesize_with_tsem`` returns X'_A and TSEM = |X'_A - X'| (eq. 6) for
  the predictor's ``--save-maps``.
"""
from __future__ import annotations

import csv
import io
import itertools
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnsynth.exceptions import NnsynthError
from nnsynth.training import checkpointing as ckpt
from nnsynth.training.engine import TrainingEngine
from nnsynth.training.dataloading import MultiSequenceSampler
from nnsynth.training.trainers.vq_seq2seq import apply_optimizer_defaults
from nnsynth.losses.reconstruction import intensity_balance_from_config, intensity_balance_weights, masked_l1
from nnsynth.utils.files import atomic_path

logger = logging.getLogger(__name__)

# --- constants of this module (paper defaults; the plans' "loss"/"training" entries override them) -----------
TSF_SEQ2SEQ_LOSS_DEFAULTS: Dict[str, Any] = {"lambda_l1": 10.0, "lambda_perceptual": 0.01}   # eq. 5
TSF_SEQ2SEQ_OPTIMIZER_DEFAULTS: Dict[str, Any] = {"optimizer": "adam", "lr": 1e-4, "weight_decay": 0.0,
                                                  "betas": [0.9, 0.999]}
TSF_PRETRAINED_SEARCH_ORDER = ("seq2seq", "vq_seq2seq")
CONTRIBUTIONS_CSV = "sequence_contributions.csv"
CONTRIBUTIONS_PNG = "sequence_contributions.png"
# ---------------------------------------------------------------------------------------------------------------


def pretrained_checkpoint_path(output_folder: Path, fold: Union[int, str], trainer: str) -> Optional[Path]:
    """``checkpoint_final.pth`` (else latest) of ``trainer`` beside ``output_folder`` (same plans/configuration)."""
    suffix = output_folder.name.split("__", 1)[1] if "__" in output_folder.name else output_folder.name
    fold_folder = output_folder.parent / f"{trainer}__{suffix}" / f"fold_{fold}"
    for name in (ckpt.CHECKPOINT_FINAL, ckpt.CHECKPOINT_LATEST):
        if (fold_folder / name).is_file():
            if name != ckpt.CHECKPOINT_FINAL:
                logger.warning("%s has no %s; using %s (an unfinished training)", fold_folder,
                               ckpt.CHECKPOINT_FINAL, name)
            return fold_folder / name
    return None


def find_trained_checkpoint(output_folder: Path, fold: Union[int, str], spec: Optional[str],
                            search_order: Tuple[str, ...], option: str) -> Tuple[Optional[Path], Tuple[str, ...], str]:
    """Resolve ``--pretrained-from`` / ``--latent-from``: a checkpoint path, a trainer name, or (None) the first of
    ``search_order`` trained beside ``output_folder``. Returns (path or None, names tried, folders looked in)."""
    if spec and (Path(spec).is_file() or str(spec).endswith(".pth")):
        if not Path(spec).is_file():
            raise NnsynthError(f"{option} {spec}: no such checkpoint file")
        return Path(spec), (str(spec),), str(spec)
    names = (spec,) if spec else tuple(search_order)
    for name in names:
        path = pretrained_checkpoint_path(output_folder, fold, name)
        if path is not None:
            return path, names, ""
    suffix = output_folder.name.split("__", 1)[-1]
    looked = ", ".join(str(output_folder.parent / f"{n}__{suffix}" / f"fold_{fold}") for n in names)
    return None, names, looked


def contribution_tasks(num_sequences: int) -> List[Tuple[Tuple[int, ...], int]]:
    """Every (non-empty source subset, target not in it), subsets ordered by size then index."""
    tasks = []
    for t in range(num_sequences):
        others = [s for s in range(num_sequences) if s != t]
        for r in range(1, len(others) + 1):
            for subset in itertools.combinations(others, r):
                tasks.append((subset, t))
    return tasks


class TSFSeq2SeqTrainer(TrainingEngine):
    trainer_name = "tsf_seq2seq"

    def __init__(self, *args: Any, pretrained_from: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        apply_optimizer_defaults(self, TSF_SEQ2SEQ_OPTIMIZER_DEFAULTS)
        self.loss_cfg = {**TSF_SEQ2SEQ_LOSS_DEFAULTS,
                         **{k: v for k, v in self.loss_settings.items() if not isinstance(v, dict)}}
        #: exponent of eq. 5's intensity-balanced L1 (0: plain L1), read once from the plans
        self.intensity_balance = intensity_balance_from_config(self.loss_cfg)
        self.pretrained_from = pretrained_from
        self.init_args["pretrained_from"] = pretrained_from

    # ----- set-up -------------------------------------------------------------------------------------------
    def find_pretrained(self) -> Path:
        """The backbone checkpoint: a path, a trainer name, or (None) seq2seq then vq_seq2seq."""
        path, names, looked = find_trained_checkpoint(self.output_folder, self.fold, self.pretrained_from,
                                                      TSF_PRETRAINED_SEARCH_ORDER, "--pretrained-from")
        if path is not None:
            return path
        dataset = self.output_folder.parent.name
        raise NnsynthError(f"tsf_seq2seq starts from a trained {' or '.join(names)} of the same dataset, fold and "
                           f"configuration, but none was found (looked in {looked}). Train one first, e.g. "
                           f"nnsynth_train {dataset} {names[0]} {self.fold} -c {self.configuration_name}")

    def make_network(self, kind: str) -> nn.Module:
        """TSFNet around an untrained backbone of ``kind`` ('seq2seq' or 'vq_seq2seq') built from the plans."""
        from nnsynth.networks.seq2seq import Seq2SeqNet
        from nnsynth.networks.tsf import TSFNet
        from nnsynth.networks.vq_seq2seq import VQSeq2SeqNet
        n, k = len(self.sequences), self.num_adjacent_slices
        if kind == "vq_seq2seq":
            backbone = VQSeq2SeqNet(n, k, self.spatial_dims, self.config["network"], self.config.get("vq", {}))
        elif kind == "seq2seq":
            backbone = Seq2SeqNet(n, k, self.spatial_dims, self.config["network"])
        else:
            raise NnsynthError(f"tsf_seq2seq builds on seq2seq or vq_seq2seq, not {kind!r}")
        self.backbone_kind = kind
        tsf = dict(self.config.get("tsf", {}) or {})
        if "omega_eps" in self.loss_cfg:          # the planner writes eq. 1's epsilon under loss.tsf_seq2seq
            tsf.setdefault("omega_eps", float(self.loss_cfg["omega_eps"]))
        return TSFNet(backbone, tsf)

    def build_network(self) -> nn.Module:
        path = self.find_pretrained()
        state = ckpt.load_checkpoint(path, "cpu")
        kind = state.get("trainer_name", "seq2seq")
        if list(state.get("sequences", self.sequences)) != self.sequences:
            raise NnsynthError(f"{path} was trained on sequences {state.get('sequences')}, these plans have "
                               f"{self.sequences}")
        if kind not in ("seq2seq", "vq_seq2seq"):
            raise NnsynthError(f"{path} holds a {kind!r} model; tsf_seq2seq builds on seq2seq or vq_seq2seq")
        net = self.make_network(kind)
        try:
            net.backbone.load_state_dict(state["network_weights"])
        except RuntimeError as e:
            raise NnsynthError(f"{path} does not fit the network of these plans ({e}); was it trained with other "
                               f"plans?") from e
        logger.info("TSF-Seq2Seq backbone: %s from %s (encoder frozen)", kind, path)
        self.backbone_path = str(path)
        net.freeze_encoder()
        return net

    def extra_state(self) -> Dict[str, Any]:
        return {"backbone_kind": getattr(self, "backbone_kind", None),
                "backbone_checkpoint": getattr(self, "backbone_path", None)}

    def load_for_inference(self, state: Dict[str, Any]) -> None:
        """Inference adapter: rebuild from the checkpoint alone (the backbone's own folder is not needed)."""
        kind = (state.get("extra") or {}).get("backbone_kind") or "seq2seq"
        net = self.make_network(kind)
        net.load_state_dict(state["network_weights"])
        net.freeze_encoder()
        self._network = net.to(self.device).eval()

    def initialize(self) -> None:
        if self.was_initialized:
            return
        super().initialize()
        self.perceptual = self.build_perceptual_loss(float(self.loss_cfg["lambda_perceptual"]))

    def build_sampler(self) -> MultiSequenceSampler:
        return self.multi_sequence_sampler(2)   # a task needs a target and at least one other sequence

    # ----- training -----------------------------------------------------------------------------------------
    @staticmethod
    def draw_tasks(available: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per row: a random available target and a random non-empty subset of the other available sequences."""
        b, n = available.shape
        sources = torch.zeros(b, n)
        targets = torch.zeros(b, dtype=torch.long)
        for i in range(b):
            av = available[i].nonzero(as_tuple=True)[0].tolist()
            t = av[int(torch.randint(len(av), (1,)))]
            others = [s for s in av if s != t]
            r = int(torch.randint(1, len(others) + 1, (1,)))
            chosen = [others[j] for j in torch.randperm(len(others))[:r].tolist()]
            sources[i, chosen] = 1.0
            targets[i] = t
        return sources, targets

    def _rec(self, pred: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Eq. 5's reconstruction term; L1 intensity-balanced like the Seq2Seq backbone's when the plans say so."""
        alpha = self.intensity_balance
        l1 = masked_l1(pred, target, intensity_balance_weights(target, alpha) if alpha > 0 else None)
        loss = float(self.loss_cfg["lambda_l1"]) * l1
        if self.perceptual is not None:
            loss = loss + float(self.loss_cfg["lambda_perceptual"]) * self.perceptual(pred.float(), target.float())
        return loss, l1

    def compute_loss(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, float]]:
        images, avail = batch["images"], batch["available"].bool().cpu()
        sources, targets = self.draw_tasks(avail)
        sources, targets = sources.to(images.device, images.dtype), targets.to(images.device)
        x_prime, x_prime_a, _ = self.train_network(images, sources, targets)
        truth = images[torch.arange(images.shape[0], device=images.device), targets]
        loss_plain, l1_plain = self._rec(x_prime, truth)
        loss_att, l1_att = self._rec(x_prime_a, truth)
        return loss_plain + loss_att, {"l1": float(l1_plain.detach()), "l1_attention": float(l1_att.detach())}

    # ----- synthesis ----------------------------------------------------------------------------------------
    def _stack(self, sources: Dict[int, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        any_src = next(iter(sources.values()))
        images = any_src.new_zeros((any_src.shape[0], len(self.sequences)) + tuple(any_src.shape[1:]))
        mask = any_src.new_zeros((any_src.shape[0], len(self.sequences)))
        for s, x in sources.items():
            images[:, int(s)] = x
            mask[:, int(s)] = 1.0
        return images, mask

    def predict(self, batch: Dict[str, Any]) -> torch.Tensor:
        """Validation pairs (one source each): X'_A."""
        src = batch["source"]
        images = src.new_zeros((src.shape[0], len(self.sequences)) + tuple(src.shape[1:]))
        rows = torch.arange(src.shape[0], device=src.device)
        images[rows, batch["source_idx"]] = src
        mask = F.one_hot(batch["source_idx"].long(), len(self.sequences)).to(src.dtype)
        return self.network(images, mask, batch["target_idx"])[1]

    def synthesize_with_tsem(self, sources: Dict[int, torch.Tensor], target: int
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(X'_A, TSEM = |X'_A - X'|) for source stacks ``{sequence index: (B, k, ...)}`` (eq. 6)."""
        from nnsynth.networks.tsf import tsem
        images, mask = self._stack(sources)
        tgt = torch.full((images.shape[0],), int(target), dtype=torch.long, device=images.device)
        x_prime, x_prime_a, _ = self.network(images, mask, tgt)
        return x_prime_a, tsem(x_prime, x_prime_a)

    def synthesize_slices(self, sources: Dict[int, torch.Tensor], target: int) -> torch.Tensor:
        return self.synthesize_with_tsem(sources, target)[0]

    def synthesize_with_maps(self, sources: Dict[int, torch.Tensor], target: int) -> Dict[str, torch.Tensor]:
        """Inference adapter hook for ``nnsynth_predict --save-maps``: the prediction and its TSEM (eq. 6)."""
        pred, m = self.synthesize_with_tsem(sources, target)
        return {"prediction": pred, "tsem": m}

    @torch.no_grad()
    def contribution_weights(self, sources: List[int], target: int) -> Dict[int, float]:
        """omega (eq. 2) of this source set for this target: {sequence index: weight}."""
        mask = torch.zeros(1, len(self.sequences), device=self.device)
        mask[0, [int(s) for s in sources]] = 1.0
        omega = self.network.omega(mask, torch.tensor([int(target)], device=self.device))[0]
        return {int(s): float(omega[int(s)]) for s in sources}

    def full_volume_method(self) -> str:
        return f"{super().full_volume_method()}, all sources fused (task-specific weights + hyper-CBAM)"

    # ----- explainability -------------------------------------------------------------------------------------
    @torch.no_grad()
    def sequence_contributions(self) -> List[Dict[str, Any]]:
        """omega (eq. 2) for every non-empty source subset x target not in it."""
        net = self.network
        rows = []
        for subset, t in contribution_tasks(len(self.sequences)):
            mask = torch.zeros(1, len(self.sequences), device=self.device)
            mask[0, list(subset)] = 1.0
            omega = net.omega(mask, torch.tensor([t], device=self.device))[0].cpu().tolist()
            rows.append({"target": self.sequences[t], "sources": "+".join(self.sequences[s] for s in subset),
                         **{f"omega_{name}": float(w) for name, w in zip(self.sequences, omega)}})
        return rows

    def write_contributions(self) -> None:
        rows = self.sequence_contributions()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        with atomic_path(self.fold_folder / CONTRIBUTIONS_CSV, suffix=".csv") as tmp:
            Path(tmp).write_text(buf.getvalue())
        plot_contributions(rows, self.sequences, self.fold_folder / CONTRIBUTIONS_PNG)
        logger.info("Sequence contributions (omega) -> %s, %s", self.fold_folder / CONTRIBUTIONS_CSV,
                    self.fold_folder / CONTRIBUTIONS_PNG)

    def final_validation(self) -> Optional[Dict[str, Any]]:
        summary = super().final_validation()
        if self.is_main:
            self.write_contributions()
        return summary


def plot_contributions(rows: List[Dict[str, Any]], sequences: List[str], path: Path) -> None:
    """One panel per target: stacked bars of omega over the source subsets (paper Fig. 3)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(sequences), figsize=(4.2 * len(sequences), 4.2), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, target in zip(axes[0], sequences):
        sub = [r for r in rows if r["target"] == target]
        x = np.arange(len(sub))
        bottom = np.zeros(len(sub))
        for si, name in enumerate(sequences):
            vals = np.array([r[f"omega_{name}"] for r in sub])
            if name != target:
                ax.bar(x, vals, bottom=bottom, color=colours(si % 10), label=name)
            bottom += vals
        ax.set_xticks(x)
        ax.set_xticklabels([r["sources"] for r in sub], rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 1.2)
        ax.set_title(f"target {target}")
        ax.set_ylabel("omega")
        ax.legend(fontsize=7, loc="upper center", ncol=3)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


__all__ = ["TSFSeq2SeqTrainer", "pretrained_checkpoint_path", "contribution_tasks", "plot_contributions",
           "TSF_SEQ2SEQ_LOSS_DEFAULTS", "TSF_SEQ2SEQ_OPTIMIZER_DEFAULTS"]
