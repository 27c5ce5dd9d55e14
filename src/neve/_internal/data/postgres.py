"""PostgreSQL read by the workers themselves: in parallel, exactly once, in one snapshot.

The driver opens a ``REPEATABLE READ, READ ONLY`` transaction, exports its snapshot
(``pg_export_snapshot()``) and keeps the transaction open while the run lasts (the
plan's lease). Each worker imports that snapshot (``SET TRANSACTION SNAPSHOT``) and
reads its own ranges, so the parallel read is exactly once and consistent while
other sessions commit - the way parallel ``pg_dump`` stays consistent.

* A plain scan of one table (``SELECT ... FROM t [WHERE ...]``, checked with
  ``EXPLAIN``) is cut into ``ctid`` page ranges: TID range scans, PostgreSQL 14+.
* Any other query is cut into value ranges of ``partition_column`` when one is
  named (as Spark's JDBC source and ConnectorX do).
* Otherwise there is no parallel plan: the driver streams the rows into a spill.

Ranges do not know their row counts (unsized fragments): a worker copies its
ranges to local disk as it first reads them, and every later pass reads that copy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

from neve._internal.data.batches import slice_stream
from neve._internal.data.errors import source_error
from neve._internal.data.fragments import Fragment, Lease, Plan
from neve._internal.data.sources import projected_schema
from neve._internal.data.sql import adbc_connect, quote, select_list
from neve.exceptions import ConfigError

if TYPE_CHECKING:
    from neve._internal.data.sql import ADBCSource

logger = logging.getLogger(__name__)

#: the fewest and most ranges a table or key range is cut into (workers get whole ranges)
MIN_RANGES = 64
MAX_RANGES = 4096
#: pages (8 KiB) per range at least, once a table is large: 32 MiB
MIN_RANGE_PAGES = 4096

_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][\w$]*)'
_SIMPLE_SCAN = re.compile(
    rf"^\s*select\s+(?P<select>.+?)\s+from\s+(?P<table>{_IDENT}(?:\s*\.\s*{_IDENT}){{0,2}})"
    rf"(?:\s+(?:as\s+)?(?P<alias>(?!where\b){_IDENT}))?"
    r"(?:\s+where\s+(?P<where>.+?))?\s*$",
    re.IGNORECASE | re.DOTALL,
)
_NOT_A_PLAIN_SCAN = re.compile(
    r"\b(join|group\s+by|order\s+by|limit|offset|union|intersect|except|having|window|"
    r"fetch|for\s+(?:update|share)|distinct|tablesample|returning|with)\b",
    re.IGNORECASE,
)
_SCAN_NODES = {"Seq Scan", "Parallel Seq Scan", "Index Scan", "Index Only Scan",
               "Bitmap Heap Scan", "Tid Scan", "Tid Range Scan"}
_BITMAP_CHILDREN = {"Bitmap Index Scan", "BitmapAnd", "BitmapOr"}


@dataclass(frozen=True)
class TableScan:
    """A query that reads one table: ``SELECT <select> FROM <table> <alias> WHERE <where>``."""

    select: str
    table: str
    alias: str | None
    where: str | None

    def ranged(self, lo: int, hi: int | None, *, ordered: bool) -> str:
        """The rows on pages ``[lo, hi)`` (``hi=None``: to the end of the table)."""
        ref = self.alias or self.table
        bounds = f"{ref}.ctid >= '({lo},0)'::tid"
        if hi is not None:
            bounds += f" AND {ref}.ctid < '({hi},0)'::tid"
        where = f"({self.where}) AND {bounds}" if self.where else bounds
        alias = f" AS {self.alias}" if self.alias else ""
        order = f" ORDER BY {ref}.ctid" if ordered else ""
        return f"SELECT {self.select} FROM {self.table}{alias} WHERE {where}{order}"


def parse_table_scan(query: str) -> TableScan | None:
    """The parts of a one-table ``SELECT``, or ``None`` (joins, aggregates, subqueries...)."""
    if len(re.findall(r"\bselect\b", query, re.IGNORECASE)) != 1:
        return None
    if _NOT_A_PLAIN_SCAN.search(query):
        return None
    match = _SIMPLE_SCAN.match(query)
    if match is None:
        return None
    return TableScan(match["select"].strip(), match["table"].strip(), match["alias"],
                     match["where"].strip() if match["where"] else None)


def _unquoted(identifier: str) -> str:
    last = identifier.split(".")[-1].strip()
    if last.startswith('"'):
        return last[1:-1].replace('""', '"')
    return last.lower()


def _scans_one_table(plan: dict[str, Any], table: str) -> bool:
    """Whether an ``EXPLAIN (FORMAT JSON)`` plan only scans ``table`` (no sort, no
    aggregate, no subplan): then ``ctid`` ranges of the table split the result."""
    node = plan["Plan"]
    while node.get("Node Type") == "Gather" and len(node.get("Plans", [])) == 1:
        node = node["Plans"][0]
    if node.get("Node Type") not in _SCAN_NODES or node.get("Relation Name") != _unquoted(table):
        return False
    pending = list(node.get("Plans", []))
    while pending:
        child = pending.pop()
        if child.get("Node Type") not in _BITMAP_CHILDREN:
            return False
        pending.extend(child.get("Plans", []))
    return True


# -- fragments ------------------------------------------------------------------------------


@contextlib.contextmanager
def _snapshot_cursor(uri: str, snapshot: str) -> Iterator[Any]:
    """A cursor in a transaction that sees exactly the driver's exported snapshot.

    One connection per read: a fragment is read once per worker (then from the
    local copy), and nothing stays open in a process that outlives the run.
    """
    connection = adbc_connect(uri, autocommit=True)
    try:
        with contextlib.closing(connection.cursor()) as cursor:
            cursor.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            cursor.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
            yield cursor
    finally:
        connection.close()


@dataclass
class PgRangeFragment(Fragment):
    """Rows of ``query`` inside an exported snapshot (a ctid or key range)."""

    uri: str
    snapshot: str
    query: str
    estimate: int
    num_rows: int | None = None
    cache_locally: ClassVar[bool] = True  # type: ignore[misc]

    @property
    def estimated_rows(self) -> int:
        return self.estimate

    def _sql(self, columns: Sequence[str] | None) -> str:
        if columns is None:
            return self.query
        return f"SELECT {select_list(columns)} FROM ({self.query}) AS neve_q"

    def read(
        self, columns: Sequence[str] | None, start: int = 0, stop: int | None = None
    ) -> Iterator[pa.RecordBatch]:
        with source_error("reading a PostgreSQL range"), \
                _snapshot_cursor(self.uri, self.snapshot) as cursor:
            cursor.execute(self._sql(columns))
            reader = cursor.fetch_record_batch()
            try:
                yield from slice_stream(reader, start, stop)
            finally:
                reader.close()

    def count(self) -> int:
        if self.num_rows is not None:
            return self.num_rows
        with _snapshot_cursor(self.uri, self.snapshot) as cursor:
            cursor.execute(f"SELECT count(*) FROM ({self.query}) AS neve_q")
            return int(cursor.fetchone()[0])

    def cache_key(self) -> str:
        return f"pg:{self.snapshot}:{self.query}"

    def __repr__(self) -> str:  # no credentials in logs
        return f"PgRangeFragment({self.query[:80]!r}, snapshot={self.snapshot})"


# -- the driver's side -----------------------------------------------------------------------


#: below this many rows a plan is exact: ranges counted and ordered, so that shards
#: can be cut at any row (a small table has too few pages to give every worker some)
SMALL_PLAN_ROWS = 200_000


@dataclass(frozen=True)
class _Range:
    """One range of the query: its SQL, unordered or in a deterministic order."""

    unordered: str
    ordered: str
    estimate: int


def plan_postgres(source: ADBCSource, columns: Sequence[str] | None, *,
                  sized: bool) -> Plan | None:
    """Ranges of ``source`` that the workers read in parallel, or ``None``.

    Ranges are unsized (workers take whole ranges, balanced by estimates) unless
    ``sized`` is asked or the data is small: then each range is counted in the
    driver's snapshot and read in a deterministic order, so rows can be cut exactly.
    """
    assert source.uri is not None
    schema = projected_schema(source.schema(), columns)
    connection = adbc_connect(source.uri, autocommit=True)
    lease = Lease(connection.close)
    try:
        with contextlib.closing(connection.cursor()) as cursor, \
                source_error(source.description):
            cursor.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            cursor.execute("SELECT pg_export_snapshot(), "
                           "current_setting('server_version_num')::int, "
                           "current_setting('block_size')::int")
            snapshot, version, block_size = cursor.fetchone()
            ranges = (_key_ranges(cursor, source) if source.partition_column
                      else _ctid_ranges(cursor, source, version, block_size))
            if ranges is None:
                lease.release()
                return None
            exact = (sized or len(ranges) < MIN_RANGES
                     or sum(r.estimate for r in ranges) < SMALL_PLAN_ROWS)
            fragments: list[Fragment] = []
            for r in ranges:
                query = _project(r.ordered if exact else r.unordered, columns)
                rows = _count(cursor, query) if exact else None
                if rows != 0:
                    fragments.append(PgRangeFragment(source.uri, snapshot, query,
                                                     r.estimate if rows is None else rows, rows))
        logger.debug("%s: %d ranges in snapshot %s", source.description, len(fragments),
                     snapshot)
        return Plan(fragments, schema, lease)
    except BaseException:
        lease.release()
        raise


def _project(query: str, columns: Sequence[str] | None) -> str:
    return query if columns is None else (
        f"SELECT {select_list(columns)} FROM ({query}) AS neve_q")


def _count(cursor: Any, query: str) -> int:
    """Rows of ``query``, counted in the driver's snapshot (no row leaves the database)."""
    cursor.execute(f"SELECT count(*) FROM ({query}) AS neve_q")
    return int(cursor.fetchone()[0])


