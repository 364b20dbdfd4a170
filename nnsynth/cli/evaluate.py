"""``nnsynth_evaluate -r REF -p PRED``: metrics of synthesised images against their truth."""
from __future__ import annotations

import argparse
import logging
from typing import List, Optional

from nnsynth.cli.common import run_cli

logger = logging.getLogger("nnsynth")


def build_parser() -> argparse.ArgumentParser:
    from nnsynth.evaluation.evaluate import DEFAULT_PROFILE, PROFILES
    p = argparse.ArgumentParser(
        prog="nnsynth_evaluate",
        description="Compare predictions PRED/{case}_{XXXX}{ending} with REF/{case}_{XXXX}{ending}: PSNR, SSIM, MAE "
                    "(CONTRACT.md section 5) and LPIPS when its weights are on this machine. Writes a per-case CSV "
                    "and summary.json (mean and std per sources -> target task).")
    p.add_argument("-r", "--reference", required=True, help="folder of the true images")
    p.add_argument("-p", "--prediction", required=True, help="folder of the predictions (nnsynth_predict -o)")
    p.add_argument("-d", "--dataset", default=None, help="dataset id or name (sequence names; optional)")
    p.add_argument("-o", "--output", default=None,
                   help="per-case CSV (default PRED/metrics.csv); summary.json is written beside it")
    p.add_argument("-l", "--labels", default=None,
                   help="label folder ({case}{ending}): adds metrics inside the tumour (label > 0) and outside it")
    p.add_argument("--profile", default=DEFAULT_PROFILE, choices=list(PROFILES),
                   help="metric convention: contract (CONTRACT.md section 5, default), seq2seq, codebrain, brasyn")
    p.add_argument("--sources-from", default=None,
                   help="the prediction input folder, to name the sources of each case when PRED has no "
                        "nnsynth_predictions.json")
    p.add_argument("--report", action="store_true",
                   help="also write report.md with the metrics tables and PNG montages (inputs from --sources-from)")
    p.add_argument("--seg", action="store_true",
                   help="evaluate label maps PRED/{case}{ending} against REF/{case}{ending} (e.g. labelsTs): Dice "
                        "and ASSD (mm) for ET, TC (NCR+ET), WT (all tumour) per case; writes "
                        "segmentation_metrics.csv (or -o) and segmentation_summary.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(args: argparse.Namespace) -> int:
    if args.seg:
        return _evaluate_segmentation(args)
    from nnsynth.evaluation.evaluate import evaluate_folders
    df, summary = evaluate_folders(args.reference, args.prediction, args.dataset, args.labels, args.profile,
                                   args.output, args.sources_from, progress=not args.no_progress)
    if args.report:
        from pathlib import Path

        from nnsynth.evaluation.report import write_report
        out_dir = Path(args.output).parent if args.output else Path(args.prediction)
        write_report(df, summary, args.reference, args.prediction, out_dir, args.sources_from)
    for task, s in summary["tasks"].items():
        logger.info("%-28s n=%-3d %s", task, s["n"], "  ".join(
            f"{k} {v:.4g}" for k, v in s["mean"].items() if v is not None and "_" not in k))
    if summary["problems"]:
        for f, why in summary["problems"].items():
            logger.error("%s: %s", f, why)
        logger.error("%d prediction(s) could not be evaluated (listed above)", len(summary["problems"]))
        return 1
    return 0


def _evaluate_segmentation(args: argparse.Namespace) -> int:
    from nnsynth.evaluation.segmentation import evaluate_segmentation_folders, format_summary
    _, summary = evaluate_segmentation_folders(args.reference, args.prediction, args.dataset, args.output,
                                               progress=not args.no_progress)
    logger.info("%d case(s); regions %s\n%s", summary["all"]["n"], summary["regions"], format_summary(summary))
    if summary["problems"]:
        for f, why in summary["problems"].items():
            logger.error("%s: %s", f, why)
        logger.error("%d label map(s) could not be evaluated (listed above)", len(summary["problems"]))
        return 1
    return 0


def cli(argv: Optional[List[str]] = None) -> int:
    return run_cli(main, build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(cli())
