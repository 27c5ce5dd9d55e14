"""Turn what a user hands to a constructor into a :class:`Source`."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa

from neve._internal.data.fragments import Fragment, Piece, Plan
from neve._internal.data.sources import (
    ArrowSource,
    RayDatasetSource,
    SnowparkSource,
    Source,
    StreamSource,
)
from neve._internal.data.sql import ADBC_SCHEMES, ADBCSource, DuckDBSource
from neve.exceptions import ConfigError, SourceError


def _type_path(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def source_from_dataframe(df: Any) -> Source:
    """A source for a DuckDB relation, pandas/polars/pyarrow frame, Ray or Snowpark frame."""
    kind = _type_path(df)
    if isinstance(df, pa.Table):
        return ArrowSource(df)
    if isinstance(df, pa.RecordBatch):
        return ArrowSource(pa.Table.from_batches([df]))
    if isinstance(df, pa.RecordBatchReader):
        return StreamSource(df)
    if kind.startswith("duckdb") and hasattr(df, "to_arrow_reader"):
        return DuckDBSource(relation=df)
    if kind.startswith("pandas."):
        return ArrowSource(pa.Table.from_pandas(df, preserve_index=False), "pandas DataFrame")
    if kind.startswith("polars."):
        frame = df.collect() if hasattr(df, "collect") else df
        return ArrowSource(frame.to_arrow(), "polars DataFrame")
    if kind.startswith("ray.data"):
        return RayDatasetSource(df)
    if kind.startswith("snowflake.snowpark"):
        return SnowparkSource(df)
    if hasattr(df, "__arrow_c_stream__"):
        reader = pa.RecordBatchReader.from_stream(df)
        return StreamSource(reader, f"{type(df).__name__} (Arrow stream)")
    raise ConfigError(
        f"from_dataframe cannot read a {kind}: pass a DuckDB relation, a pandas, polars or "
        "pyarrow table, or a ray.data.Dataset (for files use from_sources, for SQL from_sql)"
    )


def source_from_sql(query: str, session: Any = None, *,
                    partition_column: str | None = None) -> Source:
    """A source for SQL on DuckDB (connection, file, default) or over ADBC."""
    if not isinstance(query, str) or not query.strip():
        raise ConfigError(f"from_sql needs a SQL string, got {query!r}")
    if partition_column is not None and not isinstance(partition_column, str):
        raise ConfigError(f"partition_column must be a column name, got {partition_column!r}")
    adbc = _adbc_target(session)
    if partition_column is not None and adbc is None:
        raise ConfigError(
            "partition_column splits a query over PostgreSQL (session='postgresql://...'); "
            "DuckDB and files are split without it: leave it out"
        )
    if adbc is not None:
        uri, connection = adbc
        return ADBCSource(query, uri=uri, connection=connection,
                          partition_column=partition_column)
    if session is None:
        return DuckDBSource(query=query)
    kind = _type_path(session)
    if kind.startswith("duckdb") or kind.startswith("_duckdb"):
        return DuckDBSource(query=query, connection=session)
    if isinstance(session, (str, os.PathLike)):
        target = os.fspath(session)
        if "://" in target:
            scheme = target.split("://", 1)[0].lower()
            raise ConfigError(
                f"from_sql cannot reach {scheme}:// databases; session may be a DuckDB "
                f"connection or file, or an ADBC URI ({', '.join(sorted(ADBC_SCHEMES))})"
            )
        if not os.path.exists(target):
            raise SourceError(f"no such DuckDB database file: {target!r}")
        return DuckDBSource(query=query, database=target)
    raise ConfigError(
        f"from_sql cannot use a session of type {kind}: pass a DuckDB connection or file "
        "path, or an ADBC connection or URI"
    )


def _adbc_target(session: Any) -> tuple[str | None, Any] | None:
    """``(uri, connection)`` when ``session`` is an ADBC URI or connection."""
    if _type_path(session).startswith("adbc_driver_"):  # adbc_driver_manager.dbapi, ...
        return None, session
    if isinstance(session, (str, os.PathLike)):
        target = os.fspath(session)
        if "://" in target and target.split("://", 1)[0].lower() in ADBC_SCHEMES:
            return target, None
    return None


class PlanSource(Source):
    """Pieces of a plan: what a worker reads of a shard (picklable).

    Pieces whose fragments are slow or costly to read again (a PostgreSQL range,
    a spill on object storage) are copied to this process's local disk when first
    read, and read from there ever after (see ``spill.localize``).
    """

    def __init__(self, pieces: list[Piece], schema: pa.Schema, description: str) -> None:
        self.pieces = pieces
        self._schema = schema
        self.description = description
        self._local: list[Piece] | None = None

    @classmethod
    def whole(cls, plan: Plan, description: str) -> PlanSource:
        return cls(plan.pieces(), plan.schema, description)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_local": None}  # local copies stay on this node

    def local_pieces(self) -> list[Piece]:
        if self._local is None:
            from neve._internal.data.spill import localize

            self._local = localize(self.pieces)
        return self._local

    @property
    def num_rows(self) -> int:
        counts = [p.num_rows for p in self.pieces]
        if any(n is None for n in counts):
            counts = [p.num_rows for p in self.local_pieces()]
        return sum(n or 0 for n in counts)

    def schema(self) -> pa.Schema:
        return self._schema

    def stream(self, columns: Sequence[str] | None) -> Iterator[pa.RecordBatch]:
        for piece in self.local_pieces():
            yield from piece.read(columns)

    def fragments(self, columns: Sequence[str] | None) -> list[Fragment] | None:
        return [p.as_fragment() for p in self.local_pieces() if p.num_rows != 0]
