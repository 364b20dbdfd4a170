"""LPIPS-style perceptual loss with weights found ONLY on the local disk.

Nothing here downloads: the torchvision trunk is built without weights and its state dict is loaded from a
local file (a user path, ``NNSYNTH_LPIPS_WEIGHTS`` / ``NNSYNTH_BACKBONE_WEIGHTS``, or the torch hub cache); the
LPIPS linear heads ship inside the ``lpips`` wheel. Without trunk weights the loss is unavailable: one log line
per process, and it returns 0 so callers can keep one code path.

Our images are single-channel in [0, 1] with k slices (2.5D) as channels: every slice is scored on its own,
replicated to 3 channels and scaled to [-1, 1]. 3D patches are scored slice-wise along the first spatial axis
(axial, array order z, y, x).
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnsynth.exceptions import NnsynthError

logger = logging.getLogger(__name__)

# --- module constants (listed in the hand-over; candidates for nnsynth/constants.py) ---------------
ENV_LPIPS_WEIGHTS = "NNSYNTH_LPIPS_WEIGHTS"
ENV_BACKBONE_WEIGHTS = "NNSYNTH_BACKBONE_WEIGHTS"
# torchvision's file names in the torch hub cache (the ones torchvision itself would have downloaded)
BACKBONE_WEIGHT_FILES: Dict[str, str] = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
}
LPIPS_MIN_SLICE_SIZE = 64   # AlexNet/VGG need a few pooling levels; smaller slices are upsampled to this
# -----------------------------------------------------------------------------------------------------

_WARNED: set = set()
_NET_ALIASES = {"alex": "alex", "alexnet": "alex", "vgg": "vgg", "vgg16": "vgg"}


def _net_name(name: str) -> str:
    key = _NET_ALIASES.get(str(name).lower())
    if key is None:
        raise NnsynthError(f"Unknown perceptual backbone {name!r}; use 'alex' or 'vgg' (vgg16)")
    return key


def _candidate(path: Union[str, Path], filename: str) -> Optional[Path]:
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir() and (p / filename).is_file():
        return p / filename
    return None


def find_backbone_weights(name: str = "alex", user_path: Optional[Union[str, Path]] = None) -> Optional[Path]:
    """Local trunk weights for ``name`` ('alex' or 'vgg'), or None. Looks only on disk, in this order:
    ``user_path`` (file, or folder holding torchvision's file name), ``$NNSYNTH_LPIPS_WEIGHTS``,
    ``$NNSYNTH_BACKBONE_WEIGHTS``, ``torch.hub.get_dir()/checkpoints/<torchvision file name>``."""
    net = _net_name(name)
    filename = BACKBONE_WEIGHT_FILES[net]
    if user_path is not None:
        found = _candidate(user_path, filename)
        if found is None:
            raise NnsynthError(f"Perceptual backbone weights not found at {user_path}: give the path of "
                               f"torchvision's {filename} or a folder holding it")
        return found
    for env in (ENV_LPIPS_WEIGHTS, ENV_BACKBONE_WEIGHTS):
        value = os.environ.get(env)
        if value:
            found = _candidate(value, filename)
            if found is not None:
                return found
            logger.debug("%s=%s does not hold %s", env, value, filename)
    hub = Path(torch.hub.get_dir()) / "checkpoints" / filename
    return hub if hub.is_file() else None


def _log_unavailable_once(net: str) -> None:
    if net in _WARNED:
        return
    _WARNED.add(net)
    logger.warning(
        "Perceptual loss / LPIPS is off: no local %s weights (%s). Put torchvision's file in %s or point %s to it; "
        "nnsynth never downloads weights.", net, BACKBONE_WEIGHT_FILES[net],
        Path(torch.hub.get_dir()) / "checkpoints", ENV_LPIPS_WEIGHTS)


def _build_lpips(net: str):
    """lpips.LPIPS with its linear heads from the wheel and a randomly initialised (not downloaded) trunk."""
    import lpips  # local import: pulls torchvision in

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # torchvision's deprecation of pretrained=False inside lpips
        # lpips' default loads its linear heads from files inside the wheel; pnet_rand keeps torchvision from
        # fetching the trunk (its weights are loaded from a local file afterwards, or the loss is off)
        return lpips.LPIPS(net=net, pnet_rand=True, verbose=False)


def _load_trunk(model: nn.Module, net: str, path: Path) -> None:
    """Copy torchvision ``features.<i>.*`` weights into lpips' ``net.slice<k>.<i>.*`` parameters."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file is a user problem
        raise NnsynthError(f"Could not read perceptual backbone weights {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    own = model.net.state_dict()
    mapped = {}
    for key in own:
        _, idx, kind = key.split(".", 2)             # sliceK.IDX.weight
        src = f"features.{idx}.{kind}"
        if src not in state or tuple(state[src].shape) != tuple(own[key].shape):
            raise NnsynthError(f"{path} is not torchvision {net} weights (missing or mismatched {src}); "
                               f"expected torchvision's {BACKBONE_WEIGHT_FILES[net]}")
        mapped[key] = state[src]
    model.net.load_state_dict(mapped, strict=True)


def slices_to_rgb(x: Tensor) -> Tensor:
    """(B, C, H, W) or (B, C, D, H, W) in [0, 1] -> (N, 3, H, W) in [-1, 1], one image per slice/channel."""
    if x.dim() == 5:
        x = x.permute(0, 2, 1, 3, 4).reshape(-1, 1, x.shape[3], x.shape[4])   # axial slices of every channel
    elif x.dim() == 4:
        x = x.reshape(-1, 1, x.shape[2], x.shape[3])
    else:
        raise ValueError(f"perceptual loss expects (B, C, H, W) or (B, C, D, H, W), got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if min(h, w) < LPIPS_MIN_SLICE_SIZE:
        scale = LPIPS_MIN_SLICE_SIZE / min(h, w)
        x = F.interpolate(x, size=(max(LPIPS_MIN_SLICE_SIZE, round(h * scale)),
                                   max(LPIPS_MIN_SLICE_SIZE, round(w * scale))), mode="bilinear",
                          align_corners=False)
    return (x * 2.0 - 1.0).expand(-1, 3, -1, -1)


class PerceptualLoss(nn.Module):
    """LPIPS distance between prediction and target (both in [0, 1]), averaged over slices and batch.

    ``available`` is False when no local trunk weights exist; the loss then returns 0. ``random_trunk=True``
    uses a randomly initialised trunk (tests only: values are not LPIPS)."""

    def __init__(self, net: str = "alex", weights_path: Optional[Union[str, Path]] = None,
                 random_trunk: bool = False) -> None:
        super().__init__()
        self.net_name = _net_name(net)
        self.random_trunk = bool(random_trunk)
        self.weights_path: Optional[Path] = None
        self.model: Optional[nn.Module] = None
        if not random_trunk:
            self.weights_path = find_backbone_weights(self.net_name, weights_path)
            if self.weights_path is None:
                _log_unavailable_once(self.net_name)
                return
        self.model = _build_lpips(self.net_name)
        if self.weights_path is not None:
            _load_trunk(self.model, self.net_name, self.weights_path)
            logger.info("Perceptual loss: LPIPS (%s) with trunk weights %s", self.net_name, self.weights_path)
        else:
            logger.debug("Perceptual loss with a RANDOM %s trunk (tests only)", self.net_name)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    @property
    def available(self) -> bool:
        return self.model is not None

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        if self.model is not None:
            self.model.eval()       # frozen network: no dropout in the LPIPS heads, ever
        return self

    def per_slice(self, pred: Tensor, target: Tensor) -> Tensor:
        """LPIPS of every slice: (N,) with N = B * C (2D) or B * C * D (3D)."""
        if self.model is None:
            raise RuntimeError("PerceptualLoss is unavailable (no local weights); check .available first")
        if pred.shape != target.shape:
            raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
        a, b = slices_to_rgb(pred), slices_to_rgb(target)
        dtype = next(self.model.parameters()).dtype
        return self.model(a.to(dtype), b.to(dtype)).reshape(-1)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        if self.model is None:
            return pred.new_zeros(())
        return self.per_slice(pred, target).mean()


__all__ = ["PerceptualLoss", "find_backbone_weights", "slices_to_rgb", "ENV_LPIPS_WEIGHTS", "ENV_BACKBONE_WEIGHTS",
           "BACKBONE_WEIGHT_FILES"]
