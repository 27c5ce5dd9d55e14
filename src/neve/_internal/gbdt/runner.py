"""One runner for the distributed GBDT estimators.

XGBoost and LightGBM differ only in a :class:`Backend`: how the driver sets up
the collective, how a worker builds its matrix, joins the collective and trains,
and how the model comes back. Placement, data planning, progress and failure
handling live here, once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from neve._internal import settings, stages
from neve._internal.context import WorkerContext
from neve._internal.data.checks import warn_high_cardinality
from neve._internal.data.fragments import Plan
from neve._internal.data.resolve import PlanSource
from neve._internal.gbdt.config import GBDTScalingConfig
from neve._internal.gbdt.features import FeatureSpec, build_spec, with_categories
from neve._internal.gbdt.trainer import GBDTTrainer, History
from neve._internal.progress import Progress
from neve._internal.runtime import cluster, controller, group
from neve._internal.runtime.placement import Layout
from neve._internal.runtime.worker import Imports
from neve._internal.stages import CheckpointStore
from neve.exceptions import ConfigError, EmptyDatasetError

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
    #: rank 0 sends a checkpoint every this many rounds (0: never) ...
    checkpoint_every: int = 0
    #: ... but not sooner than this many seconds after the last one (0: always)
    checkpoint_min_interval_s: float = 0.0
    #: xgboost: build an external-memory matrix, its binned pages on local disk
    external_memory: bool = False
    #: evaluate the training set every round (its metrics under "train")
    eval_train: bool = True
    #: CPUs each worker pins itself to while it trains, where its group takes its whole
    #: node (0: it runs on any CPU; see :mod:`neve._internal.runtime.cpus`)
    pin_cpus: int = 0

    def train_source(self, ctx: WorkerContext) -> PlanSource:
        # Ranking: cuts move to where the query group changes, so no group spans workers.
        pieces = self.train.shard(ctx.rank, ctx.world_size, group_col=self.spec.group_col)
        return PlanSource(pieces, self.train.schema,
                          f"training shard {ctx.rank} of {ctx.world_size}")

    def eval_source(self, ctx: WorkerContext) -> PlanSource | None:
        if self.eval is None:
            return None
        if self.eval_whole_on_every_worker:
            return PlanSource.whole(self.eval, "the eval set")
        return PlanSource(self.eval.shard(ctx.rank, ctx.world_size), self.eval.schema,
                          f"eval shard {ctx.rank} of {ctx.world_size}")


class CheckpointClock:
    """Rank 0's rule for when a round ends with a checkpoint (made on the worker)."""

    def __init__(self, task: TrainTask) -> None:
        self.every = task.checkpoint_every
        self.min_interval_s = task.checkpoint_min_interval_s
        self.last = time.monotonic()

    def due(self, round_index: int) -> bool:
        """Whether round ``round_index`` (from 0, in this attempt) ends with one."""
        if not self.every or (round_index + 1) % self.every:
            return False
        now = time.monotonic()
        if now - self.last < self.min_interval_s:
            return False
        self.last = now
        return True


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

    #: whether workers can keep their binned shard on local disk
    has_external_memory: bool = False

    def external_memory(self, asked: bool | None, rows_per_worker: int, features: int,
                        budget_bytes: float) -> bool:
        """Whether workers keep their binned shard on local disk (``asked``: the user's
        choice, ``None`` for automatic)."""
        return False

    def sized_params(self, params: dict[str, Any], rows_per_worker: int, features: int,
                     budget_bytes: float) -> dict[str, Any]:
        """The parameters the workers get, given how large a shard is against a worker's
        share of its node's memory."""
        return params


#: Left out of a GBDT worker's imports while it starts: xgboost and LightGBM import their
#: scikit-learn wrappers when scikit-learn is installed (0.6 s of scipy and pandas a
#: process, that no fit uses), and LightGBM imports pandas (0.12 s) to recognise data
#: frames, where neve hands it NumPy arrays.
LEFT_OUT = ("sklearn", "pandas")


def worker_imports(module: str) -> Imports:
    """What a GBDT worker imports while it starts: the backend's ``module``, with its
    framework, without :data:`LEFT_OUT`; also in the processes Ray keeps ready for the
    next group (its workers run neve's code alone)."""
    return Imports((module,), LEFT_OUT, in_ready_processes=True)


def _as_connector(data: Any, what: str) -> Any:
    from neve.data import DataConnector

    if isinstance(data, DataConnector):
        return data
    try:
        return DataConnector.from_dataframe(data)
    except ConfigError as exc:
        raise ConfigError(f"{what} must be a DataConnector or a data frame: {exc}") from None


