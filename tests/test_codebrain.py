"""CodeBrain: NAFNet blocks, network, masking, losses, and the two-stage trainer on tiny preprocessed data."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import pytest
import torch

from nnsynth.exceptions import NnsynthError, PlansError
from nnsynth.losses.codebrain import (SequencePatchDiscriminator, grading_loss, ordinal_decode, ordinal_encode,
                                      weighted_psnr_loss)
from nnsynth.networks.codebrain import CodeBrainNet, network_settings
from nnsynth.networks.nafnet import NAFBlock, NAFDecoder, NAFEncoder, pixel_shuffle_nd
from nnsynth.preprocessing.storage import save_case
from nnsynth.training import checkpointing as ckpt
from nnsynth.training.trainers.codebrain import CodeBrainTrainer, draw_keep
from nnsynth.utils.files import load_json, save_json

SEQUENCES = ("T1", "T1Gd", "T2", "Flair")
TINY_FSQ = {"levels": [5, 5, 5], "code_dim": 3, "downsample_factor": 8, "nafnet_width": 8,
            "nafnet_enc_blocks": [1, 1, 1], "nafnet_middle_blocks": 1, "nafnet_dec_blocks": [1, 1, 1]}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared, busy 2-core machine OpenMP's spin-waiting makes 2 threads far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ===== building blocks ======================================================================================
@pytest.mark.parametrize("dims", [2, 3])
def test_nafnet_shapes(dims):
    s = (16,) * dims
    x = torch.randn(2, 8, *s)
    block = NAFBlock(dims, 8)
    assert block(x).shape == x.shape
    torch.testing.assert_close(block(x), x)  # scales start at 0: identity at init
    enc = NAFEncoder(dims, 3, 5, 4, [1, 1, 1], 1)
    z = enc(torch.randn(2, 3, *s))
    assert z.shape == (2, 5) + (2,) * dims
    dec = NAFDecoder(dims, 5, 6, 4, [1, 1, 1], 1)
    assert dec(z).shape == (2, 6, *s)


def test_pixel_shuffle_3d_places_sub_voxels():
    x = torch.arange(8.0).view(1, 8, 1, 1, 1)
    y = pixel_shuffle_nd(x, 2)
    assert y.shape == (1, 1, 2, 2, 2)
    # channel (rz, ry, rx) goes to voxel (rz, ry, rx), as in torch's 2D pixel_shuffle
    assert torch.equal(y.flatten(), torch.arange(8.0))
    x2 = torch.randn(2, 8, 3, 5)
    torch.testing.assert_close(pixel_shuffle_nd(x2, 2), torch.nn.functional.pixel_shuffle(x2, 2))


def test_network_settings_checks_the_plan():
    with pytest.raises(PlansError):
        network_settings({**TINY_FSQ, "downsample_factor": 6})
    with pytest.raises(PlansError):
        network_settings({**TINY_FSQ, "nafnet_enc_blocks": [1, 1]})
    with pytest.raises(PlansError):
        network_settings({**TINY_FSQ, "code_dim": 4})
    assert network_settings({})["levels"] == [5] * 7  # paper fallback


@pytest.mark.parametrize("dims,k,shape", [(2, 3, (24, 40)), (3, 1, (16, 16, 24)), (2, 3, (21, 30))])
def test_codebrain_forward_shapes(dims, k, shape):
    n = 4
    net = CodeBrainNet(n, k, dims, TINY_FSQ)
    x = torch.rand(2, n * k, *shape)
    keep = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    out, codes = net(x, keep)
    assert out.shape == x.shape
    assert codes.shape == (2, n, 3) + tuple(math.ceil(s / 8) for s in shape)
    assert net.impute(x, keep).shape == x.shape
    logits = net.prior_logits(net.pad(x)[0], keep)
    assert logits.shape == (2, n, 3, 4) + tuple(math.ceil(s / 8) for s in shape)
    assert net.logits_to_codes(logits).shape == codes.shape


def test_masked_channels_never_reach_the_common_and_prior_encoders():
    torch.manual_seed(0)
    net = CodeBrainNet(4, 3, 2, TINY_FSQ).eval()
    for p in net.parameters():  # make every block active (beta/gamma start at 0)
        p.data.add_(torch.randn_like(p) * 0.05)
    x = torch.rand(2, 12, 16, 16)
    keep = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)
    x2 = x.clone()
    x2.view(2, 4, 3, 16, 16)[~keep] = torch.rand(5, 3, 16, 16)  # change only hidden sequences
    with torch.no_grad():
        torch.testing.assert_close(net.common_features(x, keep), net.common_features(x2, keep))
        torch.testing.assert_close(net.prior_logits(x, keep), net.prior_logits(x2, keep))
        torch.testing.assert_close(net.impute(x, keep), net.impute(x2, keep))
        # ... while the visible ones do matter
        x3 = x.clone()
        x3.view(2, 4, 3, 16, 16)[0, 0] += 0.5
        assert not torch.allclose(net.impute(x, keep), net.impute(x3, keep))


def test_draw_keep_hides_a_proper_non_empty_subset():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(400):
        keep = draw_keep(rng, [0, 2, 3], 4)
        assert not keep[1] and 0 < keep.sum() < 3
        seen.add(tuple(keep))
    assert len(seen) == 6  # all 2^3 - 2 patterns
    assert draw_keep(rng, [2], 4).tolist() == [False, False, True, False]


# ===== losses ===============================================================================================
def test_ordinal_encoding_round_trip():
    levels = torch.arange(5)
    bits = ordinal_encode(levels, 4)
    assert bits.tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    logits = (bits * 2 - 1) * 3.0  # confident logits of those bits
    assert torch.equal(ordinal_decode(logits), levels)
    # a level is the count of positive bits, and invalid bits are ignored
    assert ordinal_decode(torch.tensor([[5.0, -1.0, 2.0, 3.0]])).tolist() == [3]
    assert ordinal_decode(torch.tensor([[5.0, 5.0, 5.0, 5.0]]), torch.tensor([1, 1, 0, 0])).tolist() == [2]


def test_grading_loss_by_hand():
    # one sequence, one code channel, one position, L = 4: target level 2 -> bits [1, 1, 0]
    logits = torch.tensor([0.0, 1.0, -2.0]).view(1, 1, 1, 3, 1, 1)
    target = torch.tensor([2]).view(1, 1, 1, 1, 1)
    sp = lambda v: math.log1p(math.exp(v))  # softplus: BCE(logit, 1) = sp(-l), BCE(logit, 0) = sp(l)
    expected = (sp(-0.0) + sp(-1.0) + sp(-2.0)) / 3
    assert float(grading_loss(logits, target)) == pytest.approx(expected, rel=1e-6)
    # weights drop sequences; invalid bits drop out of the mean
    logits2 = torch.cat([logits, torch.full_like(logits, 9.0)], 1)
    target2 = torch.cat([target, torch.zeros_like(target)], 1)
    assert float(grading_loss(logits2, target2, weight=torch.tensor([[1.0, 0.0]]))) == pytest.approx(expected, rel=1e-6)
    valid = torch.tensor([[True, True, False]])
    assert float(grading_loss(logits, target, valid=valid)) == pytest.approx((sp(0.0) + sp(-1.0)) / 2, rel=1e-6)


def test_psnr_loss_weights_and_unavailable_sequences():
    torch.manual_seed(0)
    ref = torch.rand(2, 3, 1, 8, 8)
    pred = ref + 0.1
    keep = torch.tensor([[1, 0, 0], [1, 0, 0]], dtype=torch.bool)
    avail = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    loss, parts = weighted_psnr_loss(pred, ref, keep, avail, 5.0, 20.0)
    assert parts["psnr_visible"] == pytest.approx(-10 * math.log10(0.01 + 1e-5), abs=1e-3)  # MSE 0.01: ~20 dB
    assert float(loss) == pytest.approx(-(5 + 20) * parts["psnr_visible"], abs=0.01)
    pred2 = pred.clone()
    pred2[0, 2] = 5.0  # a sequence case 0 lacks: no effect
    assert float(weighted_psnr_loss(pred2, ref, keep, avail, 5.0, 20.0)[0]) == pytest.approx(float(loss))
    pred3 = pred.clone()
    pred3[1, 2] += 0.2  # a masked sequence case 1 has: counts
    assert float(weighted_psnr_loss(pred3, ref, keep, avail, 5.0, 20.0)[0]) > float(loss)


def test_discriminator_has_one_map_per_sequence():
    d = SequencePatchDiscriminator(3, 4, 2, width=8)
    out = d(torch.rand(5, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0]))
    assert out.shape[0] == 5 and out.ndim == 3


# ===== trainer on tiny preprocessed data ====================================================================
def _tiny_case(seed: int, shape, available: Sequence[bool]):
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    brain = (z / 0.95) ** 2 + (y / 0.8) ** 2 + (x / 0.7) ** 2 < 1
    anatomy = np.zeros(shape)
    for _ in range(5):
        c, r = rng.uniform(-0.6, 0.6, 3), rng.uniform(0.2, 0.4)
        anatomy += np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / (2 * r * r))
    anatomy /= anatomy.max()
    maps = [lambda a: 0.2 + 0.7 * a, lambda a: 0.2 + 0.7 * a ** 2, lambda a: 0.9 - 0.7 * a,
            lambda a: 0.3 + 0.6 * np.abs(a - 0.5) * 2]
    data = np.zeros((4,) + tuple(shape), np.float32)
    for i, f in enumerate(maps):
        if available[i]:
            data[i] = np.where(brain, f(anatomy), 0.0)
    seg = np.where(brain, 0, -1).astype(np.int8)[None]
    props = {"case": f"case_{seed:03d}", "available": [bool(a) for a in available], "is_2d": False,
             "spacing": [1.0, 1.0, 1.0], "shape_after_resampling": list(shape)}
    return data, seg, props


def _plans(dims: int = 2, patch=(32, 32), epochs: int = 2, iters: int = 3, lambda_adv: float = 0.1) -> Dict:
    config = {
        "data_identifier": f"nnsynthPlans_{dims}d", "spatial_dims": dims, "spacing": [1.0, 1.0, 1.0],
        "median_shape": [16, 32, 32], "patch_size": list(patch), "num_adjacent_slices": 3 if dims == 2 else 1,
        "batch_size": 4, "fsq": dict(TINY_FSQ),
        "training": {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.0, "betas": [0.9, 0.9],
                     "schedule": "cosine", "warmup_iters": 0, "num_epochs": epochs, "iters_per_epoch": iters,
                     "val_iters": 1, "grad_clip": 12.0, "amp": False, "compile": False, "num_workers": 0,
                     "per_trainer": {"codebrain": {"min_lr": 1e-4}}},
        "loss": {"codebrain": {"psnr_weight_available": 5.0, "psnr_weight_missing": 20.0, "lambda_adv": lambda_adv,
                               "adv_start_fraction": 0.2, "lambda_grading": 1.0}},
        "augmentation": {"enabled": False},
    }
    return {"dataset_name": "Dataset991_CB", "plans_name": "nnsynthPlans", "planner": "test",
            "sequences": list(SEQUENCES), "channel_ids": [0, 1, 2, 3], "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2], "normalization": {"scheme": "percentile_clip"},
            "compute": {"device": "cpu"}, "configurations": {f"{dims}d": config}}


def _preprocessed(root: Path, plans: Dict, n_cases: int = 5, shape=(16, 32, 32)) -> Path:
    folder = root / "Dataset991_CB"
    config = next(iter(plans["configurations"].values()))
    availability = {1: (True, False, True, True), 2: (False, True, True, False)}
    for i in range(n_cases):
        data, seg, props = _tiny_case(i, shape, availability.get(i, (True,) * 4))
        save_case(folder / config["data_identifier"], f"case_{i:03d}", data, seg, props)
    save_json(plans, folder / "nnsynthPlans.json")
    save_json({"channel_names": {str(i): s for i, s in enumerate(SEQUENCES)}, "numTraining": n_cases,
               "file_ending": ".nii.gz"}, folder / "dataset.json")
    return folder


def _trainer(tmp_path: Path, plans: Dict, stage: Optional[int], **kw) -> CodeBrainTrainer:
    pre = tmp_path / "pre" / "Dataset991_CB"
    if not pre.exists():
        _preprocessed(tmp_path / "pre", plans)
    conf = next(iter(plans["configurations"]))
    return CodeBrainTrainer(plans, conf, 0, pre, tmp_path / "results" / "codebrain", device="cpu", stage=stage, **kw)


def test_stage_one_batches_and_a_few_iterations_improve_the_loss(tmp_path):
    plans = _plans(lambda_adv=0.0)
    tr = _trainer(tmp_path, plans, stage=1, num_epochs=1, iters_per_epoch=25)
    tr.initialize()
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(3e-3)  # the plans' per_trainer entry wins
    batch = tr._to_device(next(tr.train_iter))
    assert batch["image"].shape == (4, 12, 32, 32)
    avail, keep = batch["available"], batch["keep"]
    assert bool((keep <= avail).all())
    for a, k in zip(avail, keep):  # 0 < hidden < available (cases with 2+ sequences)
        assert 0 < int(k.sum()) < int(a.sum())
    # sequences a case lacks are zero in the stack
    lacks = ~avail
    assert float(batch["image"].view(4, 4, 3, 32, 32)[lacks].abs().sum()) == 0.0
    fixed = tr._to_device(tr.val_batches[0])
    with torch.no_grad():
        before = float(tr.compute_loss(fixed)[0])
    for _ in range(25):
        tr.train_step(tr._to_device(next(tr.train_iter)))
    with torch.no_grad():
        after, parts = tr.compute_loss(fixed)
    assert float(after) < before - 20.0, (before, float(after))  # weights 5 + 20: >= ~1 dB better
    assert parts["psnr_missing"] > 10.0
    tr.save_previews(tmp_path / "preview.png")
    assert (tmp_path / "preview.png").stat().st_size > 0


def test_two_stages_end_to_end_resume_and_frozen_stage_one(tmp_path, monkeypatch):
    monkeypatch.setattr(CodeBrainTrainer, "save_previews", lambda self, path: None)  # slow matplotlib; tested above
    plans = _plans(epochs=1, iters=4)
    both = _trainer(tmp_path, plans, stage=None)
    both.run_training()
    fold = tmp_path / "results" / "codebrain" / "fold_0"
    for name in ("checkpoint_final.pth", "validation/summary.json", "code_stats.json", "progress.png"):
        assert (fold / "stage1" / name).is_file(), name
        assert (fold / name).is_file(), name
    s1 = ckpt.load_checkpoint(fold / "stage1" / "checkpoint_final.pth")
    s2 = ckpt.load_checkpoint(fold / "checkpoint_final.pth")
    assert s1["extra"]["stage"] == 1 and s2["extra"]["stage"] == 2
    assert "discriminator" in s1["extra"]  # adversarial term on after 20% of the iterations
    # stage I weights unchanged by stage II; the prior trained
    for key, v in s1["network_weights"].items():
        if key.startswith(("posterior.", "common.", "decoder.")):
            assert torch.equal(v, s2["network_weights"][key]), key
    assert any(not torch.equal(v, s2["network_weights"][k]) for k, v in s1["network_weights"].items()
               if k.startswith("prior."))
    stats = load_json(fold / "code_stats.json")
    assert set(stats[-1]["accuracy"]) == set(SEQUENCES) and 0 < stats[-1]["codes_used"] <= 125
    summary = load_json(fold / "validation" / "summary.json")
    assert summary["per_case"] and "imputation" in summary["method"]
    assert "upper bound" in load_json(fold / "stage1" / "validation" / "summary.json")["method"]

    # a stage-II trainer loads the frozen stage I from the stage-I checkpoint
    st2 = _trainer(tmp_path, plans, stage=2)
    st2.initialize()
    net = st2.network
    assert all(not p.requires_grad for m in net.stage_one_modules() for p in m.parameters())
    assert all(p.requires_grad for p in net.prior.parameters())
    n_opt = sum(p.numel() for g in st2.optimizer.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in net.prior.parameters())
    torch.testing.assert_close(net.decoder.out.weight, s1["network_weights"]["decoder.out.weight"])

    # --c with more epochs: stage I is complete, so only stage II continues from its final checkpoint
    more = _trainer(tmp_path, plans, stage=None, num_epochs=2)
    more.run_training(continue_training=True)
    s1b = ckpt.load_checkpoint(fold / "stage1" / "checkpoint_final.pth")
    assert s1b["epoch"] == 1
    assert ckpt.load_checkpoint(fold / "checkpoint_final.pth")["epoch"] == 2


def test_stage_two_without_stage_one_is_a_user_error(tmp_path):
    tr = _trainer(tmp_path, _plans(), stage=2)
    with pytest.raises(NnsynthError, match="stage I"):
        tr.initialize()


def test_3d_stage_one_step(tmp_path):
    plans = _plans(dims=3, patch=(16, 16, 16), lambda_adv=0.0)
    tr = _trainer(tmp_path, plans, stage=1)
    tr.initialize()
    batch = tr._to_device(next(tr.train_iter))
    assert batch["image"].shape == (4, 4, 16, 16, 16)
    loss = tr.train_step(batch)
    assert math.isfinite(loss)
    vol = tr.impute_volume(np.random.rand(4, 10, 20, 18).astype(np.float32), [0, 2])
    assert vol.shape == (4, 10, 20, 18)
