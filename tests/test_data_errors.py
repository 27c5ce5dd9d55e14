"""Errors of the data layer: what they say, and that they are neve's own."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from neve._internal.context import shard_context
from neve.data import DataConnector, ShardedDataConnector
from neve.exceptions import (
    ColumnNotFoundError,
    ConfigError,
    ContextError,
    DataError,
    NeveError,
    SourceError,
)


@pytest.fixture
def frame() -> DataConnector:
    return DataConnector.from_dataframe(
        pa.table({"Id": [1, 2], "Feature": [0.5, 1.5], "label": [0, 1]})
    )


# -- missing columns --------------------------------------------------------------------


@pytest.mark.parametrize("read", [
    lambda dc, cols: dc.to_arrow(columns=cols),
    lambda dc, cols: list(dc.iter_batches(10, columns=cols)),
    lambda dc, cols: dc.to_torch_dataset(batch_size=1, columns=cols),
], ids=["to_arrow", "iter_batches", "to_torch_dataset"])
def test_missing_column_names_it_and_lists_what_exists(frame: DataConnector, read) -> None:
    with pytest.raises(ColumnNotFoundError) as info:
        read(frame, ["label", "nope"])
    message = str(info.value)
    assert "'nope'" in message
    assert "3 columns: 'Id', 'Feature', 'label'" in message
    assert "case-sensitive" not in message  # no case hint when none applies
    assert isinstance(info.value, KeyError) and isinstance(info.value, DataError)


def test_a_misspelled_column_gets_did_you_mean_as_in_the_cli(frame: DataConnector) -> None:
    with pytest.raises(ColumnNotFoundError) as info:
        frame.to_arrow(columns=["Featur", "label"])
    assert str(info.value).startswith("column 'Featur' not found in the Arrow table; did you "
                                      "mean 'Feature'? It has 3 columns: 'Id', 'Feature'")
    with pytest.raises(ColumnNotFoundError, match=r"did you mean 'Feature' for 'featur', "
                                                  r"'label' for 'lable'\?"):
        frame.to_arrow(columns=["featur", "lable"])


def test_missing_column_hints_the_case_mismatch(frame: DataConnector) -> None:
    with pytest.raises(ColumnNotFoundError) as info:
        frame.to_arrow(columns=["id", "FEATURE", "label"])
    message = str(info.value)
    assert message.startswith("columns 'id', 'FEATURE' not found")
    assert "'id' -> 'Id'" in message and "'FEATURE' -> 'Feature'" in message


def test_missing_column_in_a_duckdb_query_uses_its_names(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    con.execute('CREATE TABLE t ("Price" DOUBLE, qty INT)')
    connector = DataConnector.from_dataframe(con.table("t"))
    with pytest.raises(ColumnNotFoundError, match=r"'price' -> 'Price'"):
        connector.to_torch_dataset(columns=["price"])
    con.close()


# -- SQL errors ------------------------------------------------------------------------


def test_duckdb_sql_error_carries_duckdb_message(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    con.execute("CREATE TABLE present (a INT)")
    connector = DataConnector.from_sql("SELECT * FROM absent_table", session=con)
    with pytest.raises(SourceError) as info:
        connector.to_pandas()
    assert "absent_table" in str(info.value)
    assert "Catalog Error" in str(info.value)
    assert isinstance(info.value.__cause__, duckdb.Error)  # raised from the original
    con.close()
    # The same through a database path, and through DuckDB's default connection.
    with pytest.raises(SourceError, match="absent_table"):
        DataConnector.from_sql("SELECT * FROM absent_table",
                               session=str(tmp_path / "w.duckdb")).to_arrow()
    with pytest.raises(SourceError, match=r"Parser Error"):
        DataConnector.from_sql("SELEC 1").to_arrow()


def test_duckdb_runtime_error_while_streaming_is_a_source_error() -> None:
    """An error raised by the query only once rows flow (not when it is planned)."""
    connector = DataConnector.from_sql(
        "SELECT CASE WHEN range < 500000 THEN range::VARCHAR ELSE 'x' END::INT AS v "
        "FROM range(600000)"
    )
    with pytest.raises(SourceError, match=r"Conversion Error.*'x'"):
        list(connector.iter_batches(1_000))


def test_postgres_sql_error_carries_postgres_message(postgres_uri: str) -> None:
    import adbc_driver_postgresql.dbapi as pg

    with pytest.raises(SourceError) as info:
        DataConnector.from_sql("SELECT * FROM absent_table", session=postgres_uri).to_arrow()
    message = str(info.value)
    assert 'relation "absent_table" does not exist' in message
    assert "42P01" in message  # PostgreSQL's SQLSTATE
    with pg.connect(postgres_uri) as conn:
        connector = DataConnector.from_sql("SELECT no_such_column FROM pg_class", session=conn)
        with pytest.raises(SourceError, match=r'column "no_such_column" does not exist'):
            list(connector.iter_batches(5))


def test_sqlite_sql_error(tmp_path: Path) -> None:
    path = tmp_path / "rows.sqlite"
    with pytest.raises(SourceError, match="no such table: absent_table"):
        DataConnector.from_sql("SELECT * FROM absent_table", session=f"sqlite://{path}").to_arrow()


# -- sources that do not exist --------------------------------------------------------


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "rows.parquet"
    with pytest.raises(SourceError) as info:
        DataConnector.from_sources(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(SourceError, match=re.escape("memory://neve-absent/rows.csv")):
        DataConnector.from_sources("memory://neve-absent/rows.csv")
    with pytest.raises(SourceError, match=re.escape("a.parquet")):
        DataConnector.from_sources([tmp_path / "a.parquet"])


def test_missing_duckdb_database_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "absent.duckdb"
    with pytest.raises(SourceError, match=re.escape("absent.duckdb")):
        DataConnector.from_sql("SELECT 1", session=str(missing))
    assert not missing.exists()  # and none was created


def test_file_deleted_after_construction_names_it(tmp_path: Path) -> None:
    path = tmp_path / "gone.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), path)
    connector = DataConnector.from_sources(path)
    path.unlink()
    with pytest.raises(SourceError, match=re.escape("gone.parquet")):
        connector.to_arrow()


def test_empty_or_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SourceError, match="holds no Parquet, CSV or Arrow files"):
        DataConnector.from_sources(tmp_path)


def test_corrupt_parquet_is_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"definitely not parquet")
    with pytest.raises(SourceError, match=re.escape("broken.parquet")):
        DataConnector.from_sources(path).to_arrow()


def test_format_errors(tmp_path: Path) -> None:
    odd = tmp_path / "rows.data"
    odd.write_text("a\n1\n")
    with pytest.raises(ConfigError, match=r"cannot tell the format of .*rows.data.*format="):
        DataConnector.from_sources(odd)
    with pytest.raises(ConfigError, match=r"format must be .* got 'xlsx'"):
        DataConnector.from_sources(odd, format="xlsx")
    pq.write_table(pa.table({"a": [1]}), tmp_path / "a.parquet")
    (tmp_path / "b.csv").write_text("a\n2\n")
    with pytest.raises(ConfigError, match="one format at a time"):
        DataConnector.from_sources([tmp_path / "a.parquet", tmp_path / "b.csv"])
    with pytest.raises(ConfigError, match="at least one path"):
        DataConnector.from_sources([])


# -- bad arguments -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -3, 2.5, "64", True])
def test_bad_batch_size_names_parameter_and_value(frame: DataConnector, bad: object) -> None:
    with pytest.raises(ConfigError, match=rf"batch_size must be a positive integer, got {bad!r}"):
        list(frame.iter_batches(bad))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=rf"batch_size .* got {bad!r}"):
        frame.to_torch_dataset(batch_size=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, 1.5, "10"])
def test_bad_limit(frame: DataConnector, bad: object) -> None:
    with pytest.raises(ConfigError, match=rf"limit must be None or an integer >= 0, got {bad!r}"):
        frame.to_pandas(limit=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("obj", [[{"a": 1}], {"a": [1, 2]}, np.arange(3), "SELECT 1"])
def test_unsupported_from_dataframe_type(obj: object) -> None:
    with pytest.raises(ConfigError) as info:
        DataConnector.from_dataframe(obj)
    message = str(info.value)
    assert f"cannot read a {type(obj).__module__}.{type(obj).__qualname__}" in message
    assert "DuckDB relation" in message and "from_sql" in message
    assert isinstance(info.value, ValueError)


def test_bad_from_sql_arguments() -> None:
    with pytest.raises(ConfigError, match="needs a SQL string"):
        DataConnector.from_sql("   ")
    with pytest.raises(ConfigError, match="cannot reach mysql:// databases"):
        DataConnector.from_sql("SELECT 1", session="mysql://localhost/db")
    with pytest.raises(ConfigError, match=re.escape("session of type builtins.int")):
        DataConnector.from_sql("SELECT 1", session=42)


def test_bad_equal_flag() -> None:
    with pytest.raises(ConfigError, match="equal must be True or False, got 'yes'"):
        ShardedDataConnector.from_sql("SELECT 1", equal="yes")


# -- empty sources ----------------------------------------------------------------------


@pytest.mark.parametrize("source", ["duckdb", "parquet", "pandas", "csv"])
def test_empty_table_reads_as_zero_rows(source: str, tmp_path: Path) -> None:
    schema = pa.schema([("id", pa.int64()), ("x", pa.float64())])
    empty = schema.empty_table()
    con = duckdb.connect(str(tmp_path / "e.duckdb"))
    con.execute("CREATE TABLE e (id BIGINT, x DOUBLE)")
    pq.write_table(empty, tmp_path / "e.parquet")
    (tmp_path / "e.csv").write_text('"id","x"\n')

    def make(cls: type[DataConnector]) -> DataConnector:
        if source == "duckdb":
            return cls.from_dataframe(con.table("e"))
        if source in ("parquet", "csv"):
            return cls.from_sources(tmp_path / f"e.{source}")
        return cls.from_dataframe(empty.to_pandas())

    connector = make(DataConnector)
    assert connector.columns == ["id", "x"]
    assert connector.to_arrow().num_rows == 0
    assert connector.to_pandas().shape == (0, 2)
    assert connector.to_pandas(limit=10).shape == (0, 2)
    assert list(connector.iter_batches(4)) == []
    assert list(connector.to_torch_dataset(batch_size=4, drop_last_batch=False)) == []
    assert list(connector.to_torch_dataset(shuffle=True)) == []
    sharded = make(ShardedDataConnector)
    for world_size in (1, 3):
        for rank in range(world_size):
            with shard_context(rank, world_size):
                shard = sharded.get_shard()
            assert shard.to_arrow().num_rows == 0
            assert shard.columns == ["id", "x"]
    con.close()


def test_empty_to_ray_dataset(ray_session: None) -> None:
    connector = DataConnector.from_sql("SELECT 1::BIGINT AS id WHERE false")
    ds = connector.to_ray_dataset()
    assert ds.count() == 0
    assert ds.schema().names == ["id"]


# -- context ----------------------------------------------------------------------------


def test_get_shard_outside_a_run_raises_context_error() -> None:
    connector = ShardedDataConnector.from_sql("SELECT range AS id FROM range(10)")
    with pytest.raises(ContextError, match=r"get_shard\(\) only works inside a distributed run"):
        connector.get_shard()
    assert issubclass(ContextError, NeveError)
    with shard_context(0, 2):
        assert connector.get_shard().to_arrow().num_rows == 5
    with pytest.raises(ContextError):  # the context ends with its block
        connector.get_shard()


def test_get_shard_outside_a_run_after_pickling() -> None:
    connector = pickle.loads(pickle.dumps(ShardedDataConnector.from_dataframe(
        pa.table({"id": [1, 2, 3]})
    )))
    with pytest.raises(ContextError):
        connector.get_shard()
