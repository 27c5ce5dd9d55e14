"""What the estimators say when something is wrong, and that nothing stays reserved after."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from conftest import RAY_CPUS, make_frame
from neve.data import DataConnector
from neve.exceptions import (
    ColumnNotFoundError,
    ColumnTypeError,
    ConfigError,
    EmptyDatasetError,
    NullLabelError,
    ResourcesUnavailableError,
    WorkerError,
)
from neve.lightgbm import LightGBMEstimator, LightGBMScalingConfig
from neve.xgboost import XGBEstimator, XGBScalingConfig

# Every test here ends with 0 CPUs reserved: no actor or placement group left behind.
pytestmark = [pytest.mark.usefixtures("reserved_cpus_after"), pytest.mark.timeout(120)]

INPUTS = ["f0", "f1", "f2", "f3"]
TWO_XGB = XGBScalingConfig(num_workers=2, num_cpu_per_worker=1)
TWO_LGB = LightGBMScalingConfig(num_workers=2, num_cpu_per_worker=1)


@pytest.fixture
def spy_acquire(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Records every worker group a fit asks for (to show none was started)."""
    from neve._internal.runtime import group

    calls: list[Any] = []
    real = group.acquire

    def acquire(layout: Any) -> Any:
        calls.append(layout)
        return real(layout)

    monkeypatch.setattr(group, "acquire", acquire)
    return calls


# -- columns and types (checked on the driver, before any worker starts) --------------


@pytest.mark.parametrize(
    ("inputs", "label", "extra", "missing"),
    [
        (["f0", "nope"], "y", {}, "nope"),
        (INPUTS, "target", {}, "target"),
        (INPUTS, "y", {"weight_col": "weights"}, "weights"),
        (INPUTS, "y", {"group_col": "query"}, "query"),
    ],
)
def test_unknown_columns_are_named(
    warehouse: Path, spy_acquire: list[Any], inputs: list[str], label: str,
    extra: dict[str, str], missing: str,
) -> None:
    import duckdb

    session = duckdb.connect(str(warehouse))
    connector = DataConnector.from_dataframe(session.table("TRAINING_DATA"))
    with pytest.raises(ColumnNotFoundError, match=f"'{missing}' not found") as info:
        XGBEstimator(scaling_config=TWO_XGB).fit(connector, inputs, label, **extra)
    assert "'f0'" in str(info.value)  # lists the columns it has
    assert spy_acquire == []


def test_column_names_are_case_sensitive_with_a_hint(warehouse: Path) -> None:
    import duckdb

    session = duckdb.connect(str(warehouse))
    connector = DataConnector.from_dataframe(session.table("TRAINING_DATA"))
    with pytest.raises(ColumnNotFoundError, match="'F0' -> 'f0'"):
        LightGBMEstimator(scaling_config=TWO_LGB).fit(connector, ["F0", "f1"], "y")


def test_a_column_missing_from_the_eval_set_only(spy_acquire: list[Any]) -> None:
    train = make_frame(500)
    evaluation = make_frame(100).drop(columns=["f2"])
    with pytest.raises(ColumnNotFoundError, match="'f2' not found in the eval set"):
        XGBEstimator(scaling_config=TWO_XGB).fit(train, INPUTS, "y", eval_set=evaluation)
    assert spy_acquire == []


@pytest.mark.parametrize(
    ("column", "values"),
    [
        ("blob", pa.array([b"\x00\x01", b"\x02"] * 50, pa.binary())),
        ("tags", pa.array([[1.0, 2.0], [3.0]] * 50, pa.list_(pa.float64()))),
        ("meta", pa.array([{"a": 1}, {"a": 2}] * 50, pa.struct([("a", pa.int64())]))),
    ],
)
def test_a_feature_that_is_not_a_number_or_category(
    spy_acquire: list[Any], column: str, values: pa.Array
) -> None:
    table = pa.table({"x": np.arange(100, dtype=np.float64), column: values,
                      "y": np.ones(100)})
    for estimator in (XGBEstimator(scaling_config=TWO_XGB),
                      LightGBMEstimator(scaling_config=TWO_LGB)):
        with pytest.raises(ColumnTypeError, match=f"feature column '{column}' has type"):
            estimator.fit(DataConnector.from_dataframe(table), ["x", column], "y")
    assert spy_acquire == []