def fit(
    backend: Backend,
    *,
    params: Mapping[str, Any],
    num_boost_round: int,
    scaling: GBDTScalingConfig,
    dataset: Any,
    check_params: Callable[[dict[str, Any]], dict[str, Any]] = dict,
    input_cols: Sequence[str] | str,
    label_col: str,
    eval_set: Any = None,
    weight_col: str | None = None,
    group_col: str | None = None,
    early_stopping_rounds: int | None = None,
    verbose_eval: int | bool | None = None,
    callbacks: Sequence[Any] | None = None,
    init_model: Any = None,
    max_failures: int = 1,
    external_memory: bool | None = None,
    eval_train: bool | None = None,
    checkpoint_stage: Any = None,
    resume_from: str | None = None,
) -> TrainResult:
    """Fit on the cluster; return rank 0's model and evaluation history.

    ``check_params`` checks the framework's parameters on the driver, once Ray runs
    (see :mod:`.params`), and returns what the workers get.
    """
    if early_stopping_rounds is not None and eval_set is None:
        raise ConfigError("early_stopping_rounds needs an eval_set to watch; pass eval_set=...")
    if external_memory and not backend.has_external_memory:
        raise ConfigError(f"{backend.name} has no external-memory mode; leave "
                          "external_memory out")
    store, history = _checkpoints(backend, checkpoint_stage, resume_from, init_model)
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
    evaluation = _as_connector(eval_set, "eval_set") if eval_set is not None else None
    if evaluation is not None:
        build_spec(evaluation.schema, spec.input_cols, label_col, weight_col, group_col,
                   f"eval set ({evaluation._source.description})")

    cluster.ensure_ray()
    params = check_params(dict(params))
    view = cluster.view()
    layout = layout_for(lambda: backend, scaling, view)
    # The workers start, and import the backend's module, while the driver plans the data.
    group.prepare(layout, worker_imports(type(backend).__module__))
    connectors = [c for c in (train, evaluation) if c is not None]
    with contextlib.ExitStack() as plans:  # the run's spills and snapshots go when it ends
        for connector in connectors:
            plans.enter_context(connector._plans_released_after())
        return _fit_planned(backend, train, evaluation, spec, layout, params=params,
                            num_boost_round=num_boost_round,
                            early_stopping_rounds=early_stopping_rounds,
                            verbose_every=verbose_every, callbacks=callbacks,
                            init_model=init_model, max_failures=max_failures,
                            external_memory=external_memory, eval_train=eval_train,
                            budget=_memory_per_worker(view, layout),
                            store=store, history=history)


def _checkpoints(backend: Backend, stage: Any, resume_from: str | None,
                 init_model: Any) -> tuple[CheckpointStore | None, History]:
    """Where this fit's checkpoints go, and what it starts from (a resumed run's latest)."""
    if resume_from is not None and stage is None:
        raise ConfigError("resume_from needs the checkpoint_stage the interrupted fit "
                          "wrote to: pass checkpoint_stage=... too")
    if resume_from is not None and init_model is not None:
        raise ConfigError("pass init_model or resume_from, not both: a resumed fit starts "
                          "from its own latest checkpoint")
    if stage is None:
        return None, History()
    target = stages.resolve(stage)
    if resume_from is None:
        stages.check_writable(target)
        store = CheckpointStore(target, f"{backend.name}-{stages.new_request_id()}")
        logger.info("%s: checkpoints of this fit go to %s (after a crash, resume with "
                    "fit(..., checkpoint_stage=%r, resume_from=%r))", backend.name,
                    store.location, str(stage), store.request_id)
        return store, History()
    store = CheckpointStore.resume(target, resume_from)
    latest = store.latest()
    assert latest is not None
    history = History.from_checkpoint(latest)
    logger.info("%s: resuming %s from its checkpoint at round %d", backend.name,
                store.request_id, history.rounds_done)
    return store, history


def layout_for(backend: Callable[[], Backend], scaling: GBDTScalingConfig,
               view: cluster.ClusterView) -> Layout:
    """Where the workers of a fit go on this cluster (``backend`` is made, and its
    framework imported, only where GPUs could be used)."""
    gpu_unsupported = (  # asked only where GPUs could be used: LightGBM's check runs a probe
        backend().gpu_unsupported() if view.total_gpus and scaling.use_gpu is not False
        else None
    )
    return scaling.resolve(view, gpu_unsupported=gpu_unsupported)


