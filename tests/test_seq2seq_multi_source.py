"""Seq2Seq multi-source training: latent mean fusion, task drawing, training and exact resumption."""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from nnsynth.networks.seq2seq import Seq2SeqNet, fuse_mean
from test_training_engine import (_no_final_validation, _weights, interrupt_after_epoch, make_preprocessed,
                                  make_trainer, tiny_plans)


def _multi_plans(joint=False, **kw):
    plans = tiny_plans(**kw)
    plans["configurations"]["2d"]["training"]["per_trainer"] = {"seq2seq": {"multi_source": True}}
    plans["configurations"]["2d"]["network"]["joint_input"] = joint
    if joint:   # as new plans have it: intensity-balanced L1 (losses/reconstruction.py)
        plans["configurations"]["2d"]["loss"]["intensity_balance"] = 0.5
    return plans


def test_fuse_mean_is_the_per_row_mean():
    f = torch.randn(5, 3, 4, 4)
    groups = torch.tensor([0, 1, 1, 2, 2])
    out = fuse_mean(f, groups, 3)
    assert torch.equal(out[0], f[0])                      # one member: unchanged, bit for bit
    torch.testing.assert_close(out[1], (f[1] + f[2]) / 2)
    torch.testing.assert_close(out[2], (f[3] + f[4]) / 2)
    with pytest.raises(ValueError, match="at least one source"):
        fuse_mean(f, torch.tensor([0, 0, 0, 2, 2]), 3)
    with pytest.raises(ValueError, match="one entry per feature map"):
        fuse_mean(f, torch.tensor([0, 1]), 2)


def test_grouped_forward_with_one_source_per_row_is_the_paper_forward():
    net = Seq2SeqNet(4, 3, 2, tiny_plans()["configurations"]["2d"]["network"]).eval()
    x = torch.rand(3, 3, 20, 24)
    target = torch.tensor([0, 2, 3])
    with torch.no_grad():
        plain = net(x, target)
        grouped = net(x, target, torch.arange(3))
        # two sources for row 0: the decoder sees the mean of their encodings
        fused = net(torch.cat([x, x[:1] * 0.5]), target, torch.tensor([0, 1, 2, 0]))
        expected = net.decode((net.encode(x[:1]) + net.encode(x[:1] * 0.5)) / 2, target[:1], output_size=(20, 24))
    assert torch.equal(plain, grouped)
    torch.testing.assert_close(fused[:1], expected)
    torch.testing.assert_close(fused[1:], plain[1:])


def test_draw_multi_source_tasks():
    from nnsynth.training.trainers.seq2seq import Seq2SeqTrainer
    available = torch.tensor([[True, True, True, True]] * 2000 + [[False, True, False, False]] * 10)
    g = torch.Generator().manual_seed(0)
    rows, seqs, targets = Seq2SeqTrainer.draw_multi_source(available, g)
    per_row = {}
    for r, s in zip(rows.tolist(), seqs.tolist()):
        per_row.setdefault(r, []).append(s)
    assert sorted(per_row) == list(range(len(available)))           # every row has a source
    self_rec, sizes = 0, Counter()
    for r, srcs in per_row.items():
        t = int(targets[r])
        assert available[r, t] and all(available[r, s] for s in srcs) and len(set(srcs)) == len(srcs)
        if srcs == [t]:
            self_rec += r < 2000
        else:
            assert t not in srcs
            sizes[len(srcs)] += 1
    assert all(per_row[r] == [1] and int(targets[r]) == 1 for r in range(2000, 2010))  # one sequence: self only
    assert abs(self_rec / 2000 - 0.25) < 0.04                        # 1 / |available|
    assert set(sizes) == {1, 2, 3}                                   # every subset size of the 3 others
    # all_sources_fraction: that share of the non-self draws takes every other sequence (prediction's task)
    g = torch.Generator().manual_seed(1)
    rows, seqs, targets = Seq2SeqTrainer.draw_multi_source(available[:2000], g, all_sources_fraction=0.6)
    counts = torch.bincount(rows, minlength=2000)
    self_rec = sum(int(c == 1 and seqs[rows == r][0] == targets[r]) for r, c in enumerate(counts.tolist()))
    full = int((counts == 3).sum())
    # non-self draws: 0.6 all three + 0.4 * 1/3 sized three by chance = 0.733
    assert abs(full / (2000 - self_rec) - (0.6 + 0.4 / 3)) < 0.04 and abs(self_rec / 2000 - 0.25) < 0.04


