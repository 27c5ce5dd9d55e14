"""What the benchmarks share: data files, timing, worker memory, tables, results.

Kept free of heavy imports at module level (duckdb, psutil, Ray, neve are imported
where used), so a script can also run a small part of itself under another
interpreter (Snowflake's ingestor lives in its own virtual environment).

Data: ``N`` rows of 28 float32 features ``f0..f27`` and a float32 ``label`` with a
known nonlinear signal, generated in fixed chunks from fixed seeds, so the Parquet
file and the DuckDB file of one size hold the same rows. Files live under
``benchmarks/_data/`` (``$NEVE_BENCH_DATA_DIR`` overrides) and are reused when they
already hold the right number of rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("NEVE_BENCH_DATA_DIR") or REPO / "benchmarks" / "_data")
NUM_FEATURES = 28
FEATURES = [f"f{i}" for i in range(NUM_FEATURES)]
LABEL = "label"
#: float32 bytes of one row: 28 features and the label
ROW_BYTES = (NUM_FEATURES + 1) * 4
SCHEMA = pa.schema([(c, pa.float32()) for c in [*FEATURES, LABEL]])

_T0 = time.perf_counter()


# -- output ------------------------------------------------------------------------------------


def log(message: str) -> None:
    """A progress line with the seconds since the script started."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


def fmt_rate(rows_per_s: float | None) -> str:
    if rows_per_s is None:
        return "-"
    if rows_per_s >= 1e6:
        return f"{rows_per_s / 1e6:.2f} M"
    return f"{rows_per_s / 1e3:.0f} k"


def fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


def fmt_x(ratio: float | None) -> str:
    return "-" if ratio is None or not math.isfinite(ratio) else f"{ratio:.2f}x"


def fmt_mb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.0f}"


def one_line(exc: BaseException, limit: int = 160) -> str:
    """An exception as one short line for a table cell."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An aligned plain-text table (first column left, others right)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        pairs = enumerate(zip(row, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (first column left, others right)."""
    def esc(cell: Any) -> str:
        return str(cell).replace("|", "\\|")

    out = ["| " + " | ".join(esc(h) for h in headers) + " |"]
    out.append("|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|")
    out.extend("| " + " | ".join(esc(c) for c in row) + " |" for row in rows)
    return "\n".join(out)


class Report:
    """One benchmark's results: tables for people, targets, raw figures, and JSON."""

    def __init__(self, name: str, title: str, params: dict[str, Any]) -> None:
        self.name = name
        self.title = title
        self.params = params
        self.tables: list[dict[str, Any]] = []
        self.targets: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}
        self.notes: list[str] = []

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]],
              notes: Sequence[str] = ()) -> None:
        self.tables.append({"title": title, "headers": list(headers),
                            "rows": [[str(c) for c in r] for r in rows], "notes": list(notes)})

    def target(self, what: str, target: str, reached: float | None, met: bool | None,
               unit: str = "x") -> None:
        """A goal and what was reached: a ratio (``unit="x"``) or seconds (``"s"``)."""
        # Kept whole: rounded here and again when shown, a difference could read
        # 0.01 apart from the table it comes from.
        self.targets.append({"what": what, "target": target,
                             "reached": None if reached is None else float(reached),
                             "unit": unit, "met": met})

    def print(self) -> None:
        print(flush=True)
        print(f"== {self.title} ==")
        print("   " + ", ".join(f"{k}={v}" for k, v in self.params.items()))
        for table in self.tables:
            print()
            print(table["title"])
            print(text_table(table["headers"], table["rows"]))
            for note in table["notes"]:
                print(f"  * {note}")
        if self.targets:
            print()
            print("Targets")
            print(text_table(TARGET_HEADERS, target_rows(self.targets)))
        for note in self.notes:
            print(f"* {note}")
        print(flush=True)

    def write_json(self, path: str | None) -> None:
        if not path:
            return
        import datetime

        payload = {
            "benchmark": self.name,
            "title": self.title,
            "params": self.params,
            "command": command_line(),
            "finished": datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "tables": self.tables,
            "targets": self.targets,
            "results": self.results,
            "notes": self.notes,
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str))
        log(f"results written to {path}")


TARGET_HEADERS = ["what", "target", "reached", "met"]


