"""Sharding: every row in exactly one shard, in the driver, after pickling, and in Ray workers."""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from neve._internal.context import shard_context
from neve.data import DataConnector, ShardedDataConnector

# Uneven row groups, a one-row group among them: shard cuts fall inside groups.
GROUPS = [100, 537, 1, 250, 999, 13]
ROWS = sum(GROUPS)  # 1900
MEMORY_PATH = "memory://neve-test-sharding/rows.parquet"  # this process only


def base_table(rows: int = ROWS) -> pa.Table:
    ids = np.arange(rows, dtype=np.int64)
    return pa.table({"id": ids, "x": ids * 0.25, "name": [f"n{i}" for i in ids]})


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    table = base_table()
    root = tmp_path_factory.mktemp("sharding")
    with pq.ParquetWriter(root / "groups.parquet", table.schema) as writer:
        start = 0
        for size in GROUPS:
            writer.write_table(table.slice(start, size))
            start += size
    assert pq.ParquetFile(root / "groups.parquet").metadata.num_row_groups == len(GROUPS)
    (root / "folder").mkdir()
    pq.write_table(table.slice(0, 700), root / "folder" / "a.parquet", row_group_size=333)
    pq.write_table(table.slice(700), root / "folder" / "b.parquet", row_group_size=128)
    with pa.OSFile(str(root / "batches.arrow"), "wb") as sink, \
            ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=450)
    pacsv.write_csv(table, root / "rows.csv")
    fs = fsspec.filesystem("memory")
    with fs.open(MEMORY_PATH, "wb") as handle:
        pq.write_table(table, handle, row_group_size=512)
    yield root
    fs.rm(MEMORY_PATH)


@pytest.fixture(scope="module")
def duck() -> Any:
    con = duckdb.connect()
    con.register("base_view", base_table())
    con.execute("CREATE TABLE rows AS SELECT * FROM base_view")
    con.unregister("base_view")
    yield con
    con.close()


SOURCES = [
    "parquet-row-groups", "parquet-folder", "ipc-batches", "csv", "memory-parquet",
    "pandas", "pyarrow", "polars", "duckdb-relation", "duckdb-sql",
]


def sharded(name: str, files: Path, duck: Any, **kwargs: Any) -> ShardedDataConnector:
    make = ShardedDataConnector
    if name == "parquet-row-groups":
        return make.from_sources(files / "groups.parquet", **kwargs)
    if name == "parquet-folder":
        return make.from_sources(files / "folder", **kwargs)
    if name == "ipc-batches":
        return make.from_sources(files / "batches.arrow", **kwargs)
    if name == "csv":
        return make.from_sources(files / "rows.csv", **kwargs)
    if name == "memory-parquet":
        return make.from_sources(MEMORY_PATH, **kwargs)
    if name == "pandas":
        return make.from_dataframe(base_table().to_pandas(), **kwargs)
    if name == "pyarrow":
        return make.from_dataframe(base_table(), **kwargs)
    if name == "polars":
        import polars as pl

        return make.from_dataframe(pl.from_arrow(base_table()), **kwargs)
    if name == "duckdb-relation":
        return make.from_dataframe(duck.table("rows"), **kwargs)
    if name == "duckdb-sql":
        return make.from_sql("SELECT * FROM rows", session=duck, **kwargs)
    raise AssertionError(name)


def read_shards(connector: ShardedDataConnector, world_size: int) -> list[pa.Table]:
    shards = []
    for rank in range(world_size):
        with shard_context(rank, world_size):
            shard = connector.get_shard()
        assert type(shard) is DataConnector
        shards.append(shard.to_arrow())
    return shards


