"""Joining a Ray cluster by address: one bounded wait, one line of cause, no C++ log lines.

Left alone, ``ray.init(address=...)`` retries for minutes and writes a C++ log
line per attempt to the terminal: an address where something else answers (the
dashboard's port 8265 given for the GCS's 6379) hung for more than 200 s, and
one that never completes a handshake failed after 22 s under 20 log lines and a
65-line traceback. Here every step shares one deadline,
``NEVE_CONNECT_TIMEOUT_S`` (15 s), and each failure is one sentence:

1. a socket to ``host:port``: nothing listening, no route, or no name is said at once;
2. the HTTP/2 connection preface that gRPC (Ray's GCS) answers with a SETTINGS
   frame: a web server (the dashboard), a server that closes or stays silent is
   "not a Ray GCS", with the likely right port;
3. (plain ``host:port`` only) Ray's own GCS client, in a child process killed at
   the deadline: a missing or wrong token (Ray 2.60 turns token authentication on)
   or another gRPC service is named;
4. (plain ``host:port`` only) a Ray node on this machine: a driver joins the GCS
   through its own node's raylet, and Ray looks for one for 60 s before failing;
   a driver outside the cluster is told to use ``ray://`` or ``ray start --address``;
5. ``ray.init`` with Ray's own waits capped by what is left, its C++ log lines
   (written to file descriptor 2) kept off the terminal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from neve._internal import settings
from neve.exceptions import ClusterError

logger = logging.getLogger(__name__)

GCS_DEFAULT_PORT = 6379
DASHBOARD_PORT = 8265
CLIENT_PORT = 10001
#: the HTTP/2 client connection preface and an empty SETTINGS frame (RFC 9113, 3.4)
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_SETTINGS = 0x4
#: a line of Ray's C++ log: "[2026-12-01 06:24:04,348 W 9066 9066] gcs_client.cc:210: ..."
_NATIVE_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] ")
_WHERE = ("Check the address (NEVE_RAY_ADDRESS, RAY_ADDRESS or --address), or unset it to "
          "use a private local instance")


@dataclass(frozen=True)
class Target:
    """A cluster address taken apart."""

    address: str
    host: str
    port: int
    client: bool  # ray://, Ray Client's server rather than the GCS


def parse(address: str) -> Target | None:
    """``host:port`` or ``ray://host:port`` taken apart (``None``: nothing to probe)."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "", address
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host or not port.isdigit() or scheme not in ("", "ray"):
        return None
    return Target(address, host.strip("[]"), int(port), scheme == "ray")


