"""LightGBM backend: network parameters (``machines``, ``local_listen_port``,
``num_machines``, a short ``time_out``), a Dataset streamed from the shard's Arrow
pieces (a ``lightgbm.Sequence``: no whole float32 copy of the shard),
every worker evaluating the whole eval set (LightGBM does not combine metrics, so
a split eval set makes early stopping disagree and hang: microsoft/LightGBM#6351)."""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from neve._internal import settings
from neve._internal.context import WorkerContext
from neve._internal.data.resolve import PlanSource
from neve._internal.gbdt.features import FeatureSpec, feature_matrix, group_sizes, targets
from neve._internal.gbdt.runner import (
    Backend,
    CheckpointClock,
    TrainResult,
    TrainTask,
    plain_floats,
)
from neve._internal.runtime import group
from neve._internal.runtime.worker import quiet_native_output, release_port, report

try:
    import lightgbm as lgb
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("neve.lightgbm needs lightgbm: pip install 'neve[lightgbm]'") from exc


class ArrowRows(lgb.Sequence):
    """A shard's features as a LightGBM ``Sequence``: read batch by batch, never whole.

    LightGBM samples rows by sorted index to find its bins, then pushes the rows
    in ranges, in order: both walks go forward through the shard, so one Arrow
    batch's float32 matrix is kept at a time (a backward jump starts over).
    """

    batch_size = 65_536

    def __init__(self, source: PlanSource, spec: FeatureSpec) -> None:
        self._source = source
        self._spec = spec
        self._rows = source.num_rows
        self._batches: Iterator[pa.RecordBatch] | None = None
        self._next_start = 0  # first row of the batch the iterator yields next
        self._start = 0  # first row of the cached matrix
        self._matrix = np.empty((0, len(spec.input_cols)), np.float32)

    def __len__(self) -> int:
        return self._rows

    def _holding(self, row: int) -> np.ndarray:
        """The cached matrix, moved forward until it holds ``row``."""
        if row < self._start or self._batches is None:
            self._batches = self._source.stream(list(self._spec.input_cols))
            self._next_start = 0
            self._start, self._matrix = 0, self._matrix[:0]
        while not self._start <= row < self._start + len(self._matrix):
            batch = next(self._batches)
            self._start, self._next_start = self._next_start, self._next_start + batch.num_rows
            self._matrix = feature_matrix(batch, self._spec)
        return self._matrix

    def __getitem__(self, idx: int | slice | list[int]) -> np.ndarray:
        if isinstance(idx, slice):
            start, stop, _ = idx.indices(len(self))
            out = []
            while start < stop:
                matrix = self._holding(start)
                end = min(stop, self._start + len(matrix))
                out.append(matrix[start - self._start:end - self._start])
                start = end
            width = len(self._spec.input_cols)
            return np.concatenate(out) if out else np.empty((0, width), np.float32)
        if isinstance(idx, list):
            return np.stack([self[i] for i in idx])
        row = int(idx)  # a sampled row: LightGBM wants float64 samples
        return self._holding(row)[row - self._start].astype(np.float64)


def dataset(source: PlanSource, spec: FeatureSpec, params: dict[str, Any],
            reference: Any = None, *, init_model: Any = None) -> Any:
    """A LightGBM Dataset streamed from a shard (features) plus one pass for the targets.

    To continue from ``init_model``, its raw predictions become the Dataset's
    ``init_score``, computed batch by batch: ``lgb.train(init_model=...)`` would
    predict on the raw rows, which needs a whole float32 copy of the shard.
    """
    arrays = targets(source, spec, source.description, source.num_rows)
    rows = ArrowRows(source, spec)
    return lgb.Dataset(
        [rows],
        init_score=raw_scores(init_model, rows) if init_model is not None else None,
        label=arrays.label,
        weight=arrays.weight,
        group=group_sizes(arrays.group) if arrays.group is not None else None,
        reference=reference,
        feature_name=list(spec.input_cols),
        categorical_feature=spec.categorical_indices or "auto",
        params=params,
        free_raw_data=True,
    )


