"""The shared training engine with the Seq2Seq trainer on tiny preprocessed data (16x32x32, 2 epochs x 3 iterations)."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import pytest
import torch

from nnsynth.preprocessing.storage import save_case
from nnsynth.utils.files import load_json, save_json

SEQUENCES = ("T1", "T1Gd", "T2", "Flair")


def tiny_plans(data_identifier: str = "nnsynthPlans_2d", patch=(32, 32), epochs: int = 2, iters: int = 3,
               spatial_dims: int = 2) -> Dict:
    """A hand-written plans dict following documentation/architecture.md, sized for a unit test."""
    config = {
        "data_identifier": data_identifier, "spatial_dims": spatial_dims, "spacing": [1.0, 1.0, 1.0],
        "median_shape": [16, 32, 32], "patch_size": list(patch), "num_adjacent_slices": 3 if spatial_dims == 2 else 1,
        "batch_size": 4,
        "network": {"encoder_channels": [8, 16, 16], "encoder_kernel_sizes": [7, 3, 3], "num_res_blocks": 1,
                    "num_hyper_res_blocks": 1, "hyper_bank_size": 4, "code_length": 8, "norm": "instance",
                    "negative_slope": 0.2, "padding_mode": "reflect"},
        "training": {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 1e-4, "betas": [0.9, 0.999],
                     "schedule": "cosine", "warmup_iters": 2, "num_epochs": epochs, "iters_per_epoch": iters,
                     "val_iters": 2, "grad_clip": 12.0, "amp": True, "compile": False, "num_workers": 0},
        "loss": {"lambda_l1": 10.0, "lambda_perceptual": 0.0},
        "augmentation": {},
    }
    return {"dataset_name": "Dataset990_Tiny", "plans_name": "nnsynthPlans", "planner": "test",
            "sequences": list(SEQUENCES), "channel_ids": [0, 1, 2, 3], "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2], "normalization": {"scheme": "percentile_clip"},
            "compute": {"device": "cpu"}, "configurations": {"2d" if spatial_dims == 2 else "3d": config}}


def tiny_case(seed: int, shape=(16, 32, 32), available: Sequence[bool] = (True,) * 4):
    """Four sequences that are different intensity maps of one shared smooth 'anatomy' inside an ellipsoid."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    brain = (z / 0.95) ** 2 + (y / 0.8) ** 2 + (x / 0.7) ** 2 < 1
    anatomy = np.zeros(shape)
    for _ in range(6):
        c = rng.uniform(-0.6, 0.6, 3)
        r = rng.uniform(0.15, 0.4)
        anatomy += np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / (2 * r * r))
    anatomy = anatomy / anatomy.max()
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


def make_preprocessed(root: Path, n_cases: int = 6, plans: Optional[Dict] = None,
                      availability: Optional[Dict[int, Sequence[bool]]] = None, shape=(16, 32, 32)) -> Path:
    """nnSynth_preprocessed/Dataset990_Tiny with ``n_cases`` tiny cases; returns the dataset folder."""
    plans = plans or tiny_plans()
    folder = root / "Dataset990_Tiny"
    config = next(iter(plans["configurations"].values()))
    for i in range(n_cases):
        avail = (availability or {}).get(i, (True,) * 4)
        data, seg, props = tiny_case(i, shape, avail)
        save_case(folder / config["data_identifier"], f"case_{i:03d}", data, seg, props)
    save_json(plans, folder / "nnsynthPlans.json")
    save_json({"channel_names": {str(i): s for i, s in enumerate(SEQUENCES)}, "numTraining": n_cases,
               "file_ending": ".nii.gz"}, folder / "dataset.json")
    save_json({"note": "test fingerprint"}, folder / "dataset_fingerprint.json")
    return folder


def make_trainer(pre: Path, out: Path, fold=0, plans: Optional[Dict] = None, **kwargs):
    from nnsynth.training.trainers.seq2seq import Seq2SeqTrainer
    plans = plans or load_json(pre / "nnsynthPlans.json")
    config = next(iter(plans["configurations"]))
    return Seq2SeqTrainer(plans, config, fold, pre, out, "cpu", **kwargs)


