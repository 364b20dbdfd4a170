"""TSF-Seq2Seq fusion (eq. 1-4, 6) and the tsf_seq2seq trainer end to end on tiny data."""
from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest
import torch

from nnsynth.networks.seq2seq import Seq2SeqNet
from nnsynth.networks.tsf import HyperCBAM, TSFNet, TaskSpecificWeighting, tsem

NET = {"encoder_channels": [4, 8, 8], "encoder_kernel_sizes": [7, 3, 3], "num_res_blocks": 1,
       "num_hyper_res_blocks": 1, "hyper_bank_size": 4, "code_length": 8}


def _tsf(seed=0):
    torch.manual_seed(seed)
    return TSFNet(Seq2SeqNet(4, 3, 2, NET))


def test_single_source_fused_feature_is_exactly_its_encoding():
    net = _tsf()
    with torch.no_grad():
        net.weighting.fc.weight.normal_(0, 3.0)     # far from uniform weights
        images = torch.rand(4, 4, 3, 16, 16)
        for s in range(4):
            src = torch.zeros(4, 4)
            src[:, s] = 1
            tgt = torch.tensor([(s + 1) % 4, (s + 2) % 4, (s + 3) % 4, s])
            omega = net.omega(src, tgt)
            assert torch.equal(omega, src)                        # exactly 1 on the source, exactly 0 elsewhere
            fused = net.fuse(images, src, omega)
            assert torch.equal(fused, net.backbone.encode(images[:, s]))   # bit for bit


def test_omega_zero_on_missing_and_sums_to_one():
    w = TaskSpecificWeighting(4)
    with torch.no_grad():
        w.fc.weight.normal_(0, 2.0)
    for r in range(1, 5):
        for subset in itertools.combinations(range(4), r):
            src = torch.zeros(1, 4)
            src[0, list(subset)] = 1
            for t in range(4):
                omega = w(src, torch.nn.functional.one_hot(torch.tensor([t]), 4).float())[0].detach()
                assert all(float(omega[i]) == 0.0 for i in range(4) if i not in subset)
                assert float(omega.sum()) == pytest.approx(1.0, abs=1e-6)
                assert all(float(omega[i]) > 0 for i in subset)
    with pytest.raises(ValueError, match="source"):
        w(torch.zeros(1, 4), torch.zeros(1, 4))


def test_eq1_eq2_by_hand():
    w = TaskSpecificWeighting(2)
    with torch.no_grad():
        w.fc.weight.copy_(torch.tensor([[1.0, 0, 0, 2], [0, 1, 1, 0]]))
        w.fc.bias.zero_()
    src, tgt = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 1.0]])
    logits = torch.tensor([1.0 + 2.0, 1.0])
    o0 = torch.softmax(logits, 0) + 1e-5
    expected = o0 / o0.sum()
    torch.testing.assert_close(w(src, tgt)[0], expected)


def test_hyper_cbam_and_forward_outputs():
    net = _tsf()
    images = torch.rand(2, 4, 3, 16, 16)
    src = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 0]])
    x1, x2, omega = net(images, src, torch.tensor([3, 0]))
    assert x1.shape == x2.shape == (2, 3, 16, 16) and omega.shape == (2, 4)
    m = tsem(x1, x2).detach()
    assert m.shape == x1.shape and float(m.min()) >= 0
    cbam = HyperCBAM(8, code_length=8, spatial_dims=2, reduction=16, spatial_kernel=7, bank_size=4)
    f = torch.randn(2, 8, 4, 4)
    out = cbam(f, torch.rand(2, 8))
    assert out.shape == f.shape
    assert bool(((out.abs() <= f.abs() + 1e-6)).all())           # attention gates in (0, 1) only scale


def test_frozen_encoder_gets_no_gradient_and_stays_in_eval():
    net = _tsf()
    net.freeze_encoder()
    net.train()
    assert not net.backbone.encoder.training and net.attention.training
    x1, x2, _ = net(torch.rand(2, 4, 3, 16, 16), torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]]), torch.tensor([1, 2]))
    (x1.mean() + x2.mean()).backward()
    assert all(p.grad is None for p in net.backbone.encoder.parameters())
    assert any(p.grad is not None for p in net.backbone.decoder.parameters())
    assert net.weighting.fc.weight.grad is not None and net.attention.spatial.conv.weight_bank.grad is not None


