"""A gang of worker actors in one placement group, and the warm pool that reuses them.

The group is the only thing that touches worker actors. Every wait is bounded:
placement by ``NEVE_PLACEMENT_TIMEOUT_S``, start by ``NEVE_WORKER_START_TIMEOUT_S``.
A worker that raises or dies stops the whole group at once (the survivors may be
blocked in a collective) and the error names its rank. A group whose run ended
well goes back to the warm pool, so the next run of the same shape skips process
start and imports; an idle pool gives its resources back after
``NEVE_WORKER_IDLE_TIMEOUT_S`` and at interpreter exit. On a cluster neve joined
(rather than started) nothing stays warm unless that setting asks for it.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from neve._internal import settings
from neve._internal.context import WorkerContext
from neve._internal.runtime import cluster, tracebacks
from neve._internal.runtime.placement import Layout
from neve._internal.runtime.worker import NOTHING, Imports, WorkerActor
from neve.exceptions import (
    ConfigError,
    DataError,
    ResourcesUnavailableError,
    WorkerError,
    WorkerLostError,
    WorkerStartTimeoutError,
)

logger = logging.getLogger(__name__)

_group_ids = itertools.count()


@dataclass(frozen=True)
class WorkerInfo:
    """Where one worker runs, in rank order."""

    rank: int
    node_id: str
    node_ip: str
    pid: int
    local_rank: int
    local_world_size: int
    node_rank: int
    gpu_ids: tuple[str, ...]


#: how long a group that stops before its workers started (Ctrl-C, a timeout) lets its
#: placement group finish being placed before removing it: Ray 2.60 leaks the resources
#: of a placement group removed while its bundles are being reserved (they stay
#: reserved on the node until Ray stops; ray-project/ray#64693), and reserving takes
#: milliseconds; one that cannot be placed waits this long before it goes
PLACEMENT_SETTLE_S = 1.0


class WorkerGroup:
    """``layout.num_workers`` actors, gang-scheduled, ranked by node."""

    def __init__(self, layout: Layout, imports: Imports = NOTHING,
                 runtime_env: dict[str, Any] | None = None) -> None:
        """``runtime_env``: the actors' Ray runtime environment, that of processes kept
        ready for them (:meth:`Imports.runtime_env`)."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cluster.ensure_ray()
        self.layout = layout
        self.imports = imports
        self.id = next(_group_ids)
        self._actors: list[Any] = []
        self._pg: Any = None
        self.workers: list[WorkerInfo] = []
        view = cluster.view()
        layout.check_feasible(view)

        self._pg = placement_group(layout.bundles(), strategy=layout.strategy)
        try:
            self._await_placement(view)
            remote_cls = ray.remote(max_concurrency=2)(WorkerActor)  # type: ignore[call-overload]
            options = {"runtime_env": runtime_env} if runtime_env else {}
            for rank, i in enumerate(self._rank_order()):
                strategy = PlacementGroupSchedulingStrategy(
                    placement_group=self._pg,
                    placement_group_bundle_index=layout.bundle_of(i),
                )
                self._actors.append(
                    remote_cls.options(
                        num_cpus=layout.cpus_per_worker,
                        num_gpus=layout.gpus_per_worker,
                        scheduling_strategy=strategy,
                        **options,
                    ).remote(f"rank {rank}", imports)
                )
            self._describe_workers(self._await_start())
        except BaseException:  # Ctrl-C included: leave nothing reserved
            self.shutdown()
            raise

    def _await_placement(self, view: cluster.ClusterView) -> None:
        import ray

        timeout = settings.PLACEMENT_TIMEOUT_S.get()
        try:
            ray.get(self._pg.ready(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            available = ray.available_resources()
            raise ResourcesUnavailableError(
                f"the cluster could not place {self.layout.describe()} within {timeout:g} s "
                f"(NEVE_PLACEMENT_TIMEOUT_S={timeout:g}). It has {view.describe()}; free now: "
                f"{available.get('CPU', 0):g} CPUs, {available.get('GPU', 0):g} GPUs. "
                "Likely causes: other jobs hold the resources, or nodes are still joining."
            ) from None

    def _rank_order(self) -> list[int]:
        """Worker slots ordered by node (first seen), so ranks count node by node."""
        from ray.util.placement_group import placement_group_table

        bundle_nodes = placement_group_table(self._pg).get("bundles_to_node_id", {})
        order: list[str] = []
        for b in sorted(bundle_nodes):
            if bundle_nodes[b] not in order:
                order.append(bundle_nodes[b])

        def key(i: int) -> tuple[int, int]:
            node = bundle_nodes.get(self.layout.bundle_of(i))
            return (order.index(node) if node in order else len(order), i)

        return sorted(range(self.layout.num_workers), key=key)

    def _await_start(self) -> list[dict[str, Any]]:
        import ray

        timeout = settings.WORKER_START_TIMEOUT_S.get()
        refs = [actor.info.remote() for actor in self._actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if len(ready) < len(refs):
            missing = [i for i, ref in enumerate(refs) if ref not in ready]
            raise WorkerStartTimeoutError(
                f"workers {missing} of {len(refs)} did not start within {timeout:g} s "
                f"(NEVE_WORKER_START_TIMEOUT_S={timeout:g}). Likely causes: a slow node "
                "installing packages, an import that hangs, or a node that died."
            )
        try:
            return list(ray.get(refs))
        except ray.exceptions.RayError as exc:
            raise WorkerStartTimeoutError(f"a worker failed to start: {exc}") from exc

    def _describe_workers(self, infos: list[dict[str, Any]]) -> None:
        order: list[str] = []
        for info in infos:
            if info["node_id"] not in order:
                order.append(info["node_id"])
        seen: dict[str, int] = {}
        for rank, info in enumerate(infos):
            node = info["node_id"]
            local = seen.get(node, 0)
            seen[node] = local + 1
            self.workers.append(
                WorkerInfo(
                    rank=rank,
                    node_id=node,
                    node_ip=info["node_ip"],
                    pid=info["pid"],
                    local_rank=local,
                    local_world_size=sum(1 for x in infos if x["node_id"] == node),
                    node_rank=order.index(node),
                    gpu_ids=tuple(info["gpu_ids"]),
                )
            )

    # -- use --------------------------------------------------------------------------

    @property
    def num_workers(self) -> int:
        return len(self._actors)

    @property
    def actors(self) -> list[Any]:
        """The worker actors, in rank order."""
        return list(self._actors)

    @property
    def alive(self) -> bool:
        return self._pg is not None and bool(self._actors)

    def call(self, rank: int, method: str, *args: Any, timeout: float = 30.0) -> Any:
        """Call a small method on one worker and wait for it (bounded)."""
        import ray

        return ray.get(getattr(self._actors[rank], method).remote(*args), timeout=timeout)

    def run(
        self,
        fn: Callable[[WorkerContext], Any],
        contexts: Sequence[WorkerContext],
        *,
        on_events: Callable[[list[Any]], None] | None = None,
        poll_s: float = 0.25,
    ) -> list[Any]:
        """Run ``fn(ctx)`` on every worker; return results in rank order.

        Any failure stops every worker at once and raises with the failing rank.
        """
        import ray

        if len(contexts) != self.num_workers:
            raise ValueError(f"{len(contexts)} contexts for {self.num_workers} workers")
        fn_ref = ray.put(fn)
        refs = [a.run.remote(fn_ref, c) for a, c in zip(self._actors, contexts, strict=True)]
        pending = {ref: rank for rank, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        events = _EventPump(self._actors[0], on_events) if on_events is not None else None
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=poll_s)
                for ref in ready:
                    rank = pending.pop(ref)
                    try:
                        results[rank] = self._result(ref, rank)
                    except WorkerError as exc:
                        raise self._root_cause(exc, pending) from exc.__cause__
                if events is not None:
                    events.pump()
        except BaseException:
            try:
                if events is not None:  # what rank 0 reported last (a checkpoint, say) counts
                    events.flush(timeout_s=2.0)
            finally:  # a second Ctrl-C, or a sink that raises, must not skip the shutdown
                self.shutdown()
            raise
        if events is not None:
            events.flush(timeout_s=5.0)
        return results

    def _root_cause(self, first: WorkerError, pending: dict[Any, int]) -> WorkerError:
        """When one rank fails because a peer died, name the peer that died.

        A dead worker makes its peers' collectives fail too, and either may reach
        the driver first: wait briefly for the others and prefer a death.
        """
        import ray

        if isinstance(first, WorkerLostError) or not pending:
            return first
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=2.0)
        for ref in ready:
            try:
                self._result(ref, pending[ref])
            except WorkerError as other:
                if isinstance(other, WorkerLostError):
                    return WorkerLostError(
                        f"{other}\n\n(Rank {first.rank} failed as a consequence: "
                        f"{str(first).splitlines()[0]})",
                        rank=other.rank,
                    )
        return first

    def _result(self, ref: Any, rank: int) -> Any:
        """Rank ``rank``'s result, or its failure as neve's error, told once.

        Raised ``from None``: Ray's own exception would print the remote traceback a
        second time, with Ray's frames and colour codes, above neve's.
        """
        import ray

        info = self.workers[rank]
        where = f"worker rank {rank} (node {info.node_ip}, pid {info.pid})"
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, (DataError, ConfigError)):
                # Errors about the user's data keep their type; the rank is added.
                raise type(cause)(f"{where}: {cause}") from None
            summary = f"{type(cause).__name__}: {cause}" if cause is not None else "error"
            trace = tracebacks.user_traceback(getattr(exc, "traceback_str", "") or str(exc))
            raise WorkerError(
                f"{where} failed: {summary}\n\nRemote traceback:\n{trace}", rank=rank,
                remote=cause,
            ) from None
        except ray.exceptions.RayActorError as exc:
            node = f"node {info.node_ip} (id {info.node_id[:8]})"
            raise WorkerLostError(
                f"worker rank {rank} ({node}, pid {info.pid}) {tracebacks.death_cause(exc)}. "
                "Every worker was stopped.", rank=rank) from None

    def shutdown(self) -> None:
        """Kill every actor and remove the placement group (idempotent)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        actors, self._actors = self._actors, []
        for actor in actors:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(actor, no_restart=True)
        pg, self._pg = self._pg, None
        if pg is not None:
            with contextlib.suppress(Exception):  # already removed
                if not self.workers:  # placement may be in flight: let it settle first
                    pg.wait(PLACEMENT_SETTLE_S)
                remove_placement_group(pg)
        _pool.forget(self)


class _EventPump:
    """Polls rank 0 for progress events while a run is in flight (one poll at a time)."""

    def __init__(self, actor: Any, sink: Callable[[list[Any]], None]) -> None:
        self._actor = actor
        self._sink = sink
        self._ref: Any = None

    def _deliver(self, ref: Any, timeout_s: float) -> bool:
        import ray

        try:
            events = ray.get(ref, timeout=timeout_s)
        except (ray.exceptions.RayError, TimeoutError):
            return False
        if events:
            self._sink(events)
        return True

    def pump(self) -> None:
        """Deliver a finished poll, if any, and start the next."""
        import ray

        if self._ref is not None:
            done, _ = ray.wait([self._ref], timeout=0)
            if not done:
                return
            self._deliver(self._ref, 0)
        self._ref = self._actor.poll.remote()

    def flush(self, timeout_s: float) -> None:
        """Deliver everything rank 0 still holds (bounded), starting nothing new."""
        if self._ref is not None and not self._deliver(self._ref, timeout_s):
            return
        self._ref = None
        self._deliver(self._actor.poll.remote(), timeout_s)


#: how long at least the processes kept ready for the next group wait (they hold no CPU or
#: GPU, only memory: 144 MiB resident each, 67 MiB of it their own, with xgboost or
#: LightGBM imported): a fit some minutes after the last one still finds them
READY_PROCESSES_S = 600.0


class _Pool:
    """Idle groups kept warm for the next run of the same layout, and groups starting in
    the background for a run that is about to ask (:meth:`prepare`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[Layout, tuple[WorkerGroup, float]] = {}
        self._starting: dict[Layout, threading.Event] = {}
        #: processes Ray keeps ready that import ahead: how many, and until when
        self._ready: dict[Imports, tuple[int, float]] = {}
        self._timer: threading.Timer | None = None
        atexit.register(self.close)

    def prepare(self, layout: Layout, imports: Imports = NOTHING) -> None:
        """Start a group of ``layout`` in the background (its processes import
        ``imports``), unless one of that shape is idle or starting; it joins the warm
        pool, where the next :meth:`acquire` of that layout finds it. Nothing starts
        where warm groups are not kept (a shared cluster, unless asked)."""
        if settings.worker_idle_timeout_s(shared_cluster=not cluster.started_here()) <= 0:
            return
        with self._lock:
            if layout in self._idle or layout in self._starting:
                return
            done = self._starting[layout] = threading.Event()
        threading.Thread(target=self._start, args=(layout, imports, done),
                         name="neve-prepare", daemon=True).start()

    def _start(self, layout: Layout, imports: Imports, done: threading.Event) -> None:
        try:
            self.release(WorkerGroup(layout, imports, self._take_ready(imports, layout)))
        except BaseException as exc:  # the run that asks for it will meet the cause itself
            logger.debug("starting a %s group in the background failed: %s",
                         layout.describe(), exc)
        finally:
            with self._lock:
                self._starting.pop(layout, None)
            done.set()

    def _take_ready(self, imports: Imports, layout: Layout) -> dict[str, Any] | None:
        """The runtime environment of the processes kept ready that import ``imports``
        ahead, where enough are up for ``layout``. Else ``None``: the group starts
        without one, so that a new process skips its set-up (0.35 s) and Ray's own
        plain ready processes fit."""
        with self._lock:
            count, deadline = self._ready.pop(imports, (0, 0.0))
        if count < layout.num_workers or time.monotonic() >= deadline:
            return None
        return imports.runtime_env()

    def _await_starting(self) -> None:
        """Wait for groups starting in the background (bounded by their own waits)."""
        with self._lock:
            pending = list(self._starting.values())
        limit = settings.PLACEMENT_TIMEOUT_S.get() + settings.WORKER_START_TIMEOUT_S.get()
        for done in pending:
            done.wait(limit)

    def acquire(self, layout: Layout) -> WorkerGroup:
        self._await_starting()  # one of this shape is taken; others give their CPUs back
        with self._lock:
            entry = self._idle.pop(layout, None)
            others = list(self._idle.values())
            self._idle.clear()
        for group, _ in others:  # idle groups of other shapes would block placement
            group.shutdown()
        if entry is not None:
            group = entry[0]
            if self._healthy(group):
                logger.debug("reusing warm worker group %d", group.id)
                return group
            group.shutdown()
        return WorkerGroup(layout)

    def _healthy(self, group: WorkerGroup) -> bool:
        import ray

        try:
            for rank in range(group.num_workers):
                group.call(rank, "poll", timeout=5.0)
            return group.alive
        except (ray.exceptions.RayError, TimeoutError):
            return False

    def release(self, group: WorkerGroup) -> None:
        idle_s = settings.worker_idle_timeout_s(shared_cluster=not cluster.started_here())
        if not group.alive or idle_s <= 0:
            group.shutdown()
            return
        with self._lock:
            previous = self._idle.pop(group.layout, None)
            self._idle[group.layout] = (group, time.monotonic() + idle_s)
        if previous is not None and previous[0] is not group:
            previous[0].shutdown()
        self._arm(idle_s)

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(delay + 0.05, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [g for g, deadline in self._idle.values() if deadline <= now]
            self._idle = {k: v for k, v in self._idle.items() if v[1] > now}
            next_deadline = min((v[1] for v in self._idle.values()), default=None)
        self._give_back(expired, keep_ready=True)
        if next_deadline is not None:
            self._arm(max(next_deadline - now, 0.0))

    def forget(self, group: WorkerGroup) -> None:
        with self._lock:
            for key, (g, _) in list(self._idle.items()):
                if g is group:
                    del self._idle[key]

    def close(self, keep_ready: bool = False) -> None:
        """Shut every idle group down (at exit, or when a caller asks); with
        ``keep_ready``, as the idle timeout does (:meth:`_give_back`)."""
        self._await_starting()
        with self._lock:
            groups = [g for g, _ in self._idle.values()]
            self._idle.clear()
            if self._timer is not None:
                self._timer.cancel()
        try:
            import ray

            if not ray.is_initialized():
                return
        except ImportError:
            return
        self._give_back(groups, keep_ready)

    def _give_back(self, groups: list[WorkerGroup], keep_ready: bool) -> None:
        """Shut ``groups`` down; with ``keep_ready`` (and ``NEVE_PRESTART`` on), Ray keeps
        as many processes ready on their nodes for :data:`READY_PROCESSES_S` (or the idle
        timeout, where longer), so that the next group skips process start; where the
        groups' workers import ahead (:class:`Imports`), the processes import the
        framework as they start, and the next group of those workers takes them
        (:meth:`_take_ready`)."""
        per_node: dict[Imports, dict[str, int]] = {}
        for group in groups:
            logger.debug("worker group %d gives its resources back", group.id)
            counts = per_node.setdefault(group.imports, {})
            for info in group.workers:
                counts[info.node_id] = counts.get(info.node_id, 0) + 1
            group.shutdown()
        if not keep_ready or not settings.PRESTART.get():
            return
        idle_s = settings.worker_idle_timeout_s(shared_cluster=not cluster.started_here())
        keep_s = max(idle_s, READY_PROCESSES_S)
        for imports, counts in per_node.items():
            runtime_env = imports.runtime_env()
            if cluster.keep_processes_ready(counts, keep_s, runtime_env) and runtime_env:
                # Ray may end them once ``keep_s`` is over; a second's margin.
                with self._lock:
                    self._ready[imports] = (sum(counts.values()),
                                            time.monotonic() + keep_s - 1.0)


_pool = _Pool()


def prepare(layout: Layout, imports: Imports = NOTHING) -> None:
    """Start a group for ``layout`` in the background, for a run about to ask for it."""
    _pool.prepare(layout, imports)


def prestart(layout_of: Callable[[cluster.ClusterView], Layout],
             imports: Imports = NOTHING) -> None:
    """Where this process already runs on a Ray neve may keep warm workers on, start
    the group a run will likely ask for (an estimator or distributor was just made):
    its processes start and import their framework before the user asks.
    ``NEVE_PRESTART=0`` turns it off."""
    import sys

    if not settings.PRESTART.get() or "ray" not in sys.modules:
        return
    import ray

    if not ray.is_initialized():
        return
    try:
        layout = layout_of(cluster.view())
    except Exception as exc:  # an invalid config: the run says so, with the fix
        logger.debug("no prestart: %s", exc)
        return
    prepare(layout, imports)


def acquire(layout: Layout) -> WorkerGroup:
    """A group for ``layout``: a warm one if it matches (or one starting in the
    background, waited for), else a new one."""
    return _pool.acquire(layout)


def release(group: WorkerGroup) -> None:
    """Give a group whose run ended well back to the warm pool."""
    _pool.release(group)


def shutdown_idle(keep_processes_ready: bool = False) -> None:
    """Give back every idle warm group's resources now; with ``keep_processes_ready``,
    as the idle timeout does (Ray keeps processes ready for the next group)."""
    _pool.close(keep_processes_ready)
