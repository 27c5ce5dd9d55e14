"""XGBoost backend: RabitTracker on the driver, CommunicatorContext on each worker,
a QuantileDMatrix streamed from the shard's Arrow batches, the unchanged ``xgb.train``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from neve._internal import settings
from neve._internal.context import WorkerContext
from neve._internal.data.sources import Source
from neve._internal.data.spill import run_folder
from neve._internal.gbdt.features import (
    MAX_BATCH_ROWS,
    Arrays,
    FeatureSpec,
    empty_arrays,
    iter_arrays,
)
from neve._internal.gbdt.runner import (
    Backend,
    CheckpointClock,
    TrainResult,
    TrainTask,
    plain_floats,
)
from neve._internal.runtime import group
from neve._internal.runtime.worker import hold_port, quiet_native_output, release_port, report
from neve._internal.warn import warn_user
from neve.exceptions import MemoryWarning, ResourcesUnavailableError

logger = logging.getLogger(__name__)

try:
    import xgboost as xgb
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("neve.xgboost needs xgboost: pip install 'neve[xgboost]'") from exc


#: rows per page of an external-memory matrix (xgboost keeps one page per batch)
EXTERNAL_BATCH_ROWS = 262_144


class ArrowBatches(xgb.DataIter):
    """Feeds a source's Arrow batches to xgboost, one batch at a time (no pandas).

    With a ``cache_prefix`` xgboost writes each batch's binned page to disk there
    (external memory). A shard with no rows gives one empty batch: xgboost needs
    one, and a worker with nothing to add still takes part in every collective.
    """

    def __init__(self, source: Source, spec: FeatureSpec, what: str,
                 cache_prefix: str | None = None) -> None:
        super().__init__(cache_prefix=cache_prefix, release_data=True)
        self._source = source
        self._spec = spec
        self._what = what
        self._max_rows = EXTERNAL_BATCH_ROWS if cache_prefix else MAX_BATCH_ROWS
        self._batches: Iterator[Any] | None = None
        self.rows = 0

    def reset(self) -> None:
        self._batches = None

    def _parts(self) -> Iterator[Arrays]:
        empty = True
        for part in iter_arrays(self._source, self._spec, self._what, self._max_rows):
            empty = False
            yield part
        if empty:
            yield empty_arrays(self._spec)

    def next(self, input_data: Callable[..., None]) -> bool:
        if self._batches is None:
            self._batches = self._parts()
            self.rows = 0
        part = next(self._batches, None)
        if part is None:
            return False
        self.rows += len(part.label)
        kwargs: dict[str, Any] = {
            "data": part.features,
            "label": part.label,
            "feature_names": list(self._spec.input_cols),
            "feature_types": self._spec.feature_types,
        }
        if part.weight is not None:
            kwargs["weight"] = part.weight
        if part.group is not None:
            kwargs["qid"] = part.group
        input_data(**kwargs)
        return True


def quantile_matrix(source: Source, spec: FeatureSpec, what: str, params: dict[str, Any],
                    threads: int, ref: Any = None, cache_prefix: str | None = None) -> Any:
    """A QuantileDMatrix over a source, with the training parameters' ``max_bin``;
    an ExtMemQuantileDMatrix, its binned pages on local disk, with a ``cache_prefix``."""
    matrix = xgb.ExtMemQuantileDMatrix if cache_prefix else xgb.QuantileDMatrix
    return matrix(
        ArrowBatches(source, spec, what, cache_prefix),
        max_bin=int(params.get("max_bin", 256)),
        ref=ref,
        enable_categorical=bool(spec.categories),
        nthread=threads,
    )


class _Report(xgb.callback.TrainingCallback):
    """Sends each round's latest metrics (and checkpoints) to the driver (rank 0 only)."""

    def __init__(self, task: TrainTask) -> None:
        super().__init__()
        self.offset = task.round_offset
        self.clock = CheckpointClock(task)

    def after_iteration(self, model: Any, epoch: int, evals_log: dict[str, Any]) -> bool:
        metrics = {data: {name: float(values[-1]) for name, values in log.items()}
                   for data, log in evals_log.items()}
        event: dict[str, Any] = {"iteration": self.offset + epoch, "metrics": metrics}
        if self.clock.due(epoch):
            event["checkpoint"] = bytes(model.save_raw("ubj"))
        report(event)
        return False


