"""Joining a cluster by address: one bounded wait, a one-line cause, no Ray log lines.

Every server here listens on 127.0.0.1, started by the test: a port nothing listens
on, a web server (what the dashboard's port 8265 answers), servers that hang up or
stay silent, one that speaks HTTP/2 but is not a GCS, and a real Ray GCS.
Nothing here reaches ``ray.init`` for an address that is not a Ray GCS: the probe
refuses it first (``ray.init`` would turn 127.0.0.1 into the machine's own address).
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from neve._internal.runtime import connect
from neve.exceptions import ClusterError, ConfigError

pytestmark = pytest.mark.timeout(60)


def _serve(handle: Callable[[socket.socket], None]) -> Iterator[int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        server.close()
        for conn in held:
            conn.close()


@pytest.fixture
def free_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def web_server() -> Iterator[int]:
    """A plain HTTP/1 server, as Ray's dashboard (8265) is."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts connections and never says a word."""
    yield from _serve(lambda conn: None)


@pytest.fixture
def hanging_up_server() -> Iterator[int]:
    yield from _serve(lambda conn: conn.close())


@pytest.fixture
def http2_server() -> Iterator[int]:
    """Answers HTTP/2's preface with a SETTINGS frame, then nothing: gRPC, but not a GCS."""

    def handle(conn: socket.socket) -> None:
        try:
            conn.recv(4096)
            conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        except OSError:
            pass

    yield from _serve(handle)


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setenv("NEVE_CONNECT_TIMEOUT_S", "2")
    return 2.0


def _join_error(address: str) -> str:
    with pytest.raises(ClusterError) as info:
        connect.join(address, {})
    message = str(info.value)
    assert "\n" not in message  # one line
    error = info.value  # no chained traceback of Ray's above it
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    return message


# -- the probe: what answers at the address ------------------------------------------------


def test_nothing_listening_is_said_at_once(free_port: int) -> None:
    message = _join_error(f"127.0.0.1:{free_port}")
    assert message.startswith(f"cannot reach the Ray cluster at 127.0.0.1:{free_port}: "
                              f"nothing listens on port {free_port} of 127.0.0.1")
    assert "RAY_ADDRESS" in message


def test_a_web_server_is_not_a_gcs(web_server: int) -> None:
    message = _join_error(f"127.0.0.1:{web_server}")
    assert message.startswith(f"127.0.0.1:{web_server} answers, but it is not a Ray GCS: it "
                              "speaks HTTP/1")
    assert "RAY_ADDRESS=127.0.0.1:6379" in message


def test_the_dashboard_port_gets_the_gcs_port_suggested() -> None:
    # Port 8265 itself may be taken on this machine: the message is built from the probe.
    target = connect.Target("127.0.0.1:8265", "127.0.0.1", 8265, client=False)
    message = connect._not_a_gcs(target, b"HTTP/1.1 404 Not Found\r\n", False,
                                 connect.Deadline(15))
    assert "(port 8265 is Ray's dashboard)" in message
    assert "Join the GCS port instead: RAY_ADDRESS=127.0.0.1:6379" in message


def test_a_silent_server_fails_within_the_connect_timeout(silent_server: int, quick: float) -> None:
    message = _join_error(f"127.0.0.1:{silent_server}")
    assert message.startswith(f"127.0.0.1:{silent_server} accepted the connection but did not "
                              "answer as a Ray GCS (gRPC over HTTP/2) does within 2 s "
                              "(NEVE_CONNECT_TIMEOUT_S=2)")


def test_a_server_that_hangs_up(hanging_up_server: int) -> None:
    message = _join_error(f"127.0.0.1:{hanging_up_server}")
    assert "accepted the connection and closed it without answering as a Ray GCS" in message


def test_grpc_that_is_not_a_gcs_fails_within_the_connect_timeout(http2_server: int,
                                                                  quick: float) -> None:
    message = _join_error(f"127.0.0.1:{http2_server}")
    assert message.startswith(f"127.0.0.1:{http2_server} speaks gRPC but did not answer as a "
                              "Ray GCS within 2 s (NEVE_CONNECT_TIMEOUT_S=2)")


