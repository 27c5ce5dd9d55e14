"""XGBoost backend: RabitTracker on the driver, CommunicatorContext on each worker,
a QuantileDMatrix streamed from the shard's Arrow batches, the unchanged ``xgb.train``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from neve._internal import settings
from neve._internal.context import WorkerContext
from neve._internal.data.sources import Source
from neve._internal.gbdt.features import FeatureSpec, iter_arrays
from neve._internal.gbdt.runner import Backend, TrainResult, TrainTask, plain_floats
from neve._internal.runtime import group
from neve._internal.runtime.worker import quiet_native_output, report

try:
    import xgboost as xgb
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("neve.xgboost needs xgboost: pip install 'neve[xgboost]'") from exc


class ArrowBatches(xgb.DataIter):
    """Feeds a source's Arrow batches to xgboost, one batch at a time (no pandas)."""

    def __init__(self, source: Source, spec: FeatureSpec, what: str) -> None:
        super().__init__(release_data=True)
        self._source = source
        self._spec = spec
        self._what = what
        self._batches: Iterator[Any] | None = None
        self.rows = 0

    def reset(self) -> None:
        self._batches = None

    def next(self, input_data: Callable[..., None]) -> bool:
        if self._batches is None:
            self._batches = iter_arrays(self._source, self._spec, self._what)
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
                    threads: int, ref: Any = None) -> Any:
    """A QuantileDMatrix over a source, with the training parameters' ``max_bin``."""
    return xgb.QuantileDMatrix(
        ArrowBatches(source, spec, what),
        max_bin=int(params.get("max_bin", 256)),
        ref=ref,
        enable_categorical=bool(spec.categories),
        nthread=threads,
    )


class _Report(xgb.callback.TrainingCallback):
    """Sends each round's latest metrics (and checkpoints) to the driver (rank 0 only)."""

    def __init__(self, offset: int, checkpoint_every: int) -> None:
        super().__init__()
        self.offset = offset
        self.checkpoint_every = checkpoint_every

    def after_iteration(self, model: Any, epoch: int, evals_log: dict[str, Any]) -> bool:
        metrics = {data: {name: float(values[-1]) for name, values in log.items()}
                   for data, log in evals_log.items()}
        event: dict[str, Any] = {"iteration": self.offset + epoch, "metrics": metrics}
        if self.checkpoint_every and (epoch + 1) % self.checkpoint_every == 0:
            event["checkpoint"] = bytes(model.save_raw("ubj"))
        report(event)
        return False


class XGBoostBackend(Backend):
    name = "xgboost"

    def start_collective(
        self, workers: group.WorkerGroup
    ) -> tuple[dict[str, Any], Callable[[], None]]:
        import ray
        from xgboost.tracker import RabitTracker

        host = ray.util.get_node_ip_address()
        timeout = int(settings.WORKER_START_TIMEOUT_S.get())
        tracker = RabitTracker(n_workers=workers.num_workers, host_ip=host, sortby="task",
                               timeout=timeout)
        tracker.start()
        args = dict(tracker.worker_args())
        args["dmlc_timeout"] = int(settings.COLLECTIVE_TIMEOUT_S.get())

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
        args = dict(task.collective, dmlc_task_id=str(ctx.rank))
        communicator = xgb.collective.CommunicatorContext(**args)
        with quiet_native_output():  # its "Task N got rank N" banner
            communicator.__enter__()
        # No try/finally: a worker that fails leaves its communicator open. Finalizing it
        # would fail the peers' pending collectives, and their errors could reach the
        # driver before this one, the cause. The driver stops every worker of a failed run.
        train_source = task.train_source(ctx)
        dtrain = quantile_matrix(train_source, task.spec, train_source.description, params,
                                 task.threads)
        evals = [(dtrain, "train")]
        eval_source = task.eval_source(ctx)
        if eval_source is not None:
            deval = quantile_matrix(eval_source, task.spec, eval_source.description, params,
                                    task.threads, ref=dtrain)
            evals.append((deval, "eval"))
        evals_result: dict[str, Any] = {}
        callbacks = list(task.callbacks)
        if ctx.rank == 0:
            callbacks.append(_Report(task.round_offset, task.checkpoint_every))
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
