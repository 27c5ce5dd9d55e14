"""Run in its own process by test_pytorch_multinode.py: a 2-node ray.cluster_utils.Cluster."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster


def train_func() -> None:
    import torch
    import torch.distributed as dist

    from neve.pytorch import get_context

    ctx = get_context()
    value = torch.tensor([float(ctx.get_rank() + 1)])
    dist.all_reduce(value)
    info = {
        "rank": ctx.get_rank(),
        "node_rank": ctx.get_node_rank(),
        "local_rank": ctx.get_local_rank(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "sum": value.item(),
    }
    gathered: list = [None] * ctx.get_world_size()
    dist.all_gather_object(gathered, info)
    if ctx.get_rank() == 0:
        Path(ctx.get_model_dir(), "workers.json").write_text(json.dumps(gathered))


def main(stage: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, include_dashboard=False, logging_level="ERROR")
        cluster.wait_for_nodes()
        from neve.pytorch import PyTorchDistributor, PyTorchScalingConfig, WorkerResourceConfig

        config = PyTorchScalingConfig(
            num_nodes=2, num_workers_per_node=1,
            resource_requirements_per_worker=WorkerResourceConfig(num_cpus=1),
        )
        result = PyTorchDistributor(train_func, config).run(artifact_stage_location=stage)
        workers = json.loads(Path(result.get_model_dir(), "workers.json").read_text())
        print("RESULT " + json.dumps({"workers": workers, "model_dir": result.get_model_dir()}))
    finally:
        from neve._internal.runtime import group

        group.shutdown_idle()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("NEVE_PROGRESS", "0")
    main(sys.argv[1])
