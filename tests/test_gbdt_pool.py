"""Warm workers: the next fit of the same shape reuses the processes of the last one."""

from __future__ import annotations

import time
from typing import Any

import pytest

from conftest import RAY_CPUS, make_frame
from neve._internal.runtime import group
from neve.lightgbm import LightGBMEstimator, LightGBMScalingConfig
from neve.xgboost import XGBEstimator, XGBScalingConfig

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(120)]

INPUTS = ["f0", "f1", "f2", "f3"]


def free_cpus() -> float:
    import ray

    return float(ray.available_resources().get("CPU", 0.0))


def test_a_second_fit_reuses_the_warm_workers(groups: list[Any]) -> None:
    """The same processes serve the next fit of the same shape (how much faster that is
    lives in benchmarks/gbdt.py, not in a test)."""
    group.shutdown_idle()  # the first fit below starts its workers from scratch
    frame = make_frame(5_000, seed=1)
    scaling = XGBScalingConfig(num_workers=2, num_cpu_per_worker=1)
    for _ in range(2):
        XGBEstimator(n_estimators=10, scaling_config=scaling).fit(frame, INPUTS, "y")

    first, second = groups
    assert second is first
    assert [w.pid for w in second.workers] == [w.pid for w in first.workers]
    # Between fits the group stays warm, holding its CPUs.
    assert first.alive and free_cpus() == RAY_CPUS - 2

    # LightGBM with the same shape runs on the same processes too.
    LightGBMEstimator(
        n_estimators=5, scaling_config=LightGBMScalingConfig(num_workers=2, num_cpu_per_worker=1)
    ).fit(frame, INPUTS, "y")
    assert groups[2] is first
    # (A fit of another shape replacing an idle group: test_runtime's pool tests.)


@pytest.mark.usefixtures("reserved_cpus_after")
def test_an_idle_pool_gives_its_resources_back_after_the_idle_timeout(
    groups: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEVE_WORKER_IDLE_TIMEOUT_S", "1")
    frame = make_frame(2_000, seed=2)
    XGBEstimator(
        n_estimators=3, scaling_config=XGBScalingConfig(num_workers=2, num_cpu_per_worker=1)
    ).fit(frame, INPUTS, "y")
    finished = time.monotonic()
    (workers,) = groups  # warm from the test above when run after it; either way works
    assert workers.alive and free_cpus() == RAY_CPUS - 2  # warm right after the fit

    deadline = finished + 20
    while free_cpus() < RAY_CPUS and time.monotonic() < deadline:
        time.sleep(0.05)  # polling Ray's resource view, not waiting for a fixed time
    assert free_cpus() == RAY_CPUS, "the idle workers kept their CPUs"
    assert time.monotonic() - finished >= 0.9  # not before NEVE_WORKER_IDLE_TIMEOUT_S
    assert not workers.alive


@pytest.mark.usefixtures("reserved_cpus_after")
def test_an_estimator_made_on_a_running_ray_starts_its_workers(
    groups: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made on neve's own Ray, an estimator starts the group its fit will ask for, with
    its framework and neve's side of the fit imported (scikit-learn and pandas left out), in the
    background; the fit then runs on those processes."""
    import sys

    from neve._internal.context import WorkerContext

    group.shutdown_idle()
    monkeypatch.setenv("NEVE_PRESTART", "1")
    scaling = LightGBMScalingConfig(num_workers=2, num_cpu_per_worker=1)
    estimator = LightGBMEstimator(n_estimators=3, scaling_config=scaling)
    group._pool._await_starting()
    (layout,) = group._pool._idle  # started, and waiting warm
    started = group._pool._idle[layout][0]

    def imported(ctx: WorkerContext) -> tuple[bool, bool, bool, bool]:
        # nothing in this function imports them
        return ("lightgbm" in sys.modules, "neve._internal.gbdt.lgbm" in sys.modules,
                "sklearn" in sys.modules, "pandas" in sys.modules)

    assert started.run(imported, [WorkerContext(rank=r, world_size=2) for r in range(2)]) == [
        (True, True, False, False)] * 2
    estimator.fit(make_frame(2_000), INPUTS, "y")
    assert groups == [started]


def test_nothing_starts_on_a_cluster_neve_joined(monkeypatch: pytest.MonkeyPatch) -> None:
    from neve._internal.runtime import cluster

    group.shutdown_idle()
    monkeypatch.setenv("NEVE_PRESTART", "1")
    monkeypatch.delenv("NEVE_WORKER_IDLE_TIMEOUT_S")
    monkeypatch.setattr(cluster, "_started_here", False)
    XGBEstimator(scaling_config=XGBScalingConfig(num_workers=2, num_cpu_per_worker=1))
    assert not group._pool._starting and not group._pool._idle
