"""``burrow server status|start|stop``, and which Prefect API a flow command talks to.

Every flow command (backup, restore, verify, failover, prune) runs its flow in-process and
records it in a Prefect API's run history. Which API:

* ``PREFECT_API_URL`` (from the environment or the active Prefect profile) when it answers:
  the user gets exactly that server.
* With none configured: Burrow's **local server**, a Prefect server started once in the
  background under Burrow's home (``$BURROW_HOME``, default ``~/.burrow``; its
  ``PREFECT_HOME`` and SQLite database are in ``prefect/`` there) and reused by every later
  command. Starting it prints one line with the UI's URL. (Prefect alone would start a
  temporary server for every command: 15 to 25 s each, and the history is lost.)
* When ``PREFECT_API_URL`` is set but does not answer within ``BURROW_ORCHESTRATOR_TIMEOUT``
  seconds (default 2): the orchestrator may sit in the datacenter that is down. backup,
  restore, verify and failover print one warning naming the URL (without credentials) and
  the cause, then run on the local server, whose history keeps the run. prune stops with
  that cause instead: deleting archives can wait for the orchestrator.

Everything here uses the standard library only, so it is decided before Prefect (about 2 s to
import) is loaded: Prefect reads ``PREFECT_API_URL`` once, when it is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from burrow.errors import EXIT_OK, BurrowError
from burrow.naming import redact_url

HOST = "127.0.0.1"
DEFAULT_PORT = 4280  # not Prefect's 4200, so it never collides with a server the user runs
PROBE_TIMEOUT = 2.0  # seconds; "detect a dead orchestrator within 3 s"
START_TIMEOUT = 180.0  # a cold start (database migrations) takes 10 to 30 s on a small machine
#: Commands that run on the local server when the configured orchestrator is down.
FALLBACK_COMMANDS = ("backup", "restore", "verify", "failover")

# Loopback and orchestrator probes never go through an HTTP proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class OrchestratorUnavailable(BurrowError):
    """The configured Prefect API does not answer (and the command does not fall back)."""


class LocalServerError(BurrowError):
    """Burrow's local Prefect server could not be started or stopped."""


# ------------------------------------------------------------------------------ where


def burrow_home() -> Path:
    """Burrow's own home: ``$BURROW_HOME``, else ``~/.burrow``."""
    return Path(os.environ.get("BURROW_HOME") or Path.home() / ".burrow").expanduser()


def server_home() -> Path:
    """The local server's PREFECT_HOME (its SQLite database lives there)."""
    return burrow_home() / "prefect"


def _state_file() -> Path:
    return server_home() / "server.json"


@dataclass
class ServerState:
    """What ``server.json`` records about the running local server."""

    pid: int
    port: int
    started: float

    @property
    def ui_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.port}/api"


def _read_state() -> ServerState | None:
    try:
        data = json.loads(_state_file().read_text())
        return ServerState(pid=int(data["pid"]), port=int(data["port"]), started=float(data.get("started", 0)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_state(state: ServerState) -> None:
    path = _state_file()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state)))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ probes


