"""What runs in each worker process of a PyTorchDistributor run.

The worker gets torchrun's environment, a fresh local model directory, and a
process group that is initialised once: the user's own
``dist.init_process_group(...)`` (once, twice, or not at all) finds it ready.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from neve._internal import settings
from neve._internal.context import WorkerContext, activate
from neve._internal.data import spill
from neve._internal.runtime.worker import held_socket, release_port
from neve.pytorch._context import Checkpointer, MetricsReporter

logger = logging.getLogger(__name__)

TORCHRUN_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK",
                 "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")


@dataclass
class WorkerOutcome:
    """What a worker sends back: rank 0 adds where its model directory is (the driver
    then copies it to the stage, chunk by chunk, and removes it)."""

    metrics: list[dict[str, Any]]
    model_dir: str | None


def torchrun_env(ctx: WorkerContext) -> dict[str, str]:
    env = {
        "RANK": str(ctx.rank),
        "LOCAL_RANK": str(ctx.local_rank),
        "WORLD_SIZE": str(ctx.world_size),
        "LOCAL_WORLD_SIZE": str(ctx.local_world_size),
        "NODE_RANK": str(ctx.node_rank),
        "GROUP_RANK": str(ctx.node_rank),
        "MASTER_ADDR": ctx.master_addr,
        "MASTER_PORT": str(ctx.master_port),
    }
    visible = ctx.extras.get("cuda_visible_devices")
    if visible:
        env["CUDA_VISIBLE_DEVICES"] = str(visible)
    return env


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in TORCHRUN_KEYS}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def process_group(backend: str, ctx: WorkerContext) -> Iterator[None]:
    """Initialise the default process group once; make later init calls no-ops.

    The rendezvous store (a TCPStore served by rank 0, as torchrun's) listens on the
    socket rank 0 has held since the driver picked its port, bound to its node's
    address only, and that socket is shut down when the run ends: the store stops
    listening even if the user's objects (a DDP model) keep it alive, and a warm
    worker keeps no open port.
    """
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=settings.COLLECTIVE_TIMEOUT_S.get())
    held = held_socket(ctx.master_port) if ctx.rank == 0 else None
    store = dist.TCPStore(ctx.master_addr, ctx.master_port, ctx.world_size,
                          is_master=ctx.rank == 0, timeout=timeout, wait_for_workers=False,
                          master_listen_fd=os.dup(held.fileno()) if held else None)
    dist.init_process_group(backend=backend, store=store, rank=ctx.rank,
                            world_size=ctx.world_size, timeout=timeout)
    original = dist.init_process_group

    def init_process_group(*args: Any, **kwargs: Any) -> None:
        if dist.is_initialized():
            asked = kwargs.get("backend", args[0] if args else None)
            if asked and asked not in backend:
                logger.warning(
                    "init_process_group(backend=%r) ignored: neve already initialised the "
                    "process group with %r (see get_context().get_default_backend())",
                    asked, backend,
                )
            return
        original(*args, **kwargs)

    dist.init_process_group = init_process_group
    try:
        yield
    finally:
        dist.init_process_group = original
        if dist.is_initialized():
            dist.destroy_process_group()
        del store
        release_port(ctx.master_port)  # rank 0: the store's socket stops listening


def entry(train_func: Callable[[], Any]) -> Callable[[WorkerContext], WorkerOutcome]:
    """The function each worker runs: ``train_func`` inside torchrun's environment."""

    def run(ctx: WorkerContext) -> WorkerOutcome:
        # under the spill root: a folder that a killed worker leaves goes with the next start
        folder = spill.SpillFolder(kind=f"model-rank{ctx.rank}")
        model_dir = folder.path
        reporter = MetricsReporter(ctx.rank)
        checkpointer = Checkpointer(ctx.rank, ctx.extras["checkpoint_dir"],
                                    ctx.extras["checkpoint_seq"])
        full = replace(ctx, model_dir=model_dir,
                       extras={**ctx.extras, "metrics_reporter": reporter,
                               "checkpointer": checkpointer})
        kept = False
        try:
            with _environment(torchrun_env(full)), activate(full), \
                    process_group(ctx.extras.get("process_group_backend", ctx.default_backend),
                                  ctx):
                train_func()
            kept = ctx.rank == 0  # the driver takes it from here
            return WorkerOutcome(reporter.history, model_dir if kept else None)
        finally:
            if not kept:
                folder.release()

    return run
