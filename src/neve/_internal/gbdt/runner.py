"""One runner for the distributed GBDT estimators.

XGBoost and LightGBM differ only in a :class:`Backend`: how the driver sets up
the collective, how a worker builds its matrix, joins the collective and trains,
and how the model comes back. Placement, data planning, progress and failure
handling live here, once.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from neve._internal.context import WorkerContext
from neve._internal.data.fragments import Plan
from neve._internal.data.resolve import PlanSource
from neve._internal.gbdt.config import GBDTScalingConfig
from neve._internal.gbdt.features import FeatureSpec, build_spec, with_categories
from neve._internal.progress import Progress
from neve._internal.runtime import cluster, group
from neve._internal.runtime.placement import Layout
from neve.exceptions import ConfigError, EmptyDatasetError, WorkerError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainTask:
    """Everything a worker needs for one fit (frozen, shipped once to every worker)."""

    params: Mapping[str, Any]
    num_boost_round: int
    spec: FeatureSpec
    train: Plan
    eval: Plan | None
    eval_whole_on_every_worker: bool
    early_stopping_rounds: int | None
    callbacks: Sequence[Any]
    threads: int
    use_gpu: bool
    collective: Mapping[str, Any] = field(default_factory=dict)
    init_model: Any = None

    def train_source(self, ctx: WorkerContext) -> PlanSource:
        return PlanSource(self.train.shard(ctx.rank, ctx.world_size), self.train.schema,
                          f"training shard {ctx.rank} of {ctx.world_size}")

    def eval_source(self, ctx: WorkerContext) -> PlanSource | None:
        if self.eval is None:
            return None
        if self.eval_whole_on_every_worker:
            return PlanSource.whole(self.eval, "the eval set")
        return PlanSource(self.eval.shard(ctx.rank, ctx.world_size), self.eval.schema,
                          f"eval shard {ctx.rank} of {ctx.world_size}")


@dataclass
class TrainResult:
    """What rank 0 sends back."""

    model: Any
    evals_result: dict[str, dict[str, list[float]]]
    best_iteration: int | None = None
    spec: FeatureSpec | None = None


def plain_floats(evals: Mapping[str, Mapping[str, Sequence[Any]]]) -> dict[str, dict[str, list[float]]]:
    """An evaluation history with plain Python floats."""
    return {d: {m: [float(v) for v in values] for m, values in log.items()}
            for d, log in evals.items()}


class Backend(ABC):
    """The framework-specific part of a distributed fit."""

    name: str
    #: whether every worker must see the whole eval set (LightGBM does not combine metrics)
    eval_whole_on_every_worker: bool = False

    @abstractmethod
    def start_collective(self, workers: group.WorkerGroup) -> tuple[dict[str, Any], Callable[[], None]]:
        """Set up the collective; return what workers need and a closer."""

    @abstractmethod
    def train(self, task: TrainTask, ctx: WorkerContext) -> TrainResult | None:
        """Run on each worker: build the matrix, join the collective, train."""

    def retryable(self, error: BaseException) -> bool:
        """Whether a failed attempt may be retried as a whole (e.g. a port race)."""
        return False


def _as_connector(data: Any, what: str) -> Any:
    from neve.data import DataConnector

    if isinstance(data, DataConnector):
        return data
    try:
        return DataConnector.from_dataframe(data)
    except ConfigError as exc:
        raise ConfigError(f"{what} must be a DataConnector or a data frame: {exc}") from None


def _worker_entry(backend: Backend, task: TrainTask) -> Callable[[WorkerContext], Any]:
    def run(ctx: WorkerContext) -> Any:
        return backend.train(task, ctx)

    return run


def fit(
    backend: Backend,
    *,
    params: Mapping[str, Any],
    num_boost_round: int,
    scaling: GBDTScalingConfig,
    dataset: Any,
    input_cols: Sequence[str] | str,
    label_col: str,
    eval_set: Any = None,
    weight_col: str | None = None,
    group_col: str | None = None,
    early_stopping_rounds: int | None = None,
    verbose_eval: int | bool | None = None,
    callbacks: Sequence[Any] | None = None,
    init_model: Any = None,
) -> TrainResult:
    """Fit on the cluster; return rank 0's model and evaluation history."""
    if early_stopping_rounds is not None and eval_set is None:
        raise ConfigError("early_stopping_rounds needs an eval_set to watch; pass eval_set=...")
    if isinstance(verbose_eval, bool):
        verbose_every = 1 if verbose_eval else None
    elif verbose_eval is None:
        verbose_every = None
    elif isinstance(verbose_eval, int) and verbose_eval >= 1:
        verbose_every = verbose_eval
    else:
        raise ConfigError(f"verbose_eval must be None, a bool or an int >= 1, got {verbose_eval!r}")

    train = _as_connector(dataset, "dataset")
    spec = build_spec(train.schema, input_cols, label_col, weight_col, group_col,
                      train._source.description)
    spec = with_categories(spec, train._source)
    evaluation = _as_connector(eval_set, "eval_set") if eval_set is not None else None
    if evaluation is not None:
        build_spec(evaluation.schema, spec.input_cols, label_col, weight_col, group_col,
                   f"eval set ({evaluation._source.description})")

    cluster.ensure_ray()
    layout = scaling.resolve(cluster.view())
    train_plan = train._plan_for_workers(spec.columns)
    if train_plan.num_rows == 0:
        raise EmptyDatasetError(
            f"the training data ({train._source.description}) holds no rows; check the "
            "table or query"
        )
    if train_plan.num_rows < layout.num_workers:
        raise EmptyDatasetError(
            f"{train_plan.num_rows} training rows cannot be split over {layout.num_workers} "
            "workers; use fewer workers (XGBScalingConfig(num_workers=...))"
        )
    eval_plan = evaluation._plan_for_workers(spec.columns) if evaluation is not None else None
    if eval_plan is not None and eval_plan.num_rows == 0:
        raise EmptyDatasetError(f"the eval set ({evaluation._source.description}) holds no rows")

    task = TrainTask(
        params=dict(params),
        num_boost_round=num_boost_round,
        spec=spec,
        train=train_plan,
        eval=eval_plan,
        eval_whole_on_every_worker=backend.eval_whole_on_every_worker,
        early_stopping_rounds=early_stopping_rounds,
        callbacks=list(callbacks or []),
        threads=max(int(layout.cpus_per_worker), 1),
        use_gpu=bool(layout.gpus_per_worker),
        init_model=init_model,
    )
    attempts = 3
    for attempt in range(1, attempts + 1):
        try:
            result = _run_once(backend, task, layout, verbose_every)
            result.spec = spec
            return result
        except WorkerError as exc:
            if attempt == attempts or not backend.retryable(exc):
                raise
            logger.warning("%s: attempt %d failed (%s); retrying", backend.name, attempt,
                           str(exc).splitlines()[0])
    raise AssertionError("unreachable")


def _run_once(backend: Backend, task: TrainTask, layout: Layout,
              verbose_every: int | None) -> TrainResult:
    workers = group.acquire(layout)
    collective, close = backend.start_collective(workers)
    task = replace(task, collective=collective)
    progress = Progress(task.num_boost_round, f"{backend.name} ({layout.num_workers} workers)",
                        verbose_every=verbose_every)
    last: dict[str, Any] = {}

    def on_events(events: list[Any]) -> None:
        for event in events:
            last.update(event)
            progress.step(event["iteration"], event.get("metrics"))

    contexts = [
        WorkerContext(rank=w.rank, world_size=workers.num_workers, local_rank=w.local_rank,
                      local_world_size=w.local_world_size, node_rank=w.node_rank)
        for w in workers.workers
    ]
    try:
        results = workers.run(_worker_entry(backend, task), contexts, on_events=on_events)
    finally:
        close()
        progress.finish(last.get("iteration"), last.get("metrics"))
    group.release(workers)
    result = results[0]
    if not isinstance(result, TrainResult):
        raise WorkerError("rank 0 returned no model", rank=0)
    return result
