"""What every command shares: logging, user errors without tracebacks, Ctrl-C, exit codes."""
from __future__ import annotations

import argparse
import logging
from typing import Callable, List, Optional

from nnsynth.exceptions import NnsynthError
from nnsynth.utils.files import WRITE_ERRNOS, describe_write_error
from nnsynth.utils.log import setup_logging

logger = logging.getLogger("nnsynth")

EXIT_USER_ERROR = 1
EXIT_NOT_AVAILABLE = 2
EXIT_INTERRUPTED = 130


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def run_cli(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
            argv: Optional[List[str]] = None) -> int:
    """Parse ``argv``, run ``main(args)`` and turn user errors into a message and a non-zero exit code."""
    add_common_args(parser)
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    try:
        return int(main(args) or 0)
    except NnsynthError as e:
        logger.error("%s", e)
        return EXIT_USER_ERROR
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        where = e.filename or "the output"
        logger.error("%s", describe_write_error(where, e))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        logger.error("Interrupted. Everything written so far is complete; re-run the command to continue.")
        return EXIT_INTERRUPTED


def not_available(command: str, issue: str) -> int:
    """Placeholder body of a command whose stage is not built yet: clear message, exit code 2."""
    setup_logging()
    logger.error("%s is not available yet in this version of nnsynth (planned: %s).", command, issue)
    return EXIT_NOT_AVAILABLE