#: bytes an in-memory QuantileDMatrix and training take per row: the bin index and its
#: column-major copy (1 byte per feature each), row pointers, label, gradients and
#: predictions (measured: 118 B/row for 28 features)
def in_memory_bytes(rows: int, features: int) -> int:
    return rows * (2 * features + 64)


#: automatic external memory when the in-memory matrix would take more than this
#: share of a worker's memory (what Ray gives tasks on its node, split among its workers)
EXTERNAL_MEMORY_SHARE = 0.5


#: what xgboost keeps in memory per row even with external memory: gradients (8 B),
#: prediction cache (4), label (4), row indices (8) and its partition buffers (16), plus
#: allocator slack (measured: 50 B/row of anonymous memory in a neve worker and 45-47 in
#: xgboost alone; 4 B/row more where the training set is evaluated)
EXTERNAL_MEMORY_ROW_BYTES = 50


def external_memory_bytes(rows: int, features: int) -> int:
    """Local disk xgboost's external-memory pages take: the bin index and its
    column-major copy (1 byte per feature each) and row pointers (measured: 64 B/row
    for 28 features)."""
    return rows * (2 * features + 8)


def _check_disk(folder: str, rows: int, features: int) -> None:
    """Fail before writing pages that would fill the disk (xgboost aborts the process
    when a write fails, and a full disk stops every other program on the machine)."""
    import shutil

    need = external_memory_bytes(rows, features)
    free = shutil.disk_usage(folder).free
    if need > 0.9 * free:
        raise ResourcesUnavailableError(
            f"external memory needs about {need / 2**30:.1f} GiB of local disk for xgboost's "
            f"pages of {rows:,} rows under {folder}, and {free / 2**30:.1f} GiB is free: free "
            "disk space, point TMPDIR at a larger disk, spread the rows over more workers, "
            "or pass external_memory=False if the shard fits in memory"
        )


