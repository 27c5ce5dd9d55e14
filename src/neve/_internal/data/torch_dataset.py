"""``to_torch_dataset``: an IterableDataset over a plan of fragments.

Each iteration re-reads the fragments, so the dataset serves many epochs. In a
DataLoader with ``num_workers > 0`` each loader process reads only its own
contiguous share of the plan (the same cut as distributed shards).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from neve._internal.data.convert import batch_to_torch
from neve._internal.data.fragments import Piece, Plan
from neve._internal.data.materialize import rebatch

try:
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError as exc:  # pragma: no cover - exercised without torch installed
    raise ImportError(
        "to_torch_dataset needs torch: pip install torch, then pip install 'neve[torch]'"
    ) from exc

SHUFFLE_WINDOW_ROWS = 65_536


class ArrowTorchDataset(IterableDataset):  # type: ignore[type-arg]
    """Yields ``dict[column -> tensor or list]`` batches, or single rows."""

    def __init__(
        self,
        plan: Plan,
        *,
        columns: Sequence[str] | None,
        batch_size: int | None,
        shuffle: bool,
        drop_last_batch: bool,
        expand_dims: bool,
        seed: int | None,
    ) -> None:
        super().__init__()
        self.plan = plan
        self.columns = list(columns) if columns is not None else None
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last_batch = drop_last_batch
        self.expand_dims = expand_dims
        self.seed = seed
        self._epoch = 0

    def _pieces(self) -> list[Piece]:
        info = get_worker_info()
        if info is None or info.num_workers <= 1:
            return self.plan.pieces()
        return self.plan.shard(info.id, info.num_workers)

    def _batches(self, rng: np.random.Generator | None) -> Iterator[pa.RecordBatch]:
        pieces = self._pieces()
        if rng is not None:
            pieces = [pieces[i] for i in rng.permutation(len(pieces))]
        stream = (b for piece in pieces for b in piece.read(self.columns))
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
        if self.batch_size is None:
            for batch in batches:
                yield from _rows(batch_to_torch(batch), batch.num_rows)
            return
        for batch in rebatch(batches, self.batch_size, drop_last=self.drop_last_batch):
            yield batch_to_torch(batch, expand_dims=self.expand_dims)


def _rows(columns: dict[str, Any], count: int) -> Iterator[dict[str, Any]]:
    for i in range(count):
        yield {name: values[i] for name, values in columns.items()}
