"""Quantile calibration (nnsynth.inference.calibration): learned offsets, the monotone map, the predictor's use."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from helpers_model import trained  # noqa: F401  (fixture)
from nnsynth.evaluation.metrics import compute_metrics
from nnsynth.exceptions import NnsynthError
from nnsynth.inference.calibration import (CALIBRATION_FILE, CALIBRATION_PERCENTILES, CalibrationCollector,
                                           apply_calibration, load_offsets, save_calibration)


def _brain(rng: np.random.Generator):
    """A noisy 'truth' (smooth random anatomy, acquisition noise) and what an L1-trained network predicts for it:
    the same anatomy without the noise, slightly blurred, so its darkest and brightest voxels are less extreme."""
    from scipy import ndimage
    shape = (16, 48, 48)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    mask = np.sqrt(zz ** 2 + yy ** 2 + xx ** 2) < 0.95
    field = ndimage.gaussian_filter(rng.normal(0, 1, shape), 2.0)
    clean = 0.5 + 0.15 * np.tanh(field / field[mask].std())
    truth = clean + rng.normal(0, 0.05, shape)
    pred = ndimage.gaussian_filter(clean, 0.8)
    truth[~mask], pred[~mask] = 0, 0
    return truth.astype(np.float32), pred.astype(np.float32), mask


def test_zero_offsets_change_nothing_and_the_map_keeps_ranks():
    rng = np.random.default_rng(1)
    _, pred, mask = _brain(rng)
    pred = pred + rng.normal(0, 0.01, pred.shape).astype(np.float32) * mask
    same = apply_calibration(pred, mask, np.zeros(len(CALIBRATION_PERCENTILES)))
    assert np.allclose(same, pred, atol=1e-6)
    offsets = np.linspace(-0.05, 0.08, len(CALIBRATION_PERCENTILES))
    out = apply_calibration(pred, mask, offsets)
    order = np.argsort(pred[mask], kind="stable")
    assert np.all(np.diff(out[mask][order]) >= -1e-6)                        # monotone: ranks kept
    assert np.array_equal(out[~mask], pred[~mask])                           # background untouched
    # the anchors (the metric's 0.5th / 99.5th percentiles) stay where they were
    anchors = (CALIBRATION_PERCENTILES[0], CALIBRATION_PERCENTILES[-1])
    offsets[0] = offsets[-1] = 0
    out = apply_calibration(pred, mask, offsets)
    assert np.allclose(np.percentile(out[mask], anchors), np.percentile(pred[mask], anchors), atol=2e-3)
    with pytest.raises(NnsynthError):
        apply_calibration(pred, mask, offsets[:-1])


def test_learned_offsets_restore_the_scale_of_unseen_images():
    rng = np.random.default_rng(2)
    collector = CalibrationCollector()
    for _ in range(6):
        truth, pred, mask = _brain(rng)
        collector.add("Flair", pred, truth, mask)
    collector.add("T2", pred, np.ones_like(truth), mask)                      # a flat truth has no scale
    content = collector.result("test")
    assert set(content["per_target"]) == {"Flair"} and content["per_target"]["Flair"]["images"] == 6
    offsets = np.asarray(content["per_target"]["Flair"]["offsets"])
    # the anchors stay; the compressed tails pull the dark half up and the bright half down on the image's scale
    assert offsets[0] == offsets[-1] == 0
    assert offsets[1] > 0.05 and offsets[-2] < -0.05
    for _ in range(2):                                                        # new images
        truth, pred, mask = _brain(rng)
        calibrated = apply_calibration(pred, mask, offsets)
        before = compute_metrics(truth, pred, mask, compute_lpips=False)["psnr"]
        after = compute_metrics(truth, calibrated, mask, compute_lpips=False)["psnr"]
        assert after > before + 0.5, (before, after)


def test_offsets_of_several_folds(tmp_path):
    folds = [tmp_path / "fold_0", tmp_path / "fold_1"]
    n = len(CALIBRATION_PERCENTILES)
    for f, value, extra in zip(folds, (0.1, 0.3), ("T2", None)):
        per_target = {"Flair": {"offsets": [value] * n, "spread": [0.0] * n, "images": 3}}
        if extra:
            per_target[extra] = {"offsets": [0.2] * n, "spread": [0.0] * n, "images": 3}
        save_calibration({"percentiles": list(CALIBRATION_PERCENTILES), "per_target": per_target}, f)
    offsets = load_offsets(folds)
    assert set(offsets) == {"Flair"}                                          # only what every fold has
    assert np.allclose(offsets["Flair"], 0.2)
    (folds[1] / CALIBRATION_FILE).unlink()
    assert load_offsets(folds) == {}                                          # a fold without: no calibration
    save_calibration({"percentiles": [1.0, 50.0, 99.0], "per_target": {}}, folds[1])
    with pytest.raises(NnsynthError, match="no-calibration"):
        load_offsets(folds)


def test_predictor_applies_the_model_calibration(trained, tmp_path):
    """The same model with and without calibration.json / --no-calibration, through nnsynth_predict."""
    from nnsynth.cli import predict as predict_cli
    from nnsynth.dataset.io import read_image
    model = tmp_path / "model" / trained["model"].name
    shutil.copytree(trained["model"], model)
    case = sorted(p.name[:-12] for p in trained["imagesTs"].glob("*_0000.nii.gz"))[0]
    inp = tmp_path / "in"
    inp.mkdir()
    for cid in range(3):
        shutil.copyfile(trained["imagesTs"] / f"{case}_{cid:04d}.nii.gz", inp / f"{case}_{cid:04d}.nii.gz")

    def predict(name: str, *extra: str) -> np.ndarray:
        out = tmp_path / name
        assert predict_cli.cli(["-i", str(inp), "-o", str(out), "-t", "Flair", "-m", str(model), "--device", "cpu",
                                "-np", "0", "--no-progress", *extra]) == 0
        record = json.loads((out / "nnsynth_predictions.json").read_text())
        return read_image(out / f"{case}_0003.nii.gz")[0], record["calibrated_targets"]

    raw, targets = predict("raw")                                             # no calibration.json: as before
    assert targets == []
    offsets = np.linspace(-0.04, 0.06, len(CALIBRATION_PERCENTILES))
    save_calibration({"percentiles": list(CALIBRATION_PERCENTILES),
                      "per_target": {"Flair": {"offsets": offsets.tolist(), "images": 4}}}, model / "fold_0")
    calibrated, targets = predict("calibrated")
    assert targets == ["Flair"]
    mask = raw > 0
    assert np.abs(calibrated - raw).max() > 1e-3
    # the same monotone map: the voxels' order is kept
    order = np.argsort(raw[mask], kind="stable")
    assert np.all(np.diff(calibrated[mask][order]) >= -1e-5)
    off, targets = predict("off", "--no-calibration")
    assert targets == [] and np.array_equal(off, raw)
