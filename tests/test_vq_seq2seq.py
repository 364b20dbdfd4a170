"""VQ-Seq2Seq: VQC statistics (eq. 4-5), the network, domain augmentation and the trainer end to end on a tiny
chained-unpaired dataset (no case holds T1 and Flair together), including the CLI and --c."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from nnsynth.exceptions import PlansError
from nnsynth.networks.vq_seq2seq import VQSeq2SeqNet, sample_vqc, vqc_statistics
from nnsynth.training.augmentation_domain import (DomainAugmenter, bias_field, intensity_transform,
                                                  random_one_hot_code, random_uniform_code)
from nnsynth.training.trainers.vq_seq2seq import VQSeq2SeqTrainer
from test_training_engine import _no_final_validation, interrupt_after_epoch, make_preprocessed, tiny_plans

NET = {"encoder_channels": [4, 8, 8], "encoder_kernel_sizes": [7, 3, 3], "num_res_blocks": 1,
       "num_hyper_res_blocks": 1, "hyper_bank_size": 4, "code_length": 8}
VQ = {"latent_dim": 3, "codebook_size": 16}
CHAIN = {i: [(True, True, False, False), (False, True, True, False), (False, False, True, True)][i % 3]
         for i in range(6)}


# ----- eq. 4-5 ------------------------------------------------------------------------------------------------
def test_vqc_mean_and_unbiased_std_by_hand():
    z = torch.tensor([1.0, 2.0, 4.0, 100.0]).reshape(1, 4, 1, 1, 1)     # sequence 3 missing: ignored
    avail = torch.tensor([[True, True, True, False]])
    mu, std = vqc_statistics(z, avail)
    assert float(mu) == pytest.approx(7 / 3)
    var = ((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2     # n - 1
    assert float(std) == pytest.approx(math.sqrt(var))
    assert float(vqc_statistics(z, avail, "variance")[1]) == pytest.approx(var)
    assert float(vqc_statistics(z, avail, "sum_squares")[1]) == pytest.approx(var * 2)
    with pytest.raises(ValueError, match="at least 2"):
        vqc_statistics(z, torch.tensor([[True, False, False, False]]))


def test_vqc_identical_latents_have_zero_spread_and_finite_gradient():
    z = torch.ones(2, 3, 2, 4, 4, requires_grad=True)
    mu, std = vqc_statistics(z, torch.ones(2, 3, dtype=torch.bool))
    assert float(std.detach().abs().max()) == 0.0
    (mu.sum() + std.sum()).backward()
    assert torch.isfinite(z.grad).all()


def test_sample_vqc_reparameterisation():
    mu, s = torch.randn(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    g = torch.Generator().manual_seed(5)
    z = sample_vqc(mu, s, generator=g)
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(z, mu + eps * s)


def test_network_contracts():
    torch.manual_seed(0)
    net = VQSeq2SeqNet(4, 3, 2, NET, VQ)
    net.eval()
    x = torch.rand(2, 3, 20, 20)
    out = net.quantize(x)
    assert out.z_q.shape == (2, 3, 5, 5)
    torch.testing.assert_close(net.encode(x), net.quantizer.to_features(out.z_q))
    y = net(x, torch.tensor([0, 3])).detach()
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert net.decode_latent(out.z_q, torch.rand(2, 8), output_size=(20, 20)).shape == x.shape   # random code c_r
    # vq.downsampling_levels: the quantiser after fewer stride-2 levels, a finer latent grid
    fine = VQSeq2SeqNet(4, 3, 2, NET, {**VQ, "downsampling_levels": 1})
    fine.eval()
    assert fine.quantize(x).z_q.shape == (2, 3, 10, 10) and fine.divisor == 2
    assert fine(x, torch.tensor([0, 3])).shape == x.shape
    for bad in (3, -1, 1.5, True):
        with pytest.raises(PlansError, match="downsampling_levels"):
            VQSeq2SeqNet(4, 3, 2, NET, {**VQ, "downsampling_levels": bad})


# ----- sec. 2.4 -----------------------------------------------------------------------------------------------
def test_domain_augmentation_ranges():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 16, 16) * 0.8 + 0.1
    _, params = intensity_transform(x, generator=g)
    gam = np.array([p.gamma for p in params])
    sig = np.array([p.noise_sigma for p in params])
    alp = np.array([p.alpha for p in params])
    assert gam.min() >= 0.95 and gam.max() <= 1.05 and gam.std() > 0.01
    assert sig.min() >= 0.0 and sig.max() <= 0.1 and sig.max() > 0.05
    assert alp.min() >= 0.0 and alp.max() <= 2.0 and alp.max() > 1.0
    for alpha in (0.0, 1.0, 2.0):
        f = bias_field((16, 16), alpha, 0.2, 3, g)
        assert float(f.min()) >= math.exp(-0.2 * alpha) - 1e-6 and float(f.max()) <= math.exp(0.2 * alpha) + 1e-6
    assert float(bias_field((8, 8, 8), 2.0, 0.2, 3, g).max()) == pytest.approx(math.exp(0.4), rel=1e-5) or \
        float(bias_field((8, 8, 8), 2.0, 0.2, 3, g).min()) == pytest.approx(math.exp(-0.4), rel=1e-5)
    # no noise, gamma 1, alpha 0: identity
    same, _ = intensity_transform(x[:2], params=[type(params[0])(1.0, 0.0, 0.0)] * 2)
    torch.testing.assert_close(same, x[:2])
    one_hot = random_one_hot_code(10, 4, 8, g)
    assert torch.equal(one_hot.sum(1), torch.ones(10)) and float(one_hot[:, 4:].abs().sum()) == 0
    uni = random_uniform_code(100, 4, 8, g)
    assert float(uni[:, :4].min()) >= 0 and float(uni[:, :4].max()) <= 1 and float(uni[:, 4:].abs().sum()) == 0


def test_domain_augmenter_replaces_inputs_with_one_augmented_version():
    g = torch.Generator().manual_seed(1)
    aug = DomainAugmenter(4, 8, {"p_domain_augmentation": 1.0})
    x = torch.rand(30, 3, 8, 8)
    calls = []

    def translate(xx, code):
        calls.append(code)
        return torch.full_like(xx, 0.5)
    out, counts = aug(x, translate, g)
    assert sum(counts.values()) == 30 and all(v > 0 for v in counts.values())
    assert not torch.equal(out, x)
    none, counts0 = DomainAugmenter(4, 8, {"p_domain_augmentation": 0.0})(x, translate, g)
    assert torch.equal(none, x) and sum(counts0.values()) == 0


# ----- trainer --------------------------------------------------------------------------------------------------
def _plans(epochs=2, iters=4):
    plans = tiny_plans(patch=(16, 16), epochs=epochs, iters=iters)
    cfg = plans["configurations"]["2d"]
    cfg.update({"batch_size": 2, "network": dict(NET), "vq": dict(VQ)})
    cfg["training"]["val_iters"] = 1
    cfg["loss"] = {"vq_seq2seq": {"lambda_perceptual": 0.0, "contrastive_start_epoch": 1, "vqc_start_epoch": 1,
                                  "augmentation_start_epoch": 1}}
    return plans


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vq")
    plans = _plans()
    pre = make_preprocessed(root / "pre", plans=plans, shape=(6, 20, 20), availability=CHAIN)
    out = root / "results" / "vq_seq2seq__nnsynthPlans__2d"
    trainer = VQSeq2SeqTrainer(plans, "2d", 0, pre, out, "cpu")
    trainer.run_training()
    return trainer, plans, pre, out


def test_vq_trainer_on_unpaired_chain_data(vq_run):
    trainer, plans, pre, out = vq_run
    fold = out / "fold_0"
    for name in ("checkpoint_final.pth", "progress.png", "validation/summary.json", "training_log.txt"):
        assert (fold / name).is_file(), name
    # no training case holds T1 and Flair together
    assert not any(trainer.case_store.cases[c].available == [0, 3] or
                   {0, 3} <= set(trainer.case_store.cases[c].available) for c in trainer.train_cases)
    log = (fold / "training_log.txt").read_text()
    assert "codebook: usage" in log and "con_nce" in log and "vqc_l1" in log
    assert len(trainer.logs["codebook_usage"]) == 2 and all(0 < u <= 1 for u in trainer.logs["codebook_usage"])
    assert all(np.isfinite(trainer.logs["train_loss"]))
    state = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    assert state["trainer_name"] == "vq_seq2seq" and bool(state["network_weights"]["quantizer.initialized"])
    # single-step T1 -> Flair
    trainer.network.eval()
    with torch.no_grad():
        y = trainer.synthesize_slices({0: torch.rand(2, 3, 16, 16)}, 3)
        y2 = trainer.synthesize_slices({0: torch.rand(2, 3, 16, 16), 1: torch.rand(2, 3, 16, 16)}, 3)
    assert y.shape == y2.shape == (2, 3, 16, 16)


def test_vq_trainer_improves(vq_run):
    trainer, plans, pre, out = vq_run
    fresh = VQSeq2SeqTrainer(plans, "2d", 0, pre, out.parent / "fresh", "cpu")
    fresh.initialize()

    def mae(t):
        t.network.eval()
        with torch.no_grad():
            return float(np.mean([float((t.predict(b).clamp(0, 1) - b["target"]).abs().mean())
                                  for b in t.val_batches]))
    assert mae(trainer) < 0.9 * mae(fresh)


def test_vq_cli_runs_and_resumes(nnsynth_folders):
    from nnsynth.cli.train import cli
    plans = _plans(epochs=1, iters=1)
    make_preprocessed(nnsynth_folders["preprocessed"], n_cases=3, plans=plans, shape=(4, 16, 16),
                      availability={0: (True, True, False, False), 1: (False, True, True, False)})
    args = ["990", "vq_seq2seq", "0", "--device", "cpu"]
    assert cli(args) == 0
    fold = nnsynth_folders["results"] / "Dataset990_Tiny" / "vq_seq2seq__nnsynthPlans__2d" / "fold_0"
    assert torch.load(fold / "checkpoint_final.pth", weights_only=False)["epoch"] == 1
    assert cli(args + ["--c", "--epochs", "2"]) == 0
    state = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    assert state["epoch"] == 2 and len(state["logs"]["codebook_usage"]) == 2


def test_term_switches_scale_when_the_time_budget_shortens_the_run(vq_run, caplog):
    """--max-minutes shrinking 100 planned epochs to 20 must move the contrastive/VQC/augmentation starts to the
    same fraction of training (else a short run never reaches them); runs cut below 20 epochs keep them off."""
    import logging
    _, _, pre, out = vq_run
    plans = _plans(epochs=100)
    plans["configurations"]["2d"]["loss"]["vq_seq2seq"].update(
        {"contrastive_start_epoch": 10, "vqc_start_epoch": 20, "augmentation_start_epoch": 20})
    trainer = VQSeq2SeqTrainer(plans, "2d", 0, pre, out.parent / "scaled", "cpu")
    assert [trainer.start_epoch(k) for k in ("contrastive_start_epoch", "vqc_start_epoch")] == [10, 20]
    trainer.num_epochs = 20            # what _fit_schedule_to_time_budget does
    with caplog.at_level(logging.INFO):
        trainer.on_schedule_fitted()
    assert [trainer.start_epoch(k) for k in ("contrastive_start_epoch", "vqc_start_epoch",
                                             "augmentation_start_epoch")] == [2, 4, 4]
    assert "contrastive from epoch 2, VQC sampling from epoch 4" in caplog.text
    trainer.num_epochs = 30            # 10 * 30 / 100 = 3, 20 * 30 / 100 = 6
    assert [trainer.start_epoch(k) for k in ("contrastive_start_epoch", "vqc_start_epoch")] == [3, 6]
    for short in (3, 10):              # too short a run: the planned starts stay (the terms stay off)
        trainer.num_epochs = short
        caplog.clear()
        with caplog.at_level(logging.INFO):
            trainer.on_schedule_fitted()
        assert [trainer.start_epoch(k) for k in ("contrastive_start_epoch", "vqc_start_epoch")] == [10, 20]
        assert "too few to scale" in caplog.text


def test_short_run_options_train_end_to_end_and_resume_exactly(tmp_path):
    """The opt-in remedies of eq. 7's short-run cost (moving-average codebook, same-code negatives left out, eq. 7
    on z_e) with a finer latent grid train through the real loss, and a run interrupted after epoch 1 resumes to
    the uninterrupted run's weights (the moving averages travel in the checkpoint)."""
    plans = _plans(epochs=2, iters=3)
    cfg = plans["configurations"]["2d"]
    cfg["vq"].update({"codebook_update": "ema", "downsampling_levels": 1})
    cfg["loss"]["vq_seq2seq"].update({"contrastive_exclude_same_code": True, "consistency_latent": "z_e"})
    pre = make_preprocessed(tmp_path / "pre", plans=plans, shape=(6, 20, 20), availability=CHAIN)

    def trainer(folder):
        return _no_final_validation(VQSeq2SeqTrainer(copy.deepcopy(plans), "2d", 0, pre, folder, "cpu"))
    full = trainer(tmp_path / "full")
    full.run_training()
    q = full.network.quantizer
    assert q.codebook_update == "ema" and full.network.divisor == 2 and not q.codebook_param.requires_grad
    assert "con_nce" in (tmp_path / "full" / "fold_0" / "training_log.txt").read_text()
    assert all(np.isfinite(full.logs["train_loss"]))
    interrupt_after_epoch(trainer(tmp_path / "part"), 0)
    resumed = trainer(tmp_path / "part")
    resumed.run_training(continue_training=True)
    a, b = full.network.state_dict(), resumed.network.state_dict()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), atol=1e-5, rtol=1e-4, msg=key)