def _explain(cursor: Any, query: str) -> dict[str, Any] | None:
    """``EXPLAIN (FORMAT JSON)`` of ``query`` (ADBC's COPY cannot wrap EXPLAIN)."""
    import adbc_driver_postgresql as driver

    option = driver.StatementOptions.USE_COPY.value
    cursor.adbc_statement.set_options(**{option: "false"})
    try:
        cursor.execute(f"EXPLAIN (FORMAT JSON) {query}")
        raw = cursor.fetchone()[0]
    finally:
        cursor.adbc_statement.set_options(**{option: "true"})
    plans = json.loads(raw) if isinstance(raw, str) else raw
    return plans[0] if plans else None


def _ctid_ranges(cursor: Any, source: ADBCSource, version: int,
                 block_size: int) -> list[_Range] | None:
    scan = parse_table_scan(source.query)
    if scan is None:
        logger.info("%s is not a plain scan of one table: the driver streams it (name a "
                    "partition_column to read it in parallel)", source.description)
        return None
    if version < 140000:
        logger.info("PostgreSQL %d has no TID range scans (14+): the driver streams %s",
                    version // 10000, source.description)
        return None
    plan = _explain(cursor, source.query)  # also locks the table until the run ends
    if plan is None or not _scans_one_table(plan, scan.table):
        logger.info("%s does not plan as a scan of %s alone: the driver streams it",
                    source.description, scan.table)
        return None
    table_literal = "'" + scan.table.replace("'", "''") + "'"
    cursor.execute(
        f"SELECT pg_relation_size(to_regclass({table_literal})), c.reltuples, c.relpages "
        f"FROM pg_class c WHERE c.oid = to_regclass({table_literal})"
    )
    size, reltuples, relpages = cursor.fetchone()
    pages = -(-int(size) // block_size)
    if pages == 0:
        return []
    per_page = (float(reltuples) / relpages) if relpages and reltuples > 0 else 100.0
    count = max(1, min(pages, max(MIN_RANGES, pages // MIN_RANGE_PAGES), MAX_RANGES))
    bounds = [pages * i // count for i in range(count + 1)]
    out = []
    for i in range(count):
        hi = bounds[i + 1] if i + 1 < count else None  # the last range is open: no row escapes
        out.append(_Range(scan.ranged(bounds[i], hi, ordered=False),
                          scan.ranged(bounds[i], hi, ordered=True),
                          int((bounds[i + 1] - bounds[i]) * per_page)))
    return out


def _key_ranges(cursor: Any, source: ADBCSource) -> list[_Range]:
    """Value ranges of ``partition_column``, each counted in one pass (``width_bucket``)."""
    column = source.partition_column
    assert column is not None
    schema = source.schema()
    kind = schema.field(column).type if column in schema.names else None
    if kind is None or not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        found = "not a column of the query" if kind is None else f"of type {kind}"
        raise ConfigError(
            f"partition_column {column!r} is {found}: name an integer or float column of "
            "the query, or leave partition_column out to let the driver stream the rows"
        )
    name = quote(column)
    cursor.execute(f"SELECT min({name}), max({name}), count(*) FROM ({source.query}) AS neve_q")
    low, high, total = cursor.fetchone()
    if not total:
        return []
    order = ", ".join(str(i + 1) for i in range(len(schema)))
    if low is None or high == low:  # every key NULL or equal: one range
        query = f"SELECT * FROM ({source.query}) AS neve_k"
        return [_Range(query, f"{query} ORDER BY {order}", int(total))]
    integer = pa.types.is_integer(kind)
    step = (high - low) / MIN_RANGES
    edges = sorted({low + (int(step * i) if integer else step * i) for i in range(1, MIN_RANGES)})
    edges = [e for e in edges if low < e <= high]
    cast = "bigint" if integer else "float8"
    thresholds = ", ".join(repr(e) for e in edges)
    # width_bucket: 0 below the first edge (and NULL keys, counted there too), i from edge i.
    cursor.execute(
        f"SELECT coalesce(width_bucket({name}::{cast}, ARRAY[{thresholds}]::{cast}[]), 0), "
        f"count(*) FROM ({source.query}) AS neve_q GROUP BY 1"
    )
    counts = {int(bucket): int(n) for bucket, n in cursor.fetchall()}
    out = []
    for i in range(len(edges) + 1):
        if i == 0:
            where = f"({name} < {edges[0]!r} OR {name} IS NULL)"
        elif i == len(edges):
            where = f"{name} >= {edges[-1]!r}"
        else:
            where = f"{name} >= {edges[i - 1]!r} AND {name} < {edges[i]!r}"
        query = f"SELECT * FROM ({source.query}) AS neve_k WHERE {where}"
        out.append(_Range(query, f"{query} ORDER BY {order}", counts.get(i, 0)))
    return out
