"""The runtime: a private local Ray, placement, the worker group and its warm pool.

Functions sent to workers are built inside the tests (closures), so cloudpickle
ships them by value: this module is not importable in a worker process.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import RAY_CPUS, assert_no_reservations
from neve._internal.context import WorkerContext
from neve._internal.runtime import cluster, group
from neve._internal.runtime.cluster import ClusterView, NodeView
from neve._internal.runtime.placement import Layout
from neve.exceptions import (
    NullLabelError,
    ResourcesUnavailableError,
    WorkerError,
    WorkerStartTimeoutError,
)

TWO = Layout(num_groups=2, workers_per_group=1, cpus_per_worker=1.0)
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def contexts(n: int) -> list[WorkerContext]:
    return [WorkerContext(rank=r, world_size=n) for r in range(n)]


def free_cpus() -> float:
    import ray

    return float(ray.available_resources().get("CPU", 0.0))


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes (for Ray's async cleanup)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def fresh(reserved_cpus_after: None) -> Iterator[None]:
    """No idle warm group left from an earlier test; nothing reserved after this one."""
    group.shutdown_idle()
    assert wait_until(lambda: free_cpus() == RAY_CPUS, 10)
    yield


# -- layouts (no Ray) ----------------------------------------------------------------------


def view(*nodes: tuple[float, float]) -> ClusterView:
    return ClusterView("test", tuple(
        NodeView(f"n{i}", f"10.0.0.{i}", cpus, gpus, i == 0) for i, (cpus, gpus) in enumerate(nodes)
    ))


def test_layout_bundles_and_strategy() -> None:
    spread = Layout(num_groups=3, workers_per_group=1, cpus_per_worker=2.0)
    assert spread.bundles() == [{"CPU": 2.0}] * 3
    assert spread.strategy == "SPREAD"
    assert spread.describe() == "3 workers x (2 CPU)"
    per_node = Layout(num_groups=2, workers_per_group=2, cpus_per_worker=1.0,
                      gpus_per_worker=1.0, distinct_nodes=True)
    assert per_node.bundles() == [{"CPU": 2.0, "GPU": 2.0}] * 2
    assert per_node.strategy == "STRICT_SPREAD"
    assert [per_node.bundle_of(w) for w in range(4)] == [0, 0, 1, 1]
    assert "on 2 distinct nodes (2 per node)" in per_node.describe()
    # A worker that asks for nothing still gets a (tiny) slot: Ray rejects empty bundles.
    assert Layout(num_groups=1, workers_per_group=1, cpus_per_worker=0).bundles() == [
        {"CPU": 0.001}
    ]


def test_infeasible_layouts_say_what_was_asked_and_what_there_is() -> None:
    two_small = view((2, 0), (2, 0))
    Layout(num_groups=2, workers_per_group=1, cpus_per_worker=2,
           distinct_nodes=True).check_feasible(two_small)
    with pytest.raises(ResourcesUnavailableError) as info:
        Layout(num_groups=3, workers_per_group=1, cpus_per_worker=2,
               distinct_nodes=True).check_feasible(two_small)
    message = str(info.value)
    assert "6 CPUs needed, the cluster has 4" in message
    assert "3 distinct nodes" in message and "2 node(s) have it" in message
    assert "2 nodes (10.0.0.0: 2 CPUs, 10.0.0.1: 2 CPUs)" in message
    with pytest.raises(ResourcesUnavailableError, match="one worker asks for 3 CPUs, the "
                       "biggest node has 2"):
        Layout(num_groups=1, workers_per_group=1, cpus_per_worker=3).check_feasible(two_small)
    with pytest.raises(ResourcesUnavailableError, match="the cluster has no GPUs"):
        Layout(num_groups=1, workers_per_group=1, cpus_per_worker=1,
               gpus_per_worker=1).check_feasible(two_small)
    with pytest.raises(ResourcesUnavailableError, match="3 GPUs needed, the cluster has 2"):
        Layout(num_groups=3, workers_per_group=1, cpus_per_worker=1,
               gpus_per_worker=1).check_feasible(view((8, 2)))


def test_worker_error_survives_pickling_with_its_rank() -> None:
    error = pickle.loads(pickle.dumps(WorkerError("worker rank 3 failed", rank=3)))
    assert isinstance(error, WorkerError)
    assert error.rank == 3 and str(error) == "worker rank 3 failed"


# -- the local cluster ------------------------------------------------------------------------


def test_a_private_local_ray_on_loopback(ray_session: None) -> None:
    import psutil
    import ray

    assert cluster.started_here()
    cluster.ensure_ray()  # a second call changes nothing
    found = cluster.view()
    assert len(found.nodes) == 1
    node = found.nodes[0]
    assert node.cpus == RAY_CPUS and node.gpus == 0 and node.is_head
    assert node.address == "127.0.0.1"
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    # Every Ray server this session started listens on loopback only.
    listening = {}
    for process in psutil.Process().children(recursive=True):
        try:
            for conn in process.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    listening[f"{process.name()}:{conn.laddr.port}"] = conn.laddr.ip
        except psutil.Error:  # a worker that exited meanwhile
            continue
    assert any("raylet" in name for name in listening), listening
    assert set(listening.values()) <= LOOPBACK, listening


def test_ray_start_polls_for_its_node_and_leaves_rays_function_as_it_was(
    ray_session: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This session's Ray started through the poll; here it runs against the session's
    GCS, and without Ray's internals as expected it falls back to Ray's own wait."""
    import ray
    from ray._private import services, state

    original = services.get_node
    gcs = ray.get_runtime_context().gcs_address
    node_id = cluster.view().nodes[0].node_id
    looked: list[int] = []
    node_table = state.GlobalState.node_table

    def counted(self: Any) -> Any:
        looked.append(1)
        return node_table(self)

    monkeypatch.setattr(state.GlobalState, "node_table", counted)
    with cluster._node_registration_polled():
        assert services.get_node is not original
        assert services.get_node(gcs, node_id)["node_id"] == node_id
    assert services.get_node is original and looked == [1]

    def broken(self: Any) -> Any:
        raise AttributeError("node_table moved")

    monkeypatch.setattr(state.GlobalState, "node_table", broken)
    with cluster._node_registration_polled():
        assert services.get_node(gcs, node_id)["node_id"] == node_id
    assert services.get_node is original


