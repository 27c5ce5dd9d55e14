"""PyTorchDistributor: run ``train_func`` once in each worker of a gang, publish rank 0's model."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from neve._internal import stages
from neve._internal.context import WorkerContext
from neve._internal.progress import Progress
from neve._internal.runtime import cluster, controller, group, transfer
from neve._internal.runtime.placement import Layout
from neve._internal.runtime.worker import Imports
from neve._internal.signatures import checked_keywords
from neve.exceptions import ConfigError, WorkerError
from neve.pytorch._config import PyTorchScalingConfig, default_layout
from neve.pytorch._worker import WorkerOutcome, entry

if TYPE_CHECKING:
    from neve.data import DataConnector

logger = logging.getLogger(__name__)

#: What the workers import while they start, ahead of the run: torch; what torch's
#: optimizers import when the first one is made (torch._dynamo: 0.8 s); neve's side.
#: Nothing is left out: torch._dynamo looks for scikit-learn and pandas to keep
#: tracing out of them.
WORKER_MODULES = ("torch", "torch._dynamo", "neve.pytorch._worker",
                  "neve._internal.data.torch_dataset")
WORKER_IMPORTS = Imports(WORKER_MODULES)


@dataclass(frozen=True)
class PyTorchDistributorResult:
    """Where the model went and what rank 0 reported.

    Example:
        >>> # result = distributor.run(artifact_stage_location="DB.SCHEMA.STAGE")
        >>> # torch.load(os.path.join(result.get_model_dir(), "model.pt"))
    """

    model_dir: str
    request_id: str
    metrics_history: list[dict[str, Any]] = field(default_factory=list)

    def get_model_dir(self) -> str:
        """The published ``<stage>/model/<request_id>`` (a local path or a URL)."""
        return self.model_dir

    def get_metrics(self) -> dict[str, Any]:
        """The latest value of every metric rank 0 logged with ``log_metrics``."""
        merged: dict[str, Any] = {}
        for entry_ in self.metrics_history:
            merged.update(entry_)
        return merged


@checked_keywords()
class PyTorchDistributor:
    """Distributed PyTorch with Snowflake's ``PyTorchDistributor`` API.

    ``train_func`` takes no arguments and runs once in every worker process, with
    torchrun's environment and ``neve.pytorch.get_context()``.

    Example:
        >>> def train_func():
        ...     from neve.pytorch import get_context
        ...     shard = get_context().get_dataset_map()["train"].get_shard()
        >>> distributor = PyTorchDistributor(train_func)
        >>> # result = distributor.run(dataset_map={"train": sharded_connector})
    """

    def __init__(
        self,
        train_func: Callable[[], Any],
        scaling_config: PyTorchScalingConfig | None = None,
    ) -> None:
        if not callable(train_func):
            raise ConfigError(f"train_func must be a function, got {type(train_func).__name__}")
        if scaling_config is not None and not isinstance(scaling_config, PyTorchScalingConfig):
            raise ConfigError(
                "scaling_config must be a PyTorchScalingConfig, "
                f"got {type(scaling_config).__name__}"
            )
        self.train_func = train_func
        self.scaling_config = scaling_config
        # On a running Ray, the workers start (and import torch) before run asks.
        group.prestart(self._layout, WORKER_IMPORTS)

    def _layout(self, view: cluster.ClusterView) -> Layout:
        return self.scaling_config.layout() if self.scaling_config is not None else (
            default_layout(view))

    def run(
        self,
        *,
        dataset_map: Mapping[str, DataConnector] | None = None,
        hyper_params: Mapping[str, Any] | None = None,
        artifact_stage_location: str | os.PathLike[str] | None = None,
        max_failures: int = 1,
        resume_from: str | None = None,
    ) -> PyTorchDistributorResult:
        """Run ``train_func`` on every worker; publish what rank 0 saved in its model dir.

        A lost worker (killed, out of memory, its node gone) restarts every worker,
        up to ``max_failures`` times (``0``: never); ``train_func`` finds the run's
        latest checkpoint in ``get_context().get_checkpoint_dir()``. An exception
        raised by ``train_func`` is never retried. ``resume_from`` (a request id, or
        ``"latest"``) continues a run whose driver died from its last checkpoint in
        ``<stage>/checkpoints/``; its model is published under the same request id.
        """
        from neve.data import DataConnector
        from neve.data._connector import check_for_workers

        for name, connector in (dataset_map or {}).items():
            if not isinstance(connector, DataConnector):
                raise ConfigError(
                    f"dataset_map[{name!r}] must be a DataConnector or ShardedDataConnector, "
                    f"got {type(connector).__name__}"
                )
        if hyper_params is not None and not isinstance(hyper_params, Mapping):
            raise ConfigError(f"hyper_params must be a dict, got {type(hyper_params).__name__}")
        if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 0:
            raise ConfigError(f"max_failures must be an integer >= 0, got {max_failures!r}")
        stage = stages.resolve(artifact_stage_location)
        stages.check_writable(stage)
        if resume_from is not None:
            store = stages.CheckpointStore.resume(stage, resume_from)
        else:
            store = stages.CheckpointStore(stage, f"pytorch-{stages.new_request_id()}")

        cluster.ensure_ray()
        view = cluster.view()
        layout = self._layout(view)
        layout.check_feasible(view)
        # The workers start while the driver plans the data.
        group.prepare(layout, WORKER_IMPORTS)
        connectors = list((dataset_map or {}).values())
        run = _Run(self.train_func, layout, store, dict(hyper_params or {}),
                   dict(dataset_map or {}))
        logger.info("pytorch run %s: checkpoints go to %s", store.request_id, store.location)
        with contextlib.ExitStack() as plans:  # the run's spills and snapshots go when it ends
            for connector in connectors:
                plans.enter_context(connector._plans_released_after())
            check_for_workers(dataset_map or {}, layout.num_workers)  # warnings, on the driver
            try:
                location, metrics = controller.run(run, max_failures=max_failures)
            finally:
                run.progress.close()
        logger.info("model of run %s published to %s", store.request_id, location)
        return PyTorchDistributorResult(location, store.request_id, metrics)


class _Run(controller.Trainer):
    """One PyTorchDistributor run, for the controller."""

    name = "pytorch"

    def __init__(self, train_func: Callable[[], Any], layout: Layout,
                 store: stages.CheckpointStore, hyper_params: dict[str, Any],
                 dataset_map: dict[str, Any]) -> None:
        self.entry = entry(train_func)
        self.layout = layout
        self.store = store
        self.hyper_params = hyper_params
        self.dataset_map = dataset_map
        self.metrics: list[dict[str, Any]] = []
        self.progress = Progress(None, f"pytorch ({layout.num_workers} workers)",
                                 unit="report")

    def setup(self, workers: group.WorkerGroup, attempt: int) -> controller.Attempt:
        # Held by rank 0 from now until its store listens on it: no other process takes it.
        master_port = workers.call(0, "hold_port", workers.workers[0].node_ip)
        folders = [workers.call(rank, "scratch_folder", "checkpoint")
                   for rank in range(workers.num_workers)]
        latest = self.store.latest()
        if latest is not None:  # every worker starts from the run's latest checkpoint
            transfer.push(latest.files, workers, folders)
        backend = "cpu:gloo,cuda:nccl" if self.layout.gpus_per_worker else "gloo"
        contexts = [
            WorkerContext(
                rank=w.rank,
                world_size=workers.num_workers,
                local_rank=w.local_rank,
                local_world_size=w.local_world_size,
                node_rank=w.node_rank,
                num_nodes=self.layout.num_groups,
                master_addr=workers.workers[0].node_ip,
                master_port=master_port,
                default_backend="nccl" if self.layout.gpus_per_worker else "gloo",
                run_id=self.store.request_id,
                hyper_params=self.hyper_params,
                dataset_map=self.dataset_map,
                extras={"cuda_visible_devices": _node_gpus(workers, w.node_id),
                        "process_group_backend": backend,
                        "checkpoint_dir": folders[w.rank],
                        "checkpoint_seq": latest.seq if latest is not None else 0},
            )
            for w in workers.workers
        ]
        return controller.Attempt(self.entry, contexts)

    def on_events(self, workers: group.WorkerGroup, events: list[Any]) -> None:
        for event in events:
            if "checkpoint" in event:  # rank 0 waits in save_checkpoint() until committed
                seq = int(event["checkpoint"]["seq"])
                files = transfer.WorkerFiles(workers, 0, event["checkpoint"]["dir"])
                location = self.store.save(seq, files, {"seq": seq})
                workers.call(0, "acknowledge", f"checkpoint-{seq}")
                logger.debug("checkpoint %d committed to %s", seq, location)
            if "metrics" in event:
                self.metrics.append(event["metrics"])
                self.progress.step(len(self.metrics) - 1, extra=event["metrics"])

    def restart(self, error: WorkerError) -> str:
        latest = self.store.latest()
        return "from the start" if latest is None else f"from checkpoint {latest.seq}"

    def finish(self, workers: group.WorkerGroup,
               results: list[WorkerOutcome]) -> tuple[str, list[dict[str, Any]]]:
        model_dir = results[0].model_dir
        if model_dir is None:
            raise WorkerError("rank 0 sent no model directory back", rank=0)
        try:
            location = stages.publish(self.store.stage, self.store.request_id,
                                      transfer.WorkerFiles(workers, 0, model_dir))
        finally:
            workers.call(0, "remove_tree", model_dir)
        return location, self.metrics


def _node_gpus(workers: group.WorkerGroup, node_id: str) -> str:
    """Every GPU Ray gave the workers of one node, so ``cuda:{local_rank}`` works."""
    ids = sorted({g for w in workers.workers if w.node_id == node_id for g in w.gpu_ids},
                 key=lambda g: (len(g), g))
    return ",".join(ids)
