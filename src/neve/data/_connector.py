"""DataConnector and ShardedDataConnector: one API over every source."""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa

from neve._internal import context as _context
from neve._internal.data import checks
from neve._internal.data.batches import rebatch
from neve._internal.data.errors import check_columns
from neve._internal.data.fragments import Plan
from neve._internal.data.plans import local_plan, plan_for_workers
from neve._internal.data.resolve import PlanSource, source_from_dataframe, source_from_sql
from neve._internal.data.sources import RayDatasetSource, Source
from neve._internal.signatures import checked_keywords
from neve.exceptions import ConfigError

if TYPE_CHECKING:
    from typing import TypeAlias

    import duckdb
    import pandas as pd
    import polars as pl
    import ray.data
    from adbc_driver_manager.dbapi import Connection as ADBCConnection
    from torch.utils.data import IterableDataset

    #: what ``from_dataframe`` reads
    FrameLike: TypeAlias = (
        duckdb.DuckDBPyRelation | pd.DataFrame | pl.DataFrame | pl.LazyFrame | pa.Table
        | pa.RecordBatch | pa.RecordBatchReader | ray.data.Dataset
    )
    #: where ``from_sql`` runs its query: a DuckDB connection or file, an ADBC connection or URI
    SessionLike: TypeAlias = (
        duckdb.DuckDBPyConnection | ADBCConnection | str | os.PathLike[str] | None
    )

logger = logging.getLogger(__name__)

_C = TypeVar("_C", bound="DataConnector")
_S = TypeVar("_S", bound="ShardedDataConnector")

# A keyword that belongs to another class or method, and where it goes.
_HINTS = {
    "equal": "equal= belongs to ShardedDataConnector: ShardedDataConnector.from_...(..., "
             "equal=True)",
    "shuffle": "shuffle= belongs to to_torch_dataset(shuffle=True)",
    "batch_size": "batch_size= belongs to to_torch_dataset() and iter_batches()",
}


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _ray_ready() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return bool(ray.is_initialized())


