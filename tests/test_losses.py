"""Losses against numpy/skimage references; perceptual loss never downloads and degrades cleanly."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity

from nnsynth.exceptions import NnsynthError
from nnsynth.losses import PerceptualLoss, Seq2SeqLoss, SSIMLoss, find_backbone_weights, masked_l1, ssim
from nnsynth.losses import perceptual as perceptual_mod

torch.set_num_threads(2)


def _smooth_pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    a = gaussian_filter(rng.random(shape), 2.0)
    a = (a - a.min()) / (a.max() - a.min())
    b = np.clip(a + 0.1 * gaussian_filter(rng.standard_normal(shape), 1.0), 0, 1)
    return a, b


@pytest.mark.parametrize("shape", [(48, 40), (16, 20, 24)])
def test_ssim_matches_skimage_gaussian(shape):
    a, b = _smooth_pair(shape)
    ref = structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    got = ssim(torch.tensor(a)[None, None], torch.tensor(b)[None, None], data_range=1.0)
    assert abs(float(got) - ref) < 1e-6
    # float32 and per-channel reduction
    x = torch.tensor(np.stack([a, b]), dtype=torch.float32)[None]
    y = torch.tensor(np.stack([b, b]), dtype=torch.float32)[None]
    per = ssim(x, y, reduction="none")
    assert per.shape == (1, 2)
    assert abs(float(per[0, 0]) - ref) < 1e-4 and abs(float(per[0, 1]) - 1.0) < 1e-5


def test_ssim_loss_differentiable_and_small_images():
    a, b = _smooth_pair((32, 32), seed=1)
    x = torch.tensor(b, dtype=torch.float32)[None, None].requires_grad_(True)
    loss = SSIMLoss()(x, torch.tensor(a, dtype=torch.float32)[None, None])
    loss.backward()
    assert 0 < loss.item() < 1 and x.grad.abs().sum() > 0
    small = SSIMLoss()(torch.rand(1, 1, 6, 8), torch.rand(1, 1, 6, 8))   # window shrinks to 5
    assert torch.isfinite(small)


def test_masked_l1_against_numpy():
    rng = np.random.default_rng(2)
    p, t = rng.random((2, 3, 8, 8)), rng.random((2, 3, 8, 8))
    m = rng.random((2, 1, 8, 8)) > 0.5
    expected = np.abs(p - t)[np.broadcast_to(m, p.shape)].mean()
    got = masked_l1(torch.tensor(p), torch.tensor(t), torch.tensor(m))
    assert abs(float(got) - expected) < 1e-12
    assert abs(float(masked_l1(torch.tensor(p), torch.tensor(t))) - np.abs(p - t).mean()) < 1e-12
    empty = masked_l1(torch.tensor(p), torch.tensor(t), torch.zeros(2, 1, 8, 8, dtype=torch.bool))
    assert float(empty) == 0.0


def test_seq2seq_loss_weights_from_plans():
    pred, tgt = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    loss = Seq2SeqLoss.from_config({"seq2seq": {"lambda_l1": 4.0, "lambda_perceptual": 0.5}})
    assert loss.lambda_l1 == 4.0 and loss.lambda_perceptual == 0.5 and not loss.uses_perceptual
    torch.testing.assert_close(loss(pred, tgt), 4.0 * (pred - tgt).abs().mean())
    default = Seq2SeqLoss.from_config(None)
    assert (default.lambda_l1, default.lambda_perceptual) == (10.0, 0.01)
    total, terms = Seq2SeqLoss.from_config({"lambda_r": 2.0}).forward_with_terms(pred, tgt)
    assert terms["perceptual"] == 0.0 and abs(terms["loss"] - 2.0 * terms["l1"]) < 1e-6
    assert default.lambda_ssim == 0.0 and "ssim" not in default.terms(pred, tgt)      # eq. 1: no SSIM term
    structural = Seq2SeqLoss.from_config({"seq2seq": {"lambda_l1": 4.0, "lambda_ssim": 2.0}})
    torch.testing.assert_close(structural(pred, tgt), 4.0 * (pred - tgt).abs().mean() + 2.0 * (1 - ssim(pred, tgt)))
    with pytest.raises(NnsynthError, match="lambda_ssim"):
        Seq2SeqLoss.from_config({"lambda_ssim": -1})


def test_intensity_balance_weights_by_hand():
    """One sample: 4 background voxels, 12 tissue voxels at 0.4 (bin 8), 4 lesion voxels at 0.95 (bin 19)."""
    from nnsynth.losses.reconstruction import intensity_balance_weights
    t = torch.tensor([0.0] * 4 + [0.4] * 12 + [0.95] * 4).reshape(1, 1, 4, 5)
    w = intensity_balance_weights(t, 0.5).flatten()
    raw_tissue, raw_lesion = (12 / 16) ** -0.5, (4 / 16) ** -0.5
    mean = (12 * raw_tissue + 4 * raw_lesion) / 16
    torch.testing.assert_close(w[:4], torch.ones(4))                              # background: 1
    torch.testing.assert_close(w[4:16], torch.full((12,), raw_tissue / mean))
    torch.testing.assert_close(w[16:], torch.full((4,), raw_lesion / mean))
    assert abs(float(w[4:].mean()) - 1.0) < 1e-6                                 # mean 1 over the foreground
    assert torch.equal(intensity_balance_weights(t, 0.0), torch.ones_like(t))     # alpha 0: plain L1
    # the cap, and samples are balanced independently
    rare = torch.zeros(2, 1, 50, 50)
    rare[0, 0, :, :] = 0.3
    rare[0, 0, 0, 0] = 0.9
    rare[1, 0, :10] = 0.6
    w = intensity_balance_weights(rare, 1.0, max_weight=10.0)
    assert float(w[0, 0, 0, 0]) == 10.0 and float(w[1].max()) == pytest.approx(1.0)
    # in the loss: a prediction missing the lesion costs more than with plain L1
    pred = t.clone().flatten()
    pred[16:] = 0.4
    pred = pred.reshape(t.shape)
    plain = Seq2SeqLoss.from_config({"seq2seq": {"lambda_l1": 1.0}})(pred, t)
    bal = Seq2SeqLoss.from_config({"seq2seq": {"lambda_l1": 1.0, "intensity_balance": 0.5}})(pred, t)
    assert float(bal) > 1.4 * float(plain)        # 0.161 vs 0.110
    with pytest.raises(NnsynthError, match="intensity_balance"):
        Seq2SeqLoss.from_config({"seq2seq": {"intensity_balance": 2}})


def test_perceptual_unavailable_logs_once_and_returns_zero(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.delenv("NNSYNTH_LPIPS_WEIGHTS", raising=False)
    monkeypatch.delenv("NNSYNTH_BACKBONE_WEIGHTS", raising=False)
    monkeypatch.setattr(perceptual_mod, "_WARNED", set())
    assert find_backbone_weights("alex") is None
    with caplog.at_level(logging.WARNING, logger="nnsynth.losses.perceptual"):
        first, second = PerceptualLoss("alex"), PerceptualLoss("alex")
    lines = [r for r in caplog.records if "Perceptual loss" in r.getMessage()]
    assert len(lines) == 1 and "never downloads" in lines[0].getMessage()
    assert not first.available and not second.available
    x = torch.rand(2, 3, 32, 32)
    assert float(first(x, x.flip(-1))) == 0.0
    combined = Seq2SeqLoss(perceptual=first)
    assert not combined.uses_perceptual
    with pytest.raises(NnsynthError, match="not found"):
        find_backbone_weights("alex", user_path=tmp_path / "nope.pth")


def test_perceptual_random_trunk_forward_backward():
    torch.manual_seed(0)
    loss_fn = PerceptualLoss("alex", random_trunk=True)
    assert loss_fn.available and not any(p.requires_grad for p in loss_fn.parameters())
    pred = torch.rand(2, 3, 40, 40, requires_grad=True)      # 40 < 64: upsampled per slice
    tgt = torch.rand(2, 3, 40, 40)
    value = loss_fn(pred, tgt)
    value.backward()
    assert value.item() > 0 and pred.grad.abs().sum() > 0
    assert float(loss_fn(tgt, tgt)) < 1e-6
    assert loss_fn.per_slice(pred.detach(), tgt).shape == (6,)
    vol = loss_fn.per_slice(torch.rand(1, 1, 4, 64, 64), torch.rand(1, 1, 4, 64, 64))   # 3D: axial slices
    assert vol.shape == (4,)
    combined = Seq2SeqLoss(lambda_l1=10, lambda_perceptual=0.5, perceptual=loss_fn)
    total, terms = combined.forward_with_terms(pred.detach(), tgt)
    assert abs(terms["loss"] - (10 * terms["l1"] + 0.5 * terms["perceptual"])) < 1e-5 and terms["perceptual"] > 0
    loss_fn.train()
    assert not loss_fn.model.training


def test_local_trunk_weights_are_loaded(tmp_path, monkeypatch):
    """A torchvision-format file (features.* keys) found via the env var is loaded into the trunk."""
    import torchvision

    features = {k: v for k, v in torchvision.models.alexnet(weights=None).state_dict().items()
                if k.startswith("features.")}
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(features, path)
    monkeypatch.setenv("NNSYNTH_LPIPS_WEIGHTS", str(tmp_path))
    assert find_backbone_weights("alex") == path
    loss_fn = PerceptualLoss("alex")
    assert loss_fn.available and loss_fn.weights_path == path
    torch.testing.assert_close(loss_fn.model.net.slice1[0].weight, features["features.0.weight"])
    torch.testing.assert_close(loss_fn.model.net.slice5._modules["10"].bias, features["features.10.bias"])
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(NnsynthError, match="not torchvision"):
        PerceptualLoss("alex", weights_path=bad)
