"""``nnsynth_analyze -d 501 -tr seq2seq``: sequence ranking, imaging-differentiation maps, contributions."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import List, Optional

from nnsynth.cli.common import run_cli

logger = logging.getLogger("nnsynth")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnsynth_analyze",
        description="Explain a trained model (Seq2Seq paper sec. 3.5): synthesis matrix A_ij over every source -> "
                    "target pair, totipotency C_t and imaging differentiation C_d with their ranking, per-case "
                    "imaging-differentiation maps M_d, and source contributions for TSF models. Writes CSV, JSON "
                    "and PNG files.",
        epilog="By default each fold's model is analysed on that fold's validation cases (nnSynth_preprocessed); "
               "-i analyses the raw cases of a folder with the fold ensemble instead.")
    p.add_argument("-d", "--dataset", default=None, help="dataset id or name")
    p.add_argument("-tr", "--trainer", default=None, help="trainer name (e.g. seq2seq)")
    p.add_argument("-c", "--configuration", default=None, help="configuration (e.g. 2d)")
    p.add_argument("-p", "--plans", default=None, help="plans identifier")
    p.add_argument("-m", "--model-folder", default=None, help="model folder instead of searching")
    p.add_argument("-f", "--folds", nargs="+", default=None, help="folds (default: every fold with the checkpoint)")
    p.add_argument("-chk", "--checkpoint", default="final", choices=["final", "best", "latest"])
    p.add_argument("-i", "--input", default=None, help="analyse the cases of this folder ({case}_{XXXX}{ending})")
    p.add_argument("-o", "--output", default=None, help="output folder (default: MODEL_FOLDER/analysis)")
    p.add_argument("--max-cases", type=int, default=None, help="analyse at most this many cases (per fold)")
    p.add_argument("--no-maps", action="store_true", help="skip writing the per-case M_d images")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--step-size", type=float, default=0.5, help="sliding-window step (fraction of the patch)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(args: argparse.Namespace) -> int:
    from nnsynth.evaluation.analysis import folder_cases, preprocessed_validation_cases, run_analysis
    from nnsynth.inference.predictor import Predictor, find_model_folder, parse_model_folder

    model = parse_model_folder(args.model_folder) if args.model_folder else \
        find_model_folder(args.dataset, args.trainer, args.configuration, args.plans, args.checkpoint)
    out = Path(args.output) if args.output else model.path / "analysis"
    common = dict(checkpoint=args.checkpoint, device=args.device, step_size=args.step_size,
                  progress=not args.no_progress)
    if args.input:
        predictor = Predictor(model.path, args.folds, **common)
        cases = ((predictor, c) for c in folder_cases(predictor, args.input, args.max_cases))
    else:  # each fold's model on that fold's validation cases
        folds = [str(f) for f in args.folds] if args.folds else model.folds(args.checkpoint)
        predictors = [Predictor(model.path, [f], **common) for f in folds]
        predictor = predictors[0]
        cases = ((p, c) for p, f in zip(predictors, folds)
                 for c in preprocessed_validation_cases(p, f, args.max_cases))
    summary = run_analysis(predictor, cases, out, save_maps=not args.no_maps)
    logger.info("Totipotency ranking: %s", " > ".join(summary["ranking_totipotency"]))
    logger.info("Imaging-differentiation ranking: %s", " > ".join(summary["ranking_differentiation"]))
    logger.info("%s over %d case(s) -> %s", summary["formula"], summary["num_cases"], out)
    return 0


def cli(argv: Optional[List[str]] = None) -> int:
    return run_cli(main, build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(cli())