def check_exactly_once(shards: list[pa.Table], rows: int, *, equal: bool) -> None:
    """Every row in exactly one shard (or, with ``equal``, fewer than ``len(shards)``
    dropped), sizes within one row of each other, values intact."""
    world = len(shards)
    sizes = [s.num_rows for s in shards]
    ids = [i for s in shards for i in s.column("id").to_pylist()]
    assert len(ids) == len(set(ids)), "a row landed in two shards"
    if equal:
        assert sizes == [rows // world] * world
        assert rows - len(ids) < world
    else:
        assert sorted(ids) == list(range(rows)), "a row was lost"
        assert max(sizes) - min(sizes) <= 1
    for shard in shards:
        got = shard.column("id").to_numpy()
        np.testing.assert_array_equal(shard.column("x").to_numpy(), got * 0.25)
        assert shard.column("name").to_pylist() == [f"n{i}" for i in got]


@pytest.fixture(params=["in-process", "object-store"])
def plan_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Plan in this process (no Ray), or through Ray's object store (Ray running)."""
    if request.param == "object-store":
        request.getfixturevalue("ray_session")
    else:
        monkeypatch.setattr("neve.data._connector._ray_ready", lambda: False)
    return request.param


@pytest.mark.parametrize("source", SOURCES)
def test_shards_exactly_once(source: str, plan_kind: str, files: Path, duck: Any) -> None:
    for equal in (False, True):
        connector = sharded(source, files, duck, equal=equal)
        for world_size in (1, 2, 3, 4):
            check_exactly_once(read_shards(connector, world_size), ROWS, equal=equal)


@pytest.mark.parametrize("source", ["parquet-row-groups", "pandas", "duckdb-relation"])
def test_shard_outputs_agree(source: str, files: Path, duck: Any) -> None:
    """A shard is a plain DataConnector: every output gives the shard's rows."""
    connector = sharded(source, files, duck)
    with shard_context(1, 3):
        shard = connector.get_shard()
    want = shard.to_arrow().column("id").to_pylist()
    assert len(want) == ROWS // 3 and want == sorted(want)
    assert shard.to_pandas()["id"].tolist() == want
    assert shard.to_pandas(limit=5)["id"].tolist() == want[:5]
    assert [i for b in shard.iter_batches(100) for i in b.column("id").to_pylist()] == want
    assert [b.num_rows for b in shard.iter_batches(100)][:-1] == [100] * (len(want) // 100)
    ds = shard.to_torch_dataset(batch_size=64, drop_last_batch=False)
    assert [i for b in ds for i in b["id"].tolist()] == want


def test_equal_shards_log_what_they_drop(caplog: pytest.LogCaptureFixture, duck: Any,
                                         files: Path) -> None:
    connector = sharded("pyarrow", files, duck, equal=True)
    with caplog.at_level(logging.INFO, logger="neve"):
        read_shards(connector, 3)
    drops = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert drops == [f"equal shards: dropped {ROWS % 3} of {ROWS} rows"]  # rank 0 only
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="neve"):
        read_shards(connector, 4)  # 1900 = 4 * 475: nothing dropped, nothing said
    assert not [r for r in caplog.records if "dropped" in r.getMessage()]


def test_more_workers_than_rows() -> None:
    table = base_table(3)
    shards = read_shards(ShardedDataConnector.from_dataframe(table), 4)
    check_exactly_once(shards, 3, equal=False)
    assert sorted(s.num_rows for s in shards) == [0, 1, 1, 1]
    empty = read_shards(ShardedDataConnector.from_dataframe(table, equal=True), 4)
    assert [s.num_rows for s in empty] == [0, 0, 0, 0]
    with shard_context(0, 4):
        shard = ShardedDataConnector.from_dataframe(table, equal=True).get_shard()
    assert list(shard.to_torch_dataset(batch_size=2)) == []
    assert shard.to_pandas().columns.tolist() == ["id", "x", "name"]


def test_get_shard_follows_the_active_context(files: Path, duck: Any) -> None:
    connector = sharded("parquet-row-groups", files, duck)
    with shard_context(0, 2):
        first = connector.get_shard().to_arrow().column("id").to_pylist()
        with shard_context(1, 2):
            inner = connector.get_shard().to_arrow().column("id").to_pylist()
        again = connector.get_shard().to_arrow().column("id").to_pylist()
    assert first == again == list(range(ROWS // 2))
    assert inner == list(range(ROWS // 2, ROWS))


# -- across processes -----------------------------------------------------------------


def test_pickled_duckdb_relation_goes_through_the_object_store(ray_session: None) -> None:
    """Pickling a sharded DuckDB relation ships its rows as object-store blocks: the
    pickle is small, and the shards read after the DuckDB connection is gone."""
    rows = 30_000
    con = duckdb.connect()
    con.execute(f"CREATE TABLE t AS SELECT range::BIGINT AS id, range * 0.25 AS x, "
                f"'n' || range AS name FROM range({rows})")
    connector = ShardedDataConnector.from_dataframe(con.table("t"))
    blob = pickle.dumps(connector)
    assert len(blob) < 20_000  # the rows (~700 KB) are not in it
    con.close()
    for world_size in (1, 2, 3, 4):
        shards = []
        for rank in range(world_size):
            fresh = pickle.loads(blob)
            with shard_context(rank, world_size):
                shards.append(fresh.get_shard().to_arrow())
        check_exactly_once(shards, rows, equal=False)


def test_pickled_file_source_carries_no_rows(files: Path) -> None:
    connector = sharded("parquet-row-groups", files, None)
    blob = pickle.dumps(connector)
    assert len(blob) < 5_000
    shards = []
    for rank in range(3):
        with shard_context(rank, 3):
            shards.append(pickle.loads(blob).get_shard().to_arrow())
    check_exactly_once(shards, ROWS, equal=False)


def _read_in_worker(connector: ShardedDataConnector, rank: int, world_size: int) -> dict:
    with shard_context(rank, world_size):
        shard = connector.get_shard()
        table = shard.to_arrow()
    return {"pid": os.getpid(), "table": table}


@pytest.mark.parametrize("source", ["parquet-row-groups", "memory-parquet", "pandas",
                                    "duckdb-relation", "duckdb-sql", "warehouse-path"])
def test_ray_tasks_read_their_share(source: str, ray_session: None, files: Path, duck: Any,
                                    warehouse: Path) -> None:
    import ray

    if source == "warehouse-path":
        connector = ShardedDataConnector.from_sql(
            "SELECT id, f0 AS x, 'n' || id AS name FROM TRAINING_DATA", session=str(warehouse)
        )
        rows = 20_000
    else:
        connector = sharded(source, files, duck)
        rows = ROWS
    read = ray.remote(num_cpus=0.5)(_read_in_worker)
    world_size = 3
    results = ray.get([read.remote(connector, r, world_size) for r in range(world_size)],
                      timeout=120)
    assert all(r["pid"] != os.getpid() for r in results)  # read in worker processes
    shards = [r["table"] for r in results]
    ids = sorted(i for s in shards for i in s.column("id").to_pylist())
    assert ids == list(range(rows))
    assert max(s.num_rows for s in shards) - min(s.num_rows for s in shards) <= 1
    if source != "warehouse-path":
        check_exactly_once(shards, rows, equal=False)


def test_ray_actors_read_their_share_with_a_dataloader(
    reserved_cpus_after: None, files: Path, duck: Any
) -> None:
    """Actors (one per rank) read their shard through to_torch_dataset and a DataLoader
    with two loader processes, as a training function would."""
    import ray

    @ray.remote(num_cpus=1)
    class Worker:
        def __init__(self, rank: int, world_size: int) -> None:
            self.rank, self.world_size = rank, world_size

        def read(self, connector: ShardedDataConnector) -> list[int]:
            from torch.utils.data import DataLoader

            with shard_context(self.rank, self.world_size):
                ds = connector.get_shard().to_torch_dataset(batch_size=100,
                                                            drop_last_batch=False)
                loader = DataLoader(ds, batch_size=None, num_workers=2)
                return [i for batch in loader for i in batch["id"].tolist()]

    connector = sharded("duckdb-relation", files, duck)
    workers = [Worker.remote(rank, 2) for rank in range(2)]
    try:
        parts = ray.get([w.read.remote(connector) for w in workers], timeout=120)
    finally:
        for worker in workers:
            ray.kill(worker)
    assert [len(p) for p in parts] == [ROWS // 2, ROWS - ROWS // 2]
    assert sorted(parts[0] + parts[1]) == list(range(ROWS))
    assert not set(parts[0]) & set(parts[1])
