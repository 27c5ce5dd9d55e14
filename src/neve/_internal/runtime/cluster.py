"""The Ray cluster neve runs on: join one, or start a private local one, quietly.

* ``ray.is_initialized()`` already: use the caller's Ray as it is.
* an address (argument, ``NEVE_RAY_ADDRESS`` or ``RAY_ADDRESS``): join that cluster,
  within ``NEVE_CONNECT_TIMEOUT_S``, each failure one line (see :mod:`.connect`).
* neither: start a private local instance (``address="local"``; a bare
  ``ray.init()`` would attach to any other cluster on the machine), bound to
  loopback, no dashboard, usage statistics off, Ray's log noise kept off the
  terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from neve._internal import settings
from neve._internal.runtime import connect
from neve.exceptions import ClusterError

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_started_here = False

# Set before Ray's first import (it reads some of these only then).
_QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_COLOR_PREFIX": "0",
    # Ray Data / Train progress output is not ours to print.
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_DEDUP_LOGS": "0",
}
# Only for a private local instance: Ray's cluster mode off makes every Ray server
# bind 127.0.0.1 (checked with Ray 2.60). A driver that joins a real cluster must not
# have it, or it would announce itself at 127.0.0.1 to the other nodes.
_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@dataclass(frozen=True)
class NodeView:
    """One alive node as neve sees it."""

    node_id: str
    address: str
    cpus: float
    gpus: float
    is_head: bool
    #: bytes Ray lets tasks and actors use on this node (its "memory" resource)
    memory: float = 0.0


@dataclass(frozen=True)
class ClusterView:
    """What the cluster offers: its nodes and their resources."""

    address: str
    nodes: tuple[NodeView, ...]

    @property
    def total_cpus(self) -> float:
        return sum(n.cpus for n in self.nodes)

    @property
    def total_gpus(self) -> float:
        return sum(n.gpus for n in self.nodes)

    def describe(self) -> str:
        per_node = ", ".join(
            f"{n.address}: {n.cpus:g} CPU{'' if n.cpus == 1 else 's'}"
            + (f" + {n.gpus:g} GPU{'' if n.gpus == 1 else 's'}" if n.gpus else "")
            for n in self.nodes
        )
        count = len(self.nodes)
        return f"{count} node{'s' if count != 1 else ''} ({per_node})"


def ensure_ray(address: str | None = None) -> None:
    """Make sure this process is connected to a Ray cluster (see the module doc)."""
    global _started_here
    with _lock:
        address = address or settings.ray_address()
        for key, value in {**_QUIET_ENV, **({} if address else _LOOPBACK_ENV)}.items():
            os.environ.setdefault(key, value)
        import ray

        if ray.is_initialized():
            return
        kwargs: dict[str, object] = {
            "include_dashboard": False,
            "logging_level": logging.WARNING,
            "log_to_driver": True,
            "configure_logging": True,
        }
        try:
            if address:
                logger.info("joining the Ray cluster at %s", address)
                connect.join(address, kwargs)
            else:
                num_cpus = settings.local_num_cpus()
                logger.info("starting a private local Ray instance")
                # Also where Ray was imported before neve set the variable above.
                from ray._private import ray_constants

                ray_constants.ENABLE_RAY_CLUSTER = False
                with _quiet_ray_start(), _node_registration_polled():
                    ray.init(address="local", num_cpus=num_cpus,
                             _system_config=_private_system_config(),
                             **kwargs)  # type: ignore[arg-type]
                _started_here = True
        except ClusterError:
            raise
        except Exception as exc:
            target = address or "a private local instance"
            raise ClusterError(f"could not start or join Ray ({target}): {exc}") from exc


#: Ray's setting for how long a process may wait idle while more processes wait than CPUs
#: are free (Ray's default: 1 s)
IDLE_PROCESS_SETTING = "idle_worker_killing_time_threshold_ms"


def _private_system_config() -> dict[str, Any]:
    """Ray's settings for neve's private instance: an idle process waits as long as a
    warm worker group does.

    Ray starts a process per CPU with the node, for the first actors. But it ends a
    process idle for a second wherever more processes wait than CPUs are free, and a
    worker group's placement group takes the CPUs before its actors ask for processes:
    those processes were ended just before the group's actors could take them, and new
    ones started (a first fit in a fresh script 0.5-1 s later). Left as it is where
    ``RAY_idle_worker_killing_time_threshold_ms`` is set.
    """
    if os.environ.get(f"RAY_{IDLE_PROCESS_SETTING}"):
        return {}
    idle_s = settings.worker_idle_timeout_s(shared_cluster=False)
    return {IDLE_PROCESS_SETTING: int(max(idle_s, 1.0) * 1000)}


class _quiet_ray_start:
    """Raise Ray's own loggers to ERROR while it starts (its banners are not ours)."""

    _names = ("ray", "ray._private", "ray._common")

    def __enter__(self) -> None:
        self._levels = {n: logging.getLogger(n).level for n in self._names}
        for name in self._names:
            logging.getLogger(name).setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _node_registration_polled() -> Iterator[None]:
    """While Ray starts here, wait for its raylet to register every 20 ms rather than
    every second.

    ``ray.init`` waits for the new node in the GCS with one call of its C++ state
    accessor, which looks, sleeps a whole second, and looks again (Ray 2.60): the
    raylet registers 0.1-1.4 s after it starts, so Ray's start took 2.2 s or 3.2 s
    here (1.5-2.8 s with this). This looks first, from Python, then makes that call
    once the node is there. A patch of Ray's function for the length of ``ray.init``
    only; anything unexpected falls back to Ray's own wait.
    """
    try:
        from ray._private import services, state
    except ImportError:
        yield
        return
    original = services.get_node

    def polled(gcs_address: str, node_id: str) -> Any:
        try:
            table = state.GlobalState()
            table._initialize_global_state(services._get_gcs_client_options(gcs_address))
            deadline = time.monotonic() + 30.0
            while time.monotonic() < deadline:
                if any(n.get("NodeID") == node_id and n.get("Alive")
                       for n in table.node_table()):
                    break
                time.sleep(0.02)
        except Exception as exc:  # Ray's internals moved: its own wait decides
            logger.debug("node registration not polled: %s", exc)
        return original(gcs_address, node_id)

    services.get_node = polled
    try:
        yield
    finally:
        services.get_node = original


