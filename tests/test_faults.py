"""Faults across trainers: PyTorch restarts from its checkpoints, a dead driver's run
resumes from the stage, big artifacts stream, and nothing stays reserved."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_no_reservations, make_frame
from neve._internal import stages

pytestmark = pytest.mark.timeout(300)

INPUTS = ["f0", "f1", "f2", "f3"]


def _epochs_train_func(marker: Path, kill_at_epoch: int | None):  # type: ignore[no-untyped-def]
    """A train_func that checkpoints every epoch and (once) kills rank 1 at an epoch."""

    def train_func() -> None:
        import json
        import os

        import torch

        from neve.pytorch import get_context

        ctx = get_context()
        folder = ctx.get_checkpoint_dir()
        state = os.path.join(folder, "state.pt")
        if os.path.exists(state):
            saved = torch.load(state)
            start, weights = saved["epoch"] + 1, saved["weights"]
        else:
            start, weights = 0, torch.zeros(4)
        ctx.get_metrics_reporter().log_metrics({"started_at": start})
        for epoch in range(start, 6):
            if ctx.get_rank() == 1 and epoch == kill_at_epoch and not marker.exists():
                marker.touch()
                os._exit(1)
            torch.distributed.barrier()  # rank 0 cannot checkpoint an epoch rank 1 left
            weights = weights + epoch  # the "training"
            torch.save({"epoch": epoch, "weights": weights}, state)
            ctx.save_checkpoint()
        if ctx.get_rank() == 0:
            with open(os.path.join(ctx.get_model_dir(), "model.json"), "w") as handle:
                json.dump({"weights": weights.tolist(), "started_at": start}, handle)

    return train_func


def _two_workers():  # type: ignore[no-untyped-def]
    from neve.pytorch import PyTorchScalingConfig, WorkerResourceConfig

    return PyTorchScalingConfig(num_nodes=1, num_workers_per_node=2,
                                resource_requirements_per_worker=WorkerResourceConfig(num_cpus=1))


@pytest.mark.parametrize("kill_at", [0, 3])
def test_a_pytorch_run_killed_midway_resumes_from_its_last_checkpoint(
    tmp_path: Path, ray_session: None, kill_at: int
) -> None:
    """Rank 1 dies before the first checkpoint (epoch 0: the run starts over) or after
    three (epoch 3: it goes on from there); the default max_failures=1 recovers."""
    from neve.pytorch import PyTorchDistributor

    train_func = _epochs_train_func(tmp_path / "killed", kill_at_epoch=kill_at)
    result = PyTorchDistributor(train_func, _two_workers()).run(
        artifact_stage_location=str(tmp_path / "stage"))
    assert (tmp_path / "killed").exists()
    model = json.loads((Path(result.get_model_dir()) / "model.json").read_text())
    assert model["started_at"] == kill_at  # epochs before it were committed
    assert model["weights"] == [15.0] * 4  # 0 + 1 + ... + 5: nothing lost, nothing twice
    assert [m["started_at"] for m in result.metrics_history] == [0, kill_at]  # rank 0's
    checkpoints = tmp_path / "stage" / "checkpoints" / result.request_id
    assert sorted(os.listdir(checkpoints)) == ["00000005", "00000006"]  # the latest two kept
    assert stages.is_complete(str(checkpoints / "00000006"))
    assert_no_reservations()


def test_a_pytorch_run_without_restarts_fails_with_the_cause(tmp_path: Path,
                                                             ray_session: None) -> None:
    from neve.exceptions import WorkerLostError
    from neve.pytorch import PyTorchDistributor

    train_func = _epochs_train_func(tmp_path / "killed", kill_at_epoch=1)
    with pytest.raises(WorkerLostError, match="rank 1") as info:
        PyTorchDistributor(train_func, _two_workers()).run(
            artifact_stage_location=str(tmp_path / "stage"), max_failures=0)
    assert "max_failures=0" in str(info.value)
    assert not (tmp_path / "stage" / "model").exists() or not os.listdir(
        tmp_path / "stage" / "model")
    assert_no_reservations()


# -- the driver dies ------------------------------------------------------------------------


def _driver(script: str, tmp_path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "NEVE_LOCAL_NUM_CPUS": "2", "NEVE_WORKER_IDLE_TIMEOUT_S": "0",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                          os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=tmp_path)


def _kill_when(process: subprocess.Popen[str], ready: Callable[[], bool],
               timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None:
            raise AssertionError(f"the driver ended early:\n{process.stdout.read()}")
        assert time.monotonic() < deadline, "the driver never got there"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait(30)


GBDT_DRIVER = """
    import sys, time
    import numpy as np
    import xgboost as xgb
    from conftest import make_frame
    from neve.xgboost import XGBEstimator, XGBScalingConfig

    class Slow(xgb.callback.TrainingCallback):
        def after_iteration(self, model, epoch, evals_log):
            time.sleep(0.2)
            return False

    frame = make_frame(4_000, seed=9)
    estimator = XGBEstimator(n_estimators=30, callbacks=[Slow()],
                             scaling_config=XGBScalingConfig(num_workers=2, num_cpu_per_worker=1))
    resume = sys.argv[1] if len(sys.argv) > 1 else None
    estimator.fit(frame, ["f0", "f1", "f2", "f3"], "y", eval_set=frame,
                  checkpoint_stage="stage", resume_from=resume)
    np.save("prediction.npy", estimator.predict(frame))
    np.save("history.npy", estimator.get_eval_results()["eval"]["rmse"])
