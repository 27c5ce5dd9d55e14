"""Re-cutting streams of Arrow record batches: into blocks, exact sizes, or fewer small ones."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pyarrow as pa


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
                yield concat(pending)
                pending, count = [], 0
    if pending and not drop_last:
        yield concat(pending)


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
            yield concat(pending)
            pending, count = [], 0
    if pending:
        yield concat(pending)


def slice_stream(
    batches: Iterable[pa.RecordBatch], start: int, stop: int | None
) -> Iterator[pa.RecordBatch]:
    """Keep rows ``[start, stop)`` of a batch stream, reading no further than needed."""
    offset = 0
    for batch in batches:
        end = offset + batch.num_rows
        if end > start and (stop is None or offset < stop):
            lo = max(start - offset, 0)
            hi = batch.num_rows if stop is None else min(stop, end) - offset
            yield batch if (lo == 0 and hi == batch.num_rows) else batch.slice(lo, hi - lo)
        offset = end
        if stop is not None and offset >= stop:
            return


def concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    """One record batch from several (no copy for one)."""
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]