def test_a_label_that_is_not_a_number() -> None:
    table = pa.table({"x": np.arange(100.0), "y": pa.array(["yes", "no"] * 50)})
    with pytest.raises(ColumnTypeError, match="column 'y' has type string") as info:
        XGBEstimator(scaling_config=TWO_XGB).fit(table, ["x"], "y")
    message = str(info.value)
    assert "input_cols" not in message  # the label is not an input: encode it instead
    assert "labels must be numbers: encode the classes in your query" in message
    assert "CASE WHEN y = 'yes' THEN 1 ELSE 0 END" in message


def test_a_misspelled_column_gets_did_you_mean(spy_acquire: list[Any]) -> None:
    with pytest.raises(ColumnNotFoundError, match=r"'f00' not found in the .*; did you mean "
                                                  r"'f0'\?"):
        XGBEstimator(scaling_config=TWO_XGB).fit(make_frame(100), ["f00", "f1"], "y")
    assert spy_acquire == []


def test_an_empty_table_is_reported_before_ray_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    import duckdb

    from neve._internal.runtime import cluster

    def no_ray(address: str | None = None) -> None:
        raise AssertionError("Ray was asked to start for an empty table")

    monkeypatch.setattr(cluster, "ensure_ray", no_ray)
    session = duckdb.connect()
    session.execute("CREATE TABLE t (f0 DOUBLE, f1 DOUBLE, f2 DOUBLE, f3 DOUBLE, y DOUBLE)")
    empty = DataConnector.from_dataframe(session.table("t"))
    for estimator in (XGBEstimator(scaling_config=TWO_XGB),
                      LightGBMEstimator(scaling_config=TWO_LGB)):
        with pytest.raises(EmptyDatasetError, match=r"^the training data \(DuckDB relation\) "
                                                    "holds no rows"):
            estimator.fit(empty, INPUTS, "y")
    with pytest.raises(EmptyDatasetError, match=r"^the eval set .* holds no rows"):
        XGBEstimator(scaling_config=TWO_XGB).fit(make_frame(100), INPUTS, "y", eval_set=empty)


# -- data that turns out bad on the workers ------------------------------------------


@pytest.mark.parametrize("framework", ["xgboost", "lightgbm"])
def test_null_labels(tmp_path: Path, framework: str) -> None:
    import duckdb

    frame = make_frame(4_000, seed=3)  # noqa: F841 - read by DuckDB's replacement scan
    path = tmp_path / "nulls.duckdb"
    con = duckdb.connect(str(path))
    # NULLs only in the second half: rank 1 finds them while rank 0 waits in the collective.
    con.execute("CREATE TABLE t AS SELECT * REPLACE (CASE WHEN id >= 2000 AND id % 997 = 0 "
                "THEN NULL ELSE y END AS y) FROM frame ORDER BY id")
    con.close()
    session = duckdb.connect(str(path), read_only=True)
    connector = DataConnector.from_dataframe(session.table("t"))
    estimator = (XGBEstimator(n_estimators=5, scaling_config=TWO_XGB) if framework == "xgboost"
                 else LightGBMEstimator(n_estimators=5, scaling_config=TWO_LGB))
    start = time.monotonic()
    with pytest.raises(NullLabelError, match=r"label column 'y' holds 2 NULL") as info:
        estimator.fit(connector, INPUTS, "y")
    assert time.monotonic() - start < 60
    assert str(info.value).startswith("worker rank 1 ")
    assert "in training shard 1 of 2" in str(info.value)
    assert "IS NOT NULL" in str(info.value)  # says how to fix it