"""


def test_a_gbdt_fit_whose_driver_died_resumes_from_the_stage(tmp_path: Path,
                                                             ray_session: None) -> None:
    from neve.xgboost import XGBEstimator, XGBScalingConfig

    runs = tmp_path / "stage" / "checkpoints"
    process = _driver(GBDT_DRIVER, tmp_path)

    def two_checkpoints() -> bool:
        return runs.exists() and any(len(os.listdir(r)) >= 2 for r in runs.iterdir())

    _kill_when(process, two_checkpoints)
    (run,) = runs.iterdir()
    done = max(int(c.name) for c in run.iterdir() if stages.is_complete(str(c)))
    assert 0 < done < 30
    script = GBDT_DRIVER.replace("resume = sys.argv[1] if len(sys.argv) > 1 else None",
                                 "resume = 'latest'")
    resumed = _driver(script, tmp_path)
    output, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, output
    plain = XGBEstimator(n_estimators=30, scaling_config=XGBScalingConfig(
        num_workers=2, num_cpu_per_worker=1))
    frame = make_frame(4_000, seed=9)
    plain.fit(frame, INPUTS, "y", eval_set=frame)
    np.testing.assert_allclose(np.load(tmp_path / "history.npy"),
                               plain.get_eval_results()["eval"]["rmse"], rtol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "prediction.npy"), plain.predict(frame),
                               rtol=1e-5)


TORCH_DRIVER = """
    import json, os, sys, time
    import torch
    from neve.pytorch import (PyTorchDistributor, PyTorchScalingConfig, WorkerResourceConfig,
                              get_context)

    def train_func():
        ctx = get_context()
        state = os.path.join(ctx.get_checkpoint_dir(), "state.pt")
        start, total = 0, 0
        if os.path.exists(state):
            saved = torch.load(state)
            start, total = saved["epoch"] + 1, saved["total"]
        for epoch in range(start, 8):
            total += epoch
            time.sleep(0.3)
            torch.save({"epoch": epoch, "total": total}, state)
            ctx.save_checkpoint()
        if ctx.get_rank() == 0:
            with open(os.path.join(ctx.get_model_dir(), "model.json"), "w") as handle:
                json.dump({"total": total, "started_at": start}, handle)

    scaling = PyTorchScalingConfig(num_nodes=1, num_workers_per_node=2,
                                   resource_requirements_per_worker=WorkerResourceConfig(num_cpus=1))
    resume = sys.argv[1] if len(sys.argv) > 1 else None
    result = PyTorchDistributor(train_func, scaling).run(artifact_stage_location="stage",
                                                         resume_from=resume)
    print("MODEL", result.get_model_dir(), result.request_id)
