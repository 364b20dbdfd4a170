"""``nnsynth_verify_dataset -d 501``: check a raw dataset and show which case has which sequence.

Exit 0 when the dataset is valid (warnings allowed), 1 with every problem listed when it is not.
Reads only; writes nothing.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

import pandas as pd

from nnsynth.cli.common import EXIT_USER_ERROR, run_cli
from nnsynth.dataset.cases import summarize_availability
from nnsynth.dataset.validation import validate_dataset
from nnsynth.paths import raw_dataset_folder

logger = logging.getLogger("nnsynth.verify")

# Above this many cases the table shows head and tail only, unless --full.
TABLE_MAX_ROWS = 60


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnsynth_verify_dataset",
        description="Check a raw dataset (nnSynth_raw/DatasetXXX_Name) and report every problem at once: "
                    "dataset.json keys, file names, unreadable images, geometry mismatches, NaN/Inf or "
                    "all-zero images, labels, numTraining. Prints the case x sequence availability table. "
                    "Writes nothing.")
    p.add_argument("-d", "--dataset", required=True, help="dataset id (501) or name (Dataset501_BrainDemo)")
    p.add_argument("-np", "--num-processes", type=int, default=0,
                   help="worker processes for reading images (default 0: read in this process)")
    p.add_argument("--headers-only", action="store_true",
                   help="read image headers only (names and geometry; skips NaN/zero/label-value checks)")
    p.add_argument("--full", action="store_true", help=f"print every row of the table (default: at most "
                                                        f"{TABLE_MAX_ROWS} rows)")
    return p


def render_availability(df: pd.DataFrame, full: bool = False) -> str:
    """Case x sequence table with a check mark per present sequence (ASCII where the terminal needs it)."""
    if df.empty:
        return "(no cases)"
    yes, no = _marks()
    shown = df.replace({True: yes, False: no}).astype(str)
    if not full and len(shown) > TABLE_MAX_ROWS:
        half = TABLE_MAX_ROWS // 2
        text = pd.concat([shown.head(half), shown.tail(half)]).to_string()
        lines = text.splitlines()
        lines.insert(2 + half, f"... ({len(df) - 2 * half} more cases; --full shows all)")
        return "\n".join(lines)
    return shown.to_string()


def _marks() -> tuple:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "✓·".encode(encoding)
        return "✓", "·"
    except (UnicodeEncodeError, LookupError):
        return "x", "."


def main(args: argparse.Namespace) -> int:
    if args.num_processes < 0:
        logger.error("-np must be 0 or more, got %d", args.num_processes)
        return EXIT_USER_ERROR
    folder = raw_dataset_folder(args.dataset)
    report = validate_dataset(folder, check_images=not args.headers_only, num_workers=args.num_processes)
    if not report.availability.empty:
        print(f"Training cases ({folder.name}/imagesTr):")
        print(render_availability(report.availability, args.full))
        logger.info("Summary of %s:\n%s", folder.name, summarize_availability(report.availability))
    if not report.test_availability.empty:
        print(f"Test cases ({folder.name}/imagesTs):")
        print(render_availability(report.test_availability, args.full))
    for w in report.warnings:
        logger.warning("%s", w)
    report.raise_if_problems()
    logger.info("%s is a valid nnsynth dataset (%d training cases, %d test cases, %d warning%s).", folder.name,
                len(report.cases), len(report.test_cases), len(report.warnings),
                "" if len(report.warnings) == 1 else "s")
    return 0


def cli(argv: Optional[List[str]] = None) -> int:
    return run_cli(main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
