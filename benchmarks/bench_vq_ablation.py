"""VQ-Seq2Seq at CPU budgets: which part of the method costs the reconstruction quality, variant by variant.

Every variant trains one model on the same demo dataset (4 mm by default, fold 0) for ``--minutes`` on
``--threads`` threads, with the plans changed only by the variant's settings, and is scored by the engine's
full-volume validation at the end of training (``validation/summary.json``: every sequence of each fold-0
validation case synthesised from the others, CONTRACT.md section 5 metrics). The variants:

- ``seq2seq_paper``: seq2seq with the paper's network (no skips, one source per encoding) -- the backbone
  VQ-Seq2Seq shares, for reference;
- ``vq_grid4x`` / ``vq_grid2x`` / ``vq_grid1x``: VQ-Seq2Seq with the paper's losses and schedule and the latent
  grid 4x, 2x or 1x coarser than the image (``vq.downsampling_levels`` 2 / 1 / 0);
- ``..._nocon``: without the latent-consistency term (``lambda_con = 0``);
- ``..._ema``: moving-average codebook (``vq.codebook_update = ema``);
- ``..._excl``: copies of the positive's code are no InfoNCE negatives;
- ``..._raw``: eq. 7's raw dot products instead of cosine similarities;
- ``..._ze``: eq. 7 on the continuous z_e;
- ``..._con1``: ``lambda_con = 1`` instead of the paper's 10;
- ``..._cblr30``: codebook steps 30x larger (``vq.codebook_lr_scale``);
- ``..._b2``: 2 cases per batch instead of the plans' batch (a VQ sample holds every sequence of its case).

    python benchmarks/bench_vq_ablation.py --work /tmp/nnsynth_bench_vq --minutes 6            # every variant
    python benchmarks/bench_vq_ablation.py --variants seq2seq_paper vq_grid2x vq_grid2x_nocon   # a few
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger("bench")

EMA = {"vq.codebook_update": "ema"}
NOCON = {"loss.vq_seq2seq.lambda_con": 0.0}
EXCL = {"loss.vq_seq2seq.contrastive_exclude_same_code": True}
GRID = {"4x": {"vq.downsampling_levels": 2}, "2x": {"vq.downsampling_levels": 1}, "1x": {"vq.downsampling_levels": 0}}

#: name -> (trainer, settings relative to the configuration "2d")
VARIANTS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "seq2seq_paper": ("seq2seq", {"network.skip_connections": False, "network.joint_input": False}),
    "vq_grid4x": ("vq_seq2seq", {**GRID["4x"]}),
    "vq_grid4x_nocon": ("vq_seq2seq", {**GRID["4x"], **NOCON}),
    "vq_grid4x_ema_nocon": ("vq_seq2seq", {**GRID["4x"], **EMA, **NOCON}),
    "vq_grid4x_ema_nocon_b2": ("vq_seq2seq", {**GRID["4x"], **EMA, **NOCON, "batch_size": 2}),
    "vq_grid4x_ema": ("vq_seq2seq", {**GRID["4x"], **EMA}),
    "vq_grid4x_excl": ("vq_seq2seq", {**GRID["4x"], **EXCL}),
    "vq_grid4x_ema_excl": ("vq_seq2seq", {**GRID["4x"], **EMA, **EXCL}),
    "vq_grid4x_ema_raw": ("vq_seq2seq", {**GRID["4x"], **EMA, "loss.vq_seq2seq.contrastive_normalize": False}),
    "vq_grid4x_cblr30": ("vq_seq2seq", {**GRID["4x"], "vq.codebook_lr_scale": 30.0}),
    "vq_grid2x": ("vq_seq2seq", {**GRID["2x"]}),
    "vq_grid2x_ema_nocon": ("vq_seq2seq", {**GRID["2x"], **EMA, **NOCON}),
    "vq_grid2x_ema_excl": ("vq_seq2seq", {**GRID["2x"], **EMA, **EXCL}),
    "vq_grid2x_ema_excl_ze": ("vq_seq2seq", {**GRID["2x"], **EMA, **EXCL,
                                             "loss.vq_seq2seq.consistency_latent": "z_e"}),
    "vq_grid2x_ema_con1": ("vq_seq2seq", {**GRID["2x"], **EMA, "loss.vq_seq2seq.lambda_con": 1.0}),
    "vq_grid1x_ema_nocon": ("vq_seq2seq", {**GRID["1x"], **EMA, **NOCON}),
}


def set_path(config: Dict[str, Any], dotted: str, value: Any) -> None:
    """config['a']['b'] = value for 'a.b' (keys the planner does not write are allowed: these are experiments)."""
    keys = dotted.split(".")
    node = config
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def run_variant(name: str, a: argparse.Namespace, pre: Path, env: Dict[str, str]) -> Dict[str, Any]:
    from nnsynth.paths import results_folder
    trainer, settings = VARIANTS[name]
    plans = json.loads((pre / "nnsynthPlans.json").read_text())
    ident = "nnsynthPlans" + "".join(part.capitalize() for part in name.split("_"))
    plans["plans_name"] = ident
    cfg = plans["configurations"]["2d"]
    for key, value in settings.items():
        set_path(cfg, key, value)
    levels = cfg["vq"].get("downsampling_levels")
    if levels is not None and "vq.codebook_size" not in settings:   # K as the planner sizes it for this grid
        from nnsynth.planning.planner import DefaultPlanner
        vectors = DefaultPlanner.latent_vectors_per_case(cfg["median_shape"], 2, int(levels))
        cfg["vq"]["codebook_size"] = DefaultPlanner.codebook_size(vectors * int(plans["num_training_cases"]))
    (pre / f"{ident}.json").write_text(json.dumps(plans, indent=1))
    fold = results_folder() / pre.name / f"{trainer}__{ident}__2d" / "fold_0"
    summary = fold / "validation" / "summary.json"
    if not summary.is_file():
        cmd = [sys.executable, "-c", "import sys; from nnsynth.cli.train import cli; sys.exit(cli(sys.argv[1:]))",
               str(a.dataset_id), trainer, "0", "-p", ident, "--device", "cpu", "--max-minutes", str(a.minutes),
               "--iters-per-epoch", str(a.iters_per_epoch)]
        t = time.time()
        log = a.work / f"{name}.log"
        with open(log, "w") as f:
            rc = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        if rc != 0:
            raise SystemExit(f"variant {name} failed (rc {rc}); see {log}")
        logger.info("%s trained in %.0f s", name, time.time() - t)
    s = json.loads(summary.read_text())
    epochs = sum(1 for line in (fold / "training_log.txt").read_text().splitlines() if " train loss " in line)
    return {"variant": name, "trainer": trainer, "settings": settings, "epochs": epochs,
            "iterations": epochs * a.iters_per_epoch, "mean": s["mean"],
            "psnr_per_target": {k: v["psnr"] for k, v in s["per_target"].items()}}


def table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| variant | settings | iterations | PSNR | SSIM | MAE |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        settings = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["settings"].items()) or "-"
        m = r["mean"]
        lines.append(f"| {r['variant']} | {settings} | {r['iterations']} | {m['psnr']:.2f} | {m['ssim']:.3f} | "
                     f"{m['mae']:.3f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/nnsynth_bench_vq"))
    p.add_argument("--dataset-id", type=int, default=501)
    p.add_argument("--minutes", type=float, default=6.0, help="training minutes per variant")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training (OMP_NUM_THREADS)")
    p.add_argument("--spacing", type=float, default=4.0, help="demo voxel size in mm (2 = the full demo)")
    p.add_argument("--cases", type=int, default=24)
    p.add_argument("--iters-per-epoch", type=int, default=25)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--fresh", action="store_true", help="delete the work folder first")
    a = p.parse_args(argv)
    if a.fresh and a.work.exists():
        shutil.rmtree(a.work)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), NNSYNTH_NO_TQDM="1")
    for var, sub in (("nnSynth_raw", "raw"), ("nnSynth_preprocessed", "preprocessed"), ("nnSynth_results", "results")):
        (a.work / sub).mkdir(parents=True, exist_ok=True)
        os.environ[var] = env[var] = str(a.work / sub)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from nnsynth import paths
    from nnsynth.cli.plan_and_preprocess import cli as plan_cli
    from nnsynth.dataset.demo import make_demo_dataset
    if not list((a.work / "raw").glob(f"Dataset{a.dataset_id:03d}_*")):
        make_demo_dataset(dataset=a.dataset_id, num_cases=a.cases, spacing=a.spacing, progress=False)
    pre = paths.preprocessed_folder() / paths.resolve_dataset_name(str(a.dataset_id))
    if not (pre / "nnsynthPlans.json").is_file():
        if plan_cli(["-d", str(a.dataset_id), "-c", "2d", "--device", "cpu", "--no-progress"]) != 0:
            return 1
    rows = [run_variant(v, a, pre, env) for v in a.variants]
    out = {"benchmark": "vq ablation", "args": {k: str(v) for k, v in vars(a).items()}, "results": rows}
    (a.work / "results.json").write_text(json.dumps(out, indent=2))
    print(f"\nVQ-Seq2Seq ablation ({a.minutes} min per variant, {a.threads} thread(s), demo {a.spacing} mm, "
          f"full-volume validation of fold 0)\n")
    print(table(rows))
    print(f"\nresults: {a.work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
