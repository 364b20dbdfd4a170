"""Logging set-up shared by the command-line entry points."""
from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time, so redirections (pytest capsys, notebooks) work."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(verbose: bool = False) -> None:
    """Configure the root ``nnsynth`` logger once: concise console lines, DEBUG with ``-v``."""
    global _CONFIGURED
    level = logging.DEBUG if verbose or os.environ.get("NNSYNTH_DEBUG") else logging.INFO
    logger = logging.getLogger("nnsynth")
    logger.setLevel(level)
    if not _CONFIGURED:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
        _CONFIGURED = True
    for h in logger.handlers:
        h.setLevel(level)


def progress_disabled(requested: bool = True) -> bool:
    """Whether to hide a tqdm bar: when not requested, when ``NNSYNTH_NO_TQDM`` is set, or when stderr is not a
    terminal (a log file or CI would otherwise fill with carriage-return updates; log lines still report)."""
    if not requested or os.environ.get("NNSYNTH_NO_TQDM"):
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    return not (callable(isatty) and isatty())