def test_ray_client_addresses_need_ray_client(
    http2_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "grpc", None)  # as without ray[client]: no gRPC
    message = _join_error(f"ray://127.0.0.1:{http2_server}")
    assert "needs Ray Client: pip install 'neve[client]'" in message


def test_a_driver_outside_the_cluster_is_told_where_to_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray._private import services

    monkeypatch.setattr(services, "find_node_ids", lambda: [])  # no raylet on this machine
    with pytest.raises(ClusterError) as info:
        connect.require_local_node(connect.Target("head-node:6379", "head-node", 6379, False))
    message = str(info.value)
    assert "a driver joins the GCS through a Ray node on its own machine, and none runs here" \
        in message
    assert "ray start --address=head-node:6379" in message
    assert "RAY_ADDRESS=ray://head-node:10001 (pip install 'neve[client]')" in message
    monkeypatch.setattr(services, "find_node_ids", lambda: ["ab12"])
    connect.require_local_node(connect.Target("head-node:6379", "head-node", 6379, False))


def test_addresses_are_parsed() -> None:
    assert connect.parse("10.0.0.1:6379") == connect.Target("10.0.0.1:6379", "10.0.0.1",
                                                             6379, False)
    assert connect.parse("ray://head:10001") == connect.Target("ray://head:10001", "head",
                                                                10001, True)
    assert connect.parse("[::1]:6379") == connect.Target("[::1]:6379", "::1", 6379, False)
    assert connect.parse("auto") is None and connect.parse("local") is None


def test_the_timeout_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from neve._internal import settings

    assert settings.CONNECT_TIMEOUT_S.default == 15.0
    monkeypatch.setenv("NEVE_CONNECT_TIMEOUT_S", "soon")
    with pytest.raises(ConfigError, match="NEVE_CONNECT_TIMEOUT_S"):
        settings.CONNECT_TIMEOUT_S.get()


# -- as a user sees it: the command, in a fresh process -------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "NEVE_"))}
    env.update(extra)
    return env


@pytest.mark.parametrize("server", ["web_server", "silent_server"])
def test_a_wrong_port_fails_with_one_line_and_no_ray_log(server: str,
                                                         request: pytest.FixtureRequest) -> None:
    port = request.getfixturevalue(server)
    done = subprocess.run(
        [sys.executable, "-m", "neve.cli", "cluster"], capture_output=True, text=True,
        timeout=60, env=_env(RAY_ADDRESS=f"127.0.0.1:{port}", NEVE_CONNECT_TIMEOUT_S="3"),
    )
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr  # no C++ log lines, no traceback
    assert lines[0].startswith(f"neve: error: 127.0.0.1:{port} ")
    assert "not a Ray GCS" in lines[0] or "did not answer as a Ray GCS" in lines[0]


# -- a real GCS: token authentication ----------------------------------------------------------


@pytest.mark.slow
def test_a_real_gcs_without_the_token_is_told_how_to_join(ray_session: None) -> None:
    import ray

    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:")
    script = ("from neve._internal.runtime import cluster\n"
              "import ray\n"
              "cluster.ensure_ray()\n"
              "print(ray.cluster_resources().get('CPU'))\n")
    # This Ray instance binds loopback only: the joining driver must too (cluster mode off).
    loopback = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ADDRESS": address,
                "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env=_env(**loopback, RAY_AUTH_MODE="disabled"))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"neve.exceptions.ClusterError: cannot join the Ray cluster at {address}: the cluster "
        "requires token authentication")
    assert "RAY_AUTH_MODE=token" in done.stderr
    assert "Failed to connect" not in done.stderr  # no C++ log lines
    assert "The above exception" not in done.stderr  # one error, not Ray's chain under it

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env=_env(**loopback, RAY_AUTH_MODE="token"))
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip()) >= 1
