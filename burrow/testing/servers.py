"""Start real ZooKeeper, etcd, Consul, moto (S3) and Prefect servers as local processes.

Used by the test-suite, the demo and the benchmarks.  Every server listens on
127.0.0.1 only, on free ports, and keeps all of its state and its log file
under the ``workdir`` it is given.  Nothing here skips: if a binary is missing
or a server does not become ready in time, a ``RuntimeError`` carrying the tail
of the server's log is raised.

Only the standard library is used, so this module can be imported before (or
without) any of the project's third-party dependencies.

Binaries:

* ZooKeeper 3.8 -- Debian ``zookeeper``/``libzookeeper-java`` jars under
  ``/usr/share/java``, run with ``java`` on PATH.
* etcd 3.4 -- Debian ``etcd-server`` (``/usr/bin/etcd``).
* Consul 1.8 -- ``<repo>/.tools/consul-root/usr/bin/consul`` (installed by
  ``scripts/install-deps.sh``), falling back to ``consul`` on PATH.
* moto -- the ``moto_server`` console script next to ``sys.executable``.
* PostgreSQL 15 -- Debian ``postgresql`` (``/usr/lib/postgresql/<version>/bin``), the
  database of a Prefect server that serves a fleet.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from burrow.proc import all_stat_fields

__all__ = [
    "LocalServer",
    "free_port",
    "silent_listener",
    "start_zookeeper",
    "start_etcd",
    "start_consul",
    "start_moto",
    "start_prefect",
    "start_postgres",
    "postgres_bin_dir",
    "group_cpu_ticks",
    "wait_progress",
    "REPO_ROOT",
    "consul_binary",
]

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]
JAVA_DIR = Path("/usr/share/java")
_LOG_TAIL_LINES = 40
_START_ATTEMPTS = 3  # only retried when we picked the port and it turned out to be taken

# Never route loopback health checks through an HTTP proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --------------------------------------------------------------------------- ports

_port_lock = threading.Lock()
_handed_out: set[int] = set()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is currently free.

    Ports already returned by this process are never returned again, so two
    servers started back to back cannot be given the same port.  (Another
    process can still grab the port before the server binds it; the
    ``start_*`` functions retry with a fresh port in that case.)
    """
    with _port_lock:
        for _ in range(200):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((HOST, 0))
                port = s.getsockname()[1]
            if port in _handed_out:
                continue
            # The same number must be free for UDP too (Consul's serf ports use both).
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind((HOST, port))
            except OSError:
                continue
            _handed_out.add(port)
            return port
    raise RuntimeError("could not find a free TCP port on 127.0.0.1")


def silent_listener() -> socket.socket:
    """A socket on 127.0.0.1 that accepts connections (the kernel does) and never answers: a
    server that hangs. Close it when done. (A port that refuses connections is ``free_port()``.)"""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((HOST, 0))
    s.listen(64)
    return s


# --------------------------------------------------------------------------- LocalServer

_live: set[LocalServer] = set()
_live_lock = threading.Lock()


@dataclass(eq=False)
class LocalServer:
    """A server process started by one of the ``start_*`` functions."""

    name: str
    process: subprocess.Popen
    workdir: Path
    host: str
    port: int
    scheme: str = "http"  # "" for a bare host:port (ZooKeeper)
    log_path: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)  # every port the server uses, by role
    _log_offset: int = 0
    #: the signal that stops it cleanly and promptly (PostgreSQL's SIGTERM waits for every client)
    stop_signal: signal.Signals = signal.SIGTERM
    #: a PostgreSQL server's SQLAlchemy URL (see ``start_postgres``)
    database_url: str = ""
    #: a scratch directory of the server's own, removed once it has stopped
    scratch: Path | None = None

    @property
    def url(self) -> str:
        """``host:port`` for ZooKeeper, ``http://host:port`` for the HTTP servers."""
        if not self.scheme:
            return f"{self.host}:{self.port}"
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after ``timeout``). Idempotent."""
        if self.process.poll() is None:
            self._signal(self.stop_signal)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(timeout=30)
        _forget(self)
        self._remove_scratch()

    def _remove_scratch(self) -> None:
        if self.scratch is not None and self.process.poll() is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the server immediately (simulates a crash). Idempotent."""
        self._signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)
        _forget(self)
        self._remove_scratch()

    def _signal(self, sig: signal.Signals) -> None:
        # Each server runs in its own session/process group, so signal the group:
        # that also reaches any helper processes it forked.  Only while the leader
        # has not been reaped -- afterwards its pid (= the group id) may be reused.
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else f"exited({self.process.returncode})"
        return f"LocalServer({self.name!r}, {self.url}, pid={self.process.pid}, {state})"


