"""``progress.png`` (loss, validation PSNR/SSIM, learning rate, epoch time) and validation preview PNGs.

matplotlib with the Agg backend: no display needed, nothing shown. Files are written atomically.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from nnsynth.utils.files import atomic_path

logger = logging.getLogger(__name__)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


# an extra progress panel: (left log key, left label, right log key or None, right label or None)
Panel = Tuple[str, str, Optional[str], Optional[str]]


def _panel(ax, logs: Dict[str, List[float]], left: str, left_label: str, right: Optional[str],
           right_label: Optional[str], colors: Tuple[str, str] = ("b", "r")) -> None:
    values = logs.get(left, [])
    ax.plot(np.arange(len(values)), values, color=colors[0], label=left_label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(left_label)
    ax.legend(loc="upper left")
    if right is not None:
        twin = ax.twinx()
        values = logs.get(right, [])
        twin.plot(np.arange(len(values)), values, color=colors[1], label=right_label)
        twin.set_ylabel(right_label or right)
        twin.legend(loc="upper right")


def plot_progress(logs: Dict[str, List[float]], path: Union[str, Path], extra_panels: Sequence[Panel] = ()) -> None:
    """Panels over epochs: train loss with val PSNR, val SSIM, learning rate with epoch time, then any
    trainer-specific ``extra_panels`` (e.g. codebook usage and perplexity)."""
    plt = _pyplot()
    panels: List[Tuple[Panel, Tuple[str, str]]] = [
        (("train_loss", "train loss", "val_psnr", "val PSNR (dB)"), ("b", "g")),
        (("val_ssim", "val SSIM", None, None), ("g", "g")),
        (("lr", "learning rate", "epoch_time", "epoch time (s)"), ("b", "r")),
    ] + [(tuple(p), ("m", "k")) for p in extra_panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.7 * len(panels)))
    for ax, (panel, colors) in zip(np.atleast_1d(axes), panels):
        _panel(ax, logs, *panel, colors=colors)
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
