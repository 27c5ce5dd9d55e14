"""Scaling configuration of PyTorchDistributor."""

from __future__ import annotations

from dataclasses import dataclass, field

from neve._internal.runtime.cluster import ClusterView
from neve._internal.runtime.placement import Layout
from neve._internal.signatures import checked_keywords
from neve.exceptions import ConfigError, ResourcesUnavailableError

#: what to change when the cluster cannot hold a PyTorchScalingConfig (-1 is not allowed here)
_FIX = (
    "Ask for fewer nodes (num_nodes), fewer workers per node (num_workers_per_node), or fewer "
    "CPUs/GPUs per worker (WorkerResourceConfig); pass scaling_config=None to run one worker "
    "per node with what the cluster has; or add nodes."
)


def _number(name: str, value: object, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ConfigError(f"`{name}` must be a number >= {minimum:g}, got {value!r}")
    return float(value)


@checked_keywords()
@dataclass(frozen=True)
class WorkerResourceConfig:
    """What each worker reserves: ``num_cpus`` and ``num_gpus`` (default 0).

    Example:
        >>> WorkerResourceConfig(num_cpus=1)
        WorkerResourceConfig(num_cpus=1, num_gpus=0)
    """

    num_cpus: float = 1
    num_gpus: float = 0

    def __post_init__(self) -> None:
        _number("num_cpus", self.num_cpus, 0)
        _number("num_gpus", self.num_gpus, 0)


@checked_keywords()
@dataclass(frozen=True)
class PyTorchScalingConfig:
    """``num_workers_per_node`` workers on each of ``num_nodes`` distinct nodes.

    Example:
        >>> PyTorchScalingConfig(num_nodes=1, num_workers_per_node=2,
        ...                      resource_requirements_per_worker=WorkerResourceConfig(num_cpus=1))
        ... # doctest: +ELLIPSIS
        PyTorchScalingConfig(num_nodes=1, num_workers_per_node=2, ...)
    """

    num_nodes: int = 1
    num_workers_per_node: int = 1
    resource_requirements_per_worker: WorkerResourceConfig = field(
        default_factory=WorkerResourceConfig
    )

    def __post_init__(self) -> None:
        for name in ("num_nodes", "num_workers_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"`{name}` must be an integer >= 1, got {value!r}")
        if not isinstance(self.resource_requirements_per_worker, WorkerResourceConfig):
            raise ConfigError(
                "`resource_requirements_per_worker` must be a WorkerResourceConfig, got "
                f"{type(self.resource_requirements_per_worker).__name__}"
            )

    def layout(self) -> Layout:
        resources = self.resource_requirements_per_worker
        return Layout(
            num_groups=self.num_nodes,
            workers_per_group=self.num_workers_per_node,
            cpus_per_worker=float(resources.num_cpus),
            gpus_per_worker=float(resources.num_gpus),
            distinct_nodes=True,
            fix=_FIX,
        )


def default_layout(cluster: ClusterView) -> Layout:
    """What the cluster has: one worker per GPU, else one per node with all its CPUs."""
    gpu_nodes = [n for n in cluster.nodes if n.gpus >= 1]
    if gpu_nodes:
        per_node = int(min(n.gpus for n in gpu_nodes))
        cpus = max(min(n.cpus for n in gpu_nodes) // per_node, 0)
        return Layout(num_groups=len(gpu_nodes), workers_per_group=per_node,
                      cpus_per_worker=cpus, gpus_per_worker=1.0, distinct_nodes=True)
    nodes = [n for n in cluster.nodes if n.cpus >= 1]
    if not nodes:
        raise ResourcesUnavailableError(f"the cluster has no usable nodes: {cluster.describe()}")
    return Layout(num_groups=len(nodes), workers_per_group=1,
                  cpus_per_worker=float(int(min(n.cpus for n in nodes))), distinct_nodes=True)
