"""A private, throw-away PostgreSQL server for the test suite.

Usage::

    with PostgresServer() as pg:
        conn = adbc_driver_postgresql.dbapi.connect(pg.uri)

The server runs from a fresh data directory in a temporary directory, listens
only on 127.0.0.1 (random free port) plus a unix socket inside the temporary
directory, uses trust authentication (loopback only) and is tuned for speed,
not durability (fsync=off etc.). It is stopped and its directory removed on
``__exit__``/``stop()``, and also at interpreter exit (atexit) if the caller
never got that far (e.g. Ctrl-C). As a last resort the postmaster gets SIGQUIT
if the Python process that started it dies (Linux PR_SET_PDEATHSIG).

initdb and postgres refuse to run as root; when euid == 0 they are run as the
``postgres`` OS user (or ``nobody`` when there is none) via subprocess's
``user=``/``group=``/``extra_groups=`` arguments, and the temporary directory
is chowned to that user.

Server binaries are looked up in: $NEVE_PG_BINDIR, PATH, ``pg_config
--bindir``, then /usr/lib/postgresql/*/bin (highest version). If none are
found, run ``scripts/ensure-postgres.sh``.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

__all__ = ["PostgresServer", "find_postgres_bindir"]

_ENSURE_HINT = (
    "run `bash scripts/ensure-postgres.sh` (installs Debian's `postgresql` "
    "package when needed) or set NEVE_PG_BINDIR to a directory containing "
    "initdb and postgres"
)


def _has_server_binaries(bindir: str) -> bool:
    return all(os.access(os.path.join(bindir, b), os.X_OK) for b in ("initdb", "postgres"))


def _version_key(path: str) -> tuple:
    # /usr/lib/postgresql/<ver>/bin -> numeric sort key (9.6 < 15)
    ver = os.path.basename(os.path.dirname(path))
    return tuple(int(p) if p.isdigit() else -1 for p in re.split(r"[.]", ver))


def find_postgres_bindir() -> str:
    """Directory holding ``initdb`` and ``postgres``; RuntimeError if none."""
    env = os.environ.get("NEVE_PG_BINDIR")
    if env:
        if _has_server_binaries(env):
            return env
        raise RuntimeError(f"NEVE_PG_BINDIR={env!r} does not contain initdb and postgres")

    initdb = shutil.which("initdb")
    if initdb and _has_server_binaries(os.path.dirname(initdb)):
        return os.path.dirname(initdb)

    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and _has_server_binaries(out):
            return out

    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        if _has_server_binaries(bindir):
            return bindir

    raise RuntimeError(
        "No PostgreSQL server binaries (initdb, postgres) found on PATH or in "
        f"/usr/lib/postgresql/*/bin; {_ENSURE_HINT}."
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_accepts(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _tail(path: str, n: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError as e:
        return f"<cannot read {path}: {e}>"


def _traversable_by_others(path: str) -> bool:
    """True if every ancestor directory of ``path`` has the o+x bit."""
    path = os.path.abspath(path)
    while True:
        try:
            if not os.stat(path).st_mode & 0o001:
                return False
        except OSError:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


_PR_SET_PDEATHSIG = 1


def _make_pdeathsig_preexec():
    """preexec_fn asking the kernel to SIGQUIT the child if we die (Linux).

    Only used from the main thread: PDEATHSIG fires when the *thread* that
    forked exits, which for a worker thread may be long before the process.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None

    def preexec() -> None:  # runs in the child after setuid, before exec
        prctl(_PR_SET_PDEATHSIG, signal.SIGQUIT, 0, 0, 0)

    return preexec


