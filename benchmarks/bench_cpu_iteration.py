"""Time one training iteration (forward + L1 backward + Adam step) of the real Seq2Seq network at the size
the default CPU plan chooses, on the current machine's threads (documentation/plans.md, "CPU budget").

    python benchmarks/bench_cpu_iteration.py [--threads 2] [--plans path/to/nnsynthPlans.json]

Without ``--plans`` it plans for a BraTS-like fingerprint (4 sequences, 1 mm, 140x170x140 after crop) and
for the demo dataset's size (2 mm, 86x99x81), both with ``--device cpu``.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from nnsynth.networks.seq2seq import Seq2SeqNet
from nnsynth.planning.planner import CPU_REFERENCE, CPU_REFERENCE_NETWORK_KEYS, DefaultPlanner
from nnsynth.training.engine import fused_optimizer


def _fp(shape, spacing, n=4, cases=24):
    return {"sequences": ["T1", "T1Gd", "T2", "Flair"][:n], "channel_ids": list(range(n)), "num_cases": cases,
            "is_2d": False, "spacings": [list(spacing)] * cases, "shapes_after_crop": [list(shape)] * cases}


def time_iteration(conf: dict, num_sequences: int, repeats: int = 5) -> float:
    k = conf["num_adjacent_slices"]
    net = Seq2SeqNet(num_sequences, k, 2, conf["network"])
    opt = torch.optim.Adam(net.parameters(), 2e-4, fused=fused_optimizer(torch.device("cpu")))   # as the engine
    x = torch.rand(conf["batch_size"], k, *conf["patch_size"])
    y = torch.rand_like(x)
    tgt = torch.randint(0, num_sequences, (conf["batch_size"],))
    times = []
    for i in range(repeats + 2):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = (net(x, tgt) - y).abs().mean()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return float(np.median(times[2:]))  # first two warm up allocators


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plans", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = {}
    if args.plans:
        plans = json.load(open(args.plans))
        cases["given plans"] = (plans["configurations"]["2d"], len(plans["sequences"]))
    else:
        for name, shape, sp in (("BraTS-like 1 mm", (140, 170, 140), (1.0, 1.0, 1.0)),
                                ("demo 2 mm", (86, 99, 81), (2.0, 2.0, 2.0))):
            p = DefaultPlanner(_fp(shape, sp), "Dataset999_X", device="cpu", memory_gb=8).plan(["2d"])
            cases[name] = (p["configurations"]["2d"], 4)
        ref = dict(cases["BraTS-like 1 mm"][0])
        ref["network"] = dict(ref["network"], **{k: CPU_REFERENCE[k] for k in CPU_REFERENCE_NETWORK_KEYS})
        ref["patch_size"], ref["batch_size"] = CPU_REFERENCE["patch_size"], CPU_REFERENCE["batch_size"]
        cases["CPU_REFERENCE"] = (ref, 4)
    for name, (conf, n) in cases.items():
        t = time_iteration(conf, n)
        print(f"{name}: patch {conf['patch_size']} batch {conf['batch_size']} k {conf['num_adjacent_slices']} "
              f"channels {conf['network']['encoder_channels']}: {t:.3f} s/iteration on {args.threads} threads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
