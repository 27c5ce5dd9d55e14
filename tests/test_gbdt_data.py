"""How GBDT fits read their data at scale: categories where the rows live, ranking
groups kept whole, external memory, and shards that hold no rows."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_frame
from neve._internal.data.fragments import Plan, TableFragment
from neve._internal.data.plans import plan_for_workers
from neve._internal.data.sources import ArrowSource
from neve._internal.gbdt import features
from neve.data import DataConnector
from neve.exceptions import ColumnTypeError, ConfigError

INPUTS = ["f0", "f1", "f2", "f3"]


def _with_city(rows: int, seed: int = 0) -> pd.DataFrame:
    frame = make_frame(rows, seed=seed)
    frame["city"] = np.array(["oslo", "rome", "lima", None], dtype=object)[frame["id"] % 4]
    return frame


def _no_streaming(monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
    def refuse(self: Any, columns: Any) -> Any:
        raise AssertionError(f"the driver streamed {self.description}")

    monkeypatch.setattr(cls, "stream", refuse)


def test_categories_come_from_select_distinct_in_the_database(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from neve._internal.data.sql import DuckDBSource

    con = duckdb.connect()
    frame = _with_city(3_000)  # noqa: F841 - read by DuckDB's replacement scan
    con.execute("CREATE TABLE t AS SELECT * FROM frame")
    connector = DataConnector.from_dataframe(con.table("t"))
    spec = features.build_spec(connector.schema, ["f0", "city"], "y", None, None, "t")
    _no_streaming(monkeypatch, DuckDBSource)
    found = features.with_categories(spec, connector._source, Plan([], connector.schema))
    assert found.categories == {"city": ("lima", "oslo", "rome")}


def test_categories_of_files_are_found_by_tasks_not_the_driver(
    tmp_path: Path, ray_session: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from neve._internal.data.files import FileSource

    table = pa.Table.from_pandas(_with_city(5_000), preserve_index=False)
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=700)
    connector = DataConnector.from_sources(tmp_path / "rows.parquet")
    spec = features.build_spec(connector.schema, ["f0", "city"], "y", None, None, "rows")
    plan = connector._plan_for_workers(spec.columns)
    _no_streaming(monkeypatch, FileSource)
    found = features.with_categories(spec, connector._source, plan)
    assert found.categories == {"city": ("lima", "oslo", "rome")}


def test_too_many_categories_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features, "MAX_CATEGORIES", 10)
    frame = make_frame(100)
    frame["note"] = [f"free text {i}" for i in range(100)]
    source = ArrowSource(pa.Table.from_pandas(frame, preserve_index=False))
    spec = features.build_spec(source.schema(), ["f0", "note"], "y", None, None, "frame")
    with pytest.raises(ColumnTypeError, match="'note' holds more than 10 distinct strings"):
        features.with_categories(spec, source, Plan([], source.schema()))


# -- ranking groups -----------------------------------------------------------------------


def _grouped(sizes: list[int]) -> Plan:
    qid = np.repeat(np.arange(len(sizes)), sizes)
    table = pa.table({"qid": qid, "row": np.arange(len(qid))})
    cuts = [0, 7, 8, 30, len(qid)]  # fragments that groups straddle
    return Plan([TableFragment(table.slice(a, b - a)) for a, b in itertools.pairwise(cuts)],
                table.schema)


def _qids(plan: Plan, rank: int, world: int) -> list[int]:
    pieces = plan.shard(rank, world, group_col="qid")
    return [q for p in pieces for b in p.read(["qid"]) for q in b.column(0).to_pylist()]


@pytest.mark.parametrize("world", [2, 3, 4, 7])
def test_shards_cut_where_a_query_group_ends(world: int) -> None:
    sizes = [5, 1, 9, 3, 3, 12, 2, 1, 6, 4]
    plan = _grouped(sizes)
    shards = [_qids(plan, rank, world) for rank in range(world)]
    assert sorted(q for s in shards for q in s) == sorted(np.repeat(range(10), sizes))
    owners: dict[int, set[int]] = {}
    for rank, shard in enumerate(shards):
        for q in shard:
            owners.setdefault(q, set()).add(rank)
    assert all(len(r) == 1 for r in owners.values()), "a query group spans two shards"
    assert plan.group_boundary(6, "qid") == 6 and plan.group_boundary(7, "qid") == 15


def test_a_ranking_fit_keeps_groups_whole(ray_session: None) -> None:
    from neve.xgboost import XGBEstimator, XGBScalingConfig

    rng = np.random.default_rng(0)
    qid = np.repeat(np.arange(301), 7)[:2_000]  # the even cut at row 1,000 splits group 142
    frame = pd.DataFrame({"f0": rng.normal(size=2_000), "qid": qid})
    frame["rel"] = (frame["f0"] > 0).astype(np.int64)
    plan = plan_for_workers(ArrowSource(pa.Table.from_pandas(frame)), ["qid"], sized=True)
    assert plan.shard(0, 2, group_col="qid")[-1].stop == 1_001  # moved to the group's end
    estimator = XGBEstimator(n_estimators=5, params={"objective": "rank:pairwise"},
                             scaling_config=XGBScalingConfig(num_workers=2))
    estimator.fit(frame, ["f0"], "rel", group_col="qid")
    assert len(estimator.predict(frame)) == 2_000


# -- xgboost's external memory -----------------------------------------------------------


def test_external_memory_trains_the_same_model(ray_session: None) -> None:
    from neve.xgboost import XGBEstimator, XGBScalingConfig

    frame = make_frame(20_000, seed=4)
    scaling = XGBScalingConfig(num_workers=2, num_cpu_per_worker=1)
    results = []
    for external in (False, True):
        estimator = XGBEstimator(n_estimators=8, scaling_config=scaling)
        estimator.fit(frame, INPUTS, "y", eval_set=frame, external_memory=external,
                      eval_train=True)
        results.append(estimator.get_eval_results())
    for name in ("train", "eval"):
        np.testing.assert_allclose(results[0][name]["rmse"], results[1][name]["rmse"],
                                   rtol=1e-6)


def test_the_training_set_is_evaluated_unless_the_shard_is_on_disk(
        ray_session: None) -> None:
    """Its evaluation keeps a copy of the predictions (4 B/row): a fit with external
    memory leaves it out unless asked, and any fit can leave it out."""
    from neve.lightgbm import LightGBMEstimator, LightGBMScalingConfig
    from neve.xgboost import XGBEstimator, XGBScalingConfig

    frame = make_frame(4_000, seed=5)
    scaling = XGBScalingConfig(num_workers=2, num_cpu_per_worker=1)
    for fit_args, keys in (({}, ["eval", "train"]),
                           ({"external_memory": True}, ["eval"]),
                           ({"eval_train": False}, ["eval"])):
        estimator = XGBEstimator(n_estimators=3, scaling_config=scaling)
        estimator.fit(frame, INPUTS, "y", eval_set=frame, **fit_args)
        assert sorted(estimator.get_eval_results()) == keys, fit_args
        assert len(estimator.get_eval_results()["eval"]["rmse"]) == 3
    lgbm = LightGBMEstimator(n_estimators=3, scaling_config=LightGBMScalingConfig(
        num_workers=2, num_cpu_per_worker=1))
    lgbm.fit(frame, INPUTS, "y", eval_set=frame, eval_train=False)
    assert sorted(lgbm.get_eval_results()) == ["eval"]
    with pytest.raises(ConfigError, match="eval_train must be None"):
        XGBEstimator(n_estimators=3, scaling_config=scaling).fit(frame, INPUTS, "y",
                                                                 eval_train="yes")


def test_external_memory_is_chosen_when_the_shard_would_not_fit(
    ray_session: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from neve._internal.gbdt import xgb as backend
    from neve.xgboost import XGBEstimator, XGBScalingConfig

    scaling = XGBScalingConfig(num_workers=2, num_cpu_per_worker=1)
    frame = make_frame(5_000)
    with caplog.at_level(logging.INFO, logger="neve"):
        XGBEstimator(n_estimators=2, scaling_config=scaling).fit(frame, INPUTS, "y")
    assert "external memory" not in caplog.text
    monkeypatch.setattr(backend, "EXTERNAL_MEMORY_SHARE", 1e-9)  # nothing fits now
    with caplog.at_level(logging.INFO, logger="neve"):
        XGBEstimator(n_estimators=2, scaling_config=scaling).fit(frame, INPUTS, "y")
    assert "xgboost: external memory" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="neve"):  # forced off: no question asked
        XGBEstimator(n_estimators=2, scaling_config=scaling).fit(frame, INPUTS, "y",
                                                                 external_memory=False)
    assert "external memory" not in caplog.text


def test_a_shard_too_big_even_for_external_memory_is_warned_about() -> None:
    """External memory still keeps ~50 B per row in memory: 215M rows of a 50 GB table on
    two workers of a 24 GiB node need more than their share, and the driver says so."""
    import warnings

    from neve._internal.gbdt.xgb import XGBoostBackend
    from neve.exceptions import MemoryWarning

    backend = XGBoostBackend()
    share = 8 * 2**30  # Ray's memory on a 24 GiB node, over two workers
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.external_memory(None, 150_000_000, 28, share) is True  # 7.0 GiB: fine
        assert backend.external_memory(None, 1_000_000, 28, share) is False
    with pytest.warns(MemoryWarning, match=r"about 10\.0 GiB in memory for its 215,000,000 rows "
                      r"\(label, gradients.*more workers on more nodes"):
        assert backend.external_memory(None, 215_000_000, 28, share) is True
    with pytest.warns(MemoryWarning, match="or pass external_memory=True"):
        assert backend.external_memory(False, 100_000_000, 28, share) is False


def test_lightgbm_has_no_external_memory() -> None:
    from neve.exceptions import ConfigError
    from neve.lightgbm import LightGBMEstimator

    with pytest.raises(ConfigError, match="lightgbm has no external-memory mode"):
        LightGBMEstimator().fit(make_frame(100), INPUTS, "y", external_memory=True)


def test_lightgbm_builds_row_wise_histograms_for_a_small_shard_only() -> None:
    """Row-wise keeps a second, row-major copy of the bins: for a shard whose copy is a
    small share of its worker's memory (faster), not for a large one, not against the
    user's own choice."""
    from neve._internal.gbdt.lgbm import ROW_WISE_SHARE, LightGBMBackend

    backend = LightGBMBackend()
    share = 8 * 2**30
    small = int(ROW_WISE_SHARE * share / 28)  # rows whose row-wise copy just fits
    assert backend.sized_params({}, small, 28, share) == {"force_row_wise": True}
    assert backend.sized_params({}, small + 1, 28, share) == {"force_col_wise": True}
    assert backend.sized_params({"max_bin": 1023}, small, 28, share) == {
        "max_bin": 1023, "force_col_wise": True}  # two bytes a bin
    assert backend.sized_params({}, 1000, 28, 0.0) == {"force_col_wise": True}  # unknown
    for own in ({"force_col_wise": True}, {"force_row_wise": True}):
        assert backend.sized_params(dict(own), 10**9, 28, share) == own


def test_a_small_lightgbm_fit_trains_row_wise(ray_session: None) -> None:
    from neve.lightgbm import LightGBMEstimator, LightGBMScalingConfig

    booster = LightGBMEstimator(
        n_estimators=3, scaling_config=LightGBMScalingConfig(num_workers=2,
                                                             num_cpu_per_worker=1),
    ).fit(make_frame(2_000), INPUTS, "y")
    assert "[force_row_wise: 1]" in booster.model_to_string()


def test_external_memory_that_would_fill_the_disk_is_refused(tmp_path: Path) -> None:
    """xgboost aborts its process when a page cannot be written; neve checks first."""
    from neve._internal.gbdt.xgb import _check_disk
    from neve.exceptions import ResourcesUnavailableError

    _check_disk(str(tmp_path), 1_000, 28)  # a few kB: fine
    with pytest.raises(ResourcesUnavailableError,
                       match=r"external memory needs about .* GiB of local disk .* TMPDIR"):
        _check_disk(str(tmp_path), 10**13, 28)  # 640 TB of pages
