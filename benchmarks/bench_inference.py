"""Inference speed and peak memory of ``nnsynth_predict`` for demo cases (issue 7).

Uses a trained model of the demo dataset (by default the one ``bench_seq2seq_quality.py`` leaves in its work
folder), takes N complete test cases, withholds the target sequence and times the real command in a fresh
process, so the numbers include start-up, reading, preprocessing, sliding-window inference and export:

    python benchmarks/bench_inference.py --work /tmp/qb/work --trainer seq2seq --cases 1 --device cpu
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_plan_and_preprocess import BIN, run_measured  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/nnsynth_bench_quality"),
                   help="folder holding raw/ preprocessed/ results/ of a trained demo model")
    p.add_argument("--dataset", default="501")
    p.add_argument("--trainer", default="seq2seq")
    p.add_argument("--configuration", default="2d")
    p.add_argument("--fold", default="0")
    p.add_argument("--target", default="Flair")
    p.add_argument("--cases", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    env = dict(os.environ, nnSynth_raw=str(a.work / "raw"), nnSynth_preprocessed=str(a.work / "preprocessed"),
               nnSynth_results=str(a.work / "results"), OMP_NUM_THREADS=str(a.threads), NNSYNTH_NO_TQDM="1")
    raw = next((a.work / "raw").glob(f"Dataset{int(a.dataset):03d}_*"))
    spec = json.loads((raw / "dataset.json").read_text())
    target_id = next(int(k) for k, v in spec["channel_names"].items() if v.lower() == a.target.lower())
    cases = sorted({f.name.rsplit("_", 1)[0] for f in (raw / "imagesTs").iterdir()})[: a.cases]
    inp, out = a.work / "bench_inference" / "in", a.work / "bench_inference" / "out"
    shutil.rmtree(inp.parent, ignore_errors=True)
    inp.mkdir(parents=True)
    for f in sorted((raw / "imagesTs").iterdir()):
        case, tag = f.name[: -len(spec["file_ending"])].rsplit("_", 1)
        if case in cases and int(tag) != target_id:
            os.symlink(f, inp / f.name)
    cmd = [str(BIN / "nnsynth_predict"), "-i", str(inp), "-o", str(out), "-t", a.target, "-d", a.dataset,
           "-tr", a.trainer, "-c", a.configuration, "-f", a.fold, "--device", a.device]
    result = run_measured(cmd, env)
    result.update(cases=len(cases), trainer=a.trainer, device=a.device, threads=a.threads,
                  seconds_per_case=round(result["wall_s"] / max(len(cases), 1), 2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
