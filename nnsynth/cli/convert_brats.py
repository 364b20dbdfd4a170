"""``nnsynth_convert_brats -i BRATS_FOLDER -d 502``: BraTS 2023 folder -> nnsynth raw dataset."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from nnsynth.cli.common import run_cli
from nnsynth.dataset.convert_brats import convert_brats


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnsynth_convert_brats",
        description="Convert BraTS 2023-style folders (one sub-folder per case with {case}-t1n/-t1c/-t2w/-t2f"
                    ".nii.gz and optional -seg.nii.gz) into nnSynth_raw/DatasetXXX_Name with channels "
                    "0=T1, 1=T1Gd, 2=T2, 3=Flair and labels 0 background, 1 NCR, 2 ED, 3 ET. Cases may lack "
                    "sequences. The input is never modified; the result is validated before it appears.")
    p.add_argument("-i", "--input", nargs="+", required=True,
                   help="BraTS folder(s) whose cases go to imagesTr (training and validation folders alike; "
                        "segmentations go to labelsTr where present)")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="3-digit dataset id, e.g. 502")
    p.add_argument("--name", default="BraTS", help="dataset name (default BraTS -> Dataset502_BraTS)")
    p.add_argument("-t", "--test-input", nargs="+", default=[],
                   help="optional BraTS folder(s) whose cases go to imagesTs instead")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--copy", dest="mode", action="store_const", const="copy",
                      help="copy the files (default)")
    mode.add_argument("--symlink", dest="mode", action="store_const", const="symlink",
                      help="symlink the files instead of copying them (saves disk; keep the input in place)")
    p.set_defaults(mode="copy")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of the same name")
    p.add_argument("-np", "--num-processes", type=int, default=0, help="worker processes for validation")
    return p


def main(args: argparse.Namespace) -> int:
    convert_brats(args.input, args.dataset_id, name=args.name, mode=args.mode, test_folders=args.test_input,
                  overwrite=args.overwrite, num_workers=max(0, args.num_processes))
    return 0


def cli(argv: Optional[List[str]] = None) -> int:
    return run_cli(main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
