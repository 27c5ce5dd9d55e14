"""Stages: where finished models land, published whole or not at all.

A stage is a local path, an fsspec URL (``s3://bucket/prefix``, ``memory://x``),
or a dotted Snowflake-style name ``DB.SCHEMA.STAGE`` that resolves to
``$NEVE_STAGE_ROOT/DB/SCHEMA/STAGE`` (default under neve's data directory).
A model is written under a temporary name, then renamed to
``<stage>/model/<request_id>/``: readers never see half a model.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tarfile
import uuid
from dataclasses import dataclass
from typing import Any

from neve._internal import settings
from neve.exceptions import StageError

logger = logging.getLogger(__name__)

_DOTTED = re.compile(r"^@?[A-Za-z_][\w$]*\.[A-Za-z_][\w$]*\.[A-Za-z_][\w$]*(/.*)?$")


@dataclass(frozen=True)
class Stage:
    """A resolved stage: an fsspec filesystem and the root path on it."""

    name: str
    url: str

    def filesystem(self) -> tuple[Any, str]:
        import fsspec

        return fsspec.core.url_to_fs(self.url)

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


def pack(folder: str) -> bytes:
    """A folder's files as an uncompressed tar (what rank 0 sends to the driver)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for entry in sorted(os.listdir(folder)):
            tar.add(os.path.join(folder, entry), arcname=entry)
    return buffer.getvalue()


def publish(stage: Stage, request_id: str, packed: bytes) -> str:
    """Write ``packed`` files to ``<stage>/model/<request_id>/``, whole or not at all."""
    fs, root = stage.filesystem()
    final = f"{root}/model/{request_id}"
    temporary = f"{root}/model/.{request_id}.partial-{uuid.uuid4().hex[:8]}"
    try:
        if fs.exists(final):
            raise StageError(f"{stage.location('model', request_id)} already exists")
        fs.makedirs(temporary, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(packed), mode="r") as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                source = tar.extractfile(member)
                assert source is not None
                target = f"{temporary}/{member.name}"
                fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                with fs.open(target, "wb") as handle:
                    handle.write(source.read())
        if stage.is_local:
            os.rename(temporary, final)  # atomic on one filesystem
        else:
            fs.mv(temporary, final, recursive=True)
    except StageError:
        _remove(fs, temporary)
        raise
    except Exception as exc:
        _remove(fs, temporary)
        raise StageError(f"publishing the model to {stage.location('model', request_id)} "
                         f"failed: {exc}") from exc
    return stage.location("model", request_id)


def _remove(fs: Any, path: str) -> None:
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception:  # best effort: the error that got us here matters more
        logger.warning("could not remove the partial model at %s", path)


def new_request_id() -> str:
    """A unique, sortable id for one run's artifacts."""
    import time

    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]