@pytest.mark.parametrize("joint", [False, True])
def test_multi_source_training_improves_and_predicts_from_fused_sources(tmp_path, joint):
    pre = make_preprocessed(tmp_path / "pre", plans=_multi_plans(joint, epochs=2, iters=4))
    trainer = _no_final_validation(make_trainer(pre, tmp_path / "out", num_epochs=2, iters_per_epoch=4))
    assert trainer.multi_source and trainer.fusion == ("joint" if joint else "latent")
    fresh = copy.deepcopy(trainer)
    trainer.run_training()
    assert trainer.recon_loss.intensity_balance == (0.5 if joint else 0.0)
    losses = trainer.logs["train_loss"]
    assert losses[-1] < 0.8 * losses[0], losses
    from nnsynth.training.dataloading import MultiSequenceSampler
    assert isinstance(trainer.sampler, MultiSequenceSampler)
    fresh.initialize()
    sources = {i: torch.rand(2, 3, 32, 32) for i in (0, 1, 2)}
    with torch.no_grad():
        out = trainer.synthesize_slices(sources, 3)
        net = trainer.network
        assert net.joint_input is joint
        if joint:
            images = torch.zeros(2, 4, 3, 32, 32)
            for i, x in sources.items():
                images[:, i] = x
            feats = net.encode_joint(images, torch.tensor([[1, 1, 1, 0.]] * 2))
        else:
            feats = torch.stack([net.encode(x) for x in sources.values()]).mean(0)
        expected = net.decode(feats, torch.full((2,), 3), output_size=(32, 32))
    torch.testing.assert_close(out, expected)


def resumed_like_uninterrupted(pre, root):
    """Train 3 epochs straight, and 1 + 2 with an interruption and ``--c``; check weights and losses match.
    Returns (uninterrupted, resumed) trainers."""
    kw = dict(num_epochs=3, iters_per_epoch=2)
    ref = _no_final_validation(make_trainer(pre, root / "ref", **kw))
    ref.run_training()
    interrupt_after_epoch(_no_final_validation(make_trainer(pre, root / "run", **kw)), 0)
    b = _no_final_validation(make_trainer(pre, root / "run", **kw))
    b.run_training(continue_training=True)
    wr, wb = _weights(ref), _weights(b)
    for k in wr:
        torch.testing.assert_close(wb[k], wr[k], rtol=1e-5, atol=1e-6)
    assert b.logs["train_loss"] == pytest.approx(ref.logs["train_loss"], rel=1e-5)
    return ref, b


def test_multi_source_exact_resume(tmp_path):
    resumed_like_uninterrupted(make_preprocessed(tmp_path / "pre", n_cases=5, plans=_multi_plans(joint=True)),
                               tmp_path)


def test_intensity_augmentation_touches_the_chosen_sources_only(tmp_path):
    """The plans' intensity transforms reach multi-source training through the trainer (the sampler loads every
    sequence, so it cannot know which are inputs): every source stack is transformed, the target is not."""
    pre = make_preprocessed(tmp_path / "pre", plans=_multi_plans(joint=True, epochs=1, iters=1))
    trainer = make_trainer(pre, tmp_path / "out", num_epochs=1, iters_per_epoch=1)
    trainer.initialize()
    assert trainer.source_augmentation is not None      # tiny plans: the default probabilities
    calls, seen = [], {}
    trainer.source_augmentation = lambda image: calls.append(image.shape) or {"image": image * 0 + 0.25}
    net_forward, terms = trainer.train_network.forward, trainer.recon_loss.terms

    def spy_net(x, *args, **kwargs):
        seen["sources"] = x.detach().clone()
        return net_forward(x, *args, **kwargs)

    def spy_terms(pred, target, mask=None):
        seen["target"] = target.detach().clone()
        return terms(pred, target, mask)

    trainer.train_network.forward, trainer.recon_loss.terms = spy_net, spy_terms
    batch = next(trainer.train_iter)
    trainer.compute_loss(batch)
    assert len(calls) == seen["sources"].shape[0] > 0 and torch.all(seen["sources"] == 0.25)
    images = batch["images"]
    assert any(torch.equal(seen["target"][0], images[0, t]) for t in range(images.shape[1]))
    assert not torch.all(seen["target"] == 0.25)
    # all probabilities 0 (or augmentation disabled): no transform at all
    from nnsynth.training.dataloading import INTENSITY_AUGMENTATION_OFF, build_intensity_augmentation
    assert build_intensity_augmentation(dict(INTENSITY_AUGMENTATION_OFF)) is None
    assert build_intensity_augmentation({"enabled": False}) is None
    field_only = build_intensity_augmentation({**INTENSITY_AUGMENTATION_OFF, "p_bias_field": 1.0})
    flat = torch.full((3, 16, 16), 0.5)
    out = field_only(image=flat.clone())["image"]
    assert out.min() > 0 and out.std() > 0 and out.shape == flat.shape   # a smooth positive multiplicative field