def _pin_cpus(layout: Layout) -> int:
    """CPUs each worker pins itself to (0: none): CPU workers of whole CPUs alone."""
    cpus = layout.cpus_per_worker
    if cpus < 1 or not float(cpus).is_integer() or layout.gpus_per_worker:
        return 0
    return int(cpus) if settings.PIN_WORKERS.get() else 0


def _memory_per_worker(view: cluster.ClusterView, layout: Layout) -> float:
    """Bytes of Ray's memory resource per worker on the tightest node."""
    nodes = [n for n in view.nodes if n.cpus >= 1 or n.gpus >= 1] or list(view.nodes)
    per_node = -(-layout.num_workers // max(len(nodes), 1))
    return min((n.memory for n in nodes), default=0.0) / max(per_node, 1)


def _fit_planned(backend: Backend, train: Any, evaluation: Any, spec: FeatureSpec,
                 layout: Layout, *, params: Mapping[str, Any], num_boost_round: int,
                 early_stopping_rounds: int | None, verbose_every: int | None,
                 callbacks: Sequence[Any] | None, init_model: Any,
                 max_failures: int, external_memory: bool | None,
                 eval_train: bool | None, budget: float, store: CheckpointStore | None,
                 history: History) -> TrainResult:
    # Ranking groups must not be cut: their shards need exact row counts.
    train_plan = train._plan_for_workers(spec.columns, sized=spec.group_col is not None)
    spec = with_categories(spec, train._source, train_plan)
    warn_high_cardinality(spec.categories, None, f"training data ({train._source.description})")
    if not train_plan.fragments or train_plan.num_rows == 0:
        raise EmptyDatasetError(
            f"the training data ({train._source.description}) holds no rows; check the "
            "table or query"
        )
    if train_plan.num_rows is not None and train_plan.num_rows < layout.num_workers:
        raise EmptyDatasetError(
            f"{train_plan.num_rows} training rows cannot be split over {layout.num_workers} "
            "workers; use fewer workers (XGBScalingConfig(num_workers=...))"
        )
    eval_plan = None
    if evaluation is not None:
        eval_plan = evaluation._plan_for_workers(spec.columns)
        if not eval_plan.fragments or eval_plan.num_rows == 0:
            raise EmptyDatasetError(
                f"the eval set ({evaluation._source.description}) holds no rows"
            )
    rows_per_worker = -(-train_plan.estimated_rows // layout.num_workers)
    on_disk = backend.external_memory(external_memory, rows_per_worker, len(spec.input_cols),
                                      budget)

    task = TrainTask(
        params=backend.sized_params(dict(params), rows_per_worker, len(spec.input_cols),
                                    budget),
        num_boost_round=num_boost_round - history.rounds_done,
        spec=spec,
        train=train_plan,
        eval=eval_plan,
        eval_whole_on_every_worker=backend.eval_whole_on_every_worker,
        early_stopping_rounds=early_stopping_rounds,
        callbacks=list(callbacks or []),
        threads=max(int(layout.cpus_per_worker), 1),
        use_gpu=bool(layout.gpus_per_worker),
        init_model=history.checkpoint if history.checkpoint is not None else init_model,
        round_offset=history.rounds_done,
        # Checkpoints for restarts, every tenth of the rounds when a failure may be retried;
        # for restarts alone, not sooner than NEVE_CHECKPOINT_INTERVAL_S after the last one
        # (a short fit starts again instead of paying for checkpoints it will not use).
        checkpoint_every=max(1, num_boost_round // 10) if max_failures or store else 0,
        checkpoint_min_interval_s=0.0 if store else settings.CHECKPOINT_INTERVAL_S.get(),
        external_memory=on_disk,
        # Evaluating the training set keeps a copy of its predictions (4 B/row): a
        # shard too large for memory skips it unless asked.
        eval_train=eval_train if eval_train is not None else not on_disk,
        pin_cpus=_pin_cpus(layout),
    )
    if task.num_boost_round <= 0:  # resumed from a checkpoint of the last round
        return TrainResult(history.checkpoint, history.merged({}, history.rounds_done),
                           spec=spec)
    progress = Progress(num_boost_round, f"{backend.name} ({layout.num_workers} workers)",
                        verbose_every=verbose_every)
    trainer = GBDTTrainer(backend, task, layout, progress, history, store)
    try:
        result: TrainResult = controller.run(trainer, max_failures=max_failures)
    finally:
        progress.finish(history.last.get("iteration"), history.last.get("metrics"))
    result.spec = spec
    return result
