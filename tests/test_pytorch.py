"""PyTorchDistributor on the session's local Ray: the seed's example, context, data, failures."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import assert_no_reservations, make_frame  # noqa: E402
from neve.data import DataConnector, ShardedDataConnector  # noqa: E402
from neve.exceptions import (  # noqa: E402
    ConfigError,
    ContextError,
    ResourcesUnavailableError,
    StageError,
    WorkerError,
)
from neve.pytorch import (  # noqa: E402
    PyTorchDistributor,
    PyTorchScalingConfig,
    WorkerResourceConfig,
    get_context,
)

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(120)]

TWO_WORKERS = PyTorchScalingConfig(
    num_nodes=1,
    num_workers_per_node=2,
    resource_requirements_per_worker=WorkerResourceConfig(num_cpus=1),
)


class SimpleNet(torch.nn.Module):
    def __init__(self, input_size: int, hidden_size: int, output_size: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(input_size, hidden_size)
        self.relu = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(hidden_size, output_size)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.fc2(self.relu(self.fc1(x)))


def test_seed_example_runs_as_written(warehouse: Path, tmp_path: Path) -> None:
    import duckdb

    session = duckdb.connect(str(warehouse), read_only=True)
    input_cols = ["f0", "f1", "f2", "f3"]
    label_col = "y"
    data_connector = ShardedDataConnector.from_dataframe(session.table("TRAINING_DATA"))

    # The seed's train_func, unchanged but for its import line.
    def train_func():  # type: ignore[no-untyped-def]
        import torch.distributed as dist
        import torch.nn as nn
        import torch.optim as optim
        from torch.nn.parallel import DistributedDataParallel as DDP
        from torch.utils.data import DataLoader

        from neve.pytorch import get_context

        context = get_context()
        rank = context.get_rank()  # noqa: F841
        dist.init_process_group(backend="gloo")
        device = torch.device(
            f"cuda:{context.get_local_rank()}" if torch.cuda.is_available() else "cpu"
        )
        model = SimpleNet(input_size=len(input_cols), hidden_size=32, output_size=1).to(device)
        model = DDP(model)
        criterion = nn.MSELoss()
        optimizer = optim.Adam(model.parameters(), lr=0.001)
        dataset_map = context.get_dataset_map()
        torch_dataset = dataset_map["train"].get_shard().to_torch_dataset(batch_size=1024)
        dataloader = DataLoader(torch_dataset)
        for epoch in range(2):
            for batch_dict in dataloader:
                features = torch.cat(
                    [batch_dict[col].T for col in input_cols], dim=1
                ).float().to(device)
                labels = batch_dict[label_col].T.squeeze(0).float().to(device)
                output = model(features)
                loss = criterion(output, labels.unsqueeze(1))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            print(f"Epoch [{epoch + 1}/2], Loss: {loss.item():.4f}")
        if context.get_rank() == 0:
            torch.save(model.module.state_dict(), os.path.join(context.get_model_dir(), "model.pt"))

    pytorch_trainer = PyTorchDistributor(train_func=train_func, scaling_config=TWO_WORKERS)
    response = pytorch_trainer.run(
        dataset_map={"train": data_connector},
        artifact_stage_location=str(tmp_path / "stage"),
    )
    stage_location = response.get_model_dir()
    assert stage_location.startswith(str(tmp_path / "stage" / "model"))
    state = torch.load(os.path.join(stage_location, "model.pt"))
    assert set(state) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert state["fc1.weight"].shape == (32, 4)


def test_dotted_stage_resolves_under_stage_root(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NEVE_STAGE_ROOT", str(tmp_path / "root"))

    def train_func() -> None:
        ctx = get_context()
        if ctx.get_rank() == 0:
            Path(ctx.get_model_dir(), "weights.txt").write_text("w")
            Path(ctx.get_model_dir(), "sub").mkdir()
            Path(ctx.get_model_dir(), "sub", "extra.txt").write_text("x")

    result = PyTorchDistributor(train_func, TWO_WORKERS).run(
        artifact_stage_location="DB_NAME.SCHEMA_NAME.STAGE_NAME"
    )
    expected = tmp_path / "root" / "DB_NAME" / "SCHEMA_NAME" / "STAGE_NAME" / "model"
    published = Path(result.get_model_dir())
    assert result.request_id.startswith("pytorch-")  # named as GBDT models are: framework-id
    assert published.parent == expected
    assert published.name == result.request_id
    assert (published / "weights.txt").read_text() == "w"
    assert (published / "sub" / "extra.txt").read_text() == "x"
    assert [p.name for p in expected.iterdir()] == [result.request_id]  # no temporary left


def test_context_and_torchrun_environment(tmp_path: Path) -> None:
    def train_func() -> None:
        import torch.distributed as dist

        ctx = get_context()
        # Calling init twice (and the seed's own call) must not crash.
        dist.init_process_group(backend="gloo")
        dist.init_process_group(backend="gloo")
        assert dist.get_world_size() == ctx.get_world_size()
        assert dist.get_rank() == ctx.get_rank()
        env = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                          "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR",
                                          "MASTER_PORT")}
        total = torch.tensor([ctx.get_rank() + 1.0])
        dist.all_reduce(total)
        ctx.get_metrics_reporter().log_metrics({"rank": ctx.get_rank(), "sum": total.item()})
        if ctx.get_rank() == 0:
            import json

            info = {
                "env": env,
                "ctx": [ctx.get_world_size(), ctx.get_rank(), ctx.get_world_rank(),
                        ctx.get_local_rank(), ctx.get_local_world_size(), ctx.get_node_rank(),
                        ctx.get_master_addr(), ctx.get_master_port(),
                        ctx.get_default_backend()],
                "hyper": ctx.get_hyper_params(),
            }
            Path(ctx.get_model_dir(), "info.json").write_text(json.dumps(info))

    result = PyTorchDistributor(train_func, TWO_WORKERS).run(
        hyper_params={"lr": 0.1}, artifact_stage_location=str(tmp_path)
    )
    import json

    info = json.loads(Path(result.get_model_dir(), "info.json").read_text())
    env = info["env"]
    assert env["RANK"] == "0" and env["LOCAL_RANK"] == "0" and env["WORLD_SIZE"] == "2"
    assert env["LOCAL_WORLD_SIZE"] == "2" and env["NODE_RANK"] == "0"
    assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
    world, rank, world_rank, local, local_world, node, addr, port, backend = info["ctx"]
    assert (world, rank, world_rank, local, local_world, node) == (2, 0, 0, 0, 2, 0)
    assert addr == "127.0.0.1" and port == int(env["MASTER_PORT"]) and backend == "gloo"
    assert info["hyper"] == {"lr": 0.1}
    assert result.get_metrics() == {"rank": 0, "sum": 3.0}


def test_get_context_outside_a_run_is_a_clear_error() -> None:
    with pytest.raises(ContextError, match="inside a distributed run"):
        get_context()
    with pytest.raises(ContextError):
        ShardedDataConnector.from_dataframe(make_frame(10)).get_shard()


def test_every_row_once_per_epoch_and_ddp_parameters_agree(tmp_path: Path) -> None:
    frame = make_frame(5_003, seed=3)
    train = ShardedDataConnector.from_dataframe(frame)
    three = PyTorchScalingConfig(
        num_nodes=1, num_workers_per_node=3,
        resource_requirements_per_worker=WorkerResourceConfig(num_cpus=1),
    )

    def train_func() -> None:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        from torch.utils.data import DataLoader

        ctx = get_context()
        model = DDP(torch.nn.Linear(4, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        shard = ctx.get_dataset_map()["train"].get_shard()
        loader = DataLoader(shard.to_torch_dataset(batch_size=256, drop_last_batch=False,
                                                   shuffle=True), batch_size=None)
        seen = []
        for _ in range(2):
            epoch_ids = []
            for batch in loader:
                epoch_ids.append(batch["id"].numpy())
                x = torch.stack([batch[f"f{i}"] for i in range(4)], dim=1)
                loss = ((model(x).squeeze(1) - batch["y"].float()) ** 2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            seen.append(np.concatenate(epoch_ids))
        gathered: list = [None] * ctx.get_world_size()
        params = [p.detach().numpy().copy() for p in model.module.parameters()]
        dist.all_gather_object(gathered, {"ids": seen, "params": params})
        if ctx.get_rank() == 0:
            np.save(Path(ctx.get_model_dir(), "gathered.npy"),
                    np.array(gathered, dtype=object), allow_pickle=True)

    result = PyTorchDistributor(train_func, three).run(
        dataset_map={"train": train}, artifact_stage_location=str(tmp_path)
    )
    gathered = np.load(Path(result.get_model_dir(), "gathered.npy"), allow_pickle=True)
    for epoch in range(2):
        ids = np.concatenate([g["ids"][epoch] for g in gathered])
        assert len(ids) == len(frame)
        assert np.array_equal(np.sort(ids), frame["id"].to_numpy())
    first = gathered[0]["params"]
    for other in gathered[1:]:
        for a, b in zip(first, other["params"], strict=True):
            np.testing.assert_array_equal(a, b)


def test_unsharded_connector_gives_every_worker_all_rows(tmp_path: Path) -> None:
    frame = make_frame(777)

    def train_func() -> None:
        ctx = get_context()
        n = ctx.get_dataset_map()["test"].to_arrow().num_rows
        ctx.get_metrics_reporter().log_metrics({"rows": n})
        if n != 777:
            raise AssertionError(f"rank {ctx.get_rank()} saw {n} rows")

    result = PyTorchDistributor(train_func, TWO_WORKERS).run(
        dataset_map={"test": DataConnector.from_dataframe(frame)},
        artifact_stage_location=str(tmp_path),
    )
    assert result.get_metrics() == {"rows": 777}


def _raise_on_rank_1() -> None:
    if get_context().get_rank() == 1:
        raise ValueError("boom from the user's code")
    time.sleep(60)  # rank 0 would wait for ever in a real collective


def _die_on_rank_1() -> None:
    if get_context().get_rank() == 1:
        os._exit(3)
    time.sleep(60)


@pytest.mark.parametrize(
    ("train_func", "pattern"),
    [(_raise_on_rank_1, r"rank 1 .*ValueError: boom from the user's code"),
     (_die_on_rank_1, r"rank 1 .*died")],
    ids=["raises", "dies"],
)
def test_a_failing_worker_stops_the_run_quickly(train_func, pattern, tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(WorkerError, match=pattern) as info:
        PyTorchDistributor(train_func, TWO_WORKERS).run(artifact_stage_location=str(tmp_path))
    assert time.monotonic() - start < 30
    assert info.value.rank == 1
    if "raises" in pattern or "boom" in pattern:
        assert "Remote traceback" in str(info.value)
    assert list((tmp_path / "model").iterdir()) == []  # nothing published, nothing partial
    assert_no_reservations()


def test_unwritable_stage_fails_before_any_work(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    calls = tmp_path / "calls"

    def train_func() -> None:
        calls.touch()

    with pytest.raises(StageError, match="cannot be written"):
        PyTorchDistributor(train_func, TWO_WORKERS).run(
            artifact_stage_location=str(blocker / "stage")
        )
    assert not calls.exists()
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        (PyTorchScalingConfig(num_nodes=1, num_workers_per_node=1,
                              resource_requirements_per_worker=WorkerResourceConfig(
                                  num_cpus=0, num_gpus=4)), "no GPUs"),
        (PyTorchScalingConfig(num_nodes=3, num_workers_per_node=1), "3 distinct nodes"),
        (PyTorchScalingConfig(num_nodes=1, num_workers_per_node=9), "CPUs needed"),
    ],
    ids=["gpus", "nodes", "cpus"],
)
def test_asking_for_what_the_cluster_lacks_is_bounded_and_clear(config, pattern) -> None:
    start = time.monotonic()
    with pytest.raises(ResourcesUnavailableError, match=pattern) as info:
        PyTorchDistributor(lambda: None, config).run()
    assert time.monotonic() - start < 15
    assert "The cluster has 1 node" in str(info.value)
    # -1 is not a value PyTorchScalingConfig takes: the advice names what it does take.
    assert "-1" not in str(info.value)
    assert "num_workers_per_node" in str(info.value) and "scaling_config=None" in str(info.value)
    assert_no_reservations()


def test_invalid_configs_are_rejected_when_built() -> None:
    with pytest.raises(ConfigError, match="num_nodes"):
        PyTorchScalingConfig(num_nodes=0, num_workers_per_node=1)
    with pytest.raises(ConfigError, match="num_cpus"):
        WorkerResourceConfig(num_cpus=-1)
    with pytest.raises(ConfigError, match="train_func"):
        PyTorchDistributor("not callable")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="dataset_map"):
        PyTorchDistributor(lambda: None).run(dataset_map={"train": [1, 2, 3]})


@pytest.mark.gpu
def test_gpu_workers_use_nccl_and_their_own_device(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    config = PyTorchScalingConfig(
        num_nodes=1, num_workers_per_node=1,
        resource_requirements_per_worker=WorkerResourceConfig(num_cpus=1, num_gpus=1),
    )

    def train_func() -> None:
        import torch.distributed as dist

        ctx = get_context()
        assert ctx.get_default_backend() == "nccl"
        device = torch.device(f"cuda:{ctx.get_local_rank()}")
        value = torch.ones(1, device=device)
        dist.all_reduce(value)
        ctx.get_metrics_reporter().log_metrics({"sum": value.item()})

    result = PyTorchDistributor(train_func, config).run(artifact_stage_location=str(tmp_path))
    assert result.get_metrics()["sum"] == 1.0


def test_dataloader_processes_inside_a_worker_split_the_shard(tmp_path: Path) -> None:
    frame = make_frame(3_001, seed=9)

    def train_func() -> None:
        from torch.utils.data import DataLoader

        ctx = get_context()
        shard = ctx.get_dataset_map()["train"].get_shard()
        dataset = shard.to_torch_dataset(batch_size=100, drop_last_batch=False)
        ids = np.concatenate(
            [b["id"].numpy() for b in DataLoader(dataset, batch_size=None, num_workers=2)]
        )
        expected = shard.to_arrow(columns=["id"])["id"].to_numpy()
        assert len(ids) == len(expected), (len(ids), len(expected))
        assert np.array_equal(np.sort(ids), np.sort(expected))
        ctx.get_metrics_reporter().log_metrics({"rows": len(ids)})

    result = PyTorchDistributor(train_func, TWO_WORKERS).run(
        dataset_map={"train": ShardedDataConnector.from_dataframe(frame)},
        artifact_stage_location=str(tmp_path),
    )
    assert result.get_metrics()["rows"] in (1500, 1501)