def _no_final_validation(trainer):
    trainer.final_validation = lambda: None
    return trainer


def interrupt_after_epoch(trainer, epoch: int = 0) -> None:
    """Train until Ctrl-C arrives at the end of ``epoch``: the state a killed run leaves for ``--c``."""
    def stop(e):
        if e == epoch:
            raise KeyboardInterrupt
    trainer.on_epoch_end = stop
    with pytest.raises(KeyboardInterrupt):
        trainer.run_training()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real 2-epoch x 3-iteration run shared by the artefact/improvement/checkpoint tests."""
    root = tmp_path_factory.mktemp("engine")
    pre = make_preprocessed(root / "pre")
    out = root / "results" / "seq2seq__nnsynthPlans__2d"
    trainer = make_trainer(pre, out, num_epochs=2, iters_per_epoch=3)
    trainer.run_training()
    return trainer, pre, out


def test_artefacts(trained):
    trainer, pre, out = trained
    fold = out / "fold_0"
    for name in ("checkpoint_final.pth", "checkpoint_best.pth", "checkpoint_latest.pth", "training_log.txt",
                 "progress.png", "validation/summary.json", "preview_epoch_0001.png"):
        assert (fold / name).is_file(), name
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        assert (out / name).is_file(), name
    assert (pre / "splits_final.json").is_file()
    log = (fold / "training_log.txt").read_text()
    assert "epoch 2/2" in log and "Full-volume validation" in log
    summary = load_json(fold / "validation" / "summary.json")
    # 2 validation cases x 4 targets, each from the 3 other sequences
    assert len(summary["per_case"]) == 8 and all(len(r["sources"]) == 3 for r in summary["per_case"])
    assert set(summary["per_case"][0]) >= {"case", "target", "psnr", "ssim", "mae"}
    assert math.isfinite(summary["mean"]["psnr"]) and set(summary["per_target"]) == set(SEQUENCES)
    state = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    for key in ("network_weights", "optimizer_state", "scheduler_state", "grad_scaler_state", "rng_state",
                "sampler_state", "epoch", "trainer_name", "init_args", "plans_identifier", "logs"):
        assert key in state, key
    assert state["epoch"] == 2 and state["trainer_name"] == "seq2seq" and state["plans_identifier"] == "nnsynthPlans"
    assert len(state["logs"]["val_psnr"]) == 2 and len(state["logs"]["lr"]) == 2


def test_model_improves(trained):
    trainer, _, _ = trained
    first, last = trainer.logs["train_loss"][0], trainer.logs["train_loss"][-1]
    assert last < 0.75 * first, trainer.logs["train_loss"]   # eq. 1 loss falls clearly within 6 steps
    fresh = make_trainer(trainer.preprocessed_dataset_folder, trainer.output_folder.parent / "fresh")
    fresh.initialize()
    before = fresh.validate()
    after = trainer.validate()
    # same fixed validation patches; L1 drop shows in the intensities: compare raw MAE on them
    def mae(t):
        with torch.no_grad():
            errs = [float((t.predict(t._to_device(b)).clamp(0, 1) - b["target"]).abs().mean()) for b in t.val_batches]
        return float(np.mean(errs))
    assert mae(trainer) < 0.75 * mae(fresh)
    assert math.isfinite(after["psnr"]) and math.isfinite(before["psnr"])


def test_cpu_optimizer_is_the_fused_kernel_with_the_reference_update(trained):
    """The engine steps CPU and CUDA parameters with the fused AdamW kernel (a share of each CPU step saved);
    it must give the per-tensor implementation's update."""
    trainer, _, _ = trained
    assert trainer.optimizer.param_groups[0]["fused"] is True
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(16, 8))
    b = torch.nn.Parameter(a.detach().clone())
    fused = trainer.build_optimizer([a])
    cfg = trainer.training
    reference = torch.optim.AdamW([b], lr=float(cfg["lr"]), betas=tuple(cfg["betas"]),
                                  weight_decay=float(cfg["weight_decay"]), foreach=False)
    for _ in range(5):
        g = torch.randn(16, 8)
        a.grad, b.grad = g.clone(), g.clone()
        fused.step()
        reference.step()
    assert not torch.equal(a.detach(), torch.zeros(16, 8))
    assert torch.allclose(a.detach(), b.detach(), atol=1e-6, rtol=1e-5)