def _forget(server: LocalServer) -> None:
    with _live_lock:
        _live.discard(server)


@atexit.register
def _stop_all() -> None:
    """Do not leave servers behind if the caller forgot to stop them."""
    with _live_lock:
        servers = list(_live)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop(timeout=5)


# --------------------------------------------------------------------------- helpers


def _read_tail(path: Path | None, offset: int, lines: int) -> str:
    if path is None:
        return "(no log file)"
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            start = max(offset, size - 64 * 1024)
            fh.seek(start)
            data = fh.read()
    except OSError as exc:
        return f"(could not read {path}: {exc})"
    text = data.decode("utf-8", errors="replace")
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "(log is empty)"


def _fail(what: str, log_path: Path | None, offset: int) -> RuntimeError:
    return RuntimeError(
        f"{what}\n--- last {_LOG_TAIL_LINES} lines of {log_path} ---\n{_read_tail(log_path, offset, _LOG_TAIL_LINES)}"
    )


def _launch(
    name: str,
    argv: list[str],
    workdir: Path,
    port: int,
    scheme: str,
    env: dict[str, str] | None = None,
    ports: dict[str, int] | None = None,
    user: str | None = None,
) -> LocalServer:
    log_path = workdir / f"{name}.log"
    log = open(log_path, "ab")  # handed to the child; our copy is closed below
    try:
        offset = log.tell()
        header = f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}: {' '.join(argv)}\n"
        log.write(header.encode())
        log.flush()
        offset = log.tell()
        try:
            proc = subprocess.Popen(
                argv,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
                user=user,
                group=_primary_group(user) if user else None,
            )
        except OSError as exc:
            raise _fail(f"{name}: could not execute {argv[0]}: {exc}", log_path, offset) from exc
    finally:
        log.close()
    server = LocalServer(
        name=name,
        process=proc,
        workdir=workdir,
        host=HOST,
        port=port,
        scheme=scheme,
        log_path=log_path,
        ports=dict(ports or {"client": port}),
        _log_offset=offset,
    )
    with _live_lock:
        _live.add(server)
    return server


def group_cpu_ticks(pgid: int) -> int:
    """CPU time (clock ticks, user + system) used so far by the live processes of process group
    ``pgid`` (read from /proc): the progress a starting server makes, on a loaded machine too."""
    total = 0
    for _, fields in all_stat_fields():
        if int(fields[2]) == pgid:  # field 5, pgrp
            total += int(fields[11]) + int(fields[12])  # fields 14 and 15, utime and stime
    return total


def wait_progress(ready: Callable[[], bool], pgid: int, timeout: float, what: str) -> None:
    """Poll ``ready`` until it is true. ``timeout`` counts only while process group ``pgid`` uses
    no CPU: a server that is starting slowly on a busy machine (other suites, a load average of
    20 on 2 cores) is waited for, one that is stuck fails after ``timeout`` seconds of standing
    still (and anything after ten times ``timeout``). Raises ``TimeoutError`` naming ``what``."""
    start = time.monotonic()
    deadline = start + timeout
    ticks, looked = group_cpu_ticks(pgid), start
    delay = 0.05
    while not ready():
        now = time.monotonic()
        if now - looked >= 1.0:
            looked, current = now, group_cpu_ticks(pgid)
            if current != ticks:
                ticks, deadline = current, now + timeout
        if now >= deadline or now - start >= 10 * timeout:
            raise TimeoutError(f"{what}: not ready after {now - start:.0f} s ({timeout:g} s without progress)")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def _wait_ready(server: LocalServer, probe: Callable[[], bool], timeout: float) -> None:
    """Poll ``probe`` until it returns True; raise (after stopping the server) otherwise. The
    ``timeout`` counts only while the server's processes stand still (``wait_progress``)."""
    last_exc: BaseException | None = None

    def ready() -> bool:
        nonlocal last_exc
        if server.process.poll() is not None:
            server.stop()
            raise _fail(
                f"{server.name} exited with code {server.process.returncode} before becoming ready "
                f"(port {server.port})",
                server.log_path,
                server._log_offset,
            )
        try:
            ok = probe()
        except Exception as exc:  # any failure just means "not ready yet"
            ok, last_exc = False, exc
        return ok and server.process.poll() is None

    try:
        wait_progress(ready, server.process.pid, timeout, server.name)
    except TimeoutError as exc:
        server.stop()
        detail = f" (last probe error: {last_exc!r})" if last_exc else ""
        raise _fail(f"{server.name} did not become ready on {server.url}: {exc}{detail}", server.log_path,
                    server._log_offset) from None