class PostgresServer:
    """Context manager running a private PostgreSQL server.

    Attributes available after start: ``port``, ``host`` ("127.0.0.1"),
    ``user``, ``dbname``, ``uri`` (``postgresql://USER@127.0.0.1:PORT/DB``),
    ``socket_dir``, ``datadir``, ``logfile``, ``bindir``, ``startup_seconds``.
    """

    def __init__(
        self,
        dbname: str = "neve",
        user: str = "neve",
        bindir: str | None = None,
        startup_timeout: float = 30.0,
        extra_settings: dict | None = None,
    ) -> None:
        self.dbname = dbname
        self.user = user
        self.host = "127.0.0.1"
        self._bindir = bindir
        self.startup_timeout = startup_timeout
        self.extra_settings = dict(extra_settings or {})
        self.port: int | None = None
        self.tmpdir: str | None = None
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self._run_as: dict = {}
        self._atexit_registered = False

    # ------------------------------------------------------------------ paths
    @property
    def bindir(self) -> str:
        if self._bindir is None:
            self._bindir = find_postgres_bindir()
        return self._bindir

    @property
    def datadir(self) -> str:
        assert self.tmpdir
        return os.path.join(self.tmpdir, "data")

    @property
    def socket_dir(self) -> str:
        assert self.tmpdir
        return self.tmpdir

    @property
    def logfile(self) -> str:
        assert self.tmpdir
        return os.path.join(self.tmpdir, "postgres.log")

    @property
    def uri(self) -> str:
        if self.port is None:
            raise RuntimeError("PostgresServer is not started")
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"

    # -------------------------------------------------------------- helpers
    def _bin(self, name: str) -> str:
        return os.path.join(self.bindir, name)

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env.pop("LANG", None)
        if self._run_as:
            env["HOME"] = self.tmpdir
            env["USER"] = env["LOGNAME"] = self._run_as_name
        return env

    def _setup_identity(self) -> None:
        """When root, pick the unprivileged account to run initdb/postgres."""
        if os.geteuid() != 0:
            return
        for name in ("postgres", "nobody"):
            try:
                pw = pwd.getpwnam(name)
            except KeyError:
                continue
            if pw.pw_uid == 0:
                continue
            self._run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            self._run_as_name = name
            return
        raise RuntimeError(
            "Running as root, but neither a 'postgres' nor a 'nobody' OS user exists "
            "to run the PostgreSQL server as (initdb/postgres refuse to run as root)."
        )

    def _run(self, args: list, what: str, **kw) -> None:
        res = subprocess.run(
            args,
            cwd=self.tmpdir,
            env=self._env(),
            stdin=kw.pop("stdin", subprocess.DEVNULL),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=kw.pop("timeout", 120),
            **self._run_as,
            **kw,
        )
        # postgres --single exits 0 even when a statement fails.
        if res.returncode != 0 or re.search(r"\b(ERROR|FATAL|PANIC):", res.stdout):
            raise RuntimeError(f"{what} failed (exit {res.returncode}):\n{res.stdout[-4000:]}")

    # ---------------------------------------------------------- lifecycle
    def start(self) -> PostgresServer:
        if self.proc is not None:
            return self
        t0 = time.monotonic()
        bindir = self.bindir  # raises the RuntimeError with the hint early
        self._setup_identity()

        base = tempfile.gettempdir()
        if self._run_as and not _traversable_by_others(base):
            base = "/tmp"
        # Keep the path short: the unix socket path must fit in ~107 bytes.
        self.tmpdir = tempfile.mkdtemp(prefix="neve-pg-", dir=base)
        self._register_atexit()
        try:
            if self._run_as:
                os.chown(self.tmpdir, self._run_as["user"], self._run_as["group"])
            os.chmod(self.tmpdir, 0o700)

            self._run(
                [
                    os.path.join(bindir, "initdb"),
                    "-D",
                    self.datadir,
                    "-U",
                    self.user,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                "initdb",
            )
            self._create_database()
            self._start_postmaster()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _settings(self, port: int) -> dict:
        s = {
            "listen_addresses": self.host,
            "port": str(port),
            "unix_socket_directories": self.socket_dir,
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "wal_level": "minimal",
            "max_wal_senders": "0",
            "shared_buffers": "64MB",
            "max_connections": "50",
            "log_min_messages": "warning",
            "logging_collector": "off",
        }
        s.update({k: str(v) for k, v in self.extra_settings.items()})
        return s

    def _create_database(self) -> None:
        if self.dbname == "postgres":
            return
        # Single-user mode: no client tool or network needed.
        ident = '"' + self.dbname.replace('"', '""') + '"'
        self._run(
            [self._bin("postgres"), "--single", "-D", self.datadir, "-c", "fsync=off", "postgres"],
            "CREATE DATABASE (postgres --single)",
            stdin=None,
            input=f"CREATE DATABASE {ident};\n",
        )

    def _start_postmaster(self) -> None:
        last_error = ""
        for _attempt in range(3):  # retry on a port race
            port = _free_port()
            args = [self._bin("postgres"), "-D", self.datadir]
            for k, v in self._settings(port).items():
                args += ["-c", f"{k}={v}"]
            with open(self.logfile, "ab") as log:
                self.proc = subprocess.Popen(
                    args,
                    cwd=self.tmpdir,
                    env=self._env(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_make_pdeathsig_preexec(),
                    **self._run_as,
                )
            self.port = port
            status = self._wait_ready()
            if status == "ready":
                return
            tail = _tail(self.logfile)
            self._kill_postmaster()
            self.port = None
            if status == "exited" and ("could not bind" in tail or "already in use" in tail):
                last_error = tail
                continue
            raise RuntimeError(
                f"PostgreSQL server did not become ready within {self.startup_timeout:.0f}s "
                f"({status}); bindir={self.bindir}, datadir={self.datadir}. "
                f"Log tail ({self.logfile}):\n{tail}"
            )
        raise RuntimeError(f"PostgreSQL could not bind a free port after 3 tries:\n{last_error}")

    def _wait_ready(self) -> str:
        """'ready', 'exited' or 'timeout'."""
        assert self.proc is not None and self.port is not None
        pidfile = os.path.join(self.datadir, "postmaster.pid")
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return "exited"
            try:
                with open(pidfile) as f:
                    lines = f.read().splitlines()
                # Line 8 is the postmaster status (PG >= 10): "ready" once it
                # accepts connections.
                pid_ok = lines and lines[0].strip() == str(self.proc.pid)
                ready = len(lines) >= 8 and lines[7].strip() == "ready"
            except OSError:
                pid_ok = ready = False
            if pid_ok and ready and _port_accepts(self.port):
                return "ready"
            time.sleep(0.05)
        return "timeout"

    def _kill_postmaster(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # SIGQUIT = immediate shutdown: postmaster kills its children and exits.
        try:
            proc.send_signal(signal.SIGQUIT)
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        """Stop the server and remove its directory. Idempotent."""
        try:
            self._kill_postmaster()
        finally:
            self.port = None
            if self.tmpdir:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
                self.tmpdir = None
            if self._atexit_registered:
                atexit.unregister(self.stop)
                self._atexit_registered = False

    def _register_atexit(self) -> None:
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"port={self.port}" if self.port else "stopped"
        return f"<PostgresServer {state} bindir={self._bindir!r}>"
