"""Files found as pyarrow.dataset finds them: hive partitions, hidden files, row groups."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from neve._internal.context import shard_context
from neve._internal.data.fragments import ParquetRowGroupFragment
from neve.data import DataConnector, ShardedDataConnector


def _table(start: int, rows: int) -> pa.Table:
    ids = np.arange(start, start + rows, dtype=np.int64)
    return pa.table({"id": ids, "x": ids * 0.5})


@pytest.fixture
def hive(tmp_path: Path) -> Path:
    root = tmp_path / "events"
    start = 0
    for year in (2023, 2024):
        for region in ("eu", "us"):
            folder = root / f"year={year}" / f"region={region}"
            folder.mkdir(parents=True)
            pq.write_table(_table(start, 300), folder / "part-0.parquet", row_group_size=100)
            start += 300
    (root / "_SUCCESS").write_text("")
    (root / ".part-0.parquet.crc").write_text("junk")
    hidden = root / "year=2024" / ".staging"
    hidden.mkdir()
    pq.write_table(_table(10_000, 5), hidden / "half-written.parquet")
    (root / "README.txt").write_text("not data")
    return root


def test_hive_folders_become_columns_and_hidden_files_are_skipped(hive: Path) -> None:
    connector = DataConnector.from_sources(hive)
    assert connector.columns == ["id", "x", "year", "region"]
    table = connector.to_arrow()
    assert sorted(table.column("id").to_pylist()) == list(range(1200))  # no .staging rows
    rows = {(r["year"], r["region"]) for r in table.select(["year", "region"]).to_pylist()}
    assert rows == {(2023, "eu"), (2023, "us"), (2024, "eu"), (2024, "us")}
    assert pa.types.is_integer(connector.schema.field("year").type)
    by_id = {r["id"]: (r["year"], r["region"]) for r in table.to_pylist()}
    assert by_id[0] == (2023, "eu") and by_id[1199] == (2024, "us")
    only = connector.to_arrow(columns=["region", "id"])  # a partition column alone
    assert only.column_names == ["region", "id"] and only.num_rows == 1200


def test_row_groups_are_fragments_that_carry_their_partition(hive: Path) -> None:
    connector = ShardedDataConnector.from_sources(hive)
    plan = connector._plan_for_workers()
    assert len(plan.fragments) == 12  # 4 files x 3 row groups
    assert all(isinstance(f, ParquetRowGroupFragment) for f in plan.fragments)
    assert {f.partition["region"] for f in plan.fragments} == {"eu", "us"}
    assert len(pickle.dumps(plan)) < 12 * 1_500  # light: path, row group, partition
    shards = []
    for rank in range(5):
        with shard_context(rank, 5):
            shards.append(connector.get_shard().to_arrow())
    ids = sorted(i for s in shards for i in s.column("id").to_pylist())
    assert ids == list(range(1200))
    assert {s.num_rows for s in shards} == {240}
    assert all(s.column_names == ["id", "x", "year", "region"] for s in shards)


def test_csv_files_are_counted_then_cut_like_any_other(tmp_path: Path) -> None:
    pacsv.write_csv(_table(0, 1000), tmp_path / "a.csv")
    pacsv.write_csv(_table(1000, 11), tmp_path / "b.csv")
    connector = ShardedDataConnector.from_sources(tmp_path)
    shards = []
    for rank in range(3):
        with shard_context(rank, 3):
            shards.append(connector.get_shard().to_arrow())
    assert [s.num_rows for s in shards] == [337, 337, 337]
    assert sorted(i for s in shards for i in s.column("id").to_pylist()) == list(range(1011))
