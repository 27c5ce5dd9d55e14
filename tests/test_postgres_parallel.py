"""PostgreSQL read by the workers: ranges of one exported snapshot, on a real server.

The driver exports a snapshot; each worker reads its own ``ctid`` (or key) ranges
inside it. The reads must be exactly once and consistent while other sessions
insert, update and delete, and nothing may stay open when the plan is released.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import adbc_driver_postgresql.dbapi as pg
import pyarrow as pa
import pytest

from neve._internal.context import shard_context
from neve._internal.data.postgres import PgRangeFragment, parse_table_scan
from neve._internal.data.spill import SpillFolder
from neve.data import DataConnector, ShardedDataConnector
from neve.exceptions import ConfigError

BIG = 300_000  # rows: ~1,900 pages, more than the small-plan threshold: unsized ranges


@pytest.fixture(scope="module")
def pg_tables(postgres_uri: str) -> Iterator[str]:
    con = pg.connect(postgres_uri, autocommit=True)
    cur = con.cursor()
    cur.execute("DROP TABLE IF EXISTS big, small, other")
    cur.execute(f"CREATE TABLE big AS SELECT g::bigint AS id, (g * 0.5)::float8 AS x, "
                f"(g % 5)::int AS k FROM generate_series(0, {BIG - 1}) g")
    cur.execute("CREATE TABLE small AS SELECT g::bigint AS id, (g * 0.5)::float8 AS x "
                "FROM generate_series(0, 999) g")
    cur.execute("CREATE TABLE other AS SELECT g::bigint AS id FROM generate_series(0, 99) g")
    cur.execute("ANALYZE big")
    cur.execute("ANALYZE small")
    cur.close()
    con.close()
    yield postgres_uri


def _execute(uri: str, sql: str) -> list[Any]:
    con = pg.connect(uri, autocommit=True)
    try:
        cur = con.cursor()
        cur.execute(sql)
        rows = cur.fetchall() if cur.description else []
        cur.close()
        return rows
    finally:
        con.close()


def _shards(connector: ShardedDataConnector, world_size: int) -> list[pa.Table]:
    out = []
    for rank in range(world_size):
        with shard_context(rank, world_size):
            out.append(connector.get_shard().to_arrow())
    return out


def test_a_table_scan_becomes_unsized_ctid_ranges(pg_tables: str) -> None:
    connector = ShardedDataConnector.from_sql("SELECT id, x FROM big", session=pg_tables)
    plan = connector._plan_for_workers()
    try:
        assert len(plan.fragments) >= 64
        assert all(isinstance(f, PgRangeFragment) for f in plan.fragments)
        assert not plan.sized and plan.num_rows is None
        assert abs(plan.estimated_rows - BIG) < BIG * 0.2  # from pg_class, not counted
        assert "ctid" in plan.fragments[0].query
        shards = _shards(connector, 3)
        ids = [i for s in shards for i in s.column("id").to_pylist()]
        assert sorted(ids) == list(range(BIG))
        assert all(abs(s.num_rows - BIG / 3) < BIG * 0.05 for s in shards)  # balanced
    finally:
        plan.release()


def _writer(uri: str, stop: threading.Event, done: list[int]) -> None:
    """Insert new rows, update and delete old ones, commit each time, until stopped."""
    con = pg.connect(uri, autocommit=True)
    cur = con.cursor()
    step = 0
    try:
        while not stop.is_set():
            lo = step * 97 % BIG
            cur.execute(f"UPDATE big SET x = -1 WHERE id BETWEEN {lo} AND {lo + 50}")
            cur.execute(f"DELETE FROM big WHERE id BETWEEN {lo + 51} AND {lo + 60}")
            cur.execute(f"INSERT INTO big SELECT {BIG} + {step} * 10 + g, 0, 0 "
                        "FROM generate_series(0, 9) g")
            step += 1
            done.append(step)
    finally:
        cur.close()
        con.close()


def test_a_parallel_read_is_exactly_once_and_consistent_while_writers_commit(
    pg_tables: str, ray_session: None
) -> None:
    """Three Ray tasks read their shards while another session updates (which moves
    rows to other pages), deletes and inserts: every row of the snapshot comes back
    exactly once, with its value as of the snapshot."""
    import ray

    _execute(pg_tables, "DROP TABLE IF EXISTS big_copy")
    _execute(pg_tables, "CREATE TABLE big_copy AS SELECT * FROM big")
    connector = ShardedDataConnector.from_sql("SELECT id, x FROM big", session=pg_tables)
    plan = connector._plan_for_workers()  # the snapshot is taken here
    stop, done = threading.Event(), []
    writer = threading.Thread(target=_writer, args=(pg_tables, stop, done))
    writer.start()
    try:
        while len(done) < 3:  # some commits land after the snapshot, before any read
            time.sleep(0.05)

        def read(connector: ShardedDataConnector, rank: int) -> pa.Table:
            with shard_context(rank, 3):
                return connector.get_shard().to_arrow()

        shards = ray.get([ray.remote(num_cpus=0.5)(read).remote(connector, r) for r in range(3)],
                         timeout=120)
    finally:
        stop.set()
        writer.join()
        plan.release()
    assert len(done) >= 3
    table = pa.concat_tables(shards)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == BIG  # none twice, none lost, no new row
    assert sorted(ids) == list(range(BIG))
    values = dict(zip(ids, table.column("x").to_pylist(), strict=True))
    assert all(values[i] == i * 0.5 for i in range(0, BIG, 7))  # no update seen
    # while the live table has changed
    assert _execute(pg_tables, "SELECT count(*) FROM big WHERE x = -1")[0][0] > 0
    _execute(pg_tables, "DROP TABLE big")
    _execute(pg_tables, "ALTER TABLE big_copy RENAME TO big")


def test_releasing_the_plan_ends_the_snapshot_transaction(pg_tables: str) -> None:
    def open_snapshots() -> int:
        rows = _execute(pg_tables, "SELECT count(*) FROM pg_stat_activity WHERE "
                                   "backend_xmin IS NOT NULL AND pid <> pg_backend_pid()")
        return int(rows[0][0])

    before = open_snapshots()
    connector = DataConnector.from_sql("SELECT id FROM big", session=pg_tables)
    plan = connector._plan_for_workers()
    assert open_snapshots() == before + 1  # the driver's exporting transaction
    assert sum(1 for _ in plan.fragments[0].read(None)) >= 1
    assert open_snapshots() == before + 1  # a reader's connection is gone after its read
    plan.release()
    assert open_snapshots() == before


@pytest.mark.parametrize("query", [
    "SELECT id, x FROM big WHERE k = 2",
    "select b.id, b.x from public.big b where b.k = 2",
    'SELECT "id", x FROM "big" AS b WHERE k = 2 AND x >= 0',
])
def test_a_filtered_scan_of_one_table_is_split_by_ctid(pg_tables: str, query: str) -> None:
    connector = ShardedDataConnector.from_sql(query, session=pg_tables)
    plan = connector._plan_for_workers()
    try:
        assert isinstance(plan.fragments[0], PgRangeFragment)
        assert "ctid" in plan.fragments[0].query
        ids = sorted(i for s in _shards(connector, 2) for i in s.column("id").to_pylist())
        assert ids == list(range(2, BIG, 5))
    finally:
        plan.release()


@pytest.mark.parametrize("query", [
    "SELECT b.id, b.x FROM big b JOIN other o ON o.id = b.id",
    "SELECT k, count(*) AS n FROM big GROUP BY k",
    "SELECT id, x FROM big ORDER BY x DESC LIMIT 100",
    "SELECT id, x FROM big WHERE x > (SELECT avg(x) FROM big)",
    "SELECT DISTINCT k FROM big",
])
def test_other_queries_are_streamed_by_the_driver(pg_tables: str, query: str) -> None:
    want = sorted(map(tuple, _execute(pg_tables, query)))
    connector = ShardedDataConnector.from_sql(query, session=pg_tables)
    plan = connector._plan_for_workers()
    try:
        assert not any(isinstance(f, PgRangeFragment) for f in plan.fragments)
        got = pa.concat_tables(_shards(connector, 3))
        assert sorted(zip(*[c.to_pylist() for c in got.columns], strict=True)) == want
    finally:
        plan.release()


def test_a_partition_column_splits_any_query_by_value(pg_tables: str) -> None:
    query = "SELECT b.id, b.x FROM big b JOIN other o ON o.id % 100 = b.id % 100 WHERE b.k = 1"
    connector = ShardedDataConnector.from_sql(query, session=pg_tables, partition_column="id")
    plan = connector._plan_for_workers()
    try:
        assert all(isinstance(f, PgRangeFragment) for f in plan.fragments)
        assert plan.estimated_rows == BIG // 5  # ranges counted in one pass
        shards = _shards(connector, 4)
        ids = [i for s in shards for i in s.column("id").to_pylist()]
        assert sorted(ids) == list(range(1, BIG, 5))
        assert max(s.num_rows for s in shards) - min(s.num_rows for s in shards) < BIG * 0.05
    finally:
        plan.release()


def test_a_partition_column_must_be_a_number(pg_tables: str) -> None:
    connector = DataConnector.from_sql("SELECT id, x::text AS t FROM big", session=pg_tables,
                                       partition_column="t")
    with pytest.raises(ConfigError, match="partition_column 't' is of type string"):
        connector._plan_for_workers()
    with pytest.raises(ConfigError, match="over PostgreSQL"):
        DataConnector.from_sql("SELECT 1 AS a", partition_column="a")


def test_small_tables_and_equal_shards_are_counted_and_cut_exactly(pg_tables: str) -> None:
    small = ShardedDataConnector.from_sql("SELECT id, x FROM small", session=pg_tables)
    plan = small._plan_for_workers()
    try:
        assert plan.sized and plan.num_rows == 1000  # too few pages for 64 ranges
        assert [s.num_rows for s in _shards(small, 3)] == [333, 333, 334]
    finally:
        plan.release()
    equal = ShardedDataConnector.from_sql("SELECT id FROM big", session=pg_tables, equal=True)
    plan = equal._plan_for_workers(sized=True)
    try:
        assert plan.sized and plan.num_rows == BIG
        shards = _shards(equal, 7)
        assert {s.num_rows for s in shards} == {BIG // 7}
        ids = [i for s in shards for i in s.column("id").to_pylist()]
        assert len(set(ids)) == len(ids) == 7 * (BIG // 7)
    finally:
        plan.release()


def test_workers_read_a_range_once_then_from_their_local_copy(pg_tables: str) -> None:
    from neve._internal.data import spill

    connector = ShardedDataConnector.from_sql("SELECT id, x FROM big", session=pg_tables)
    plan = connector._plan_for_workers()
    try:
        with shard_context(0, 2):
            shard = connector.get_shard()
        first = shard.to_arrow()
        source = shard._source
        assert all(not p.fragment.cache_locally for p in source.local_pieces())
        folder = spill._cache_folder
        assert isinstance(folder, SpillFolder) and folder.local
        assert shard.to_arrow().equals(first)  # the second pass: the local copy
    finally:
        plan.release()
        spill.release_local_cache()
    assert not folder.filesystem.exists(folder.path)


def test_what_is_a_plain_table_scan() -> None:
    scan = parse_table_scan("SELECT a, b FROM s.t AS x WHERE a > 1")
    assert scan is not None and (scan.table, scan.alias, scan.where) == ("s.t", "x", "a > 1")
    assert "x.ctid >= '(0,0)'::tid AND x.ctid < '(5,0)'::tid" in scan.ranged(0, 5, ordered=False)
    for query in ["SELECT a FROM t, u", "SELECT a FROM t JOIN u USING (a)",
                  "SELECT count(*) FROM t GROUP BY a", "SELECT a FROM t ORDER BY a",
                  "SELECT a FROM (SELECT a FROM t) q", "WITH q AS (SELECT 1) SELECT * FROM q"]:
        assert parse_table_scan(query) is None, query
