"""``get_context()``: who this worker is, what it was given, where its model goes."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from neve._internal import context as _context
from neve._internal.runtime.worker import report


class MetricsReporter:
    """``log_metrics(dict)`` inside ``train_func``; rank 0's reach ``result.get_metrics()``."""

    def __init__(self, rank: int) -> None:
        self._rank = rank
        self._lock = threading.Lock()
        self.history: list[dict[str, Any]] = []

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Record a dict of metrics (numbers, or anything that pickles)."""
        if not isinstance(metrics, Mapping):
            raise TypeError(f"log_metrics takes a dict, got {type(metrics).__name__}")
        entry = {k: (v.item() if hasattr(v, "item") and callable(v.item) else v)
                 for k, v in metrics.items()}
        with self._lock:
            self.history.append(entry)
        if self._rank == 0:
            report({"metrics": entry})


class Context:
    """The per-worker API of Snowflake's distributor context.

    Example:
        >>> def train_func():
        ...     ctx = get_context()
        ...     if ctx.get_rank() == 0:
        ...         print("world size", ctx.get_world_size())
    """

    def __init__(self, worker: _context.WorkerContext) -> None:
        self._worker = worker

    def get_world_size(self) -> int:
        return self._worker.world_size

    def get_rank(self) -> int:
        return self._worker.rank

    get_world_rank = get_rank

    def get_local_rank(self) -> int:
        return self._worker.local_rank

    def get_local_world_size(self) -> int:
        return self._worker.local_world_size

    def get_node_rank(self) -> int:
        return self._worker.node_rank

    def get_master_addr(self) -> str:
        return self._worker.master_addr

    def get_master_port(self) -> int:
        return self._worker.master_port

    def get_default_backend(self) -> str:
        return self._worker.default_backend

    def get_hyper_params(self) -> dict[str, Any]:
        return dict(self._worker.hyper_params)

    def get_dataset_map(self) -> dict[str, Any]:
        return dict(self._worker.dataset_map)

    def get_model_dir(self) -> str:
        return self._worker.model_dir

    def get_metrics_reporter(self) -> MetricsReporter:
        reporter = self._worker.extras.get("metrics_reporter")
        assert isinstance(reporter, MetricsReporter)
        return reporter

    def is_main_process(self) -> bool:
        """Whether this is rank 0 (the worker whose model directory is published)."""
        return self._worker.rank == 0

    def __repr__(self) -> str:
        return f"Context(rank={self.get_rank()}, world_size={self.get_world_size()})"


def get_context() -> Context:
    """The context of the worker running this ``train_func`` (only inside a run)."""
    return Context(_context.require("neve.pytorch.get_context()"))
