"""Every source -> every output gives the rows that reading the source directly gives.

Each case builds a DataConnector over one source and reads the same source
directly (DuckDB, ADBC, pyarrow, polars, Ray) for the expected table; every
output (to_arrow, to_pandas, iter_batches, to_torch_dataset, to_ray_dataset) must
give the same rows and values. Rows are compared in ``id`` order: SQL without
ORDER BY promises no order (order-preserving cases are checked on their own).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from neve.data import DataConnector

ROWS = 2_345  # not a multiple of any batch size used below
MEMORY_ROOT = "memory://neve-test-sources"


def base_table() -> pa.Table:
    """The rows every source holds: ints, floats with NULLs, float32, bool, str, MixedCase."""
    rng = np.random.default_rng(7)
    ids = np.arange(ROWS, dtype=np.int64)
    return pa.table({
        "id": ids,
        "Feature_A": pa.array(rng.normal(size=ROWS), mask=ids % 11 == 0),
        "f32": rng.normal(size=ROWS).astype(np.float32),
        "flag": ids % 3 == 0,
        "name": [f"row-{i}" for i in ids],
    })


def _write_ipc(table: pa.Table, sink: Any, chunk: int) -> None:
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=chunk)


# Uneven pieces for the folders: three files, differently sized row groups.
SPLITS = [(0, 900, 300), (900, 1_000, 64), (1_000, ROWS, 512)]


@dataclass
class World:
    """Every on-disk and in-memory copy of ``base_table()``."""

    table: pa.Table
    root: Path
    duckdb_path: Path
    duckdb_con: Any


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    table = base_table()
    root = tmp_path_factory.mktemp("sources")
    pq.write_table(table, root / "one.parquet", row_group_size=500)
    pacsv.write_csv(table, root / "one.csv")
    with pa.OSFile(str(root / "one.arrow"), "wb") as sink:
        _write_ipc(table, sink, 700)
    for name in ("pq", "csv", "ipc"):
        (root / name).mkdir()
    for i, (lo, hi, group) in enumerate(SPLITS):
        part = table.slice(lo, hi - lo)
        pq.write_table(part, root / "pq" / f"part-{i}.parquet", row_group_size=group)
        pacsv.write_csv(part, root / "csv" / f"part-{i}.csv")
        with pa.OSFile(str(root / "ipc" / f"part-{i}.arrow"), "wb") as sink:
            _write_ipc(part, sink, group)
    # A file that is not data, and a hidden one: the folder readers must skip both.
    (root / "pq" / "_SUCCESS").write_text("")
    (root / "pq" / ".part-9.parquet").write_text("not parquet")

    fs = fsspec.filesystem("memory")
    with fs.open(f"{MEMORY_ROOT}/one.parquet", "wb") as handle:
        pq.write_table(table, handle, row_group_size=400)
    with fs.open(f"{MEMORY_ROOT}/one.csv", "wb") as handle:
        pacsv.write_csv(table, handle)
    with fs.open(f"{MEMORY_ROOT}/one.arrow", "wb") as handle:
        _write_ipc(table, handle, 1_000)

    duckdb_path = root / "warehouse.duckdb"
    con = duckdb.connect(str(duckdb_path))
    con.register("base_view", table)
    con.execute('CREATE TABLE "T" AS SELECT * FROM base_view')
    con.unregister("base_view")
    yield World(table, root, duckdb_path, con)
    con.close()
    fs.rm(MEMORY_ROOT, recursive=True)


@pytest.fixture(scope="module")
def postgres_items(postgres_uri: str) -> str:
    """``items`` in the test PostgreSQL server, created with ADBC's own ingest."""
    import adbc_driver_postgresql.dbapi as pg

    with pg.connect(postgres_uri) as conn:
        with conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS items")
            cur.adbc_ingest("items", base_table(), mode="create")
        conn.commit()
    return postgres_uri


def _adbc_read(connect: Callable[[], Any], query: str) -> pa.Table:
    with connect() as conn, conn.cursor() as cur:
        cur.execute(query)
        return cur.fetch_arrow_table()


@dataclass
class Case:
    connector: DataConnector
    expected: pa.Table  # the same source, read directly


def _file_case(path: str, fmt: str) -> Case:
    fs, root = fsspec.core.url_to_fs(path)
    files = sorted(p for p in fs.find(root) if not p.rsplit("/", 1)[-1].startswith(("_", ".")))
    parts = []
    for file in files:
        with fs.open(file, "rb") as handle:
            if fmt == "parquet":
                parts.append(pq.read_table(handle))
            elif fmt == "csv":
                parts.append(pacsv.read_csv(handle))
            else:
                parts.append(ipc.open_file(handle).read_all())
    return Case(DataConnector.from_sources(path), pa.concat_tables(parts))


