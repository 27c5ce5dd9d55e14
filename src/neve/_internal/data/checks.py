"""Checks on the driver that turn a silent surprise into one warning, or an early error.

* NULLs in numeric columns come out of ``to_torch_dataset`` as NaN, and an integer
  or boolean column with NULLs as float64 (:class:`NullsAsNaNWarning`);
* ``equal=True`` drops the rows that do not divide evenly among the workers
  (:class:`RowsDroppedWarning`);
* a string feature with very many distinct values becomes a categorical feature
  for XGBoost and LightGBM (:class:`HighCardinalityWarning`);
* an empty source is found before Ray starts, where that costs one batch.

Counting costs little where the rows are already at hand: a plan's fragments
(Parquet footers' statistics, Arrow IPC and object-store blocks, whose null counts
are metadata), or a table in memory. A query would have to run again, so it is not
counted up front: the dataset counts while it streams and warns at the first batch
that holds NULLs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.types as pat

from neve._internal.data.convert import is_numeric
from neve._internal.data.fragments import (
    Fragment,
    ObjectRefFragment,
    ParquetRowGroupFragment,
    Plan,
    TableFragment,
)
from neve._internal.data.sources import ArrowSource, Source
from neve._internal.data.sql import DuckDBSource
from neve._internal.warn import warn_user
from neve.exceptions import HighCardinalityWarning, NullsAsNaNWarning, RowsDroppedWarning

#: distinct values above which a string feature is more likely free text or an id
#: than a category (LightGBM's own advice: high-cardinality categories overfit; its
#: ``max_cat_threshold`` defaults to 32 categories per split).
MAX_CATEGORIES = 1_000


# -- NULLs that become NaN ---------------------------------------------------------------


def numeric_columns(schema: pa.Schema, columns: Sequence[str] | None = None) -> list[str]:
    """The columns ``to_torch_dataset`` turns into numeric tensors."""
    names = list(columns) if columns is not None else schema.names
    return [n for n in names if is_numeric(schema.field(n).type)]


def plan_null_counts(plan: Plan, columns: Sequence[str]) -> dict[str, int]:
    """NULLs per column over a plan: Parquet statistics where present, else the rows."""
    counts = dict.fromkeys(columns, 0)
    if not columns:
        return counts
    footers: dict[str, Any] = {}
    for fragment in plan.fragments:
        stats = _parquet_null_counts(fragment, columns, footers)
        if stats is None:
            stats = _read_null_counts(fragment, columns)
        for name, count in stats.items():
            counts[name] += count
    return counts


def source_null_counts(source: Source,
                       columns: Sequence[str]) -> tuple[dict[str, int], int] | None:
    """NULLs per column and the row count, where counting is cheap (``None``: it is not):
    a table in memory, or DuckDB counting in SQL (no row leaves it)."""
    if isinstance(source, DuckDBSource):
        return source.null_counts(columns)
    if not source.in_memory:
        return None  # a query would run a second time: watched while streaming instead
    counts = dict.fromkeys(columns, 0)
    rows = 0
    for batch in source.stream(list(columns)):
        rows += batch.num_rows
        for name, column in zip(columns, batch.columns, strict=True):
            counts[name] += column.null_count
    return counts, rows


def _read_null_counts(fragment: Fragment, columns: Sequence[str]) -> dict[str, int]:
    counts = dict.fromkeys(columns, 0)
    if isinstance(fragment, TableFragment):
        table = fragment.table.select(list(columns))
        return {name: table.column(name).null_count for name in columns}
    if isinstance(fragment, ObjectRefFragment) or fragment.num_rows:
        for batch in fragment.read(list(columns), 0, fragment.num_rows):
            for name, column in zip(columns, batch.columns, strict=True):
                counts[name] += column.null_count
    return counts


def _parquet_null_counts(fragment: Fragment, columns: Sequence[str],
                         footers: dict[str, Any]) -> dict[str, int] | None:
    """A row group's NULL counts from its footer, or ``None`` when it lacks them."""
    if not isinstance(fragment, ParquetRowGroupFragment):
        return None
    import pyarrow.parquet as pq

    metadata = footers.get(fragment.path)
    if metadata is None:
        try:
            with fragment.filesystem.open(fragment.path, "rb") as handle:
                metadata = footers[fragment.path] = pq.ParquetFile(handle).metadata
        except Exception:  # unreadable here: read the rows instead, which reports it
            return None
    group = metadata.row_group(fragment.row_group)
    where = {group.column(i).path_in_schema: i for i in range(group.num_columns)}
    counts = {}
    for name in columns:
        index = where.get(name)
        stats = group.column(index).statistics if index is not None else None
        if stats is None or not stats.has_null_count:
            return None
        counts[name] = int(stats.null_count)
    return counts