"""


def test_a_pytorch_run_whose_driver_died_resumes_from_the_stage(tmp_path: Path,
                                                                ray_session: None) -> None:
    runs = tmp_path / "stage" / "checkpoints"
    process = _driver(TORCH_DRIVER, tmp_path)

    def three_checkpoints() -> bool:
        return runs.exists() and any(stages.is_complete(str(c)) and int(c.name) >= 3
                                     for r in runs.iterdir() for c in r.iterdir()
                                     if c.name.isdigit())

    _kill_when(process, three_checkpoints)
    (run,) = runs.iterdir()
    script = TORCH_DRIVER.replace("resume = sys.argv[1] if len(sys.argv) > 1 else None",
                                  f"resume = {run.name!r}")
    resumed = _driver(script, tmp_path)
    output, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, output
    line = next(x for x in output.splitlines() if x.startswith("MODEL "))
    _, model_dir, request_id = line.split()
    assert request_id == run.name  # the same run, published under its own id
    model = json.loads((Path(model_dir) / "model.json").read_text())
    assert model["total"] == sum(range(8))  # the same result as an uninterrupted run
    assert model["started_at"] >= 3


# -- artifacts ----------------------------------------------------------------------------------


def test_a_big_model_directory_streams_through_the_driver(tmp_path: Path,
                                                          ray_session: None) -> None:
    """512 MB from rank 0 to the stage: the driver's memory grows by far less."""
    import psutil

    from neve.pytorch import PyTorchDistributor

    size = 512 << 20

    def train_func() -> None:
        import os

        from neve.pytorch import get_context

        ctx = get_context()
        if ctx.get_rank() == 0:
            block = os.urandom(1 << 20)
            with open(os.path.join(ctx.get_model_dir(), "weights.bin"), "wb") as handle:
                for _ in range(size >> 20):
                    handle.write(block)

    import threading

    process = psutil.Process()

    def private() -> int:  # Ray's object store is shared memory mapped into the driver
        info = process.memory_info()
        return int(info.rss - info.shared)

    peak = [private()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak.append(private())

    sampler = threading.Thread(target=sample, daemon=True)
    before = private()
    sampler.start()
    try:
        result = PyTorchDistributor(train_func, _two_workers()).run(
            artifact_stage_location=str(tmp_path / "stage"))
    finally:
        stop.set()
        sampler.join()
    assert (Path(result.get_model_dir()) / "weights.bin").stat().st_size == size
    assert max(peak) - before < 128 << 20  # chunks of 8 MiB, never the whole file


def test_a_reader_never_sees_half_a_published_folder(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """On object storage (memory://) the folder is visible whole or not at all: a write
    that fails half-way leaves no manifest, and readers go by the manifest."""
    stage = stages.resolve("memory://neve-test-atomic")
    files = stages.MemoryFiles({f"part-{i}": bytes(1000) for i in range(4)})
    seen: list[bool] = []

    class Failing(stages.MemoryFiles):
        def chunks(self, relative: str):  # type: ignore[no-untyped-def]
            seen.append(stages.is_complete("memory://neve-test-atomic/model/m1"))
            if relative == "part-2":
                raise OSError("connection reset")
            yield from super().chunks(relative)

    with pytest.raises(Exception, match="connection reset"):
        stages.publish(stage, "m1", Failing(files.files))
    assert seen and not any(seen)  # a reader during the write: not complete
    assert not stages.is_complete("memory://neve-test-atomic/model/m1")
    location = stages.publish(stage, "m1", files)  # a retry replaces the half-written one
    assert stages.is_complete(location)
    import fsspec

    fs = fsspec.filesystem("memory")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/neve-test-atomic/model/m1",
                                                        detail=False)) == [
        "_NEVE_COMPLETE", "part-0", "part-1", "part-2", "part-3"]
    fs.rm("/neve-test-atomic", recursive=True)


def test_checkpoints_commit_whole_and_keep_the_latest(tmp_path: Path) -> None:
    store = stages.CheckpointStore(stages.resolve(str(tmp_path)), "run-1")
    assert store.latest() is None
    for seq in (1, 2, 3):
        store.save(seq, stages.MemoryFiles({"model": bytes([seq])}), {"seq": seq})
    latest = store.latest()
    assert latest is not None and latest.seq == 3 and latest.state == {"seq": 3}
    assert latest.files.read("model") == b"\x03"
    assert sorted(os.listdir(tmp_path / "checkpoints" / "run-1")) == ["00000002", "00000003"]
    assert stages.CheckpointStore.resume(stages.resolve(str(tmp_path)), "latest").request_id \
        == "run-1"
    with pytest.raises(Exception, match="no complete checkpoint of run 'nope'"):
        stages.CheckpointStore.resume(stages.resolve(str(tmp_path)), "nope")
