"""Scaling configuration shared by the XGBoost and LightGBM estimators."""

from __future__ import annotations

from dataclasses import dataclass

from neve._internal.runtime.cluster import ClusterView
from neve._internal.runtime.placement import Layout
from neve._internal.signatures import checked_keywords
from neve.exceptions import ConfigError, ResourcesUnavailableError


@checked_keywords()
@dataclass(frozen=True, kw_only=True)
class GBDTScalingConfig:
    """How many workers, and what each gets. ``-1`` / ``None`` mean "what the cluster has".

    * ``num_workers=-1``: one worker per node (one per GPU when GPUs are used);
    * ``num_cpu_per_worker=-1``: the CPUs of a node divided among its workers;
    * ``use_gpu=None``: use GPUs if the cluster has them; ``True`` without GPUs is an error.
    """

    num_workers: int = -1
    num_cpu_per_worker: int = -1
    use_gpu: bool | None = None

    def __post_init__(self) -> None:
        for name in ("num_workers", "num_cpu_per_worker"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or (value != -1 and value < 1):
                raise ConfigError(f"`{name}` must be -1 (auto) or >= 1, got {value!r}")
        if self.use_gpu not in (None, True, False):
            raise ConfigError(f"`use_gpu` must be None (auto), True or False, got {self.use_gpu!r}")

    def resolve(self, cluster: ClusterView, *, gpu_unsupported: str | None = None) -> Layout:
        """The concrete layout on this cluster.

        ``gpu_unsupported`` says why the framework cannot train on GPUs here (a
        build without CUDA, say): ``use_gpu=None`` then means CPUs.
        """
        if self.use_gpu is None:
            use_gpu = cluster.total_gpus > 0 and gpu_unsupported is None
        else:
            use_gpu = self.use_gpu
        if use_gpu and cluster.total_gpus == 0:
            raise ResourcesUnavailableError(
                f"use_gpu=True but the cluster has no GPUs ({cluster.describe()}); "
                "set use_gpu=None or False to train on CPUs, or add GPU nodes"
            )
        if use_gpu and gpu_unsupported is not None:
            raise ConfigError(
                f"use_gpu=True but {gpu_unsupported}; set use_gpu=None or False to train on CPUs"
            )
        nodes = [n for n in cluster.nodes if n.cpus >= 1 or n.gpus >= 1]
        if not nodes:
            raise ResourcesUnavailableError(
                f"the cluster has no usable nodes: {cluster.describe()}"
            )
        if use_gpu:
            workers = self.num_workers if self.num_workers != -1 else int(cluster.total_gpus)
            gpu_nodes = [n for n in nodes if n.gpus >= 1]
            per_node_cpus = min(n.cpus / max(n.gpus, 1) for n in gpu_nodes)
            cpus = self.num_cpu_per_worker if self.num_cpu_per_worker != -1 else max(
                int(per_node_cpus), 1
            )
            return Layout(num_groups=workers, workers_per_group=1, cpus_per_worker=cpus,
                          gpus_per_worker=1.0)
        if self.num_workers == -1:
            cpus = self.num_cpu_per_worker if self.num_cpu_per_worker != -1 else max(
                int(min(n.cpus for n in nodes)), 1
            )
            return Layout(num_groups=len(nodes), workers_per_group=1, cpus_per_worker=cpus,
                          distinct_nodes=True)
        if self.num_cpu_per_worker != -1:
            cpus = self.num_cpu_per_worker
        else:
            cpus = max(int(cluster.total_cpus // self.num_workers), 1)
            cpus = min(cpus, max(int(max(n.cpus for n in nodes)), 1))
        return Layout(num_groups=self.num_workers, workers_per_group=1, cpus_per_worker=cpus)