def test_an_empty_table(tmp_path: Path, spy_acquire: list[Any]) -> None:
    import duckdb

    session = duckdb.connect()
    session.execute("CREATE TABLE t (f0 DOUBLE, f1 DOUBLE, f2 DOUBLE, f3 DOUBLE, y DOUBLE)")
    empty = DataConnector.from_dataframe(session.table("t"))
    with pytest.raises(EmptyDatasetError, match="holds no rows"):
        XGBEstimator(scaling_config=TWO_XGB).fit(empty, INPUTS, "y")
    with pytest.raises(EmptyDatasetError, match="holds no rows"):
        LightGBMEstimator(scaling_config=TWO_LGB).fit(empty, INPUTS, "y")
    with pytest.raises(EmptyDatasetError, match=r"eval set.*holds no rows"):
        XGBEstimator(scaling_config=TWO_XGB).fit(make_frame(100), INPUTS, "y", eval_set=empty)
    with pytest.raises(EmptyDatasetError, match="cannot be split over 2 workers"):
        XGBEstimator(scaling_config=TWO_XGB).fit(make_frame(1), INPUTS, "y")
    assert spy_acquire == []


# -- resources ------------------------------------------------------------------------


def test_use_gpu_without_gpus_fails_before_anything_starts(spy_acquire: list[Any]) -> None:
    import ray

    assert ray.cluster_resources().get("GPU", 0) == 0
    for estimator in (XGBEstimator(scaling_config=XGBScalingConfig(use_gpu=True)),
                      LightGBMEstimator(scaling_config=LightGBMScalingConfig(use_gpu=True))):
        start = time.monotonic()
        with pytest.raises(ResourcesUnavailableError, match="use_gpu=True but the cluster has "
                           "no GPUs") as info:
            estimator.fit(make_frame(200), INPUTS, "y")
        assert time.monotonic() - start < 5
        assert "use_gpu=None or False" in str(info.value)
    assert spy_acquire == []


@pytest.mark.parametrize(
    ("scaling", "asked"),
    [
        (XGBScalingConfig(num_workers=RAY_CPUS + 1), f"{RAY_CPUS + 1} CPUs needed"),
        (XGBScalingConfig(num_workers=2, num_cpu_per_worker=3), "6 CPUs needed"),
        (XGBScalingConfig(num_workers=1, num_cpu_per_worker=RAY_CPUS + 2),
         f"one worker asks for {RAY_CPUS + 2} CPUs"),
    ],
)
def test_more_than_the_cluster_has_fails_at_once(
    scaling: XGBScalingConfig, asked: str
) -> None:
    start = time.monotonic()
    with pytest.raises(ResourcesUnavailableError) as info:
        XGBEstimator(n_estimators=2, scaling_config=scaling).fit(make_frame(200), INPUTS, "y")
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert asked in message
    assert f"has {RAY_CPUS}" in message  # ... the cluster / the biggest node has 4
    assert f"1 node (127.0.0.1: {RAY_CPUS} CPUs)" in message  # what the cluster has
    assert "fewer workers" in message  # and what to do


def test_lightgbm_more_workers_than_cpus() -> None:
    scaling = LightGBMScalingConfig(num_workers=RAY_CPUS * 2)
    with pytest.raises(ResourcesUnavailableError, match=f"{RAY_CPUS * 2} workers"):
        LightGBMEstimator(scaling_config=scaling).fit(make_frame(200), INPUTS, "y")


def test_num_workers_zero_is_rejected_when_the_config_is_built() -> None:
    with pytest.raises(ConfigError, match="`num_workers` must be -1 \\(auto\\) or >= 1, got 0"):
        XGBScalingConfig(num_workers=0)
    with pytest.raises(ConfigError, match="got -2"):
        LightGBMScalingConfig(num_workers=-2)


# -- workers that fail or die ------------------------------------------------------------


