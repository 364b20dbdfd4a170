"""Time nnsynth_plan_and_preprocess against nnU-Net v2's nnUNetv2_plan_and_preprocess on the same data.

Benchmark-only dependency: ``pip install nnunetv2`` into the dev venv (never a project dependency).

The dataset is the demo dataset with every sequence present (``--missing 0``), so nnU-Net can read it;
nnU-Net also needs a label file for every case (the demo writes them). Both tools get the same worker
count and preprocess one 3D configuration (nnU-Net ``-c 3d_fullres``, nnsynth ``-c 3d``); nnsynth's default
(2d and 3d) is timed too. Peak memory is the peak of the summed RSS of the whole process tree (psutil
polling every 50 ms), wall time includes interpreter start-up.

    python benchmarks/bench_plan_and_preprocess.py --np 2 --repeats 2 [--workdir /tmp/bench_pp]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import psutil

BIN = Path(sys.executable).parent


def run_measured(cmd: List[str], env: Dict[str, str]) -> Dict[str, float]:
    """Run ``cmd``; return wall seconds and peak summed RSS (MiB) of its process tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [ps] + ps.children(recursive=True)
            rss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    out = proc.stdout.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(peak / 2 ** 20, 1)}


def make_datasets(work: Path, cases: int, spacing: float) -> Path:
    raw = work / "nnsynth_raw"
    name = "Dataset501_BrainDemo"
    if not (raw / name / "dataset.json").is_file():
        env = dict(os.environ, nnSynth_raw=str(raw), nnSynth_preprocessed=str(work / "nnsynth_pre"),
                   nnSynth_results=str(work / "nnsynth_res"))
        subprocess.run([str(BIN / "nnsynth_make_demo_dataset"), "-d", "501", "--cases", str(cases),
                        "--test-cases", "0", "--missing", "0", "--spacing", str(spacing), "--no-montage"],
                       env=env, check=True)
    src = raw / name
    spec = json.loads((src / "dataset.json").read_text())
    # nnU-Net copy: same files (symlinks), labels for every case, nnU-Net's dataset.json keys
    nn = work / "nnUNet_raw" / name
    if nn.exists():
        shutil.rmtree(nn)
    (nn / "imagesTr").mkdir(parents=True)
    (nn / "labelsTr").mkdir(parents=True)
    for p in sorted((src / "imagesTr").iterdir()):
        (nn / "imagesTr" / p.name).symlink_to(p)
    labels = sorted((src / "labelsTr").iterdir())
    if len(labels) != spec["numTraining"]:
        raise SystemExit("the demo dataset must have a label for every case (nnU-Net needs them)")
    for p in labels:
        (nn / "labelsTr" / p.name).symlink_to(p)
    nn_spec = {"channel_names": spec["channel_names"], "labels": spec.get("labels") or {"background": 0, "x": 1},
               "numTraining": spec["numTraining"], "file_ending": spec["file_ending"]}
    (nn / "dataset.json").write_text(json.dumps(nn_spec, indent=2))
    return src


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/nnsynth_bench_pp")
    ap.add_argument("--np", type=int, default=2, help="worker processes for both tools")
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--spacing", type=float, default=2.0, help="demo voxel size (2.0 mm: ~86x99x81)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    make_datasets(work, args.cases, args.spacing)
    if shutil.which("nnUNetv2_plan_and_preprocess", path=str(BIN)) is None:
        raise SystemExit("nnunetv2 is not installed in this venv: pip install nnunetv2 (benchmark only)")
    env = dict(os.environ, nnSynth_raw=str(work / "nnsynth_raw"), nnSynth_preprocessed=str(work / "nnsynth_pre"),
               nnSynth_results=str(work / "nnsynth_res"), nnUNet_raw=str(work / "nnUNet_raw"),
               nnUNet_preprocessed=str(work / "nnUNet_pre"), nnUNet_results=str(work / "nnUNet_res"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", ""))
    env = {k: v for k, v in env.items() if v != ""}
    n = str(args.np)
    commands = {
        "nnunet_3d_fullres": [str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", "501", "-c", "3d_fullres",
                              "-np", n, "-npfp", n],
        "nnsynth_3d": [str(BIN / "nnsynth_plan_and_preprocess"), "-d", "501", "-c", "3d", "-np", n, "--clean",
                       "--device", "cpu", "--no-progress"],
        "nnsynth_2d_3d": [str(BIN / "nnsynth_plan_and_preprocess"), "-d", "501", "-np", n, "--clean",
                          "--device", "cpu", "--no-progress"],
        "nnsynth_rerun_up_to_date": [str(BIN / "nnsynth_plan_and_preprocess"), "-d", "501", "-np", n,
                                     "--device", "cpu", "--no-progress"],
    }
    results: Dict[str, List[Dict[str, float]]] = {k: [] for k in commands}
    for rep in range(args.repeats):
        for key, cmd in commands.items():
            if key.startswith("nnunet"):
                shutil.rmtree(work / "nnUNet_pre", ignore_errors=True)
            results[key].append(run_measured(cmd, env))
            print(f"[{rep}] {key}: {results[key][-1]}", flush=True)
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in results.items()}
    peak = {k: max(r["peak_rss_mib"] for r in v) for k, v in results.items()}
    ratio = best["nnsynth_3d"]["wall_s"] / best["nnunet_3d_fullres"]["wall_s"]
    summary = {"np": args.np, "cases": args.cases, "spacing_mm": args.spacing, "cpu_count": os.cpu_count(),
               "runs": results, "best_wall_s": {k: v["wall_s"] for k, v in best.items()},
               "peak_rss_mib": peak, "wall_ratio_nnsynth_3d_over_nnunet": round(ratio, 3),
               "commands": {k: " ".join(Path(c[0]).name if i == 0 else c for i, c in enumerate(v))
                            for k, v in commands.items()}}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
