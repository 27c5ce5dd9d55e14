"""The process side of a worker: a Ray actor that runs one function per run.

The actor is threaded (two slots): one runs the user's function, the other
answers the driver's polls for progress while it does.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import json
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from neve._internal import context as _context

_events: collections.deque[Any] = collections.deque(maxlen=10_000)
_events_lock = threading.Lock()


def report(event: Any) -> None:
    """Queue a progress event for the driver (called inside a worker)."""
    with _events_lock:
        _events.append(event)


def drain() -> list[Any]:
    with _events_lock:
        out = list(_events)
        _events.clear()
    return out


_acks: dict[str, threading.Event] = {}


def report_and_wait(event: Any, key: str, timeout_s: float) -> bool:
    """Queue an event for the driver and wait until it calls back with ``key``
    (a checkpoint it has committed); ``False`` when that took longer than ``timeout_s``."""
    done = threading.Event()
    with _events_lock:
        _acks[key] = done
    report(event)
    try:
        return done.wait(timeout_s)
    finally:
        with _events_lock:
            _acks.pop(key, None)


def acknowledged(key: str) -> None:
    with _events_lock:
        waiting = _acks.get(key)
    if waiting is not None:
        waiting.set()


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Silence what native code writes to fd 1 and 2 for a short block (banners)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (null, *saved):
            os.close(fd)


_held_ports: dict[int, socket.socket] = {}


def hold_port(host: str = "") -> int:
    """A free port on ``host`` (all interfaces by default), kept bound by this process
    until :func:`release_port`.

    Holding it closes the window in which another process could take a port that
    was picked as free and handed to a framework that binds it later.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = int(sock.getsockname()[1])
    _held_ports[port] = sock
    return port


def held_socket(port: int) -> socket.socket | None:
    """The socket this process holds for ``port`` (a server may listen on it)."""
    return _held_ports.get(port)


def release_port(port: int) -> None:
    """Let go of a held port: just before a framework binds it, or when a server that
    listened on it is done (shut down first: the server may still hold a copy)."""
    sock = _held_ports.pop(port, None)
    if sock is not None:
        with contextlib.suppress(OSError):  # never listened, or already closed
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


#: carries a group's imports into the processes Ray keeps ready for it (:func:`import_ahead`)
IMPORTS_VARIABLE = "NEVE_WORKER_IMPORTS"


@dataclass(frozen=True)
class Imports:
    """What a worker imports while it starts, ahead of the run that needs it, and what
    it leaves out of those imports.

    ``in_ready_processes``: processes Ray keeps ready for the next group of these
    workers import the modules as they start, before an actor is placed in them. Only
    for workers that run neve's code alone: Ray passes an actor's runtime environment,
    which carries the import, on to the tasks it starts (a user's function could).
    """

    modules: tuple[str, ...] = ()
    left_out: tuple[str, ...] = ()
    in_ready_processes: bool = False

    def load(self) -> None:
        for module in self.modules:
            preload(module, self.left_out)

    def runtime_env(self) -> dict[str, Any] | None:
        """The Ray runtime environment of processes that import these modules when they
        start: Ray's worker setup hook, set per actor (Ray's public option sets it per
        job only). ``None`` where this does not apply, or Ray no longer has the hook."""
        if not (self.in_ready_processes and self.modules):
            return None
        try:
            from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR
        except ImportError:
            return None
        return {"env_vars": {
            WORKER_PROCESS_SETUP_HOOK_ENV_VAR: f"{__name__}.import_ahead",
            IMPORTS_VARIABLE: json.dumps([self.modules, self.left_out]),
        }}


def import_ahead() -> None:
    """Ray's setup hook in a process started from :meth:`Imports.runtime_env`: import
    the group's modules before an actor is placed here. Never raises (Ray would end
    the process): the actor's own import then meets the error and reports it."""
    with contextlib.suppress(Exception):
        modules, left_out = json.loads(os.environ.get(IMPORTS_VARIABLE, "[[], []]"))
        Imports(tuple(modules), tuple(left_out)).load()


#: a worker that imports nothing ahead of its run
NOTHING = Imports()


def preload(module: str, left_out: Sequence[str] = ()) -> None:
    """Import ``module`` without the modules ``left_out`` where nothing has imported
    them yet; a module that needs one is imported with it. A later import of one (a
    user's callback, say) loads it as usual."""
    left_out = [name for name in left_out if name not in sys.modules]
    sys.modules.update(dict.fromkeys(left_out))  # type: ignore[arg-type]  # import: ImportError
    try:
        importlib.import_module(module)
        return
    except ImportError:
        pass
    finally:
        for name in left_out:
            if sys.modules.get(name, "") is None:
                del sys.modules[name]
    with contextlib.suppress(ImportError):  # the run will say what is missing
        importlib.import_module(module)


def _give_memory_back() -> None:
    """After a run, return freed memory to the OS: a warm worker should hold little."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


#: how long after a run its worker gives memory back: the run's result (which needs the
#: GIL to be pickled) reaches the driver first, rather than 0.03-0.05 s later
GIVE_BACK_DELAY_S = 1.0


class WorkerActor:
    """One worker process of a group (wrapped with ``ray.remote`` by the group)."""

    def __init__(self, label: str, imports: Imports = NOTHING) -> None:
        self._label = label
        # The framework's import (torch: seconds) happens while the process starts,
        # alongside the driver's own work, not when the first run needs it.
        imports.load()

    def __repr__(self) -> str:  # Ray prefixes the worker's output with this
        return self._label

    def info(self) -> dict[str, Any]:
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        }

    def hold_port(self, host: str = "") -> int:
        return hold_port(host)

    def poll(self) -> list[Any]:
        return drain()

    # -- files, moved in chunks by the driver (models, checkpoints) ------------------------

    def listing(self, folder: str) -> list[tuple[str, int]]:
        from neve._internal.stages import LocalFiles

        return LocalFiles(folder).listing()

    def read_chunk(self, path: str, offset: int, size: int) -> bytes:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read(size)

    def write_chunk(self, path: str, offset: int, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "r+b" if offset else "wb") as handle:
            handle.seek(offset)
            handle.write(data)

    def scratch_folder(self, kind: str) -> str:
        """A local folder for the next run on this worker, removed when that run ends."""
        from neve._internal.data.spill import run_folder

        return run_folder(kind).path

    def remove_tree(self, path: str) -> None:
        from neve._internal.data import spill

        spill.release_path(path)

    def acknowledge(self, key: str) -> None:
        """Wake what waits in this worker for the driver to finish ``key``."""
        acknowledged(key)

    def run(self, fn: Callable[[_context.WorkerContext], Any], ctx: _context.WorkerContext) -> Any:
        drain()
        try:
            with _context.activate(ctx):
                return fn(ctx)
        finally:
            from neve._internal.data.spill import release_local_cache

            for port in list(_held_ports):
                release_port(port)
            release_local_cache()  # this run's local copies of the shard
            later = threading.Timer(GIVE_BACK_DELAY_S, _give_memory_back)
            later.daemon = True
            later.start()
