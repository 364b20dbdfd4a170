"""Logging set-up shared by the command-line entry points."""
from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


def setup_logging(verbose: bool = False) -> None:
    """Configure the root ``nnsynth`` logger once: concise console lines, DEBUG with ``-v``."""
    global _CONFIGURED
    level = logging.DEBUG if verbose or os.environ.get("NNSYNTH_DEBUG") else logging.INFO
    logger = logging.getLogger("nnsynth")
    logger.setLevel(level)
    if not _CONFIGURED:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
        _CONFIGURED = True
    for h in logger.handlers:
        h.setLevel(level)
