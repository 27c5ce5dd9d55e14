"""Session fixtures: one local Ray instance, one PostgreSQL server, a DuckDB warehouse file."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

TESTS = str(Path(__file__).parent)
sys.path.insert(0, TESTS)
# Ray workers inherit this: functions defined in test modules unpickle there.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (TESTS, os.environ.get("PYTHONPATH")) if p
)

# Quiet, private, loopback-only Ray for the whole session; no progress bars.
os.environ.setdefault("NEVE_PROGRESS", "0")
os.environ.setdefault("NEVE_WORKER_IDLE_TIMEOUT_S", "300")
os.environ.setdefault("NEVE_PLACEMENT_TIMEOUT_S", "10")
# Estimators made in tests do not start workers on their own (test_gbdt_pool tests that).
os.environ.setdefault("NEVE_PRESTART", "0")
# Restart tests choose the round a worker dies in: every tenth of the rounds checkpoints.
os.environ.setdefault("NEVE_CHECKPOINT_INTERVAL_S", "0")
os.environ.pop("RAY_ADDRESS", None)

RAY_CPUS = 4


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One private local Ray instance per test session (4 logical CPUs)."""
    os.environ["NEVE_LOCAL_NUM_CPUS"] = str(RAY_CPUS)
    from neve._internal.runtime import cluster, group

    cluster.ensure_ray()
    yield
    group.shutdown_idle()
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def postgres_uri() -> Iterator[str]:
    """A real PostgreSQL server on a free loopback port, for the whole session."""
    from _postgres import PostgresServer

    with PostgresServer() as server:
        yield server.uri


@pytest.fixture
def reserved_cpus_after(ray_session: None) -> Iterator[None]:
    """Checks that a test leaves no CPUs reserved (no actor or placement group left)."""
    yield
    assert_no_reservations()


def assert_no_reservations(timeout_s: float = 10.0) -> None:
    import time

    import ray

    from neve._internal.runtime import group

    group.shutdown_idle()
    deadline = time.monotonic() + timeout_s
    while True:
        total = ray.cluster_resources().get("CPU", 0)
        free = ray.available_resources().get("CPU", 0)
        if free >= total or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert free == total, f"{total - free} CPUs still reserved"


def make_frame(rows: int, seed: int = 0, features: int = 4):
    """A generated regression/classification frame with a known signal."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    signal = x[:, 0] * 2.0 - x[:, 1] + 0.5 * x[:, 2] * x[:, 3]
    frame = pd.DataFrame({f"f{i}": x[:, i] for i in range(features)})
    frame["y"] = (signal + rng.normal(scale=0.3, size=rows)).astype(np.float64)
    frame["label"] = (signal > 0).astype(np.int64)
    frame["id"] = np.arange(rows, dtype=np.int64)
    return frame


@pytest.fixture(scope="session")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real DuckDB database file with a TRAINING_DATA and an EVAL_DATA table."""
    import duckdb

    path = tmp_path_factory.mktemp("warehouse") / "warehouse.duckdb"
    train = make_frame(20_000, seed=1)  # noqa: F841 - read by DuckDB's replacement scan
    evaluation = make_frame(4_000, seed=2)  # noqa: F841
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE TRAINING_DATA AS SELECT * FROM train")
    con.execute("CREATE TABLE EVAL_DATA AS SELECT * FROM evaluation")
    con.close()
    return path


@pytest.fixture
def groups(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The worker group each fit ran on, in order."""
    taken: list[Any] = []
    from neve._internal.runtime import group

    real = group.acquire

    def acquire(layout: Any) -> Any:
        taken.append(real(layout))
        return taken[-1]

    monkeypatch.setattr(group, "acquire", acquire)
    return taken
