"""Spill folders: rows written once to storage that the workers read as fragments.

Two kinds, one lifecycle:

* a **plan spill**, written by the driver: rows that only the driver can read (a
  DuckDB connection, an ADBC cursor) streamed into an Arrow IPC file, which the
  workers read as fragments (memory-mapped, zero-copy, on one node). It lives in a
  local temporary folder on a one-node cluster, or under ``NEVE_SPILL_URL`` (any
  fsspec URL every node can reach: ``s3://bucket/prefix``) on a multi-node one;
* a **worker cache**, written by a worker: fragments that are slow or costly to
  read again (a PostgreSQL ``ctid`` range, a spill on object storage) copied once to
  the worker's local disk before the first pass, so the framework's later passes
  (xgboost reads its data four times) read local memory-mapped files.

Each folder is named ``<host>-<pid>-<process start>-<id>`` and removed when its
plan or run is released, at interpreter exit, and, when a crash left it behind,
by the next neve process on the same host that finds its owner gone.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc

from neve._internal import settings
from neve._internal.data.fragments import Fragment, IpcBatchFragment, Piece, is_local_filesystem

logger = logging.getLogger(__name__)

FOLDER_PREFIX = "neve-spill"

_lock = threading.Lock()
_live: dict[str, SpillFolder] = {}
_cleaned: set[str] = set()


def _process_tag() -> str:
    """``<host>-<pid>-<start time>``: unique per process, even when pids are reused."""
    start = "0"
    with contextlib.suppress(OSError, IndexError), open(f"/proc/{os.getpid()}/stat") as handle:
        start = handle.read().rsplit(")", 1)[1].split()[19]
    host = socket.gethostname().replace("-", "_")
    return f"{host}-{os.getpid()}-{start}"


def _alive(pid: int, start: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19] == start
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start == "0"


def local_root() -> str:
    """Where local spill folders go: ``$TMPDIR/neve-spill``."""
    return os.path.join(tempfile.gettempdir(), FOLDER_PREFIX)


def shared_url() -> str | None:
    """``NEVE_SPILL_URL``: storage every node of the cluster can read, or ``None``."""
    return settings.spill_url()


class SpillFolder:
    """One folder of spilled rows; removed by :meth:`release`, at exit, or after a crash."""

    def __init__(self, root: str | None = None, *, kind: str = "plan") -> None:
        import fsspec

        base = root if root is not None else local_root()
        self.filesystem, root_path = fsspec.core.url_to_fs(base)
        self.local = is_local_filesystem(self.filesystem)
        _clean_stale(self.filesystem, root_path)
        self.path = f"{root_path.rstrip('/')}/{_process_tag()}-{kind}-{uuid.uuid4().hex[:12]}"
        self.filesystem.makedirs(self.path, exist_ok=True)
        self._files = 0
        self._owner = os.getpid()
        with _lock:
            _live[self.path] = self

    def new_file(self, suffix: str = ".arrow") -> str:
        self._files += 1
        return f"{self.path}/part-{self._files:05d}{suffix}"

    def release(self) -> None:
        """Remove the folder and everything in it (idempotent; only in the process that
        made it: a DataLoader process forked from it must not take it away)."""
        if os.getpid() != self._owner:
            return
        with _lock:
            if _live.pop(self.path, None) is None:
                return
        try:
            if self.local:
                shutil.rmtree(self.path, ignore_errors=True)
            elif self.filesystem.exists(self.path):
                self.filesystem.rm(self.path, recursive=True)
        except Exception:  # best effort: a later start removes what is left
            logger.warning("could not remove the spill folder %s", self.path, exc_info=True)

    def __repr__(self) -> str:
        return f"SpillFolder({self.path!r})"


def _clean_stale(filesystem: Any, root: str) -> None:
    """Remove folders that a dead process of this host left under ``root`` (once per root)."""
    key = f"{filesystem.protocol}:{root}"
    with _lock:
        if key in _cleaned:
            return
        _cleaned.add(key)
    host = socket.gethostname().replace("-", "_")
    try:
        entries = filesystem.ls(root, detail=False) if filesystem.exists(root) else []
    except Exception:
        return
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        parts = name.split("-")
        if len(parts) < 5 or parts[0] != host or not parts[1].isdigit():
            continue
        if _alive(int(parts[1]), parts[2]):
            continue
        logger.info("removing the spill folder %s left by a process that is gone", entry)
        with contextlib.suppress(Exception):
            filesystem.rm(entry, recursive=True)


def release_path(path: str) -> None:
    """Release the folder of this process at ``path`` (a rank's model folder, once the
    driver has taken the model), or remove the tree when no folder is registered there."""
    with _lock:
        folder = _live.get(path)
    if folder is not None:
        folder.release()
    else:
        shutil.rmtree(path, ignore_errors=True)


def release_all() -> None:
    """Remove every spill folder this process still holds (at exit)."""
    with _lock:
        folders = list(_live.values())
    for folder in folders:
        folder.release()


atexit.register(release_all)


def write_ipc(
    batches: Iterable[pa.RecordBatch], schema: pa.Schema, folder: SpillFolder
) -> list[Fragment]:
    """Stream batches into one Arrow IPC file of ``folder``: one fragment per batch.

    Local files are written uncompressed (read back memory-mapped, zero-copy);
    files on remote storage are LZ4-compressed (half the bytes to move).
    """
    path = folder.new_file()
    options = ipc.IpcWriteOptions(compression=None if folder.local else "lz4")
    counts: list[int] = []
    with folder.filesystem.open(path, "wb") as handle, ipc.new_file(
        handle, schema, options=options
    ) as writer:
        for batch in batches:
            if batch.num_rows:
                writer.write_batch(batch)
                counts.append(batch.num_rows)
    return [IpcBatchFragment(path, folder.filesystem, i, n) for i, n in enumerate(counts)]


# -- the worker's local cache -------------------------------------------------------------


_cache_folder: SpillFolder | None = None
_cache: dict[str, list[Fragment]] = {}
_run_folders: list[SpillFolder] = []


def run_folder(kind: str) -> SpillFolder:
    """A local folder for this run of a worker (xgboost's external-memory pages),
    removed with the run's local cache."""
    folder = SpillFolder(kind=kind)
    with _lock:
        _run_folders.append(folder)
    return folder


def localize(pieces: Sequence[Piece]) -> list[Piece]:
    """``pieces`` with every fragment marked ``cache_locally`` copied to this
    process's local disk first (once per process and run), so that later passes
    read local memory-mapped files instead of the database or object storage."""
    global _cache_folder
    if not any(p.fragment.cache_locally for p in pieces):
        return list(pieces)
    out: list[Piece] = []
    for piece in pieces:
        if not piece.fragment.cache_locally:
            out.append(piece)
            continue
        key = f"{piece.fragment.cache_key()}[{piece.start}:{piece.stop}]"
        with _lock:
            cached = _cache.get(key)
        if cached is None:
            if _cache_folder is None:
                _cache_folder = SpillFolder(kind="cache")
            schema = None
            stream = piece.read(None)
            first = next(stream, None)
            if first is None:
                cached = []
            else:
                schema = first.schema
                cached = write_ipc(_chain(first, stream), schema, _cache_folder)
            with _lock:
                _cache[key] = cached
        out.extend(Piece(f) for f in cached)
    return out


def _chain(first: pa.RecordBatch, rest: Iterable[pa.RecordBatch]) -> Iterable[pa.RecordBatch]:
    yield first
    yield from rest


def release_local_cache() -> None:
    """Drop this process's local copies (at the end of a run on a worker)."""
    global _cache_folder
    with _lock:
        folders = [f for f in (_cache_folder, *_run_folders) if f is not None]
        _cache_folder = None
        _cache.clear()
        _run_folders.clear()
    for folder in folders:
        folder.release()