def _xgb_callback(action: str) -> Any:
    """An xgboost callback that, on rank 1 at round 5, kills its process or raises."""
    import xgboost as xgb

    class OnRankOne(xgb.callback.TrainingCallback):  # defined here: pickled by value
        def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
            from neve._internal.context import current

            ctx = current()
            if ctx is not None and ctx.rank == 1 and epoch == 5:
                if action == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError("boom from the user's callback")
            return False

    return OnRankOne()


def _lgb_callback(action: str) -> Any:
    def on_rank_one(env: Any) -> None:
        from neve._internal.context import current

        ctx = current()
        if ctx is not None and ctx.rank == 1 and env.iteration == 5:
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("boom from the user's callback")

    return on_rank_one


def _estimator(framework: str, action: str) -> XGBEstimator | LightGBMEstimator:
    if framework == "xgboost":
        return XGBEstimator(n_estimators=200, scaling_config=TWO_XGB,
                            callbacks=[_xgb_callback(action)])
    return LightGBMEstimator(n_estimators=200, scaling_config=TWO_LGB,
                             callbacks=[_lgb_callback(action)])


@pytest.mark.timeout(90)
@pytest.mark.parametrize("framework", ["xgboost", "lightgbm"])
def test_a_killed_worker_fails_the_fit_naming_its_rank(framework: str) -> None:
    frame = make_frame(2_000, seed=9)
    outcome: dict[str, Any] = {}

    def fit() -> None:  # in a thread, so a hang is a failed assertion, not a stuck suite
        try:
            _estimator(framework, "kill").fit(frame, INPUTS, "y", eval_set=frame)
        except BaseException as exc:
            outcome["error"] = exc

    start = time.monotonic()
    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the fit did not fail within 60 s of a worker's death"
    error = outcome.get("error")
    assert isinstance(error, WorkerError), repr(error)
    assert error.rank == 1, str(error)
    assert "worker rank 1" in str(error) and "died" in str(error)
    assert time.monotonic() - start < 60


def test_an_exception_on_one_worker_reaches_the_driver_with_its_traceback() -> None:
    frame = make_frame(2_000, seed=9)
    with pytest.raises(WorkerError) as info:
        _estimator("xgboost", "raise").fit(frame, INPUTS, "y")
    # Rank 1 raised; rank 0 was waiting for it in a collective and is not blamed.
    assert info.value.rank == 1
    message = str(info.value)
    assert message.startswith("worker rank 1 ")
    assert "RuntimeError: boom from the user's callback" in message
    assert "Remote traceback" in message and "after_iteration" in message


def test_a_tracker_port_taken_before_the_tracker_binds_it_is_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The driver picks the tracker's port; one another process takes first makes the
    tracker's constructor fail, and the next port is tried: the fit goes on."""
    import socket

    import ray

    from neve._internal.gbdt import xgb as backend

    taken = socket.socket()
    taken.bind((ray.util.get_node_ip_address(), 0))
    taken.listen()
    taken_port = taken.getsockname()[1]
    first = [taken_port]
    picked: list[int] = []
    real = backend.hold_port

    def hold_port(host: str = "") -> int:
        picked.append(first.pop() if first else real(host))
        return picked[-1]

    monkeypatch.setattr(backend, "hold_port", hold_port)
    try:
        model = XGBEstimator(n_estimators=3, scaling_config=TWO_XGB).fit(
            make_frame(500), INPUTS, "y")
    finally:
        taken.close()
    assert model.num_boosted_rounds() == 3
    assert picked[0] == taken_port and len(picked) == 2  # the taken port, then a free one


def test_a_collective_that_fails_to_start_releases_the_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from neve._internal.gbdt.xgb import XGBoostBackend

    def broken(self: Any, workers: Any) -> Any:
        raise OSError("the tracker could not bind its port")

    monkeypatch.setattr(XGBoostBackend, "start_collective", broken)
    with pytest.raises(OSError, match="tracker could not bind"):
        XGBEstimator(n_estimators=2, scaling_config=TWO_XGB).fit(make_frame(200), INPUTS, "y")
    # reserved_cpus_after: the workers taken for the fit gave their CPUs back.