def started_here() -> bool:
    """Whether neve started the Ray instance this process uses."""
    return _started_here


def single_node() -> bool:
    """Whether this process's Ray cluster has one node (also when Ray is not running):
    then a local folder is readable by every worker."""
    import sys

    if "ray" not in sys.modules:
        return True
    import ray

    if not ray.is_initialized():
        return True
    return sum(1 for node in ray.nodes() if node.get("Alive")) <= 1


def view() -> ClusterView:
    """The alive nodes and their resources (connects first if needed)."""
    import ray

    ensure_ray()
    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        nodes.append(
            NodeView(
                node_id=node["NodeID"],
                address=node.get("NodeManagerAddress", "?"),
                cpus=float(resources.get("CPU", 0.0)),
                gpus=float(resources.get("GPU", 0.0)),
                is_head="node:__internal_head__" in resources,
                memory=float(resources.get("memory", 0.0)),
            )
        )
    nodes.sort(key=lambda n: (not n.is_head, n.address, n.node_id))
    context = ray.get_runtime_context()
    address = getattr(context, "gcs_address", None) or "local"
    return ClusterView(address=address, nodes=tuple(nodes))


def keep_processes_ready(per_node: Mapping[str, int], keep_alive_s: float,
                         runtime_env: Mapping[str, Any] | None = None) -> bool:
    """Ask each node's Ray to start ``per_node[node_id]`` worker processes for this job
    and keep them idle for ``keep_alive_s``: the next group's actors start in them,
    skipping Python's and Ray's start (0.26 s a process on a 2-core machine). With a
    ``runtime_env``, the processes start in it (its setup hook imports the framework);
    only actors of the same runtime environment go to them.

    Ray starts such processes itself when it starts (one per CPU); this asks each
    node's raylet for them again (its ``PrestartWorkers`` call), where neve gives a
    group back. Best effort: without gRPC for Python, with a runtime environment on
    the job (the processes would not fit its actors), or where a node does not
    answer, nothing happens. Whether it asked every node.
    """
    try:
        return _keep_processes_ready(per_node, keep_alive_s, runtime_env)
    except Exception as exc:  # an older or newer Ray, Ray shutting down, a node going away
        logger.debug("no processes kept ready: %s", exc)
        return False


def _keep_processes_ready(per_node: Mapping[str, int], keep_alive_s: float,
                          runtime_env: Mapping[str, Any] | None) -> bool:
    import ray

    if not per_node or keep_alive_s <= 0 or not ray.is_initialized():
        return False
    context = ray.get_runtime_context()
    if context.runtime_env:
        return False
    from ray._private.grpc_utils import init_grpc_channel  # needs grpcio
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc

    job_id = bytes.fromhex(context.get_job_id())
    raylets = {node["NodeID"]: (node["NodeManagerAddress"], node["NodeManagerPort"])
               for node in ray.nodes() if node.get("Alive")}
    env_info = None
    if runtime_env:
        # As Ray describes an actor's runtime environment, so that the hashes match.
        from ray._private.utils import get_runtime_env_info
        from ray.runtime_env import RuntimeEnv

        env_info = get_runtime_env_info(RuntimeEnv(**runtime_env), is_job_runtime_env=False,
                                        serialize=False)
    asked_all = True
    for node_id, count in per_node.items():
        if node_id not in raylets:
            asked_all = False
            continue
        host, port = raylets[node_id]
        request = node_manager_pb2.PrestartWorkersRequest(  # type: ignore[attr-defined]
            language=common_pb2.PYTHON,  # type: ignore[attr-defined]
            job_id=job_id, num_workers=count,
            keep_alive_duration_secs=max(int(keep_alive_s), 1))
        if env_info is not None:
            request.runtime_env_info.CopyFrom(env_info)
        channel = init_grpc_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        try:
            node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers(
                request, timeout=5.0)
        finally:
            channel.close()
    return asked_all
