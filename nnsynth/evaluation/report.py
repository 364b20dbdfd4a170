"""A small Markdown report of an evaluation: the metrics tables and one PNG montage per case.

People would rather look than read: each montage row shows a case's inputs, the synthesised target, the
truth and the absolute error on the axial slice with the most brain, every image mapped to [0, 1] by its own
P0.5/P99.5 inside the truth's brain mask (the CONTRACT.md section 5 convention used by the metrics).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np
import pandas as pd

from nnsynth.dataset.io import read_image
from nnsynth.evaluation.metrics import normalize_pair
from nnsynth.utils.files import atomic_path

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

REPORT_NAME = "report.md"
MONTAGE_FOLDER = "report_montages"
MAX_MONTAGE_CASES = 8


def _as_3d(a: np.ndarray) -> np.ndarray:
    return a[None] if a.ndim == 2 else a


def _best_slice(mask: np.ndarray) -> int:
    return int(np.argmax(mask.reshape(mask.shape[0], -1).sum(1)))


def _montage(case: str, target: str, ref_path: Path, pred_path: Path, inputs: Mapping[str, Path],
             out_png: Path) -> None:
    """Write one case's montage: inputs | synthesised | truth | |error|."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref, _ = read_image(ref_path)
    pred, _ = read_image(pred_path)
    ref, pred = _as_3d(ref), _as_3d(pred)
    ref01, pred01, mask = normalize_pair(ref, pred)
    z = _best_slice(mask)
    panels: List[tuple] = []
    for name, path in inputs.items():
        img, _ = read_image(path)
        img01, _, _ = normalize_pair(_as_3d(img), _as_3d(img), mask)
        panels.append((f"input {name}", img01[z], "gray", 1.0))
    panels += [(f"synthesised {target}", pred01[z], "gray", 1.0), (f"true {target}", ref01[z], "gray", 1.0),
               ("|error|", np.abs(pred01[z] - ref01[z]), "magma", 0.5)]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.8))
    for ax, (title, im, cmap, vmax) in zip(np.atleast_1d(axes), panels):
        ax.imshow(im, cmap=cmap, vmin=0, vmax=vmax, origin="lower")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{case} (axial slice {z})", fontsize=9)
    fig.tight_layout()
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_report(df: pd.DataFrame, summary: Dict[str, Any], reference_folder: PathLike,
                 prediction_folder: PathLike, output_folder: PathLike,
                 sources_folder: Optional[PathLike] = None, max_cases: int = MAX_MONTAGE_CASES) -> Path:
    """Write ``output_folder/report.md`` (+ montages) from ``evaluate_folders``' table and summary."""
    output_folder = Path(output_folder)
    metrics = [m for m in summary.get("metrics", []) if m in df.columns]
    lines = ["# nnsynth evaluation report", "",
             f"- predictions: `{prediction_folder}`", f"- reference: `{reference_folder}`",
             f"- metric convention: `{summary.get('profile')}` (see CONTRACT.md section 5)",
             f"- LPIPS: {summary.get('lpips')}", "", "## Mean (std) per task", "",
             "| task | n | " + " | ".join(metrics) + " |", "| --- | --- | " + " | ".join("---" for _ in metrics) + " |"]
    for task, s in summary.get("tasks", {}).items():
        cells = [f"{_fmt(s['mean'].get(m))} ({_fmt(s['std'].get(m))})" for m in metrics]
        lines.append(f"| {task} | {s['n']} | " + " | ".join(cells) + " |")
    lines += ["", "## Per case", "", "| case | task | " + " | ".join(metrics) + " |",
              "| --- | --- | " + " | ".join("---" for _ in metrics) + " |"]
    for _, row in df.iterrows():
        lines.append(f"| {row['case']} | {row['task']} | " + " | ".join(_fmt(row[m]) for m in metrics) + " |")
    if summary.get("problems"):
        lines += ["", "## Not evaluated", ""] + [f"- `{f}`: {why}" for f, why in summary["problems"].items()]

    from nnsynth.evaluation.evaluate import channel_names_for, list_images, read_prediction_records
    names = channel_names_for(None, read_prediction_records(prediction_folder), reference_folder)
    inputs_by_case: Dict[str, Dict[str, Path]] = {}
    if sources_folder is not None:
        for _, (case, cid, path) in sorted(list_images(sources_folder).items()):
            inputs_by_case.setdefault(case, {})[names.get(cid, f"{cid:04d}")] = path
    lines += ["", "## Montages", "",
              "Axial slice with the most brain; each image mapped to [0, 1] by its own P0.5/P99.5 inside the "
              "truth's brain mask; error shown up to 0.5.", ""]
    for i, (_, row) in enumerate(df.iterrows()):
        if i >= max_cases:
            lines.append(f"(montages of {len(df) - max_cases} more predictions left out)")
            break
        png = output_folder / MONTAGE_FOLDER / f"{Path(row['file']).name.split('.')[0]}.png"
        names = {n: p for n, p in inputs_by_case.get(row["case"], {}).items()}
        try:
            _montage(row["case"], row["target"], Path(reference_folder) / row["file"],
                     Path(prediction_folder) / row["file"], names, png)
        except Exception as e:  # noqa: BLE001 - a montage must never sink the report
            logger.warning("montage of %s failed: %s", row["file"], e)
            continue
        lines.append(f"![{row['case']} {row['task']}]({MONTAGE_FOLDER}/{png.name})")
        lines.append("")
    out = output_folder / REPORT_NAME
    with atomic_path(out, suffix=".md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    logger.info("Report written: %s", out)
    return out
