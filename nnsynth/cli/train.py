"""``nnsynth_train DATASET TRAINER FOLD``: train one fold of one configuration with the shared engine."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from nnsynth.cli.common import EXIT_NOT_AVAILABLE, run_cli
from nnsynth.constants import DEFAULT_PLANS_IDENTIFIER
from nnsynth.exceptions import NnsynthError, PlansError
from nnsynth.utils.files import load_json

logger = logging.getLogger("nnsynth")


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA, then Apple MPS, then CPU; an explicit device that is not there is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise NnsynthError("--device cuda was requested but no CUDA GPU is visible; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise NnsynthError("--device mps was requested but Apple MPS is not available; use --device cpu or auto")
    return torch.device(name)


def load_plans(preprocessed_dataset_folder: Path, plans_identifier: str) -> Dict[str, Any]:
    path = preprocessed_dataset_folder / f"{plans_identifier}.json"
    if not path.is_file():
        raise PlansError(f"No plans at {path}. Run nnsynth_plan_and_preprocess -d {preprocessed_dataset_folder.name} "
                         f"first (or pass -p with the plans identifier you used).")
    try:
        from nnsynth.planning.plans import load_plans as _load  # validates the schema when available
    except ImportError:
        _load = None
    return _load(path) if _load is not None else load_json(path)


def build_trainer(trainer_cls: type, kwargs: Dict[str, Any], rank: int = 0, world_size: int = 1):
    return trainer_cls(**kwargs, rank=rank, world_size=world_size)


def configure_rank(rank: int, world_size: int, device: torch.device) -> torch.device:
    """Per-process set-up of a DDP rank; returns its device. Rank 0 reports progress and the others only
    warnings and errors (no line printed twice). CPU ranks share the machine's cores, so each takes its share of
    torch's threads instead of all of them (N processes x all cores would oversubscribe)."""
    if rank > 0:
        logging.getLogger("nnsynth").setLevel(logging.WARNING)
    if device.type == "cuda":
        return torch.device("cuda", rank)
    torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
    return device


def _ddp_worker(rank: int, world_size: int, trainer_cls: type, kwargs: Dict[str, Any], resume: bool) -> None:
    from nnsynth.utils.log import setup_logging
    setup_logging()
    kwargs = {**kwargs, "device": configure_rank(rank, world_size, kwargs["device"])}
    build_trainer(trainer_cls, kwargs, rank, world_size).run_training(continue_training=resume)


def _main(args: argparse.Namespace) -> int:
    from nnsynth import paths
    from nnsynth.training.registry import TrainerNotAvailableError, get_trainer

    try:
        trainer_cls = get_trainer(args.trainer, args.trainer_class)
    except TrainerNotAvailableError as e:
        logger.error("Trainer %r: %s (planned in a later version).", args.trainer, e)
        return EXIT_NOT_AVAILABLE
    dataset_name = paths.resolve_dataset_name(args.dataset)
    pre = paths.preprocessed_folder() / dataset_name
    plans = load_plans(pre, args.plans)
    if args.configuration not in plans.get("configurations", {}):
        raise PlansError(f"Configuration {args.configuration!r} is not in {pre / (args.plans + '.json')} "
                         f"(available: {', '.join(plans.get('configurations', {}))})")
    device = resolve_device(args.device)
    output = paths.results_folder() / dataset_name / f"{args.trainer}__{args.plans}__{args.configuration}"
    kwargs = dict(plans=plans, configuration=args.configuration, fold=args.fold, preprocessed_dataset_folder=pre,
                  output_folder=output, device=device, num_epochs=args.epochs, iters_per_epoch=args.iters_per_epoch,
                  max_minutes=args.max_minutes, seed=args.seed, num_workers=args.num_workers)
    kwargs.update(_trainer_specific_kwargs(trainer_cls, args))
    if args.num_gpus > 1:
        if device.type == "cuda" and torch.cuda.device_count() < args.num_gpus:
            raise NnsynthError(f"--num-gpus {args.num_gpus} but only {torch.cuda.device_count()} GPU(s) are visible")
        if device.type == "mps":
            raise NnsynthError("--num-gpus > 1 is not supported with --device mps")
        if args.val_only:
            raise NnsynthError("--val-only runs in one process; drop --num-gpus")
        from nnsynth.training.distributed import launch
        launch(args.num_gpus, _ddp_worker, (trainer_cls, kwargs, args.c))
        return 0
    trainer = build_trainer(trainer_cls, kwargs)
    if args.val_only:
        return _validate_only(trainer)
    trainer.run_training(continue_training=args.c)
    return 0


