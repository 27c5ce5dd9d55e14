"""Where a DuckDB source's rows should go for the workers: a local Arrow IPC spill or
Ray's object store, by size.

For each size (rows x 28 float32 + label, a table in a DuckDB file), both plans are
made from the same source and two Ray tasks (the workers) each read their half of
the rows, as a fit's shards would. Time: plan + reads, best of ``--repeat``.
neve uses the spill at every size (``plans.spill_plan`` for one node); this says what
that costs where the data is small.

    python benchmarks/spill_crossover.py --rows 10000 100000 1000000 4000000
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from benchmarks import _common as common
except ImportError:  # run as a script
    import _common as common  # type: ignore[no-redef]


def _table(path: Path, rows: int) -> Any:
    import duckdb

    con = duckdb.connect(str(path))
    columns = ", ".join(f"random()::REAL AS {name}" for name in common.FEATURES)
    con.execute(f"CREATE TABLE t AS SELECT {columns}, random()::REAL AS label "
                f"FROM range({rows})")
    return con


def _count(shard: Any) -> int:
    return sum(batch.num_rows for piece in shard for batch in piece.read(None))


def _read_shards(plan: Any) -> int:
    """Two Ray tasks (warm worker processes) read half the rows each."""
    import ray

    read = ray.remote(num_cpus=1)(_count)
    shards = [plan.pieces(*bounds) for bounds in _halves(plan.num_rows)]
    return sum(ray.get([read.remote(shard) for shard in shards]))


def _halves(rows: int | None) -> list[tuple[int, int]]:
    assert rows is not None
    return [(0, rows // 2), (rows // 2, rows)]


def measure(rows: int, repeat: int) -> dict[str, float]:
    from neve._internal.data import plans
    from neve._internal.data.resolve import source_from_dataframe
    from neve._internal.data.sources import projected_schema

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        con = _table(Path(folder) / "t.duckdb", rows)
        source = source_from_dataframe(con.table("t"))
        schema = projected_schema(source.schema(), None)
        makers = {"spill": lambda: plans.spill_plan(source, None),
                  "object store": lambda: plans.object_store_plan(source, None, schema)}
        for name, make in makers.items():
            best = float("inf")
            for _ in range(repeat):
                start = time.perf_counter()
                plan = make()
                assert _read_shards(plan) == rows
                best = min(best, time.perf_counter() - start)
                plan.release()
            out[name] = best
        con.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+",
                        default=[10_000, 100_000, 1_000_000, 4_000_000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    measure(1000, 2)  # worker processes started and warm, not counted
    print(f"{'rows':>10} {'spill s':>9} {'object store s':>15} {'spill / store':>14}")
    for rows in args.rows:
        t = measure(rows, args.repeat)
        print(f"{rows:>10,} {t['spill']:>9.3f} {t['object store']:>15.3f} "
              f"{t['spill'] / t['object store']:>13.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