class Deadline:
    """What is left of ``NEVE_CONNECT_TIMEOUT_S``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        return max(self._end - time.monotonic(), 0.0)

    def setting(self) -> str:
        return f"NEVE_CONNECT_TIMEOUT_S={self.seconds:g}"


def join(address: str, init_kwargs: Mapping[str, object]) -> None:
    """``ray.init(address=...)`` within ``NEVE_CONNECT_TIMEOUT_S``, or a one-line ClusterError."""
    deadline = Deadline(settings.CONNECT_TIMEOUT_S.get())
    target = parse(address)
    if target is not None:
        probe(target, deadline)
        if target.client:
            _require_ray_client(address)
        else:
            check_gcs(target, deadline)
            require_local_node(target)
    _init(address, init_kwargs, deadline)


# -- 1 and 2: the socket and the HTTP/2 preface ---------------------------------------------


def probe(target: Target, deadline: Deadline) -> None:
    """Fail with the cause unless a gRPC (HTTP/2) server answers at the target."""
    address, host, port = target.address, target.host, target.port
    try:
        sock = socket.create_connection((host, port), timeout=max(deadline.left(), 0.1))
    except socket.gaierror:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address}: the host name {host!r} does not "
            f"resolve. {_WHERE}"
        ) from None
    except ConnectionRefusedError:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address}: nothing listens on port {port} of "
            f"{host} (connection refused). {_WHERE}; on the head node, `ray start --head` "
            f"starts the GCS on port {GCS_DEFAULT_PORT}"
        ) from None
    except TimeoutError:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address}: no answer within "
            f"{deadline.seconds:g} s ({deadline.setting()}). Likely causes: a wrong host, a "
            f"firewall between here and the head node, or the head node is down. {_WHERE}"
        ) from None
    except OSError as exc:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}. {_WHERE}"
        ) from None
    with sock:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return  # a TLS server answers a TLS handshake, not the plain preface
        answer, closed = _preface_answer(sock, deadline)
    if len(answer) >= 9 and answer[3] == _SETTINGS:
        return
    raise ClusterError(_not_a_gcs(target, answer, closed, deadline))


def _preface_answer(sock: socket.socket, deadline: Deadline) -> tuple[bytes, bool]:
    """The first bytes a server sends after the HTTP/2 preface, and whether it hung up."""
    answer = b""
    try:
        sock.sendall(_PREFACE)
        while len(answer) < 9:
            sock.settimeout(max(deadline.left(), 0.05))
            chunk = sock.recv(64)
            if not chunk:
                return answer, True
            answer += chunk
    except TimeoutError:
        return answer, False
    except OSError:  # reset by the peer
        return answer, True
    return answer, False


def _not_a_gcs(target: Target, answer: bytes, closed: bool, deadline: Deadline) -> str:
    address, host, port = target.address, target.host, target.port
    what = "a Ray Client server" if target.client else "a Ray GCS"
    right = (f"ray://{host}:{CLIENT_PORT}" if target.client else f"{host}:{GCS_DEFAULT_PORT}")
    if answer.startswith(b"HTTP/") or (answer and answer[:1] == b"<") or (
        answer and all(32 <= b < 127 or b in (9, 10, 13) for b in answer)
    ):
        dashboard = (f" (port {DASHBOARD_PORT} is Ray's dashboard)"
                     if port == DASHBOARD_PORT else "")
        return (f"{address} answers, but it is not {what}: it speaks HTTP/1, as a web server "
                f"does{dashboard}. Join the GCS port instead: RAY_ADDRESS={right} (the port "
                f"given to `ray start --head --port`, {GCS_DEFAULT_PORT} by default)")
    if not answer and closed:
        return (f"{address} accepted the connection and closed it without answering as {what} "
                f"(gRPC over HTTP/2) does: it is not {what}. Ray's GCS listens on the port "
                f"given to `ray start --head --port` ({GCS_DEFAULT_PORT} by default): try "
                f"RAY_ADDRESS={right}")
    if not answer:
        return (f"{address} accepted the connection but did not answer as {what} (gRPC over "
                f"HTTP/2) does within {deadline.seconds:g} s ({deadline.setting()}): it is not "
                f"{what}, or its node is too busy to answer. Ray's GCS listens on the port "
                f"given to `ray start --head --port` ({GCS_DEFAULT_PORT} by default): try "
                f"RAY_ADDRESS={right}")
    return (f"{address} answers, but not as {what} does (gRPC over HTTP/2; its first bytes "
            f"were {answer[:16]!r}). Try RAY_ADDRESS={right}")


def _require_ray_client(address: str) -> None:
    try:
        import grpc  # noqa: F401 - what ray[client] adds
    except ImportError:
        raise ClusterError(
            f"{address} is a Ray Client address (ray://), which needs Ray Client: "
            "pip install 'neve[client]' (that is, ray[client]); or run the driver on a node "
            "of the cluster and join its GCS (RAY_ADDRESS=HEAD_IP:6379)"
        ) from None


# -- 3: Ray's own GCS client, in a child process killed at the deadline ------------------------

_GCS_PROBE = """
import json, sys
try:
    from ray._raylet import GcsClient
    GcsClient(address=sys.argv[1])
    print(json.dumps({"ok": True}))
except ImportError as exc:
    print(json.dumps({"ok": None, "error": str(exc)}))
except Exception as exc:
    print(json.dumps({"ok": False, "type": type(exc).__name__, "error": str(exc)}))
"""


def check_gcs(target: Target, deadline: Deadline) -> None:
    """Fail with the cause unless Ray's GCS client accepts the address (token included)."""
    left = deadline.left()
    if left < 1.0 or not sys.executable:
        return  # no time left for a child: ray.init reports what it finds
    env = dict(os.environ)
    # Ray's client waits 5 s per connection attempt and 30 s in all, by default.
    env.setdefault("RAY_gcs_rpc_server_connect_timeout_s", str(max(1, int(left / 3))))
    env.setdefault("RAY_py_gcs_connect_timeout_s", str(max(1, int(left - 1))))
    try:
        done = subprocess.run([sys.executable, "-c", _GCS_PROBE, f"{target.host}:{target.port}"],
                              capture_output=True, text=True, timeout=left, env=env)
    except subprocess.TimeoutExpired:
        raise ClusterError(_silent_grpc(target, deadline)) from None
    except OSError as exc:  # no child processes here: ray.init reports what it finds
        logger.debug("GCS probe not run: %s", exc)
        return
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except ValueError:
        result = {}
    if result.get("ok") is not False:
        return
    error = " ".join(str(result.get("error", "")).split())
    if result.get("type") == "AuthenticationError" or "InvalidAuthToken" in error:
        raise ClusterError(_auth_message(target.address))
    raise ClusterError(_silent_grpc(target, deadline, error))