# ----- trainer ----------------------------------------------------------------------------------------------
def _write_pretrained(results, name, net, sequences):
    from nnsynth.training.checkpointing import save_checkpoint
    fold = results / f"{name}__nnsynthPlans__2d" / "fold_0"
    fold.mkdir(parents=True)
    save_checkpoint({"network_weights": net.state_dict(), "optimizer_state": {}, "epoch": 1, "trainer_name": name,
                     "sequences": list(sequences)}, fold / "checkpoint_final.pth")


@pytest.fixture(scope="module")
def tsf_run(tmp_path_factory):
    from test_training_engine import SEQUENCES, make_preprocessed, tiny_plans
    from nnsynth.training.trainers.tsf_seq2seq import TSFSeq2SeqTrainer
    root = tmp_path_factory.mktemp("tsf")
    plans = tiny_plans(patch=(16, 16), epochs=2, iters=4)
    cfg = plans["configurations"]["2d"]
    cfg.update({"batch_size": 2, "network": dict(NET)})
    cfg["training"]["val_iters"] = 1
    for key in ("optimizer", "weight_decay", "betas"):     # not in the plans: the paper's Adam is used
        del cfg["training"][key]
    pre = make_preprocessed(root / "pre", plans=plans, shape=(6, 20, 20),
                            availability={0: (True, True, False, True)})
    results = root / "results"
    torch.manual_seed(0)
    _write_pretrained(results, "seq2seq", Seq2SeqNet(4, 3, 2, cfg["network"]), SEQUENCES)
    out = results / "tsf_seq2seq__nnsynthPlans__2d"
    trainer = TSFSeq2SeqTrainer(plans, "2d", 0, pre, out, "cpu")
    trainer.run_training()
    return trainer, plans, pre, out


def test_tsf_trainer_end_to_end(tsf_run):
    trainer, plans, pre, out = tsf_run
    fold = out / "fold_0"
    for name in ("checkpoint_final.pth", "progress.png", "validation/summary.json", "sequence_contributions.csv",
                 "sequence_contributions.png", "training_log.txt"):
        assert (fold / name).is_file(), name
    assert trainer.backbone_kind == "seq2seq"
    assert type(trainer.optimizer) is torch.optim.Adam and trainer.optimizer.param_groups[0]["weight_decay"] == 0.0
    rows = list(csv.DictReader(open(fold / "sequence_contributions.csv")))
    assert len(rows) == 4 * 7                     # 4 targets x 7 non-empty subsets of the 3 others
    for r in rows:
        srcs = r["sources"].split("+")
        assert r["target"] not in srcs
        total = sum(float(r[f"omega_{s}"]) for s in trainer.sequences)
        assert total == pytest.approx(1.0, abs=1e-5)
        assert all(float(r[f"omega_{s}"]) == 0.0 for s in trainer.sequences if s not in srcs)
    # the encoder did not move
    state = torch.load(out.parent / "seq2seq__nnsynthPlans__2d" / "fold_0" / "checkpoint_final.pth",
                       weights_only=False)["network_weights"]
    for k, v in trainer.network.backbone.encoder.state_dict().items():
        assert torch.equal(v, state[f"encoder.{k}"]), k


def test_tsf_trainer_improves(tsf_run):
    from nnsynth.training.trainers.tsf_seq2seq import TSFSeq2SeqTrainer
    trainer, plans, pre, out = tsf_run
    fresh = TSFSeq2SeqTrainer(plans, "2d", 0, pre, out.parent / "tsf_seq2seq__fresh", "cpu",
                              pretrained_from="seq2seq")
    fresh.output_folder = out   # same sibling folder for the backbone lookup
    fresh.initialize()

    def mae(t):
        t.network.eval()
        with torch.no_grad():
            return float(np.mean([float((t.predict(b).clamp(0, 1) - b["target"]).abs().mean())
                                  for b in t.val_batches]))
    assert mae(trainer) < 0.9 * mae(fresh)     # 8 steps from a random backbone: a clear, not a large, drop
    assert trainer.logs["train_loss"][-1] < trainer.logs["train_loss"][0]


