"""Where a training iteration's time goes, inside the real trainer (data, augmentation and the whole step).

    python benchmarks/profile_training_step.py --plans PRE/Dataset501_BrainDemo/nnsynthPlans.json [--trainer seq2seq]
        [--configuration 2d] [--steps 60] [--threads 2] [--json out.json]

Reports, for the plan as nnsynth_train would run it on this machine:
- milliseconds per iteration spent drawing and augmenting the batch against the training step itself;
- the per-epoch work outside the steps (validation patches, progress.png, checkpoint, preview PNG);
- a torch.profiler table of the costliest operators and of the convolutions by input shape (``--profile-steps``).

The model folder is a temporary one; the preprocessed data is only read. Numbers move by 10-20 % between runs on
a shared 2-core machine: compare alternating runs, and check a gain against whole epochs of a real run.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict

import torch

logger = logging.getLogger("profile_training_step")


def _mean_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # first call warms caches and lazily built state
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def profile(plans_path: Path, trainer_name: str, configuration: str, fold: str, steps: int, warmup: int,
            profile_steps: int) -> Dict[str, Any]:
    from nnsynth.training.progress import plot_progress
    from nnsynth.training.registry import get_trainer

    plans = json.loads(plans_path.read_text())
    with tempfile.TemporaryDirectory(prefix="nnsynth_profile_") as tmp:
        trainer = get_trainer(trainer_name)(plans, configuration, fold, plans_path.parent, Path(tmp), "cpu")
        trainer.initialize()
        trainer.fold_folder.mkdir(parents=True, exist_ok=True)
        trainer.train_network.train()

        load_s = step_s = 0.0
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            batch = trainer._to_device(next(trainer.train_iter))
            t1 = time.perf_counter()
            trainer.train_step(batch)
            t2 = time.perf_counter()
            if i >= warmup:
                load_s += t1 - t0
                step_s += t2 - t1

        # a plausible log of 70 epochs, so progress.png draws what a late epoch draws
        for key in trainer.logs:
            trainer.logs[key] = [0.1 * (i + 1) for i in range(70)]
        epoch_work = {
            "validation_s": _mean_seconds(trainer.validate, 2),
            "progress_png_s": _mean_seconds(lambda: plot_progress(trainer.logs, trainer.fold_folder / "progress.png",
                                                                  trainer.progress_panels()), 2),
            "checkpoint_s": _mean_seconds(lambda: trainer.save_checkpoint(trainer.fold_folder / "profile.pth"), 2),
            "preview_png_s": _mean_seconds(lambda: trainer.save_previews(trainer.fold_folder / "preview.png"), 2),
        }

        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile
        batches = [trainer._to_device(next(trainer.train_iter)) for _ in range(profile_steps)]
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for batch in batches:
                trainer.train_step(batch)

    n = max(1, profile_steps)

    def ms_per_step(microseconds: float) -> float:
        return microseconds / 1000.0 / n

    ops = Counter({e.key: e.self_cpu_time_total for e in prof.key_averages()})
    convs, calls = Counter(), Counter()
    for event in prof.key_averages(group_by_input_shape=True):
        kind = {"aten::mkldnn_convolution": "forward", "aten::convolution_backward": "backward"}.get(event.key)
        if kind:
            key = f"{kind} {event.input_shapes[:2]}"
            convs[key] += event.self_cpu_time_total
            calls[key] += event.count
    return {
        "trainer": trainer_name, "configuration": configuration, "threads": torch.get_num_threads(),
        "batch_size": int(plans["configurations"][configuration].get("batch_size", 0)),
        "steps": steps, "load_ms": 1000.0 * load_s / steps, "step_ms": 1000.0 * step_s / steps,
        "epoch_work_s": epoch_work,
        "profile": {
            "self_cpu_ms_per_step": ms_per_step(sum(ops.values())),
            "top_ops_ms_per_step": {k: ms_per_step(v) for k, v in ops.most_common(12)},
            "convolutions_ms_per_step": {f"{k} x{calls[k] // n}": ms_per_step(v) for k, v in convs.most_common(12)},
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plans", type=Path, required=True, help="nnsynthPlans.json inside a preprocessed dataset folder")
    p.add_argument("--trainer", default="seq2seq")
    p.add_argument("--configuration", "-c", default="2d")
    p.add_argument("--fold", default="all")
    p.add_argument("--steps", type=int, default=60, help="timed iterations (after --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile-steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = profile(args.plans, args.trainer, args.configuration, args.fold, args.steps, args.warmup,
                     args.profile_steps)
    logger.info("%s %s, batch %d, %d threads: %.1f ms data + %.1f ms step per iteration (data %.1f %%)",
                result["trainer"], result["configuration"], result["batch_size"], result["threads"],
                result["load_ms"], result["step_ms"],
                100.0 * result["load_ms"] / (result["load_ms"] + result["step_ms"]))
    logger.info("per epoch outside the steps: %s",
                ", ".join(f"{k} {v:.2f}" for k, v in result["epoch_work_s"].items()))
    logger.info("profiled step: %.1f ms of operator self time", result["profile"]["self_cpu_ms_per_step"])
    for title, table in (("operators", "top_ops_ms_per_step"), ("convolutions", "convolutions_ms_per_step")):
        logger.info("costliest %s (ms per step):", title)
        for name, ms in result["profile"][table].items():
            logger.info("  %7.1f  %s", ms, name)
    if args.json:
        from nnsynth.utils.files import save_json
        save_json(result, args.json)


if __name__ == "__main__":
    main()