def warn_nulls_as_nan(counts: Mapping[str, int], rows: int, schema: pa.Schema,
                      description: str, *, at_least: bool = False) -> None:
    """One :class:`NullsAsNaNWarning` naming every numeric column that holds NULLs."""
    found = {name: n for name, n in counts.items() if n}
    if not found:
        return
    parts = []
    for name, count in found.items():
        dtype = schema.field(name).type
        becomes = "" if pat.is_floating(dtype) else ", comes out as float64"
        if isinstance(dtype, pa.ExtensionType):  # PostgreSQL NUMERIC over ADBC, say
            dtype = getattr(dtype, "type_name", None) or dtype.extension_name
        amount = f"{count:,} of the first {rows:,} rows read" if at_least else (
            f"{count:,} of {rows:,} rows")
        parts.append(f"{name!r} ({dtype}: {amount}{becomes})")
    example = next(iter(found))
    quoted = '"' + example.replace('"', '""') + '"'
    warn_user(
        f"to_torch_dataset() turns NULLs into NaN in {len(found)} column"
        f"{'s' if len(found) != 1 else ''} of the {description}: {'; '.join(parts)}. "
        f"Fill or drop them in the source (COALESCE({quoted}, 0), or WHERE {quoted} IS NOT "
        "NULL), or silence this with warnings.filterwarnings('ignore', "
        "category=neve.exceptions.NullsAsNaNWarning)",
        NullsAsNaNWarning,
    )


def null_batch_counts(batch: pa.RecordBatch, columns: Iterable[str]) -> dict[str, int]:
    """NULLs per numeric column of one batch (Arrow keeps the counts: this is cheap)."""
    return {name: batch.column(name).null_count for name in columns}


# -- rows that equal=True drops -----------------------------------------------------------


def warn_rows_dropped(num_rows: int, world_size: int, description: str) -> None:
    """One :class:`RowsDroppedWarning` when ``equal=True`` shards drop rows."""
    dropped = num_rows % world_size if world_size > 0 else 0
    if not dropped:
        return
    per = num_rows // world_size
    warn_user(
        f"equal=True drops {dropped:,} of the {num_rows:,} rows of the {description} so that "
        f"each of the {world_size} workers reads {per:,} rows; pass equal=False to keep every "
        "row (shards then differ by at most one row)",
        RowsDroppedWarning,
    )


# -- string features with very many values ---------------------------------------------------


def warn_high_cardinality(categories: Mapping[str, Sequence[Any]], rows: int | None,
                          description: str, limit: int = MAX_CATEGORIES) -> None:
    """One :class:`HighCardinalityWarning` for string features with more than ``limit`` values."""
    wide = {name: len(values) for name, values in categories.items() if len(values) > limit}
    if not wide:
        return
    of_rows = f" in {rows:,} rows" if rows else ""
    parts = ", ".join(f"{name!r} ({count:,} distinct values{of_rows})"
                      for name, count in wide.items())
    example = next(iter(wide))
    warn_user(
        f"string feature{'s' if len(wide) != 1 else ''} {parts} of the {description} become"
        f"{'' if len(wide) != 1 else 's'} categorical with more than {limit:,} categories: "
        "more likely free text or an id than a category, which trees overfit. Drop "
        f"{example!r} from input_cols, or cast it in the query (CAST(... AS DOUBLE) for "
        "numbers stored as text, or a coarser grouping); silence this with "
        "warnings.filterwarnings('ignore', category=neve.exceptions.HighCardinalityWarning)",
        HighCardinalityWarning,
    )


# -- empty sources -----------------------------------------------------------------------------


def has_rows(source: Source) -> bool | None:
    """Whether the source holds a row, where that is cheap to tell (``None``: it is not):
    a table in memory, Parquet footers, a plain scan in DuckDB. A query that aggregates
    or joins would run twice, so it is found empty once it is planned."""
    from neve._internal.data.files import FileSource

    if isinstance(source, ArrowSource):
        return source.table.num_rows > 0
    if isinstance(source, DuckDBSource):
        return source.has_rows()
    if isinstance(source, FileSource) and source.format != "csv":
        fragments = source.fragments(None)
        return None if fragments is None else any(f.num_rows for f in fragments)
    return None  # an ADBC query would run twice; a Ray Dataset needs Ray