# -- the worker group -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_group_runs_a_function_on_every_rank_in_order(fresh: None) -> None:
    import ray

    def who(ctx: WorkerContext) -> dict[str, Any]:
        import ray

        from neve._internal.context import current

        assert current() is ctx  # the context is active while the function runs
        return {"rank": ctx.rank, "world": ctx.world_size, "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id()}

    workers = group.WorkerGroup(TWO)
    try:
        assert free_cpus() == RAY_CPUS - 2  # one CPU each, reserved by the placement group
        results = workers.run(who, contexts(2))
        assert [r["rank"] for r in results] == [0, 1]
        assert {r["world"] for r in results} == {2}
        assert [r["pid"] for r in results] == [w.pid for w in workers.workers]
        assert len({r["pid"] for r in results}) == 2 and os.getpid() not in {
            r["pid"] for r in results
        }
        node = ray.get_runtime_context().get_node_id()
        assert [w.node_id for w in workers.workers] == [node, node]
        assert [(w.local_rank, w.local_world_size, w.node_rank) for w in workers.workers] == [
            (0, 2, 0), (1, 2, 0)
        ]
        # The same processes run the next function.
        assert [r["pid"] for r in workers.run(who, contexts(2))] == [r["pid"] for r in results]
    finally:
        workers.shutdown()
    assert not workers.alive
    assert_no_reservations()


@pytest.mark.timeout(60)
def test_progress_events_reach_the_driver_in_order(fresh: None) -> None:
    def chatty(ctx: WorkerContext) -> int:
        from neve._internal.runtime import worker

        if ctx.rank == 0:
            for i in range(300):
                worker.report({"iteration": i})
                if i in (99, 199):  # wait (bounded) until the driver has polled these
                    deadline = time.monotonic() + 20
                    while worker._events and time.monotonic() < deadline:
                        time.sleep(0.01)
        return ctx.rank

    received: list[int] = []
    batches: list[int] = []

    def on_events(events: list[Any]) -> None:
        batches.append(len(events))
        received.extend(e["iteration"] for e in events)

    workers = group.WorkerGroup(TWO)
    try:
        assert workers.run(chatty, contexts(2), on_events=on_events, poll_s=0.05) == [0, 1]
    finally:
        workers.shutdown()
    assert received == list(range(300))  # all of them, once, in order
    assert len(batches) >= 3  # delivered while running, not only at the end


@pytest.mark.timeout(60)
def test_a_raising_worker_stops_the_group_and_names_its_rank(fresh: None) -> None:
    def fail_on_one(ctx: WorkerContext) -> None:
        import threading

        if ctx.rank == 1:
            raise ValueError("rank one cannot go on")
        threading.Event().wait(120)  # rank 0 blocks, as in a collective waiting for a peer

    workers = group.WorkerGroup(TWO)
    pids = [w.pid for w in workers.workers]
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        workers.run(fail_on_one, contexts(2))
    assert time.monotonic() - start < 20  # the blocked rank 0 was not waited for
    error = info.value
    assert error.rank == 1
    message = str(error)
    assert message.startswith(f"worker rank 1 (node 127.0.0.1, pid {pids[1]}) failed: ValueError: "
                              "rank one cannot go on")
    assert "Remote traceback" in message and "fail_on_one" in message
    assert "\x1b[" not in message  # no terminal colours in the message
    assert isinstance(error.remote, ValueError)  # the worker's own exception, kept
    assert error.__cause__ is None  # Ray's copy of the traceback is not printed again
    assert not workers.alive
    assert wait_until(lambda: not any(psutil_alive(p) for p in pids), 15), "workers still alive"


# What a user saw before issue 10: ~59 lines for one exception, the remote traceback twice,
# Ray's frames, and ESC[36m colour codes in a file.
RAY_TRACEBACK = (
    "\x1b[36mray::WorkerActor.run()\x1b[39m (pid=10677, ip=127.0.0.1, actor_id=65ff, "
    "repr=rank 1)\n"
    "           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    "           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File "/site-packages/neve/_internal/runtime/worker.py", line 128, in run\n'
    "    return fn(ctx)\n"
    "           ^^^^^^^\n"
    '  File "/site-packages/neve/pytorch/_worker.py", line 110, in run\n'
    "    train_func()\n"
    '  File "/home/me/train.py", line 11, in train_func\n'
    '    rows = load("/data/x.csv")\n'
    '  File "/home/me/train.py", line 6, in load\n'
    "    return open(path).read()\n"
    "           ^^^^^^^^^^\n"
    "FileNotFoundError: [Errno 2] No such file or directory: '/data/x.csv'"
)


def test_the_remote_traceback_keeps_the_users_frames_only() -> None:
    from neve._internal.runtime.tracebacks import user_traceback

    assert user_traceback(RAY_TRACEBACK) == (
        '  File "/home/me/train.py", line 11, in train_func\n'
        '    rows = load("/data/x.csv")\n'
        '  File "/home/me/train.py", line 6, in load\n'
        "    return open(path).read()\n"
        "FileNotFoundError: [Errno 2] No such file or directory: '/data/x.csv'"
    )
    # An error in neve itself keeps neve's frames: they are the story.
    only_neve = RAY_TRACEBACK.replace("/home/me/train.py", "/site-packages/neve/data/x.py")
    assert "neve/_internal/runtime/worker.py" in user_traceback(only_neve)
    assert "\x1b[" not in user_traceback(only_neve) and "ray::" not in user_traceback(only_neve)


_RAISING_SCRIPT = """
import os
os.environ["NEVE_LOCAL_NUM_CPUS"] = "2"
from neve._internal.context import WorkerContext
from neve._internal.runtime import group
from neve._internal.runtime.placement import Layout

def parse_row(text):
    return int(text)

def train(ctx):
    import threading
    if ctx.rank == 1:
        parse_row("not a number")
    threading.Event().wait(60)

workers = group.WorkerGroup(Layout(num_groups=2, workers_per_group=1, cpus_per_worker=1.0))
workers.run(train, [WorkerContext(rank=r, world_size=2) for r in range(2)])
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_worker_failure_reaches_the_user_once(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(_RAISING_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "NEVE_"))}
    done = subprocess.run([sys.executable, str(script)], capture_output=True,
                          text=True, timeout=110, env=env)
    assert done.returncode == 1
    err = done.stderr
    assert err.count('in parse_row\n    return int(text)') == 1, err  # once, not twice
    assert "ray::" not in err and "ray/_private" not in err, err  # no Ray frames
    assert "\x1b[" not in err, err  # no colour codes in a file
    assert "The above exception was the direct cause" not in err, err
    last = err.strip().splitlines()[-1]
    assert last == "ValueError: invalid literal for int() with base 10: 'not a number'"
    assert re.search(r"^neve\.exceptions\.WorkerError: worker rank 1 \(node 127\.0\.0\.1, pid "
                     r"\d+\) failed: ValueError: invalid literal", err, re.M), err
    assert len(err.splitlines()) <= 25, err  # was 63


def psutil_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.timeout(60)
def test_data_errors_from_a_worker_keep_their_type(fresh: None) -> None:
    def bad_label(ctx: WorkerContext) -> None:
        from neve.exceptions import NullLabelError

        raise NullLabelError("label column 'y' holds 3 NULL value(s)")

    workers = group.WorkerGroup(Layout(num_groups=1, workers_per_group=1, cpus_per_worker=1))
    with pytest.raises(NullLabelError, match=r"^worker rank 0 \(node .*\): label column 'y'"):
        workers.run(bad_label, contexts(1))


@pytest.mark.timeout(60)
def test_a_killed_worker_fails_the_run_naming_its_rank(fresh: None) -> None:
    def die_on_one(ctx: WorkerContext) -> None:
        import threading

        if ctx.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        threading.Event().wait(120)

    workers = group.WorkerGroup(TWO)
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        workers.run(die_on_one, contexts(2))
    assert time.monotonic() - start < 30
    assert info.value.rank == 1
    assert "worker rank 1" in str(info.value) and "died" in str(info.value)
    assert "Every worker was stopped" in str(info.value)


@pytest.mark.timeout(60)
def test_placement_that_cannot_be_met_fails_in_bounded_time(
    fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from neve.xgboost import XGBEstimator, XGBScalingConfig

    monkeypatch.setenv("NEVE_PLACEMENT_TIMEOUT_S", "1")
    held = placement_group([{"CPU": RAY_CPUS - 1}])  # someone else holds all CPUs but one
    ray.get(held.ready(), timeout=10)
    try:
        start = time.monotonic()
        with pytest.raises(ResourcesUnavailableError) as info:
            group.WorkerGroup(TWO)
        assert time.monotonic() - start < 10
        message = str(info.value)
        assert "could not place 2 workers x (1 CPU) within 1 s" in message
        assert "NEVE_PLACEMENT_TIMEOUT_S=1" in message
        assert f"It has 1 node (127.0.0.1: {RAY_CPUS} CPUs); free now: 1 CPUs" in message
        # The same through an estimator: asked 2 workers, the cluster has 1 CPU free.
        from conftest import make_frame

        with pytest.raises(ResourcesUnavailableError, match="could not place 2 workers"):
            XGBEstimator(scaling_config=XGBScalingConfig(num_workers=2, num_cpu_per_worker=1)
                         ).fit(make_frame(100), ["f0"], "y")
        assert free_cpus() == 1  # the failed attempts left nothing reserved
    finally:
        remove_placement_group(held)


@pytest.mark.timeout(60)
def test_workers_that_do_not_start_in_time(
    fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEVE_WORKER_START_TIMEOUT_S", "0.001")
    with pytest.raises(WorkerStartTimeoutError) as info:
        group.WorkerGroup(TWO)
    message = str(info.value)
    assert "did not start within 0.001 s (NEVE_WORKER_START_TIMEOUT_S=0.001)" in message
    assert "Likely causes" in message


# -- imports ahead of a run ------------------------------------------------------------------------

_PRELOAD = """
import sys
from neve._internal.gbdt.runner import LEFT_OUT
from neve._internal.runtime.worker import preload

preload("xgboost", LEFT_OUT)
preload("lightgbm", LEFT_OUT)
for name in ("sklearn", "pandas"):
    assert name not in sys.modules, f"a framework's import pulled in {name}"
import numpy as np
import lightgbm
import xgboost

booster = xgboost.train({"nthread": 1}, xgboost.DMatrix(np.eye(8), label=np.arange(8.0)), 2)
assert booster.num_boosted_rounds() == 2
x = np.random.default_rng(0).normal(size=(200, 3))
model = lightgbm.train({"num_threads": 1, "verbosity": -1, "min_data_in_leaf": 5},
                       lightgbm.Dataset(x, label=x[:, 0]), 2)
assert model.num_trees() == 2
import pyarrow as pa
from neve._internal.data.convert import numeric_array

# A float column becomes the matrix's column without Arrow's conversion, which would
# import pandas (0.15 s in every fresh worker).
values = pa.py_buffer(np.arange(6, dtype=np.float32).tobytes())
column = pa.Array.from_buffers(pa.float32(), 6, [None, values]).slice(2)
assert numeric_array(column).tolist() == [2.0, 3.0, 4.0, 5.0]
assert "pandas" not in sys.modules, "reading a float column pulled in pandas"
import pandas  # imported later, by a user's callback say: as usual
import sklearn.base

assert len(pandas.DataFrame(x)) == 200

assert "xml.dom.minicompat" not in sys.modules
preload("xml.dom.minidom", ("xml.dom.minicompat",))  # a module that needs one: with it
assert "xml.dom.minidom" in sys.modules and "xml.dom.minicompat" in sys.modules
preload("no_such_module_here")  # the run that needs it says what is missing
print("ok")
"""


def test_workers_import_a_framework_without_its_scikit_learn_wrapper() -> None:
    """What a worker imports ahead of a run leaves scikit-learn and pandas out (0.7 s per
    process that no fit uses), and the frameworks still train; in a fresh interpreter,
    as a worker process is."""
    done = subprocess.run([sys.executable, "-c", _PRELOAD], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_the_modules_workers_import_ahead_exist() -> None:
    """A misspelt name would only cost time (its import error is left to the run)."""
    import importlib

    from neve.lightgbm import LightGBMEstimator
    from neve.pytorch._distributor import WORKER_MODULES
    from neve.xgboost import XGBEstimator

    for estimator in (XGBEstimator(), LightGBMEstimator()):
        assert type(estimator._backend()).__module__ == estimator._backend_module
    for module in WORKER_MODULES:
        importlib.import_module(module)


# -- the warm pool ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_the_pool_reuses_an_idle_group_of_the_same_layout(fresh: None) -> None:
    first = group.acquire(TWO)
    pids = [w.pid for w in first.workers]
    group.release(first)
    assert free_cpus() == RAY_CPUS - 2  # warm: still holding its CPUs
    again = group.acquire(TWO)
    assert again is first and [w.pid for w in again.workers] == pids
    group.release(again)

    # Another layout: the idle group gives its CPUs back first (it would block placement).
    one = Layout(num_groups=1, workers_per_group=1, cpus_per_worker=RAY_CPUS)
    big = group.acquire(one)
    try:
        assert not first.alive
        assert big.workers[0].pid not in pids
    finally:
        big.shutdown()


@pytest.mark.timeout(60)
def test_a_dead_idle_group_is_replaced(fresh: None) -> None:
    first = group.acquire(TWO)
    pids = [w.pid for w in first.workers]
    group.release(first)
    os.kill(pids[1], signal.SIGKILL)  # a warm worker dies while idle
    assert wait_until(lambda: not psutil_alive(pids[1]), 10)
    second = group.acquire(TWO)
    try:
        assert second is not first and not first.alive
        assert not set(pids) & {w.pid for w in second.workers}
        assert second.run(lambda ctx: ctx.rank, contexts(2)) == [0, 1]
    finally:
        second.shutdown()


@pytest.mark.timeout(60)
def test_an_idle_group_gives_its_cpus_back_after_the_idle_timeout(
    fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEVE_WORKER_IDLE_TIMEOUT_S", "1")
    workers = group.acquire(TWO)
    group.release(workers)
    released_at = time.monotonic()
    assert workers.alive and free_cpus() == RAY_CPUS - 2
    assert wait_until(lambda: free_cpus() == RAY_CPUS, 20), "the idle group kept its CPUs"
    assert time.monotonic() - released_at >= 0.9  # not before the timeout
    assert not workers.alive


@pytest.mark.timeout(60)
def test_idle_timeout_zero_means_no_pool(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEVE_WORKER_IDLE_TIMEOUT_S", "0")
    workers = group.acquire(TWO)
    group.release(workers)
    assert not workers.alive
    assert wait_until(lambda: free_cpus() == RAY_CPUS, 10)


@pytest.mark.timeout(60)
def test_on_a_cluster_neve_joined_nothing_stays_warm_unless_asked(
    fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster, "_started_here", False)  # as after joining RAY_ADDRESS
    monkeypatch.delenv("NEVE_WORKER_IDLE_TIMEOUT_S")
    workers = group.acquire(TWO)
    group.release(workers)
    assert not workers.alive  # others on a shared cluster get the CPUs back at once
    assert wait_until(lambda: free_cpus() == RAY_CPUS, 10)
    monkeypatch.setenv("NEVE_WORKER_IDLE_TIMEOUT_S", "30")  # asked for: kept warm
    workers = group.acquire(TWO)
    group.release(workers)
    assert workers.alive
    group.shutdown_idle()


def idle_ray_processes() -> set[int]:
    """Ray worker processes of this machine that wait for work (their title: ray::IDLE)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if handle.read().startswith(b"ray::IDLE"):
                        found.add(int(entry))
            except OSError:  # gone meanwhile
                pass
    return found


@pytest.mark.timeout(60)
def test_a_group_given_back_leaves_processes_the_next_group_starts_in(
    fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEVE_PRESTART", "1")
    # Given back without asking: Ray starts nothing.
    group.release(group.acquire(TWO))
    before = idle_ray_processes()
    group.shutdown_idle()
    time.sleep(2.0)
    assert not idle_ray_processes() - before

    # Given back as the idle timeout does: one plain process per worker, then the next
    # group's actors start in processes that were up before it asked.
    group.release(group.acquire(TWO))
    before = idle_ray_processes()
    group.shutdown_idle(keep_processes_ready=True)
    assert wait_until(lambda: len(idle_ray_processes() - before) == 2, 20)
    ready = idle_ray_processes()
    workers = group.acquire(TWO)
    try:
        assert {w.pid for w in workers.workers} <= ready
        assert workers.run(lambda ctx: ctx.rank, contexts(2)) == [0, 1]
    finally:
        workers.shutdown()


_FIRST_GROUP_SCRIPT = """
import time
from neve._internal.runtime import cluster, group
from neve._internal.runtime.placement import Layout
from test_runtime import idle_ray_processes, wait_until

cluster.ensure_ray()
assert wait_until(lambda: len(idle_ray_processes()) >= 2, 30), idle_ray_processes()
time.sleep(2.0)  # idle past Ray's own limit of 1 s
started_with = idle_ray_processes()
workers = group.WorkerGroup(Layout(num_groups=2, workers_per_group=1, cpus_per_worker=1.0))
print("STARTED WITH", sorted(started_with), "GROUP", sorted(w.pid for w in workers.workers))
assert {w.pid for w in workers.workers} <= started_with
workers.shutdown()
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_processes_ray_starts_with_wait_for_the_first_group() -> None:
    """Ray starts a process per CPU with its node, but ends processes idle for 1 s
    wherever more wait than CPUs are free, as when a group's placement group takes the
    CPUs: on neve's Ray they wait, and a fresh script's first group starts in them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["NEVE_LOCAL_NUM_CPUS"] = "2"
    done = subprocess.run([sys.executable, "-c", _FIRST_GROUP_SCRIPT], capture_output=True,
                          text=True, timeout=110, env=env)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


def loaded(pid: int, library: str) -> bool:
    """Whether process ``pid`` has mapped a shared library whose name contains ``library``."""
    try:
        with open(f"/proc/{pid}/maps") as handle:
            return library in handle.read()
    except OSError:  # gone
        return False


def actor_env_vars(ctx: WorkerContext) -> dict[str, str]:
    import ray

    return dict(ray.get_runtime_context().runtime_env.get("env_vars", {}))


@pytest.mark.timeout(90)
def test_processes_kept_ready_import_the_next_groups_modules_before_it_asks(
    fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from neve._internal.runtime.worker import IMPORTS_VARIABLE, Imports

    monkeypatch.setenv("NEVE_PRESTART", "1")
    imports = Imports(("sqlite3",), in_ready_processes=True)  # nothing else loads _sqlite3
    group.prepare(TWO, imports)
    first = group.acquire(TWO)
    assert first.run(actor_env_vars, contexts(2)) == [{}, {}]  # nothing was kept ready
    group.release(first)
    before = idle_ray_processes()
    group.shutdown_idle(keep_processes_ready=True)
    assert wait_until(lambda: len(idle_ray_processes() - before) == 2, 20)
    ready = idle_ray_processes() - before
    # They import the module as they start, before any actor is placed in them ...
    assert wait_until(lambda: all(loaded(pid, "_sqlite3") for pid in ready), 20)
    # ... and the next group of those workers starts in them.
    group.prepare(TWO, imports)
    workers = group.acquire(TWO)
    try:
        assert {w.pid for w in workers.workers} == ready
        for env in workers.run(actor_env_vars, contexts(2)):
            assert IMPORTS_VARIABLE in env
    finally:
        workers.shutdown()
    # Taken: the group after starts without a runtime environment again.
    group.prepare(TWO, imports)
    workers = group.acquire(TWO)
    try:
        assert workers.run(actor_env_vars, contexts(2)) == [{}, {}]
    finally:
        workers.shutdown()


@pytest.mark.timeout(90)
def test_processes_kept_ready_outlast_the_idle_timeout(
    fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The idle timeout gives the group back (its timer, 1 s here); the processes kept
    ready for it still take the next group well after that (READY_PROCESSES_S)."""
    from neve._internal.runtime.worker import Imports

    monkeypatch.setenv("NEVE_PRESTART", "1")
    monkeypatch.setenv("NEVE_WORKER_IDLE_TIMEOUT_S", "1")
    monkeypatch.setattr(group, "READY_PROCESSES_S", 30.0)
    imports = Imports(("sqlite3",), in_ready_processes=True)
    before = idle_ray_processes()
    group.prepare(TWO, imports)
    group.release(group.acquire(TWO))
    assert wait_until(lambda: len(idle_ray_processes() - before) == 2, 20)
    ready = idle_ray_processes() - before
    assert wait_until(lambda: all(loaded(pid, "_sqlite3") for pid in ready), 20)
    time.sleep(2.0)  # the idle timeout, and as long again, are over
    group.prepare(TWO, imports)
    workers = group.acquire(TWO)
    try:
        assert {w.pid for w in workers.workers} == ready
    finally:
        workers.shutdown()


def test_imports_ahead_only_for_workers_that_run_neves_code_alone() -> None:
    from neve._internal.gbdt.runner import worker_imports
    from neve._internal.runtime.worker import IMPORTS_VARIABLE, Imports
    from neve.pytorch._distributor import WORKER_IMPORTS

    assert Imports(("sqlite3",)).runtime_env() is None
    assert WORKER_IMPORTS.runtime_env() is None  # a user's function runs in them
    env = worker_imports("neve._internal.gbdt.xgb").runtime_env()
    assert env is not None
    assert "neve._internal.gbdt.xgb" in env["env_vars"][IMPORTS_VARIABLE]


@pytest.mark.timeout(60)
def test_ctrl_c_while_placing_leaves_nothing_reserved(
    fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(self: Any, view: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(group.WorkerGroup, "_await_placement", interrupted)
    # Many times: also where the interrupt lands while Ray reserves the bundles (Ray
    # 2.60 leaks them when the placement group is removed then, ray-project/ray#64693;
    # here it did within ten tries).
    for _ in range(25):
        with pytest.raises(KeyboardInterrupt):
            group.WorkerGroup(TWO)
        assert_no_reservations()


@pytest.mark.timeout(60)
def test_ctrl_c_during_a_run_stops_every_worker(fresh: None) -> None:
    def busy(ctx: WorkerContext) -> None:
        import threading

        from neve._internal.runtime.worker import report

        report({"iteration": 0})
        threading.Event().wait(120)

    def interrupt(events: list[Any]) -> None:
        raise KeyboardInterrupt  # what Ctrl-C does to the driver while it polls

    workers = group.WorkerGroup(TWO)
    pids = [w.pid for w in workers.workers]
    with pytest.raises(KeyboardInterrupt):
        workers.run(busy, contexts(2), on_events=interrupt, poll_s=0.05)
    assert not workers.alive
    assert wait_until(lambda: not any(psutil_alive(p) for p in pids), 15), "workers still alive"
    assert_no_reservations()