def _port_in_use_failure(exc: RuntimeError) -> bool:
    text = str(exc).lower()
    return "exited with code" in text and any(
        marker in text for marker in ("address already in use", "address in use", "bindexception")
    )


def _ensure_port_free(name: str, port: int) -> None:
    """Refuse to start on a port something is already listening on.

    Otherwise the readiness probe could talk to *that* server and report ours
    as ready while ours is failing to bind.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR: lingering TIME_WAIT connections (e.g. after a restart on the
        # same port) do not count; the servers themselves bind with it as well.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as exc:
            raise RuntimeError(f"{name}: cannot use port {port} on {HOST}: {exc}") from exc


def _start_with_retry(name: str, start: Callable[[int], LocalServer], port: int | None) -> LocalServer:
    """Call ``start(port)``; if we chose the port and it was stolen, retry with a new one."""
    if port is not None:
        _ensure_port_free(name, port)
        return start(port)
    for attempt in range(_START_ATTEMPTS):
        try:
            return start(free_port())
        except RuntimeError as exc:
            if attempt == _START_ATTEMPTS - 1 or not _port_in_use_failure(exc):
                raise
    raise AssertionError("unreachable")


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with _HTTP.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _prepare_workdir(workdir: Path) -> Path:
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def _require_binary(name: str, candidates: list[Path | str], hint: str) -> str:
    for cand in candidates:
        if isinstance(cand, Path):
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
        else:
            found = shutil.which(cand)
            if found:
                return found
    tried = ", ".join(str(c) for c in candidates)
    raise RuntimeError(f"{name}: binary not found (tried {tried}). {hint}")


_INSTALL_HINT = "Run `sudo scripts/install-deps.sh`."


# --------------------------------------------------------------------------- ZooKeeper


def _zookeeper_classpath() -> str:
    jars = [
        "zookeeper.jar",
        "zookeeper-jute.jar",
        "slf4j-api.jar",
        "slf4j-simple.jar",  # logging binding: plain lines on stderr (-> the log file)
        # Dependencies (also listed in zookeeper.jar's manifest Class-Path; spelled
        # out so a missing one is reported here rather than as a NoClassDefFoundError).
        "commons-cli.jar",
        "commons-io.jar",
        "jackson-annotations.jar",
        "jackson-core.jar",
        "jackson-databind.jar",
        "metrics-core.jar",
        "netty-buffer.jar",
        "netty-common.jar",
        "netty-handler.jar",
        "netty-transport.jar",
        "netty-transport-native-epoll.jar",
        "snappy-java.jar",
    ]
    required = {"zookeeper.jar", "zookeeper-jute.jar", "slf4j-api.jar", "slf4j-simple.jar"}
    paths = []
    for jar in jars:
        p = JAVA_DIR / jar
        if p.is_file():
            paths.append(str(p))
        elif jar in required:
            raise RuntimeError(f"zookeeper: {p} not found. {_INSTALL_HINT}")
    return os.pathsep.join(paths)


def _zk_four_letter(port: int, cmd: bytes, timeout: float = 1.0) -> str:
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(cmd)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode("utf-8", errors="replace")


def start_zookeeper(workdir: Path, port: int | None = None, timeout: float = 60, *, lean: bool = False) -> LocalServer:
    """Start a standalone ZooKeeper 3.8 server; ``url`` is ``127.0.0.1:PORT``.

    Data lives in ``workdir/data``, so stopping and starting again on the same
    workdir (and port) keeps the tree.  ``jute.maxbuffer`` is 4 MiB so values of
    1 MiB plus overhead are accepted.

    ``lean`` (the test suite's servers, not the benchmarks'): the JVM compiles with C1 only and
    collects with one thread (a CPU-bound suite on two cores spends less on each server's JIT and
    GC threads), and the transaction log is written without an fsync per commit (``forceSync=no``:
    a killed server keeps its tree, the writes are in the OS's cache; only a crash of the machine
    would lose them).
    """
    workdir = _prepare_workdir(workdir)
    java = _require_binary("zookeeper", ["java", Path("/usr/lib/jvm/default-java/bin/java")], _INSTALL_HINT)
    classpath = _zookeeper_classpath()

    def start(p: int) -> LocalServer:
        data_dir = workdir / "data"
        data_dir.mkdir(exist_ok=True)
        cfg = workdir / "zoo.cfg"
        cfg.write_text(
            "\n".join(
                [
                    "tickTime=2000",
                    f"dataDir={data_dir}",
                    f"clientPort={p}",
                    f"clientPortAddress={HOST}",
                    "maxClientCnxns=0",
                    "admin.enableServer=false",
                    "4lw.commands.whitelist=*",
                    "jute.maxbuffer=4194304",
                    "autopurge.snapRetainCount=3",
                    "autopurge.purgeInterval=1",
                    *(["forceSync=no"] if lean else []),
                    "",
                ]
            )
        )
        argv = [
            java,
            "-Xms64m",
            "-Xmx1g",
            "-XX:+ExitOnOutOfMemoryError",
            *(["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"] if lean else []),
            "-Djava.net.preferIPv4Stack=true",
            "-Djute.maxbuffer=4194304",
            "-Dzookeeper.admin.enableServer=false",
            "-Dzookeeper.4lw.commands.whitelist=*",
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=info",
            "-Dorg.slf4j.simpleLogger.showDateTime=true",
            "-Dorg.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd'T'HH:mm:ss.SSS",
            "-cp",
            classpath,
            "org.apache.zookeeper.server.ZooKeeperServerMain",
            str(cfg),
        ]
        server = _launch("zookeeper", argv, workdir, p, scheme="")

        def probe() -> bool:
            # `ruok` answers before the server accepts sessions; `srvr` only reports
            # "Mode:" once the ZooKeeperServer is actually running.
            reply = _zk_four_letter(p, b"srvr")
            if not any(line.startswith("Mode:") for line in reply.splitlines()):
                return False
            # Make sure it is *our* server answering on that port.
            return f"dataDir={data_dir}" in _zk_four_letter(p, b"conf")

        _wait_ready(server, probe, timeout)
        return server

    return _start_with_retry("zookeeper", start, port)


# --------------------------------------------------------------------------- etcd

_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "ppc64le": "ppc64le"}


def start_etcd(
    workdir: Path,
    port: int | None = None,
    timeout: float = 60,
    extra_args: list[str] | None = None,
) -> LocalServer:
    """Start a single-member etcd 3.4; ``url`` is ``http://127.0.0.1:PORT`` (client URL).

    ``ports`` holds ``client`` and ``peer``.  Request size limit is 10 MiB and the
    backend quota 8 GiB.  ``extra_args`` go last, so they override these (etcd takes the
    last value of a flag): ``["--quota-backend-bytes", "1048576"]`` gives an etcd that runs
    out of space (the NOSPACE alarm) after about a MiB.
    """
    workdir = _prepare_workdir(workdir)
    etcd = _require_binary("etcd", [Path("/usr/bin/etcd"), "etcd"], _INSTALL_HINT)
    env: dict[str, str] = {}
    machine = platform.machine().lower()
    goarch = _GOARCH.get(machine, machine)
    if goarch != "amd64":
        env["ETCD_UNSUPPORTED_ARCH"] = goarch

    def start(p: int) -> LocalServer:
        peer = free_port()
        client_url = f"http://{HOST}:{p}"
        peer_url = f"http://{HOST}:{peer}"
        argv = [
            etcd,
            "--name",
            "default",
            "--data-dir",
            str(workdir / "data"),
            "--listen-client-urls",
            client_url,
            "--advertise-client-urls",
            client_url,
            "--listen-peer-urls",
            peer_url,
            "--initial-advertise-peer-urls",
            peer_url,
            "--initial-cluster",
            f"default={peer_url}",
            "--initial-cluster-state",
            "new",
            "--max-request-bytes",
            "10485760",
            "--quota-backend-bytes",
            "8589934592",
            *(extra_args or []),
        ]
        server = _launch("etcd", argv, workdir, p, scheme="http", env=env, ports={"client": p, "peer": peer})

        def probe() -> bool:
            status, body = _http_get(f"{client_url}/health")
            return status == 200 and str(json.loads(body).get("health")).lower() == "true"

        _wait_ready(server, probe, timeout)
        return server

    return _start_with_retry("etcd", start, port)


# --------------------------------------------------------------------------- Consul


def consul_binary() -> str:
    """Path of the Consul binary: ``.tools/consul-root/usr/bin/consul`` or ``consul`` on PATH."""
    return _require_binary(
        "consul",
        [REPO_ROOT / ".tools" / "consul-root" / "usr" / "bin" / "consul", "consul"],
        _INSTALL_HINT,
    )


def start_consul(
    workdir: Path,
    port: int | None = None,
    timeout: float = 60,
    extra_config: dict[str, object] | None = None,
) -> LocalServer:
    """Start a Consul agent in ``-dev`` mode (single in-memory server); ``url`` is ``http://127.0.0.1:PORT``.

    Every port is moved off its default (DNS, gRPC and HTTPS are disabled), so
    several agents can run side by side.  ``ports`` holds ``http``, ``server``,
    ``serf_lan`` and ``serf_wan``.  ``extra_config`` is merged (shallowly) into the
    agent's JSON config, e.g. ``{"limits": {"kv_max_value_size": 2097152}}``.

    Dev mode keeps the KV store in memory: a stopped/killed agent loses its data.
    """
    workdir = _prepare_workdir(workdir)
    consul = consul_binary()

    def start(p: int) -> LocalServer:
        ports = {"http": p, "server": free_port(), "serf_lan": free_port(), "serf_wan": free_port()}
        config: dict[str, object] = {
            "node_name": f"burrow-{p}",
            "bind_addr": HOST,
            "client_addr": HOST,
            "advertise_addr": HOST,
            "data_dir": str(workdir / "data"),
            "disable_update_check": True,
            "log_level": "INFO",
            "ports": {**ports, "dns": -1, "grpc": -1, "https": -1},
        }
        config.update(extra_config or {})
        cfg = workdir / "consul.json"
        cfg.write_text(json.dumps(config, indent=2))
        argv = [consul, "agent", "-dev", "-config-file", str(cfg)]
        server = _launch("consul", argv, workdir, p, scheme="http", ports=ports)

        def probe() -> bool:
            status, body = _http_get(f"http://{HOST}:{p}/v1/status/leader")
            leader = body.decode().strip()
            return status == 200 and leader not in ("", '""')

        _wait_ready(server, probe, timeout)
        return server

    return _start_with_retry("consul", start, port)


# --------------------------------------------------------------------------- moto


def start_moto(workdir: Path, port: int | None = None, timeout: float = 60) -> LocalServer:
    """Start ``moto_server`` (mock AWS incl. S3); ``url`` is ``http://127.0.0.1:PORT``.

    Use it with any access key / secret and ``endpoint_url=server.url``.
    """
    workdir = _prepare_workdir(workdir)
    moto = _require_binary(
        "moto",
        [Path(sys.executable).parent / "moto_server", "moto_server"],
        "Run `uv sync` (moto[server] is a dev dependency).",
    )

    def start(p: int) -> LocalServer:
        argv = [moto, "-H", HOST, "-p", str(p)]
        server = _launch("moto", argv, workdir, p, scheme="http", env={"PYTHONUNBUFFERED": "1"})

        def probe() -> bool:
            _http_get(f"http://{HOST}:{p}/")  # any HTTP answer at all means it is serving
            return True

        _wait_ready(server, probe, timeout)
        return server

    return _start_with_retry("moto", start, port)


def start_prefect(
    workdir: Path, port: int | None = None, timeout: float = 180, database_url: str | None = None,
    env: dict[str, str] | None = None,
) -> LocalServer:
    """Start a Prefect API server (``prefect server start``) with its own PREFECT_HOME in
    ``workdir``; ``url`` is ``http://127.0.0.1:PORT`` and the API is at ``url + "/api"``.
    A cold start (database migrations) takes 10-30 s. ``database_url`` (say
    ``start_postgres(...).database_url``) puts it on that database instead of SQLite in its
    PREFECT_HOME; ``env`` adds settings (``PREFECT_SERVER_...``)."""
    workdir = _prepare_workdir(workdir)
    prefect = _require_binary(
        "prefect", [Path(sys.executable).parent / "prefect", "prefect"], "Run `uv sync`."
    )
    extra = env

    def start(p: int) -> LocalServer:
        argv = [prefect, "server", "start", "--host", HOST, "--port", str(p)]
        env = {
            "PREFECT_HOME": str(workdir / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": f"http://{HOST}:{p}/api",
            **(extra or {}),
        }
        if database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
        server = _launch("prefect", argv, workdir, p, scheme="http", env=env)

        def probe() -> bool:
            status, _ = _http_get(f"http://{HOST}:{p}/api/health")
            return status == 200

        _wait_ready(server, probe, timeout)
        return server

    return _start_with_retry("prefect", start, port)


# --------------------------------------------------------------------------- PostgreSQL

#: The database ``start_postgres`` creates (and ``database_url`` names).
POSTGRES_DATABASE = "prefect"


def postgres_bin_dir() -> Path:
    """``/usr/lib/postgresql/<newest version>/bin`` (Debian keeps the server binaries off PATH)."""
    root = Path("/usr/lib/postgresql")
    versions = sorted(
        (d for d in root.glob("*") if (d / "bin" / "postgres").is_file()),
        key=lambda d: [int(x) if x.isdigit() else 0 for x in d.name.split(".")],
    ) if root.is_dir() else []
    if not versions:
        raise RuntimeError(f"postgres: no server binaries under {root}/<version>/bin. {_INSTALL_HINT}")
    return versions[-1] / "bin"


def _primary_group(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_gid


def _postgres_user() -> str | None:
    """The account PostgreSQL runs as: the caller's own, unless that is root (the server refuses
    to run as root): then Debian's ``postgres`` system account."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError(f"postgres: running as root and there is no 'postgres' account. {_INSTALL_HINT}") from None
    return "postgres"


