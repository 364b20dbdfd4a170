"""VectorQuantizer: eq. 1 nearest code, eq. 2 loss (paper placement of beta), straight-through gradient,
codebook initialisation from encoder outputs, dead-code restart, usage and perplexity."""
from __future__ import annotations

import math

import pytest
import torch

from nnsynth.exceptions import PlansError
from nnsynth.networks.quantization import (VectorQuantizer, kmeans_plus_plus, perplexity_from_counts,
                                           straight_through, vq_loss)


def _quantizer(k=4, d=2, **kw) -> VectorQuantizer:
    q = VectorQuantizer(in_channels=3, latent_dim=d, codebook_size=k, spatial_dims=2, init="none", **kw)
    return q


def test_nearest_code_and_eq2_loss_by_hand():
    q = _quantizer(k=3, d=2, dead_code_restart=False)
    q._set_codes(slice(None), torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.0, 0.5]]))
    # z_e (B=1, D=2, 1, 3): three positions
    z_e = torch.tensor([[0.1, -0.2], [0.8, 1.3], [-1.5, 0.4]]).t().reshape(1, 2, 1, 3)
    q.eval()
    out = q.quantize(z_e)
    assert out.indices.flatten().tolist() == [0, 1, 2]
    zq = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.0, 0.5]])
    ze = torch.tensor([[0.1, -0.2], [0.8, 1.3], [-1.5, 0.4]])
    mse = ((ze - zq) ** 2).mean()
    assert float(out.loss.detach()) == pytest.approx(float(mse * (1 + 0.25)), rel=1e-6)
    torch.testing.assert_close(out.z_q.reshape(2, 3).t(), zq)


def test_beta_is_on_the_commitment_term_not_the_codebook_term():
    z_e = torch.randn(2, 3, 4, 4, requires_grad=True)
    codes = torch.randn(2, 3, 4, 4, requires_grad=True)
    vq_loss(z_e, codes, beta=0.25).backward()
    diff = (z_e - codes).detach()
    n = diff.numel()
    torch.testing.assert_close(z_e.grad, 0.25 * 2 * diff / n)      # commitment: beta * d/dz_e mse(z_e, sg[z_q])
    torch.testing.assert_close(codes.grad, -2 * diff / n)          # codebook: weight 1


def test_straight_through_gradient_equals_upstream_gradient():
    q = _quantizer(k=5, d=3)
    q.eval()
    z_e = torch.randn(2, 3, 4, 4, requires_grad=True)
    w = torch.randn(2, 3, 4, 4)
    out = q.quantize(z_e)
    (out.z_q * w).sum().backward()
    torch.testing.assert_close(z_e.grad, w)            # d/dz_e = d/dz_q exactly
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3)
    st = straight_through(a, b)
    torch.testing.assert_close(st, b)


def test_perplexity_of_uniform_assignment_is_k():
    assert float(perplexity_from_counts(torch.ones(16) * 7)) == pytest.approx(16.0, rel=1e-5)
    assert float(perplexity_from_counts(torch.tensor([5.0, 0, 0, 0]))) == pytest.approx(1.0)
    q = _quantizer(k=4, d=2)
    q._set_codes(slice(None), torch.tensor([[0.0, 0], [1, 0], [0, 1], [1, 1]]))
    q.eval()
    z = q.codebook.detach().t().reshape(1, 2, 2, 2).clone()
    out = q.quantize(z)
    assert float(out.perplexity) == pytest.approx(4.0, rel=1e-5) and float(out.usage) == 1.0


def test_codebook_initialised_from_encoder_outputs():
    torch.manual_seed(0)
    centres = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]])
    data = torch.cat([c + 0.05 * torch.randn(50, 2) for c in centres])
    found = kmeans_plus_plus(data, 4, iters=5)
    assert torch.cdist(found, centres).min(0).values.max() < 0.2        # every cluster has its code
    q = VectorQuantizer(3, latent_dim=2, codebook_size=4, init="kmeans", dead_code_restart=False)
    assert not bool(q.initialized)
    q.train()
    q.quantize(data.t().reshape(1, 2, 10, 20))
    assert bool(q.initialized)
    assert torch.cdist(q.codebook.detach(), centres).min(0).values.max() < 0.2
    assert q.epoch_statistics()["codebook_usage"] == 1.0


def test_dead_codes_are_restarted_from_encoder_outputs():
    torch.manual_seed(0)
    q = VectorQuantizer(3, latent_dim=2, codebook_size=8, init="none", dead_code_restart=True,
                        dead_code_ema_decay=0.5, dead_code_threshold=1.0)
    q._set_codes(slice(None), torch.cat([torch.zeros(1, 2), torch.full((7, 2), 100.0)]))   # 7 codes far from any data
    data = torch.randn(1, 2, 8, 8)
    q.eval()
    assert float(q.quantize(data).usage) == pytest.approx(1 / 8)
    q.train()
    for _ in range(6):
        q.quantize(torch.randn(1, 2, 8, 8))
    assert int(q.restarts) >= 7
    assert float(q.codebook.detach().abs().max()) < 10        # revived codes now lie among the encoder outputs
    q.eval()
    assert float(q.quantize(torch.randn(4, 2, 8, 8)).usage) >= 0.75


def test_epoch_statistics_and_eval_mode_does_not_count():
    q = _quantizer(k=4, d=2, dead_code_restart=False)
    q.eval()
    q.quantize(torch.randn(1, 2, 4, 4))
    assert math.isnan(q.epoch_statistics()["codebook_usage"])
    q.train()
    q.quantize(torch.randn(1, 2, 4, 4))
    assert q.epoch_statistics()["codebook_usage"] > 0
    q.reset_epoch_statistics()
    assert math.isnan(q.epoch_statistics()["codebook_perplexity"])


