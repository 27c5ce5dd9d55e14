"""``get_context()``: who this worker is, what it was given, where its model goes."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from neve._internal import context as _context
from neve._internal import settings
from neve._internal.runtime.worker import report, report_and_wait
from neve.exceptions import StageError


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


class Checkpointer:
    """A worker's checkpoint folder; rank 0 commits it through the driver."""

    def __init__(self, rank: int, folder: str, seq: int) -> None:
        self.rank = rank
        self.folder = folder
        self.seq = seq

    def save(self) -> None:
        if self.rank != 0:
            return
        self.seq += 1
        timeout = settings.CHECKPOINT_TIMEOUT_S.get()
        event = {"checkpoint": {"dir": self.folder, "seq": self.seq}}
        if not report_and_wait(event, f"checkpoint-{self.seq}", timeout):
            raise StageError(
                f"the driver did not commit checkpoint {self.seq} within {timeout:g} s "
                f"(NEVE_CHECKPOINT_TIMEOUT_S={timeout:g}); likely causes: a slow or "
                "unreachable stage, or a very large checkpoint folder"
            )


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

    def get_checkpoint_dir(self) -> str:
        """A local folder: the run's latest checkpoint when this attempt started (empty
        on the first); write the next one here and call :meth:`save_checkpoint`."""
        return self._checkpointer().folder

    def save_checkpoint(self) -> None:
        """On rank 0: commit the checkpoint folder's files as the run's latest,
        atomically, to ``<stage>/checkpoints/<request_id>/`` (returns once committed).
        On other ranks: nothing."""
        self._checkpointer().save()

    def _checkpointer(self) -> Checkpointer:
        checkpointer = self._worker.extras.get("checkpointer")
        assert isinstance(checkpointer, Checkpointer)
        return checkpointer

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
