"""``progress.png`` (loss, validation PSNR/SSIM, learning rate, epoch time) and validation preview PNGs.

matplotlib with the Agg backend: no display needed, nothing shown. Files are written atomically.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np

from nnsynth.utils.files import atomic_path

logger = logging.getLogger(__name__)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def plot_progress(logs: Dict[str, List[float]], path: Union[str, Path]) -> None:
    """Three panels over epochs: losses (+ val PSNR on a twin axis), SSIM, learning rate and epoch time."""
    plt = _pyplot()
    epochs = np.arange(len(logs.get("train_loss", [])))
    fig, axes = plt.subplots(3, 1, figsize=(10, 11))
    ax = axes[0]
    ax.plot(epochs, logs.get("train_loss", []), color="b", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(loc="upper left")
    ax2 = ax.twinx()
    ax2.plot(epochs, logs.get("val_psnr", []), color="g", label="val PSNR (dB)")
    ax2.set_ylabel("PSNR (dB)")
    ax2.legend(loc="upper right")
    axes[1].plot(epochs, logs.get("val_ssim", []), color="g", label="val SSIM")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("SSIM")
    axes[1].legend(loc="lower right")
    ax = axes[2]
    ax.plot(epochs, logs.get("lr", []), color="b", label="learning rate")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.legend(loc="upper left")
    ax3 = ax.twinx()
    ax3.plot(epochs, logs.get("epoch_time", []), color="r", label="epoch time (s)")
    ax3.set_ylabel("seconds")
    ax3.legend(loc="upper right")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def save_preview(rows: Sequence[Tuple[str, Dict[str, np.ndarray]]], path: Union[str, Path]) -> None:
    """One row per example: its title and ``{panel name: 2D image}`` (sources, prediction, target, |error|)."""
    if not rows:
        return
    plt = _pyplot()
    ncols = max(len(panels) for _, panels in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.2 * ncols, 2.4 * len(rows)), squeeze=False)
    for r, (title, panels) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(panels):
                continue
            name, img = list(panels.items())[c]
            ax.imshow(np.asarray(img, dtype=np.float32), cmap="magma" if "error" in name else "gray",
                      vmin=0.0, vmax=1.0 if "error" not in name else 0.5)
            ax.set_title(f"{title}\n{name}" if c == 0 else name, fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