def at_least_one(text: str) -> int:
    """An argparse type: an integer >= 1 (a count of repeats whose median is taken)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fmt_reached(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:+.2f} s"
    return fmt_x(value) if unit == "x" else f"{value:.0f} {unit}"


def target_rows(targets: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Targets as table rows (``met``: yes / NO / n/a)."""
    return [[t["what"], t["target"], fmt_reached(t["reached"], t.get("unit", "x")),
             {True: "yes", False: "NO", None: "n/a"}[t["met"]]] for t in targets]


def command_line() -> str:
    """How this script was run, short: ``python benchmarks/x.py --rows 10`` (no ``--json``)."""
    argv = list(sys.argv[1:])
    if "--json" in argv:
        i = argv.index("--json")
        del argv[i:i + 2]
    argv = [a for a in argv if not a.startswith("--json=")]
    return " ".join(["python", rel(Path(sys.argv[0]).resolve()), *argv])


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the results as JSON to PATH (run_all.py reads it)")
    return parser


# -- timing ------------------------------------------------------------------------------------


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.s`` holds the seconds."""

    def __enter__(self) -> Stopwatch:
        self._t = time.perf_counter()
        self.s = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self._t


# -- Ray ---------------------------------------------------------------------------------------


def start_ray() -> float:
    """Start neve's private local Ray (2 CPUs unless NEVE_LOCAL_NUM_CPUS says otherwise).

    Returns the seconds it took. Never stops anybody's Ray: the instance goes
    away with this process.
    """
    os.environ.setdefault("NEVE_LOCAL_NUM_CPUS", "2")
    os.environ.setdefault("NEVE_PROGRESS", "0")
    from neve._internal.runtime.cluster import ensure_ray

    log(f"starting neve's private local Ray ({os.environ['NEVE_LOCAL_NUM_CPUS']} CPUs)")
    with Stopwatch() as sw:
        ensure_ray()
    log(f"Ray up in {sw.s:.1f} s")
    return sw.s


def trim_memory() -> None:
    """Give this process's freed memory back to the OS between measurements: glibc's,
    and Arrow's pool's (mimalloc or jemalloc keep freed pages for a while; returned
    during the next measurement, they would hide that much of its memory)."""
    import ctypes
    import gc

    import pyarrow as pa

    gc.collect()
    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def release_neve_workers(keep_ready: bool = False) -> None:
    """Give back the CPUs that neve's warm worker groups hold (before another trainer),
    and wait until their processes are gone: a measurement that follows does not share
    the machine with their exit. ``keep_ready``: as neve's idle timeout gives a group
    back, Ray keeping a process ready per worker; then wait until they are up and done
    starting (for GBDT workers, their framework imported), as after the idle timeout."""
    from neve._internal.runtime import group

    pids = [w.pid for g, _ in list(group._pool._idle.values()) for w in g.workers]
    idle_before = idle_ray_processes() if keep_ready else set()
    group.shutdown_idle(keep_processes_ready=keep_ready)
    wait_cpus_free()
    wait_exited(pids)
    if keep_ready:
        deadline = time.monotonic() + 30.0
        while (len(idle_ray_processes() - idle_before) < len(pids)
               and time.monotonic() < deadline):
            time.sleep(0.05)
        wait_quiet(idle_ray_processes() - idle_before)


def wait_quiet(pids: set[int], timeout_s: float = 30.0) -> None:
    """Wait until processes ``pids`` use (almost) no CPU for a quarter second (bounded)."""
    import psutil

    def cpu_s() -> float:
        total = 0.0
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(pid).cpu_times()
                total += times.user + times.system
        return total

    deadline = time.monotonic() + timeout_s
    last = cpu_s()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = cpu_s()
        if now - last < 0.02:
            return
        last = now


def idle_ray_processes() -> set[int]:
    """Ray's worker processes on this machine that wait for work (titled ray::IDLE)."""
    import psutil

    found = set()
    for process in psutil.process_iter(["cmdline"]):
        if (process.info["cmdline"] or [""])[0].startswith("ray::IDLE"):
            found.add(process.pid)
    return found


