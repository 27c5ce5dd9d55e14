"""Fragments: the units a worker reads, and plans that split them into shards.

A *fragment* is a picklable description of some rows that any process of the
cluster can read on its own (a Parquet row group, a record batch of an Arrow IPC
file, an Arrow block in Ray's object store, an in-memory table). It knows its
row count up front, so a plan can cut the concatenation of all fragments into
``world_size`` contiguous row ranges: every row lands in exactly one shard.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

logger = logging.getLogger(__name__)


class Fragment(ABC):
    """Rows that one process can read without the driver."""

    num_rows: int

    @abstractmethod
    def read(
        self, columns: Sequence[str] | None, start: int, stop: int
    ) -> Iterator[pa.RecordBatch]:
        """Yield rows ``[start, stop)`` of this fragment, projected to ``columns``."""


def _slice_stream(
    batches: Iterator[pa.RecordBatch], start: int, stop: int
) -> Iterator[pa.RecordBatch]:
    """Keep rows ``[start, stop)`` of a batch stream, reading no further than needed."""
    offset = 0
    for batch in batches:
        end = offset + batch.num_rows
        if end > start and offset < stop:
            lo = max(start - offset, 0)
            hi = min(stop, end) - offset
            yield batch if (lo == 0 and hi == batch.num_rows) else batch.slice(lo, hi - lo)
        offset = end
        if offset >= stop:
            return


def _project(batch: pa.RecordBatch, columns: Sequence[str] | None) -> pa.RecordBatch:
    return batch if columns is None else batch.select(list(columns))


@dataclass
class TableFragment(Fragment):
    """An Arrow table held in this process (pickled along where it travels)."""

    table: pa.Table

    @property
    def num_rows(self) -> int:  # type: ignore[override]
        return self.table.num_rows

    def read(
        self, columns: Sequence[str] | None, start: int, stop: int
    ) -> Iterator[pa.RecordBatch]:
        table = self.table.slice(start, stop - start)
        if columns is not None:
            table = table.select(list(columns))
        yield from table.to_batches()


@dataclass
class ObjectRefFragment(Fragment):
    """An Arrow table or record batch stored in Ray's object store."""

    ref: Any  # ray.ObjectRef; typed loosely so this module imports without Ray
    num_rows: int

    def read(
        self, columns: Sequence[str] | None, start: int, stop: int
    ) -> Iterator[pa.RecordBatch]:
        import ray

        block = ray.get(self.ref)
        if isinstance(block, pa.RecordBatch):
            yield _project(block.slice(start, stop - start), columns)
        else:
            yield from TableFragment(block).read(columns, start, stop)


@dataclass
class ParquetRowGroupFragment(Fragment):
    """One row group of a Parquet file on any fsspec filesystem."""

    path: str
    filesystem: Any  # fsspec.AbstractFileSystem
    row_group: int
    num_rows: int
    batch_rows: int = 65_536

    def read(
        self, columns: Sequence[str] | None, start: int, stop: int
    ) -> Iterator[pa.RecordBatch]:
        import pyarrow.parquet as pq

        with self.filesystem.open(self.path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            batches = parquet.iter_batches(
                batch_size=self.batch_rows,
                row_groups=[self.row_group],
                columns=list(columns) if columns is not None else None,
            )
            yield from _slice_stream(batches, start, stop)


@dataclass
class IpcBatchFragment(Fragment):
    """One record batch of an Arrow IPC file (memory-mapped when local)."""

    path: str
    filesystem: Any
    batch_index: int
    num_rows: int

    def read(
        self, columns: Sequence[str] | None, start: int, stop: int
    ) -> Iterator[pa.RecordBatch]:
        import pyarrow.ipc as ipc

        local = getattr(self.filesystem, "protocol", None) in ("file", ("file", "local"))
        if local:
            with pa.memory_map(self.path, "r") as source:
                batch = ipc.open_file(source).get_batch(self.batch_index)
                yield _project(batch.slice(start, stop - start), columns)
        else:
            with self.filesystem.open(self.path, "rb") as handle:
                batch = ipc.open_file(handle).get_batch(self.batch_index)
                yield _project(batch.slice(start, stop - start), columns)


@dataclass
class SliceFragment(Fragment):
    """Rows ``[offset, offset + num_rows)`` of another fragment, renumbered from 0."""

    fragment: Fragment
    offset: int
    num_rows: int

    def read(
        self, columns: Sequence[str] | None, start: int, stop: int
    ) -> Iterator[pa.RecordBatch]:
        yield from self.fragment.read(columns, self.offset + start, self.offset + stop)


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of one fragment."""

    fragment: Fragment
    start: int
    stop: int

    def read(self, columns: Sequence[str] | None) -> Iterator[pa.RecordBatch]:
        if self.stop > self.start:
            yield from self.fragment.read(columns, self.start, self.stop)

    def as_fragment(self) -> Fragment:
        if self.start == 0 and self.stop == self.fragment.num_rows:
            return self.fragment
        return SliceFragment(self.fragment, self.start, self.stop - self.start)


@dataclass
class Plan:
    """An ordered list of fragments and the schema they share."""

    fragments: list[Fragment]
    schema: pa.Schema

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.fragments)

    def pieces(self, start: int = 0, stop: int | None = None) -> list[Piece]:
        """The pieces covering global rows ``[start, stop)``."""
        stop = self.num_rows if stop is None else stop
        out: list[Piece] = []
        offset = 0
        for fragment in self.fragments:
            end = offset + fragment.num_rows
            if end > start and offset < stop:
                out.append(Piece(fragment, max(start - offset, 0), min(stop, end) - offset))
            offset = end
        return out

    def shard(self, rank: int, world_size: int, *, equal: bool = False) -> list[Piece]:
        """This rank's contiguous share: every row in exactly one of the shards."""
        start, stop = shard_bounds(self.num_rows, rank, world_size, equal=equal)
        return self.pieces(start, stop)


def shard_bounds(
    num_rows: int, rank: int, world_size: int, *, equal: bool = False
) -> tuple[int, int]:
    """Global row range of shard ``rank``: sizes differ by at most one row.

    With ``equal=True`` every shard gets ``num_rows // world_size`` rows and the
    remainder (fewer than ``world_size`` rows) is dropped.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if equal:
        per = num_rows // world_size
        return rank * per, (rank + 1) * per
    return rank * num_rows // world_size, (rank + 1) * num_rows // world_size
