"""Files between the driver and its workers, in chunks, never whole in memory.

A stage only has to be reachable from the driver: rank 0's model directory and
checkpoints come to it chunk by chunk (:class:`WorkerFiles`), and a checkpoint
goes back to every worker the same way (:func:`push`), each chunk put in Ray's
object store once for all of them.
"""

from __future__ import annotations

from collections.abc import Iterator

from neve._internal import settings
from neve._internal.runtime.group import WorkerGroup
from neve._internal.stages import CHUNK_BYTES, Files


class WorkerFiles(Files):
    """A folder on one worker, read through the worker's actor."""

    def __init__(self, workers: WorkerGroup, rank: int, folder: str) -> None:
        self.workers = workers
        self.rank = rank
        self.folder = folder.rstrip("/")

    def _timeout(self) -> float:
        return settings.COLLECTIVE_TIMEOUT_S.get()

    def listing(self) -> list[tuple[str, int]]:
        listing = self.workers.call(self.rank, "listing", self.folder, timeout=self._timeout())
        return [(str(path), int(size)) for path, size in listing]

    def chunks(self, relative: str) -> Iterator[bytes]:
        path = f"{self.folder}/{relative}"
        offset = 0
        while True:
            chunk = self.workers.call(self.rank, "read_chunk", path, offset, CHUNK_BYTES,
                                      timeout=self._timeout())
            if not chunk:
                return
            yield chunk
            offset += len(chunk)
            if len(chunk) < CHUNK_BYTES:
                return


def push(files: Files, workers: WorkerGroup, folders: list[str]) -> None:
    """Write ``files`` into each worker's own folder (``folders``, in rank order)."""
    import ray

    timeout = settings.COLLECTIVE_TIMEOUT_S.get()
    actors = workers.actors
    for relative, _ in files.listing():
        offset = 0
        for chunk in files.chunks(relative):
            ref = ray.put(chunk)  # once, for every worker
            ray.get([actor.write_chunk.remote(f"{folder}/{relative}", offset, ref)
                     for actor, folder in zip(actors, folders, strict=True)], timeout=timeout)
            offset += len(chunk)
        if offset == 0:  # an empty file still exists
            ray.get([actor.write_chunk.remote(f"{folder}/{relative}", 0, b"")
                     for actor, folder in zip(actors, folders, strict=True)], timeout=timeout)
