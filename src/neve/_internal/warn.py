"""Warnings that point at the user's line: the first frame outside neve."""

from __future__ import annotations

import sys
import warnings


def warn_user(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the caller's code, not to neve's internals."""
    frame = sys._getframe(1)
    level = 2  # the caller of this function
    while frame.f_back is not None and _is_neve(frame.f_globals.get("__name__", "")):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def _is_neve(module: str) -> bool:
    return module == "neve" or module.startswith("neve.")
