"""Multi-input against single-input synthesis: tsf_seq2seq (3 sources -> Flair) beside the same backbone with one source.

Runs on a work folder where ``bench_seq2seq_quality.py`` already trained seq2seq (same layout: raw/,
preprocessed/, results/ under --work), so the backbone is the one of that benchmark:

    python benchmarks/bench_seq2seq_quality.py --work /tmp/qb/work --max-minutes 20 --fresh
    python benchmarks/bench_tsf_fusion.py --work /tmp/qb/work --minutes 10

1. ``nnsynth_train ID tsf_seq2seq FOLD --pretrained-from seq2seq --max-minutes M`` (encoder frozen, paper).
2. ``nnsynth_predict`` of the target for every held-out case of ``imagesTs_truth``, from all sources together
   and from each source alone, with tsf_seq2seq and with the seq2seq backbone.
3. CONTRACT.md section 5 metrics per case; mean per (trainer, sources). Writes ``bench_tsf_fusion.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence


sys.path.insert(0, str(Path(__file__).resolve().parent))
from intensity_lookup_baseline import _channel_ids, score_predictions  # noqa: E402


def predict_and_score(work: Path, dataset_id: int, trainer: str, fold: str, device: str, raw: Path,
                      sources: Sequence[str], target: str) -> Dict[str, object]:
    """Predict ``target`` from ``sources`` for every truth case with ``trainer``; per-case and mean metrics."""
    from nnsynth.cli.predict import cli as predict_cli
    ids, ending = _channel_ids(raw)
    truth = raw / "imagesTs_truth"
    tag = f"{trainer}_{'+'.join(sources)}"
    inp, out = work / "tsf_bench" / tag / "in", work / "tsf_bench" / tag / "out"
    shutil.rmtree(inp.parent, ignore_errors=True)
    inp.mkdir(parents=True)
    cases = sorted({f.name[: -len(ending) - 5] for f in truth.glob(f"*_{ids[target]}{ending}")})
    for case in cases:
        for s in sources:
            shutil.copyfile(truth / f"{case}_{ids[s]}{ending}", inp / f"{case}_{ids[s]}{ending}")
    t = time.time()
    if predict_cli(["-i", str(inp), "-o", str(out), "-t", target, "-d", str(dataset_id), "-tr", trainer, "-c", "2d",
                    "-f", fold, "--device", device, "--no-progress"]) != 0:
        raise SystemExit(f"nnsynth_predict failed for {tag}")
    seconds = time.time() - t
    rows, mean = score_predictions(truth, out, cases, f"_{ids[target]}{ending}")
    return {"trainer": trainer, "sources": list(sources), "mean": mean, "per_case": rows, "predict_s": seconds}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="work folder of bench_seq2seq_quality.py")
    p.add_argument("--dataset-id", type=int, default=501)
    p.add_argument("--fold", default="0")
    p.add_argument("--minutes", type=float, default=10.0, help="tsf_seq2seq training budget")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sources", nargs="+", default=["T1", "T1Gd", "T2"])
    p.add_argument("--target", default="Flair")
    p.add_argument("--skip-training", action="store_true", help="score an already trained tsf_seq2seq")
    a = p.parse_args(argv)
    for var, sub in (("nnSynth_raw", "raw"), ("nnSynth_preprocessed", "preprocessed"), ("nnSynth_results", "results")):
        os.environ[var] = str(a.work / sub)
    from nnsynth.cli.train import cli as train_cli
    raw = next((a.work / "raw").glob(f"Dataset{a.dataset_id:03d}_*"))
    timings = {}
    if not a.skip_training:
        t = time.time()
        if train_cli([str(a.dataset_id), "tsf_seq2seq", a.fold, "--pretrained-from", "seq2seq", "--device", a.device,
                      "--max-minutes", str(a.minutes)]) != 0:
            return 1
        timings["tsf_train_and_validate_s"] = time.time() - t
    runs = []
    for trainer in ("tsf_seq2seq", "seq2seq"):
        for sources in [a.sources] + [[s] for s in a.sources]:
            runs.append(predict_and_score(a.work, a.dataset_id, trainer, a.fold, a.device, raw, sources, a.target))
    result = {"tsf_minutes": a.minutes, "fold": a.fold, "target": a.target, "timings": timings, "runs": runs}
    (a.work / "bench_tsf_fusion.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| trainer | sources | PSNR (dB) | SSIM | MAE |", "| --- | --- | --- | --- | --- |"]
    for r in runs:
        m = r["mean"]
        lines.append(f"| {r['trainer']} | {' + '.join(r['sources'])} | {m['psnr']:.2f} | {m['ssim']:.3f} | "
                     f"{m['mae']:.3f} |")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
