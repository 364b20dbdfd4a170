"""``nnsynth_plan_and_preprocess -d 501``: fingerprint, plans, preprocessed data.

Each step can be re-run cheaply: the fingerprint is reused while the raw files are unchanged, plans are
rewritten (with ``--overwrite`` edits; ``--use-existing-plans`` keeps a hand-edited file), and preprocessing
skips cases that are up to date. ``--clean`` redoes everything.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path
from typing import List, Optional

from nnsynth.cli.common import run_cli
from nnsynth.constants import DATASET_JSON, DEFAULT_PLANS_IDENTIFIER, FINGERPRINT_JSON
from nnsynth.dataset.cases import discover_cases
from nnsynth.dataset.dataset_json import load_dataset_spec
from nnsynth.exceptions import DatasetFormatError, NnsynthError
from nnsynth.paths import preprocessed_folder, raw_dataset_folder
from nnsynth.planning.fingerprint import FINGERPRINT_VERSION, dataset_signature, default_num_workers, \
    extract_fingerprint
from nnsynth.planning.plans import apply_overrides, load_plans, plans_path, save_plans
from nnsynth.planning.planner import get_planner_class
from nnsynth.utils.files import atomic_write, load_json, save_json

logger = logging.getLogger("nnsynth.plan_and_preprocess")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnsynth_plan_and_preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", nargs="+", required=True, help="dataset id(s) or name(s), e.g. 501")
    p.add_argument("-c", "--configurations", nargs="+", default=["2d", "3d"], choices=["2d", "3d"],
                   help="configurations to plan and preprocess (default: 2d 3d; 3d is left out for 2D images)")
    p.add_argument("-np", "--num-processes", type=int, default=None,
                   help=f"worker processes (0 = in-process; default here: {default_num_workers()})")
    p.add_argument("--clean", action="store_true", help="recompute the fingerprint and redo every case")
    p.add_argument("--verify", action="store_true", help="validate the raw dataset first; stop on problems")
    p.add_argument("-pl", "--planner", default="default",
                   help="planner: registered name or dotted path to a DefaultPlanner subclass")
    p.add_argument("--plans-name", default=DEFAULT_PLANS_IDENTIFIER, help="plans identifier (file name)")
    p.add_argument("--overwrite", nargs="+", default=[], metavar="KEY=VALUE",
                   help="edit the plans, e.g. latent_dim=4 2d.batch_size=8 (values parsed as JSON)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="compute target the plans are sized for (default: what this machine has)")
    p.add_argument("--memory-gb", type=float, default=None,
                   help="memory budget of the compute target (default: GPU memory, or half the RAM)")
    p.add_argument("--no-preprocess", action="store_true", help="only fingerprint and plan")
    p.add_argument("--use-existing-plans", action="store_true",
                   help="keep an existing (e.g. hand-edited) plans file instead of re-planning")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _fingerprint(raw: Path, out: Path, spec, cases, num_workers: int, clean: bool, progress: bool) -> dict:
    path = out / FINGERPRINT_JSON
    if path.is_file() and not clean:
        try:
            fp = load_json(path)
            if fp.get("fingerprint_version") == FINGERPRINT_VERSION and \
                    fp.get("dataset_signature") == dataset_signature(cases):
                logger.info("Fingerprint is up to date: %s", path)
                return fp
        except ValueError:
            pass
    t = time.time()
    fp = extract_fingerprint(raw, num_workers=num_workers, cases=cases, spec=spec, progress=progress)
    save_json(fp, path)
    logger.info("Fingerprint written in %.1f s: %s", time.time() - t, path)
    return fp


def run_one(dataset: str, args: argparse.Namespace) -> int:
    raw = raw_dataset_folder(dataset)
    name = raw.name
    num_workers = default_num_workers() if args.num_processes is None else max(0, args.num_processes)
    progress = not args.no_progress
    if args.verify:
        from nnsynth.dataset.validation import validate_dataset  # lazy: heavy and optional
        report = validate_dataset(raw, check_images=True, num_workers=num_workers)
        for w in report.warnings:
            logger.warning("%s", w)
        report.raise_if_problems()
        logger.info("Dataset %s is valid", name)
    spec = load_dataset_spec(raw)
    cases = discover_cases(raw / "imagesTr", spec, raw / "labelsTr")
    if not cases:
        raise DatasetFormatError([f"{raw / 'imagesTr'}: no training case found"],
                                 header=f"Cannot plan {name}")
    out = preprocessed_folder() / name
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / DATASET_JSON, lambda tmp: shutil.copyfile(raw / DATASET_JSON, tmp))
    fp = _fingerprint(raw, out, spec, cases, num_workers, args.clean, progress)

    ppath = plans_path(out, args.plans_name)
    if args.use_existing_plans and ppath.is_file():
        plans = load_plans(ppath)
        logger.info("Using the existing plans %s", ppath)
    else:
        planner_cls = get_planner_class(args.planner)
        planner = planner_cls(fp, name, device=args.device, memory_gb=args.memory_gb, plans_name=args.plans_name)
        plans = planner.plan(args.configurations)
    if args.overwrite:
        plans = apply_overrides(plans, args.overwrite)
    save_plans(plans, ppath)
    for cname, conf in plans["configurations"].items():
        logger.info("Plan %s (%s, %.0f GB): spacing %s, patch %s, batch %d, channels %s, D=%d K=%d, FSQ %s",
                    cname, plans["compute"]["device"], plans["compute"]["memory_gb"],
                    [round(s, 3) for s in conf["spacing"]], conf["patch_size"], conf["batch_size"],
                    conf["network"]["encoder_channels"], conf["vq"]["latent_dim"], conf["vq"]["codebook_size"],
                    conf["fsq"]["levels"])
    logger.info("Plans written: %s", ppath)
    if args.no_preprocess:
        return 0

    from nnsynth.preprocessing.preprocessor import preprocess_dataset
    failures: List[str] = []
    for cname in args.configurations:
        if cname not in plans["configurations"]:
            continue
        t = time.time()
        res = preprocess_dataset(cases, plans, cname, out, num_workers=num_workers, clean=args.clean,
                                 progress=progress)
        logger.info("%s: %d preprocessed, %d up to date, %d failed (%.1f s) -> %s", cname, len(res["done"]),
                    len(res["skipped"]), len(res["failed"]), time.time() - t,
                    out / plans["configurations"][cname]["data_identifier"])
        failures += [f"{cname} {k}: {v}" for k, v in res["failed"].items()]
    if failures:
        raise NnsynthError(f"{len(failures)} case(s) of {name} failed (all others are done; fix them and "
                           "re-run, finished cases are skipped):\n" + "\n".join(f"  - {f}" for f in failures))
    return 0


def main(args: argparse.Namespace) -> int:
    rc = 0
    for d in args.dataset:
        rc = max(rc, run_one(d, args))
    return rc


def cli(argv: Optional[List[str]] = None) -> int:
    return run_cli(main, build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(cli())
