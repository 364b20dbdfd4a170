"""Seq2Seq quality on the demo dataset against the voxelwise intensity-lookup baseline.

demo dataset -> nnsynth_plan_and_preprocess (2d, or 3d with ``-c 3d``) -> nnsynth_train seq2seq FOLD
--max-minutes M (CPU by default)
-> nnsynth_predict Flair from T1+T1Gd+T2 of the held-out test cases (imagesTs_truth, Flair withheld), and
   again with --no-calibration (the raw network output, ``seq2seq_uncalibrated``)
-> CONTRACT.md section 5 metrics next to ``intensity_lookup_baseline.py`` on the same cases (run with both
normalisation schemes; the gain is against the better one).
Target (issue 4): >= 5 dB PSNR above the baseline after --max-minutes 20 on 2 CPU cores.

    python benchmarks/bench_seq2seq_quality.py --work /tmp/nnsynth_bench --max-minutes 20

How quality grows with the number of training subjects, on the same test subjects: generate a larger demo
(``--demo-cases 48``) and train once on all of it and once on its first 24 training cases (``--train-cases 24``,
the standard demo's 24); the test cases (indices 48-55) are the same in both runs:

    python benchmarks/bench_seq2seq_quality.py --work W48 --max-minutes 20 --fold all --demo-cases 48
    python benchmarks/bench_seq2seq_quality.py --work W24 --max-minutes 20 --fold all --demo-cases 48 --train-cases 24

Whether several runs (or views) would help: ``score_prediction_average.py`` scores the mean of their predictions.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional


sys.path.insert(0, str(Path(__file__).resolve().parent))
from intensity_lookup_baseline import (_channel_ids, calibration_diagnostics, run as run_baseline,  # noqa: E402
                                       score_predictions)


def _training_cases(raw: Path) -> int:
    from nnsynth.dataset.dataset_json import load_dataset_spec
    return load_dataset_spec(raw).num_training


def _keep_first_training_cases(raw: Path, keep: int) -> None:
    """Drop every training case after the first ``keep`` (by name) from the benchmark's own generated demo."""
    from nnsynth.dataset.cases import discover_cases
    from nnsynth.dataset.dataset_json import load_dataset_spec
    if keep < 2:
        raise SystemExit("--train-cases must be at least 2")
    cases = list(discover_cases(raw / "imagesTr", load_dataset_spec(raw), raw / "labelsTr").values())
    if keep > len(cases):
        raise SystemExit(f"--train-cases {keep}: the demo in {raw} has only {len(cases)} training cases")
    for case in cases[keep:]:
        for f in [*case.images.values(), *([case.label] if case.label else [])]:
            f.unlink()
    from nnsynth.utils.files import load_json, save_json
    spec = load_json(raw / "dataset.json")
    spec["numTraining"] = keep
    save_json(spec, raw / "dataset.json")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/nnsynth_bench_quality"))
    p.add_argument("--dataset-id", type=int, default=501)
    p.add_argument("--max-minutes", type=float, default=20.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--configuration", "-c", choices=("2d", "3d"), default="2d",
                   help="2d (2.5D slice stacks, the CPU default) or 3d patches; planned, trained and predicted alike")
    p.add_argument("--fold", default="0", help="fold 0 keeps the final validation short (5 cases); all = every case")
    p.add_argument("--sources", nargs="+", default=["T1", "T1Gd", "T2"])
    p.add_argument("--target", default="Flair")
    p.add_argument("--fresh", action="store_true", help="delete the work folder first")
    p.add_argument("--demo-cases", type=int, default=None,
                   help="training cases of the generated demo (default: the demo's 24); its 8 test cases follow them. "
                        "Only when the work folder has no dataset yet: use a fresh --work")
    p.add_argument("--train-cases", type=int, default=None,
                   help="keep only the first K training cases of the work folder's demo (model and baseline)")
    p.add_argument("--overwrite", nargs="*", default=[], metavar="KEY=VALUE",
                   help="plan overrides passed to nnsynth_plan_and_preprocess (e.g. network.skip_connections=false)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    a = p.parse_args(argv)
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    if a.fresh and a.work.exists():
        shutil.rmtree(a.work)
    from nnsynth.paths import use_data_root
    use_data_root(a.work)
    from nnsynth.cli.plan_and_preprocess import cli as plan_cli
    from nnsynth.cli.predict import cli as predict_cli
    from nnsynth.cli.train import cli as train_cli
    from nnsynth.dataset.demo import make_demo_dataset
    from nnsynth.paths import resolve_dataset_name

    timings = {}
    raw_root = a.work / "raw"
    existing = [d for d in raw_root.glob(f"Dataset{a.dataset_id:03d}_*")] if raw_root.is_dir() else []
    t = time.time()
    demo_kwargs = {} if a.demo_cases is None else {"num_cases": a.demo_cases}
    if existing and a.demo_cases is not None and a.train_cases is None and _training_cases(existing[0]) != a.demo_cases:
        sys.stderr.write(f"--demo-cases {a.demo_cases}: {existing[0]} already exists and is used as it is\n")
    raw = existing[0] if existing else make_demo_dataset(dataset=a.dataset_id, progress=False, **demo_kwargs)
    timings["make_demo_s"] = time.time() - t
    if a.train_cases is not None:
        _keep_first_training_cases(raw, a.train_cases)
    t = time.time()
    if plan_cli(["-d", str(a.dataset_id), "-c", a.configuration, "--device", a.device]
                + (["--overwrite", *a.overwrite] if a.overwrite else [])) != 0:
        return 1
    timings["plan_and_preprocess_s"] = time.time() - t
    t = time.time()
    if train_cli([str(a.dataset_id), "seq2seq", a.fold, "-c", a.configuration, "--device", a.device,
                  "--max-minutes", str(a.max_minutes)]) != 0:
        return 1
    timings["train_and_validate_s"] = time.time() - t

    ids, ending = _channel_ids(raw)
    truth = raw / "imagesTs_truth"
    inp, out = a.work / "predict_in", a.work / "predict_out"
    shutil.rmtree(inp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    inp.mkdir(parents=True)
    cases = sorted({f.name[: -len(ending) - 5] for f in truth.glob(f"*_{ids[a.target]}{ending}")})
    for case in cases:
        for s in a.sources:
            src = truth / f"{case}_{ids[s]}{ending}"
            if src.is_file():
                shutil.copyfile(src, inp / src.name)
    raw_out = a.work / "predict_out_uncalibrated"
    shutil.rmtree(raw_out, ignore_errors=True)
    for folder, extra in ((out, []), (raw_out, ["--no-calibration"])):
        t = time.time()
        rc = predict_cli(["-i", str(inp), "-o", str(folder), "-t", a.target, "-d", str(a.dataset_id), "-tr",
                          "seq2seq", "-c", a.configuration, "-f", a.fold, "--device", a.device, "--no-progress",
                          *extra])
        timings["predict_s" if not extra else "predict_uncalibrated_s"] = time.time() - t
        if rc != 0:
            return 1
    per_case, model = score_predictions(truth, out, cases, f"_{ids[a.target]}{ending}")
    # the same model's raw network output (nnsynth_predict --no-calibration): what the calibration adds
    _, uncalibrated = score_predictions(truth, raw_out, cases, f"_{ids[a.target]}{ending}")
    diagnostics = calibration_diagnostics(truth, out, cases, f"_{ids[a.target]}{ending}")
    # the baseline (per-image percentiles) and the same lookup on nnsynth's median-anchor normalisation;
    # the gain is reported against the stronger of the two
    bases = {n: run_baseline(raw, a.sources, a.target, "imagesTs_truth", n)
             for n in ("percentile_clip", "median_anchor")}
    base = max(bases.values(), key=lambda b: b["mean"]["psnr"])
    result = {"dataset": resolve_dataset_name(a.dataset_id), "max_minutes": a.max_minutes, "device": a.device,
              "overwrite": list(a.overwrite), "training_cases": _training_cases(raw),
              "configuration": a.configuration, "fold": a.fold, "threads": __import__("torch").get_num_threads(),
              "test_cases": len(cases),
              "seq2seq": model, "seq2seq_uncalibrated": uncalibrated, "baseline": base["mean"],
              "baseline_normalization": base["normalization"],
              "baselines": {n: b["mean"] for n, b in bases.items()},
              "psnr_gain_db": model["psnr"] - base["mean"]["psnr"], "calibration": diagnostics,
              "target_gain_db": 5.0, "timings": timings, "per_case": per_case, "baseline_per_case": base["per_case"]}
    (a.work / "bench_seq2seq_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(json.dumps({k: result[k] for k in ("seq2seq", "seq2seq_uncalibrated", "baselines",
                                                        "psnr_gain_db", "calibration",
                                                        "test_cases",
                                                        "timings")}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
