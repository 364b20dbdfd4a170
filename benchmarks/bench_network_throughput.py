"""Seq2SeqNet training-step throughput and peak memory (forward + backward + Adam step).

Examples:
    python benchmarks/bench_network_throughput.py --preset cpu --threads 2
    python benchmarks/bench_network_throughput.py --preset cpu paper --threads 2 --iters 3
    python benchmarks/bench_network_throughput.py --plans PRE/Dataset501_X/nnsynthPlans.json --configuration 2d
    python benchmarks/bench_network_throughput.py --encoder-channels 32 64 128 --patch-size 96 96 96 \
        --spatial-dims 3 --in-channels 1 --batch-size 2 --device cuda

Each configuration runs in a fresh subprocess so that the CPU peak (ru_maxrss) belongs to it alone.
On CUDA the peak is torch.cuda.max_memory_allocated. Targets are drawn at random per sample (distinct codes,
the grouped-convolution path), unless --same-code. --bf16 measures bfloat16 autocast, which nnsynth_train does not
use on CPU (mixed precision is for CUDA only).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue as queue_module
import resource
import sys
import time
from typing import Any, Dict, List

PRESETS: Dict[str, Dict[str, Any]] = {
    # the reference CPU scale and the paper's network (Seq2Seq public code)
    "cpu": {"encoder_channels": [16, 32, 64], "num_res_blocks": 6, "num_hyper_res_blocks": 6,
            "patch_size": [128, 128], "in_channels": 3, "batch_size": 4, "spatial_dims": 2},
    "paper": {"encoder_channels": [64, 128, 256], "num_res_blocks": 6, "num_hyper_res_blocks": 6,
              "patch_size": [128, 128], "in_channels": 3, "batch_size": 4, "spatial_dims": 2},
}


def _run_one(cfg: Dict[str, Any], queue) -> None:
    import torch

    from nnsynth.networks import DEFAULT_SEQ2SEQ_NETWORK, Seq2SeqNet, count_parameters
    from nnsynth.training.engine import fused_optimizer

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    device = torch.device(cfg["device"])
    network = dict(DEFAULT_SEQ2SEQ_NETWORK)
    network.update(cfg.get("network", {}))
    network["encoder_channels"] = cfg["encoder_channels"]
    network["num_res_blocks"] = cfg["num_res_blocks"]
    network["num_hyper_res_blocks"] = cfg["num_hyper_res_blocks"]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    net = Seq2SeqNet(cfg["num_sequences"], cfg["in_channels"], cfg["spatial_dims"], network).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, fused=fused_optimizer(device))   # as the engine steps
    b = cfg["batch_size"]
    x = torch.rand(b, cfg["in_channels"], *cfg["patch_size"], device=device)
    y = torch.rand_like(x)
    gen = torch.Generator().manual_seed(1)
    needs_source = net.joint_input or net.source_conditioning
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        if cfg["same_code"]:
            target = torch.zeros(b, dtype=torch.long)
        else:
            target = torch.randperm(cfg["num_sequences"], generator=gen)[:b] if b <= cfg["num_sequences"] \
                else torch.randint(0, cfg["num_sequences"], (b,), generator=gen)
        # a joint-input or source-conditioned encoder must be told what it reads: one other sequence per sample
        # (the joint encoder costs the same whether one or all of a row's slots are filled)
        source = (target + 1) % cfg["num_sequences"] if needs_source else None
        opt.zero_grad(set_to_none=True)
        # --bf16: bfloat16 autocast of the forward pass (not what nnsynth_train does on CPU: the training engine keeps
        # mixed precision to CUDA); measures what it would buy on a CPU with bfloat16 instructions
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["bf16"]):
            out = net(x, target.to(device), None, None if source is None else source.to(device))
        loss = (out.float() - y).abs().mean()
        loss.backward()
        opt.step()

    for _ in range(cfg["warmup"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: List[float] = []
    for _ in range(cfg["iters"]):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    result = {
        "name": cfg["name"] + (" bf16" if cfg["bf16"] else ""), "device": str(device),
        "channels": "/".join(map(str, cfg["encoder_channels"])),
        "blocks": f"{cfg['num_res_blocks']}+{cfg['num_hyper_res_blocks']}",
        "patch": "x".join(map(str, cfg["patch_size"])), "k": cfg["in_channels"], "batch": b,
        "params_M": count_parameters(net) / 1e6, "s_per_iter": median, "samples_per_s": b / median,
        "feature_map_voxels_M": net.estimate_feature_map_voxels(cfg["patch_size"]) / 1e6 * b,
    }
    if device.type == "cuda":
        result["peak_mem_MB"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
        result["peak_mem_MB"] = rss_after / 1024
        result["peak_mem_delta_MB"] = (rss_after - rss_before) / 1024
    queue.put(result)


def _from_plans(path: str, configuration: str) -> Dict[str, Any]:
    with open(path) as f:
        plans = json.load(f)
    conf = plans["configurations"][configuration]
    net = conf["network"]
    return {"encoder_channels": net["encoder_channels"], "num_res_blocks": net["num_res_blocks"],
            "num_hyper_res_blocks": net["num_hyper_res_blocks"], "patch_size": conf["patch_size"],
            "in_channels": conf.get("num_adjacent_slices", 1) if conf["spatial_dims"] == 2 else 1,
            "batch_size": conf["batch_size"], "spatial_dims": conf["spatial_dims"], "network": net,
            "num_sequences": len(plans["sequences"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="*", choices=sorted(PRESETS), default=None)
    p.add_argument("--plans", help="nnsynthPlans.json to take the network/patch/batch from")
    p.add_argument("--configuration", default="2d")
    p.add_argument("--encoder-channels", nargs="+", type=int)
    p.add_argument("--num-res-blocks", type=int, default=6)
    p.add_argument("--num-hyper-res-blocks", type=int, default=6)
    p.add_argument("--patch-size", nargs="+", type=int)
    p.add_argument("--spatial-dims", type=int, default=2)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-sequences", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--same-code", action="store_true", help="one target for the whole batch (plain conv path)")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast of the forward pass (nnsynth_train keeps fp32 on CPU)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)

    configs: List[Dict[str, Any]] = []
    common = {"device": args.device, "threads": args.threads, "iters": args.iters, "warmup": args.warmup,
              "same_code": args.same_code, "num_sequences": args.num_sequences, "bf16": args.bf16}
    if args.plans:
        configs.append({"name": f"plans:{args.configuration}", **common, **_from_plans(args.plans, args.configuration)})
    for name in args.preset or []:
        configs.append({"name": name, **common, **PRESETS[name]})
    if args.encoder_channels:
        configs.append({"name": "custom", **common, "encoder_channels": args.encoder_channels,
                        "num_res_blocks": args.num_res_blocks, "num_hyper_res_blocks": args.num_hyper_res_blocks,
                        "patch_size": args.patch_size or [128, 128], "spatial_dims": args.spatial_dims,
                        "in_channels": args.in_channels, "batch_size": args.batch_size})
    if not configs:
        configs.append({"name": "cpu", **common, **PRESETS["cpu"]})

    ctx = mp.get_context("spawn")
    rows = []
    for cfg in configs:
        queue = ctx.Queue()
        proc = ctx.Process(target=_run_one, args=(cfg, queue))
        proc.start()
        row = None
        while row is None:
            try:
                row = queue.get(timeout=5.0)
            except queue_module.Empty:
                if not proc.is_alive():   # crashed (its traceback is above): do not wait forever
                    raise SystemExit(f"configuration {cfg['name']} failed in its subprocess "
                                     f"(exit code {proc.exitcode})")
        proc.join()
        rows.append(row)
    cols = ["name", "device", "channels", "blocks", "patch", "k", "batch", "params_M", "s_per_iter", "samples_per_s",
            "peak_mem_MB", "feature_map_voxels_M"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