def _cause(exc: BaseException, timeout: float) -> str:
    """A short, credential-free reason for a failed probe."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"it answered HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc.reason, str):
        exc = exc.reason  # type: ignore[assignment]
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "its host name does not resolve"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error ({exc.reason or type(exc).__name__})"
    if isinstance(exc, (ConnectionResetError, http.client.RemoteDisconnected, http.client.BadStatusLine)):
        return "the connection was closed without an answer"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "no route to its host"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


def probe(api_url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """``None`` when the Prefect API at ``api_url`` answers ``/health`` within ``timeout``
    seconds (any answer below 500 counts: a cloud API may want a key for it), else the cause.

    The probe runs in a daemon thread and is abandoned at the deadline, so a name lookup, a
    connect or a read that never ends costs ``timeout`` seconds at most."""
    result: list[str | None] = []
    health = redact_url(api_url).rstrip("/") + "/health"  # urllib takes no user-info; any answer will do

    def attempt() -> None:
        try:
            with _HTTP.open(health, timeout=timeout):
                result.append(None)
        except urllib.error.HTTPError as exc:
            result.append(None if exc.code < 500 else _cause(exc, timeout))
        except Exception as exc:  # noqa: BLE001 - every failure is a cause to name
            result.append(_cause(exc, timeout))

    t = threading.Thread(target=attempt, name="burrow-api-probe", daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else f"no answer within {timeout:g} s"


def _probe_timeout() -> float:
    try:
        return max(0.1, float(os.environ.get("BURROW_ORCHESTRATOR_TIMEOUT", PROBE_TIMEOUT)))
    except ValueError:
        return PROBE_TIMEOUT


def configured_api_url() -> tuple[str | None, str]:
    """The Prefect API the user configured, and where it came from: ``PREFECT_API_URL`` in
    the environment, else the active profile of ``profiles.toml`` (read with tomllib, so
    without importing Prefect). ``(None, "")`` when there is none."""
    env = os.environ.get("PREFECT_API_URL", "").strip()
    if env:
        return env, "PREFECT_API_URL"
    if "PREFECT_API_URL" in os.environ:  # set but empty: explicitly none
        return None, ""
    import tomllib

    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return None, ""
    name = os.environ.get("PREFECT_PROFILE") or data.get("active") or "ephemeral"
    value = (data.get("profiles", {}).get(name) or {}).get("PREFECT_API_URL")
    if isinstance(value, str) and value.strip():
        return value.strip(), f"the Prefect profile {name!r}"
    return None, ""


# ------------------------------------------------------------------------------ the local server


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_our_server(state: ServerState) -> bool:
    """True when ``state.pid`` is still the server we started (not a recycled pid)."""
    if not _pid_alive(state.pid):
        return False
    try:
        cmdline = Path(f"/proc/{state.pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust the pid and the health probe
    return b"prefect.server.api.server" in cmdline and str(state.port).encode() in cmdline


def _healthy(state: ServerState, timeout: float = 1.0) -> bool:
    return probe(state.api_url, timeout) is None


def running_server() -> ServerState | None:
    """The local server when it runs and answers, else ``None``."""
    state = _read_state()
    if state is not None and _is_our_server(state) and _healthy(state):
        return state
    return None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _pick_port(previous: int | None) -> int:
    wanted = os.environ.get("BURROW_SERVER_PORT")
    if wanted:
        try:
            port = int(wanted)
        except ValueError:
            raise LocalServerError(f"BURROW_SERVER_PORT must be a port number, not {wanted!r}") from None
        if not _port_free(port):
            raise LocalServerError(f"BURROW_SERVER_PORT {port} is in use by another program")
        return port
    for port in (previous, DEFAULT_PORT):
        if port and _port_free(port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _start_lock() -> Any:
    """One process at a time starts or stops the local server (two commands started
    together must not start two servers)."""
    import fcntl

    server_home().mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(server_home() / "server.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _server_env(port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    home = server_home()
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://{HOST}:{port}/api",
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        "PREFECT__SERVER_FINAL": "1",
        "DO_NOT_TRACK": "1",
    })
    return env


@dataclass
class Starting:
    """The local server, maybe still starting: ``wait()`` until it answers."""

    state: ServerState
    started: bool  # launched by this process now
    proc: subprocess.Popen[bytes] | None = None

    def wait(self, timeout: float = START_TIMEOUT) -> ServerState:
        """Block until the server answers ``/health`` (a cold start takes 10 to 30 s)."""
        deadline = time.monotonic() + timeout
        while not _healthy(self.state, 1.0):
            ended = self.proc.poll() is not None if self.proc else not _pid_alive(self.state.pid)
            if ended:
                if self.proc is not None:
                    _state_file().unlink(missing_ok=True)
                raise LocalServerError(
                    f"the local Prefect server exited while starting; see {server_home() / 'server.log'}"
                )
            if time.monotonic() > deadline:
                raise LocalServerError(
                    f"the local Prefect server (pid {self.state.pid}) does not answer at {self.state.api_url} "
                    f"after {timeout:g} s; see {server_home() / 'server.log'}, or `burrow server stop` it"
                )
            time.sleep(0.2)
        return self.state


def begin_server() -> Starting:
    """The local server if it runs (or another command is starting it), else launch it now,
    without waiting for it to answer: the caller imports Prefect meanwhile.

    It runs detached (its own session, output in ``server.log``), so it outlives the
    command that started it; ``burrow server stop`` ends it."""
    with _start_lock():
        previous = _read_state()
        if previous is not None and _is_our_server(previous):
            return Starting(previous, started=False)
        last = server_home() / "last-port"  # the UI keeps its address across stops and starts
        try:
            last_port = previous.port if previous else int(last.read_text())
        except (OSError, ValueError):
            last_port = None
        port = _pick_port(last_port)
        last.write_text(str(port))
        home = server_home()
        import importlib.util

        spec = importlib.util.find_spec("prefect")  # its location, without importing it (2 s)
        if spec is None or spec.origin is None:
            raise LocalServerError("Prefect is not installed in this environment")
        site = str(Path(spec.origin).resolve().parents[1])
        argv = [
            sys.executable, "-m", "uvicorn", "--app-dir", site, "--factory",
            "prefect.server.api.server:create_app", "--host", HOST, "--port", str(port),
            "--log-level", "warning",
        ]
        with open(home / "server.log", "ab") as log:
            proc = subprocess.Popen(
                argv, env=_server_env(port), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=str(home), close_fds=True,
            )
        state = ServerState(pid=proc.pid, port=port, started=time.time())
        _write_state(state)
        return Starting(state, started=True, proc=proc)


def start_server(timeout: float = START_TIMEOUT) -> tuple[ServerState, bool]:
    """Start the local server unless it runs, and wait until it answers; return it and
    whether this call started it."""
    starting = begin_server()
    return starting.wait(timeout), starting.started


def stop_server(timeout: float = 15.0) -> ServerState | None:
    """Stop the local server; return what was stopped (``None``: nothing ran)."""
    with _start_lock():
        state = _read_state()
        if state is None or not _is_our_server(state):
            _state_file().unlink(missing_ok=True)
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(state.pid, signal.SIGTERM)  # its own session: uvicorn and its children
        deadline = time.monotonic() + timeout
        while _pid_alive(state.pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(state.pid, os.WNOHANG)  # reap it when this process started it
            time.sleep(0.1)
        if _pid_alive(state.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(state.pid, signal.SIGKILL)
        _state_file().unlink(missing_ok=True)
        return state


# ------------------------------------------------------------------------------ choosing the API


@dataclass
class Orchestrator:
    """The Prefect API a flow command uses, and why."""

    api_url: str
    local: bool
    starting: Starting | None = None  # the local server, maybe still starting
    fallback_from: str | None = None  # the configured URL (redacted) that did not answer
    cause: str | None = None

    def wait(self) -> None:
        """Return once the API answers (at once for a configured one: it was probed)."""
        if self.starting is not None:
            self.starting.wait()


def _use(api_url: str) -> None:
    """Point this process's Prefect at ``api_url`` (before Prefect is imported; after, too)."""
    os.environ["PREFECT_API_URL"] = api_url
    for key in ("PREFECT_API_KEY", "PREFECT_API_AUTH_STRING"):  # never sent to the local server
        os.environ.pop(key, None)
    if "prefect.context" in sys.modules:  # already imported (a test calling main in-process)
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


