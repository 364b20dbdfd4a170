"""`nnsynth_evaluate`: not built yet; exits 2 with a clear message until its issue lands."""
from __future__ import annotations

import argparse
from typing import List, Optional

from nnsynth.cli.common import not_available


def cli(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="nnsynth_evaluate", description="Not available yet in this version of nnsynth.")
    parser.parse_args(argv)
    return not_available("nnsynth_evaluate", "issue 7 (evaluation)")