def _build(name: str, request: pytest.FixtureRequest) -> Case:
    w: World = request.getfixturevalue("world")
    con, root = w.duckdb_con, w.root
    query = 'SELECT * FROM "T" WHERE id % 5 <> 2'
    if name == "duckdb-table":
        return Case(DataConnector.from_dataframe(con.table("T")),
                    con.table("T").to_arrow_table())
    if name == "duckdb-sql-relation":
        return Case(DataConnector.from_dataframe(con.sql(query)), con.sql(query).to_arrow_table())
    if name == "from_sql-duckdb-path":
        # The module holds the file open read-write in this process meanwhile.
        return Case(DataConnector.from_sql(query, session=str(w.duckdb_path)),
                    con.sql(query).to_arrow_table())
    if name == "from_sql-duckdb-connection":
        return Case(DataConnector.from_sql(query, session=con), con.sql(query).to_arrow_table())
    if name == "from_sql-default-parquet-glob":
        sql = f"SELECT * FROM '{root}/pq/part-*.parquet'"
        return Case(DataConnector.from_sql(sql), duckdb.sql(sql).to_arrow_table())
    if name.startswith("postgres"):
        import adbc_driver_postgresql.dbapi as pg

        uri = request.getfixturevalue("postgres_items")
        sql = "SELECT * FROM items"
        expected = _adbc_read(lambda: pg.connect(uri), sql)
        if name == "postgres-uri":
            return Case(DataConnector.from_sql(sql, session=uri), expected)
        conn = pg.connect(uri)
        request.addfinalizer(conn.close)
        return Case(DataConnector.from_sql(sql, session=conn), expected)
    if name.startswith("sqlite"):
        import adbc_driver_sqlite.dbapi as sqlite

        path = root / "items.sqlite"
        if not path.exists():
            with sqlite.connect(str(path)) as conn:
                with conn.cursor() as cur:
                    cur.adbc_ingest("items", w.table, mode="create")
                conn.commit()
        sql = "SELECT * FROM items"
        expected = _adbc_read(lambda: sqlite.connect(str(path)), sql)
        if name == "sqlite-uri":
            return Case(DataConnector.from_sql(sql, session=f"sqlite://{path}"), expected)
        conn = sqlite.connect(str(path))
        request.addfinalizer(conn.close)
        return Case(DataConnector.from_sql(sql, session=conn), expected)
    files = {
        "parquet-file": (str(root / "one.parquet"), "parquet"),
        "parquet-folder": (str(root / "pq"), "parquet"),
        "csv-file": (str(root / "one.csv"), "csv"),
        "csv-folder": (str(root / "csv"), "csv"),
        "ipc-file": (str(root / "one.arrow"), "ipc"),
        "ipc-folder": (str(root / "ipc"), "ipc"),
        "memory-parquet": (f"{MEMORY_ROOT}/one.parquet", "parquet"),
        "memory-csv": (f"{MEMORY_ROOT}/one.csv", "csv"),
        "memory-ipc": (f"{MEMORY_ROOT}/one.arrow", "ipc"),
    }
    if name in files:
        return _file_case(*files[name])
    if name == "pandas":
        frame = w.table.to_pandas()
        return Case(DataConnector.from_dataframe(frame),
                    pa.Table.from_pandas(frame, preserve_index=False))
    if name == "polars":
        import polars as pl

        frame = pl.from_arrow(w.table)
        return Case(DataConnector.from_dataframe(frame), frame.to_arrow())
    if name == "polars-lazy":
        import polars as pl

        lazy = pl.from_arrow(w.table).lazy().filter(pl.col("id") % 4 != 1)
        return Case(DataConnector.from_dataframe(lazy), lazy.collect().to_arrow())
    if name == "pyarrow":
        return Case(DataConnector.from_dataframe(w.table), w.table)
    if name == "pyarrow-batch-reader":
        reader = pa.RecordBatchReader.from_batches(w.table.schema, w.table.to_batches(300))
        return Case(DataConnector.from_dataframe(reader), w.table)
    if name.startswith("ray-dataset"):
        request.getfixturevalue("ray_session")
        import ray.data

        parts = [w.table.slice(lo, hi - lo) for lo, hi, _ in SPLITS]
        ds = ray.data.from_arrow(parts)
        if name == "ray-dataset":
            return Case(DataConnector.from_ray_dataset(ds), w.table)
        return Case(DataConnector.from_dataframe(ds), w.table)
    raise AssertionError(name)