def test_checkpoint_of_the_per_tensor_optimizer_resumes_fused(trained, tmp_path):
    """Checkpoints written before the fused kernel (or on a device without it) continue with this machine's."""
    trainer, pre, out = trained
    state = torch.load(out / "fold_0" / "checkpoint_final.pth", weights_only=False)
    for group in state["optimizer_state"]["param_groups"]:
        group["fused"], group["foreach"] = None, None
    fresh = make_trainer(pre, tmp_path / "resumed", num_epochs=3, iters_per_epoch=3)
    fresh.initialize()
    fresh.load_checkpoint_state(state)
    assert all(g["fused"] is True for g in fresh.optimizer.param_groups)
    steps = [float(fresh.optimizer.state[p]["step"]) for p in fresh._optimized_params]
    fresh.train_step(fresh._to_device(next(fresh.train_iter)))      # the fused kernel takes the loaded state
    assert [float(fresh.optimizer.state[p]["step"]) for p in fresh._optimized_params] == [s + 1 for s in steps]


class _InfGradient(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (what instance normalisation of a background-only patch
    can produce after enough layers)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


def test_a_non_finite_gradient_skips_the_step_and_a_run_of_them_stops(trained, tmp_path, caplog):
    from nnsynth.exceptions import NnsynthError
    from nnsynth.training.engine import MAX_SKIPPED_STEPS_IN_A_ROW
    _, pre, _ = trained
    trainer = make_trainer(pre, tmp_path / "inf", num_epochs=1, iters_per_epoch=3)
    trainer.initialize()
    batch = trainer._to_device(next(trainer.train_iter))
    compute = trainer.compute_loss
    trainer.compute_loss = lambda b: (_InfGradient.apply(compute(b)[0]), {})
    before = _weights(trainer)
    iteration = trainer.scheduler.iteration
    with caplog.at_level(logging.WARNING):
        loss = trainer.train_step(batch)
    assert math.isfinite(loss) and "Skipped an optimizer step" in caplog.text
    after = _weights(trainer)
    assert all(torch.equal(after[k], before[k]) for k in before)          # untouched, not NaN
    assert trainer.scheduler.iteration == iteration + 1 and trainer.skipped_steps == 1
    trainer.compute_loss = compute                                        # a good step resets the count
    trainer.train_step(batch)
    assert trainer._skipped_in_a_row == 0 and all(torch.isfinite(v).all() for v in _weights(trainer).values())
    trainer.compute_loss = lambda b: (_InfGradient.apply(compute(b)[0]), {})
    for _ in range(MAX_SKIPPED_STEPS_IN_A_ROW - 1):
        trainer.train_step(batch)
    with pytest.raises(NnsynthError, match="non-finite gradient norm"):
        trainer.train_step(batch)


def test_corrupt_checkpoint_falls_back(trained, tmp_path, caplog):
    from nnsynth.training.checkpointing import find_resume_checkpoint
    trainer, _, out = trained
    fold = tmp_path / "fold_0"
    fold.mkdir()
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        (fold / name).write_bytes((out / "fold_0" / name).read_bytes())
    data = (fold / "checkpoint_final.pth").read_bytes()
    (fold / "checkpoint_final.pth").write_bytes(data[: len(data) // 2])  # truncated
    with caplog.at_level(logging.WARNING):
        path, state = find_resume_checkpoint(fold)
    assert path.name == "checkpoint_latest.pth" and state["epoch"] == 2
    assert "damaged checkpoint" in caplog.text and "checkpoint_final.pth" in caplog.text
    (fold / "checkpoint_latest.pth").write_bytes(b"garbage")
    assert find_resume_checkpoint(fold) == (None, None)


def _weights(trainer) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.network.state_dict().items()}


def test_exact_resume(tmp_path):
    """4 uninterrupted epochs == Ctrl-C inside epoch 1, resume, stop after epoch 2, resume to the end."""
    pre = make_preprocessed(tmp_path / "pre", n_cases=5)
    kw = dict(num_epochs=4, iters_per_epoch=2)
    ref = _no_final_validation(make_trainer(pre, tmp_path / "ref", **kw))
    ref.run_training()

    # 1) Ctrl-C inside the 2nd step of epoch 1 (4th step overall): resumable from that very step
    a = _no_final_validation(make_trainer(pre, tmp_path / "run", **kw))
    calls = {"n": 0}
    original = a.compute_loss

    def interrupt(batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(batch)
    a.compute_loss = interrupt
    with pytest.raises(KeyboardInterrupt):
        a.run_training()
    state = torch.load(tmp_path / "run" / "fold_0" / "checkpoint_latest.pth", weights_only=False)
    assert (state["epoch"], state["iteration_in_epoch"]) == (1, 1)

    # 2) resume, stop after epoch index 1 (2 epochs done)
    b = _no_final_validation(make_trainer(pre, tmp_path / "run", **kw))

    def stop_after_two(epoch):
        if epoch == 1:
            raise KeyboardInterrupt
    b.on_epoch_end = stop_after_two
    with pytest.raises(KeyboardInterrupt):
        b.run_training(continue_training=True)
    assert torch.load(tmp_path / "run" / "fold_0" / "checkpoint_latest.pth", weights_only=False)["epoch"] == 2

    # 3) resume for the last 2 epochs
    c = _no_final_validation(make_trainer(pre, tmp_path / "run", **kw))
    c.run_training(continue_training=True)
    wr, wc = _weights(ref), _weights(c)
    for k in wr:
        torch.testing.assert_close(wc[k], wr[k], rtol=1e-5, atol=1e-6)
    assert c.logs["train_loss"] == pytest.approx(ref.logs["train_loss"], rel=1e-5)
    assert c.logs["val_psnr"] == pytest.approx(ref.logs["val_psnr"], rel=1e-5)


def test_max_minutes_stops_with_final_checkpoint(tmp_path):
    pre = make_preprocessed(tmp_path / "pre", n_cases=5)
    t = _no_final_validation(make_trainer(pre, tmp_path / "out", num_epochs=1000, iters_per_epoch=2, max_minutes=0.002))
    t.run_training()
    state = torch.load(tmp_path / "out" / "fold_0" / "checkpoint_final.pth", weights_only=False)
    assert state["epoch"] < 1000 and state["epoch"] == t.epoch
    # --c continues the same run (more time): the state is resumable
    t2 = make_trainer(pre, tmp_path / "out", num_epochs=1000, iters_per_epoch=2, max_minutes=0.002)
    t2.initialize()
    assert t2.load_for_resume() and t2.epoch == t.epoch


def test_splits(tmp_path):
    from nnsynth.exceptions import NnsynthError
    from nnsynth.training.splits import fold_cases, make_splits
    cases = [f"c{i:02d}" for i in range(12)]
    splits = make_splits(cases)
    assert len(splits) == 5 and make_splits(cases) == splits
    vals = [c for s in splits for c in s["val"]]
    assert sorted(vals) == cases and [len(s["val"]) for s in splits] == [3, 3, 2, 2, 2]
    assert all(set(s["train"]).isdisjoint(s["val"]) for s in splits)
    assert make_splits(cases[:3]) and len(make_splits(cases[:3])) == 3   # leave-one-out fallback
    assert make_splits(cases[:1]) == []
    train, val = fold_cases(tmp_path, cases[:1], "all")
    assert train == val == cases[:1]
    with pytest.raises(NnsynthError, match="all"):
        fold_cases(tmp_path / "one", cases[:1], 0)
    with pytest.raises(NnsynthError):
        fold_cases(tmp_path, cases, "seven")


def test_schedules():
    from nnsynth.exceptions import PlansError
    from nnsynth.training.schedules import lr_factor
    assert lr_factor(0, 100, 10, "poly") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "poly") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, "poly") == pytest.approx(0.0)
    assert lr_factor(100, 100, 0, "cosine", final_fraction=0.1) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, "poly") == pytest.approx(0.5 ** 0.9)
    with pytest.raises(PlansError):
        lr_factor(0, 10, 0, "step")


