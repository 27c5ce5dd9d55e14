"""GBDT workers pin themselves to CPUs of their own while they train, where their group
takes every CPU of the node (how much faster that is lives in benchmarks/gbdt.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from conftest import RAY_CPUS, make_frame
from neve._internal.runtime import cpus
from neve.lightgbm import LightGBMEstimator, LightGBMScalingConfig
from neve.xgboost import XGBEstimator, XGBScalingConfig

ALLOWED = cpus.allowed_cpus()
pytestmark = pytest.mark.skipif(len(ALLOWED) < 2 or not os.path.isdir("/proc/self/task"),
                                reason="pinning needs Linux and 2 CPUs or more")
INPUTS = ["f0", "f1", "f2", "f3"]


def thread_cpus() -> dict[int, set[int]]:
    """The CPUs each thread of this process may run on."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            out[int(tid)] = os.sched_getaffinity(int(tid))
        except OSError:  # a thread that ended meanwhile
            continue
    return out


def test_pinned_takes_every_thread_to_one_cpu_and_gives_them_back() -> None:
    started = threading.Event()
    stop = threading.Event()
    helper = threading.Thread(target=lambda: (started.set(), stop.wait()))
    helper.start()  # a thread that exists before the pin (as Ray's do in a worker)
    started.wait()
    try:
        with cpus.pinned(1, len(ALLOWED)) as pin:
            assert len(pin) == 1 and pin[0] in ALLOWED
            during = thread_cpus()
        after = thread_cpus()
    finally:
        stop.set()
        helper.join()
    assert helper.native_id in during
    assert all(cpu_set == set(pin) for cpu_set in during.values()), during
    assert all(cpu_set == set(ALLOWED) for cpu_set in after.values()), after


def test_no_pin_where_the_group_leaves_cpus_of_the_node_free() -> None:
    with cpus.pinned(1, len(ALLOWED) - 1) as pin:
        assert pin == ()
        assert os.sched_getaffinity(0) == set(ALLOWED)
    with cpus.pinned(0, len(ALLOWED)) as pin:  # a worker of a fraction of a CPU
        assert pin == ()
    with cpus.pinned(len(ALLOWED), 1) as pin:  # one worker of every CPU: nothing to pin
        assert pin == ()


def test_lock_files_that_cannot_be_made_leave_the_worker_unpinned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(not_a_folder))
    with cpus.pinned(1, len(ALLOWED)) as pin:
        assert pin == ()
        assert os.sched_getaffinity(0) == set(ALLOWED)


HOLDER = """
import sys, time
from neve._internal.runtime import cpus
with cpus.pinned(1, len(cpus.allowed_cpus())) as pin:
    print(pin[0] if pin else -1, flush=True)
    time.sleep(120)
"""


def test_workers_on_one_machine_claim_different_cpus_until_none_is_left() -> None:
    holders = []
    try:
        held = []
        for _ in range(len(ALLOWED) - 1):  # every CPU but one, held by other processes
            holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE,
                                      text=True)
            holders.append(holder)
            assert holder.stdout is not None
            held.append(int(holder.stdout.readline()))
        assert -1 not in held and len(set(held)) == len(held)
        with cpus.pinned(1, len(ALLOWED)) as mine:
            assert mine and mine[0] not in held
            with cpus.pinned(1, len(ALLOWED)) as none_left:
                assert none_left == ()
        # A holder that dies (SIGKILL: no clean-up of its own) leaves its CPU free; the
        # others' stay held.
        holders[0].kill()
        holders[0].wait()
        with cpus.pinned(1, len(ALLOWED)) as one, cpus.pinned(1, len(ALLOWED)) as two:
            assert {*one, *two} == {mine[0], held[0]}
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()


# -- real fits ---------------------------------------------------------------------------------


def _xgb_recorder(folder: str) -> Any:
    import xgboost as xgb

    class Record(xgb.callback.TrainingCallback):  # defined here: pickled by value
        def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
            if epoch == 0:
                _record(folder)
            return False

    return Record()


def _lgb_recorder(folder: str) -> Any:
    def record(env: Any) -> None:
        if env.iteration == 0:
            _record(folder)

    return record


def _record(folder: str) -> None:
    """In a worker, mid-fit: the CPUs each of its threads may run on."""
    from neve._internal.context import current

    ctx = current()
    assert ctx is not None
    sets = [sorted(cpu_set) for cpu_set in thread_cpus().values()]
    Path(folder, f"rank{ctx.rank}.json").write_text(json.dumps(sets))


def _seen(folder: Path, ranks: int) -> list[list[list[int]]]:
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(ranks)]


def _fit(framework: str, workers: int, cpus_each: int, folder: Path) -> None:
    frame = make_frame(3_000, seed=4)
    if framework == "xgboost":
        XGBEstimator(n_estimators=3, callbacks=[_xgb_recorder(str(folder))],
                     scaling_config=XGBScalingConfig(num_workers=workers,
                                                     num_cpu_per_worker=cpus_each),
                     ).fit(frame, INPUTS, "y")
    else:
        LightGBMEstimator(n_estimators=3, callbacks=[_lgb_recorder(str(folder))],
                          scaling_config=LightGBMScalingConfig(num_workers=workers,
                                                               num_cpu_per_worker=cpus_each),
                          ).fit(frame, INPUTS, "y")


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("framework", ["xgboost", "lightgbm"])
def test_a_group_that_takes_every_cpu_trains_pinned_one_cpu_per_worker(
    framework: str, tmp_path: Path, groups: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    workers = len(ALLOWED)  # one worker per CPU of this machine (the test's Ray has more)
    if workers > RAY_CPUS:
        pytest.skip(f"{workers} CPUs here: more workers than the test session's Ray holds")
    _fit(framework, workers, 1, tmp_path)
    seen = _seen(tmp_path, workers)
    pins = [threads[0] for threads in seen]
    for threads in seen:
        assert len(threads[0]) == 1 and all(t == threads[0] for t in threads), seen
    assert sorted(cpu for (cpu,) in pins) == sorted(ALLOWED)
    # After the fit the warm workers run anywhere again (and hold no claim).
    import psutil

    for worker in groups[-1].workers:
        assert set(psutil.Process(worker.pid).cpu_affinity()) == set(ALLOWED)

    monkeypatch.setenv("NEVE_PIN_WORKERS", "0")
    _fit(framework, workers, 1, tmp_path)
    assert all(threads == [sorted(ALLOWED)] * len(threads)
               for threads in _seen(tmp_path, workers))


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(120)
def test_a_group_that_leaves_cpus_free_trains_unpinned(tmp_path: Path) -> None:
    _fit("xgboost", len(ALLOWED) - 1, 1, tmp_path)
    for threads in _seen(tmp_path, len(ALLOWED) - 1):
        assert all(t == sorted(ALLOWED) for t in threads)