def start_postgres(workdir: Path, port: int | None = None, timeout: float = 60) -> LocalServer:
    """Start a private PostgreSQL server as a plain process (no service manager): ``initdb``
    into its own data directory, ``postgres -D dir -p PORT -k dir`` listening on 127.0.0.1
    only, trust authentication for local connections, and a database named ``prefect``.
    ``database_url`` on the result is its SQLAlchemy/asyncpg URL for
    ``PREFECT_API_DATABASE_CONNECTION_URL``.

    Durability is traded for speed (``fsync=off``): the data is a test's, thrown away with it.
    As root the server runs as the ``postgres`` account (PostgreSQL refuses root), so its data
    directory then lives in a directory of its own under the system's temporary directory, which
    that account can reach (the log stays in ``workdir``).
    """
    import tempfile

    workdir = _prepare_workdir(workdir)
    bindir = postgres_bin_dir()
    user = _postgres_user()
    if user is None:
        data_dir = workdir / "data"
    else:
        data_dir = Path(tempfile.mkdtemp(prefix="burrow-postgres-")) / "data"
        shutil.chown(data_dir.parent, user, user)
    if not (data_dir / "PG_VERSION").is_file():
        init = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8",
             "--locale=C", "--no-sync"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, user=user,
            group=_primary_group(user) if user else None, cwd="/",
        )
        (workdir / "initdb.log").write_text(init.stdout + init.stderr)
        if init.returncode != 0:
            raise _fail(f"postgres: initdb failed with code {init.returncode}", workdir / "initdb.log", 0)

    def start(p: int) -> LocalServer:
        argv = [
            str(bindir / "postgres"), "-D", str(data_dir), "-p", str(p), "-k", str(data_dir),
            "-c", f"listen_addresses={HOST}",
            "-c", "max_connections=300",
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
        ]
        server = _launch("postgres", argv, workdir, p, scheme="", user=user)
        server.stop_signal = signal.SIGINT  # "fast" shutdown: SIGTERM's "smart" one waits for clients
        server.scratch = data_dir.parent if user is not None else None

        def probe() -> bool:
            ready = subprocess.run(
                [str(bindir / "pg_isready"), "-h", HOST, "-p", str(p), "-U", "postgres", "-d", "postgres"],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=10,
            )
            return ready.returncode == 0

        _wait_ready(server, probe, timeout)
        made = subprocess.run(
            [str(bindir / "psql"), "-h", HOST, "-p", str(p), "-U", "postgres", "-d", "postgres", "-v",
             "ON_ERROR_STOP=1", "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{POSTGRES_DATABASE}'"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        )
        if made.returncode == 0 and made.stdout.strip() != "1":
            made = subprocess.run(
                [str(bindir / "createdb"), "-h", HOST, "-p", str(p), "-U", "postgres", POSTGRES_DATABASE],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
            )
        if made.returncode != 0:
            server.stop()
            raise _fail(f"postgres: could not create the {POSTGRES_DATABASE} database: {made.stderr.strip()}",
                        server.log_path, server._log_offset)
        server.database_url = f"postgresql+asyncpg://postgres@{HOST}:{p}/{POSTGRES_DATABASE}"
        return server

    return _start_with_retry("postgres", start, port)
