"""Suggestions for misspelled names ("did you mean ...?"): one helper for every message."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def close_match(word: str, choices: Iterable[str]) -> str | None:
    """The choice closest to ``word``: the same name in another case first, then difflib's."""
    if not isinstance(word, str):
        return None
    names = [c for c in choices if isinstance(c, str)]
    folded = {n.lower(): n for n in reversed(names)}
    if word.lower() in folded and folded[word.lower()] != word:
        return folded[word.lower()]
    found = difflib.get_close_matches(word.lower(), list(folded), n=1, cutoff=0.6)
    return folded[found[0]] if found else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"did you mean 'x'?"`` for the closest choice, or ``""`` when none is close."""
    match = close_match(word, choices)
    return f"did you mean {match!r}?" if match is not None else ""