def test_balanced_targets_draw_every_sequence_about_equally_often():
    """Weights 1 / (cases that have it): a sequence half the cases lack is the target far more often than under
    uniform draws; without weights the draw is the uniform one, stream for stream."""
    from nnsynth.training.trainers.seq2seq import Seq2SeqTrainer
    available = torch.ones(4000, 4, dtype=torch.bool)
    available[::2, 3] = False                                      # sequence 3 in half the cases
    counts = available.sum(0).float()
    uniform = Counter(Seq2SeqTrainer.draw_multi_source(available, torch.Generator().manual_seed(0))[2].tolist())
    balanced = Counter(Seq2SeqTrainer.draw_multi_source(available, torch.Generator().manual_seed(0),
                                                        target_weights=1.0 / counts)[2].tolist())
    share = {s: balanced[s] / len(available) for s in range(4)}
    assert uniform[3] / len(available) == pytest.approx(0.125, abs=0.02)     # 1/4 of the half that has it
    # weights 1/4000 and 1/2000: where all four are there, sequence 3 is drawn with 2/5, so 0.2 in all and
    # (1/2)(1/5 + 1/3) for the others: much nearer a quarter each than the uniform draw
    expected = {0: 4 / 15, 1: 4 / 15, 2: 4 / 15, 3: 0.2}
    assert all(share[s] == pytest.approx(expected[s], abs=0.02) for s in range(4)), share
    for i in range(8):                                              # always an available sequence
        t = Seq2SeqTrainer.draw_multi_source(available[i:i + 1], torch.Generator().manual_seed(i),
                                             target_weights=1.0 / counts)[2]
        assert bool(available[i, int(t)])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = Seq2SeqTrainer.draw_multi_source(available[:50], g1)
    b = Seq2SeqTrainer.draw_multi_source(available[:50], g2, target_weights=None)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_trainer_balances_targets_from_its_training_cases(tmp_path):
    plans = _multi_plans(joint=True, epochs=1, iters=1)
    plans["configurations"]["2d"]["training"]["per_trainer"]["seq2seq"]["balance_targets"] = True
    lacking = {i: (True, True, True, False) for i in (0, 2, 4)}         # half the cases lack sequence 3
    pre = make_preprocessed(tmp_path / "pre", plans=plans, availability=lacking)
    trainer = make_trainer(pre, tmp_path / "out", num_epochs=1, iters_per_epoch=1)
    trainer.initialize()
    counts = trainer.target_availability()
    assert counts[3] < counts[0]
    expected = torch.zeros(len(trainer.sequences))
    for case in trainer.train_cases:
        expected[trainer.case_store.cases[case].available] += 1
    assert torch.equal(counts, expected) and counts.sum() > 0
    torch.testing.assert_close(trainer.target_weights, torch.where(counts > 0, 1 / counts.clamp(min=1),
                                                                   torch.zeros(())))
    plans["configurations"]["2d"]["training"]["per_trainer"]["seq2seq"]["balance_targets"] = "yes"
    from nnsynth.exceptions import PlansError
    with pytest.raises(PlansError, match="balance_targets"):
        make_trainer(make_preprocessed(tmp_path / "pre2", plans=plans), tmp_path / "out2")
