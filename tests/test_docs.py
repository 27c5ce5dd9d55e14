"""Every code block of README.md and docs/*.md that is meant to run, runs (issue 10, item 3).

A fenced block runs when it is ``python``. Any other block needs an HTML comment on
the line before its fence, visible in the Markdown source and saying why::

    <!-- not run: starts a Ray cluster on several machines -->

The Python blocks of one file run in order in one namespace (the PyTorch example
uses the quickstart's ``session``), in a folder holding a small generated
``warehouse.duckdb`` (the demo's credit-risk tables), on the session's local Ray.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.S | re.M)
NOT_RUN = re.compile(r"^<!-- not run: (?P<why>\S.*?) -->$")


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    body: str
    not_run: str | None

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line} ({self.lang or 'no language'})"


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = [x.strip() for x in text[:match.start()].splitlines() if x.strip()]
        marker = NOT_RUN.match(before[-1]) if before else None
        found.append(Block(path, line, match.group("lang"), match.group("body"),
                           marker.group("why") if marker else None))
    return found


def test_the_docs_have_code_blocks_and_the_extractor_finds_them() -> None:
    readme = blocks(ROOT / "README.md")
    python = [b for b in readme if b.lang == "python" and b.not_run is None]
    assert len(python) >= 2  # the XGBoost quickstart and the PyTorch example
    assert any("PyTorchDistributor" in b.body for b in python)


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_every_block_runs_or_says_why_not(path: Path) -> None:
    for block in blocks(path):
        if block.not_run is None:
            assert block.lang == "python", (
                f"{block}: a block that is not Python must say why it does not run, on the "
                "line before its fence: <!-- not run: why -->")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the demo's warehouse (small), where the examples run."""
    from neve._internal.demo import prepare_warehouse

    folder = tmp_path_factory.mktemp("docs")
    prepare_warehouse(str(folder / "warehouse.duckdb"), rows=4_000)
    return folder


RUNNABLE = [p for p in DOCS if any(b.lang == "python" and b.not_run is None for b in blocks(p))]


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(240)
@pytest.mark.parametrize("path", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_the_python_blocks_run(path: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("NEVE_STAGE_ROOT", str(workdir / "stages"))
    # Not importable by workers: cloudpickle ships the examples' functions by value,
    # as it does for a user's script.
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for block in blocks(path):
        if block.lang != "python" or block.not_run is not None:
            continue
        code = compile(block.body, str(block), "exec")
        try:
            exec(code, namespace)
        except Exception as exc:
            raise AssertionError(f"{block} failed: {type(exc).__name__}: {exc}") from exc
    out = capsys.readouterr().out
    if path.name == "README.md":  # what the examples print
        assert re.search(r"^0\.\d+$", out, re.M), out  # the eval AUC
        models = [line for line in out.splitlines() if "/model/pytorch-" in line]
        assert models and os.path.isfile(os.path.join(models[-1], "model.pt")), out