def _silent_grpc(target: Target, deadline: Deadline, error: str = "") -> str:
    said = f" (Ray: {error.rstrip('.')})" if error else ""
    client = (f"; port {CLIENT_PORT} is the Ray Client server: join it as "
              f"ray://{target.host}:{CLIENT_PORT}" if target.port == CLIENT_PORT else "")
    return (f"{target.address} speaks gRPC but did not answer as a Ray GCS within "
            f"{deadline.seconds:g} s ({deadline.setting()}){said}: it is another service, or "
            f"the head node is overloaded. Ray's GCS listens on the port given to "
            f"`ray start --head --port` ({GCS_DEFAULT_PORT} by default){client}")


def _auth_message(address: str) -> str:
    mode = os.environ.get("RAY_AUTH_MODE", "")
    has_token = bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                     or os.path.exists(os.path.expanduser("~/.ray/auth_token")))
    if mode.lower() != "token":
        problem = ("the cluster requires token authentication (on by default in Ray 2.60) "
                   "and this process has it off: set RAY_AUTH_MODE=token, with the cluster's "
                   "token in RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or "
                   "~/.ray/auth_token")
    elif not has_token:
        problem = ("this process has no token: put the cluster's token (the head node's "
                   "~/.ray/auth_token) in RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, "
                   "or ~/.ray/auth_token")
    else:
        problem = ("the cluster refused this process's token: use the head node's token "
                   "(its ~/.ray/auth_token) in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                   "~/.ray/auth_token")
    return f"cannot join the Ray cluster at {address}: {problem}. See docs/cluster.md"


# -- 4: a Ray node on this machine ----------------------------------------------------------


def require_local_node(target: Target) -> None:
    """Fail at once when no Ray node (raylet) runs on this machine to join the GCS through."""
    try:
        from ray._private import services

        nodes = services.find_node_ids()
    except Exception as exc:  # Ray's internals moved: ray.init reports what it finds
        logger.debug("local Ray nodes not looked for: %s", exc)
        return
    if nodes:
        return
    raise ClusterError(
        f"cannot join the Ray cluster at {target.address} from here: a driver joins the GCS "
        "through a Ray node on its own machine, and none runs here. Run the driver on a node "
        f"of the cluster, make this machine one (ray start --address={target.host}:"
        f"{target.port}), or join through Ray Client: RAY_ADDRESS=ray://{target.host}:"
        f"{CLIENT_PORT} (pip install 'neve[client]'). See docs/cluster.md"
    )


# -- 5: ray.init, bounded, its native log kept off the terminal ------------------------------


def _init(address: str, init_kwargs: Mapping[str, object], deadline: Deadline) -> None:
    import ray

    # Ray's Python loop tries the GCS once a second, 20 times by default: cap it.
    wait = str(max(1, math.ceil(deadline.left())))
    with _env("RAY_gcs_server_port_wait_time_s", wait), _node_lookup_within(deadline), \
            _native_log() as log:
        try:
            ray.init(address=address, **init_kwargs)  # type: ignore[arg-type]
            return
        except Exception as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            cause = exc.__cause__
            if cause is not None and (type(cause).__name__ == "AuthenticationError"
                                      or "InvalidAuthToken" in str(cause)):
                failure = _auth_message(address)
            else:
                native = log.last_line()
                failure = (f"could not join the Ray cluster at {address}: {reason}"
                           + (f" (Ray: {native})" if native else "") + f". {_WHERE}")
    raise ClusterError(failure)


@contextlib.contextmanager
def _node_lookup_within(deadline: Deadline) -> Iterator[None]:
    """Cap Ray's search for this machine's node at what is left of the deadline.

    A patch of Ray's own function, for the length of ``ray.init`` only: its timeout is
    a default argument bound at import (60 s), which no setting reaches.
    """
    try:
        from ray._private import services

        original = services.get_node_to_connect_for_driver
    except (ImportError, AttributeError):
        yield
        return

    def bounded(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout_seconds", max(1, math.ceil(deadline.left())))
        return original(*args, **kwargs)

    services.get_node_to_connect_for_driver = bounded  # type: ignore[assignment]
    try:
        yield
    finally:
        services.get_node_to_connect_for_driver = original


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` for a block, unless the user set it."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


class _Captured:
    """What was written to file descriptor 2 while Ray connected."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def last_line(self) -> str:
        native = [_NATIVE_LOG.sub("", line).strip() for line in self.lines
                  if _NATIVE_LOG.match(line)]
        return native[-1] if native else ""


@contextlib.contextmanager
def _native_log() -> Iterator[_Captured]:
    """Send fd 2 to a file while Ray connects; pass on what was not Ray's native log.

    Ray's C++ core logs straight to file descriptor 2 ("Failed to connect to GCS ...
    within 5 seconds"), past Python's ``sys.stderr``: only the descriptor can be moved.
    """
    captured = _Captured()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no descriptor 2 (some embedded interpreters)
        yield captured
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.lines = sink.read().decode(errors="replace").splitlines()
    others = [line for line in captured.lines if not _NATIVE_LOG.match(line)]
    if others:
        os.write(2, ("\n".join(others) + "\n").encode())
