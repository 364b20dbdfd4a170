"""Metrics follow CONTRACT.md section 5 exactly (checked against numpy/skimage written out by hand)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from nnsynth.evaluation import compute_metrics, mae, normalize_pair, psnr, ssim
from nnsynth.evaluation.metrics import available_profiles, lpips_score
from nnsynth.exceptions import NnsynthError
from nnsynth.losses import PerceptualLoss

torch.set_num_threads(2)


def _brain(shape=(18, 36, 32), seed=0):
    rng = np.random.default_rng(seed)
    ref = gaussian_filter(rng.random(shape), 2) * 800 + 100
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    ref[(zz ** 2 + yy ** 2 / 0.6 + xx ** 2 / 0.5) > 0.8] = 0
    pred = 3.0 * ref + 40 * gaussian_filter(rng.standard_normal(shape), 1) + 5.0   # other scale, noise, offset
    pred[:, :2] = 7.0                                                               # junk outside the brain
    return ref, pred


def _by_hand(ref, pred):
    m = ref != 0
    out = []
    for x in (ref, pred):
        lo, hi = np.percentile(x[m], [0.5, 99.5])
        y = np.clip((x - lo) / (hi - lo), 0, 1)
        y[~m] = 0
        out.append(y)
    return out[0], out[1], m


def test_normalize_pair_uses_own_percentiles_inside_reference_mask():
    ref, pred = _brain()
    r, p, m = normalize_pair(ref, pred)
    er, ep, em = _by_hand(ref, pred)
    np.testing.assert_allclose(r, er)
    np.testing.assert_allclose(p, ep)
    assert (m == em).all() and r.min() == 0 and r.max() == 1 and (p[~m] == 0).all()


def test_metrics_against_numpy_and_skimage():
    ref, pred = _brain()
    er, ep, m = _by_hand(ref, pred)
    res = compute_metrics(ref, pred, compute_lpips=False)
    assert set(res) == {"psnr", "ssim", "mae", "lpips"} and res["lpips"] is None
    mse = np.mean((er[m] - ep[m]) ** 2)
    assert abs(res["psnr"] - 10 * math.log10(1 / mse)) < 1e-9
    assert abs(res["psnr"] - peak_signal_noise_ratio(er[m], ep[m], data_range=1)) < 1e-9
    zs, ys, xs = np.nonzero(m)
    box = (slice(zs.min(), zs.max() + 1), slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    assert abs(res["ssim"] - structural_similarity(er[box], ep[box], data_range=1.0)) < 1e-12
    assert abs(res["mae"] - np.abs(er - ep)[m].mean()) < 1e-12
    # an affine rescaling of the prediction changes nothing (own percentiles), a worse prediction scores worse
    res2 = compute_metrics(ref, 0.5 * pred + 3, compute_lpips=False)
    assert abs(res2["psnr"] - res["psnr"]) < 1e-6
    worse = compute_metrics(ref, pred + 300 * np.random.default_rng(1).random(pred.shape), compute_lpips=False)
    assert worse["psnr"] < res["psnr"] and worse["ssim"] < res["ssim"] and worse["mae"] > res["mae"]


def test_identical_and_2d_and_errors():
    ref, _ = _brain()
    same = compute_metrics(ref, ref.copy(), compute_lpips=False)
    assert same["psnr"] == float("inf") and abs(same["ssim"] - 1) < 1e-12 and same["mae"] == 0
    ref2, pred2 = ref[9], _brain()[1][9]
    res = compute_metrics(ref2, pred2, compute_lpips=False)
    er, ep, m = _by_hand(ref2, pred2)
    assert abs(res["mae"] - np.abs(er - ep)[m].mean()) < 1e-12 and 0 < res["ssim"] < 1
    assert abs(psnr(er, ep, m) - res["psnr"]) < 1e-12 and abs(mae(er, ep, m) - res["mae"]) < 1e-12
    assert abs(ssim(er, ep, m) - res["ssim"]) < 1e-12
    with pytest.raises(NnsynthError, match="shape"):
        compute_metrics(ref, ref[:-1])
    with pytest.raises(NnsynthError, match="empty"):
        compute_metrics(np.zeros((8, 8)), np.zeros((8, 8)))
    with pytest.raises(NnsynthError, match="profile"):
        compute_metrics(ref, ref, profile="nope")
    assert {"contract", "seq2seq", "codebrain"} <= set(available_profiles())


def test_lpips_slicewise_with_random_trunk():
    torch.manual_seed(0)
    model = PerceptualLoss("alex", random_trunk=True)
    ref, pred = _brain((6, 64, 64))
    r, p, m = normalize_pair(ref, pred)
    score = lpips_score(r, p, m, model)
    assert score is not None and score > 0
    assert lpips_score(r, r, m, model) < 1e-4
    res = compute_metrics(ref, pred, lpips_model=model)
    assert abs(res["lpips"] - score) < 1e-9
    assert lpips_score(r, p, m, None) is None


def test_paper_profiles():
    ref, pred = _brain()

    def scale(x):
        top = 2 * np.percentile(x[x != 0], 99)
        return np.clip(x, 0, top) / top * 2 - 1

    res = compute_metrics(ref, pred, profile="seq2seq", compute_lpips=False)
    assert abs(res["psnr"] - peak_signal_noise_ratio(scale(ref), scale(pred), data_range=2)) < 1e-9
    assert abs(res["ssim"] - structural_similarity(scale(ref), scale(pred), data_range=2)) < 1e-12
    cb = compute_metrics(ref, pred, profile="codebrain", compute_lpips=False)
    keep = (ref != 0).reshape(ref.shape[0], -1).any(1)
    r, p = ref[keep], pred[keep]
    r = (r - r.min((1, 2), keepdims=True)) / (r.max((1, 2), keepdims=True) - r.min((1, 2), keepdims=True))
    p = (p - p.min((1, 2), keepdims=True)) / (p.max((1, 2), keepdims=True) - p.min((1, 2), keepdims=True))
    assert abs(cb["mae"] - 1000 * np.abs(r - p).mean()) < 1e-9
    assert abs(cb["psnr"] - peak_signal_noise_ratio(r, p, data_range=1)) < 1e-9
    sk = np.mean([structural_similarity(r[i], p[i], data_range=1, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False) for i in range(len(r))])
    assert abs(cb["ssim"] - sk) < 1e-6