def wait_exited(pids: Sequence[int], timeout_s: float = 30.0) -> None:
    """Wait until processes ``pids`` (of this machine) have exited (bounded)."""
    deadline = time.monotonic() + timeout_s
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_cpus_free(timeout_s: float = 30.0) -> None:
    """Wait until every CPU of the Ray cluster is free again (bounded)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0):
            return
        time.sleep(0.1)
    log("warning: some CPUs are still reserved; the next measurement may wait for them")


def capture_neve_worker_pids(on_pids: Any) -> None:
    """Call ``on_pids(list_of_pids)`` whenever a neve fit takes a worker group.

    Wraps ``neve._internal.runtime.group.acquire`` in this process only (the
    runner looks it up at call time); neve's source is not changed.
    """
    from neve._internal.runtime import group

    original = getattr(group.acquire, "__wrapped__", group.acquire)

    def acquire(layout: Any) -> Any:
        workers = original(layout)
        on_pids([w.pid for w in workers.workers])
        return workers

    acquire.__wrapped__ = original  # type: ignore[attr-defined]
    group.acquire = acquire


class output_to:
    """Send this process's fds 1 and 2 (Ray's forwarded worker logs too) to a file a while.

    Ray Train on a Ray without a dashboard repeats a warning every few seconds
    ("Failed to query Ray Train Controller actor state"); the lines are kept in
    the file rather than drowning the results.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> output_to:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = [os.dup(1), os.dup(2)]
        self._file = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(self._file, 1)
        os.dup2(self._file, 2)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in ((1, self._saved[0]), (2, self._saved[1])):
            os.dup2(saved, fd)
            os.close(saved)
        os.close(self._file)


# -- memory of worker processes ----------------------------------------------------------------


class MemorySampler:
    """Samples the memory of some processes in a thread; keeps each one's peak.

    ``rss`` is the resident set; ``private`` is ``rss - shared`` (Linux: anonymous
    memory only, so pages of Ray's shared object store that a worker maps and
    reads are not counted as its own). Processes are added by pid, or found as
    ``pid-<n>`` files that workers drop into ``pid_dir``.
    """

    def __init__(self, interval_s: float = 0.05, pid_dir: str | None = None) -> None:
        self.interval_s = interval_s
        self.pid_dir = pid_dir
        self._pids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak_rss: dict[int, int] = {}
        self.peak_private: dict[int, int] = {}
        self.first_rss: dict[int, int] = {}

    def add(self, pids: Sequence[int]) -> None:
        with self._lock:
            self._pids.update(int(p) for p in pids)

    def __enter__(self) -> MemorySampler:
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        import psutil

        if self.pid_dir and os.path.isdir(self.pid_dir):
            found = [int(n[4:]) for n in os.listdir(self.pid_dir) if n.startswith("pid-")]
            self.add(found)
        with self._lock:
            pids = list(self._pids)
        for pid in pids:
            try:
                info = psutil.Process(pid).memory_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            private = info.rss - getattr(info, "shared", 0)
            self.first_rss.setdefault(pid, info.rss)
            self.peak_rss[pid] = max(self.peak_rss.get(pid, 0), info.rss)
            self.peak_private[pid] = max(self.peak_private.get(pid, 0), private)

    def summary(self) -> dict[str, Any]:
        """Peak over the workers: ``{"workers", "peak_rss", "peak_private"}`` (bytes)."""
        return {
            "workers": len(self.peak_rss),
            "peak_rss": max(self.peak_rss.values(), default=None),
            "peak_private": max(self.peak_private.values(), default=None),
        }


# -- data --------------------------------------------------------------------------------------

_WEIGHTS = np.random.default_rng(12345).normal(scale=0.2, size=NUM_FEATURES - 8).astype(
    np.float32
)


def _signal(x: np.ndarray) -> np.ndarray:
    return (
        2.0 * x[:, 0]
        - x[:, 1]
        + 0.5 * x[:, 2] * x[:, 3]
        + np.sin(2.0 * x[:, 4])
        + 0.5 * np.sign(x[:, 5])
        + 0.3 * x[:, 6] ** 2
        - 0.4 * np.abs(x[:, 7])
        + x[:, 8:] @ _WEIGHTS
    )


def chunk_rows(rows: int) -> int:
    """Rows per generated chunk and per Parquet row group: about 16 row groups a file."""
    return max(math.ceil(rows / 16), 4096)


def generate(rows: int, seed: int) -> Iterator[pa.Table]:
    """``rows`` rows in chunks of ``chunk_rows(rows)``, the same for a given (rows, seed)."""
    step = chunk_rows(rows)
    for index, start in enumerate(range(0, rows, step)):
        n = min(step, rows - start)
        rng = np.random.default_rng([seed, index])
        x = rng.standard_normal((n, NUM_FEATURES), dtype=np.float32)
        y = (_signal(x) + rng.normal(scale=0.5, size=n)).astype(np.float32)
        arrays = [pa.array(x[:, j]) for j in range(NUM_FEATURES)] + [pa.array(y)]
        yield pa.Table.from_arrays(arrays, schema=SCHEMA)


