"""One warning, on the driver, for each silent surprise (issue 10, item 4).

Each test reproduces what a user met: NULLs that came out of ``to_torch_dataset`` as
NaN, rows that ``equal=True`` dropped with only a log line inside a worker, a
LightGBM parameter typo ignored in silence (and xgboost's warned once per rank), a
free-text column that became a categorical feature.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xgboost as xgb

from neve.data import DataConnector, ShardedDataConnector
from neve.exceptions import (
    HighCardinalityWarning,
    NeveWarning,
    NullsAsNaNWarning,
    ParameterWarning,
    RowsDroppedWarning,
)

ROWS = 1_003


def _neve_warnings(record: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in record if issubclass(w.category, NeveWarning)]


@pytest.fixture
def with_nulls(tmp_path: Path) -> duckdb.DuckDBPyConnection:
    """An INTEGER column with NULLs (the user's case), a DOUBLE with NULLs, one without."""
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    con.execute(f"""CREATE TABLE t AS SELECT
        CASE WHEN range % 10 = 0 THEN NULL ELSE range END::INTEGER AS clicks,
        CASE WHEN range % 100 = 0 THEN NULL ELSE range * 0.5 END::DOUBLE AS spend,
        range::BIGINT AS id, 'row ' || range AS note
        FROM range({ROWS})""")
    return con


# -- NULLs that come out of to_torch_dataset as NaN -------------------------------------------


def test_nulls_as_nan_are_named_once_on_the_driver(with_nulls: duckdb.DuckDBPyConnection) -> None:
    connector = DataConnector.from_dataframe(with_nulls.table("t"))
    with pytest.warns(NullsAsNaNWarning) as record:
        dataset = connector.to_torch_dataset(batch_size=100)
    batch = next(iter(dataset))
    assert str(batch["clicks"].dtype) == "torch.float64"  # what the warning is about
    found = _neve_warnings(record.list)
    assert len(found) == 1
    message = str(found[0].message)
    assert "'clicks' (int32: 101 of 1,003 rows, comes out as float64)" in message
    assert "'spend' (double: 11 of 1,003 rows)" in message
    assert "'id'" not in message and "'note'" not in message
    assert 'COALESCE("clicks", 0)' in message and "NullsAsNaNWarning" in message  # the fixes
    assert found[0].filename == __file__  # points at the user's line

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second dataset of the same connector: no repeat
        connector.to_torch_dataset(batch_size=100)


@pytest.mark.parametrize("kind", ["arrow", "parquet"])
def test_nulls_are_counted_from_the_plan(tmp_path: Path, kind: str) -> None:
    table = pa.table({"x": pa.array([1, None, 3, None], pa.int64()), "y": [0.5, 1.0, 2.0, 3.0]})
    if kind == "parquet":
        pq.write_table(table, tmp_path / "t.parquet", row_group_size=2)
        connector = DataConnector.from_sources(tmp_path / "t.parquet")
    else:
        connector = DataConnector.from_dataframe(table)
    with pytest.warns(NullsAsNaNWarning, match=r"'x' \(int64: 2 of 4 rows, comes out as "
                                               r"float64\)") as record:
        connector.to_torch_dataset()
    assert len(_neve_warnings(record.list)) == 1


def test_a_query_over_adbc_warns_at_the_first_batch_with_nulls(tmp_path: Path) -> None:
    sqlite = pytest.importorskip("adbc_driver_sqlite.dbapi")
    path = tmp_path / "t.sqlite"
    with sqlite.connect(str(path)) as conn:
        cursor = conn.cursor()
        cursor.execute("CREATE TABLE t (a INTEGER, b REAL)")
        cursor.executemany("INSERT INTO t VALUES (?, ?)",
                           [(i if i % 4 else None, i * 0.5) for i in range(40)])
        conn.commit()
    connector = DataConnector.from_sql("SELECT a, b FROM t", session=f"sqlite://{path}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset = connector.to_torch_dataset(batch_size=8)  # the query runs once, later
    with pytest.warns(NullsAsNaNWarning, match=r"'a' \(int64: 10 of the first 40 rows read, "
                                               r"comes out as float64\)") as record:
        rows = sum(len(b["a"]) for b in dataset)
    assert rows == 40 and len(_neve_warnings(record.list)) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sum(len(b["a"]) for b in dataset) == 40  # the next epoch stays quiet


def test_columns_without_nulls_say_nothing() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DataConnector.from_dataframe(pa.table({"x": [1, 2], "s": ["a", None]})).to_torch_dataset()


# -- a distributed run: equal=True and NULLs, said by the driver, once -----------------------


def _train_records_worker_warnings() -> None:
    from neve.pytorch import get_context

    ctx = get_context()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shard = ctx.get_dataset_map()["train"].get_shard()
        rows = sum(len(b["clicks"]) for b in shard.to_torch_dataset(batch_size=100,
                                                                    drop_last_batch=False))
    ctx.get_metrics_reporter().log_metrics({"rows": rows, "warnings": len(caught)})


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(120)
def test_a_distributed_run_warns_on_the_driver_and_the_workers_stay_quiet(
    with_nulls: duckdb.DuckDBPyConnection, tmp_path: Path,
) -> None:
    from neve.pytorch import PyTorchDistributor, PyTorchScalingConfig, WorkerResourceConfig

    connector = ShardedDataConnector.from_dataframe(with_nulls.table("t"), equal=True)
    scaling = PyTorchScalingConfig(num_nodes=1, num_workers_per_node=2,
                                   resource_requirements_per_worker=WorkerResourceConfig(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = PyTorchDistributor(_train_records_worker_warnings, scaling).run(
            dataset_map={"train": connector}, artifact_stage_location=str(tmp_path / "stage"))
    found = _neve_warnings(caught)
    assert sorted(w.category.__name__ for w in found) == ["NullsAsNaNWarning",
                                                          "RowsDroppedWarning"]
    dropped = next(str(w.message) for w in found if w.category is RowsDroppedWarning)
    assert dropped.startswith("equal=True drops 1 of the 1,003 rows of the dataset_map['train'] "
                              "(DuckDB relation) so that each of the 2 workers reads 501 rows")
    assert "equal=False" in dropped
    assert result.get_metrics() == {"rows": 501, "warnings": 0}  # rank 0 said nothing


def test_equal_shards_that_divide_evenly_drop_nothing() -> None:
    from neve.data._connector import check_for_workers

    connector = ShardedDataConnector.from_dataframe(pa.table({"x": [1.0] * 10}), equal=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_for_workers({"train": connector}, 2)


# -- framework parameters ----------------------------------------------------------------------


class CountUnusedParameterWarnings(xgb.callback.TrainingCallback):
    """Counts, on its worker, xgboost's own "Parameters: { ... } are not used" warnings."""

    def before_training(self, model: Any) -> Any:
        self._catcher = warnings.catch_warnings(record=True)
        self._record = self._catcher.__enter__()
        warnings.simplefilter("always")
        return model

    def after_training(self, model: Any) -> Any:
        self._catcher.__exit__(None, None, None)
        unused = [w for w in self._record if "are not used" in str(w.message)]
        model.set_attr(unused_warnings=str(len(unused)))  # travels back with rank 0's model
        return model


def _small_frame(rows: int = 400) -> Any:
    from conftest import make_frame

    return make_frame(rows)


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(120)
def test_a_lightgbm_typo_warns_once_on_the_driver() -> None:
    from neve.lightgbm import LightGBMEstimator, LightGBMScalingConfig

    estimator = LightGBMEstimator(
        n_estimators=3, params={"num_leavs": 7, "learning_rate": 0.3},
        scaling_config=LightGBMScalingConfig(num_workers=2, num_cpu_per_worker=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        estimator.fit(_small_frame(), ["f0", "f1", "f2", "f3"], "y")
    found = _neve_warnings(caught)
    assert [w.category for w in found] == [ParameterWarning]
    assert str(found[0].message).startswith(
        "LightGBM does not know the parameter 'num_leavs' (did you mean 'num_leaves'?) and "
        "ignores it")


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(120)
def test_an_xgboost_typo_warns_once_on_the_driver_not_once_per_rank() -> None:
    from neve.xgboost import XGBEstimator, XGBScalingConfig

    estimator = XGBEstimator(
        n_estimators=3, params={"max_detph": 3}, callbacks=[CountUnusedParameterWarnings()],
        scaling_config=XGBScalingConfig(num_workers=2, num_cpu_per_worker=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        booster = estimator.fit(_small_frame(), ["f0", "f1", "f2", "f3"], "y")
    found = _neve_warnings(caught)
    assert [w.category for w in found] == [ParameterWarning]
    assert str(found[0].message).startswith(
        "xgboost does not know the parameter 'max_detph' (did you mean 'max_depth'?)")
    assert booster.attr("unused_warnings") == "0"  # the workers did not say it again


def test_known_parameters_and_aliases_say_nothing() -> None:
    from neve._internal.gbdt.params import check_lightgbm, check_xgboost

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_lightgbm({"objective": "binary", "num_leaves": 7, "min_data_in_leaf": 3,
                        "eta": 0.1, "verbose": -1, "early_stopping_round": 5})
        params = {"objective": "binary:logistic", "eta": 0.1, "max_depth": 3,
                  "eval_metric": ["auc", "logloss"], "device": "cuda", "nthread": 2}
        assert check_xgboost(params) == params
    with pytest.warns(ParameterWarning):  # what xgboost ignores is not sent to the workers
        assert check_xgboost({"eta": 0.1, "max_detph": 3}) == {"eta": 0.1}


# -- a free-text column that becomes a categorical feature --------------------------------------


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(120)
def test_a_free_text_feature_with_many_values_warns_before_training() -> None:
    from neve.xgboost import XGBEstimator, XGBScalingConfig

    rows = 3_000
    rng = np.random.default_rng(0)
    table = pa.table({
        "x": rng.normal(size=rows),
        "comment": [f"customer wrote note #{i}" for i in range(rows)],  # free text
        "region": rng.choice(["north", "south", "east"], size=rows),  # a real category
        "y": rng.normal(size=rows),
    })
    estimator = XGBEstimator(n_estimators=2,
                             scaling_config=XGBScalingConfig(num_workers=1, num_cpu_per_worker=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        estimator.fit(table, ["x", "comment", "region"], "y")
    found = _neve_warnings(caught)
    assert [w.category for w in found] == [HighCardinalityWarning]
    message = str(found[0].message)
    assert message.startswith("string feature 'comment' (3,000 distinct values) of the "
                              "training data (Arrow table) becomes categorical with more than "
                              "1,000 categories")
    assert "Drop 'comment' from input_cols, or cast it" in message
    assert "'region'" not in message