def raw_scores(model: Any, rows: ArrowRows) -> np.ndarray:
    """``model``'s raw predictions (every tree) for every row, one batch at a time."""
    parts = [model.predict(rows[start:start + rows.batch_size], raw_score=True,
                           num_iteration=-1)
             for start in range(0, len(rows), rows.batch_size)]
    if not parts:
        return np.empty(0, dtype=np.float64)
    return np.concatenate(parts)


def merged(booster: Any, init: Any) -> Any:
    """``booster`` with ``init``'s trees in front (what ``lgb.train`` does for an
    ``init_model``: LightGBM's own ``LGBM_BoosterMerge``)."""
    if init is not None:
        lgb.basic._safe_call(lgb.basic._LIB.LGBM_BoosterMerge(booster._handle, init._handle))
    return booster


class _Log:
    """LightGBM's native log, minus its network chatter (routed by register_logger)."""

    def info(self, message: str) -> None:
        pass

    def warning(self, message: str) -> None:
        if "Connecting to rank" not in message:
            print(f"[LightGBM] {message.strip()}", file=sys.stderr)


def _reporter(task: TrainTask, init: Any) -> Callable[[Any], None]:
    """Sends each round's metrics (and checkpoints) to the driver (rank 0 only)."""
    offset, clock = task.round_offset, CheckpointClock(task)

    def callback(env: Any) -> None:
        metrics: dict[str, dict[str, float]] = {}
        for data, name, value, *_ in env.evaluation_result_list or []:
            metrics.setdefault(data, {})[name] = float(value)
        event: dict[str, Any] = {"iteration": offset + env.iteration, "metrics": metrics}
        if clock.due(env.iteration):
            current = lgb.Booster(model_str=env.model.model_to_string(num_iteration=-1))
            event["checkpoint"] = merged(current, init).model_to_string(num_iteration=-1)
        report(event)

    return callback


def _join_network(collective: Mapping[str, Any], rank: int, world_size: int) -> None:
    """LightGBM's own network init (as ``Booster.set_network`` does), minus its banners."""
    import ctypes

    release_port(collective["ports"][rank])
    with quiet_native_output():
        lgb.basic._safe_call(
            lgb.basic._LIB.LGBM_NetworkInit(
                lgb.basic._c_str(collective["machines"]),
                ctypes.c_int(collective["ports"][rank]),
                ctypes.c_int(collective["time_out"]),
                ctypes.c_int(world_size),
            )
        )


@functools.cache
def _cuda_missing() -> str | None:
    """Why this LightGBM cannot train with ``device_type="cuda"`` (``None``: it can).

    LightGBM has no build flags to ask, so a Booster on ten rows tries the CUDA
    tree learner; PyPI's wheels answer at once that it is not in the build.
    """
    rows = lgb.Dataset(np.arange(20.0).reshape(10, 2), label=np.arange(10.0),
                       params={"verbosity": -1})
    try:
        with quiet_native_output():
            lgb.Booster(params={"device_type": "cuda", "verbosity": -1}, train_set=rows)
    except lgb.basic.LightGBMError as exc:
        if "not enabled in this build" in str(exc):
            return ("this lightgbm is built without CUDA (PyPI's wheels are): build it with "
                    "-DUSE_CUDA=1 for GPU training")
    return None


#: the share of a worker's memory LightGBM's row-wise copy of the bins may take (20M rows
#: x 28 features on 2 workers of a 23.5 GiB node: 280 MB a worker, over it: col-wise)
ROW_WISE_SHARE = 0.02


