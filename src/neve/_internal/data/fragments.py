"""Fragments: the units a worker reads, and plans that split them into shards.

A *fragment* is a picklable description of some rows that any process of the
cluster can read on its own: a Parquet row group, a record batch of an Arrow IPC
spill, an Arrow block in Ray's object store, a ``ctid`` range of a PostgreSQL
table read inside an exported snapshot.

Most fragments know their row count up front (*sized*). Some do not (*unsized*:
a ``ctid`` range, a key range of a query): only reading them tells. A plan cuts
sized fragments into ``world_size`` contiguous row ranges, so every row lands in
exactly one shard and shard sizes differ by at most one row. A plan with unsized
fragments hands out whole fragments instead, balanced by their estimated rows;
``equal=True`` and ranking groups need exact cuts, so such a plan is counted first
(``plans.counted``: the database, or Ray tasks, count them).
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from neve._internal.data.batches import slice_stream

logger = logging.getLogger(__name__)


class Fragment(ABC):
    """Rows that one process can read without the driver."""

    #: rows in the fragment, or ``None`` when only reading it tells
    num_rows: int | None
    #: a worker copies the fragment to its local disk before the first pass: re-reading
    #: it would be slow (object storage) or load a shared server (a database)
    cache_locally: ClassVar[bool] = False

    @property
    def estimated_rows(self) -> int:
        """The row count, or a guess for an unsized fragment (for balancing shards)."""
        return self.num_rows or 0

    @abstractmethod
    def read(
        self, columns: Sequence[str] | None, start: int = 0, stop: int | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Yield rows ``[start, stop)`` of this fragment (all when ``stop`` is None),
        projected to ``columns``."""

    def count(self) -> int:
        """The exact row count (an unsized fragment asks its database)."""
        if self.num_rows is not None:
            return self.num_rows
        return sum(batch.num_rows for batch in self.read(None))

    def cache_key(self) -> str:
        """What identifies this fragment's rows in a worker's local cache."""
        return repr(self)


def project(batch: pa.RecordBatch, columns: Sequence[str] | None) -> pa.RecordBatch:
    return batch if columns is None else batch.select(list(columns))


@dataclass
class TableFragment(Fragment):
    """An Arrow table held in this process (pickled along where it travels)."""

    table: pa.Table

    @property
    def num_rows(self) -> int:  # type: ignore[override]
        return self.table.num_rows

    def read(
        self, columns: Sequence[str] | None, start: int = 0, stop: int | None = None
    ) -> Iterator[pa.RecordBatch]:
        stop = self.table.num_rows if stop is None else stop
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
        self, columns: Sequence[str] | None, start: int = 0, stop: int | None = None
    ) -> Iterator[pa.RecordBatch]:
        import ray

        block = ray.get(self.ref)
        stop = self.num_rows if stop is None else stop
        if isinstance(block, pa.RecordBatch):
            yield project(block.slice(start, stop - start), columns)
        else:
            yield from TableFragment(block).read(columns, start, stop)


def is_local_filesystem(filesystem: Any) -> bool:
    protocol = getattr(filesystem, "protocol", None)
    protocols = protocol if isinstance(protocol, tuple) else (protocol,)
    return any(p in ("file", "local") for p in protocols)


@dataclass
class IpcBatchFragment(Fragment):
    """One record batch of an Arrow IPC file (memory-mapped when local: zero-copy)."""

    path: str
    filesystem: Any  # fsspec.AbstractFileSystem
    batch_index: int
    num_rows: int

    @property
    def cache_locally(self) -> bool:  # type: ignore[override]
        return not is_local_filesystem(self.filesystem)

    def read(
        self, columns: Sequence[str] | None, start: int = 0, stop: int | None = None
    ) -> Iterator[pa.RecordBatch]:
        import pyarrow.ipc as ipc

        stop = self.num_rows if stop is None else stop
        if is_local_filesystem(self.filesystem):
            with pa.memory_map(self.path, "r") as source:
                batch = ipc.open_file(source).get_batch(self.batch_index)
                yield project(batch.slice(start, stop - start), columns)
        else:
            with self.filesystem.open(self.path, "rb") as handle:
                batch = ipc.open_file(handle).get_batch(self.batch_index)
                yield project(batch.slice(start, stop - start), columns)


