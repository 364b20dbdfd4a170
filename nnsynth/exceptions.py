"""Exceptions for mistakes a user can make. The CLI prints their message and exits non-zero,
without a traceback; anything else is a bug and keeps its traceback."""
from __future__ import annotations

from typing import Iterable, List


class NnsynthError(Exception):
    """Base class: a problem the user can fix, with an actionable message."""


class DatasetNotFoundError(NnsynthError):
    pass


class DatasetFormatError(NnsynthError):
    """One or more problems in a raw dataset; ``problems`` lists every one of them."""

    def __init__(self, problems: Iterable[str], header: str = "The dataset has problems") -> None:
        self.problems: List[str] = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{header} ({len(self.problems)}):\n{lines}")


class ImageReadError(NnsynthError):
    pass


class PlansError(NnsynthError):
    pass


class OutputWriteError(NnsynthError):
    """A file could not be written (read-only folder, disk full, quota): nothing partial is left behind."""
