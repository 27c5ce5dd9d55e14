"""Stages: resolution, the write check, and publishing whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pytest

from neve._internal import stages
from neve.exceptions import StageError


def _model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model-dir"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"weights")
    (folder / "sub" / "config.json").write_text("{}")
    return folder


def test_dotted_names_resolve_under_the_stage_root(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NEVE_STAGE_ROOT", str(tmp_path))
    stage = stages.resolve("DB_NAME.SCHEMA_NAME.STAGE_NAME")
    assert stage.url == str(tmp_path / "DB_NAME" / "SCHEMA_NAME" / "STAGE_NAME")
    assert stages.resolve("@DB.S.ST/sub").url == str(tmp_path / "DB" / "S" / "ST" / "sub")
    assert stages.resolve("memory://bucket/x").url == "memory://bucket/x"
    assert stages.resolve(tmp_path / "plain").url == str(tmp_path / "plain")
    monkeypatch.setenv("NEVE_HOME", str(tmp_path / "home"))
    assert stages.resolve(None).url == str(tmp_path / "home" / "stages" / "default")


@pytest.mark.parametrize("where", ["local", "memory"])
def test_publish_writes_every_file_under_model_request_id(tmp_path: Path, where: str) -> None:
    url = str(tmp_path / "stage") if where == "local" else "memory://neve-test-stage"
    stage = stages.resolve(url)
    stages.check_writable(stage)
    location = stages.publish(stage, "req-1", stages.LocalFiles(str(_model_dir(tmp_path))))
    assert location == f"{url}/model/req-1"
    fs, root = fsspec.core.url_to_fs(location)
    assert fs.cat_file(f"{root}/model.pt") == b"weights"
    assert fs.cat_file(f"{root}/sub/config.json") == b"{}"
    assert stages.is_complete(location)
    siblings = [p.rsplit("/", 1)[-1] for p in fs.ls(root.rsplit("/", 1)[0], detail=False)]
    assert siblings == ["req-1"]  # no probe, no temporary left behind
    with pytest.raises(StageError, match="already exists"):
        stages.publish(stage, "req-1", stages.LocalFiles(str(tmp_path / "model-dir")))


def test_a_failed_publish_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    stage = stages.resolve(str(tmp_path / "stage"))
    fs = fsspec.filesystem("file")
    real_open = type(fs).open
    calls = {"n": 0}

    def flaky_open(self, path, mode="rb", **kwargs):  # type: ignore[no-untyped-def]
        if "w" in mode:
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError("disk full")
        return real_open(self, path, mode, **kwargs)

    monkeypatch.setattr(type(fs), "open", flaky_open)
    with pytest.raises(StageError, match="disk full"):
        stages.publish(stage, "req-2", stages.LocalFiles(str(_model_dir(tmp_path))))
    assert os.listdir(tmp_path / "stage" / "model") == []


def test_an_unwritable_stage_is_named_with_the_fix(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(StageError, match=r"cannot be written.*artifact_stage_location"):
        stages.check_writable(stages.resolve(str(blocker / "stage")))
