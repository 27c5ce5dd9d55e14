"""Turn a source into fragments that other processes can read.

Sources that only this process can read (a DuckDB connection, an ADBC cursor)
are streamed in bounded blocks: into Ray's object store for the workers of a
run, or into a local Arrow IPC spill for DataLoader worker processes. Neither
ever holds the whole table in this process's memory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Sequence

import pyarrow as pa

from neve._internal import settings
from neve._internal.data.fragments import (
    Fragment,
    IpcBatchFragment,
    ObjectRefFragment,
    Plan,
    SliceFragment,
    TableFragment,
)
from neve._internal.data.sources import ArrowSource, Source

logger = logging.getLogger(__name__)


def blocks(batches: Iterable[pa.RecordBatch], max_bytes: int) -> Iterator[pa.Table]:
    """Group a batch stream into tables of about ``max_bytes`` each."""
    pending: list[pa.RecordBatch] = []
    size = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        pending.append(batch)
        size += batch.nbytes
        if size >= max_bytes:
            yield pa.Table.from_batches(pending)
            pending, size = [], 0
    if pending:
        yield pa.Table.from_batches(pending)


def rebatch(
    batches: Iterable[pa.RecordBatch], rows: int, *, drop_last: bool = False
) -> Iterator[pa.RecordBatch]:
    """Re-cut a batch stream into batches of exactly ``rows`` rows (the last may be short)."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        while batch.num_rows:
            take = min(rows - count, batch.num_rows)
            pending.append(batch.slice(0, take))
            count += take
            batch = batch.slice(take)
            if count == rows:
                yield _concat(pending)
                pending, count = [], 0
    if pending and not drop_last:
        yield _concat(pending)


def coalesce(batches: Iterable[pa.RecordBatch], min_rows: int) -> Iterator[pa.RecordBatch]:
    """Pass batches through as they are, merging only runs of small ones (no re-cutting)."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        if not pending and batch.num_rows >= min_rows:
            yield batch
            continue
        pending.append(batch)
        count += batch.num_rows
        if count >= min_rows:
            yield _concat(pending)
            pending, count = [], 0
    if pending:
        yield _concat(pending)


def _concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]


def plan_in_object_store(source: Source, columns: Sequence[str] | None) -> Plan:
    """A plan the workers of a run can read: the source's own fragments, or its
    stream put into Ray's object store block by block."""
    fragments = source.fragments(columns)
    schema = _schema(source, columns)
    if fragments is not None:
        return Plan(fragments, schema)
    import ray

    out: list[Fragment] = []
    max_bytes = int(settings.BATCH_BYTES.get())
    for table in blocks(source.stream(columns), max_bytes):
        out.append(ObjectRefFragment(ray.put(table), table.num_rows))
    logger.debug("streamed %s into %d object-store blocks", source.description, len(out))
    return Plan(out, schema)


def plan_in_process(source: Source, columns: Sequence[str] | None) -> Plan:
    """A plan that other processes of this machine can read (spilling if need be)."""
    return local_plan(source, columns) or spill_plan(source, columns)


def _schema(source: Source, columns: Sequence[str] | None) -> pa.Schema:
    schema = source.schema()
    return schema if columns is None else pa.schema([schema.field(c) for c in columns])


def local_plan(source: Source, columns: Sequence[str] | None) -> Plan | None:
    """The source's fragments, readable by processes forked from this one, or
    ``None`` when only this process can read the source (then: :func:`spill_plan`)."""
    if isinstance(source, ArrowSource):
        table = source.table if columns is None else source.table.select(list(columns))
        return Plan(ArrowSource(table).local_fragments(), _schema(source, columns))
    fragments = source.fragments(columns)
    if fragments is None:
        return None
    return Plan([_local(f) for f in fragments], _schema(source, columns))


def spill_plan(source: Source, columns: Sequence[str] | None) -> Plan:
    """The source streamed once into a temporary local Arrow IPC file."""
    schema = _schema(source, columns)
    return Plan(_spill(source, columns, schema), schema)


def _local(fragment: Fragment) -> Fragment:
    """Object-store blocks fetched now (zero-copy from shared memory), so that
    DataLoader processes forked from this one, which cannot call Ray, can read them."""
    if isinstance(fragment, ObjectRefFragment):
        import ray

        block = ray.get(fragment.ref)
        table = pa.Table.from_batches([block]) if isinstance(block, pa.RecordBatch) else block
        return TableFragment(table)
    if isinstance(fragment, SliceFragment):
        return SliceFragment(_local(fragment.fragment), fragment.offset, fragment.num_rows)
    return fragment


def _spill(source: Source, columns: Sequence[str] | None, schema: pa.Schema) -> list[Fragment]:
    """Stream the source into a temporary Arrow IPC file, removed with its fragments."""
    import fsspec

    folder = tempfile.mkdtemp(prefix="neve-spill-")
    path = os.path.join(folder, "rows.arrow")
    counts: list[int] = []
    try:
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for table in blocks(source.stream(columns), 16 << 20):
                for batch in table.combine_chunks().to_batches():
                    writer.write_batch(batch)
                    counts.append(batch.num_rows)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    fs = fsspec.filesystem("file")
    fragments: list[Fragment] = [
        IpcBatchFragment(path, fs, i, n) for i, n in enumerate(counts)
    ]
    holder = _SpillHolder(fragments)
    weakref.finalize(holder, shutil.rmtree, folder, True)
    for fragment in fragments:
        fragment._spill = holder  # type: ignore[attr-defined]  # keeps the folder alive
    return fragments


class _SpillHolder:
    """Owns a spill folder; the folder goes when no fragment refers to this any more."""

    def __init__(self, fragments: list[Fragment]) -> None:
        self.count = len(fragments)
