"""Vector quantisation for VQ-Seq2Seq (paper ``vq_seq2seq_common_latent_space.md``, sec. 2.1, eq. 1-2).

``VectorQuantizer`` sits between the Seq2Seq encoder E and the HyperDecoder G:

    h = E(x)  (C channels)  --1x1 conv-->  z_e (D channels)  --nearest code (eq. 1)-->  z_q
    z_q (straight-through)  --1x1 conv-->  C channels  -->  G

Eq. 2 loss, placed as in the paper (not taming's legacy placement, which puts beta on the codebook term):

    L_vq = || sg[z_e] - z_q ||^2  +  beta * || sg[z_q] - z_e ||^2,    beta = 0.25

(mean over elements). The straight-through estimator passes the gradient w.r.t. z_q unchanged to z_e.

Plain VQ collapses easily (few codes used), so the quantiser keeps its codebook healthy:

- initialisation from encoder outputs on the first training batch (k-means++ seeding + a few Lloyd steps,
  or ``init="random"``: random encoder vectors);
- dead-code restart: an exponential moving average of each code's usage count per training step; codes whose
  EMA falls below ``dead_code_threshold * min(1, n / K)`` (n = latent vectors in the step) are re-seeded from
  random encoder outputs of the current batch (the ``min(1, n/K)`` factor keeps the rule meaningful when a
  step holds fewer vectors than there are codes);
- usage (fraction of codes used) and perplexity (``exp(entropy)`` of the code histogram; K for a uniform
  assignment) per step and accumulated over an epoch (``epoch_statistics``);
- ``codebook_update``: ``"gradient"`` trains the codes through eq. 2's codebook term (the paper); ``"ema"`` makes
  each code the exponential moving average of the encoder vectors assigned to it (the VQ-VAE paper's
  alternative, van den Oord et al. 2017, appendix; decay ``codebook_ema_decay``) and eq. 2 then trains only the
  encoder (its commitment term; the codebook term is still reported). Why: Adam moves a code by about ``lr`` per
  step whatever its distance to its vectors, so when other losses move the encoder quickly (VQ-Seq2Seq's latent
  consistency) the codes trail behind, eq. 2 grows a hundredfold and the decoder reads codes far from the
  encoder's vectors; a moving average follows the vectors at any speed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnsynth.exceptions import PlansError

logger = logging.getLogger(__name__)

# --- module constants (paper values and codebook-health defaults; the plans' "vq" entry overrides them) -------
VQ_DEFAULTS: Dict[str, object] = {
    "latent_dim": 3,              # D, paper's best for synthesis
    "codebook_size": 256,         # K, paper's best for synthesis (16 for segmentation)
    "beta": 0.25,                 # eq. 2 commitment weight
    "init": "kmeans",             # "kmeans" (k-means++ + Lloyd on encoder outputs), "random" (encoder vectors), "none"
    "kmeans_iters": 10,
    "dead_code_restart": True,
    "dead_code_ema_decay": 0.99,
    "dead_code_threshold": 1.0,   # EMA usage per step below threshold * min(1, n / K) -> restart
    "codebook_lr_scale": 1.0,     # codebook = scale * stored parameter: x scale the codebook's Adam step size
    "codebook_update": "gradient",  # "gradient" (eq. 2, the paper) or "ema" (moving average of assigned vectors)
    "codebook_ema_decay": 0.99,   # decay of the "ema" update (VQ-VAE paper: 0.99)
}
CODEBOOK_UPDATES = ("gradient", "ema")
VQ_EMA_EPSILON = 1e-5             # Laplace smoothing of the "ema" cluster sizes (no division by zero)
VQ_INIT_MAX_VECTORS = 20000       # encoder vectors used for the codebook initialisation (subsampled)
VQ_RESTART_NOISE = 1e-3           # relative jitter added to re-seeded codes so duplicates separate
VQ_DISTANCE_CHUNK = 65536         # latent vectors per chunk in the nearest-code search (bounds memory)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class VQOutput:
    """Result of quantising one batch of latent maps (channels-first, D channels)."""

    z_e: Tensor          # continuous latent (B, D, *S)
    z_q: Tensor          # quantised latent with the straight-through estimator: z_e + sg[z_q - z_e]
    indices: Tensor      # (B, *S) code index per position
    loss: Tensor         # eq. 2 (codebook + beta * commitment), scalar
    perplexity: Tensor   # exp(entropy) of this batch's code histogram, scalar
    usage: Tensor        # fraction of codes used in this batch, scalar


def perplexity_from_counts(counts: Tensor) -> Tensor:
    """exp(-sum p log p) of a code histogram; equals K when all K codes are used equally often."""
    total = counts.sum()
    if float(total) <= 0:
        return counts.new_zeros(())
    p = counts.float() / total
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()
    return torch.exp(entropy)


def vq_loss(z_e: Tensor, z_q: Tensor, beta: float) -> Tensor:
    """Eq. 2 without the reconstruction term: ``mse(sg[z_e], z_q) + beta * mse(sg[z_q], z_e)``."""
    return F.mse_loss(z_q, z_e.detach()) + float(beta) * F.mse_loss(z_e, z_q.detach())


def straight_through(z_e: Tensor, z_q: Tensor) -> Tensor:
    """``z_e + sg[z_q - z_e]``: the value of z_q, the gradient of z_e (identity)."""
    return z_e + (z_q - z_e).detach()


def kmeans_plus_plus(vectors: Tensor, k: int, iters: int = 10, generator: Optional[torch.Generator] = None) -> Tensor:
    """k-means++ seeding followed by ``iters`` Lloyd steps on (n, D) vectors -> (k, D) centres.

    With fewer distinct vectors than k, the remaining centres are random vectors plus a small jitter."""
    n = vectors.shape[0]
    x = vectors.float()
    centres = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = int(torch.randint(n, (1,), generator=generator, device="cpu"))
    centres[0] = x[first]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for i in range(1, k):
        total = float(d2.sum())
        if total <= 0:   # every vector is already a centre: fill with jittered random vectors
            idx = torch.randint(n, (k - i,), generator=generator, device="cpu").to(x.device)
            scale = x.std().clamp_min(1e-3) * VQ_RESTART_NOISE
            noise = torch.randn(k - i, x.shape[1], generator=generator, device="cpu").to(x.device, x.dtype)
            centres[i:] = x[idx] + noise * scale
            break
        probs = (d2 / total).cpu()
        pick = int(torch.multinomial(probs, 1, generator=generator))
        centres[i] = x[pick]
        d2 = torch.minimum(d2, ((x - centres[i]) ** 2).sum(1))
    for _ in range(int(iters)):
        assign = torch.cdist(x, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        used = counts > 0
        centres[used] = sums[used] / counts[used, None]   # empty clusters keep their centre
    return centres


class VectorQuantizer(nn.Module):
    """1x1 conv to D, nearest of K codes (eq. 1) with eq. 2 loss and straight-through gradient, 1x1 conv back.

    ``forward(h)`` returns ``(features_for_decoder, VQOutput)``. In training mode the first call initialises the
    codebook from encoder outputs (``init``), and every call updates the usage EMA and restarts dead codes
    (``dead_code_restart``). See the module docstring."""

    def __init__(self, in_channels: int, latent_dim: int = 3, codebook_size: int = 256, spatial_dims: int = 2,
                 beta: float = 0.25, init: str = "kmeans", kmeans_iters: int = 10, dead_code_restart: bool = True,
                 dead_code_ema_decay: float = 0.99, dead_code_threshold: float = 1.0,
                 codebook_lr_scale: float = 1.0, codebook_update: str = "gradient",
                 codebook_ema_decay: float = 0.99) -> None:
        super().__init__()
        problems = []
        if int(latent_dim) < 1:
            problems.append(f"vq.latent_dim must be >= 1, got {latent_dim}")
        if int(codebook_size) < 2:
            problems.append(f"vq.codebook_size must be >= 2, got {codebook_size}")
        if float(beta) < 0:
            problems.append(f"vq.beta must be >= 0, got {beta}")
        if init not in ("kmeans", "random", "none"):
            problems.append(f"vq.init must be 'kmeans', 'random' or 'none', got {init!r}")
        if not 0.0 <= float(dead_code_ema_decay) < 1.0:
            problems.append(f"vq.dead_code_ema_decay must be in [0, 1), got {dead_code_ema_decay}")
        if float(codebook_lr_scale) <= 0:
            problems.append(f"vq.codebook_lr_scale must be > 0, got {codebook_lr_scale}")
        if codebook_update not in CODEBOOK_UPDATES:
            problems.append(f"vq.codebook_update must be one of {CODEBOOK_UPDATES}, got {codebook_update!r}")
        if not 0.0 <= float(codebook_ema_decay) < 1.0:
            problems.append(f"vq.codebook_ema_decay must be in [0, 1), got {codebook_ema_decay}")
        if spatial_dims not in (1, 2, 3):
            problems.append(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        if problems:
            raise PlansError("Invalid VQ settings in the plans:\n" + "\n".join(f"  - {p}" for p in problems))
        self.in_channels, self.latent_dim, self.codebook_size = int(in_channels), int(latent_dim), int(codebook_size)
        self.spatial_dims, self.beta = int(spatial_dims), float(beta)
        self.init_method, self.kmeans_iters = init, int(kmeans_iters)
        self.dead_code_restart = bool(dead_code_restart)
        self.ema_decay, self.dead_threshold = float(dead_code_ema_decay), float(dead_code_threshold)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[self.spatial_dims]
        self.pre = conv(self.in_channels, self.latent_dim, 1)
        self.post = conv(self.latent_dim, self.in_channels, 1)
        # Adam moves a parameter by about lr per step whatever the gradient's size, so codes trained through eq. 2
        # can trail a fast-moving encoder; storing codebook / scale makes the codes' steps ``scale`` times larger.
        self.codebook_lr_scale = float(codebook_lr_scale)
        self.codebook_param = nn.Parameter(torch.empty(self.codebook_size, self.latent_dim))
        nn.init.uniform_(self.codebook_param, -1.0 / self.codebook_size / self.codebook_lr_scale,
                         1.0 / self.codebook_size / self.codebook_lr_scale)
        self.register_buffer("initialized", torch.tensor(init == "none"))
        self.register_buffer("ema_count", torch.zeros(self.codebook_size))
        self.register_buffer("epoch_count", torch.zeros(self.codebook_size, dtype=torch.float64))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))
        self.codebook_update, self.codebook_ema_decay = str(codebook_update), float(codebook_ema_decay)
        if self.codebook_update == "ema":
            # moving averages of each code's cluster size and vector sum; the code is their ratio
            self.codebook_param.requires_grad_(False)
            self.register_buffer("ema_cluster_size", torch.zeros(self.codebook_size))
            self.register_buffer("ema_vector_sum", torch.zeros(self.codebook_size, self.latent_dim))

    @classmethod
    def from_config(cls, in_channels: int, spatial_dims: int, vq: Optional[Dict[str, object]] = None
                    ) -> "VectorQuantizer":
        """From the plans' ``vq`` dict; ``VQ_DEFAULTS`` fill missing keys."""
        cfg = {**VQ_DEFAULTS, **{k: v for k, v in (vq or {}).items() if k in VQ_DEFAULTS}}
        return cls(in_channels, int(cfg["latent_dim"]), int(cfg["codebook_size"]), spatial_dims,
                   float(cfg["beta"]), str(cfg["init"]), int(cfg["kmeans_iters"]), bool(cfg["dead_code_restart"]),
                   float(cfg["dead_code_ema_decay"]), float(cfg["dead_code_threshold"]),
                   float(cfg["codebook_lr_scale"]), str(cfg["codebook_update"]), float(cfg["codebook_ema_decay"]))

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, latent_dim={self.latent_dim}, codebook_size={self.codebook_size}, "
                f"beta={self.beta}, init={self.init_method}, dead_code_restart={self.dead_code_restart}, "
                f"codebook_update={self.codebook_update}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints that stored the code vectors themselves as ``codebook`` load into ``codebook_param``."""
        old = prefix + "codebook"
        if old in state_dict and prefix + "codebook_param" not in state_dict:
            state_dict[prefix + "codebook_param"] = state_dict.pop(old) / self.codebook_lr_scale
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----- helpers --------------------------------------------------------------------------------------------
    @property
    def codebook(self) -> Tensor:
        """The K x D code vectors (``codebook_lr_scale * codebook_param``)."""
        return self.codebook_param * self.codebook_lr_scale

    def _set_codes(self, rows, values: Tensor, weight: float = 1.0) -> None:
        """Overwrite codes ``rows``; with the "ema" update their averages restart at ``values`` with ``weight``
        vectors' worth of history."""
        with torch.no_grad():
            self.codebook_param.data[rows] = (values / self.codebook_lr_scale).to(self.codebook_param.dtype)
            if self.codebook_update == "ema":
                self.ema_cluster_size[rows] = float(weight)
                self.ema_vector_sum[rows] = values.to(self.ema_vector_sum.dtype) * float(weight)

    @staticmethod
    def _flatten(z: Tensor) -> Tensor:
        """(B, D, *S) -> (B * prod(S), D)."""
        return z.movedim(1, -1).reshape(-1, z.shape[1])

    def nearest_codes(self, flat: Tensor) -> Tensor:
        """Index of the nearest code (eq. 1, Euclidean) for each row of (n, D), chunked to bound memory."""
        codebook = self.codebook.detach().float()
        c2 = (codebook ** 2).sum(1)
        out = []
        for chunk in flat.detach().float().split(VQ_DISTANCE_CHUNK):
            d = (chunk ** 2).sum(1, keepdim=True) - 2.0 * chunk @ codebook.t() + c2[None]
            out.append(d.argmin(1))
        return torch.cat(out) if out else flat.new_zeros((0,), dtype=torch.long)

    def lookup(self, indices: Tensor) -> Tensor:
        """Code vectors for an index map (B, *S) -> (B, D, *S)."""
        return F.embedding(indices, self.codebook).movedim(-1, 1)

    @torch.no_grad()
    def initialize_codebook(self, flat: Tensor) -> None:
        """Codebook from encoder outputs (n, D): k-means++ (+ Lloyd) or random vectors."""
        x = flat.detach().float()
        if x.shape[0] > VQ_INIT_MAX_VECTORS:
            x = x[torch.randperm(x.shape[0], device="cpu")[:VQ_INIT_MAX_VECTORS].to(x.device)]
        if self.init_method == "kmeans":
            centres = kmeans_plus_plus(x, self.codebook_size, self.kmeans_iters)
        else:
            idx = torch.randint(x.shape[0], (self.codebook_size,), device="cpu").to(x.device)
            centres = x[idx] + torch.randn(self.codebook_size, x.shape[1], device=x.device) * (
                x.std().clamp_min(1e-3) * VQ_RESTART_NOISE)
        self._set_codes(slice(None), centres)
        self.initialized.fill_(True)
        self._sync_codebook()
        logger.info("VQ codebook initialised from %d encoder vectors (%s)", x.shape[0], self.init_method)

    def _threshold(self, n: int) -> float:
        return self.dead_threshold * min(1.0, n / float(self.codebook_size))

    @torch.no_grad()
    def restart_dead_codes(self, flat: Tensor) -> int:
        """Re-seed codes whose usage EMA is below the threshold from random encoder vectors; returns how many."""
        dead = self.ema_count < self._threshold(flat.shape[0])
        n_dead = int(dead.sum())
        if n_dead == 0 or flat.shape[0] == 0:
            return 0
        x = flat.detach().float()
        idx = torch.randint(x.shape[0], (n_dead,), device="cpu").to(x.device)
        noise = torch.randn(n_dead, x.shape[1], device=x.device) * (x.std().clamp_min(1e-3) * VQ_RESTART_NOISE)
        # a grace period: revived codes start at twice the threshold
        grace = 2.0 * max(self._threshold(flat.shape[0]), 1e-3)
        self._set_codes(dead, x[idx] + noise, weight=grace)
        self.ema_count[dead] = grace
        self.restarts += n_dead
        self._sync_codebook()
        return n_dead

    def _sync_codebook(self) -> None:
        """With DDP every rank must hold the same codebook: rank 0's wins."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(self.codebook_param.data, 0)

    @torch.no_grad()
    def _update_usage(self, counts: Tensor, flat: Tensor) -> None:
        """Epoch histogram, usage EMA and dead-code restarts from this step's (all-reduced) code counts."""
        self.epoch_count += counts.to(self.epoch_count.dtype)
        if float(self.ema_count.sum()) == 0.0:     # first step: start every code at its observed count
            self.ema_count.copy_(torch.maximum(counts, torch.full_like(counts, 2.0 * self._threshold(flat.shape[0]))))
        else:
            self.ema_count.mul_(self.ema_decay).add_(counts, alpha=1.0 - self.ema_decay)
        if self.dead_code_restart:
            self.restart_dead_codes(flat)

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, indices: Tensor, counts: Tensor) -> None:
        """The "ema" codebook update: each code moves to the moving average of the vectors assigned to it."""
        x = flat.detach().float()
        sums = torch.zeros(self.codebook_size, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, indices, x)
        counts = counts.to(x.dtype)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)   # the counts arrive reduced
        d = self.codebook_ema_decay
        self.ema_cluster_size.mul_(d).add_(counts, alpha=1.0 - d)
        self.ema_vector_sum.mul_(d).add_(sums, alpha=1.0 - d)
        n = self.ema_cluster_size.sum()
        size = (self.ema_cluster_size + VQ_EMA_EPSILON) / (n + self.codebook_size * VQ_EMA_EPSILON) * n
        self.codebook_param.data.copy_((self.ema_vector_sum / size[:, None] / self.codebook_lr_scale)
                                       .to(self.codebook_param.dtype))

    def reset_epoch_statistics(self) -> None:
        self.epoch_count.zero_()

    def epoch_statistics(self) -> Dict[str, float]:
        """Usage (fraction of codes used) and perplexity of the training assignments since the last reset."""
        counts = self.epoch_count
        if float(counts.sum()) == 0:
            return {"codebook_usage": float("nan"), "codebook_perplexity": float("nan")}
        return {"codebook_usage": float((counts > 0).float().mean()),
                "codebook_perplexity": float(perplexity_from_counts(counts))}

    # ----- forward --------------------------------------------------------------------------------------------
    def to_latent(self, h: Tensor) -> Tensor:
        """z_e = 1x1 conv of the encoder features: (B, C, *S) -> (B, D, *S)."""
        return self.pre(h)

    def to_features(self, z: Tensor) -> Tensor:
        """1x1 conv back to the decoder's channels: (B, D, *S) -> (B, C, *S)."""
        return self.post(z)

    def quantize(self, z_e: Tensor) -> VQOutput:
        """Eq. 1 + eq. 2 on a latent map z_e (B, D, *S); health updates in training mode."""
        flat = self._flatten(z_e)
        if self.training and not bool(self.initialized):
            self.initialize_codebook(flat)
        indices = self.nearest_codes(flat)
        counts = torch.bincount(indices, minlength=self.codebook_size).to(torch.float32)
        z_q_raw = self.lookup(indices.reshape(z_e.shape[0], *z_e.shape[2:])).to(z_e.dtype)
        loss = vq_loss(z_e, z_q_raw, self.beta)
        out = VQOutput(z_e=z_e, z_q=straight_through(z_e, z_q_raw),
                       indices=indices.reshape(z_e.shape[0], *z_e.shape[2:]), loss=loss,
                       perplexity=perplexity_from_counts(counts), usage=(counts > 0).float().mean())
        if self.training:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(counts)
            if self.codebook_update == "ema":
                self._ema_update(flat, indices, counts)
            self._update_usage(counts, flat)   # after the average: restarted codes keep their new values
        return out

    def forward(self, h: Tensor):
        """h (B, C, *S) -> (post(z_q) for the decoder, VQOutput)."""
        out = self.quantize(self.to_latent(h))
        return self.to_features(out.z_q), out


__all__ = ["VectorQuantizer", "VQOutput", "VQ_DEFAULTS", "CODEBOOK_UPDATES", "vq_loss", "straight_through",
           "perplexity_from_counts", "kmeans_plus_plus"]
