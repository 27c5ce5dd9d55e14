"""Plans: where the workers of a run, or DataLoader processes, find a source's rows.

For the workers of a run (:func:`plan_for_workers`), in this order:

1. the source's own plan: files' row groups, a Ray Dataset's blocks, a PostgreSQL
   snapshot cut into ``ctid`` ranges - the driver reads no row;
2. rows already in the driver's memory (a pandas/polars/pyarrow frame): Ray's
   object store, in blocks of ``NEVE_BATCH_BYTES``;
3. rows only the driver can read (a DuckDB connection, other ADBC databases): the
   database streams them, in parallel where it can, into one Arrow IPC spill that
   the workers read as fragments - a local folder on a one-node cluster, or
   ``NEVE_SPILL_URL`` on a multi-node one. A multi-node cluster without
   ``NEVE_SPILL_URL`` gets the object-store path instead (and a warning).

For processes forked from this one (:func:`plan_in_process`, no Ray there): the
source's fragments with object-store blocks fetched first, or a local spill.
Every plan's lease (spill folder, snapshot) is released with the plan.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pyarrow as pa

from neve._internal import settings
from neve._internal.data.batches import blocks
from neve._internal.data.fragments import (
    Fragment,
    Lease,
    ObjectRefFragment,
    Plan,
    SliceFragment,
    TableFragment,
)
from neve._internal.data.sources import ArrowSource, Source, distinct_of, projected_schema
from neve._internal.data.spill import SpillFolder, shared_url, write_ipc
from neve._internal.runtime.tasks import LazyRemote, gather
from neve._internal.warn import warn_user

logger = logging.getLogger(__name__)

_warned_multi_node = False
#: Ray tasks that look for the categories of categorical features
DISTINCT_TASKS = 16


def plan_for_workers(source: Source, columns: Sequence[str] | None, *,
                     sized: bool = False) -> Plan:
    """A plan every process of the cluster can read (see the module doc).

    ``sized=True``: every fragment's row count known (for ``equal`` shards and
    ranking groups), counting unsized ones where the source cannot.
    """
    plan = source.plan(columns, sized=sized)
    if plan is None:
        plan = _driver_plan(source, columns)
    if sized and not plan.sized:
        plan = counted(plan)
    return plan


def counted(plan: Plan) -> Plan:
    """``plan`` with the row count of every fragment known: unsized fragments are
    counted in parallel by Ray tasks (each reads its fragment once), or here."""
    import ray

    if plan.sized:
        return plan
    unsized = [i for i, f in enumerate(plan.fragments) if f.num_rows is None]
    if ray.is_initialized():
        counts = gather([_count_task.remote(plan.fragments[i]) for i in unsized],
                        f"counting the rows of {len(unsized)} fragments",
                        "very large CSV files (convert them to Parquet), or a node died")
    else:
        counts = [plan.fragments[i].count() for i in unsized]
    fragments = list(plan.fragments)
    for i, rows in zip(unsized, counts, strict=True):
        fragments[i] = replace(fragments[i], num_rows=rows)  # type: ignore[type-var]
    return Plan([f for f in fragments if f.num_rows], plan.schema, plan.lease)


def _count(fragment: Fragment) -> int:
    return fragment.count()


_count_task = LazyRemote(_count, num_cpus=0)


def _driver_plan(source: Source, columns: Sequence[str] | None) -> Plan:
    from neve._internal.runtime.cluster import single_node

    schema = projected_schema(source.schema(), columns)
    url = shared_url()
    if source.in_memory or (url is None and not single_node()):
        if not source.in_memory:
            _warn_multi_node(source)
        return object_store_plan(source, columns, schema)
    folder = SpillFolder(url)
    try:
        fragments = write_ipc(source.stream(columns), schema, folder)
    except BaseException:
        folder.release()
        raise
    logger.debug("spilled %s into %d batches under %s", source.description, len(fragments),
                 folder.path)
    return Plan(fragments, schema, Lease(folder.release))


def _warn_multi_node(source: Source) -> None:
    global _warned_multi_node
    if _warned_multi_node:
        return
    _warned_multi_node = True
    warn_user(
        f"the cluster has several nodes and NEVE_SPILL_URL is not set, so the rows of "
        f"{source.description} pass through the driver into Ray's object store; set "
        "NEVE_SPILL_URL to storage every node can read (s3://bucket/prefix) to spill "
        "them there instead",
        UserWarning,
    )


def object_store_plan(source: Source, columns: Sequence[str] | None,
                      schema: pa.Schema) -> Plan:
    """The source's stream put into Ray's object store, block by block."""
    import ray

    out: list[Fragment] = []
    max_bytes = int(settings.BATCH_BYTES.get())
    for table in blocks(source.stream(columns), max_bytes):
        out.append(ObjectRefFragment(ray.put(table), table.num_rows))
    logger.debug("streamed %s into %d object-store blocks", source.description, len(out))
    return Plan(out, schema)


def plan_in_process(source: Source, columns: Sequence[str] | None) -> Plan:
    """A plan that processes forked from this one can read (spilling if need be)."""
    return local_plan(source, columns) or spill_plan(source, columns)


def local_plan(source: Source, columns: Sequence[str] | None) -> Plan | None:
    """The source's fragments, readable by processes forked from this one, or
    ``None`` when only this process can read the source (then: :func:`spill_plan`)."""
    schema = projected_schema(source.schema(), columns)
    if isinstance(source, ArrowSource):
        return Plan(source.local_fragments(columns), schema)
    fragments = source.fragments(columns)
    if fragments is None:
        return None
    return Plan([_local(f) for f in fragments], schema)


def spill_plan(source: Source, columns: Sequence[str] | None) -> Plan:
    """The source streamed once into a local Arrow IPC spill, removed with the plan."""
    schema = projected_schema(source.schema(), columns)
    folder = SpillFolder(kind="local")
    try:
        fragments = write_ipc(source.stream(columns), schema, folder)
    except BaseException:
        folder.release()
        raise
    plan = Plan(fragments, schema, Lease(folder.release))
    weakref.finalize(plan, folder.release)  # the dataset that holds the plan is gone
    return plan


def _local(fragment: Fragment) -> Fragment:
    """Object-store blocks fetched now (zero-copy from shared memory), so that
    DataLoader processes forked from this one, which cannot call Ray, can read them."""
    if isinstance(fragment, ObjectRefFragment):
        import ray

        block = ray.get(fragment.ref)
        table = pa.Table.from_batches([block]) if isinstance(block, pa.RecordBatch) else block
        return TableFragment(table)
    if isinstance(fragment, SliceFragment):
        return SliceFragment(_local(fragment.fragment), fragment.offset, fragment.num_rows)
    return fragment


def plan_distinct(plan: Plan, columns: Sequence[str], limit: int) -> dict[str, list[Any]]:
    """Up to ``limit`` distinct non-NULL values of each of ``columns`` over the plan:
    Ray tasks read the fragments (only those columns) and send back their values."""
    import ray

    fragments = plan.fragments
    if not fragments:
        return {c: [] for c in columns}
    tasks = max(1, min(len(fragments), DISTINCT_TASKS))
    groups = [fragments[i::tasks] for i in range(tasks)]
    if ray.is_initialized():
        parts = gather([_distinct_task.remote(group, list(columns), limit) for group in groups],
                       f"finding the categories of {', '.join(columns)}",
                       "a node died, or the files are very large: cast the columns to "
                       "numbers in your query")
    else:
        parts = [distinct_in(group, list(columns), limit) for group in groups]
    out: dict[str, set[Any]] = {c: set() for c in columns}
    for part in parts:
        for column, values in part.items():
            out[column].update(values)
    return {c: list(values)[:limit] for c, values in out.items()}


def distinct_in(fragments: Sequence[Fragment], columns: list[str],
                limit: int) -> dict[str, list[Any]]:
    """Distinct non-NULL values of ``columns`` in some fragments (runs in a Ray task)."""
    seen: dict[str, set[Any]] = {c: set() for c in columns}
    for fragment in fragments:
        for batch in fragment.read(columns):
            for name, column in zip(columns, batch.columns, strict=True):
                if len(seen[name]) <= limit:
                    seen[name].update(distinct_of([pa.record_batch([column], [name])], limit))
    return {c: list(v)[:limit] for c, v in seen.items()}


_distinct_task = LazyRemote(distinct_in, num_cpus=0)
