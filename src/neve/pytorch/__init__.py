"""Distributed PyTorch on Ray: ``PyTorchDistributor`` and the per-worker context.

Example:
    >>> from neve.pytorch import PyTorchDistributor, PyTorchScalingConfig, WorkerResourceConfig
    >>> def train_func():
    ...     from neve.pytorch import get_context
    ...     ctx = get_context()
    ...     print(ctx.get_rank(), ctx.get_world_size())
    >>> distributor = PyTorchDistributor(
    ...     train_func,
    ...     scaling_config=PyTorchScalingConfig(
    ...         num_nodes=1, num_workers_per_node=2,
    ...         resource_requirements_per_worker=WorkerResourceConfig(num_cpus=1)),
    ... )
    >>> # result = distributor.run(); result.get_model_dir()
"""

from neve.pytorch._config import PyTorchScalingConfig, WorkerResourceConfig
from neve.pytorch._context import Context, MetricsReporter, get_context
from neve.pytorch._distributor import PyTorchDistributor, PyTorchDistributorResult

__all__ = [
    "Context",
    "MetricsReporter",
    "PyTorchDistributor",
    "PyTorchDistributorResult",
    "PyTorchScalingConfig",
    "WorkerResourceConfig",
    "get_context",
]