class LightGBMBackend(Backend):
    name = "lightgbm"
    eval_whole_on_every_worker = True

    def start_collective(
        self, workers: group.WorkerGroup
    ) -> tuple[dict[str, Any], Callable[[], None]]:
        if workers.num_workers == 1:
            return {}, lambda: None
        # Each worker holds its port bound until LightGBM binds it (see _join_network).
        ports = [workers.call(rank, "hold_port") for rank in range(workers.num_workers)]
        machines = ",".join(
            f"{w.node_ip}:{port}" for w, port in zip(workers.workers, ports, strict=True)
        )
        minutes = max(1, math.ceil(settings.COLLECTIVE_TIMEOUT_S.get() / 60))
        return {"machines": machines, "ports": ports, "time_out": minutes}, lambda: None

    def retryable(self, error: BaseException) -> bool:
        text = str(error).lower()
        return "bind" in text and "port" in text

    def gpu_unsupported(self) -> str | None:
        return _cuda_missing()

    def sized_params(self, params: dict[str, Any], rows_per_worker: int, features: int,
                     budget_bytes: float) -> dict[str, Any]:
        """Row-wise histograms for a small shard, col-wise for a large one (unless told).

        Row-wise, LightGBM keeps a row-major copy of the bins, a byte or two per feature
        per row (+24 % of the float32 bytes of 28 features), and trains narrow dense data
        faster: 9.1 s against 10.3 s for 1M rows x 28 features on 2 one-CPU workers.
        Left to choose, LightGBM times both on the first iteration and took col-wise
        there, and building both costs the copy anyway. Where the copy would pass
        ``ROW_WISE_SHARE`` of a worker's memory, col-wise."""
        if params.get("force_row_wise") or params.get("force_col_wise"):
            return params
        copy = rows_per_worker * features * (1 if int(params.get("max_bin", 255)) <= 255 else 2)
        if budget_bytes > 0 and copy <= ROW_WISE_SHARE * budget_bytes:
            return {**params, "force_row_wise": True}
        return {**params, "force_col_wise": True}

    def train(self, task: TrainTask, ctx: WorkerContext) -> TrainResult | None:
        lgb.register_logger(_Log())
        params = dict(task.params)
        params.setdefault("num_threads", task.threads)
        params.setdefault("verbosity", -1)
        if task.use_gpu:
            params.setdefault("device_type", "cuda")
        if task.collective:
            params.update(
                tree_learner=params.get("tree_learner", "data"),
                num_machines=ctx.world_size,
                time_out=task.collective["time_out"],
                pre_partition=True,
            )
            _join_network(task.collective, ctx.rank, ctx.world_size)
        train_source = task.train_source(ctx)
        init = lgb.Booster(model_str=task.init_model) if task.init_model else None
        dtrain = dataset(train_source, task.spec, params, init_model=init)
        valid_sets, valid_names = ([dtrain], ["train"]) if task.eval_train else ([], [])
        eval_source = task.eval_source(ctx)
        if eval_source is not None:
            valid_sets.append(dataset(eval_source, task.spec, params, reference=dtrain,
                                      init_model=init))
            valid_names.append("eval")
        evals_result: dict[str, Any] = {}
        callbacks = [*task.callbacks, lgb.record_evaluation(evals_result)]
        if task.early_stopping_rounds:
            callbacks.append(lgb.early_stopping(task.early_stopping_rounds, verbose=False))
        if ctx.rank == 0:
            callbacks.append(_reporter(task, init))
        booster = lgb.train(
            params,
            dtrain,
            num_boost_round=task.num_boost_round,
            valid_sets=valid_sets,
            valid_names=valid_names,
            callbacks=callbacks,
        )
        if task.collective:
            lgb.basic._safe_call(lgb.basic._LIB.LGBM_NetworkFree())
        if ctx.rank != 0:
            return None
        before = init.current_iteration() if init is not None else 0
        best = None
        if task.early_stopping_rounds and booster.best_iteration > 0:
            best = before + booster.best_iteration
        model = merged(booster, init).model_to_string(num_iteration=best or -1)
        return TrainResult(model, plain_floats(evals_result), best)


def load_booster(model: str) -> Any:
    return lgb.Booster(model_str=model)