SOURCES = [
    "duckdb-table",
    "duckdb-sql-relation",
    "from_sql-duckdb-path",
    "from_sql-duckdb-connection",
    "from_sql-default-parquet-glob",
    "postgres-uri",
    "postgres-connection",
    "sqlite-uri",
    "sqlite-connection",
    "parquet-file",
    "parquet-folder",
    "csv-file",
    "csv-folder",
    "ipc-file",
    "ipc-folder",
    "memory-parquet",
    "memory-csv",
    "memory-ipc",
    "pandas",
    "polars",
    "polars-lazy",
    "pyarrow",
    "pyarrow-batch-reader",
    "ray-dataset",
    "ray-dataset-from_dataframe",
]


@pytest.fixture(params=SOURCES)
def case(request: pytest.FixtureRequest) -> Case:
    return _build(request.param, request)


# -- comparing ------------------------------------------------------------------------


def rows_by_id(table: pa.Table) -> dict[str, list[Any]]:
    """Column -> Python values in ``id`` order (NULLs as None)."""
    table = table.sort_by("id")
    return {name: table.column(name).to_pylist() for name in table.column_names}


def assert_same_rows(actual: pa.Table, expected: pa.Table) -> None:
    assert actual.column_names == expected.column_names
    assert actual.num_rows == expected.num_rows
    assert rows_by_id(actual) == rows_by_id(expected)


