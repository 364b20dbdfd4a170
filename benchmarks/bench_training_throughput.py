"""Training throughput of the Seq2Seq trainer: samples/s and peak memory for the default plan.

Plans a small demo dataset for the CPU (and, when CUDA is available, for the GPU), then times
``--iters`` optimisation steps after ``--warmup`` steps with the engine's own ``train_step``
(on CUDA: with the plans' AMP, and torch.compile where the plans switch it on; the warm-up steps absorb
compilation and cuDNN's first-call set-up).

    python benchmarks/bench_training_throughput.py [--work /tmp/nnsynth_bench_tp] [--iters 20]
    python benchmarks/bench_training_throughput.py --devices cuda -c 2d 3d    # GPU plans, both configurations
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

logger = logging.getLogger("nnsynth.bench")


def measure(pre: Path, plans_name: str, device: str, iters: int, warmup: int,
            configuration: str = "2d") -> Dict[str, object]:
    from nnsynth.training.trainers.seq2seq import Seq2SeqTrainer
    from nnsynth.utils.files import load_json
    plans = load_json(pre / f"{plans_name}.json")
    trainer = Seq2SeqTrainer(plans, configuration, "all", pre, pre.parent / "_throughput", device)
    trainer.initialize()
    for _ in range(warmup):
        trainer.train_step(trainer._to_device(next(trainer.train_iter)))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    data_time = 0.0
    for _ in range(iters):
        t0 = time.time()
        batch = trainer._to_device(next(trainer.train_iter))
        data_time += time.time() - t0
        trainer.train_step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.time() - t
    conf = plans["configurations"][configuration]
    out = {"device": device, "configuration": configuration, "plans_compute": plans.get("compute"),
           "patch_size": conf["patch_size"], "batch_size": conf["batch_size"],
           "num_adjacent_slices": conf.get("num_adjacent_slices"),
           "encoder_channels": conf["network"]["encoder_channels"], "iters": iters,
           "samples_per_s": iters * int(conf["batch_size"]) / elapsed, "s_per_iter": elapsed / iters,
           "data_fraction": data_time / elapsed, "torch_threads": torch.get_num_threads()}
    if device == "cuda":
        out["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    out["peak_process_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/nnsynth_bench_throughput"))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], default=None,
                   help="devices to time (default: cpu, and cuda when available)")
    p.add_argument("-c", "--configurations", nargs="+", choices=["2d", "3d"], default=["2d"],
                   help="configurations to time (default: 2d, the CPU default)")
    a = p.parse_args(argv)
    devices = a.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        p.error("--devices cuda: CUDA is not available on this machine")
    for var, sub in (("nnSynth_raw", "raw"), ("nnSynth_preprocessed", "preprocessed"), ("nnSynth_results", "results")):
        os.environ[var] = str(a.work / sub)
    from nnsynth.cli.plan_and_preprocess import cli as plan_cli
    from nnsynth.dataset.demo import make_demo_dataset
    if not list((a.work / "raw").glob("Dataset998_*")):
        make_demo_dataset(dataset=998, name="Throughput", num_cases=a.cases, num_test_cases=0, montage=False,
                          progress=False)
    results = []
    for device in devices:
        plans_name = "nnsynthPlans" if device == "cpu" else "nnsynthPlansGPU"
        pre = next((a.work / "preprocessed").glob("Dataset998_*"), None)
        if pre is None or not (pre / f"{plans_name}.json").is_file() or any(
                not (pre / f"{plans_name}_{c}").is_dir() for c in a.configurations):
            plan_cli(["-d", "998", "-c", *a.configurations, "--device", device, "--plans-name", plans_name])
            pre = next((a.work / "preprocessed").glob("Dataset998_*"))
        for configuration in a.configurations:
            # GPU steps are short: time more of them so the figure is not dominated by launch jitter
            iters = a.iters if device == "cpu" else a.iters * 5
            results.append(measure(pre, plans_name, device, iters, a.warmup, configuration))
            logger.info("%s %s: %.2f samples/s, %.3f s per step", device, configuration,
                        results[-1]["samples_per_s"], results[-1]["s_per_iter"])
    sys.stdout.write(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
