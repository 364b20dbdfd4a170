"""Eq. 7 latent consistency: stop-gradient MSE both ways + symmetric InfoNCE over foreground positions."""
from __future__ import annotations

import math

import pytest
import torch

from nnsynth.losses.contrastive import (LatentConsistencyLoss, consistency_mse, info_nce, least_self_similar,
                                        sample_positions)


def test_infonce_known_value_and_minimal_when_positives_align():
    a = torch.eye(4)
    for tau in (0.5, 0.2):
        expected = 2 * math.log(1 + 3 * math.exp(-1 / tau))    # both directions, diag 1/tau, off-diagonal 0
        assert float(info_nce(a, a.clone(), tau)) == pytest.approx(expected, rel=1e-5)
    tau = 0.07
    aligned = info_nce(a, a.clone(), tau)
    assert float(aligned) < 1e-5                                # the minimum (0 up to float32)
    shuffled = info_nce(a, a[[1, 0, 3, 2]], tau)
    assert float(shuffled) > float(aligned) + 10
    torch.manual_seed(0)
    b = torch.randn(16, 3)
    assert float(info_nce(b, b, tau)) < float(info_nce(b, torch.randn(16, 3), tau))
    # raw dot products (normalize=False) as written in eq. 7
    raw = info_nce(2 * a, a, 1.0, normalize=False)
    assert float(raw) == pytest.approx(2 * math.log(1 + 3 * math.exp(-2.0)), rel=1e-5)


def test_infonce_is_symmetric_sum_of_both_directions():
    torch.manual_seed(1)
    a, b = torch.randn(8, 3), torch.randn(8, 3)
    assert float(info_nce(a, b)) == pytest.approx(float(info_nce(b, a)), rel=1e-5)


def test_consistency_mse_stop_gradient_both_ways():
    z1 = torch.randn(2, 3, 4, 4, requires_grad=True)
    z2 = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = consistency_mse(z1, z2)
    assert float(loss.detach()) == pytest.approx(float(2 * ((z1 - z2).detach() ** 2).mean()), rel=1e-6)
    loss.backward()
    n = z1.numel()
    torch.testing.assert_close(z1.grad, 2 * (z1 - z2).detach() / n)    # only from the term where z1 is live
    torch.testing.assert_close(z2.grad, 2 * (z2 - z1).detach() / n)


def test_background_positions_are_ignored_and_positions_bounded():
    torch.manual_seed(2)
    z1, z2 = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1:3, 1:3] = True
    loss = LatentConsistencyLoss(tau=0.07, max_positions=100)
    _, nce = loss(z1, z2, mask)
    idx = mask.reshape(-1).nonzero().flatten()
    ref = info_nce(z1.reshape(3, -1)[:, idx].t(), z2.reshape(3, -1)[:, idx].t(), 0.07)
    assert float(nce) == pytest.approx(float(ref), rel=1e-5)
    z3 = z1.clone()
    z3[..., 0, 0] = 100.0                        # background changes do not matter
    assert float(loss(z3, z2, mask)[1]) == pytest.approx(float(nce), rel=1e-5)
    big = torch.ones(10000, dtype=torch.bool)
    assert sample_positions(big, 64).numel() == 64 and sample_positions(big, 64).unique().numel() == 64
    assert float(LatentConsistencyLoss()(z1, z2, torch.zeros(1, 4, 4, dtype=torch.bool))[1]) == 0.0


def test_least_self_similar_keeps_the_distinct_positions():
    z = torch.cat([torch.tensor([[1.0, 0, 0]]).repeat(6, 1), torch.tensor([[0.0, 1, 0], [0.0, 0, 1]])])
    keep = least_self_similar(z, 2)
    assert sorted(keep.tolist()) == [6, 7]
    out = LatentConsistencyLoss(keep_fraction=0.25)(z.t().reshape(1, 3, 2, 4), z.t().reshape(1, 3, 2, 4))
    assert float(out[1]) < 1e-3                 # only the two distinct positions enter: aligned -> ~0


def test_copies_of_the_positive_code_are_no_negatives():
    """Two positions hold code 0, two hold code 1, z1 = z2 (perfectly consistent). Counting the copy as a negative
    leaves each row at best log 2 (its copy's logit equals the positive's); without it the loss is ~0 and the
    gradient vanishes. With all codes distinct the option changes nothing."""
    codes = torch.tensor([0, 0, 1, 1])
    table = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    z = table[codes]
    plain = info_nce(z, z.clone(), 0.07)
    assert float(plain) == pytest.approx(2 * math.log(2), rel=1e-3)        # the floor the copies impose
    z1 = z.clone().requires_grad_(True)
    fixed = info_nce(z1, z.clone(), 0.07, codes_a=codes, codes_b=codes)
    assert float(fixed.detach()) < 1e-5
    fixed.backward()
    assert float(z1.grad.abs().max()) < 1e-4
    torch.manual_seed(3)
    a, b = torch.randn(6, 3), torch.randn(6, 3)
    distinct = torch.arange(6)
    assert float(info_nce(a, b, codes_a=distinct, codes_b=distinct)) == pytest.approx(float(info_nce(a, b)), rel=1e-6)
    # through the module: (B, *S) code maps, and a clear error without them
    loss = LatentConsistencyLoss(exclude_same_code=True)
    zm = z.t().reshape(1, 3, 2, 2)
    assert float(loss(zm, zm.clone(), None, codes.reshape(1, 2, 2), codes.reshape(1, 2, 2))[1]) < 1e-5
    with pytest.raises(ValueError, match="code index"):
        loss(zm, zm.clone())
