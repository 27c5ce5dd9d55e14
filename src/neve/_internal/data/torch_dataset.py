"""``to_torch_dataset``: an IterableDataset over a plan of fragments.

Each iteration re-reads the rows, so the dataset serves many epochs. In a
DataLoader with ``num_workers > 0`` each loader process reads only its own
contiguous share of the plan (the same cut as distributed shards).

A source that only this process can read (a DuckDB connection, an ADBC cursor)
is streamed straight from the source while this process iterates. Only when a
process is about to be forked (a DataLoader starting its workers) or the dataset
is pickled (spawned workers) is it spilled once to a local Arrow file that the
loader processes share.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from neve._internal.data.batches import rebatch
from neve._internal.data.checks import null_batch_counts, warn_nulls_as_nan
from neve._internal.data.convert import batch_to_torch
from neve._internal.data.fragments import Piece, Plan
from neve._internal.data.plans import spill_plan
from neve._internal.data.sources import Source

try:
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError as exc:  # pragma: no cover - exercised without torch installed
    raise ImportError(
        "to_torch_dataset needs torch: pip install torch, then pip install 'neve[torch]'"
    ) from exc

SHUFFLE_WINDOW_ROWS = 65_536
#: rows converted to tensors at a time; batches are views into them
CONVERT_ROWS = 65_536

_unplanned: weakref.WeakSet[ArrowTorchDataset] = weakref.WeakSet()


def _plan_before_fork() -> None:
    for dataset in list(_unplanned):
        dataset._ensure_plan()


os.register_at_fork(before=_plan_before_fork)


class ArrowTorchDataset(IterableDataset):  # type: ignore[type-arg]
    """Yields ``dict[column -> tensor or list]`` batches, or single rows."""

    def __init__(
        self,
        plan: Plan | None,
        *,
        source: Source | None = None,
        columns: Sequence[str] | None,
        batch_size: int | None,
        shuffle: bool,
        drop_last_batch: bool,
        expand_dims: bool,
        seed: int | None,
        watch_nulls: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if plan is None and source is None:
            raise ValueError("a plan or a source is needed")
        self.plan = plan
        self._source = source if plan is None else None
        self.columns = list(columns) if columns is not None else None
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last_batch = drop_last_batch
        self.expand_dims = expand_dims
        self.seed = seed
        self._epoch = 0
        #: numeric columns not checked for NULLs up front: warn at the first batch with any
        self._watch = list(watch_nulls)
        self._description = source.description if source is not None else "source"
        if self.plan is None:
            _unplanned.add(self)

    def _ensure_plan(self) -> Plan:
        if self.plan is None:
            assert self._source is not None
            self.plan = spill_plan(self._source, self.columns)
            self._source = None
            _unplanned.discard(self)
        return self.plan

    def __getstate__(self) -> dict[str, Any]:
        self._ensure_plan()
        return dict(self.__dict__)

    def _pieces(self) -> list[Piece]:
        plan = self._ensure_plan()
        info = get_worker_info()
        if info is None or info.num_workers <= 1:
            return plan.pieces()
        return plan.shard(info.id, info.num_workers)

    def _stream(self, rng: np.random.Generator | None) -> Iterator[pa.RecordBatch]:
        if self.plan is None and get_worker_info() is None:
            assert self._source is not None
            yield from self._source.stream(self.columns)
            return
        pieces = self._pieces()
        if rng is not None:
            pieces = [pieces[i] for i in rng.permutation(len(pieces))]
        for piece in pieces:
            yield from piece.read(self.columns)

    def _batches(self, rng: np.random.Generator | None) -> Iterator[pa.RecordBatch]:
        stream = self._stream(rng)
        if rng is None:
            yield from stream
            return
        # Shuffle rows within windows of several batches, on top of the piece order.
        for window in rebatch(stream, SHUFFLE_WINDOW_ROWS):
            yield window.take(pa.array(rng.permutation(window.num_rows)))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rng = None
        if self.shuffle:
            info = get_worker_info()
            base = self.seed if self.seed is not None else np.random.SeedSequence().entropy
            # In a DataLoader process this copy of the dataset is new every epoch, so
            # its epoch counter is always 0: torch's per-epoch worker seed (itself
            # drawn from torch's generator, so torch.manual_seed repeats it) varies it.
            epoch = info.seed if info is not None else self._epoch
            rng = np.random.default_rng([int(base) % (2**63), epoch % (2**63)])  # type: ignore[arg-type]
        self._epoch += 1
        batches = self._batches(rng)
        if self._watch:
            batches = self._watched(batches)
        if self.batch_size is None:
            for batch in batches:
                yield from _rows(batch_to_torch(batch), batch.num_rows)
            return
        yield from _slices(batches, self.batch_size, self.drop_last_batch, self.expand_dims)


    def _watched(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """Pass batches through; warn once, at the first that has NULLs in a watched column."""
        rows = 0
        for batch in batches:
            rows += batch.num_rows
            if self._watch:
                counts = null_batch_counts(batch, self._watch)
                if any(counts.values()):
                    self._watch = []  # once per dataset
                    warn_nulls_as_nan(counts, rows, batch.schema, self._description,
                                      at_least=True)
            yield batch


def _slices(
    batches: Iterator[pa.RecordBatch], size: int, drop_last: bool, expand_dims: bool
) -> Iterator[dict[str, Any]]:
    """Batches of ``size`` rows: converted to tensors a block at a time, then sliced."""
    block_rows = size * max(1, CONVERT_ROWS // size)
    for block in rebatch(batches, block_rows):
        columns = batch_to_torch(block, expand_dims=expand_dims)
        for start in range(0, block.num_rows, size):
            stop = min(start + size, block.num_rows)
            if stop - start < size and drop_last:
                return  # only the last block can end short
            yield {name: values[start:stop] for name, values in columns.items()}


def _rows(columns: dict[str, Any], count: int) -> Iterator[dict[str, Any]]:
    for i in range(count):
        yield {name: values[i] for name, values in columns.items()}
