"""Does averaging several models' predictions help? Score each prediction folder and their voxelwise mean.

Averaging independently trained models (or the views of one) only helps where their errors differ; where
every model makes the same error, the mean scores like its members. This scores each folder and the mean of
all of them per CONTRACT.md section 5 (each image scaled by its own 0.5/99.5 percentiles inside the truth's
nonzero mask) against a truth folder. Files are matched by name; only names present in every folder and in
the truth are scored. The predictions must share one intensity space (nnsynth writes synthesised sequences in
its normalised [0, 1] space), which is what makes their mean meaningful.

    python benchmarks/score_prediction_average.py --truth RAW/Dataset501_BrainDemo/imagesTs_truth \\
        RUN1/predict_out RUN2/predict_out [--json out.json]
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from nnsynth.constants import SUPPORTED_FILE_ENDINGS
from nnsynth.dataset.io import read_image
from nnsynth.evaluation.metrics import compute_metrics
from nnsynth.utils.files import save_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from intensity_lookup_baseline import METRICS, _mean  # noqa: E402

logger = logging.getLogger("nnsynth.benchmarks.average")


def common_names(truth: Path, folders: Sequence[Path]) -> List[str]:
    """Image file names present in every prediction folder and in the truth folder."""
    names = None
    for folder in folders:
        here = {p.name for p in folder.iterdir() if p.name.endswith(SUPPORTED_FILE_ENDINGS)}
        names = here if names is None else names & here
    return sorted(n for n in (names or set()) if (truth / n).is_file())


def score(truth: Path, folders: Sequence[Path]) -> Dict[str, object]:
    """Per-image and mean metrics of each folder (by index) and of their voxelwise mean (``"mean"``)."""
    names = common_names(truth, folders)
    if not names:
        raise SystemExit(f"No image name is present in all of {', '.join(map(str, folders))} and in {truth}")
    rows: Dict[str, List[Dict[str, float]]] = {str(i): [] for i in range(len(folders))}
    rows["mean"] = []
    for name in names:
        ref = read_image(truth / name)[0]
        preds = [read_image(f / name)[0].astype(np.float64) for f in folders]
        for key, pred in [(str(i), p) for i, p in enumerate(preds)] + [("mean", np.mean(preds, axis=0))]:
            m = compute_metrics(ref, pred, None, compute_lpips=False)
            rows[key].append({"image": name, **{k: float(m[k]) for k in METRICS}})
    means = {key: _mean(rs) for key, rs in rows.items()}
    return {"folders": [str(f) for f in folders], "images": names, "per_image": rows, "means": means}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="prediction folders (one per model or view)")
    p.add_argument("--truth", type=Path, required=True, help="folder with the reference images, same file names")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for f in [a.truth, *a.folders]:
        if not f.is_dir():
            raise SystemExit(f"{f} is not a folder")
    res = score(a.truth, a.folders)
    for key, m in res["means"].items():
        label = f"average of {len(a.folders)}" if key == "mean" else str(a.folders[int(key)])
        logger.info("%-60s PSNR %.2f dB  SSIM %.3f  MAE %.4f  (%d images)", label, m["psnr"], m["ssim"], m["mae"],
                    len(res["images"]))
    if a.json is not None:
        save_json(res, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
