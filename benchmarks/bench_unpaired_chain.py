"""Unpaired (chained) synthesis, the VQ-Seq2Seq paper's Table 1 situation: vq_seq2seq vs seq2seq.

The demo dataset is made with ``--pairing chain``: every training case holds one consecutive pair of
(T1, T1Gd, T2, Flair), so T1 and Flair never meet in training. Both trainers get the same data, the same
plans and the same wall-clock budget (``--minutes`` each, fold 0); then every held-out complete test case
is synthesised single-step T1 -> T1Gd (paired in training), T1 -> T2 and T1 -> Flair (never paired) through
the regular inference path (preprocess, sliding window, export to the case geometry) and scored per
CONTRACT.md section 5 against the truth.

    python benchmarks/bench_unpaired_chain.py --minutes 2            # a short smoke run (CPU)
    python benchmarks/bench_unpaired_chain.py --minutes 60 --device cuda --cases 60 --spacing 2

Writes ``results.json`` and prints a markdown table. Everything lives under ``--workdir``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger("bench")

DATASET_ID = 597
DATASET_NAME = "ChainDemo"
SEQUENCES = ("T1", "T1Gd", "T2", "Flair")
FOLD = "0"   # 80% of the training cases; the held-out test cases are scored (fold 0 keeps validation short)


def set_folders(workdir: Path) -> None:
    from nnsynth.paths import use_data_root
    use_data_root(workdir, create=True)


def make_dataset(dataset_id: int, name: str, pairing: str, args: argparse.Namespace) -> Path:
    from nnsynth.dataset.demo import make_demo_dataset
    from nnsynth.paths import raw_folder
    folder = raw_folder() / f"Dataset{dataset_id:03d}_{name}"
    if folder.is_dir():
        return folder
    return make_demo_dataset(folder, dataset=dataset_id, name=name, num_cases=args.cases,
                             num_test_cases=args.test_cases, spacing=args.spacing, size_scale=args.size_scale,
                             pairing=pairing, missing=args.missing, seed=args.seed, progress=False)


def plan_and_preprocess(dataset_id: int, args: argparse.Namespace, edit: Optional[Callable[[Dict], None]] = None) -> None:
    """Plan + preprocess (2d), then apply ``edit`` to the plans (short-run schedule)."""
    from nnsynth.cli.plan_and_preprocess import cli as plan_cli
    from nnsynth.paths import preprocessed_dataset_folder
    from nnsynth.utils.files import load_json, save_json
    folder = preprocessed_dataset_folder(dataset_id)
    if not (folder / "nnsynthPlans.json").is_file():
        rc = plan_cli(["-d", str(dataset_id), "-c", "2d", "--device", args.device if args.device != "auto" else "auto",
                       "--no-progress"])
        if rc != 0:
            raise SystemExit(f"planning failed ({rc})")
    plans = load_json(folder / "nnsynthPlans.json")
    if edit is not None:
        edit(plans)
        save_json(plans, folder / "nnsynthPlans.json")


def short_run_schedule(plans: Dict[str, Any], args: argparse.Namespace) -> None:
    """With a few-minute budget the paper's epoch-100/200 switches are never reached: start the VQ terms early
    (contrastive from epoch 1, VQC sampling and domain augmentation from epoch 2; epochs of ``--iters`` steps)."""
    for cfg in plans["configurations"].values():
        loss = cfg.setdefault("loss", {}).setdefault("vq_seq2seq", {})
        loss.update({"contrastive_start_epoch": args.contrastive_start, "vqc_start_epoch": args.vqc_start,
                     "augmentation_start_epoch": args.vqc_start})
        cfg.setdefault("training", {})["warmup_iters"] = args.warmup   # the planner's 100+ would eat a short budget
        # VQ-Seq2Seq has no skip connections; by default seq2seq is compared as the same (paper) backbone
        cfg["network"]["skip_connections"] = bool(args.seq2seq_skips)
        if args.batch_size:
            cfg["batch_size"] = args.batch_size
    if args.overwrite:
        from nnsynth.planning.plans import apply_overrides
        plans.update(apply_overrides(plans, args.overwrite))


def train(dataset_id: int, trainer: str, args: argparse.Namespace) -> float:
    from nnsynth.cli.train import cli as train_cli
    from nnsynth.paths import results_folder, resolve_dataset_name
    fold = results_folder() / resolve_dataset_name(dataset_id) / f"{trainer}__nnsynthPlans__2d" / f"fold_{FOLD}"
    if (fold / "checkpoint_final.pth").is_file():
        logger.info("%s already trained in %s", trainer, fold)
        return float("nan")
    t0 = time.time()
    rc = train_cli([str(dataset_id), trainer, FOLD, "-c", "2d", "--device", args.device, "--max-minutes",
                    str(args.minutes), "--epochs", "10000", "--iters-per-epoch", str(args.iters),
                    "--seed", str(args.seed)])
    if rc != 0:
        raise SystemExit(f"training {trainer} failed ({rc})")
    return time.time() - t0


def load_predictor(dataset_id: int, trainer: str, device: str):
    from nnsynth.inference.predictor import Predictor
    from nnsynth.paths import results_folder, resolve_dataset_name
    folder = results_folder() / resolve_dataset_name(dataset_id) / f"{trainer}__nnsynthPlans__2d"
    return Predictor(folder, folds=[FOLD], device=device, progress=False)


def test_cases(raw: Path) -> Dict[str, Dict[str, Path]]:
    """{case: {sequence: truth file}} of the complete held-out cases."""
    from nnsynth.constants import DEMO_TRUTH_FOLDER
    spec = json.loads((raw / "dataset.json").read_text())
    names = {int(k): v for k, v in spec["channel_names"].items()}
    out: Dict[str, Dict[str, Path]] = {}
    for f in sorted((raw / DEMO_TRUTH_FOLDER).glob(f"*{spec['file_ending']}")):
        stem = f.name[: -len(spec["file_ending"])]
        case, ch = stem.rsplit("_", 1)
        out.setdefault(case, {})[names[int(ch)]] = f
    return out


def score(ref: np.ndarray, pred: np.ndarray) -> Dict[str, float]:
    from nnsynth.evaluation.metrics import compute_metrics
    m = compute_metrics(ref, pred, ref != 0, compute_lpips=True)
    return {k: float(v) for k, v in m.items() if v is not None}


def summarise(rows: List[Dict[str, Any]], keys=("psnr", "ssim", "mae", "lpips")) -> Dict[str, Dict[str, float]]:
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if k in r]
        if vals:
            out[k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}
    return out


def evaluate_chain(dataset_id: int, raw: Path, trainers: Sequence[str], device: str,
                   tasks=(("T1", "T1Gd"), ("T1", "T2"), ("T1", "Flair"))) -> Dict[str, Any]:
    from nnsynth.dataset.io import read_image
    cases = test_cases(raw)
    results: Dict[str, Any] = {}
    for trainer in trainers:
        pred = load_predictor(dataset_id, trainer, device)
        per_task: Dict[str, List[Dict[str, float]]] = {f"{s}->{t}": [] for s, t in tasks}
        for case, files in cases.items():
            for s, t in tasks:
                img, geom = read_image(files[s])
                truth, _ = read_image(files[t])
                res = pred.predict_case({s: img}, geom, targets=[t], case=case)
                per_task[f"{s}->{t}"].append({"case": case, **score(truth, res.predictions[t])})
        results[trainer] = {task: {"summary": summarise(rows), "per_case": rows} for task, rows in per_task.items()}
    return results


def table(results: Dict[str, Any], title: str) -> str:
    tasks = list(next(iter(results.values())))
    lines = [f"### {title}", "", "| trainer | " + " | ".join(f"{t} PSNR / SSIM / LPIPS" for t in tasks) + " |",
             "| --- |" + " --- |" * len(tasks)]
    for trainer, res in results.items():
        cells = []
        for t in tasks:
            s = res[t]["summary"]
            lp = f"{s['lpips']['mean']:.2f}" if "lpips" in s else "n/a"
            cells.append(f"{s['psnr']['mean']:.2f}±{s['psnr']['std']:.2f} / {s['ssim']['mean']:.3f} / {lp}")
        lines.append(f"| {trainer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def common_parser(description: str, default_workdir: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--minutes", type=float, default=2.0, help="training wall-clock budget per model (default 2)")
    p.add_argument("--workdir", default=default_workdir, help="all data and models go here")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--cases", type=int, default=24, help="training cases of the demo dataset")
    p.add_argument("--test-cases", type=int, default=6, help="held-out complete test cases")
    p.add_argument("--spacing", type=float, default=4.0, help="demo voxel spacing in mm (2 = full size)")
    p.add_argument("--size-scale", type=float, default=1.0)
    p.add_argument("--missing", type=float, default=0.0)
    p.add_argument("--iters", type=int, default=25, help="iterations per epoch (epochs are the schedule's unit)")
    p.add_argument("--warmup", type=int, default=10, help="LR warm-up iterations written into the plans")
    p.add_argument("--batch-size", type=int, default=None, help="override the plans' batch size")
    p.add_argument("--contrastive-start", type=int, default=1, help="vq_seq2seq: epoch the L_con term starts")
    p.add_argument("--vqc-start", type=int, default=2, help="vq_seq2seq: epoch VQC sampling + domain aug start")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trainers", nargs="+", default=["seq2seq", "vq_seq2seq"])
    p.add_argument("--overwrite", nargs="+", default=[], metavar="KEY=VALUE",
                   help="plan overrides after the short-run schedule, as nnsynth_plan_and_preprocess --overwrite "
                        "(e.g. loss.vq_seq2seq.lambda_con=1)")
    p.add_argument("--seq2seq-skips", action="store_true",
                   help="give seq2seq the skip connections of nnsynth's default plans (default: the paper's network, "
                        "the backbone vq_seq2seq shares)")
    return p


def prepare_and_train(args: argparse.Namespace, dataset_id: int, name: str, pairing: str
                      ) -> Tuple[Path, Dict[str, float]]:
    """Shared by the benchmarks: logging, folders under --workdir, the demo dataset with ``pairing``, plans with
    the short-run schedule, then every trainer of --trainers. Returns (raw dataset folder, training seconds)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("NNSYNTH_NO_TQDM", "1")
    set_folders(Path(args.workdir))
    raw = make_dataset(dataset_id, name, pairing, args)
    plan_and_preprocess(dataset_id, args, lambda p: short_run_schedule(p, args))
    return raw, {t: train(dataset_id, t, args) for t in args.trainers}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = common_parser(__doc__.splitlines()[0], "/tmp/nnsynth_bench_chain").parse_args(argv)
    workdir = Path(args.workdir)
    raw, times = prepare_and_train(args, DATASET_ID, DATASET_NAME, "chain")
    results = evaluate_chain(DATASET_ID, raw, args.trainers, args.device)
    out = {"benchmark": "unpaired chain", "args": vars(args), "train_seconds": times, "results": results}
    (workdir / "results.json").write_text(json.dumps(out, indent=2))
    print(table(results, f"Chained-unpaired demo, single-step synthesis from T1 ({args.minutes} min per model, "
                         f"{args.cases} training cases, {args.test_cases} test cases)"))
    print(f"\nresults: {workdir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