def test_registry(monkeypatch):
    from nnsynth.exceptions import NnsynthError
    from nnsynth.training.registry import TrainerNotAvailableError, get_trainer
    from nnsynth.training.trainers.seq2seq import Seq2SeqTrainer
    assert get_trainer("seq2seq") is Seq2SeqTrainer
    with pytest.raises(NnsynthError, match="Unknown trainer"):
        get_trainer("nope")
    monkeypatch.setenv("NNSYNTH_TRAINERS", "mine=nnsynth.training.trainers.seq2seq:Seq2SeqTrainer")
    assert get_trainer("mine") is Seq2SeqTrainer
    assert get_trainer("whatever", "nnsynth.training.trainers.seq2seq:Seq2SeqTrainer") is Seq2SeqTrainer
    with pytest.raises(NnsynthError, match="not a subclass"):
        get_trainer("x", "nnsynth.training.splits:Path")
    import importlib.util
    for name in ("vq_seq2seq", "tsf_seq2seq", "codebrain", "seg_from_latent"):
        if importlib.util.find_spec(f"nnsynth.training.trainers.{name}") is None:
            with pytest.raises(TrainerNotAvailableError):
                get_trainer(name)


def test_time_budget_fit_shrinks_then_grows_back_within_the_plan(tmp_path):
    """A slow first epoch (busy machine) shortens the schedule; faster epochs later give the epochs back, never
    more than planned."""
    import time as _time
    pre = make_preprocessed(tmp_path / "pre", n_cases=5)
    t = make_trainer(pre, tmp_path / "out", num_epochs=6, iters_per_epoch=2, max_minutes=2.0)
    t.initialize()
    t._epochs_before_run = 0
    now = _time.time()
    t._run_start, t.epoch, t.logs["epoch_time"] = now - 60.0, 1, [60.0]      # 60 s per epoch, 60 s left
    t._fit_schedule_to_time_budget()
    assert t.num_epochs == 2 and t.scheduler.total_iters == 2 * 2
    t._run_start, t.epoch, t.logs["epoch_time"] = now - 70.0, 2, [60.0, 10.0]  # 35 s per epoch, 50 s left
    t._fit_schedule_to_time_budget()
    assert t.num_epochs == 4 and t.scheduler.total_iters == 4 * 2
    t._run_start, t.epoch, t.logs["epoch_time"] = now - 4.0, 2, [2.0, 2.0]     # plenty of time: the plan's 6
    t._fit_schedule_to_time_budget()
    assert t.num_epochs == 6


def test_a_budget_that_outlasts_the_planned_epochs_says_so(tmp_path, caplog):
    """--max-minutes never trains past num_epochs; when the epochs end first with minutes left, the log says
    how to raise the ceiling; with less than a minute of the budget left it stays quiet."""
    pre = make_preprocessed(tmp_path / "pre", n_cases=5)
    t = _no_final_validation(make_trainer(pre, tmp_path / "out", num_epochs=1, iters_per_epoch=1, max_minutes=30.0))
    with caplog.at_level(logging.INFO, logger="nnsynth.training.engine"):
        t.run_training()
    assert t.epoch == 1
    assert any("All 1 planned epochs done" in r.getMessage() and "--epochs" in r.getMessage() for r in caplog.records)
    caplog.clear()
    t = _no_final_validation(make_trainer(pre, tmp_path / "out2", num_epochs=1, iters_per_epoch=1, max_minutes=0.5))
    with caplog.at_level(logging.INFO, logger="nnsynth.training.engine"):
        t.run_training()
    assert not any("planned epochs done" in r.getMessage() for r in caplog.records)