def test_forward_shapes_and_bad_settings():
    q = VectorQuantizer(6, latent_dim=3, codebook_size=8, spatial_dims=3)
    feats, out = q(torch.randn(2, 6, 2, 3, 4))
    assert feats.shape == (2, 6, 2, 3, 4) and out.z_q.shape == (2, 3, 2, 3, 4) and out.indices.shape == (2, 2, 3, 4)
    with pytest.raises(PlansError, match="codebook_size"):
        VectorQuantizer(6, latent_dim=3, codebook_size=1)
    with pytest.raises(PlansError, match="init"):
        VectorQuantizer(6, init="bogus")


def test_codebook_lr_scale_keeps_values_and_scales_the_step():
    torch.manual_seed(0)
    codes = torch.randn(4, 2)
    z = torch.randn(1, 2, 4, 4)
    steps = {}
    for scale in (1.0, 10.0):
        q = VectorQuantizer(3, latent_dim=2, codebook_size=4, init="none", dead_code_restart=False,
                            codebook_lr_scale=scale)
        q._set_codes(slice(None), codes)
        torch.testing.assert_close(q.codebook.detach(), codes)
        opt = torch.optim.Adam([q.codebook_param], lr=1e-3)
        q.eval()
        q.quantize(z).loss.backward()
        opt.step()
        steps[scale] = (q.codebook.detach() - codes).abs().max()
    assert float(steps[10.0]) == pytest.approx(10 * float(steps[1.0]), rel=1e-3)


def test_ema_update_moves_each_code_to_the_mean_of_its_vectors():
    """decay 0: after one training step every used code IS the mean of the vectors assigned to it."""
    q = VectorQuantizer(3, latent_dim=2, codebook_size=3, init="none", dead_code_restart=False,
                        codebook_update="ema", codebook_ema_decay=0.0)
    q._set_codes(slice(None), torch.tensor([[0.0, 0.0], [10.0, 0.0], [100.0, 100.0]]))
    vectors = torch.tensor([[1.0, 1.0], [-1.0, 3.0], [9.0, 1.0], [12.0, -1.0], [11.0, 0.0]])
    q.train()
    out = q.quantize(vectors.t().reshape(1, 2, 1, 5))
    assert out.indices.flatten().tolist() == [0, 0, 1, 1, 1]
    torch.testing.assert_close(q.codebook[0], torch.tensor([0.0, 2.0]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(q.codebook[1], torch.tensor([32.0 / 3, 0.0]), rtol=1e-4, atol=1e-4)
    assert not q.codebook_param.requires_grad                     # the optimizer never moves the codes


def test_ema_codes_follow_encoder_vectors_far_away_where_adam_steps_cannot():
    """Vectors 50 units from the codes: 100 EMA steps put the codes on them; 100 Adam steps at lr 1e-3 on eq. 2
    move a code by at most 0.1. Only the commitment term reaches the encoder in the EMA mode."""
    torch.manual_seed(0)
    centres = torch.tensor([[50.0, 50.0], [-50.0, 50.0]])
    gaps = {}
    for update in ("ema", "gradient"):
        q = VectorQuantizer(3, latent_dim=2, codebook_size=2, init="none", dead_code_restart=False,
                            codebook_update=update, codebook_ema_decay=0.9)
        q._set_codes(slice(None), torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        opt = torch.optim.Adam([p for p in q.parameters() if p.requires_grad], lr=1e-3)
        q.train()
        for _ in range(100):
            data = torch.cat([c + 0.1 * torch.randn(32, 2) for c in centres])
            opt.zero_grad()
            loss = q.quantize(data.t().reshape(1, 2, 8, 8)).loss
            if loss.requires_grad:        # EMA: nothing here takes a gradient (no encoder in this test)
                loss.backward()
                opt.step()
        gaps[update] = float(torch.cdist(q.codebook.detach(), centres).diagonal().max())
    assert gaps["ema"] < 1.0 and gaps["gradient"] > 45.0
    z_e = torch.randn(1, 2, 4, 4, requires_grad=True)
    q = VectorQuantizer(3, latent_dim=2, codebook_size=4, init="none", codebook_update="ema")
    q.eval()
    out = q.quantize(z_e)
    out.loss.backward()
    z_q = out.z_q.detach()
    torch.testing.assert_close(z_e.grad, 0.25 * 2 * (z_e - z_q).detach() / z_e.numel())


def test_ema_state_survives_a_checkpoint_and_restarted_codes_restart_their_average():
    torch.manual_seed(0)
    q = VectorQuantizer(3, latent_dim=2, codebook_size=8, init="kmeans", codebook_update="ema",
                        dead_code_ema_decay=0.5)
    q.train()
    for _ in range(5):
        q.quantize(torch.randn(2, 2, 8, 8))
    state = q.state_dict()
    assert {"ema_cluster_size", "ema_vector_sum"} <= set(state)
    r = VectorQuantizer(3, latent_dim=2, codebook_size=8, init="kmeans", codebook_update="ema",
                        dead_code_ema_decay=0.5)
    r.load_state_dict(state)
    data = torch.randn(2, 2, 8, 8)
    q.quantize(data)
    r.quantize(data)
    torch.testing.assert_close(q.codebook, r.codebook)
    # every code's average is consistent with its value (sum / size) after restarts too
    size = q.ema_cluster_size.clamp_min(1e-6)
    assert float((q.ema_vector_sum / size[:, None] - q.codebook).abs().max()) < 0.05
    with pytest.raises(PlansError, match="codebook_update"):
        VectorQuantizer(6, codebook_update="bogus")
