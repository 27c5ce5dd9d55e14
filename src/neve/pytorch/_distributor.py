"""PyTorchDistributor: run ``train_func`` once in each worker of a gang, publish rank 0's model."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from neve._internal import stages
from neve._internal.context import WorkerContext
from neve._internal.progress import Progress
from neve._internal.runtime import cluster, group
from neve._internal.signatures import checked_keywords
from neve.exceptions import ConfigError
from neve.pytorch._config import PyTorchScalingConfig, default_layout
from neve.pytorch._worker import WorkerOutcome, entry

if TYPE_CHECKING:
    from neve.data import DataConnector

logger = logging.getLogger(__name__)


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

    def run(
        self,
        *,
        dataset_map: Mapping[str, DataConnector] | None = None,
        hyper_params: Mapping[str, Any] | None = None,
        artifact_stage_location: str | os.PathLike[str] | None = None,
    ) -> PyTorchDistributorResult:
        """Run ``train_func`` on every worker; publish what rank 0 saved in its model dir."""
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
        stage = stages.resolve(artifact_stage_location)
        stages.check_writable(stage)

        cluster.ensure_ray()
        view = cluster.view()
        layout = (self.scaling_config.layout() if self.scaling_config is not None
                  else default_layout(view))
        layout.check_feasible(view)
        check_for_workers(dataset_map or {}, layout.num_workers)  # warnings, on the driver
        request_id = f"pytorch-{stages.new_request_id()}"  # named as GBDT models are
        workers = group.acquire(layout)
        master_port = workers.call(0, "free_port")
        backend = "cpu:gloo,cuda:nccl" if layout.gpus_per_worker else "gloo"
        contexts = [
            WorkerContext(
                rank=w.rank,
                world_size=workers.num_workers,
                local_rank=w.local_rank,
                local_world_size=w.local_world_size,
                node_rank=w.node_rank,
                num_nodes=layout.num_groups,
                master_addr=workers.workers[0].node_ip,
                master_port=master_port,
                default_backend="nccl" if layout.gpus_per_worker else "gloo",
                run_id=request_id,
                hyper_params=dict(hyper_params or {}),
                dataset_map=dict(dataset_map or {}),
                extras={"cuda_visible_devices": _node_gpus(workers, w.node_id),
                        "process_group_backend": backend},
            )
            for w in workers.workers
        ]
        progress = Progress(None, f"pytorch ({workers.num_workers} workers)", unit="report")
        reports = 0

        def on_events(events: list[Any]) -> None:
            nonlocal reports
            for event in events:
                progress.step(reports, extra=event.get("metrics"))
                reports += 1

        try:
            outcomes: list[WorkerOutcome] = workers.run(
                entry(self.train_func), contexts, on_events=on_events
            )
        finally:
            progress.close()
        group.release(workers)
        packed = outcomes[0].packed_model
        if packed is None:
            raise RuntimeError("rank 0 sent no model directory back")
        location = stages.publish(stage, request_id, packed)
        logger.info("model of run %s published to %s", request_id, location)
        return PyTorchDistributorResult(location, request_id, outcomes[0].metrics)


def _node_gpus(workers: group.WorkerGroup, node_id: str) -> str:
    """Every GPU Ray gave the workers of one node, so ``cuda:{local_rank}`` works."""
    ids = sorted({g for w in workers.workers if w.node_id == node_id for g in w.gpu_ids},
                 key=lambda g: (len(g), g))
    return ",".join(ids)
