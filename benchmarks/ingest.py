"""Ingest: rows per second from Parquet or DuckDB into torch tensors.

Every contender yields batches of ``--batch-size`` rows as ``{column: tensor}``;
one consumer (the same for all) stacks the 28 features into a ``(batch, 28)``
matrix and sums it and the label, so every tensor is read. Timings include
building the dataset (``setup``) and one full pass; the best of ``--repeat``
passes counts.

* ``pyarrow loop`` - ``ParquetFile.iter_batches`` + ``torch.from_numpy`` (zero
  copy): a hand-written reference, not a limit (neve beats it);
* ``memory copy`` - the physical ceiling: the machine copying the same float32 bytes
  once, in memory (every contender's consumer copies them at least once);
* ``neve parquet`` - ``DataConnector.from_sources(path).to_torch_dataset(...)``;
* ``neve duckdb`` - ``DataConnector.from_dataframe(con.table("train"))`` on a
  DuckDB file, then ``to_torch_dataset(...)``;
* ``Snowflake ArrowIngestor`` - snowflake-ml-python's own ingestor over the same
  local Parquet file (it needs no account for files): run in this interpreter when
  ``snowflake.ml`` imports, else under ``--snowflake-python`` (a virtual
  environment with ``pip install snowflake-ml-python torch``), else skipped;
* ``Ray Data`` - ``ray.data.read_parquet(path).iter_torch_batches(...)``.

Run: ``python benchmarks/ingest.py`` (2M rows), ``--rows 50000`` for a quick look.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

try:
    from benchmarks import _common as common
except ImportError:  # run as a script: python benchmarks/ingest.py
    import _common as common  # type: ignore[no-redef]

# Zero-copy views of Arrow buffers are read-only; torch warns once about that.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

_CHILD_MARK = "SNOWFLAKE_INGEST_RESULT "
#: rows the pyarrow loop decodes at a time before slicing batches out of them
DECODE_ROWS = 65_536
#: bytes copied at a time to measure the machine's memory-copy rate
COPY_CHUNK = 64 << 20


# -- the consumer ------------------------------------------------------------------------------


def consume(batches: Iterable[dict[str, Any]]) -> int:
    """Read every tensor of every batch as a model input would; return the row count."""
    import torch

    rows = 0
    total = torch.zeros((), dtype=torch.float64)
    for batch in batches:
        columns = [_tensor(batch[c]) for c in common.FEATURES]
        x = torch.stack(columns, dim=1)
        y = _tensor(batch[common.LABEL])
        total += x.sum(dtype=torch.float64) + y.sum(dtype=torch.float64)
        rows += int(x.shape[0])
    if not torch.isfinite(total):
        raise RuntimeError("non-finite checksum: the data was not read correctly")
    return rows


def _tensor(value: Any) -> Any:
    import torch

    return value if isinstance(value, torch.Tensor) else torch.from_numpy(value)


def measure(name: str, setup: Callable[[], Iterable[dict[str, Any]]], repeat: int) -> dict:
    """Best of ``repeat`` (setup + one pass); returns seconds and rows/s."""
    best: dict[str, Any] | None = None
    for attempt in range(1, repeat + 1):
        t0 = time.perf_counter()
        batches = setup()
        t1 = time.perf_counter()
        rows = consume(batches)
        t2 = time.perf_counter()
        run = {"setup_s": t1 - t0, "iter_s": t2 - t1, "total_s": t2 - t0, "rows": rows,
               "rows_per_s": rows / (t2 - t0)}
        common.log(f"{name}: pass {attempt}/{repeat}: {rows:,} rows in {run['total_s']:.2f} s "
                   f"(setup {run['setup_s']:.2f} s) = {common.fmt_rate(run['rows_per_s'])} rows/s")
        if best is None or run["total_s"] < best["total_s"]:
            best = run
    assert best is not None
    return best


def guarded(label: str, setup: Callable[[], Iterable[dict[str, Any]]], repeat: int) -> dict:
    """``measure``, with a failure recorded (and the run going on) instead of raised."""
    try:
        return {"label": label, "status": "ok", **measure(label, setup, repeat)}
    except Exception as exc:
        common.log(f"{label}: failed: {type(exc).__name__}: {exc}")
        return {"label": label, "status": "failed", "reason": common.one_line(exc)}


# -- contenders --------------------------------------------------------------------------------


def memory_copy(rows: int, repeat: int) -> dict[str, Any]:
    """The ceiling: seconds to copy ``rows`` rows of float32 bytes once, in memory."""
    import numpy as np

    total = rows * common.ROW_BYTES
    source = np.ones(COPY_CHUNK // 4, dtype=np.float32)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(-(-total // COPY_CHUNK)):
            np.copyto(target, source)
        best = min(best, time.perf_counter() - t0)
    common.log(f"memory copy: {total / 2**30:.2f} GiB in {best:.2f} s = "
               f"{common.fmt_rate(rows / best)} rows/s")
    return {"label": "memory copy of the float32 bytes (ceiling)", "status": "ok",
            "setup_s": 0.0, "iter_s": best, "total_s": best, "rows": rows,
            "rows_per_s": rows / best}


def pyarrow_direct(path: Path, batch_size: int) -> Iterable[dict[str, Any]]:
    """Decode in large batches, hand out zero-copy slices: the fastest way pyarrow allows.

    (Decoding 1024 rows at a time is slower than decoding 64k and slicing.)
    """
    import pyarrow.parquet as pq
    import torch

    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names

    def batches() -> Iterable[dict[str, Any]]:
        for big in parquet.iter_batches(batch_size=max(DECODE_ROWS, batch_size)):
            for start in range(0, big.num_rows, batch_size):
                rb = big.slice(start, batch_size)
                yield {name: torch.from_numpy(col.to_numpy())
                       for name, col in zip(names, rb.columns, strict=True)}

    return batches()


def neve_parquet(path: Path, batch_size: int) -> Iterable[dict[str, Any]]:
    from neve.data import DataConnector

    return DataConnector.from_sources(str(path)).to_torch_dataset(batch_size=batch_size)


def neve_duckdb(path: Path, batch_size: int) -> Iterable[dict[str, Any]]:
    import duckdb

    from neve.data import DataConnector

    session = duckdb.connect(str(path), read_only=True)
    return DataConnector.from_dataframe(session.table("train")).to_torch_dataset(
        batch_size=batch_size
    )


def ray_data(path: Path, batch_size: int) -> Iterable[dict[str, Any]]:
    import ray.data

    ds = ray.data.read_parquet(str(path))
    return ds.iter_torch_batches(batch_size=batch_size, drop_last=True)


def snowflake_ingestor(path: Path, batch_size: int) -> Iterable[dict[str, Any]]:
    """Snowflake's DataConnector over its ArrowIngestor, on a local file (no session)."""
    from snowflake.ml.data._internal.arrow_ingestor import ArrowIngestor
    from snowflake.ml.data.data_connector import DataConnector as SnowflakeConnector

    ingestor = ArrowIngestor(None, [str(path)], format="parquet")
    connector = SnowflakeConnector(ingestor, expand_dims=False)  # neve's (batch,) shape
    return connector.to_torch_dataset(batch_size=batch_size, shuffle=False, drop_last_batch=True)