def with_constants(batch: pa.RecordBatch, constants: dict[str, Any], schema: pa.Schema,
                   columns: Sequence[str] | None) -> pa.RecordBatch:
    """``batch`` plus constant columns (hive partition values), in ``columns`` order."""
    if not constants:
        return batch
    names = list(columns) if columns is not None else schema.names
    arrays = []
    for name in names:
        if name in constants:
            arrays.append(pa.array([constants[name]] * batch.num_rows,
                                   type=schema.field(name).type))
        else:
            arrays.append(batch.column(name))
    return pa.RecordBatch.from_arrays(arrays, names=names)


@dataclass
class ParquetRowGroupFragment(Fragment):
    """One row group of a Parquet file on any fsspec filesystem, with the values of
    its hive partition folders (``year=2024/``) as constant columns."""

    path: str
    filesystem: Any  # fsspec.AbstractFileSystem
    row_group: int
    num_rows: int
    schema: pa.Schema  # the dataset's columns: the file's plus partition columns
    partition: dict[str, Any] = field(default_factory=dict)
    batch_rows: ClassVar[int] = 65_536

    def read(
        self, columns: Sequence[str] | None, start: int = 0, stop: int | None = None
    ) -> Iterator[pa.RecordBatch]:
        import pyarrow.parquet as pq

        wanted = list(columns) if columns is not None else self.schema.names
        in_file = [c for c in wanted if c not in self.partition]
        with self.filesystem.open(self.path, "rb") as handle:
            batches = pq.ParquetFile(handle).iter_batches(
                batch_size=self.batch_rows, row_groups=[self.row_group], columns=in_file)
            for batch in slice_stream(batches, start, stop):
                yield with_constants(batch, self.partition, self.schema, wanted)

    def cache_key(self) -> str:
        return f"{self.path}#{self.row_group}"


