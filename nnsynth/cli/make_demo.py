"""``nnsynth_make_demo_dataset``: write the built-in simulated brain MRI dataset (no download needed)."""
from __future__ import annotations

import argparse
from typing import List, Optional

from nnsynth.cli.common import run_cli
from nnsynth.constants import (DEMO_DATASET_ID, DEMO_MISSING_RATE, DEMO_NUM_CASES, DEMO_NUM_TEST_CASES,
                               DEMO_SEED, DEMO_SEQUENCES, DEMO_SPACING)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnsynth_make_demo_dataset",
        description="Write a simulated multi-sequence brain MRI dataset with tumours (real MNI ICBM152 "
                    "anatomy, MR signal equations) to $nnSynth_raw/DatasetXXX_Name in nnU-Net raw format. "
                    "Training cases miss sequences; test cases are complete, with their truth in "
                    "imagesTs_truth/ and labelsTs/.")
    p.add_argument("-d", "--dataset", default=str(DEMO_DATASET_ID),
                   help="dataset id (e.g. 501) or full name (Dataset501_BrainDemo); default %(default)s")
    p.add_argument("--name", default=None, help="dataset name after the id (default BrainDemo)")
    p.add_argument("--cases", type=int, default=DEMO_NUM_CASES, help="training cases (default %(default)s)")
    p.add_argument("--test-cases", type=int, default=DEMO_NUM_TEST_CASES,
                   help="complete test cases in imagesTs (default %(default)s)")
    p.add_argument("--spacing", type=float, default=DEMO_SPACING,
                   help="isotropic voxel size in mm (default %(default)s: about 86x99x81 voxels)")
    p.add_argument("--sequences", default=",".join(DEMO_SEQUENCES),
                   help="comma-separated subset/order of T1,T1Gd,T2,Flair,PD (default %(default)s)")
    p.add_argument("--missing", type=float, default=DEMO_MISSING_RATE,
                   help="probability that a training case lacks a sequence; each keeps at least 2 "
                        "(default %(default)s)")
    p.add_argument("--pairing", choices=("random", "chain"), default="random",
                   help="chain: training cases hold only consecutive pairs of --sequences, e.g. (T1,T1Gd), "
                        "(T1Gd,T2), (T2,Flair) (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEMO_SEED, help="random seed (default %(default)s)")
    p.add_argument("--size-scale", type=float, default=1.0,
                   help="shrink (<1) or grow the head; voxels per axis scale with it (default %(default)s)")
    p.add_argument("--no-montage", action="store_true", help="skip montage.png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    return p


def main(args: argparse.Namespace) -> int:
    from nnsynth.dataset.demo.generator import make_demo_dataset

    sequences = [s for s in args.sequences.split(",") if s.strip()]
    make_demo_dataset(dataset=args.dataset, name=args.name, num_cases=args.cases,
                      num_test_cases=args.test_cases, spacing=args.spacing, sequences=sequences,
                      missing=args.missing, pairing=args.pairing, seed=args.seed, size_scale=args.size_scale,
                      overwrite=args.overwrite, montage=not args.no_montage)
    return 0


def cli(argv: Optional[List[str]] = None) -> int:
    return run_cli(main, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(cli())