# options that only some trainers take: CLI flag -> keyword argument of the trainer's __init__
TRAINER_SPECIFIC_OPTIONS = {"--stage": "stage", "--pretrained-from": "pretrained_from",
                            "--latent-from": "latent_from", "--labelled-cases": "labelled_cases",
                            "--cases": "labelled_case_names"}


def _trainer_specific_kwargs(trainer_cls: type, args: argparse.Namespace) -> Dict[str, Any]:
    """Pass trainer-specific options only to trainers whose constructor takes them; refuse them elsewhere."""
    import inspect
    accepted = set()
    for klass in trainer_cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            accepted |= set(inspect.signature(init).parameters)
    out: Dict[str, Any] = {}
    for flag, key in TRAINER_SPECIFIC_OPTIONS.items():
        value = getattr(args, key)
        if value is None:
            continue
        if key not in accepted:
            raise NnsynthError(f"{flag} does not apply to trainer {args.trainer!r}")
        out[key] = value
    return out


def _validate_only(trainer) -> int:
    from nnsynth.training import checkpointing as ckpt
    trainer.initialize()
    for name in (ckpt.CHECKPOINT_FINAL, ckpt.CHECKPOINT_BEST, ckpt.CHECKPOINT_LATEST):
        path = trainer.fold_folder / name
        if path.is_file():
            try:
                trainer.load_checkpoint_state(ckpt.load_checkpoint(path, trainer.device))
            except ValueError as e:
                logger.warning("Skipping a damaged checkpoint: %s", e)
                continue
            logger.info("--val-only: validating %s", path)
            trainer.final_validation()
            return 0
    raise NnsynthError(f"--val-only: no usable checkpoint in {trainer.fold_folder}; train first")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnsynth_train", description="Train one fold of a synthesis model on a preprocessed dataset.",
        epilog="Results: nnSynth_results/DatasetXXX_Name/{trainer}__{plans}__{configuration}/fold_{k}/. "
               "Own trainers: --trainer-class pkg.module:Class, NNSYNTH_TRAINERS or the 'nnsynth.trainers' "
               "entry-point group (see documentation/training.md).")
    p.add_argument("dataset", help="dataset id (501) or name (Dataset501_BrainDemo)")
    p.add_argument("trainer", help="seq2seq, vq_seq2seq, tsf_seq2seq, codebrain, seg_from_latent, seg_from_images or "
                                   "a registered name")
    p.add_argument("fold", help="0-4 or 'all'")
    p.add_argument("-c", "--configuration", default="2d", help="configuration in the plans (default: 2d)")
    p.add_argument("-p", "--plans", default=DEFAULT_PLANS_IDENTIFIER, help="plans identifier (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--c", action="store_true", help="continue from the last checkpoint (final > latest > best)")
    p.add_argument("--epochs", type=int, default=None, help="override the plans' num_epochs")
    p.add_argument("--iters-per-epoch", type=int, default=None, help="override the plans' iters_per_epoch")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop cleanly (final checkpoint) after this much training time; the LR schedule is fitted "
                        "to the budget")
    p.add_argument("--val-only", action="store_true", help="only run the full-volume validation of a trained fold")
    p.add_argument("--num-gpus", type=int, default=1, help="DDP processes (NCCL on GPUs, gloo with --device cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="background data-loading processes (default: the plans' value; 0 = in-process)")
    p.add_argument("--stage", type=int, choices=[1, 2], default=None,
                   help="codebrain: run only stage 1 or stage 2 (default: both, in order)")
    p.add_argument("--pretrained-from", default=None, metavar="TRAINER",
                   help="tsf_seq2seq: start from this trained model of the same dataset, fold and configuration "
                        "(seq2seq or vq_seq2seq)")
    p.add_argument("--latent-from", default=None, metavar="TRAINER",
                   help="seg_from_latent: the trained synthesis model whose frozen encoder gives the latent space "
                        "(vq_seq2seq or seq2seq of the same dataset, fold and configuration, or a checkpoint path; "
                        "default: vq_seq2seq, then seq2seq)")
    p.add_argument("--labelled-cases", type=int, default=None, metavar="N",
                   help="seg_from_latent / seg_from_images: train on the first N labelled training cases of the fold "
                        "(complete cases with tumour first; default 1, one-shot)")
    p.add_argument("--cases", nargs="+", default=None, dest="labelled_case_names", metavar="CASE",
                   help="seg_from_latent / seg_from_images: train on exactly these labelled cases")
    p.add_argument("--trainer-class", default=None, metavar="MODULE:CLASS",
                   help="train with this TrainingEngine subclass; TRAINER is then only the name of the output folder")
    return p


def cli(argv: Optional[List[str]] = None) -> int:
    return run_cli(_main, build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(cli())
