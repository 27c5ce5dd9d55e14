"""SQL sources: DuckDB (a relation, a query on a connection or a database file) and ADBC.

Both push work down to the database: the columns a consumer needs are projected
in the query, and categorical discovery runs ``SELECT DISTINCT`` there. A
PostgreSQL query given by URI is read by the workers themselves, in parallel and
inside one snapshot (:mod:`neve._internal.data.postgres`); other SQL is streamed by
the driver into a spill the workers read (:mod:`neve._internal.data.plans`).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa

from neve._internal.data.errors import source_error
from neve._internal.data.fragments import Plan
from neve._internal.data.sources import STREAM_BATCH_ROWS, Source, distinct_of

logger = logging.getLogger(__name__)


def quote(name: str) -> str:
    """A SQL identifier, double-quoted (DuckDB, PostgreSQL, SQLite, Snowflake)."""
    return '"' + name.replace('"', '""') + '"'


def select_list(columns: Sequence[str]) -> str:
    return ", ".join(quote(c) for c in columns)


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


#: DuckDB's memory limit while neve streams a plain scan of a database file. DuckDB
#: keeps every block it reads cached in its buffer pool, up to its limit (80% of RAM
#: by default): 2.3 GiB for a 2.2 GiB table. A scan needs little, so the limit is
#: lowered while neve streams, and restored after.
SCAN_MEMORY_LIMIT = "256MB"
_OPERATOR = re.compile(r"╭─ ([^─]+?) ─")


def _plain_scan(relation: Any) -> bool:
    """Whether DuckDB plans ``relation`` as scans, projections and filters only."""
    operators = _OPERATOR.findall(relation.explain())
    return bool(operators) and all(
        "Scan" in op or op in ("Projection", "Filter") for op in operators)


@contextlib.contextmanager
def _lean_buffer_pool(relation: Any) -> Iterator[None]:
    """Keep DuckDB from caching a database file's blocks while a plain scan streams.

    The limit is the database instance's (every connection of this process to the
    file shares it): it is lowered on a connection of neve's own to the same
    instance, and put back however the scan ends. Queries that need memory (joins,
    aggregates) and in-memory databases are left alone.
    """
    import duckdb

    try:
        (limit, path), = relation.query(
            "neve_r", "SELECT current_setting('memory_limit'), (SELECT path FROM "
            "duckdb_databases() WHERE database_name = current_database())").fetchall()
        plain = _plain_scan(relation)
    except duckdb.Error:
        plain, path = False, None
    if not plain or not path:
        yield
        return
    connection = _connect_read_only(path)  # joins this process's instance of the file
    try:
        connection.sql(f"SET memory_limit = '{SCAN_MEMORY_LIMIT}'")
        yield
    finally:
        with contextlib.suppress(duckdb.Error):
            connection.sql(f"SET memory_limit = '{limit}'")
        connection.close()


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
                "neve ships its rows as fragments instead"
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
                rel = rel.project(select_list(columns))
            # DuckDB runs the scan in parallel and hands over Arrow batches as they come.
            with _lean_buffer_pool(rel):
                yield from rel.to_arrow_reader(STREAM_BATCH_ROWS)

    def has_rows(self) -> bool | None:
        """Whether a plain scan finds a row (``None`` for a query that would run fully)."""
        import duckdb

        with self._open() as rel, source_error(self.description):
            try:
                if not _plain_scan(rel):
                    return None
            except duckdb.Error:
                return None
            return bool(rel.limit(1).fetchall())

    def null_counts(self, columns: Sequence[str]) -> tuple[dict[str, int], int]:
        """NULLs per column and the row count, counted by DuckDB."""
        counts = ", ".join(f"count({quote(c)})" for c in columns)
        with self._open() as rel, source_error(self.description):
            total, *present = rel.aggregate(f"count(*), {counts}").fetchall()[0]
        return {c: int(total) - int(n) for c, n in zip(columns, present, strict=True)}, int(total)

    def distinct(self, column: str, limit: int) -> list[Any] | None:
        with self._open() as rel, source_error(self.description):
            values = (rel.project(quote(column)).filter(f"{quote(column)} IS NOT NULL")
                      .distinct().limit(limit))
            return distinct_of(values.to_arrow_table().to_batches(), limit)


ADBC_SCHEMES = {
    "postgresql": "adbc_driver_postgresql",
    "postgres": "adbc_driver_postgresql",
    "sqlite": "adbc_driver_sqlite",
    "snowflake": "adbc_driver_snowflake",
    "grpc": "adbc_driver_flightsql",
    "grpc+tls": "adbc_driver_flightsql",
    "grpc+tcp": "adbc_driver_flightsql",
}


def adbc_connect(uri: str, *, autocommit: bool = False) -> Any:
    """Open an ADBC DB-API connection for a URI, naming the driver to install."""
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
            return driver.connect(uri.split("://", 1)[1] or ":memory:", autocommit=autocommit)
        return driver.connect(uri, autocommit=autocommit)


def is_postgres(uri: str | None) -> bool:
    return uri is not None and uri.split("://", 1)[0].lower() in ("postgresql", "postgres")


class ADBCSource(Source):
    """A SQL query over an ADBC connection (PostgreSQL, SQLite, Snowflake, Flight SQL).

    ``partition_column`` names a numeric column to split a PostgreSQL query on when
    it is not a plain scan of one table (whose ``ctid`` ranges split it by themselves).
    """

    def __init__(self, query: str, *, uri: str | None = None, connection: Any = None,
                 partition_column: str | None = None) -> None:
        self.query = query.strip().rstrip(";")
        self.uri = uri
        self._connection = connection
        self.partition_column = partition_column
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

    def projected(self, columns: Sequence[str] | None) -> str:
        """The query with only ``columns`` selected (the database drops the rest)."""
        if columns is None:
            return self.query
        return f"SELECT {select_list(columns)} FROM ({self.query}) AS neve_q"

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
            cursor.execute(self.projected(columns))
            yield from cursor.fetch_record_batch()

    def plan(self, columns: Sequence[str] | None, *, sized: bool = False) -> Plan | None:
        if not is_postgres(self.uri):
            return None  # a connection object, or a database without parallel reads here
        from neve._internal.data.postgres import plan_postgres

        return plan_postgres(self, columns, sized=sized)

    def distinct(self, column: str, limit: int) -> list[Any] | None:
        query = (f"SELECT DISTINCT {quote(column)} FROM ({self.query}) AS neve_q "
                 f"WHERE {quote(column)} IS NOT NULL LIMIT {int(limit)}")
        with self._cursor() as cursor, source_error(self.description):
            cursor.execute(query)
            return distinct_of(cursor.fetch_arrow_table().to_batches(), limit)