class XGBoostBackend(Backend):
    name = "xgboost"
    has_external_memory = True

    def external_memory(self, asked: bool | None, rows_per_worker: int, features: int,
                        budget_bytes: float) -> bool:
        chosen = self._external_memory(asked, rows_per_worker, features, budget_bytes)
        need = rows_per_worker * (EXTERNAL_MEMORY_ROW_BYTES if chosen
                                  else in_memory_bytes(1, features))
        if budget_bytes > 0 and need > budget_bytes:
            warn_user(
                f"each xgboost worker will hold about {need / 2**30:.1f} GiB in memory for "
                f"its {rows_per_worker:,} rows"
                + (" (label, gradients, predictions and row partitions stay in memory even "
                   "with external memory)" if chosen else "")
                + f", more than its {budget_bytes / 2**30:.1f} GiB share of its node's "
                "memory, so it may be killed for memory: spread the rows over more workers "
                "on more nodes" + ("" if chosen else ", or pass external_memory=True"),
                MemoryWarning)
        return chosen

    def _external_memory(self, asked: bool | None, rows_per_worker: int, features: int,
                         budget_bytes: float) -> bool:
        if asked is not None:
            return bool(asked)
        need = in_memory_bytes(rows_per_worker, features)
        if budget_bytes <= 0 or need <= EXTERNAL_MEMORY_SHARE * budget_bytes:
            return False
        logger.info(
            "xgboost: external memory (a worker's in-memory matrix would take ~%.1f GiB, more "
            "than %.0f%% of its %.1f GiB share of its node): binned pages go to local disk; "
            "fit(..., external_memory=False) keeps them in memory",
            need / 2**30, 100 * EXTERNAL_MEMORY_SHARE, budget_bytes / 2**30)
        return True

    def start_collective(
        self, workers: group.WorkerGroup
    ) -> tuple[dict[str, Any], Callable[[], None]]:
        if workers.num_workers == 1:  # xgboost alone: no tracker, no communicator
            return {}, lambda: None
        import ray
        from xgboost.tracker import RabitTracker

        host = ray.util.get_node_ip_address()
        timeout = int(settings.WORKER_START_TIMEOUT_S.get())
        # The port is picked here rather than read back with tracker.worker_args(), which
        # polls for the tracker's thread every 100 ms: 0.1 s of every fit. The tracker
        # listens from its constructor on, so workers that connect early wait in its
        # backlog; a port taken in between fails the constructor, and another is tried.
        for attempt in range(3):
            port = hold_port(host)
            release_port(port)
            try:
                tracker = RabitTracker(n_workers=workers.num_workers, host_ip=host, port=port,
                                       sortby="task", timeout=timeout)
                break
            except xgb.core.XGBoostError:
                if attempt == 2:
                    raise
        tracker.start()
        args = {"dmlc_tracker_uri": host, "dmlc_tracker_port": port,
                "dmlc_timeout": int(settings.COLLECTIVE_TIMEOUT_S.get())}

        def close() -> None:
            with contextlib.suppress(Exception):  # the tracker may already be done
                tracker.free()

        return args, close

    def gpu_unsupported(self) -> str | None:
        if xgb.build_info().get("USE_CUDA"):
            return None
        return ("this xgboost is built without CUDA (the xgboost-cpu package): "
                "pip install xgboost for GPU training")

    def train(self, task: TrainTask, ctx: WorkerContext) -> TrainResult | None:
        params = dict(task.params)
        params.setdefault("nthread", task.threads)
        if task.use_gpu:
            params.setdefault("device", "cuda")
        communicator: Any = contextlib.nullcontext()
        if task.collective:
            args = dict(task.collective, dmlc_task_id=str(ctx.rank))
            communicator = xgb.collective.CommunicatorContext(**args)
        with quiet_native_output():  # its "Task N got rank N" banner
            communicator.__enter__()
        # No try/finally: a worker that fails leaves its communicator open. Finalizing it
        # would fail the peers' pending collectives, and their errors could reach the
        # driver before this one, the cause. The driver stops every worker of a failed run.
        train_source = task.train_source(ctx)
        cache = None
        if task.external_memory:
            cache = run_folder("xgboost").path
            _check_disk(cache, train_source.num_rows, len(task.spec.input_cols))
        dtrain = quantile_matrix(train_source, task.spec, train_source.description, params,
                                 task.threads, cache_prefix=cache and f"{cache}/train")
        evals = [(dtrain, "train")] if task.eval_train else []
        eval_source = task.eval_source(ctx)
        if eval_source is not None:
            deval = quantile_matrix(eval_source, task.spec, eval_source.description, params,
                                    task.threads, ref=dtrain,
                                    cache_prefix=cache and f"{cache}/eval")
            evals.append((deval, "eval"))
        evals_result: dict[str, Any] = {}
        callbacks = list(task.callbacks)
        if ctx.rank == 0:
            callbacks.append(_Report(task))
        init = xgb.Booster(model_file=bytearray(task.init_model)) if task.init_model else None
        booster = xgb.train(
            params,
            dtrain,
            num_boost_round=task.num_boost_round,
            evals=evals,
            evals_result=evals_result,
            early_stopping_rounds=task.early_stopping_rounds,
            verbose_eval=False,
            callbacks=callbacks,
            xgb_model=init,
        )
        communicator.__exit__(None, None, None)
        if ctx.rank != 0:
            return None
        best = getattr(booster, "best_iteration", None) if task.early_stopping_rounds else None
        return TrainResult(bytes(booster.save_raw("ubj")), plain_floats(evals_result), best)


def load_booster(raw: bytes) -> Any:
    return xgb.Booster(model_file=bytearray(raw))
