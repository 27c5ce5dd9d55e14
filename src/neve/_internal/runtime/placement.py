"""How many workers go where: a layout, checked against the cluster before anything starts."""

from __future__ import annotations

from dataclasses import dataclass, field

from neve._internal.runtime.cluster import ClusterView
from neve.exceptions import ResourcesUnavailableError


@dataclass(frozen=True)
class Layout:
    """Workers as ``num_groups`` groups of ``workers_per_group``.

    With ``distinct_nodes`` each group lands on its own node (a STRICT_SPREAD
    placement group, one bundle per group); otherwise each worker is its own
    bundle and Ray spreads them as it can.
    """

    num_groups: int
    workers_per_group: int
    cpus_per_worker: float
    gpus_per_worker: float = 0.0
    distinct_nodes: bool = False
    #: what the user can change when the cluster cannot hold this layout (advice only:
    #: not part of the layout's identity, so warm groups match without it)
    fix: str = field(default=(
        "Ask for fewer workers or CPUs/GPUs per worker (or -1 to use what the cluster has), "
        "or add nodes."
    ), repr=False, compare=False)

    @property
    def num_workers(self) -> int:
        return self.num_groups * self.workers_per_group

    def bundles(self) -> list[dict[str, float]]:
        if self.distinct_nodes:
            per = self.workers_per_group
            count = self.num_groups
        else:
            per = 1
            count = self.num_workers
        bundle = {"CPU": self.cpus_per_worker * per}
        if self.gpus_per_worker:
            bundle["GPU"] = self.gpus_per_worker * per
        # Ray rejects empty bundles: a worker that asks for 0 CPUs still needs a slot.
        if not any(bundle.values()):
            bundle = {"CPU": 0.001 * per}
        return [dict(bundle) for _ in range(count)]

    @property
    def strategy(self) -> str:
        return "STRICT_SPREAD" if self.distinct_nodes else "SPREAD"

    def bundle_of(self, worker: int) -> int:
        return worker // self.workers_per_group if self.distinct_nodes else worker

    def describe(self) -> str:
        what = f"{self.cpus_per_worker:g} CPU" + (
            f" + {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        )
        where = (
            f" on {self.num_groups} distinct node{'s' if self.num_groups != 1 else ''}"
            f" ({self.workers_per_group} per node)"
            if self.distinct_nodes
            else ""
        )
        return f"{self.num_workers} worker{'s' if self.num_workers != 1 else ''} x ({what}){where}"

    def check_feasible(self, cluster: ClusterView) -> None:
        """Fail at once when the cluster could never hold this layout."""
        problems = []
        if self.gpus_per_worker and cluster.total_gpus == 0:
            problems.append("the cluster has no GPUs")
        bundles = self.bundles()
        need_cpu = sum(b.get("CPU", 0.0) for b in bundles)
        need_gpu = sum(b.get("GPU", 0.0) for b in bundles)
        if need_cpu > cluster.total_cpus + 1e-9:
            problems.append(f"{need_cpu:g} CPUs needed, the cluster has {cluster.total_cpus:g}")
        if need_gpu > cluster.total_gpus + 1e-9 and cluster.total_gpus:
            problems.append(f"{need_gpu:g} GPUs needed, the cluster has {cluster.total_gpus:g}")
        if self.distinct_nodes:
            fitting = [
                n for n in cluster.nodes
                if n.cpus + 1e-9 >= bundles[0].get("CPU", 0.0)
                and n.gpus + 1e-9 >= bundles[0].get("GPU", 0.0)
            ]
            if len(fitting) < self.num_groups:
                problems.append(
                    f"{self.num_groups} distinct nodes each with room for "
                    f"{self.workers_per_group} worker(s) needed, {len(fitting)} node(s) have it"
                )
        else:
            biggest = max(
                ((n.cpus, n.gpus) for n in cluster.nodes), default=(0.0, 0.0)
            )
            if self.cpus_per_worker > biggest[0] + 1e-9:
                problems.append(
                    f"one worker asks for {self.cpus_per_worker:g} CPUs, the biggest node "
                    f"has {biggest[0]:g}"
                )
        if problems:
            raise ResourcesUnavailableError(
                f"cannot place {self.describe()}: {'; '.join(problems)}. "
                f"The cluster has {cluster.describe()}. {self.fix}"
            )
