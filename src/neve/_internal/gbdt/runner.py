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
from neve._internal.data.checks import warn_high_cardinality
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
    #: rounds already in ``init_model`` when resuming after a failure (xgboost counts from 0)
    round_offset: int = 0
    #: rank 0 sends a checkpoint every this many rounds (0: never)
    checkpoint_every: int = 0

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


def plain_floats(
    evals: Mapping[str, Mapping[str, Sequence[Any]]],
) -> dict[str, dict[str, list[float]]]:
    """An evaluation history with plain Python floats."""
    return {d: {m: [float(v) for v in values] for m, values in log.items()}
            for d, log in evals.items()}


class Backend(ABC):
    """The framework-specific part of a distributed fit."""

    name: str
    #: whether every worker must see the whole eval set (LightGBM does not combine metrics)
    eval_whole_on_every_worker: bool = False

    @abstractmethod
    def start_collective(
        self, workers: group.WorkerGroup
    ) -> tuple[dict[str, Any], Callable[[], None]]:
        """Set up the collective; return what workers need and a closer."""

    @abstractmethod
    def train(self, task: TrainTask, ctx: WorkerContext) -> TrainResult | None:
        """Run on each worker: build the matrix, join the collective, train."""

    def gpu_unsupported(self) -> str | None:
        """Why this framework cannot train on GPUs here (``None``: it can)."""
        return None

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
    max_failures: int = 0,
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
    warn_high_cardinality(spec.categories, None, f"training data ({train._source.description})")
    evaluation = _as_connector(eval_set, "eval_set") if eval_set is not None else None
    if evaluation is not None:
        build_spec(evaluation.schema, spec.input_cols, label_col, weight_col, group_col,
                   f"eval set ({evaluation._source.description})")

    cluster.ensure_ray()
    view = cluster.view()
    gpu_unsupported = (  # asked only where GPUs could be used: LightGBM's check runs a probe
        backend.gpu_unsupported() if view.total_gpus and scaling.use_gpu is not False else None
    )
    layout = scaling.resolve(view, gpu_unsupported=gpu_unsupported)
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
    eval_plan = None
    if evaluation is not None:
        eval_plan = evaluation._plan_for_workers(spec.columns)
        if eval_plan.num_rows == 0:
            raise EmptyDatasetError(
                f"the eval set ({evaluation._source.description}) holds no rows"
            )

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
    if max_failures > 0:
        task = replace(task, checkpoint_every=max(1, num_boost_round // 10))
    progress = Progress(num_boost_round, f"{backend.name} ({layout.num_workers} workers)",
                        verbose_every=verbose_every)
    resume = _Resume()
    failures = port_retries = 0
    try:
        while True:
            try:
                result = _run_once(backend, task, layout, progress, resume)
                break
            except WorkerError as exc:
                first_line = str(exc).splitlines()[0]
                if backend.retryable(exc) and port_retries < 2:
                    port_retries += 1
                    logger.warning("%s: %s; retrying", backend.name, first_line)
                    continue
                if failures >= max_failures or resume.checkpoint is None:
                    raise
                failures += 1
                logger.warning(
                    "%s: %s; restarting every worker from the checkpoint at round %d "
                    "(failure %d of max_failures=%d)", backend.name, first_line,
                    resume.rounds_done, failures, max_failures,
                )
                task = replace(
                    task,
                    init_model=resume.checkpoint,
                    num_boost_round=num_boost_round - resume.rounds_done,
                    round_offset=resume.rounds_done,
                )
                resume.truncate()
    finally:
        progress.finish(resume.last.get("iteration"), resume.last.get("metrics"))
    result.evals_result = resume.merged(result.evals_result, task.round_offset)
    result.spec = spec
    return result


@dataclass
class _Resume:
    """What the driver keeps of a run in flight: metrics so far and the last checkpoint."""

    checkpoint: Any = None
    rounds_done: int = 0
    history: list[dict[str, dict[str, float]]] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)

    def record(self, event: dict[str, Any]) -> None:
        self.last = event
        del self.history[event["iteration"]:]
        self.history.append(event.get("metrics") or {})
        if "checkpoint" in event:
            self.checkpoint = event["checkpoint"]
            self.rounds_done = event["iteration"] + 1

    def truncate(self) -> None:
        del self.history[self.rounds_done:]

    def merged(self, tail: dict[str, dict[str, list[float]]],
               offset: int) -> dict[str, dict[str, list[float]]]:
        """The rounds before a restart (from events) followed by the last attempt's."""
        if offset == 0:
            return tail
        out: dict[str, dict[str, list[float]]] = {}
        for metrics in self.history[:offset]:
            for data, values in metrics.items():
                for name, value in values.items():
                    out.setdefault(data, {}).setdefault(name, []).append(value)
        for data, log in tail.items():
            for name, series in log.items():
                out.setdefault(data, {}).setdefault(name, []).extend(series)
        return out


def _run_once(backend: Backend, task: TrainTask, layout: Layout, progress: Progress,
              resume: _Resume) -> TrainResult:
    workers = group.acquire(layout)
    try:
        collective, close = backend.start_collective(workers)
    except BaseException:  # a group that never ran must not keep its CPUs
        workers.shutdown()
        raise
    task = replace(task, collective=collective)

    def on_events(events: list[Any]) -> None:
        for event in events:
            resume.record(event)
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
    group.release(workers)
    result = results[0]
    if not isinstance(result, TrainResult):
        raise WorkerError("rank 0 returned no model", rank=0)
    return result
