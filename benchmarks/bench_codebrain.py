"""CodeBrain on the demo dataset: stage-I reconstruction (upper bound) and stage-II imputation, one-to-one and
many-to-one, on held-out cases, optionally beside other trainers trained for the same time.

demo dataset -> nnsynth_plan_and_preprocess (2d) -> nnsynth_train codebrain 0 --max-minutes M (both stages)
-> for every fold-0 validation case (never trained on) and every scenario in the preprocessed space:
   O->O: each available sequence alone -> every other available one; M->O: all but one -> that one.
   Stage I decodes with the target's own posterior code (the upper bound); stage II with predicted codes.
-> CONTRACT.md section 5 metrics (PSNR, SSIM, MAE inside the brain mask; LPIPS with --lpips).
``--compare vq_seq2seq tsf_seq2seq`` trains those trainers for the same --minutes on the same fold and scores
them on the same scenarios (a trainer not available in this version is skipped with a note).

    python benchmarks/bench_codebrain.py --work /tmp/nnsynth_bench_codebrain --minutes 4
    python benchmarks/bench_codebrain.py --minutes 60 --spacing 2 --compare vq_seq2seq tsf_seq2seq

Writes ``results.json`` into --work and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np


def _score(data: np.ndarray, seg: np.ndarray, pred: np.ndarray, target: int, lpips: bool) -> Dict[str, float]:
    from nnsynth.evaluation.metrics import compute_metrics
    m = compute_metrics(data[target], pred, seg[0] >= 0, compute_lpips=lpips)
    return {k: float(v) for k, v in m.items() if v is not None}


def scenarios(available: Sequence[int]) -> List[tuple]:
    """(kind, given sources) pairs: each single source (O->O) and, with 3+ sequences, all-but-one (M->O)."""
    out = [("O->O", (s,)) for s in available]
    if len(available) >= 3:
        out += [("M->O", tuple(s for s in available if s != t)) for t in available]
    return out


def evaluate(name: str, volume_fn, cases: Sequence[str], data_folder: Path, sequences: Sequence[str],
             lpips: bool, all_at_once: bool) -> List[Dict[str, Any]]:
    """``volume_fn(data, given, target)`` -> (Z, Y, X); with ``all_at_once`` ``volume_fn(data, given)`` -> (C, ...)."""
    from nnsynth.preprocessing.storage import load_case
    rows = []
    for case in cases:
        data, seg, props = load_case(data_folder, case)
        available = [i for i, a in enumerate(props["available"]) if a]
        for kind, given in scenarios(available):
            targets = [t for t in available if t not in given]
            if kind == "M->O":
                targets = [t for t in available if t not in given][:1]
            full = volume_fn(data, list(given)) if all_at_once else None
            for t in targets:
                pred = full[t] if all_at_once else volume_fn(data, list(given), t)
                rows.append({"method": name, "case": case, "scenario": kind, "target": sequences[t],
                             "sources": [sequences[s] for s in given], **_score(data, seg, pred, t, lpips)})
    return rows


def summarise(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for method in sorted({r["method"] for r in rows}):
        out[method] = {}
        for kind in ("O->O", "M->O", "ALL"):
            sel = [r for r in rows if r["method"] == method and (kind == "ALL" or r["scenario"] == kind)]
            if sel:
                out[method][kind] = {k: float(np.mean([r[k] for r in sel if k in r]))
                                     for k in ("psnr", "ssim", "mae", "lpips") if any(k in r for r in sel)}
                out[method][kind]["n"] = len(sel)
    return out


def load_trained(cls, plans, pre: Path, out: Path, device, stage: Optional[int] = None):
    """A trainer instance with the fold-0 final weights, without training data (like the predictor does)."""
    import torch
    from nnsynth.training import checkpointing as ckpt
    kwargs = dict(plans=plans, configuration="2d", fold=0, preprocessed_dataset_folder=pre, output_folder=out,
                  device=device)
    trainer = cls(**kwargs, stage=stage) if stage is not None else cls(**kwargs)
    state = ckpt.load_checkpoint(trainer.fold_folder / ckpt.CHECKPOINT_FINAL, device)
    if stage == 1:
        from nnsynth.networks.codebrain import CodeBrainNet
        net = CodeBrainNet(len(trainer.sequences), trainer.num_adjacent_slices, trainer.spatial_dims,
                           trainer.config.get("fsq"))
        net.load_state_dict(state["network_weights"])
        trainer._network = net.to(device).eval()
    elif hasattr(trainer, "load_for_inference"):
        trainer.load_for_inference(state)
    else:
        net = trainer.build_network()
        net.load_state_dict(state["network_weights"])
        trainer._network = net.to(device).eval()
    torch.set_grad_enabled(False)
    return trainer


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/nnsynth_bench_codebrain"))
    p.add_argument("--dataset-id", type=int, default=501)
    p.add_argument("--minutes", type=float, default=4.0, help="training minutes per trainer (both CodeBrain "
                   "stages together: 60%% stage I, the rest stage II)")
    p.add_argument("--spacing", type=float, default=4.0, help="demo voxel size in mm (2 = the full demo)")
    p.add_argument("--size-scale", type=float, default=1.0)
    p.add_argument("--cases", type=int, default=24)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a busy machine)")
    p.add_argument("--max-val-cases", type=int, default=5)
    p.add_argument("--iters-per-epoch", type=int, default=25,
                   help="shorter epochs so short runs validate and fit their schedule (0: the plans' value)")
    p.add_argument("--compare", nargs="*", default=[], help="other trainers to train for --minutes and score")
    p.add_argument("--lpips", action="store_true", help="also LPIPS (AlexNet weights must exist locally)")
    p.add_argument("--fresh", action="store_true", help="delete the work folder first")
    a = p.parse_args(argv)
    if a.fresh and a.work.exists():
        shutil.rmtree(a.work)
    from nnsynth.paths import use_data_root
    use_data_root(a.work, create=True)
    os.environ.setdefault("NNSYNTH_NO_TQDM", "1")
    import torch
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from nnsynth import paths
    from nnsynth.cli.plan_and_preprocess import cli as plan_cli
    from nnsynth.cli.train import cli as train_cli
    from nnsynth.dataset.demo import make_demo_dataset
    from nnsynth.training.registry import TrainerNotAvailableError, get_trainer
    from nnsynth.training.splits import fold_cases
    from nnsynth.preprocessing.storage import list_cases
    from nnsynth.utils.files import load_json

    timings: Dict[str, float] = {}
    raw_root = a.work / "raw"
    t = time.time()
    if not list(raw_root.glob(f"Dataset{a.dataset_id:03d}_*")):
        make_demo_dataset(dataset=a.dataset_id, num_cases=a.cases, spacing=a.spacing, size_scale=a.size_scale,
                          progress=False)
    timings["make_demo_s"] = time.time() - t
    t = time.time()
    if plan_cli(["-d", str(a.dataset_id), "-c", "2d", "--device", a.device, "--no-progress"]) != 0:
        return 1
    timings["plan_and_preprocess_s"] = time.time() - t
    name = paths.resolve_dataset_name(str(a.dataset_id))
    pre = paths.preprocessed_folder() / name
    plans = load_json(pre / "nnsynthPlans.json")
    cfg = plans["configurations"]["2d"]
    data_folder = pre / cfg["data_identifier"]
    _, val_cases = fold_cases(pre, list_cases(data_folder), 0)
    val_cases = val_cases[: a.max_val_cases]
    device = torch.device(a.device)
    results_root = paths.results_folder() / name

    rows: List[Dict[str, Any]] = []
    notes: List[str] = []
    for trainer_name in ["codebrain"] + list(a.compare):
        try:
            cls = get_trainer(trainer_name)
        except TrainerNotAvailableError as e:
            notes.append(f"{trainer_name}: not available in this version ({e})")
            continue
        out = results_root / f"{trainer_name}__nnsynthPlans__2d"
        t = time.time()
        torch.set_grad_enabled(True)
        extra = ["--iters-per-epoch", str(a.iters_per_epoch)] if a.iters_per_epoch else []
        if train_cli([str(a.dataset_id), trainer_name, "0", "--device", a.device, "--max-minutes",
                      str(a.minutes)] + extra) != 0:
            notes.append(f"{trainer_name}: training failed")
            continue
        timings[f"train_{trainer_name}_s"] = time.time() - t
        t = time.time()
        if trainer_name == "codebrain":
            s1 = load_trained(cls, plans, pre, out, device, stage=1)
            rows += evaluate("codebrain stage I (reconstruction, upper bound)", s1.impute_volume, val_cases,
                             data_folder, plans["sequences"], a.lpips, all_at_once=True)
            s2 = load_trained(cls, plans, pre, out, device, stage=None)
            rows += evaluate("codebrain stage II (imputation)", s2.impute_volume, val_cases, data_folder,
                             plans["sequences"], a.lpips, all_at_once=True)
            stats_file = out / "fold_0" / "code_stats.json"
            if stats_file.is_file():  # written at the end of every completed stage-II epoch
                notes.append(f"codebrain code stats (last validation): {json.dumps(load_json(stats_file)[-1])}")
        else:
            tr = load_trained(cls, plans, pre, out, device)
            rows += evaluate(trainer_name, tr.synthesize_volume, val_cases, data_folder, plans["sequences"],
                             a.lpips, all_at_once=False)
        timings[f"evaluate_{trainer_name}_s"] = time.time() - t

    summary = summarise(rows)
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "val_cases": val_cases, "patch_size": cfg["patch_size"], "batch_size": cfg["batch_size"],
              "fsq": cfg.get("fsq"), "timings": timings, "summary": summary, "notes": notes, "rows": rows}
    (a.work / "results.json").write_text(json.dumps(report, indent=2))
    print(f"\nCodeBrain benchmark ({a.minutes} min per trainer, device {a.device}, demo spacing {a.spacing} mm, "
          f"{len(val_cases)} held-out fold-0 validation cases, CONTRACT.md section 5 metrics)\n")
    print("| method | scenario | PSNR (dB) | SSIM | MAE | n |")
    print("| --- | --- | --- | --- | --- | --- |")
    for method, kinds in summary.items():
        for kind, m in kinds.items():
            print(f"| {method} | {kind} | {m.get('psnr', float('nan')):.2f} | {m.get('ssim', float('nan')):.4f} | "
                  f"{m.get('mae', float('nan')):.4f} | {m['n']} |")
    for n in notes:
        print(f"\n- {n}")
    print(f"\ntimings: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
