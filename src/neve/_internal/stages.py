"""Stages: where models and checkpoints land, whole or not at all, streamed in chunks.

A stage is a local path, an fsspec URL (``s3://bucket/prefix``, ``memory://x``),
or a dotted Snowflake-style name ``DB.SCHEMA.STAGE`` that resolves to
``$NEVE_STAGE_ROOT/DB/SCHEMA/STAGE`` (default under neve's data directory).

Layout::

    <stage>/model/<request_id>/...                 a published model directory
    <stage>/checkpoints/<request_id>/<00000012>/   a checkpoint (the latest ones kept)

Files travel in chunks of ``CHUNK_BYTES`` from wherever they are (a worker's
folder, the driver's memory, another stage) and are never whole in memory.
Every published folder ends with a ``_NEVE_COMPLETE`` manifest, written last:
on a local filesystem the folder is written under a temporary name and renamed
(atomic); on object storage, which has no rename, readers check the manifest
(:func:`is_complete`), so a reader never takes half a folder for a whole one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from neve._internal import settings
from neve.exceptions import StageError

logger = logging.getLogger(__name__)

_DOTTED = re.compile(r"^@?[A-Za-z_][\w$]*\.[A-Za-z_][\w$]*\.[A-Za-z_][\w$]*(/.*)?$")
#: bytes moved at a time
CHUNK_BYTES = 8 << 20
#: written last into every published folder: what it holds
MANIFEST = "_NEVE_COMPLETE"


@dataclass(frozen=True)
class Stage:
    """A resolved stage: an fsspec filesystem and the root path on it."""

    name: str
    url: str

    def filesystem(self) -> tuple[Any, str]:
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.url)
        return fs, root.rstrip("/")

    @property
    def is_local(self) -> bool:
        return "://" not in self.url or self.url.startswith("file://")

    def location(self, *parts: str) -> str:
        """A user-facing location under the stage (a local path, or a URL)."""
        return "/".join([self.url.rstrip("/"), *parts])


def resolve(stage: str | os.PathLike[str] | None) -> Stage:
    """Resolve a stage name, path or URL (``None``: the default stage, logged)."""
    if stage is None:
        root = settings.data_dir() / "stages" / "default"
        logger.info("no artifact_stage_location given: using the default stage %s", root)
        return Stage("default", str(root))
    text = os.fspath(stage).strip()
    if not text:
        raise StageError("artifact_stage_location is empty: pass a path, URL or DB.SCHEMA.STAGE")
    if "://" in text:
        return Stage(text, text)
    if _DOTTED.match(text) and not os.path.exists(text):
        name, _, sub = text.lstrip("@").partition("/")
        parts = name.split(".")
        root = settings.stage_root().joinpath(*parts)
        return Stage(text, str(root / sub) if sub else str(root))
    return Stage(text, os.path.abspath(os.path.expanduser(text)))


def check_writable(stage: Stage) -> None:
    """Fail before any work starts if the stage cannot be written."""
    try:
        fs, root = stage.filesystem()
        fs.makedirs(f"{root}/model", exist_ok=True)
        probe = f"{root}/model/.neve-probe-{uuid.uuid4().hex}"
        with fs.open(probe, "wb") as handle:
            handle.write(b"ok")
        fs.rm(probe)
    except Exception as exc:
        raise StageError(
            f"stage {stage.name!r} ({stage.url}) cannot be written: {exc}. Pass a writable "
            "artifact_stage_location (a local path, an fsspec URL, or DB.SCHEMA.STAGE under "
            "$NEVE_STAGE_ROOT)"
        ) from exc


def new_request_id() -> str:
    """A unique, sortable id for one run's artifacts."""
    import time

    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]


# -- where files come from ----------------------------------------------------------------


class Files(ABC):
    """A folder's files, read in chunks (a worker's folder, memory, a stage)."""

    @abstractmethod
    def listing(self) -> list[tuple[str, int]]:
        """``(relative path, size)`` of every file."""

    @abstractmethod
    def chunks(self, relative: str) -> Iterator[bytes]:
        """One file's bytes, ``CHUNK_BYTES`` at a time."""


