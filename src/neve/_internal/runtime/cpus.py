"""Pinning a GBDT worker's process to CPUs of its own while it trains.

Ray does not pin its processes (ray-project/ray#33465 points users at
``os.sched_setaffinity``), and the kernel moves them, and xgboost's collective thread,
between cores; two ranks of an xgboost fit then wait on each other at every
histogram allreduce. Pinned, xgboost's 2 x 1 fit of 1M rows on a 2-core machine took
0.995x native against 1.048x unpinned (by hand, medians of 7); LightGBM's showed no
difference. A worker pins only where its group's workers on the node take every CPU
its process may use (where they leave some free, the kernel can move other work off
their cores, which a pin would forbid), and only to CPUs that no other neve worker on
the machine holds: each CPU is claimed with a lock on a file, which the kernel
releases when the process ends. The pin lasts for one fit; an idle warm worker runs
anywhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

#: what this process may run on before neve pins it (read once: a pinned process's
#: own affinity is its pin)
_allowed: tuple[int, ...] | None = None


def allowed_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on, in the order workers claim them: the
    hyperthreads of one core next to each other, so that a worker of several CPUs
    gets whole cores."""
    global _allowed
    if _allowed is None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        _allowed = tuple(sorted(cpus, key=_topology))
    return _allowed


def _topology(cpu: int) -> tuple[int, int, int]:
    base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
    try:
        package = int((base / "physical_package_id").read_text())
        core = int((base / "core_id").read_text())
    except (OSError, ValueError):
        return (0, cpu, cpu)
    return (package, core, cpu)


def _lock_folder() -> Path:
    folder = Path(tempfile.gettempdir()) / f"neve-{os.getuid()}" / "cpus"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _claim(cpus: tuple[int, ...]) -> list[int] | None:
    """Locks on every CPU of ``cpus`` (their files' descriptors), or ``None`` where
    another process holds one of them."""
    import fcntl  # POSIX: reached only where the process can be pinned (Linux)

    held: list[int] = []
    folder = _lock_folder()
    try:
        for cpu in cpus:
            held.append(os.open(folder / f"cpu{cpu}.lock",
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            fcntl.flock(held[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        _release(held)
        if isinstance(exc, BlockingIOError):  # another process holds it
            return None
        raise
    return held


def _claim_a_block(allowed: tuple[int, ...], size: int) -> tuple[tuple[int, ...], list[int]]:
    """The first block of ``size`` CPUs no other process holds, with its locks; none
    where every block is held (or the lock files cannot be made: then nothing is pinned)."""
    try:
        for start in range(0, len(allowed) - size + 1, size):
            block = allowed[start:start + size]
            held = _claim(block)
            if held is not None:
                return block, held
    except OSError as exc:
        logger.info("not pinning this worker to CPUs: %s", exc)
    return (), []


def _release(held: list[int]) -> None:
    for fd in held:
        os.close(fd)


def _set_every_thread(cpus: tuple[int, ...]) -> None:
    """Set the affinity of each of this process's threads (Ray's, OpenMP's, xgboost's
    collective loop): ``os.sched_setaffinity(0)`` sets the calling thread's alone."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cpus)


@contextlib.contextmanager
def pinned(cpus_per_worker: int, workers_on_node: int) -> Iterator[tuple[int, ...]]:
    """Run the block with this process pinned to ``cpus_per_worker`` CPUs of its own,
    where the ``workers_on_node`` workers take every CPU it may use (and a worker fewer
    than all of them); yields the CPUs (empty where it runs unpinned)."""
    allowed = allowed_cpus()
    if (not 1 <= cpus_per_worker < len(allowed) or not os.path.isdir("/proc/self/task")
            or workers_on_node * cpus_per_worker < len(allowed)):
        yield ()
        return
    block, held = _claim_a_block(allowed, cpus_per_worker)
    if not block:  # every block taken (another group's workers share this node)
        yield ()
        return
    try:
        _set_every_thread(block)
        yield block
    finally:
        _set_every_thread(allowed)
        _release(held)
