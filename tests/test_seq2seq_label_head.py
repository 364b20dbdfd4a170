"""Seq2Seq label head: labels reach the multi-source sampler, the head learns them, resumes exactly, and
prediction never needs it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnsynth.preprocessing.storage import save_case
from nnsynth.utils.files import load_json, save_json
from test_seq2seq_multi_source import _multi_plans, resumed_like_uninterrupted
from test_training_engine import _no_final_validation, make_preprocessed, make_trainer, tiny_case

LESION = 2


def _labelled(tmp_path, n_cases=5, unlabelled=(4,), labels=True, lambda_seg=1.0, network=None, **plan_kw):
    """Tiny cases whose brightest anatomy carries label 2; cases in ``unlabelled`` have no label map; ``network``
    updates the plans' network settings."""
    plans = _multi_plans(joint=True, **plan_kw)
    plans["configurations"]["2d"]["loss"]["lambda_seg"] = lambda_seg
    plans["configurations"]["2d"]["network"].update(network or {})
    pre = make_preprocessed(tmp_path / "pre", n_cases=n_cases, plans=plans)
    for i in range(n_cases):
        data, seg, props = tiny_case(i)
        if i not in unlabelled:
            seg[0][(seg[0] == 0) & (data[0] > 0.75)] = LESION
            props["has_label"] = True
        save_case(pre / "nnsynthPlans_2d", f"case_{i:03d}", data, seg, props)
    spec = load_json(pre / "dataset.json")
    if labels:
        spec["labels"] = {"background": 0, "lesion": LESION}
    save_json(spec, pre / "dataset.json")
    return pre


def test_multi_sequence_sampler_returns_labels_with_the_mask(tmp_path):
    pre = _labelled(tmp_path)
    trainer = make_trainer(pre, tmp_path / "out", num_epochs=1, iters_per_epoch=1)
    trainer.initialize()
    seen_labelled = seen_unlabelled = False
    for _ in range(6):
        batch = next(trainer.train_iter)
        labels = batch["labels"]
        assert labels.shape == batch["mask"].shape == (4, 3, 32, 32)
        assert torch.equal(batch["mask"], (labels >= 0).float())
        assert set(labels.unique().tolist()) <= {-1, 0, LESION}
        for case, has, lab in zip(batch["cases"], batch["has_label"].tolist(), labels):
            assert has == (case != "case_004")
            seen_labelled |= has and bool((lab == LESION).any())
            seen_unlabelled |= not has
            if not has:
                assert not (lab > 0).any()
    assert seen_labelled and seen_unlabelled