class LocalFiles(Files):
    """A folder on this machine."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def listing(self) -> list[tuple[str, int]]:
        out = []
        for dirpath, _, names in os.walk(self.folder):
            for name in names:
                path = os.path.join(dirpath, name)
                out.append((os.path.relpath(path, self.folder).replace(os.sep, "/"),
                            os.path.getsize(path)))
        return sorted(out)

    def chunks(self, relative: str) -> Iterator[bytes]:
        with open(os.path.join(self.folder, relative), "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                yield chunk


class MemoryFiles(Files):
    """A few small files held in memory (a booster's bytes and its state)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def listing(self) -> list[tuple[str, int]]:
        return sorted((name, len(data)) for name, data in self.files.items())

    def chunks(self, relative: str) -> Iterator[bytes]:
        data = self.files[relative]
        for start in range(0, len(data), CHUNK_BYTES):
            yield data[start:start + CHUNK_BYTES]


class StageFiles(Files):
    """A published folder of a stage (a checkpoint being brought back)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path.rstrip("/")

    def listing(self) -> list[tuple[str, int]]:
        manifest = read_manifest(self.fs, self.path)
        if manifest is None:
            raise StageError(f"{self.path} is not a complete published folder")
        return [(f["path"], int(f["size"])) for f in manifest["files"]]

    def chunks(self, relative: str) -> Iterator[bytes]:
        with self.fs.open(f"{self.path}/{relative}", "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                yield chunk

    def read(self, relative: str) -> bytes:
        return b"".join(self.chunks(relative))


# -- publishing ---------------------------------------------------------------------------


def read_manifest(fs: Any, path: str) -> dict[str, Any] | None:
    """A published folder's manifest, or ``None`` when it is not complete."""
    try:
        with fs.open(f"{path.rstrip('/')}/{MANIFEST}", "rb") as handle:
            return dict(json.loads(handle.read()))
    except (FileNotFoundError, OSError, ValueError):
        return None


def is_complete(location: str) -> bool:
    """Whether a published folder (a local path or URL) is whole: its manifest is there."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(location)
    return read_manifest(fs, path) is not None


def write_folder(stage: Stage, parts: tuple[str, ...], files: Files,
                 extra: dict[str, Any] | None = None) -> str:
    """Write ``files`` to ``<stage>/<parts>/``, whole or not at all; the location."""
    fs, root = stage.filesystem()
    final = "/".join([root, *parts])
    location = stage.location(*parts)
    if fs.exists(final):
        if read_manifest(fs, final) is not None or stage.is_local:
            raise StageError(f"{location} already exists")
        remove(fs, final)  # half written by a run that died: never complete, never read
    local = stage.is_local
    parent, name = final.rsplit("/", 1)
    target = f"{parent}/.{name}.partial-{uuid.uuid4().hex[:8]}" if local else final
    try:
        listing = files.listing()
        for relative, _ in listing:
            path = f"{target}/{relative}"
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with fs.open(path, "wb") as handle:
                for chunk in files.chunks(relative):
                    handle.write(chunk)
        manifest = {"files": [{"path": p, "size": s} for p, s in listing], **(extra or {})}
        fs.makedirs(target, exist_ok=True)
        with fs.open(f"{target}/{MANIFEST}", "wb") as handle:  # last: the folder is whole
            handle.write(json.dumps(manifest, indent=1).encode())
        if local:
            os.rename(target, final)  # atomic on one filesystem
    except Exception as exc:
        remove(fs, target)
        if isinstance(exc, StageError):
            raise
        raise StageError(f"writing {location} failed: {exc}") from exc
    return location


def publish(stage: Stage, request_id: str, files: Files) -> str:
    """A model directory to ``<stage>/model/<request_id>/``, whole or not at all."""
    return write_folder(stage, ("model", request_id), files)


def remove(fs: Any, path: str) -> None:
    """Remove a folder (best effort: the error that got us here matters more)."""
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception:
        logger.warning("could not remove %s", path)


# -- checkpoints --------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint of a run: its number, where it is, its state."""

    seq: int
    files: StageFiles
    state: dict[str, Any]


class CheckpointStore:
    """``<stage>/checkpoints/<request_id>/``: the run's checkpoints, the latest kept.

    Each is a published folder numbered by ``seq`` (a round, a save count); the
    latest complete one is what a restart or a resume starts from. Older ones are
    pruned to ``NEVE_CHECKPOINTS_KEEP``.
    """

    def __init__(self, stage: Stage, request_id: str) -> None:
        self.stage = stage
        self.request_id = request_id
        self.fs, root = stage.filesystem()
        self.root = f"{root}/checkpoints/{request_id}"
        self.location = stage.location("checkpoints", request_id)

    @classmethod
    def resume(cls, stage: Stage, resume_from: str) -> CheckpointStore:
        """The store of an earlier run: its request id, its folder, or ``"latest"``."""
        fs, root = stage.filesystem()
        base = f"{root}/checkpoints"
        if resume_from == "latest":
            runs = sorted(p.rstrip("/").rsplit("/", 1)[-1]
                          for p in (fs.ls(base, detail=False) if fs.exists(base) else []))
            if not runs:
                raise StageError(f"resume_from='latest': no run has checkpoints under "
                                 f"{stage.location('checkpoints')}")
            resume_from = runs[-1]
        request_id = resume_from.rstrip("/").rsplit("/", 1)[-1]
        store = cls(stage, request_id)
        if store.latest() is None:
            raise StageError(
                f"no complete checkpoint of run {request_id!r} under {store.location}; pass "
                "the request id that the interrupted run logged, or resume_from='latest'")
        return store

    def _complete(self) -> list[int]:
        if not self.fs.exists(self.root):
            return []
        seqs = []
        for path in self.fs.ls(self.root, detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name.isdigit() and read_manifest(self.fs, f"{self.root}/{name}") is not None:
                seqs.append(int(name))
        return sorted(seqs)

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or ``None``."""
        seqs = self._complete()
        if not seqs:
            return None
        path = f"{self.root}/{seqs[-1]:08d}"
        manifest = read_manifest(self.fs, path) or {}
        return Checkpoint(seqs[-1], StageFiles(self.fs, path), dict(manifest.get("state", {})))

    def save(self, seq: int, files: Files, state: dict[str, Any]) -> str:
        """Commit a checkpoint (whole or not at all), then prune the oldest."""
        location = write_folder(self.stage, ("checkpoints", self.request_id, f"{seq:08d}"),
                                files, {"state": state})
        keep = max(int(settings.CHECKPOINTS_KEEP.get()), 1)
        for old in self._complete()[:-keep]:
            remove(self.fs, f"{self.root}/{old:08d}")
        return location
