"""Spills: rows only the driver can read, written once where the workers read them.

A DuckDB relation goes to an Arrow IPC spill (not Ray's object store); the spill
folder is gone after a normal end, a worker failure and Ctrl-C, and one left by a
crashed process is removed by the next one. A one-shot Arrow stream is never read
whole into memory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from conftest import assert_no_reservations, make_frame
from neve._internal.context import shard_context
from neve._internal.data import spill
from neve._internal.data.fragments import IpcBatchFragment, ObjectRefFragment
from neve.data import DataConnector, ShardedDataConnector
from neve.exceptions import WorkerError

INPUTS = ["f0", "f1", "f2", "f3"]


@pytest.fixture
def spill_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Local spills go under this test's own folder."""
    root = tmp_path / "spills"
    monkeypatch.setattr(spill, "local_root", lambda: str(root))
    return root


def folders(root: Path) -> list[str]:
    return sorted(os.listdir(root)) if root.exists() else []


@pytest.fixture
def table_con() -> Iterator[Any]:
    con = duckdb.connect()
    frame = make_frame(6_000, seed=3)  # noqa: F841 - read by DuckDB's replacement scan
    con.execute("CREATE TABLE t AS SELECT * FROM frame")
    yield con
    con.close()


def test_a_duckdb_relation_is_spilled_as_arrow_ipc(spill_root: Path, table_con: Any,
                                                  ray_session: None) -> None:
    connector = ShardedDataConnector.from_dataframe(table_con.table("t"))
    projected = connector._plan_for_workers(["id", "f0"])
    assert projected.num_rows == 6_000 and projected.schema.names == ["id", "f0"]
    projected.release()
    assert folders(spill_root) == []
    plan = connector._plan_for_workers()
    assert plan.fragments and all(isinstance(f, IpcBatchFragment) for f in plan.fragments)
    assert not any(isinstance(f, ObjectRefFragment) for f in plan.fragments)
    (folder,) = folders(spill_root)
    assert folder.split("-")[1] == str(os.getpid())  # <host>-<pid>-<start>-plan-<id>
    ids = []
    for rank in range(3):
        with shard_context(rank, 3):
            ids += connector.get_shard().to_arrow().column("id").to_pylist()
    assert sorted(ids) == list(range(6_000))
    plan.release()
    assert folders(spill_root) == []


def test_the_spill_goes_when_the_connector_goes(spill_root: Path, table_con: Any) -> None:
    connector = DataConnector.from_dataframe(table_con.table("t"))
    connector._plan_for_workers()
    assert len(folders(spill_root)) == 1
    del connector
    assert folders(spill_root) == []


def test_spill_url_is_used_when_set(spill_root: Path, table_con: Any, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    monkeypatch.setenv("NEVE_SPILL_URL", f"file://{shared}")
    connector = DataConnector.from_dataframe(table_con.table("t"))
    plan = connector._plan_for_workers()
    assert folders(spill_root) == [] and len(folders(shared)) == 1
    assert sum(b.num_rows for f in plan.fragments for b in f.read(["id"])) == 6_000
    plan.release()
    assert folders(shared) == []


def test_a_folder_left_by_a_dead_process_is_removed_by_the_next(spill_root: Path) -> None:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    dead_pid = int(child.stdout)
    host = spill._process_tag().split("-")[0]
    stale = spill_root / f"{host}-{dead_pid}-12345-plan-abc"
    alive = spill_root / f"{spill._process_tag()}-plan-mine"
    other_host = spill_root / f"elsewhere-{dead_pid}-12345-plan-abc"
    for folder in (stale, alive, other_host):
        (folder / "x").mkdir(parents=True)
    spill._cleaned.clear()
    fresh = spill.SpillFolder()
    assert not stale.exists()  # its process is gone
    assert alive.exists() and other_host.exists()  # alive, or not ours to judge
    fresh.release()


def test_spills_are_gone_after_a_fit_and_after_a_failed_fit(
    spill_root: Path, table_con: Any, reserved_cpus_after: None
) -> None:
    from neve.xgboost import XGBEstimator, XGBScalingConfig

    scaling = XGBScalingConfig(num_workers=2, num_cpu_per_worker=1)
    connector = DataConnector.from_dataframe(table_con.table("t"))
    XGBEstimator(n_estimators=3, scaling_config=scaling).fit(connector, INPUTS, "y")
    assert folders(spill_root) == []

    import xgboost as xgb

    class Fail(xgb.callback.TrainingCallback):
        def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
            raise RuntimeError("boom in round 1")

    with pytest.raises(WorkerError, match="boom"):
        XGBEstimator(n_estimators=3, scaling_config=scaling,
                     callbacks=[Fail()]).fit(connector, INPUTS, "y")
    assert folders(spill_root) == []
    assert_no_reservations()


def test_spills_are_gone_after_ctrl_c(tmp_path: Path, warehouse: Path) -> None:
    """A fit interrupted with SIGINT in a fresh process leaves no spill folder."""
    root = tmp_path / "tmp"
    root.mkdir()
    script = textwrap.dedent(f"""
        import os, sys, time
        import duckdb
        import xgboost as xgb
        from neve.data import DataConnector
        from neve.xgboost import XGBEstimator, XGBScalingConfig

        class Slow(xgb.callback.TrainingCallback):
            def after_iteration(self, model, epoch, evals_log):
                if epoch == 0:
                    open({str(tmp_path / "started")!r}, "w").close()
                time.sleep(0.5)
                return False

        con = duckdb.connect({str(warehouse)!r}, read_only=True)
        connector = DataConnector.from_dataframe(con.table("TRAINING_DATA"))
        try:
            XGBEstimator(n_estimators=200, callbacks=[Slow()],
                         scaling_config=XGBScalingConfig(num_workers=2, num_cpu_per_worker=1)
                         ).fit(connector, ["f0", "f1"], "y")
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    """)
    env = {**os.environ, "TMPDIR": str(root), "RAY_TMPDIR": "/tmp", "NEVE_LOCAL_NUM_CPUS": "2",
           "NEVE_WORKER_IDLE_TIMEOUT_S": "0"}
    process = subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "started").exists():
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "the fit never started"
            time.sleep(0.1)
        assert folders(root / spill.FOLDER_PREFIX)  # the spill exists while it trains
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert "interrupted" in output, output
    assert folders(root / spill.FOLDER_PREFIX) == []


def test_an_arrow_stream_is_spilled_as_read_never_read_whole(spill_root: Path) -> None:
    table = pa.table({"id": list(range(50_000)), "x": [0.5] * 50_000})
    taken: list[int] = []

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in table.to_batches(max_chunksize=5_000):
            taken.append(batch.num_rows)
            yield batch

    reader = pa.RecordBatchReader.from_batches(table.schema, batches())
    connector = DataConnector.from_dataframe(reader)
    assert taken == []  # nothing read yet
    assert connector.to_arrow().column("id").to_pylist() == list(range(50_000))
    assert connector.to_pandas(limit=3)["id"].tolist() == [0, 1, 2]  # read again: the spill
    assert sum(taken) == 50_000 and len(folders(spill_root)) == 1
    with shard_context(1, 2):
        sharded = ShardedDataConnector.from_dataframe(
            pa.RecordBatchReader.from_batches(table.schema, table.to_batches(10_000)))
        assert sharded.get_shard().to_arrow().column("id").to_pylist() == list(
            range(25_000, 50_000))