def _snowflake_importable() -> str | None:
    """None when snowflake-ml-python and torch import here, else why not."""
    try:
        import snowflake.ml.data._internal.arrow_ingestor  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        return f"{exc.name or exc} is not importable here"
    return None


def run_snowflake(args: Any, path: Path) -> dict[str, Any]:
    """Measure Snowflake's ingestor here, or under --snowflake-python, or say why not."""
    why = _snowflake_importable()
    if why is None:
        result = guarded("Snowflake ArrowIngestor",
                         lambda: snowflake_ingestor(path, args.batch_size), args.repeat)
        return {**result, "where": "this interpreter"}
    python = args.snowflake_python or os.environ.get("NEVE_BENCH_SNOWFLAKE_PYTHON")
    if not python:
        common.log(f"Snowflake ArrowIngestor: {why}. To include it, make a virtual environment "
                   "with `pip install snowflake-ml-python torch` and pass --snowflake-python "
                   "/path/to/that/venv/bin/python (or set $NEVE_BENCH_SNOWFLAKE_PYTHON)")
        return {"status": "skipped", "reason": "snowflake-ml-python is not installed"}
    common.log(f"Snowflake ArrowIngestor: running under {python}")
    command = [python, str(Path(__file__).resolve()), "--snowflake-child", "--parquet",
               str(path), "--batch-size", str(args.batch_size), "--repeat", str(args.repeat)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"status": "skipped", "reason": f"could not run {python}: {exc}"}
    for line in done.stdout.splitlines():
        if line.startswith(_CHILD_MARK):
            result = json.loads(line[len(_CHILD_MARK):])
            for message in result.pop("log", []):
                common.log(message)
            return result
        print(f"  (child) {line}", flush=True)
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": "skipped", "reason": f"{python} failed (exit {done.returncode}): {tail}"}