@dataclass
class SliceFragment(Fragment):
    """Rows ``[offset, offset + num_rows)`` of another fragment, renumbered from 0."""

    fragment: Fragment
    offset: int
    num_rows: int

    def read(
        self, columns: Sequence[str] | None, start: int = 0, stop: int | None = None
    ) -> Iterator[pa.RecordBatch]:
        stop = self.num_rows if stop is None else stop
        yield from self.fragment.read(columns, self.offset + start, self.offset + stop)


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of one fragment (``stop=None``: to its end)."""

    fragment: Fragment
    start: int = 0
    stop: int | None = None

    @property
    def num_rows(self) -> int | None:
        stop = self.stop if self.stop is not None else self.fragment.num_rows
        return None if stop is None else stop - self.start

    def read(self, columns: Sequence[str] | None) -> Iterator[pa.RecordBatch]:
        if self.num_rows != 0:
            yield from self.fragment.read(columns, self.start, self.stop)

    def as_fragment(self) -> Fragment:
        if self.start == 0 and self.stop in (None, self.fragment.num_rows):
            return self.fragment
        rows = self.num_rows
        assert rows is not None, "only a sized fragment can be sliced"
        return SliceFragment(self.fragment, self.start, rows)


class Lease:
    """What a plan holds on the driver while workers read it: a spill folder, a
    database snapshot. Released once, at the end of the run or with the plan."""

    def __init__(self, *closers: Callable[[], None]) -> None:
        self._closers = list(closers)
        self._lock = threading.Lock()

    def add(self, closer: Callable[[], None]) -> None:
        with self._lock:
            self._closers.append(closer)

    def release(self) -> None:
        with self._lock:
            closers, self._closers = self._closers, []
        for close in reversed(closers):
            try:
                close()
            except Exception:  # releasing is best effort: the rest must still go
                logger.warning("could not release a data plan's resource", exc_info=True)


@dataclass
class Plan:
    """An ordered list of fragments, the schema they share, and what holds them open."""

    fragments: list[Fragment]
    schema: pa.Schema
    lease: Lease | None = field(default=None, compare=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"fragments": self.fragments, "schema": self.schema, "lease": None}

    def release(self) -> None:
        """Give back what the plan holds on the driver (idempotent)."""
        if self.lease is not None:
            self.lease.release()

    @property
    def sized(self) -> bool:
        return all(f.num_rows is not None for f in self.fragments)

    @property
    def num_rows(self) -> int | None:
        """Rows in the plan, or ``None`` while it holds unsized fragments."""
        if not self.sized:
            return None
        return sum(f.num_rows for f in self.fragments)  # type: ignore[misc]

    @property
    def estimated_rows(self) -> int:
        return sum(f.estimated_rows if f.num_rows is None else f.num_rows
                   for f in self.fragments)

    def pieces(self, start: int = 0, stop: int | None = None) -> list[Piece]:
        """The pieces covering global rows ``[start, stop)`` (a sized plan)."""
        total = self.num_rows
        if total is None:
            if start == 0 and stop is None:
                return [Piece(f) for f in self.fragments]
            raise ValueError("rows of an unsized plan cannot be cut: count it first")
        stop = total if stop is None else stop
        out: list[Piece] = []
        offset = 0
        for fragment in self.fragments:
            end = offset + fragment.num_rows  # type: ignore[operator]
            if end > start and offset < stop:
                out.append(Piece(fragment, max(start - offset, 0), min(stop, end) - offset))
            offset = end
        return out

    def shard(self, rank: int, world_size: int, *, equal: bool = False,
              group_col: str | None = None) -> list[Piece]:
        """This rank's share: every row in exactly one of the shards.

        Sized plans are cut into contiguous row ranges (``equal``: of one size;
        ``group_col``: moved forward to where the group changes, so no group spans
        two shards). Unsized plans give each rank whole fragments.
        """
        if not self.sized:
            if equal or group_col:
                raise ValueError("equal shards and group boundaries need a counted plan")
            return [Piece(f) for f in self._fragments_of(rank, world_size)]
        start, stop = shard_bounds(self.num_rows or 0, rank, world_size, equal=equal)
        if group_col is not None:
            start, stop = self.group_boundary(start, group_col), self.group_boundary(
                stop, group_col)
        return self.pieces(start, stop)

    def _fragments_of(self, rank: int, world_size: int) -> list[Fragment]:
        """Whole fragments for ``rank``: each goes to the rank whose share of the
        estimated rows holds the fragment's middle (every fragment exactly once)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        weights = np.array([max(f.estimated_rows, 1) for f in self.fragments], dtype=np.float64)
        middles = (np.cumsum(weights) - weights / 2) / max(weights.sum(), 1.0)
        owners = np.minimum((middles * world_size).astype(np.int64), world_size - 1)
        return [f for f, owner in zip(self.fragments, owners, strict=True) if owner == rank]

    def group_boundary(self, row: int, column: str) -> int:
        """The first row at or after ``row`` where ``column`` changes value (a query
        group starts there); reads only that column, only as far as needed."""
        total = self.num_rows or 0
        if row <= 0 or row >= total:
            return min(max(row, 0), total)
        previous: Any = None
        position = row - 1  # global row of the next value read
        for piece in self.pieces(row - 1, total):
            for batch in piece.read([column]):
                values = batch.column(0).to_numpy(zero_copy_only=False)
                if previous is None:
                    previous, values, position = values[0], values[1:], position + 1
                changes = np.flatnonzero(values != previous)
                if changes.size:
                    return position + int(changes[0])
                position += len(values)
        return total


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