def test_rows_for(rows: int) -> int:
    """Rows of the held-out set that goes with a training set of ``rows`` rows."""
    return max(rows // 5, 10_000)


def parquet_file(rows: int) -> Path:
    """A Parquet file of ``rows`` training rows in about 16 row groups (made if missing)."""
    import pyarrow.parquet as pq

    path = DATA_DIR / f"synth_{rows}.parquet"
    if path.exists():
        try:
            meta = pq.ParquetFile(path).metadata
            if meta.num_rows == rows and meta.num_columns == len(SCHEMA):
                log(f"reusing {rel(path)} ({meta.num_row_groups} row groups)")
                return path
        except Exception:  # a broken file from an interrupted run: make it again
            pass
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    log(f"writing {rel(path)} ({rows:,} rows x {NUM_FEATURES} float32 + label)")
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with pq.ParquetWriter(tmp, SCHEMA) as writer:
        for table in generate(rows, seed=0):
            writer.write_table(table, row_group_size=chunk_rows(rows))
    os.replace(tmp, path)
    return path


def duckdb_file(rows: int) -> Path:
    """A DuckDB file with tables ``train`` (``rows`` rows) and ``test`` (made if missing)."""
    import duckdb

    path = DATA_DIR / f"synth_{rows}.duckdb"
    test_rows = test_rows_for(rows)
    if path.exists():
        try:
            con = duckdb.connect(str(path), read_only=True)
            try:
                counts = [con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]
                          for t in ("train", "test")]
            finally:
                con.close()
            if counts == [rows, test_rows]:
                log(f"reusing {rel(path)}")
                return path
        except Exception as exc:  # unreadable: make it again
            log(f"cannot reuse {rel(path)} ({exc}); making it again")
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    log(f"writing {rel(path)} (train {rows:,} rows, test {test_rows:,} rows)")
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
        leftover.unlink(missing_ok=True)
    columns = ", ".join(f"{c} FLOAT" for c in SCHEMA.names)
    con = duckdb.connect(str(tmp))
    try:
        for table_name, n, seed in (("train", rows, 0), ("test", test_rows, 1)):
            con.execute(f"CREATE TABLE {table_name} ({columns})")
            for chunk in generate(n, seed=seed):
                con.register("chunk", chunk)
                con.execute(f"INSERT INTO {table_name} SELECT * FROM chunk")
                con.unregister("chunk")
        con.execute("CHECKPOINT")
    finally:
        con.close()
    os.replace(tmp, path)
    return path


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


# -- the machine -------------------------------------------------------------------------------


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception:
        return "not installed"
    return str(getattr(mod, "__version__", "?"))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state() -> dict[str, Any]:
    """The commit the code comes from, and whether the tree differs from it (with the
    diff's hash, so a figure from a dirty tree names exactly what it ran)."""
    import hashlib

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True,
                              text=True, timeout=30).stdout

    # What run_all itself writes is output, not code: it does not make a tree dirty.
    code = ["--", ".", ":!BENCHMARKS.md", ":!benchmarks/results"]
    try:
        commit = git("rev-parse", "--short", "HEAD").strip() or "?"
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", *code).strip())
    except Exception:
        return {"commit": "?", "dirty": None, "diff_sha1": None}
    diff = (hashlib.sha1(git("diff", "HEAD", *code).encode()).hexdigest()[:12] if dirty
            else None)
    return {"commit": commit, "dirty": dirty, "diff_sha1": diff}


def _git_commit() -> str:
    state = git_state()
    if state["dirty"]:
        return (f"{state['commit']} PLUS UNCOMMITTED CHANGES (diff sha1 {state['diff_sha1']}): "
                "no commit reproduces these figures")
    return str(state["commit"])


def machine() -> dict[str, Any]:
    """Cores, memory, CPU model, OS and the versions that matter here."""
    import psutil

    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "versions": {
            "python": platform.python_version(),
            "neve": _version("neve"),
            "ray": _version("ray"),
            "xgboost": _version("xgboost"),
            "lightgbm": _version("lightgbm"),
            "torch": _version("torch"),
            "duckdb": _version("duckdb"),
            "pyarrow": _version("pyarrow"),
            "numpy": _version("numpy"),
        },
        "git_commit": _git_commit(),
    }
