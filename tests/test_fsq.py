"""FSQ (nnsynth/networks/fsq.py): levels, implicit codebook, straight-through gradients."""
from __future__ import annotations

import math

import pytest
import torch

from nnsynth.exceptions import PlansError
from nnsynth.networks.fsq import FSQ


@pytest.mark.parametrize("levels", [[5, 5, 5], [8, 5, 3], [2, 4, 6, 7], [8, 8, 8, 5, 5, 5]])
def test_every_code_value_is_one_of_the_levels(levels):
    fsq = FSQ(levels)
    torch.manual_seed(0)
    x = torch.randn(64, len(levels), 6, 6) * 4  # large inputs reach the extreme levels
    x[0, :, 0, 0] = 1e4
    x[0, :, 0, 1] = -1e4
    codes = fsq(x)
    for c, lv in enumerate(levels):
        hw = lv // 2
        allowed = torch.tensor([(v - hw) / hw for v in range(lv)])
        vals = codes[:, c].unique()
        assert torch.isclose(vals[:, None], allowed[None]).any(1).all(), (lv, vals)
        # both extremes are reached, so all L values are usable
        assert math.isclose(float(vals.min()), float(allowed.min()), abs_tol=1e-6)
        assert math.isclose(float(vals.max()), float(allowed.max()), abs_tol=1e-6)
        assert len(vals) == lv
    digits = fsq.codes_to_levels(codes)
    assert int(digits.min()) >= 0
    assert all(int(digits[:, c].max()) == lv - 1 for c, lv in enumerate(levels))


def test_zero_input_maps_to_the_middle_code():
    """shift = atanh(offset / half_l) puts F = 0 on level 0 for odd and even L."""
    fsq = FSQ([5, 4, 8])
    z = fsq.bound(torch.zeros(1, 3, 1, 1))
    assert torch.allclose(z, torch.zeros_like(z), atol=1e-6)


@pytest.mark.parametrize("levels", [[5, 5, 5], [8, 5, 3], [3, 2, 4]])
def test_index_round_trip_over_the_whole_codebook(levels):
    fsq = FSQ(levels)
    n = math.prod(levels)
    assert fsq.codebook_size == n
    idx = torch.arange(n)
    codes = fsq.indices_to_codes(idx)
    assert codes.shape == (n, len(levels))
    assert torch.equal(fsq.codes_to_indices(codes), idx)
    assert len({tuple(r) for r in codes.tolist()}) == n  # all distinct
    # codes that come out of the quantiser index back to themselves, spatial maps included
    x = torch.randn(3, len(levels), 5, 4) * 3
    q = fsq(x)
    back = fsq.indices_to_codes(fsq.codes_to_indices(q))
    assert torch.equal(back, q)
    assert torch.equal(fsq.all_codes(), codes)


def test_gradients_pass_straight_through():
    fsq = FSQ([5, 8])
    x = torch.randn(2, 2, 3, 3, requires_grad=True)
    fsq(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad.abs() > 0).all()
    # the gradient equals that of the un-rounded bounded values (identity through the rounding)
    x2 = x.detach().clone().requires_grad_(True)
    hw = torch.tensor([2.0, 4.0]).view(1, 2, 1, 1)
    (fsq.bound(x2) / hw).sum().backward()
    assert torch.allclose(x.grad, x2.grad)


def test_bad_levels_raise():
    with pytest.raises(PlansError):
        FSQ([5, 1])
    with pytest.raises(PlansError):
        FSQ([])
