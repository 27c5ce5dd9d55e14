"""Progress on the driver: one live bar when someone is watching, nothing otherwise.

Workers queue events (``runtime.worker.report``); the driver polls rank 0 and
feeds them here. A bar shows when stderr is a terminal or a notebook runs us
(tqdm.auto picks the widget), and never in a log file or CI.
``NEVE_PROGRESS=0`` turns it off, ``=1`` forces it on.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import Any


def interactive() -> bool:
    """Whether a live progress bar should be shown."""
    forced = os.environ.get("NEVE_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def format_metrics(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """``train-rmse:0.12345\\teval-rmse:0.23456``, as xgboost prints them."""
    return "\t".join(
        f"{data}-{name}:{value:.5f}"
        for data, values in metrics.items()
        for name, value in values.items()
    )


class Progress:
    """A bar over ``total`` steps (rounds or epochs) plus optional eval lines."""

    def __init__(self, total: int | None, desc: str, *, verbose_every: int | None = None,
                 unit: str = "round") -> None:
        self.total = total
        self.verbose_every = verbose_every
        self._bar: Any = None
        self._done = 0
        self._last_line = -1
        self._start = time.monotonic()
        if interactive():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def step(self, index: int, metrics: Mapping[str, Mapping[str, float]] | None = None,
             extra: Mapping[str, Any] | None = None) -> None:
        """Step ``index`` (0-based) finished, with its metrics."""
        if self._bar is not None:
            self._bar.update(index + 1 - self._done)
            postfix = {
                f"{d}-{n}": f"{v:.4g}"
                for d, vals in (metrics or {}).items()
                for n, v in vals.items()
            }
            postfix.update({k: str(v) for k, v in (extra or {}).items()})
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
        self._done = index + 1
        every = self.verbose_every
        if every and metrics and (index % every == 0 or (self.total and index == self.total - 1)):
            self._print(f"[{index}]\t{format_metrics(metrics)}")
            self._last_line = index

    def finish(self, index: int | None, metrics: Mapping[str, Mapping[str, float]] | None) -> None:
        """The run ended at step ``index``; print its last eval line if not printed yet."""
        if self.verbose_every and metrics and index is not None and index != self._last_line:
            self._print(f"[{index}]\t{format_metrics(metrics)}")
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._start