def choose_orchestrator(command: str) -> Orchestrator:
    """Decide which Prefect API ``command`` runs on and point this process's
    ``PREFECT_API_URL`` at it, launching the local server if needed (``Orchestrator.wait``
    then waits for it to answer, so Prefect's import overlaps its start). Prints at most
    one line."""
    url, origin = configured_api_url()
    if url:
        cause = probe(url, _probe_timeout())
        if cause is None:
            return Orchestrator(api_url=url, local=False)
        shown = redact_url(url)
        if command not in FALLBACK_COMMANDS:
            raise OrchestratorUnavailable(
                f"the Prefect API at {shown} ({origin}) is unreachable: {cause}; "
                f"`burrow {command}` waits for the orchestrator (backup, restore, verify and failover "
                "fall back to the local server)"
            )
        starting = begin_server()
        print(
            f"burrow: warning: the Prefect API at {shown} ({origin}) is unreachable: {cause}; running on "
            f"Burrow's local Prefect server instead{' (starting it now)' if starting.started else ''}, "
            f"run history at {starting.state.ui_url}",
            file=sys.stderr, flush=True,
        )
        _use(starting.state.api_url)
        return Orchestrator(api_url=starting.state.api_url, local=True, starting=starting,
                            fallback_from=shown, cause=cause)
    starting = begin_server()
    if starting.started:
        print(
            f"burrow: starting Burrow's local Prefect server in the background; run history at "
            f"{starting.state.ui_url} (`burrow server stop` stops it)",
            file=sys.stderr, flush=True,
        )
    _use(starting.state.api_url)
    return Orchestrator(api_url=starting.state.api_url, local=True, starting=starting)


