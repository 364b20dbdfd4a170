"""Sliding-window prediction on synthetic arrays with hand-made predictors (no trained model needed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnsynth.inference.sliding_window import (compute_steps, gaussian_importance_map, mirror_axes_combinations,
                                              sliding_window_predict, with_mirroring)


def identity(inp):
    (x,) = inp.values()
    return {"prediction": x.clone()}


def test_gaussian_map_sigma_and_positivity():
    g = gaussian_importance_map([17, 9])
    assert g.dtype == np.float32 and g.shape == (17, 9)
    assert g.max() == pytest.approx(1.0) and g[8, 4] == pytest.approx(1.0)
    assert (g > 0).all()
    # sigma = patch / 8: one sigma (17/8 voxels) from the centre the profile is exp(-1/2)
    x = np.arange(17) - 8
    np.testing.assert_allclose(g[:, 4], np.exp(-0.5 * (x / (17 / 8)) ** 2), rtol=1e-5)


def test_compute_steps_cover_the_image():
    assert compute_steps([10], [10], 0.5) == [[0]]
    assert compute_steps([20], [10], 0.5) == [[0, 5, 10]]
    steps = compute_steps([37, 64], [16, 32], 0.5)
    for s, size, p in zip(steps, [37, 64], [16, 32]):
        assert s[0] == 0 and s[-1] == size - p
        assert max(np.diff(s)) <= p * 0.5 + 1e-9
    with pytest.raises(ValueError):
        compute_steps([5], [8], 0.5)


@pytest.mark.parametrize("shape,patch", [((7, 20, 13), [8, 8]), ((3, 5, 6), [8, 8]), ((1, 9, 9), [4, 4])])
def test_2p5d_identity_reconstructs_volume(shape, patch):
    vol = np.random.default_rng(0).random(shape).astype(np.float32)
    out = sliding_window_predict({0: vol}, identity, 2, patch, num_adjacent_slices=3, step_size=0.5)
    assert out["prediction"].shape == shape and out["prediction"].dtype == np.float32
    np.testing.assert_allclose(out["prediction"], vol, atol=1e-6)


@pytest.mark.parametrize("shape,patch", [((9, 11, 10), [4, 6, 4]), ((3, 4, 5), [4, 4, 4])])
def test_3d_identity_reconstructs_volume(shape, patch):
    vol = np.random.default_rng(1).random(shape).astype(np.float32)
    seen = []

    def fn(inp):
        seen.append(tuple(next(iter(inp.values())).shape))
        return identity(inp)
    out = sliding_window_predict({2: vol}, fn, 3, patch, step_size=0.5, batch_size=3)
    np.testing.assert_allclose(out["prediction"], vol, atol=1e-6)
    assert all(s[1:] == (1, *patch) and s[0] <= 3 for s in seen)


def test_2p5d_overlapping_slices_are_averaged():
    """Output slice j of a stack gets offset (j - 1): each slice is the mean over the stacks that hold it,
    repeated edge slices are not counted."""
    z = 5
    vol = np.zeros((z, 8, 8), np.float32)

    def fn(inp):
        (x,) = inp.values()
        off = torch.arange(x.shape[1], dtype=torch.float32).view(1, -1, 1, 1) - 1
        return {"prediction": x + off}
    out = sliding_window_predict({0: vol}, fn, 2, [8, 8], num_adjacent_slices=3)["prediction"]
    # slice 0: from the stack centred at 0 (offset 0) and at 1 (offset -1); inner slices: -1, 0, +1
    np.testing.assert_allclose(out[:, 0, 0], [-0.5, 0, 0, 0, 0.5], atol=1e-6)


def test_gaussian_weighting_prefers_window_centres():
    """A predictor that outputs 1 in window centres and 0 at borders: with Gaussian weights the result is
    pulled towards the centre values (> plain average)."""
    vol = np.zeros((1, 1, 24), np.float32)

    def fn(inp):
        (x,) = inp.values()
        ramp = 1 - torch.abs(torch.linspace(-1, 1, x.shape[-1]))
        return {"prediction": torch.zeros_like(x) + ramp}
    out = sliding_window_predict({0: vol}, fn, 3, [1, 1, 8], step_size=0.5)["prediction"][0, 0]
    flat = sliding_window_predict({0: vol}, fn, 3, [1, 1, 8], step_size=1.0)["prediction"][0, 0]
    assert out[4:-4].mean() > flat[4:-4].mean()


def test_extra_outputs_and_several_sources_are_accumulated():
    a = np.full((4, 6, 6), 0.2, np.float32)
    b = np.full((4, 6, 6), 0.6, np.float32)

    def fn(inp):
        m = torch.stack(list(inp.values())).mean(0)
        return {"prediction": m, "tsem": torch.abs(inp[0] - inp[1])}
    out = sliding_window_predict({0: a, 1: b}, fn, 2, [4, 4], num_adjacent_slices=3)
    np.testing.assert_allclose(out["prediction"], 0.4, atol=1e-6)
    np.testing.assert_allclose(out["tsem"], 0.4, atol=1e-6)
    with pytest.raises(ValueError):
        sliding_window_predict({0: a, 1: b[:3]}, fn, 2, [4, 4], num_adjacent_slices=3)


def test_mirroring_averages_flipped_predictions():
    assert mirror_axes_combinations(2) == [(), (2,), (3,), (2, 3)]
    assert len(mirror_axes_combinations(3)) == 8
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)

    def left_biased(inp):
        (t,) = inp.values()
        return {"prediction": t + torch.linspace(0, 1, t.shape[-1])}   # not flip-equivariant
    out = with_mirroring(left_biased, 2)({0: x})["prediction"]
    torch.testing.assert_close(out, x + 0.5)                           # the bias averages out
    torch.testing.assert_close(with_mirroring(identity, 3)({0: x[None]})["prediction"], x[None])
