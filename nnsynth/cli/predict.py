"""``nnsynth_predict -i IN -o OUT -t Flair``: synthesise missing sequences of every case in a folder."""
from __future__ import annotations

import argparse
import logging
from typing import List, Optional

from nnsynth.cli.common import run_cli

logger = logging.getLogger("nnsynth")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnsynth_predict",
        description="Synthesise missing MRI sequences for every case in a folder with a trained nnsynth model. "
                    "Outputs are OUT/{case}_{XXXX}{ending}, float32, in each case's original geometry and in the "
                    "dataset's normalised intensity space.",
        epilog="With exactly one trained model under nnSynth_results, -i IN -o OUT -t Flair needs nothing else. "
               "See documentation/prediction.md.")
    p.add_argument("-i", "--input", required=True, help="folder of cases named {case}_{XXXX}{ending}")
    p.add_argument("-o", "--output", required=True, help="output folder (created)")
    p.add_argument("-t", "--target", default=None, nargs="+",
                   help="sequence name(s) to synthesise, or 'all' (every sequence missing from a case), or 'seg' "
                        "(label maps from a segmentation model, same as --segment)")
    p.add_argument("--segment", action="store_true",
                   help="write label maps OUT/{case}{ending} in each case's geometry with a trained segmentation "
                        "model (seg_from_latent, seg_from_images); see documentation/trainer_seg_from_latent.md")
    p.add_argument("-d", "--dataset", default=None, help="dataset id or name (needed only with several models)")
    p.add_argument("-tr", "--trainer", default=None, help="trainer name (e.g. seq2seq)")
    p.add_argument("-c", "--configuration", default=None, help="configuration (e.g. 2d, 3d)")
    p.add_argument("-p", "--plans", default=None, help="plans identifier (default: any, e.g. nnsynthPlans)")
    p.add_argument("-m", "--model-folder", default=None,
                   help="use this model folder ({trainer}__{plans}__{configuration}) instead of searching")
    p.add_argument("-f", "--folds", nargs="+", default=None,
                   help="folds to ensemble (default: every fold that has the checkpoint)")
    p.add_argument("-chk", "--checkpoint", default="final", choices=["final", "best", "latest"],
                   help="checkpoint of each fold (default: final)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--step-size", type=float, default=0.5,
                   help="sliding-window step as a fraction of the patch size (default: 0.5)")
    p.add_argument("--tta", action="store_true", help="test-time mirroring (slower, slightly smoother)")
    p.add_argument("--no-calibration", action="store_true",
                   help="skip the model's quantile calibration (the raw network output; see documentation/prediction.md)")
    p.add_argument("--save-maps", action="store_true",
                   help="also write per-case explanations into OUT/maps/ (imaging-differentiation maps; TSEM and "
                        "contribution weights for trainers that provide them)")
    p.add_argument("-np", "--num-processes", type=int, default=2,
                   help="background threads that read upcoming cases and write finished ones "
                        "(default: 2; 0 = everything in one thread)")
    p.add_argument("--num-parts", type=int, default=1, help="split the cases into this many parts (default 1)")
    p.add_argument("--part-id", type=int, default=0, help="which part this process predicts (0-based)")
    p.add_argument("--continue", dest="continue_prediction", action="store_true",
                   help="skip cases whose outputs all exist already (resume an interrupted run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(args: argparse.Namespace) -> int:
    from nnsynth.inference.predictor import Predictor, find_model_folder, predict_folder
    from nnsynth.inference.segmentation import is_segment_target
    if args.segment or is_segment_target(args.target):
        return _segment(args)
    if not args.target:
        from nnsynth.exceptions import NnsynthError
        raise NnsynthError("-t is required: a sequence name, 'all', or 'seg' (label maps; same as --segment)")
    if args.model_folder:
        folder = args.model_folder
    else:
        folder = find_model_folder(args.dataset, args.trainer, args.configuration, args.plans,
                                   args.checkpoint).path
    predictor = Predictor(folder, args.folds, args.checkpoint, args.device, args.step_size, args.tta,
                          progress=not args.no_progress, calibrate=not args.no_calibration)
    report = predict_folder(predictor, args.input, args.output, args.target, save_maps=args.save_maps,
                            continue_prediction=args.continue_prediction, num_parts=args.num_parts,
                            part_id=args.part_id, num_workers=max(0, args.num_processes))
    summary = report.summary()
    if report.failed:
        logger.error("%s", summary)
        logger.error("%d case(s) failed (listed above); the other cases were predicted", len(report.failed))
        return 1
    logger.info("%s", summary)
    return 0


def _segment(args: argparse.Namespace) -> int:
    """``--segment`` / ``-t seg``: label maps from a segmentation model."""
    from nnsynth.inference.predictor import Predictor
    from nnsynth.inference.segmentation import find_segmentation_model, segment_folder
    folder = args.model_folder or find_segmentation_model(args.dataset, args.trainer, args.configuration, args.plans,
                                                          args.checkpoint).path
    predictor = Predictor(folder, args.folds, args.checkpoint, args.device, args.step_size, args.tta,
                          progress=not args.no_progress)
    report = segment_folder(predictor, args.input, args.output, continue_prediction=args.continue_prediction,
                            num_parts=args.num_parts, part_id=args.part_id)
    if report.failed:
        logger.error("%s", report.summary())
        logger.error("%d case(s) failed (listed above); the other cases were segmented", len(report.failed))
        return 1
    logger.info("%s", report.summary())
    return 0


def cli(argv: Optional[List[str]] = None) -> int:
    return run_cli(main, build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(cli())
