"""The benchmark helper that scores averaged predictions: its numbers back claims in documentation/benchmarks.md."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from nnsynth.dataset.io import Geometry, write_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import score_prediction_average  # noqa: E402


def _write(folder: Path, name: str, array: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    geometry = Geometry((2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), array.shape)
    write_image(array.astype(np.float32), geometry, folder / name)


def test_opposite_errors_cancel_in_the_average_and_matching_names_are_scored(tmp_path):
    rng = np.random.default_rng(0)
    truth = gaussian_filter(rng.random((10, 16, 14)), 1.5) + 0.5
    truth[:, :2] = 0                                   # background, outside the scored mask
    error = gaussian_filter(rng.standard_normal(truth.shape), 1.0) * 0.05 * (truth != 0)
    _write(tmp_path / "truth", "c1.nii.gz", truth)
    _write(tmp_path / "a", "c1.nii.gz", truth + error)
    _write(tmp_path / "b", "c1.nii.gz", truth - error)
    _write(tmp_path / "b", "only_b.nii.gz", truth)     # not in every folder: not scored

    res = score_prediction_average.score(tmp_path / "truth", [tmp_path / "a", tmp_path / "b"])

    assert res["images"] == ["c1.nii.gz"]
    assert math.isfinite(res["means"]["0"]["psnr"]) and math.isfinite(res["means"]["1"]["psnr"])
    assert res["means"]["mean"]["psnr"] > res["means"]["0"]["psnr"] + 20   # exact up to float32 rounding
    assert res["means"]["mean"]["mae"] < 1e-5 < res["means"]["0"]["mae"]
