"""Pinning a GBDT worker's process to CPUs of its own while it trains.

Ray does not pin its processes (ray-project/ray#33465 points users at
``os.sched_setaffinity``), and the kernel moves them, and xgboost's collective thread,
between cores; two ranks of an xgboost fit then wait on each other at every
histogram allreduce. Pinned, a 2 x 1 fit on a 2-core machine trained 5 % faster for
xgboost and 3 % for LightGBM. A worker pins only where the group's workers on its
node take every CPU its process may use (nothing else of the group's would run
there), to CPUs that no other neve worker on the machine holds: each CPU is claimed
with a lock on a file, which the kernel releases when the process ends. The pin
lasts for one fit; an idle warm worker runs anywhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: what this process may run on before neve pins it (read once: a pinned process's
#: own affinity is its pin)
_allowed: tuple[int, ...] | None = None


def allowed_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on, in the order workers claim them: the
    hyperthreads of one core next to each other, so that a worker of several CPUs
    gets whole cores."""
    global _allowed
    if _allowed is None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
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
    held: list[int] = []
    folder = _lock_folder()
    for cpu in cpus:
        fd = os.open(folder / f"cpu{cpu}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            for other in held:
                os.close(other)
            return None
        held.append(fd)
    return held


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
    held = None
    blocks = [allowed[i:i + cpus_per_worker]
              for i in range(0, len(allowed) - cpus_per_worker + 1, cpus_per_worker)]
    for block in blocks:
        held = _claim(block)
        if held is not None:
            break
    if held is None:  # every block taken (another group's workers share this node)
        yield ()
        return
    try:
        _set_every_thread(block)
        yield block
    finally:
        _set_every_thread(allowed)
        for fd in held:
            os.close(fd)