@checked_keywords(_HINTS)
class DataConnector:
    """Rows from a table, query, files or frame, read as Arrow and handed to any framework.

    Example:
        >>> import duckdb
        >>> from neve.data import DataConnector
        >>> session = duckdb.connect()
        >>> dc = DataConnector.from_sql("SELECT range AS x FROM range(5)", session=session)
        >>> dc.to_pandas()["x"].tolist()
        [0, 1, 2, 3, 4]
    """

    def __init__(self, source: Source) -> None:
        if not isinstance(source, Source):
            raise ConfigError(
                f"{type(self).__name__}(...) takes a neve source, got {type(source).__name__}; "
                f"use {type(self).__name__}.from_dataframe, from_sql, from_sources or "
                "from_ray_dataset"
            )
        self._source = source
        #: plans for the workers of a run, by (projection, sized); released with the
        #: connector, or by the run that made them when it ends
        self._worker_plans: dict[tuple[tuple[str, ...] | None, bool], Plan] = {}
        weakref.finalize(self, _release_plans, self._worker_plans)
        #: numeric columns already checked for NULLs (by the driver, before shipping)
        self._nulls_checked: set[str] | None = None

    # -- constructors ---------------------------------------------------------------

    @classmethod
    def from_dataframe(cls: type[_C], df: FrameLike) -> _C:
        """Rows of a DuckDB relation, pandas/polars/pyarrow table, or Ray Dataset."""
        return cls(source_from_dataframe(df))

    @classmethod
    def from_sql(cls: type[_C], query: str, session: SessionLike = None, *,
                 partition_column: str | None = None) -> _C:
        """Rows of a SQL query on DuckDB (connection, file, or the default) or over ADBC.

        A PostgreSQL URI as ``session`` lets the workers read in parallel, inside one
        snapshot: a scan of one table by ``ctid`` ranges, any other query by value
        ranges of ``partition_column`` (an integer or float column) when named.
        """
        return cls(source_from_sql(query, session, partition_column=partition_column))

    @classmethod
    def from_sources(
        cls: type[_C],
        sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        format: str | None = None,
    ) -> _C:
        """Rows of Parquet, CSV or Arrow IPC files or folders, local or on fsspec storage."""
        from neve._internal.data.files import FileSource

        return cls(FileSource(sources, format))

    @classmethod
    def from_ray_dataset(cls: type[_C], ds: ray.data.Dataset) -> _C:
        """Rows of a ``ray.data.Dataset`` (its blocks stay in the object store)."""
        return cls(RayDatasetSource(ds))

    # -- what it holds --------------------------------------------------------------

    @property
    def schema(self) -> pa.Schema:
        """The Arrow schema of the rows."""
        return self._source.schema()

    @property
    def columns(self) -> list[str]:
        """Column names, in the case the source reports."""
        return list(self.schema.names)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._source.description})"

    def _checked(self, columns: Sequence[str] | None) -> list[str] | None:
        if columns is None:
            return None
        columns = list(columns)
        check_columns(self.schema, columns, self._source.description)
        return columns

    # -- outputs ----------------------------------------------------------------------

    def iter_batches(
        self, batch_size: int = 65_536, *, columns: Sequence[str] | None = None,
        drop_last_batch: bool = False,
    ) -> Iterator[pa.RecordBatch]:
        """Arrow record batches of exactly ``batch_size`` rows (the last may be short)."""
        _positive("batch_size", batch_size)
        stream = self._source.stream(self._checked(columns))
        return rebatch(stream, batch_size, drop_last=drop_last_batch)

    def to_arrow(self, *, columns: Sequence[str] | None = None) -> pa.Table:
        """All rows as one pyarrow Table."""
        columns = self._checked(columns)
        schema = self.schema if columns is None else pa.schema(
            [self.schema.field(c) for c in columns]
        )
        return pa.Table.from_batches(list(self._source.stream(columns)), schema=schema)

    def to_pandas(self, limit: int | None = None) -> pd.DataFrame:
        """Rows as a pandas DataFrame (the first ``limit`` rows when given)."""
        if limit is None:
            return self.to_arrow().to_pandas()
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigError(f"limit must be None or an integer >= 0, got {limit!r}")
        batches: list[pa.RecordBatch] = []
        taken = 0
        for batch in self._source.stream(None):
            if taken >= limit:
                break
            batch = batch.slice(0, limit - taken)
            batches.append(batch)
            taken += batch.num_rows
        return pa.Table.from_batches(batches, schema=self.schema).to_pandas()

    def to_torch_dataset(
        self,
        *,
        batch_size: int | None = None,
        shuffle: bool = False,
        drop_last_batch: bool = True,
        expand_dims: bool = False,
        columns: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> IterableDataset[dict[str, Any]]:
        """A ``torch.utils.data.IterableDataset`` of ``{column: tensor}`` batches.

        Scalar columns come out with shape ``(batch_size,)``, or ``(batch_size, 1)``
        with ``expand_dims=True`` (Snowflake's current shape). ``batch_size=None``
        yields single rows for DataLoader-side batching. String and binary columns
        pass through as Python values. NULLs in numeric columns come out as NaN (an
        integer column with NULLs as float64): a ``NullsAsNaNWarning`` says where.
        """
        if batch_size is not None:
            _positive("batch_size", batch_size)
        for name, flag in (("shuffle", shuffle), ("drop_last_batch", drop_last_batch),
                           ("expand_dims", expand_dims)):
            if not isinstance(flag, bool):
                raise ConfigError(f"{name} must be True or False, got {flag!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"seed must be None or an integer, got {seed!r}")
        from neve._internal.data.torch_dataset import ArrowTorchDataset

        columns = self._checked(columns)
        plan = local_plan(self._source, columns)
        watch = self._check_nulls(plan, columns)
        return ArrowTorchDataset(
            plan,
            source=self._source,
            columns=columns,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last_batch=drop_last_batch,
            expand_dims=expand_dims,
            seed=seed,
            watch_nulls=watch,
        )

    def _check_nulls(self, plan: Plan | None, columns: Sequence[str] | None) -> list[str]:
        """Warn once about numeric columns with NULLs; return those to watch while streaming.

        Counted here where that is cheap (a plan of sized fragments, an in-memory
        table); a query would run twice, so the dataset watches its batches instead.
        """
        schema = self.schema
        numeric = [c for c in checks.numeric_columns(schema, columns)
                   if self._nulls_checked is None or c not in self._nulls_checked]
        if not numeric:
            return []
        if plan is not None and plan.num_rows is not None:
            counts: dict[str, int] | None = checks.plan_null_counts(plan, numeric)
            rows = plan.num_rows
        elif plan is not None:
            counts, rows = None, 0  # ranges of a database: watched while streaming
        else:
            counted = checks.source_null_counts(self._source, numeric)
            counts, rows = (None, 0) if counted is None else counted
        if counts is None:
            return numeric
        self._nulls_checked = (self._nulls_checked or set()) | set(numeric)
        checks.warn_nulls_as_nan(counts, rows, schema, self._source.description)
        return []

    def to_ray_dataset(self) -> ray.data.Dataset:
        """The rows as a ``ray.data.Dataset`` (read by Ray tasks, not the driver)."""
        import ray
        import ray.data

        if isinstance(self._source, RayDatasetSource):
            return self._source.dataset
        from neve._internal.runtime.cluster import ensure_ray

        ensure_ray()
        plan = self._plan_for_workers()
        read = ray.remote(num_cpus=0)(_read_fragment)
        refs = [read.remote(f, plan.schema) for f in plan.fragments]
        if not refs:
            return ray.data.from_arrow(plan.schema.empty_table())
        return ray.data.from_arrow_refs(refs)  # type: ignore[arg-type]

    # -- distribution -----------------------------------------------------------------

    def _plan_for_workers(self, columns: Sequence[str] | None = None, *,
                          sized: bool = False) -> Plan:
        """Fragments every process of the cluster can read (made once per projection).

        ``sized=True`` asks for fragments whose row counts are known (equal shards,
        ranking groups). A plan of all columns serves every projection.
        """
        key = tuple(columns) if columns is not None else None
        for candidate in ((key, sized), (None, sized), (key, True), (None, True)):
            plan = self._worker_plans.get(candidate)
            if plan is not None:
                return plan
        columns = self._checked(columns)
        if self._source.in_memory and not _ray_ready():
            plan = local_plan(self._source, columns)  # rows travel with the pickle
            assert plan is not None
        else:
            plan = plan_for_workers(self._source, columns, sized=sized)
        self._worker_plans[(key, sized)] = plan
        return plan

    @contextlib.contextmanager
    def _plans_released_after(self) -> Iterator[None]:
        """Release the plans made while the block runs (a run's spill, its snapshot)."""
        before = set(self._worker_plans)
        try:
            yield
        finally:
            made = {k: p for k, p in self._worker_plans.items() if k not in before}
            for key in made:
                del self._worker_plans[key]
            _release_plans(made)

    def __getstate__(self) -> dict[str, Any]:
        # What travels to a worker is a plan of readable fragments, never a
        # connection: the driver spills what only it can read.
        plan = self._plan_for_workers(sized=bool(getattr(self, "equal", False)))
        state = dict(self.__dict__)
        state["_source"] = PlanSource.whole(plan, self._source.description)
        state["_worker_plans"] = {(None, plan.sized): plan}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def _release_plans(plans: dict[Any, Plan]) -> None:
    for plan in list(plans.values()):
        plan.release()
    plans.clear()


def _read_fragment(fragment: Any, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_batches(list(fragment.read(None)), schema=schema)


@checked_keywords({k: v for k, v in _HINTS.items() if k != "equal"})
class ShardedDataConnector(DataConnector):
    """A DataConnector whose ``get_shard()`` returns this worker's share of the rows.

    Every row lands in exactly one of ``world_size`` shards; with ``equal=True``
    every shard holds the same number of rows and fewer than ``world_size`` rows
    are dropped (the driver warns with a ``RowsDroppedWarning`` when it plans a run).

    Example:
        >>> from neve.data import ShardedDataConnector
        >>> dc = ShardedDataConnector.from_sql("SELECT range AS x FROM range(10)", equal=True)
        >>> # inside a PyTorchDistributor train_func:
        >>> # shard = dc.get_shard(); loader = DataLoader(shard.to_torch_dataset(batch_size=4))
    """

    def __init__(self, source: Source, *, equal: bool = False) -> None:
        super().__init__(source)
        if not isinstance(equal, bool):
            raise ConfigError(f"equal must be True or False, got {equal!r}")
        self.equal = equal

    # -- constructors: DataConnector's, plus ``equal`` ----------------------------------

    @classmethod
    def from_dataframe(cls: type[_S], df: FrameLike, *, equal: bool = False) -> _S:
        """Rows of a DuckDB relation, pandas/polars/pyarrow table, or Ray Dataset."""
        return cls(source_from_dataframe(df), equal=equal)

    @classmethod
    def from_sql(cls: type[_S], query: str, session: SessionLike = None, *,
                 equal: bool = False, partition_column: str | None = None) -> _S:
        """Rows of a SQL query on DuckDB (connection, file, or the default) or over ADBC
        (see ``DataConnector.from_sql`` for ``partition_column``)."""
        return cls(source_from_sql(query, session, partition_column=partition_column),
                   equal=equal)

    @classmethod
    def from_sources(
        cls: type[_S],
        sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        format: str | None = None,
        *,
        equal: bool = False,
    ) -> _S:
        """Rows of Parquet, CSV or Arrow IPC files or folders, local or on fsspec storage."""
        from neve._internal.data.files import FileSource

        return cls(FileSource(sources, format), equal=equal)

    @classmethod
    def from_ray_dataset(cls: type[_S], ds: ray.data.Dataset, *, equal: bool = False) -> _S:
        """Rows of a ``ray.data.Dataset`` (its blocks stay in the object store)."""
        return cls(RayDatasetSource(ds), equal=equal)

    def get_shard(self) -> DataConnector:
        """This worker's share, as a plain DataConnector (only inside a run)."""
        ctx = _context.require("ShardedDataConnector.get_shard()")
        plan = self._plan_for_workers(sized=self.equal)
        pieces = plan.shard(ctx.rank, ctx.world_size, equal=self.equal)
        if self.equal and ctx.rank == 0:
            rows = plan.num_rows or 0
            dropped = rows - ctx.world_size * (rows // ctx.world_size)
            if dropped:
                logger.info("equal shards: dropped %d of %d rows", dropped, rows)
        description = f"shard {ctx.rank} of {ctx.world_size} of {self._source.description}"
        shard = DataConnector(PlanSource(pieces, plan.schema, description))
        shard._nulls_checked = self._nulls_checked  # the driver warned for the whole table
        return shard

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._source.description}, equal={self.equal})"


def check_for_workers(dataset_map: Mapping[str, DataConnector], world_size: int) -> None:
    """Before a distributed run, on the driver: one warning per surprise in its datasets.

    Plans each connector for the workers (the plan is kept for the run), warns when
    ``equal=True`` drops rows and when numeric columns hold NULLs that
    ``to_torch_dataset`` would turn into NaN; the workers then stay quiet about it.
    """
    for name, connector in dataset_map.items():
        equal = isinstance(connector, ShardedDataConnector) and connector.equal
        plan = connector._plan_for_workers(sized=equal)
        what = f"dataset_map[{name!r}] ({connector._source.description})"
        if equal:
            checks.warn_rows_dropped(plan.num_rows or 0, world_size, what)
        numeric = checks.numeric_columns(plan.schema)
        if numeric and connector._nulls_checked is None:
            counts = checks.plan_null_counts(plan, numeric)
            checks.warn_nulls_as_nan(counts, plan.num_rows or plan.estimated_rows, plan.schema,
                                     what)
            connector._nulls_checked = set(numeric)
