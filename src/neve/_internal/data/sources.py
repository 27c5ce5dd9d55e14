"""Sources: where rows come from, each described as Arrow record batches.

Every source offers two ways to be read:

* ``stream(columns)`` - the driver reads the source itself, batch by batch;
* ``fragments(columns)`` - a list of :class:`Fragment` that any worker can read on
  its own (files, row groups, object-store blocks), or ``None`` when only this
  process can read the source (a DuckDB connection, an ADBC cursor).

No output knows which source it came from: everything downstream consumes Arrow.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa

from neve._internal.data.errors import source_error
from neve._internal.data.fragments import Fragment, TableFragment

logger = logging.getLogger(__name__)

STREAM_BATCH_ROWS = 131_072


class Source(ABC):
    """Something that yields Arrow record batches."""

    #: a short human description for messages ("DuckDB query ...", "3 Parquet files")
    description: str = "source"

    @abstractmethod
    def schema(self) -> pa.Schema:
        """The Arrow schema of every batch."""

    @abstractmethod
    def stream(self, columns: Sequence[str] | None) -> Iterator[pa.RecordBatch]:
        """Read the whole source in this process, batch by batch."""

    def fragments(self, columns: Sequence[str] | None) -> list[Fragment] | None:
        """Fragments any process can read, or ``None`` if only this one can."""
        return None


class ArrowSource(Source):
    """An in-memory Arrow table (from pandas, polars, pyarrow)."""

    def __init__(self, table: pa.Table, description: str = "Arrow table") -> None:
        self.table = table
        self.description = description

    def schema(self) -> pa.Schema:
        return self.table.schema

    def stream(self, columns: Sequence[str] | None) -> Iterator[pa.RecordBatch]:
        table = self.table if columns is None else self.table.select(list(columns))
        yield from table.to_batches(max_chunksize=STREAM_BATCH_ROWS)

    def local_fragments(self) -> list[Fragment]:
        """The table cut into fragments (zero-copy), for this process only."""
        n = self.table.num_rows
        step = max(STREAM_BATCH_ROWS, 1)
        return [TableFragment(self.table.slice(i, step)) for i in range(0, n, step)] or [
            TableFragment(self.table)
        ]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _connect_read_only(database: str) -> Any:
    """Open a DuckDB file read-only, or share this process's open read-write instance.

    DuckDB refuses a read-only connection to a file this process already holds open
    for writing ("different configuration"); a plain connect then reuses that instance.
    """
    import duckdb

    try:
        return duckdb.connect(database, read_only=True)
    except duckdb.ConnectionException as exc:
        if "different configuration" not in str(exc):
            raise
        return duckdb.connect(database)


class DuckDBSource(Source):
    """A DuckDB relation, or a query on a DuckDB connection or database file."""

    def __init__(
        self,
        *,
        relation: Any = None,
        query: str | None = None,
        connection: Any = None,
        database: str | None = None,
    ) -> None:
        self._relation = relation
        self.query = query
        self._connection = connection
        self.database = database
        if relation is not None:
            self.description = "DuckDB relation"
        elif database is not None:
            self.description = f"DuckDB query on {database!r}"
        else:
            self.description = "DuckDB query"
        self._schema: pa.Schema | None = None

    def __getstate__(self) -> dict[str, Any]:
        if self.database is None:
            raise TypeError(
                "a DuckDB relation or connection cannot leave this process; "
                "neve ships its rows as Arrow blocks instead"
            )
        state = dict(self.__dict__)
        state["_connection"] = None
        return state

    @contextlib.contextmanager
    def _open(self) -> Iterator[Any]:
        import duckdb

        if self._relation is not None:
            yield self._relation
            return
        with source_error(self.description):
            if self._connection is not None:
                yield self._connection.sql(self.query)
            elif self.database is not None:
                con = _connect_read_only(self.database)
                try:
                    yield con.sql(self.query)
                finally:
                    con.close()
            else:
                yield duckdb.sql(self.query)

    def schema(self) -> pa.Schema:
        if self._schema is None:
            with self._open() as rel, source_error(self.description):
                self._schema = rel.limit(0).to_arrow_table().schema
        return self._schema

    def stream(self, columns: Sequence[str] | None) -> Iterator[pa.RecordBatch]:
        with self._open() as rel, source_error(self.description):
            if columns is not None:
                rel = rel.project(", ".join(_quote(c) for c in columns))
            reader = rel.to_arrow_reader(STREAM_BATCH_ROWS)
            yield from reader


ADBC_SCHEMES = {
    "postgresql": "adbc_driver_postgresql",
    "postgres": "adbc_driver_postgresql",
    "sqlite": "adbc_driver_sqlite",
    "snowflake": "adbc_driver_snowflake",
    "grpc": "adbc_driver_flightsql",
    "grpc+tls": "adbc_driver_flightsql",
    "grpc+tcp": "adbc_driver_flightsql",
}


def adbc_connect(uri: str) -> Any:
    """Open an ADBC DB-API connection for a URI, naming the driver to install."""
    import importlib

    scheme = uri.split("://", 1)[0].lower()
    module_name = ADBC_SCHEMES[scheme]
    try:
        driver = importlib.import_module(f"{module_name}.dbapi")
    except ImportError as exc:
        package = module_name.replace("_", "-")
        raise ImportError(
            f"reading {scheme}:// needs {package}: pip install 'neve[sql]' "
            f"(or pip install {package})"
        ) from exc
    with source_error(f"connecting to {scheme}://"):
        if scheme == "sqlite":
            return driver.connect(uri.split("://", 1)[1] or ":memory:")
        return driver.connect(uri)


class ADBCSource(Source):
    """A SQL query over an ADBC connection (PostgreSQL, SQLite, Snowflake, Flight SQL)."""

    def __init__(self, query: str, *, uri: str | None = None, connection: Any = None) -> None:
        self.query = query
        self.uri = uri
        self._connection = connection
        target = uri.split("://", 1)[0] if uri else "ADBC"
        self.description = f"{target} query {query[:60]!r}"
        self._schema: pa.Schema | None = None

    def __getstate__(self) -> dict[str, Any]:
        if self.uri is None:
            raise TypeError("an ADBC connection cannot leave this process")
        state = dict(self.__dict__)
        state["_connection"] = None
        return state

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[Any]:
        own = self._connection is None
        connection = adbc_connect(self.uri) if own else self._connection  # type: ignore[arg-type]
        try:
            cursor = connection.cursor()
            try:
                yield cursor
            finally:
                cursor.close()
        finally:
            if own:
                connection.close()

    def schema(self) -> pa.Schema:
        if self._schema is None:
            with self._cursor() as cursor, source_error(self.description):
                try:  # without running the query, where the driver can (PostgreSQL)
                    self._schema = cursor.adbc_execute_schema(self.query)
                except Exception as exc:
                    unsupported = "NotSupported" in type(exc).__name__
                    if not unsupported and "NOT_IMPLEMENTED" not in str(exc):
                        raise
                    cursor.execute(self.query)
                    reader = cursor.fetch_record_batch()
                    self._schema = reader.schema
                    reader.close()
        return self._schema

    def stream(self, columns: Sequence[str] | None) -> Iterator[pa.RecordBatch]:
        with self._cursor() as cursor, source_error(self.description):
            cursor.execute(self.query)
            reader = cursor.fetch_record_batch()
            for batch in reader:
                yield batch if columns is None else batch.select(list(columns))


class RayDatasetSource(Source):
    """A ``ray.data.Dataset``; its blocks stay in the object store."""

    description = "Ray Dataset"

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def schema(self) -> pa.Schema:
        schema = self.dataset.schema()
        base = getattr(schema, "base_schema", schema)
        if isinstance(base, pa.Schema):
            return base
        return pa.schema(list(zip(schema.names, schema.types, strict=True)))

    def stream(self, columns: Sequence[str] | None) -> Iterator[pa.RecordBatch]:
        dataset = self.dataset if columns is None else self.dataset.select_columns(list(columns))
        for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            yield from table.to_batches()

    def fragments(self, columns: Sequence[str] | None) -> list[Fragment] | None:
        import ray

        from neve._internal.data.fragments import ObjectRefFragment

        dataset = self.dataset if columns is None else self.dataset.select_columns(list(columns))
        refs = dataset.to_arrow_refs()
        counts = ray.get([_num_rows.remote(ref) for ref in refs])
        return [ObjectRefFragment(ref, n) for ref, n in zip(refs, counts, strict=True) if n]


def _remote_num_rows(table: pa.Table) -> int:
    return int(table.num_rows)


class _LazyRemote:
    """``ray.remote`` applied on first use, so importing neve does not import Ray."""

    def __init__(self, fn: Any) -> None:
        self._fn = fn
        self._remote: Any = None

    def remote(self, *args: Any) -> Any:
        if self._remote is None:
            import ray

            self._remote = ray.remote(num_cpus=0)(self._fn)
        return self._remote.remote(*args)


_num_rows = _LazyRemote(_remote_num_rows)
