"""Sources: where rows come from, each described as Arrow record batches.

Every source offers these ways to be read:

* ``stream(columns)`` - the driver reads the source itself, batch by batch;
* ``fragments(columns)`` - fragments any worker can read on its own (files, row
  groups, object-store blocks), or ``None`` when the driver must stream the rows;
* ``plan(columns, sized=...)`` - a plan for the workers that the source makes by
  itself (its fragments; a PostgreSQL snapshot cut into ``ctid`` ranges), or ``None``;
* ``distinct(column, limit)`` - the distinct values of a column, computed where the
  data lives (a ``SELECT DISTINCT`` in the database), or ``None``.

SQL sources live in :mod:`neve._internal.data.sql`, files in
:mod:`neve._internal.data.files`. No output knows which source it came from:
everything downstream consumes Arrow.
"""

from __future__ import annotations

import logging
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from neve._internal.data.fragments import Fragment, Plan, TableFragment
from neve._internal.runtime.tasks import LazyRemote

logger = logging.getLogger(__name__)

STREAM_BATCH_ROWS = 131_072


def projected_schema(schema: pa.Schema, columns: Sequence[str] | None) -> pa.Schema:
    return schema if columns is None else pa.schema([schema.field(c) for c in columns])


class Source(ABC):
    """Something that yields Arrow record batches."""

    #: a short human description for messages ("DuckDB query ...", "3 Parquet files")
    description: str = "source"
    #: the rows already sit in this process's memory (a pandas/polars/pyarrow frame)
    in_memory: bool = False

    @abstractmethod
    def schema(self) -> pa.Schema:
        """The Arrow schema of every batch."""

    @abstractmethod
    def stream(self, columns: Sequence[str] | None) -> Iterator[pa.RecordBatch]:
        """Read the whole source in this process, batch by batch."""

    def fragments(self, columns: Sequence[str] | None) -> list[Fragment] | None:
        """Fragments any process can read, or ``None`` if only this one can."""
        return None

    def plan(self, columns: Sequence[str] | None, *, sized: bool = False) -> Plan | None:
        """A plan the workers read without the driver streaming rows, or ``None``.

        ``sized=True`` asks for fragments whose row counts are known.
        """
        fragments = self.fragments(columns)
        if fragments is None:
            return None
        return Plan(fragments, projected_schema(self.schema(), columns))

    def distinct(self, column: str, limit: int) -> list[Any] | None:
        """Up to ``limit`` distinct non-NULL values of ``column``, computed where the
        rows live; ``None`` when this source cannot (the caller reads fragments)."""
        return None


def distinct_of(batches: Iterator[pa.RecordBatch] | Sequence[pa.RecordBatch],
                limit: int) -> list[Any]:
    """Distinct non-NULL values of the only column of ``batches`` (up to ``limit``)."""
    seen: set[Any] = set()
    for batch in batches:
        column = batch.column(0)
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        seen.update(v for v in pc.unique(column).to_pylist() if v is not None)
        if len(seen) >= limit:
            break
    return list(seen)[:limit]


class ArrowSource(Source):
    """An in-memory Arrow table (from pandas, polars, pyarrow)."""

    in_memory = True

    def __init__(self, table: pa.Table, description: str = "Arrow table") -> None:
        self.table = table
        self.description = description

    def schema(self) -> pa.Schema:
        return self.table.schema

    def stream(self, columns: Sequence[str] | None) -> Iterator[pa.RecordBatch]:
        table = self.table if columns is None else self.table.select(list(columns))
        yield from table.to_batches(max_chunksize=STREAM_BATCH_ROWS)

    def local_fragments(self, columns: Sequence[str] | None) -> list[Fragment]:
        """The table cut into fragments (zero-copy), for this process only."""
        table = self.table if columns is None else self.table.select(list(columns))
        n = table.num_rows
        return [TableFragment(table.slice(i, STREAM_BATCH_ROWS))
                for i in range(0, n, STREAM_BATCH_ROWS)] or [TableFragment(table)]

    def distinct(self, column: str, limit: int) -> list[Any] | None:
        return distinct_of(self.table.select([column]).to_batches(), limit)


class StreamSource(Source):
    """A one-shot Arrow stream (``RecordBatchReader``, an ``__arrow_c_stream__``
    object): written once to a local spill as it is first read, never read whole
    into memory; every later read comes from the spill."""

    def __init__(self, reader: pa.RecordBatchReader, description: str = "Arrow stream") -> None:
        self._reader: pa.RecordBatchReader | None = reader
        self._schema = reader.schema
        self.description = description
        self._fragments: list[Fragment] | None = None

    def schema(self) -> pa.Schema:
        return self._schema

    def _spilled(self) -> list[Fragment]:
        if self._fragments is None:
            from neve._internal.data.spill import SpillFolder, write_ipc

            reader, self._reader = self._reader, None
            if reader is None:
                raise RuntimeError(f"{self.description} was already consumed")
            folder = SpillFolder(kind="stream")
            weakref.finalize(self, folder.release)
            self._fragments = write_ipc(reader, self._schema, folder)
        return self._fragments

    def stream(self, columns: Sequence[str] | None) -> Iterator[pa.RecordBatch]:
        for fragment in self._spilled():
            yield from fragment.read(columns)

    def fragments(self, columns: Sequence[str] | None) -> list[Fragment] | None:
        from neve._internal.runtime.cluster import single_node

        fragments = self._spilled()
        return fragments if single_node() else None  # a local file: this node only

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("an Arrow stream cannot leave this process; neve ships its rows "
                        "as fragments instead")


class SnowparkSource(Source):
    """A Snowpark DataFrame, read batch by batch (``to_pandas_batches``), never whole."""

    description = "Snowpark DataFrame"

    def __init__(self, df: Any) -> None:
        self.df = df
        self._schema: pa.Schema | None = None

    def schema(self) -> pa.Schema:
        if self._schema is None:
            self._schema = pa.Schema.from_pandas(self.df.limit(0).to_pandas(),
                                                 preserve_index=False)
        return self._schema

    def stream(self, columns: Sequence[str] | None) -> Iterator[pa.RecordBatch]:
        frame = self.df if columns is None else self.df.select(*columns)
        for part in frame.to_pandas_batches():
            table = pa.Table.from_pandas(part, preserve_index=False)
            yield from table.to_batches(max_chunksize=STREAM_BATCH_ROWS)


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

        from neve._internal.data.fragments import ObjectRefFragment
        from neve._internal.runtime.tasks import gather

        dataset = self.dataset if columns is None else self.dataset.select_columns(list(columns))
        refs = dataset.to_arrow_refs()
        counts = gather([_num_rows.remote(ref) for ref in refs],
                        f"counting the rows of the Ray Dataset's {len(refs)} blocks",
                        "the cluster has no free CPU for Ray Data's tasks, or a node died")
        return [ObjectRefFragment(ref, n) for ref, n in zip(refs, counts, strict=True) if n]


def _remote_num_rows(table: pa.Table) -> int:
    return int(table.num_rows)


_num_rows = LazyRemote(_remote_num_rows)