def test_tsem_and_multi_source_synthesis(tsf_run):
    trainer = tsf_run[0]
    trainer.network.eval()
    srcs = {0: torch.rand(2, 3, 16, 16), 2: torch.rand(2, 3, 16, 16)}
    with torch.no_grad():
        pred, m = trainer.synthesize_with_tsem(srcs, 3)
        assert torch.equal(pred, trainer.synthesize_slices(srcs, 3))
        x1, x2, _ = trainer.network(*trainer._stack(srcs), torch.tensor([3, 3]))
    torch.testing.assert_close(m, (x2 - x1).abs())


def test_missing_pretrained_model_is_a_clear_error(tmp_path):
    from test_training_engine import make_preprocessed, tiny_plans
    from nnsynth.exceptions import NnsynthError
    from nnsynth.training.trainers.tsf_seq2seq import TSFSeq2SeqTrainer
    plans = tiny_plans(patch=(16, 16))
    pre = make_preprocessed(tmp_path / "pre", n_cases=3, plans=plans, shape=(4, 16, 16))
    t = TSFSeq2SeqTrainer(plans, "2d", 0, pre, tmp_path / "res" / "tsf_seq2seq__nnsynthPlans__2d", "cpu")
    with pytest.raises(NnsynthError, match="nnsynth_train .* seq2seq 0"):
        t.find_pretrained()


def test_vq_backbone_is_accepted(tmp_path):
    from test_training_engine import SEQUENCES, make_preprocessed, tiny_plans
    from nnsynth.networks.vq_seq2seq import VQSeq2SeqNet
    from nnsynth.training.trainers.tsf_seq2seq import TSFSeq2SeqTrainer
    plans = tiny_plans(patch=(16, 16))
    plans["configurations"]["2d"]["network"] = dict(NET)
    plans["configurations"]["2d"]["vq"] = {"latent_dim": 3, "codebook_size": 8}
    pre = make_preprocessed(tmp_path / "pre", n_cases=3, plans=plans, shape=(4, 16, 16))
    _write_pretrained(tmp_path / "res", "vq_seq2seq", VQSeq2SeqNet(4, 3, 2, NET, {"latent_dim": 3,
                                                                               "codebook_size": 8}), SEQUENCES)
    t = TSFSeq2SeqTrainer(plans, "2d", 0, pre, tmp_path / "res" / "tsf_seq2seq__nnsynthPlans__2d", "cpu")
    net = t.build_network()
    assert t.backbone_kind == "vq_seq2seq" and not any(p.requires_grad for p in net.backbone.quantizer.parameters())
    x1, x2, _ = net(torch.rand(1, 4, 3, 16, 16), torch.tensor([[1.0, 1, 0, 0]]), torch.tensor([2]))
    assert x1.shape == (1, 3, 16, 16)


def test_inference_adapter_rebuilds_from_checkpoint_alone(tsf_run):
    from nnsynth.training.trainers.tsf_seq2seq import TSFSeq2SeqTrainer
    trainer, plans, pre, out = tsf_run
    state = torch.load(out / "fold_0" / "checkpoint_final.pth", weights_only=False)
    assert state["extra"]["backbone_kind"] == "seq2seq"
    adapter = TSFSeq2SeqTrainer(plans, "2d", 0, out, out, "cpu")
    adapter.load_for_inference(state)      # no data, no backbone folder lookup
    srcs = {1: torch.rand(1, 3, 16, 16), 3: torch.rand(1, 3, 16, 16)}
    trainer.network.eval()
    with torch.no_grad():
        maps = adapter.synthesize_with_maps(srcs, 0)
        torch.testing.assert_close(maps["prediction"], trainer.synthesize_slices(srcs, 0))
    w = adapter.contribution_weights([1, 3], 0)
    assert set(w) == {1, 3} and sum(w.values()) == pytest.approx(1.0, abs=1e-6)
