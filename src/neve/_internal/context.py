"""The per-worker context: who this process is in a distributed run.

The driver builds one frozen :class:`WorkerContext` per worker and the worker
activates it around the user's code. ``ShardedDataConnector.get_shard()`` and
``neve.pytorch.get_context()`` read it; outside a run there is none.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from neve.exceptions import ContextError


@dataclass(frozen=True)
class WorkerContext:
    """Rank, topology and inputs of one worker in one run."""

    rank: int
    world_size: int
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    default_backend: str = "gloo"
    run_id: str = ""
    hyper_params: Mapping[str, Any] = field(default_factory=dict)
    dataset_map: Mapping[str, Any] = field(default_factory=dict)
    model_dir: str = ""
    extras: Mapping[str, Any] = field(default_factory=dict)


_active: WorkerContext | None = None
_lock = threading.Lock()


def current() -> WorkerContext | None:
    """The active context of this process, or ``None`` outside a run."""
    return _active


def require(what: str) -> WorkerContext:
    """The active context, or a :class:`ContextError` saying ``what`` needs one."""
    context = current()
    if context is None:
        raise ContextError(
            f"{what} only works inside a distributed run: call it in the training "
            "function that PyTorchDistributor runs on each worker (or that an "
            "estimator's fit runs), not in the driver"
        )
    return context


@contextlib.contextmanager
def activate(context: WorkerContext) -> Iterator[WorkerContext]:
    """Make ``context`` the active one for this process while the block runs."""
    global _active
    with _lock:
        previous, _active = _active, context
    try:
        yield context
    finally:
        with _lock:
            _active = previous


def shard_context(rank: int, world_size: int) -> contextlib.AbstractContextManager[WorkerContext]:
    """A bare context for "shard ``rank`` of ``world_size``" (tests, custom launchers).

    Example:
        >>> with shard_context(0, 2):
        ...     part = connector.get_shard()  # doctest: +SKIP
    """
    return activate(WorkerContext(rank=rank, world_size=world_size))
