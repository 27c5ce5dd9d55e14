"""Every operational knob neve reads from the environment, in one place.

Each variable is ``NEVE_``-prefixed and names its unit. Values are read when
asked for, so a test or a notebook can change them between runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from neve.exceptions import ConfigError


@dataclass(frozen=True)
class Setting:
    """One environment knob: its name, default and meaning."""

    name: str
    default: float
    help: str

    def get(self) -> float:
        raw = os.environ.get(self.name)
        if raw is None or raw == "":
            return self.default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(
                f"environment variable {self.name} must be a number, got {raw!r}; "
                f"unset it to use the default {self.default:g}"
            ) from None
        if value < 0:
            raise ConfigError(f"environment variable {self.name} must be >= 0, got {raw!r}")
        return value


CONNECT_TIMEOUT_S = Setting(
    "NEVE_CONNECT_TIMEOUT_S",
    15.0,
    "how long joining a Ray cluster by address (RAY_ADDRESS) may take before failing",
)
PLACEMENT_TIMEOUT_S = Setting(
    "NEVE_PLACEMENT_TIMEOUT_S",
    30.0,
    "how long to wait for the cluster to place every worker before failing",
)
WORKER_START_TIMEOUT_S = Setting(
    "NEVE_WORKER_START_TIMEOUT_S",
    120.0,
    "how long placed workers may take to start and import their framework",
)
WORKER_IDLE_TIMEOUT_S = Setting(
    "NEVE_WORKER_IDLE_TIMEOUT_S",
    60.0,
    "how long a warm worker group waits for the next run before giving its resources back "
    "(on a cluster neve joined rather than started: 0, unless set)",
)
PRESTART = Setting(
    "NEVE_PRESTART",
    1.0,
    "1: where warm workers are kept, an estimator or distributor made on a running Ray "
    "starts its workers in the background, and idle workers given back leave a Ray "
    "process each ready for the next group (XGBoost and LightGBM: the framework imported); "
    "0: workers start only when a run asks",
)
PIN_WORKERS = Setting(
    "NEVE_PIN_WORKERS",
    1.0,
    "1: an XGBoost or LightGBM worker of whole CPUs, whose group's workers take every CPU "
    "of their node, trains pinned to CPUs of its own; 0: workers run on any CPU",
)
COLLECTIVE_TIMEOUT_S = Setting(
    "NEVE_COLLECTIVE_TIMEOUT_S",
    60.0,
    "how long a collective (xgboost, LightGBM, torch) waits for a silent peer",
)
SHUTDOWN_GRACE_S = Setting(
    "NEVE_SHUTDOWN_GRACE_S",
    5.0,
    "how long workers get to stop on their own before they are killed",
)
PLAN_TIMEOUT_S = Setting(
    "NEVE_PLAN_TIMEOUT_S",
    120.0,
    "how long planning may wait for the cluster (counting a Ray Dataset's blocks, say)",
)
CHECKPOINT_INTERVAL_S = Setting(
    "NEVE_CHECKPOINT_INTERVAL_S",
    10.0,
    "the least time between two of a GBDT fit's checkpoints for restarts (with a "
    "checkpoint stage, every tenth of the rounds is one)",
)
CHECKPOINT_TIMEOUT_S = Setting(
    "NEVE_CHECKPOINT_TIMEOUT_S",
    600.0,
    "how long save_checkpoint() on rank 0 waits for the driver to commit the checkpoint",
)
CHECKPOINTS_KEEP = Setting(
    "NEVE_CHECKPOINTS_KEEP",
    2.0,
    "how many of a run's latest checkpoints stay in its stage (older ones are pruned)",
)
BATCH_BYTES = Setting(
    "NEVE_BATCH_BYTES",
    float(64 << 20),
    "the size of each Arrow block the driver streams into Ray's object store",
)


def worker_idle_timeout_s(shared_cluster: bool) -> float:
    """``NEVE_WORKER_IDLE_TIMEOUT_S``; unset, 60 s on neve's own local Ray and 0 (no
    warm workers) on a cluster neve joined, whose CPUs and GPUs others may want."""
    if os.environ.get(WORKER_IDLE_TIMEOUT_S.name):
        return WORKER_IDLE_TIMEOUT_S.get()
    return 0.0 if shared_cluster else WORKER_IDLE_TIMEOUT_S.default


def data_dir() -> Path:
    """neve's per-user data directory (``$NEVE_HOME``, else XDG data home)."""
    home = os.environ.get("NEVE_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "neve"


def stage_root() -> Path:
    """Where dotted stage names (``DB.SCHEMA.STAGE``) resolve: ``$NEVE_STAGE_ROOT``."""
    root = os.environ.get("NEVE_STAGE_ROOT")
    return Path(root).expanduser() if root else data_dir() / "stages"


def spill_url() -> str | None:
    """Where a multi-node cluster spills rows only the driver can read: ``$NEVE_SPILL_URL``
    (an fsspec URL or path every node can reach, e.g. ``s3://bucket/prefix``)."""
    return os.environ.get("NEVE_SPILL_URL") or None


def ray_address() -> str | None:
    """The Ray cluster to join (``$NEVE_RAY_ADDRESS``, then ``$RAY_ADDRESS``)."""
    return os.environ.get("NEVE_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS") or None


def local_num_cpus() -> int | None:
    """CPUs for a private local Ray instance (``$NEVE_LOCAL_NUM_CPUS``; default: all)."""
    raw = os.environ.get("NEVE_LOCAL_NUM_CPUS")
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"NEVE_LOCAL_NUM_CPUS must be an integer, got {raw!r}") from None
    if value < 1:
        raise ConfigError(f"NEVE_LOCAL_NUM_CPUS must be >= 1, got {value}")
    return value