def as_float(values: list[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def assert_torch_rows(batches: list[dict[str, Any]], expected: pa.Table) -> None:
    """Torch batches hold exactly ``expected``'s rows: numbers as tensors, text as lists."""
    import torch

    columns: dict[str, list[Any]] = {name: [] for name in expected.column_names}
    for batch in batches:
        assert list(batch) == expected.column_names
        for name, value in batch.items():
            if name == "name":
                assert isinstance(value, list) and all(isinstance(v, str) for v in value)
                columns[name].extend(value)
            else:
                assert isinstance(value, torch.Tensor) and value.ndim == 1
                columns[name].extend(value.tolist())
    ids = np.array(columns["id"])
    assert len(ids) == len(set(ids.tolist())) == expected.num_rows
    order = np.argsort(ids)
    want = rows_by_id(expected)
    for name, values in columns.items():
        got = [values[i] for i in order]
        if name == "name":
            assert got == want[name]
        else:  # NULL in a float column comes out as NaN
            np.testing.assert_array_equal(as_float(got), as_float(want[name]), err_msg=name)


# -- the matrix -----------------------------------------------------------------------


def test_to_arrow(case: Case) -> None:
    table = case.connector.to_arrow()
    assert table.schema.names == case.expected.schema.names
    assert table.schema.types == case.expected.schema.types
    assert case.connector.columns == case.expected.column_names  # case kept exactly
    assert_same_rows(table, case.expected)


def test_to_pandas(case: Case) -> None:
    frame = case.connector.to_pandas()
    expected = case.expected.to_pandas()
    assert isinstance(frame, pd.DataFrame)
    pd.testing.assert_frame_equal(
        frame.sort_values("id").reset_index(drop=True),
        expected.sort_values("id").reset_index(drop=True),
    )


@pytest.mark.parametrize("limit", [0, 1_234, ROWS + 10])
def test_to_pandas_limit(case: Case, limit: int) -> None:
    frame = case.connector.to_pandas(limit=limit)
    assert list(frame.columns) == case.expected.column_names
    assert len(frame) == min(limit, case.expected.num_rows)
    assert frame["id"].is_unique
    # Each row is a real row of the source, whole.
    expected = case.expected.to_pandas().set_index("id").loc[frame["id"]].reset_index()
    pd.testing.assert_frame_equal(frame, expected[list(frame.columns)])


@pytest.mark.parametrize("batch_size", [1_000, 7])
def test_iter_batches(case: Case, batch_size: int) -> None:
    batches = list(case.connector.iter_batches(batch_size))
    n = case.expected.num_rows
    sizes = [b.num_rows for b in batches]
    assert sizes == [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    assert all(isinstance(b, pa.RecordBatch) for b in batches)
    assert_same_rows(pa.Table.from_batches(batches), case.expected)


def test_projection(case: Case) -> None:
    """Asking for some columns, in another order, reads just those (names as the source
    spells them, quoted where SQL needs it)."""
    columns = ["name", "Feature_A", "id"]
    expected = case.expected.select(columns)
    table = case.connector.to_arrow(columns=columns)
    assert table.column_names == columns
    assert_same_rows(table, expected)
    batches = list(case.connector.iter_batches(1_000, columns=columns))
    assert all(b.schema.names == columns for b in batches)
    assert_same_rows(pa.Table.from_batches(batches), expected)
    ds = case.connector.to_torch_dataset(batch_size=500, drop_last_batch=False,
                                         columns=["id", "Feature_A"])
    assert_torch_rows(list(ds), case.expected.select(["id", "Feature_A"]))


def test_to_torch_dataset(case: Case) -> None:
    ds = case.connector.to_torch_dataset(batch_size=256, shuffle=True, drop_last_batch=False)
    batches = list(ds)
    n = case.expected.num_rows
    assert [len(b["id"]) for b in batches[:-1]] == [256] * (len(batches) - 1)
    assert len(batches[-1]["id"]) == n - 256 * (len(batches) - 1)
    assert_torch_rows(batches, case.expected)


def test_to_torch_dataset_drop_last_batch(case: Case) -> None:
    batches = list(case.connector.to_torch_dataset(batch_size=256))
    n = case.expected.num_rows
    assert [len(b["id"]) for b in batches] == [256] * (n // 256)
    ids = [i for b in batches for i in b["id"].tolist()]
    assert len(set(ids)) == len(ids)
    assert set(ids) <= set(case.expected.column("id").to_pylist())


def test_to_ray_dataset(case: Case, ray_session: None) -> None:
    import ray

    ds = case.connector.to_ray_dataset()
    assert isinstance(ds, ray.data.Dataset)
    table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    assert table.column_names == case.expected.column_names
    assert_same_rows(table, case.expected)


# -- order and laziness -----------------------------------------------------------------


def test_sql_order_is_kept(world: World, postgres_items: str) -> None:
    """An ORDER BY reaches every output in order (neve never reorders a source)."""
    import adbc_driver_postgresql.dbapi as pg

    descending = list(range(ROWS - 1, -1, -1))
    duck = DataConnector.from_sql('SELECT * FROM "T" ORDER BY id DESC', session=world.duckdb_con)
    with pg.connect(postgres_items) as conn:
        post = DataConnector.from_sql("SELECT * FROM items ORDER BY id DESC", session=conn)
        for connector in (duck, post):
            assert connector.to_arrow().column("id").to_pylist() == descending
            assert connector.to_pandas()["id"].tolist() == descending
            batches = connector.iter_batches(1_000)
            assert [i for b in batches for i in b.column("id").to_pylist()] == descending
            ds = connector.to_torch_dataset(batch_size=100, drop_last_batch=False)
            assert [i for b in ds for i in b["id"].tolist()] == descending


def test_file_order_is_kept(world: World) -> None:
    """Files, row groups and IPC batches are read in order, folders in name order."""
    for path in ("one.parquet", "pq", "one.csv", "csv", "one.arrow", "ipc"):
        connector = DataConnector.from_sources(world.root / path)
        assert connector.to_arrow().column("id").to_pylist() == list(range(ROWS)), path


def test_from_sources_list_of_paths_and_format(world: World, tmp_path: Path) -> None:
    """A list of files, and a format named when the file name does not tell it."""
    parts = [world.root / "pq" / f"part-{i}.parquet" for i in range(3)]
    assert_same_rows(DataConnector.from_sources(parts).to_arrow(), world.table)
    odd = tmp_path / "rows.data"
    odd.write_bytes((world.root / "one.parquet").read_bytes())
    assert_same_rows(DataConnector.from_sources(str(odd), format="parquet").to_arrow(),
                     world.table)


def test_duckdb_path_read_only_without_open_connection(tmp_path: Path) -> None:
    """``session=path`` with no connection open in this process: read-only, and the
    file is writable again once the read is done."""
    path = str(tmp_path / "closed.duckdb")
    con = duckdb.connect(path)
    con.register("base_view", base_table())
    con.execute("CREATE TABLE t AS SELECT * FROM base_view")
    con.close()
    connector = DataConnector.from_sql("SELECT * FROM t WHERE flag", session=path)
    table = connector.to_arrow()
    expected = duckdb.connect(path, read_only=True)
    try:
        want = expected.sql("SELECT * FROM t WHERE flag").to_arrow_table()
    finally:
        expected.close()
    assert_same_rows(table, want)
    writer = duckdb.connect(path)  # neve holds no connection to the file any more
    writer.execute("INSERT INTO t SELECT * FROM t LIMIT 1")
    writer.close()
