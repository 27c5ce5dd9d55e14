"""Turn what a user hands to a constructor into a :class:`Source`."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa

from neve._internal.data.fragments import Fragment, Piece, Plan
from neve._internal.data.sources import (
    ADBC_SCHEMES,
    ADBCSource,
    ArrowSource,
    DuckDBSource,
    RayDatasetSource,
    Source,
)
from neve.exceptions import ConfigError


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
        return ArrowSource(df.read_all(), "Arrow stream")
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
        return ArrowSource(pa.Table.from_pandas(df.to_pandas(), preserve_index=False),
                           "Snowpark DataFrame")
    if hasattr(df, "__arrow_c_stream__"):
        return ArrowSource(pa.table(df), f"{type(df).__name__} (Arrow stream)")
    raise ConfigError(
        f"from_dataframe cannot read a {kind}: pass a DuckDB relation, a pandas, polars or "
        "pyarrow table, or a ray.data.Dataset (for files use from_sources, for SQL from_sql)"
    )


def source_from_sql(query: str, session: Any = None) -> Source:
    """A source for SQL on DuckDB (connection, file, default) or over ADBC."""
    if not isinstance(query, str) or not query.strip():
        raise ConfigError(f"from_sql needs a SQL string, got {query!r}")
    if session is None:
        return DuckDBSource(query=query)
    kind = _type_path(session)
    if kind.startswith("duckdb") or kind.startswith("_duckdb"):
        return DuckDBSource(query=query, connection=session)
    if kind.startswith("adbc_driver_"):  # adbc_driver_manager.dbapi, adbc_driver_sqlite.dbapi
        return ADBCSource(query, connection=session)
    if isinstance(session, (str, os.PathLike)):
        target = os.fspath(session)
        scheme = target.split("://", 1)[0].lower() if "://" in target else None
        if scheme in ADBC_SCHEMES:
            return ADBCSource(query, uri=target)
        if scheme is not None:
            raise ConfigError(
                f"from_sql cannot reach {scheme}:// databases; session may be a DuckDB "
                f"connection or file, or an ADBC URI ({', '.join(sorted(ADBC_SCHEMES))})"
            )
        if not os.path.exists(target):
            from neve.exceptions import SourceError

            raise SourceError(f"no such DuckDB database file: {target!r}")
        return DuckDBSource(query=query, database=target)
    raise ConfigError(
        f"from_sql cannot use a session of type {kind}: pass a DuckDB connection or file "
        "path, or an ADBC connection or URI"
    )


class PlanSource(Source):
    """Pieces of a plan: what a worker reads of a shard (picklable)."""

    def __init__(self, pieces: list[Piece], schema: pa.Schema, description: str) -> None:
        self.pieces = pieces
        self._schema = schema
        self.description = description

    @classmethod
    def whole(cls, plan: Plan, description: str) -> PlanSource:
        return cls(plan.pieces(), plan.schema, description)

    @property
    def num_rows(self) -> int:
        return sum(p.stop - p.start for p in self.pieces)

    def schema(self) -> pa.Schema:
        return self._schema

    def stream(self, columns: Sequence[str] | None) -> Iterator[pa.RecordBatch]:
        for piece in self.pieces:
            yield from piece.read(columns)

    def fragments(self, columns: Sequence[str] | None) -> list[Fragment] | None:
        return [p.as_fragment() for p in self.pieces if p.stop > p.start]