def warm_imports() -> None:
    """Import what the contenders use before timing anything (torch alone takes seconds)."""
    import logging

    import pyarrow.parquet  # noqa: F401
    import torch  # noqa: F401

    try:
        import neve.data  # noqa: F401
        from neve._internal.data import torch_dataset  # noqa: F401
    except ImportError:  # the Snowflake child runs without neve
        pass
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    except ImportError:
        pass


def snowflake_child(args: Any) -> int:
    """``--snowflake-child``: measure only Snowflake's ingestor; print one JSON line."""
    why = _snowflake_importable()
    if why is not None:
        print(_CHILD_MARK + json.dumps({"status": "skipped", "reason": why}))
        return 0
    from importlib.metadata import version

    warm_imports()
    result = measure("Snowflake ArrowIngestor",
                     lambda: snowflake_ingestor(Path(args.parquet), args.batch_size), args.repeat)
    result.update(status="ok",
                  where=f"{sys.executable} (snowflake-ml-python {version('snowflake-ml-python')})")
    print(_CHILD_MARK + json.dumps(result), flush=True)
    return 0


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> Any:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows in the data set")
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per batch")
    parser.add_argument("--repeat", type=int, default=2,
                        help="passes per contender; the fastest counts")
    parser.add_argument("--snowflake-python", metavar="PYTHON", default=None,
                        help="an interpreter with snowflake-ml-python and torch, used when "
                        "snowflake.ml does not import here (or $NEVE_BENCH_SNOWFLAKE_PYTHON)")
    parser.add_argument("--skip", default="",
                        help="comma-separated contenders to leave out: pyarrow,neve-parquet,"
                        "neve-duckdb,snowflake,ray-data")
    parser.add_argument("--snowflake-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--parquet", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.snowflake_child:
        return snowflake_child(args)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    warm_imports()
    common.log(f"ingest benchmark: {args.rows:,} rows x {common.NUM_FEATURES} float32 + label, "
               f"batches of {args.batch_size}")
    parquet = common.parquet_file(args.rows)
    database = common.duckdb_file(args.rows)
    ray_start_s = common.start_ray()

    contenders: list[tuple[str, str, Callable[[Path, int], Iterable[dict[str, Any]]], Path]] = [
        ("pyarrow", "pyarrow loop (reference)", pyarrow_direct, parquet),
        ("neve-parquet", "neve from Parquet", neve_parquet, parquet),
        ("neve-duckdb", "neve from DuckDB file", neve_duckdb, database),
    ]
    results: dict[str, dict[str, Any]] = {"copy": memory_copy(args.rows, args.repeat)}
    for key, label, make, path in contenders:
        if key not in skip:
            results[key] = guarded(label, lambda m=make, p=path: m(p, args.batch_size),
                                   args.repeat)
    if "snowflake" not in skip:
        results["snowflake"] = {"label": "Snowflake ArrowIngestor", **run_snowflake(args, parquet)}
        if results["snowflake"]["status"] != "ok":
            common.log(f"Snowflake ArrowIngestor: skipped: {results['snowflake']['reason']}")
    if "ray-data" not in skip:
        results["ray-data"] = guarded("Ray Data iter_torch_batches",
                                      lambda: ray_data(parquet, args.batch_size), args.repeat)

    report = build_report(args, results, ray_start_s)
    report.print()
    report.write_json(args.json)
    return 0


def snowflake_notes(result: dict[str, Any] | None) -> list[str]:
    if not result or result.get("status") != "ok":
        return []
    return [f"Snowflake ArrowIngestor ran under {result.get('where')}: "
            "DataConnector(ArrowIngestor(None, [file], format='parquet'), expand_dims=False)"
            ".to_torch_dataset(...); no account or session is needed for local files"]


def build_report(args: Any, results: dict[str, dict[str, Any]], ray_start_s: float
                 ) -> common.Report:
    report = common.Report("ingest", "Ingest into torch tensors",
                           {"rows": args.rows, "features": common.NUM_FEATURES,
                            "batch_size": args.batch_size, "repeat": args.repeat,
                            "ray_cpus": os.environ.get("NEVE_LOCAL_NUM_CPUS")})
    ceiling = results.get("copy", {}).get("rows_per_s")
    loop = results.get("pyarrow", {}).get("rows_per_s")
    ray_rate = results.get("ray-data", {}).get("rows_per_s")
    rows = []
    for result in results.values():
        if result.get("status") != "ok":
            rows.append([result["label"], "-", "-", "-", "-", "-",
                         f"{result['status']}: {result['reason']}"])
            continue
        rate = result["rows_per_s"]
        rows.append([result["label"], common.fmt_s(result["setup_s"]),
                     common.fmt_s(result["total_s"]), common.fmt_rate(rate),
                     common.fmt_x(common.ratio(rate, ceiling)),
                     common.fmt_x(common.ratio(rate, loop)),
                     common.fmt_x(common.ratio(rate, ray_rate))])
    report.table(
        "Rows per second into {column: tensor} batches",
        ["source", "setup s", "total s", "rows/s", "vs memory copy", "vs pyarrow loop",
         "vs Ray Data"],
        rows,
        notes=[
            "total = setup (building the dataset) + one full pass; best of "
            f"{args.repeat} passes",
            "memory copy = numpy copying the same float32 bytes once in memory, in "
            f"{COPY_CHUNK >> 20} MiB chunks: the ceiling (every contender's consumer stacks "
            "the features, a copy of them)",
            f"pyarrow loop = ParquetFile.iter_batches({DECODE_ROWS}) sliced into batches + "
            "torch.from_numpy (zero copy): a reference, not a limit",
            "neve from DuckDB file: DataConnector.from_dataframe(duckdb.connect(file)"
            ".table('train')); its setup is all the work done before the first batch",
            f"Ray started once before the measurements ({ray_start_s:.1f} s, not counted)",
            *snowflake_notes(results.get("snowflake")),
        ],
    )
    for key in ("neve-parquet", "neve-duckdb"):
        rate = results.get(key, {}).get("rows_per_s")
        if rate is None:
            continue
        to_loop = common.ratio(rate, loop)
        to_ray = common.ratio(rate, ray_rate)
        label = results[key]["label"]
        report.target(f"{label} vs pyarrow loop", ">= 0.70x", to_loop,
                      None if to_loop is None else to_loop >= 0.7)
        report.target(f"{label} vs Ray Data", ">= 5x", to_ray,
                      None if to_ray is None else to_ray >= 5.0)
    report.results = {"ray_start_s": ray_start_s, "contenders": results}
    return report


if __name__ == "__main__":
    sys.exit(main())
