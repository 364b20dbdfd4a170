"""One-shot tumour segmentation: latent space vs images, and the codebook size K (VQ-Seq2Seq Table 3, Fig. 5).

On the demo dataset (brain MRI with NCR/ED/ET tumour labels, training cases missing sequences):

1. two plans that differ only in the codebook size (``nnsynthPlansK16``, ``nnsynthPlansK256``; a smaller
   synthesis network than the default CPU plan so that a few CPU minutes train something);
2. ``nnsynth_train 501 vq_seq2seq 0 -p nnsynthPlansK{K} --max-minutes M`` for both K;
3. ONE labelled case (the first complete training case with tumour of fold 0), the same for every model, and
   the same iteration budget (``--seg-epochs`` x ``--seg-iters``):
   ``seg_from_latent`` on the K=16 and on the K=256 latent space, ``seg_from_images`` (K=16 plans; it ignores K);
4. ``nnsynth_predict --segment`` of the held-out complete test cases, with all four sequences and with only
   T1 + T2 (T1Gd and Flair removed), then ``nnsynth_evaluate --seg`` against ``labelsTs``: Dice and ASSD (mm)
   for ET, TC (NCR+ET), WT (all tumour), mean over the test cases.

    python benchmarks/bench_one_shot_seg.py --work /tmp/oneshot --vq-minutes 3 --seg-epochs 10 --seg-iters 25

Writes ``results.json`` and ``results.md`` (a markdown table) under ``--work``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List

logger = logging.getLogger("bench")

DATASET = "501"
DATASET_NAME = "Dataset501_BrainDemo"
K_VALUES = (16, 256)
SMALL_NETWORK = ["encoder_channels=[32,64,128]", "num_res_blocks=3", "num_hyper_res_blocks=3"]
SEG_LR = "2d.training.per_trainer.seg_from_latent.lr=0.01"   # short runs: nnU-Net's step size (Adam 1e-3 is slow)
SCENARIOS = {"all four": (), "T1+T2 only": (1, 3)}            # channel ids removed from the test cases
REGIONS = ("ET", "TC", "WT")


def run(cli, argv: List[str]) -> None:
    """Run an nnsynth command in-process; a non-zero exit stops the benchmark."""
    logger.info("$ %s", " ".join(argv))
    rc = cli(argv)
    if rc != 0:
        raise SystemExit(f"command failed with exit code {rc}: {' '.join(argv)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/nnsynth_oneshot"))
    p.add_argument("--cases", type=int, default=16)
    p.add_argument("--test-cases", type=int, default=6)
    p.add_argument("--spacing", type=float, default=4.0)
    p.add_argument("--vq-minutes", type=float, default=3.0, help="vq_seq2seq training time per K")
    p.add_argument("--seg-epochs", type=int, default=10)
    p.add_argument("--seg-iters", type=int, default=25)
    p.add_argument("--device", default="cpu")
    p.add_argument("--fresh", action="store_true", help="delete --work first")
    args = p.parse_args()

    from nnsynth.utils.log import setup_logging
    setup_logging()
    if args.fresh and args.work.exists():
        shutil.rmtree(args.work)
    from nnsynth.paths import use_data_root
    use_data_root(args.work, create=True)
    os.environ.setdefault("NNSYNTH_NO_TQDM", "1")
    from nnsynth.cli import evaluate, make_demo, plan_and_preprocess, predict, train
    timings: Dict[str, float] = {}
    raw = args.work / "raw" / DATASET_NAME
    if not raw.is_dir():
        run(make_demo.cli, ["-d", DATASET, "--cases", str(args.cases), "--test-cases", str(args.test_cases),
                            "--spacing", str(args.spacing), "--no-montage"])
    for k in K_VALUES:
        run(plan_and_preprocess.cli, ["-d", DATASET, "-c", "2d", "-np", "0", "--no-progress", "--plans-name",
                                      f"nnsynthPlansK{k}", "--overwrite", f"vq.codebook_size={k}", *SMALL_NETWORK,
                                      SEG_LR])
    results = args.work / "results" / DATASET_NAME
    for k in K_VALUES:
        if not (results / f"vq_seq2seq__nnsynthPlansK{k}__2d" / "fold_0" / "checkpoint_final.pth").is_file():
            t0 = time.time()
            run(train.cli, [DATASET, "vq_seq2seq", "0", "-p", f"nnsynthPlansK{k}", "--max-minutes",
                            str(args.vq_minutes), "--device", args.device])
            timings[f"vq_seq2seq K={k}"] = time.time() - t0

    budget = ["--epochs", str(args.seg_epochs), "--iters-per-epoch", str(args.seg_iters), "--device", args.device]
    models = {f"latent K={k}": ("seg_from_latent", f"nnsynthPlansK{k}") for k in K_VALUES}
    models["images"] = ("seg_from_images", f"nnsynthPlansK{K_VALUES[0]}")
    labelled = None
    import torch
    for name, (trainer, plans) in models.items():
        ck = results / f"{trainer}__{plans}__2d" / "fold_0" / "checkpoint_final.pth"
        if not ck.is_file():
            extra = ["--latent-from", "vq_seq2seq"] if trainer == "seg_from_latent" else []
            extra += ["--cases", labelled] if labelled else ["--labelled-cases", "1"]
            t0 = time.time()
            run(train.cli, [DATASET, trainer, "0", "-p", plans, *extra, *budget])
            timings[f"{trainer} {plans}"] = time.time() - t0
        state = torch.load(ck, map_location="cpu", weights_only=False)
        cases = state["extra"]["labelled_cases"]
        if labelled is None:
            labelled = cases[0]
        if cases != [labelled]:
            raise SystemExit(f"{name} was trained on {cases}, not the benchmark's labelled case {labelled}; use --fresh")

    table: Dict[str, Dict[str, Any]] = {}
    for scenario, removed in SCENARIOS.items():
        inp = args.work / "inputs" / scenario.replace(" ", "_").replace("+", "")
        if not inp.is_dir():
            shutil.copytree(raw / "imagesTs", inp)
            for f in inp.iterdir():
                if any(f.name.endswith(f"_{cid:04d}.nii.gz") for cid in removed):
                    f.unlink()
        for name, (trainer, plans) in models.items():
            out = args.work / "predictions" / f"{trainer}_{plans}" / inp.name
            t0 = time.time()
            run(predict.cli, ["-i", str(inp), "-o", str(out), "--segment", "-d", DATASET, "-tr", trainer, "-p", plans,
                              "-c", "2d", "--device", args.device, "--no-progress"])
            timings[f"predict {name} {scenario}"] = time.time() - t0
            run(evaluate.cli, ["-r", str(raw / "labelsTs"), "-p", str(out), "--seg", "-d", DATASET, "--no-progress"])
            summary = json.loads((out / "segmentation_summary.json").read_text())["all"]
            table.setdefault(scenario, {})[name] = summary

    lines = [f"Labelled case: {labelled} (one case, all four sequences); test cases: {args.test_cases}; "
             f"vq_seq2seq {args.vq_minutes} min per K; segmentation {args.seg_epochs} x {args.seg_iters} iterations.",
             "", "| test input | model | " + " | ".join(f"Dice {r}" for r in REGIONS) + " | " +
             " | ".join(f"ASSD {r} (mm)" for r in REGIONS) + " |",
             "| --- | --- | " + " | ".join("---" for _ in range(2 * len(REGIONS))) + " |"]

    def fmt(s: Dict[str, Any], key: str) -> str:
        m, sd, u = s["mean"].get(key), s["std"].get(key), s["undefined"].get(key, 0)
        text = "n/a" if m is None else f"{m:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")
        return text + (f" ({u} undef.)" if u else "")
    for scenario, rows in table.items():
        for name, s in rows.items():
            lines.append(f"| {scenario} | {name} | " + " | ".join(fmt(s, f"dice_{r}") for r in REGIONS) + " | " +
                         " | ".join(fmt(s, f"assd_{r}") for r in REGIONS) + " |")
    text = "\n".join(lines)
    (args.work / "results.md").write_text(text + "\n")
    (args.work / "results.json").write_text(json.dumps({"labelled_case": labelled, "args": {
        k: str(v) for k, v in vars(args).items()}, "timings_s": timings, "results": table}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