# ------------------------------------------------------------------------------ the command


def register(sub: Any) -> dict[str, Any]:
    """Add ``burrow server`` to ``sub``; return its handler by name."""
    s = sub.add_parser(
        "server", help="Burrow's local Prefect server (run history when PREFECT_API_URL is not set)",
        description="Manage the Prefect server that Burrow starts under $BURROW_HOME (default ~/.burrow) "
        "for flow commands when PREFECT_API_URL is not set.",
    )
    s.add_argument("action", choices=("status", "start", "stop"), help="status, start or stop the local server")
    s.add_argument("--json", action="store_true", help="status as one JSON object")
    return {"server": cmd_server}


def _status() -> dict[str, Any]:
    state = _read_state()
    alive = state is not None and _is_our_server(state)
    info: dict[str, Any] = {
        "home": str(server_home()),
        "database": str(server_home() / "prefect.db"),
        "running": bool(alive),
    }
    if alive and state is not None:
        info.update(pid=state.pid, ui_url=state.ui_url, api_url=state.api_url, healthy=_healthy(state))
    url, origin = configured_api_url()
    if url:
        cause = probe(url, _probe_timeout())
        info["configured_api_url"] = redact_url(url)
        info["configured_from"] = origin
        info["configured_reachable"] = cause is None
        if cause:
            info["configured_cause"] = cause
    return info


def cmd_server(args: argparse.Namespace) -> int:
    """``burrow server status|start|stop``."""
    if args.action == "stop":
        stopped = stop_server()
        print(f"stopped the local Prefect server (pid {stopped.pid})" if stopped
              else "the local Prefect server is not running")
        return EXIT_OK
    if args.action == "start":
        state, started = start_server()
        print(f"{'started' if started else 'already running:'} the local Prefect server, UI at {state.ui_url}")
        return EXIT_OK
    info = _status()
    if args.json:
        print(json.dumps(info, sort_keys=True))
        return EXIT_OK
    if info["running"]:
        health = "answering" if info["healthy"] else "NOT answering"
        print(f"local Prefect server: running (pid {info['pid']}, {health}), UI at {info['ui_url']}")
    else:
        print("local Prefect server: not running (the next flow command starts it)")
    print(f"home: {info['home']} (database {info['database']})")
    if "configured_api_url" in info:
        where = "reachable" if info["configured_reachable"] else f"UNREACHABLE: {info['configured_cause']}"
        print(f"flow commands use {info['configured_api_url']} (from {info['configured_from']}; {where})")
    else:
        print("flow commands use the local server (PREFECT_API_URL is not set)")
    return EXIT_OK