def test_label_head_learns_the_labels_and_prediction_does_not_need_it(tmp_path):
    pre = _labelled(tmp_path, epochs=3, iters=6)
    trainer = _no_final_validation(make_trainer(pre, tmp_path / "out", num_epochs=3, iters_per_epoch=6))
    trainer.initialize()
    assert trainer.label_head is not None and trainer.label_head.out_channels == 2 * 3   # 2 classes x 3 slices
    head_params = {id(p) for p in trainer.label_head.parameters()}
    assert head_params <= {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(k.startswith("label_head") for k in trainer.network.state_dict())

    torch.manual_seed(0)
    fixed = [next(trainer.train_iter) for _ in range(3)]
    fixed = [b for b in fixed if bool(b["has_label"].any())]

    def label_ce():
        with torch.no_grad():
            return float(np.mean([trainer.compute_loss(b)[1]["label_ce"] for b in fixed]))

    before = label_ce()
    trainer.run_training()
    after = label_ce()
    assert after < 0.7 * before, (before, after)

    # the label term is part of the loss: with lambda_seg 0 the same batch gives the reconstruction loss alone
    batch = fixed[0]
    trainer.source_augmentation = None      # its random draws are not torch's
    torch.manual_seed(1)
    with torch.no_grad():
        total, parts = trainer.compute_loss(batch)
    trainer.lambda_seg = 0.0
    torch.manual_seed(1)
    with torch.no_grad():
        plain, _ = trainer.compute_loss(batch)
    trainer.lambda_seg = 1.0
    torch.testing.assert_close(total, plain + parts["label_ce"], rtol=1e-5, atol=1e-6)

    # prediction builds the network alone from the checkpoint
    from nnsynth.training import checkpointing as ckpt
    state = ckpt.load_checkpoint(trainer.fold_folder / "checkpoint_final.pth", "cpu")
    assert "label_head" in state["extra"]
    fresh = make_trainer(pre, tmp_path / "out")
    fresh.load_for_inference(state)
    sources = {i: torch.rand(1, 3, 32, 32) for i in (0, 1, 2)}
    with torch.no_grad():
        torch.testing.assert_close(fresh.synthesize_slices(sources, 3), trainer.synthesize_slices(sources, 3))


@pytest.mark.parametrize("labels,lambda_seg", [(False, 1.0), (True, 0.0)])
def test_label_head_is_off_without_labels_or_weight(tmp_path, labels, lambda_seg):
    pre = _labelled(tmp_path, labels=labels, lambda_seg=lambda_seg)
    trainer = make_trainer(pre, tmp_path / "out", num_epochs=1, iters_per_epoch=1)
    trainer.initialize()
    assert trainer.label_head is None
    assert "label_ce" not in trainer.compute_loss(next(trainer.train_iter))[1]


def test_label_head_exact_resume(tmp_path):
    ref, b = resumed_like_uninterrupted(_labelled(tmp_path), tmp_path)
    assert ref.label_head is not None
    for k, v in ref.label_head.state_dict().items():
        torch.testing.assert_close(b.label_head.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_gradient_clipping_covers_the_label_head(tmp_path):
    """One global norm over everything the optimizer steps: after a step with a tiny grad_clip the gradients of
    the network and the head together have that norm (clipping the network alone would leave the head's)."""
    pre = _labelled(tmp_path)
    trainer = make_trainer(pre, tmp_path / "out", num_epochs=1, iters_per_epoch=1)
    trainer.initialize()
    trainer.training["grad_clip"] = 1e-3
    batch = next(trainer.train_iter)
    while not bool(batch["has_label"].any()):
        batch = next(trainer.train_iter)
    trainer.train_step(trainer._to_device(batch))
    grads = [p.grad for g in trainer.optimizer.param_groups for p in g["params"] if p.grad is not None]
    head = [p.grad for p in trainer.label_head.parameters()]
    assert all(g is not None and bool(g.abs().sum() > 0) for g in head)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert float(total) == pytest.approx(1e-3, rel=1e-3)


def test_label_head_and_synthesis_learn_with_input_unshuffle(tmp_path):
    """network.input_unshuffle 2: the decoder's last feature map is at half resolution, so the head gives every
    2x2 block's logits as channels and they are put back at full resolution before the cross-entropy; both the
    labels and the images are learned."""
    pre = _labelled(tmp_path, epochs=5, iters=10, network={"input_unshuffle": 2})
    trainer = _no_final_validation(make_trainer(pre, tmp_path / "out", num_epochs=5, iters_per_epoch=10))
    trainer.initialize()
    assert trainer.network.divisor == 8
    assert trainer.label_head.out_channels == 2 * 3 * 4   # 2 classes x 3 slices x 2x2 voxels
    torch.manual_seed(0)
    fixed = [b for b in (next(trainer.train_iter) for _ in range(3)) if bool(b["has_label"].any())]
    trainer.source_augmentation = None

    def losses():
        torch.manual_seed(1)
        with torch.no_grad():
            out = [trainer.compute_loss(b) for b in fixed]
        return (float(np.mean([float(t) - p["label_ce"] for t, p in out])),
                float(np.mean([p["label_ce"] for _, p in out])))

    (recon0, ce0) = losses()
    trainer.run_training()
    (recon1, ce1) = losses()
    assert ce1 < 0.9 * ce0, (ce0, ce1)        # 0.75 -> 0.61 on this machine
    assert recon1 < 0.5 * recon0, (recon0, recon1)   # 4.2 -> 1.1
