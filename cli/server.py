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

The fallback starts the local server when it does not run (the user may never have needed
it), and that start is what a dead orchestrator costs, so it is made short:

* when the probe has no answer after ``SPECULATE_AFTER`` seconds (a live API answers well
  before), the local server is launched *speculatively*, while the probe goes on; if the API
  answers after all, that launch is withdrawn (killed at once: no command uses it, and SQLite
  is crash-safe) unless another command has meanwhile adopted the server. What a withdrawn
  launch leaves is Burrow's home with a new, empty database, ready for a later fallback;
* on first use, the new database is written from a snapshot of the schema that this Prefect
  release's migrations produce (``_PREFECT_SCHEMA``, checked against the installed Prefect;
  any other release migrates as usual), which saves the 4 to 5 s of SQLite migrations;
* the server runs with a larger young generation for Python's garbage collector
  (``_SERVER_MAIN``): its start (imports, block registration) allocates millions of objects
  and spent 0.6 to 0.8 s in collections;
* readiness is polled every 50 ms.

The local server is **private** to the user who runs Burrow: a Prefect server without an auth
string serves saved blocks, secrets included (``POST /api/block_documents/filter
{"include_secrets": true}``), to any process on the machine. So:

* it runs with ``PREFECT_SERVER_API_AUTH_STRING`` set to a credential generated once (with
  ``secrets``) and kept in ``$BURROW_HOME/server-credential``, mode 0600; every other request
  gets 401 (only ``GET /api/health`` and ``/api/ready`` answer without it, as Prefect wants);
* every Burrow process that talks to it (flow commands, the flows they run in-process, the
  dead-orchestrator fallback) sends it as ``PREFECT_API_AUTH_STRING`` (``_use``);
* ``$BURROW_HOME`` and ``prefect/`` are 0700, the database and the server's log 0600, and the
  server runs with umask 077; each start fixes the modes of an older home;
* a server started by an older Burrow (without the credential), or with a credential no longer
  in the file (deleting the file rotates it), is restarted with the file's.

It keeps running after the command that started it (that is the persistent history);
``burrow server stop`` stops it.

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
import secrets
import signal
import socket
import ssl
import stat
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
from burrow.home import burrow_home
from burrow.naming import has_userinfo, redact_url

HOST = "127.0.0.1"
DEFAULT_PORT = 4280  # not Prefect's 4200, so it never collides with a server the user runs
PROBE_TIMEOUT = 2.0  # seconds; "detect a dead orchestrator within 3 s"
#: Seconds without an answer from the configured API after which the local server is launched
#: speculatively (a live API answers /health within a few tens of milliseconds).
SPECULATE_AFTER = 0.3
READY_POLL = 0.05  # seconds between two readiness checks of a starting local server
#: The local server's main: uvicorn, as ``python -m uvicorn`` runs it, with young collections
#: every 50,000 allocations instead of 700 (older generations keep their default ratios).
_SERVER_MAIN = "import gc, sys; gc.set_threshold(50_000, 10, 10); from uvicorn.main import main; sys.exit(main())"
START_TIMEOUT = 180.0  # a start takes 3 to 6 s on a small machine, 10 to 30 s when it migrates the database
#: Commands that run on the local server when the configured orchestrator is down.
FALLBACK_COMMANDS = ("backup", "restore", "verify", "failover", "undo")

# Loopback and orchestrator probes never go through an HTTP proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class OrchestratorUnavailable(BurrowError):
    """The configured Prefect API does not answer (and the command does not fall back)."""


class LocalServerError(BurrowError):
    """Burrow's local Prefect server could not be started or stopped."""


# ------------------------------------------------------------------------------ where


def server_home() -> Path:
    """The local server's PREFECT_HOME (its SQLite database lives there)."""
    return burrow_home() / "prefect"


def _state_file() -> Path:
    return server_home() / "server.json"


def credential_file() -> Path:
    """The 0600 file that holds the local server's auth string (``user:password``)."""
    return burrow_home() / "server-credential"


#: The user part of the local server's auth string (Prefect's UI asks for ``user:password``).
CREDENTIAL_USER = "admin"


def credential_id(credential: str) -> str:
    """A name for ``credential`` that reveals nothing of it (a hash of 32 random bytes)."""
    import hashlib

    return hashlib.sha256(credential.encode()).hexdigest()[:16]


def secure_home() -> None:
    """Create Burrow's home private (0700, and ``prefect/`` in it), and make an existing one
    private: a home made by an older Burrow was 0755 with a world-readable database, whose rows
    include saved blocks' secrets."""
    home, prefect_home = burrow_home(), server_home()
    prefect_home.mkdir(parents=True, exist_ok=True, mode=0o700)
    for directory in (home, prefect_home):
        if stat.S_IMODE(directory.stat().st_mode) != 0o700:
            directory.chmod(0o700)
    for name in ("prefect.db", "prefect.db-wal", "prefect.db-shm", "prefect.db-journal", "server.log",
                 "server.json", "last-port"):
        path = prefect_home / name
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(path.stat().st_mode) & 0o077:
                path.chmod(0o600)


def local_credential(create: bool = True) -> str | None:
    """The local server's auth string, generated once (``admin:`` and 32 random bytes, URL-safe
    base64) into :func:`credential_file`, created 0600 and exclusively, so two commands never
    write two different ones. ``None`` when there is none and ``create`` is false."""
    from burrow.keys import read_or_create_secret

    path = credential_file()
    try:
        text = read_or_create_secret(path, lambda: f"{CREDENTIAL_USER}:{secrets.token_urlsafe(32)}\n",
                                     create=create, before_create=secure_home)
    except OSError as exc:
        raise LocalServerError(f"cannot read {path} ({exc.strerror or exc})") from None
    if text is None:
        return None
    if ":" not in text or not text.split(":", 1)[1]:
        raise LocalServerError(f"{path} does not hold a credential (user:password); remove it and "
                               "`burrow server stop`, then the next start makes a new one")
    return text


@dataclass
class ServerState:
    """What ``server.json`` records about the running local server."""

    pid: int
    port: int
    started: float
    #: launched while the configured API was still being probed, and not yet needed by any
    #: command: the launching command kills it if that API answers after all
    speculative: bool = False
    #: started with the credential (a server started by an older Burrow was not: it is restarted)
    private: bool = False
    #: which credential it was started with (:func:`credential_id`): a server whose credential
    #: file was replaced since would refuse every command, so it is restarted
    credential_id: str = ""

    @property
    def ui_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.port}/api"


def _read_state() -> ServerState | None:
    try:
        data = json.loads(_state_file().read_text())
        return ServerState(pid=int(data["pid"]), port=int(data["port"]), started=float(data.get("started", 0)),
                           speculative=bool(data.get("speculative", False)),
                           private=bool(data.get("private", False)),
                           credential_id=str(data.get("credential_id", "")))
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


class Probe:
    """A probe of the Prefect API at ``api_url``: its ``/health`` is asked at once, in a daemon
    thread that is abandoned at the deadline, so a name lookup, a connect or a read that never
    ends costs ``timeout`` seconds at most. Any answer below 500 counts as alive (a cloud API
    may want a key for it)."""

    def __init__(self, api_url: str, timeout: float = PROBE_TIMEOUT) -> None:
        self.timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._result: list[str | None] = []
        health = redact_url(api_url).rstrip("/") + "/health"  # urllib takes no user-info; any answer will do
        self._thread = threading.Thread(target=self._attempt, args=(health,), name="burrow-api-probe", daemon=True)
        self._thread.start()

    def _attempt(self, health: str) -> None:
        try:
            with _HTTP.open(health, timeout=self.timeout):
                self._result.append(None)
        except urllib.error.HTTPError as exc:
            self._result.append(None if exc.code < 500 else _cause(exc, self.timeout))
        except Exception as exc:  # noqa: BLE001 - every failure is a cause to name
            self._result.append(_cause(exc, self.timeout))

    def settled(self, within: float = 0.0) -> bool:
        """Whether the probe has its result, waiting up to ``within`` seconds for it."""
        self._thread.join(max(0.0, min(within, self._deadline - time.monotonic())))
        return bool(self._result)

    def cause(self) -> str | None:
        """``None`` when the API answered, else the cause (waits until the deadline at most)."""
        self._thread.join(max(0.0, self._deadline - time.monotonic()))
        return self._result[0] if self._result else f"no answer within {self.timeout:g} s"


def probe(api_url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """``None`` when the Prefect API at ``api_url`` answers ``/health`` within ``timeout``
    seconds, else the cause."""
    return Probe(api_url, timeout).cause()


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


# ------------------------------------------------------------------------------ the database on first use

#: Prefect's SQLite migrations, relative to the ``prefect`` package.
_MIGRATIONS = Path("server", "database", "_migrations", "versions", "sqlite")


def _prefect_schema_key(package: Path) -> str | None:
    """What Prefect's SQLite schema depends on, read without importing Prefect: its release
    (``_build_info.py``: version and git commit) and its SQLite migrations (their file names).
    ``None`` when either cannot be read."""
    import hashlib
    import re

    try:
        info = (package / "_build_info.py").read_text()
        names = sorted(n for n in os.listdir(package / _MIGRATIONS) if n.endswith(".py") and not n.startswith("__"))
    except OSError:
        return None
    found = dict(re.findall(r'^__(version|git_commit)__\s*=\s*"([^"]*)"', info, re.MULTILINE))
    if not names or not found.get("version"):
        return None
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    return f"{found['version']}+{found.get('git_commit', '')[:12]}:{len(names)}:{digest}"


def schema_snapshot(db: Path) -> str:
    """SQL that recreates the schema of the SQLite database ``db``: its tables, then its
    indexes, views and triggers (each in creation order, with the exact text SQLite keeps),
    and the rows of ``alembic_version``. Run on an empty file, it gives a database that
    Prefect's migrations find up to date. ``ValueError`` when another table holds rows (a
    snapshot carries no data)."""
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL "
                           "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY rowid").fetchall()
        rank = {"table": 0, "index": 1, "view": 2, "trigger": 3}
        statements = [sql for _, _, sql in sorted(rows, key=lambda r: rank[r[0]])]  # stable: creation order kept
        for kind, name, _ in rows:
            if kind == "table" and name != "alembic_version" and con.execute(f'SELECT 1 FROM "{name}" LIMIT 1').fetchone():
                raise ValueError(f"table {name} of {db} holds rows")
        versions = [v for (v,) in con.execute("SELECT version_num FROM alembic_version ORDER BY version_num")]
    finally:
        con.close()
    statements += [f"INSERT INTO alembic_version (version_num) VALUES ('{v}')" for v in versions]
    return "".join(f"{sql};\n" for sql in statements)


def _pack(sql: str) -> tuple[str, ...]:
    import base64
    import zlib

    text = base64.b64encode(zlib.compress(sql.encode(), 9)).decode()
    return tuple(text[i:i + 96] for i in range(0, len(text), 96))


def _unpack(lines: tuple[str, ...]) -> str:
    import base64
    import zlib

    return zlib.decompress(base64.b64decode("".join(lines))).decode()


def _seed_database(db: Path, package: Path) -> bool:
    """First use: write ``db`` from ``_PREFECT_SCHEMA`` when it is this Prefect's schema, so
    the server starts without running Prefect's migrations (4 to 5 s on SQLite). Returns
    whether it did; any doubt (another Prefect release, an existing or half-written file)
    leaves the database to Prefect's migrations."""
    import sqlite3
    import zlib

    key, packed = _PREFECT_SCHEMA
    if any(Path(f"{db}{suffix}").exists() for suffix in ("", "-wal", "-journal")):
        return False
    if _prefect_schema_key(package) != key:
        return False
    tmp = db.with_name(db.name + ".seed")
    try:
        tmp.unlink(missing_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # SQLite's -wal and -shm follow its mode
        con = sqlite3.connect(tmp, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode = WAL")  # as Prefect's migrations leave it
            con.executescript(f"BEGIN;\n{_unpack(packed)}COMMIT;")
        finally:
            con.close()
        os.replace(tmp, db)
    except (OSError, sqlite3.Error, ValueError, zlib.error):
        for suffix in ("", "-wal", "-shm"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        return False
    return True


def migrated_schema(python: str = sys.executable) -> tuple[str, str]:
    """Prefect's own answer: a new SQLite database migrated by the Prefect that ``python``
    imports (in a temporary directory), as ``(schema key, schema_snapshot)``. Imports
    Prefect in a child process; takes 5 to 10 s."""
    import importlib.util
    import tempfile

    spec = importlib.util.find_spec("prefect")
    if spec is None or spec.origin is None:
        raise LocalServerError("Prefect is not installed in this environment")
    key = _prefect_schema_key(Path(spec.origin).resolve().parent)
    if key is None:
        raise LocalServerError("cannot tell which Prefect release is installed")
    with tempfile.TemporaryDirectory(prefix="burrow-schema-") as tmp:
        db = Path(tmp) / "prefect.db"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=tmp, PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{db}",
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
        code = ("import asyncio\nfrom prefect.server.database import provide_database_interface\n"
                "asyncio.run(provide_database_interface().create_db())\n")
        done = subprocess.run([python, "-c", code], env=env, cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0:
            raise LocalServerError(f"Prefect's migrations failed:\n{done.stderr[-3000:]}")
        return key, schema_snapshot(db)


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
    proc = Path(f"/proc/{state.pid}")
    try:
        for _ in range(100):
            cmdline = (proc / "cmdline").read_bytes()
            if cmdline:
                break
            # empty: a zombie, or a process in the middle of its exec (the launching Popen has
            # returned already), whose new command line shows a few microseconds later
            if (proc / "stat").read_text().rpartition(")")[2].split()[:1] == ["Z"]:
                return False
            time.sleep(0.005)
    except OSError:  # no /proc (macOS): trust the pid and the health probe; else it has just ended
        return not proc.parent.is_dir()
    return b"prefect.server.api.server" in cmdline and str(state.port).encode() in cmdline


def _healthy(state: ServerState, timeout: float = 1.0) -> bool:
    return probe(state.api_url, timeout) is None


def _answers(state: ServerState, timeout: float = 1.0) -> bool:
    """Like ``_healthy``, in this thread: the loopback check a starting server is polled with
    (refused at once until it listens)."""
    try:
        with _HTTP.open(state.api_url + "/health", timeout=timeout):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (OSError, http.client.HTTPException):
        return False


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
def _start_lock(wait: bool = True) -> Any:
    """One process at a time starts or stops the local server (two commands started
    together must not start two servers). Yields whether it holds the lock: always, unless
    ``wait`` is false and another process holds it."""
    import fcntl

    server_home().mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(server_home() / "server.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
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
        # private: every API request but the health probe needs the credential (the server's
        # own client settings carry it too, should it ever call itself)
        "PREFECT_SERVER_API_AUTH_STRING": local_credential(),
        "PREFECT_API_AUTH_STRING": local_credential(),
    })
    return env


@dataclass
class Starting:
    """The local server, maybe still starting: ``wait()`` until it answers."""

    state: ServerState
    started: bool  # launched by this process now
    proc: subprocess.Popen[bytes] | None = None

    def wait(self, timeout: float = START_TIMEOUT) -> ServerState:
        """Block until the server answers ``/health`` (a start takes 3 to 30 s)."""
        deadline = time.monotonic() + timeout
        while not _answers(self.state):
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
            time.sleep(READY_POLL)
        return self.state


def begin_server() -> Starting:
    """The local server if it runs (or another command is starting it), else launch it now,
    without waiting for it to answer: the caller imports Prefect meanwhile.

    It runs detached (its own session, output in ``server.log``), so it outlives the
    command that started it; ``burrow server stop`` ends it."""
    starting = _begin(speculative=False)
    if starting is None:  # cannot happen: only a speculative launch gives up the lock
        raise LocalServerError("the local Prefect server's start lock is held")
    return starting


def _begin(speculative: bool) -> Starting | None:
    """``begin_server``. ``speculative``: launched while the configured API is still being
    probed (see ``choose_orchestrator``), and ``None`` instead of waiting when another process
    holds the start lock. A command that needs the server adopts a speculative one it finds."""
    with _start_lock(wait=not speculative) as locked:
        if not locked:
            return None
        secure_home()
        current = credential_id(local_credential() or "")  # before the server reads it
        previous = _read_state()
        if previous is not None and _is_our_server(previous) and (not previous.private
                                                                   or previous.credential_id != current):
            # started by an older Burrow, without the credential (it serves secrets to anyone), or
            # with a credential that is no longer in the file (it would refuse every command)
            _kill(previous)
        elif previous is not None and _is_our_server(previous):
            if previous.speculative and not speculative:
                previous.speculative = False
                _write_state(previous)
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
        package = Path(spec.origin).resolve().parent
        site = str(package.parent)
        _seed_database(home / "prefect.db", package)
        secure_home()  # the files just written, and those of a home an older Burrow made
        argv = [
            sys.executable, "-c", _SERVER_MAIN, "--app-dir", site, "--factory",
            "prefect.server.api.server:create_app", "--host", HOST, "--port", str(port),
            "--log-level", "warning",
        ]
        with open(os.open(home / "server.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
            proc = subprocess.Popen(
                argv, env=_server_env(port), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=str(home), close_fds=True, umask=0o077,
            )
        state = ServerState(pid=proc.pid, port=port, started=time.time(), speculative=speculative, private=True,
                            credential_id=current)
        _write_state(state)
        return Starting(state, started=True, proc=proc)


def _adopt(starting: Starting) -> None:
    """This command needs the (maybe speculatively launched) local server: keep it."""
    with _start_lock():
        state = _read_state()
        if state is not None and state.pid == starting.state.pid and state.speculative:
            state.speculative = False
            _write_state(state)


def _withdraw(starting: Starting) -> None:
    """The configured API answered after all: kill the server this command launched
    speculatively, unless another command has adopted it meanwhile. No command uses it (it is
    most likely still importing: a start takes longer than the probe's timeout), and SQLite
    survives a kill, so it is killed outright rather than made to finish its start first."""
    if not starting.started or starting.proc is None:
        return
    with _start_lock():
        state = _read_state()
        if state is None or state.pid != starting.proc.pid or not state.speculative:
            return  # adopted (or stopped) by another command
        with contextlib.suppress(ProcessLookupError):
            os.killpg(starting.proc.pid, signal.SIGKILL)
        starting.proc.wait()
        _state_file().unlink(missing_ok=True)


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
        _kill(state, timeout)
        return state


def _kill(state: ServerState, timeout: float = 15.0) -> None:
    """End the local server ``state`` (the caller holds the start lock) and forget it."""
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
    """Point this process's Prefect at the local server's ``api_url``, with its credential
    (before Prefect is imported; after, too). The environment outranks a Prefect profile, so a
    profile's key or auth string for another server is never sent to the local one."""
    os.environ["PREFECT_API_URL"] = api_url
    os.environ["PREFECT_API_AUTH_STRING"] = local_credential() or ""
    os.environ.pop("PREFECT_API_KEY", None)  # the auth string takes precedence over a profile's key
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
        timeout = _probe_timeout()
        check = Probe(url, timeout)
        speculative = None
        if command in FALLBACK_COMMANDS and not check.settled(within=min(SPECULATE_AFTER, timeout / 2)):
            # no answer yet: a dead API is likely, so the local server starts while the probe waits
            with contextlib.suppress(BurrowError, OSError):  # then it starts (or fails) after the probe
                speculative = _begin(speculative=True)
        cause = check.cause()
        if cause is None:
            if speculative is not None:
                _withdraw(speculative)
            mine = _read_state()
            if (mine is not None and redact_url(url).rstrip("/") == mine.api_url and not has_userinfo(url)
                    and not os.environ.get("PREFECT_API_AUTH_STRING")):
                _use(mine.api_url)  # PREFECT_API_URL names Burrow's local server: it wants the credential
                return Orchestrator(api_url=mine.api_url, local=True)
            return Orchestrator(api_url=url, local=False)
        shown = redact_url(url)
        if command not in FALLBACK_COMMANDS:
            raise OrchestratorUnavailable(
                f"the Prefect API at {shown} ({origin}) is unreachable: {cause}; "
                f"`burrow {command}` waits for the orchestrator (backup, restore, verify, failover and undo "
                "fall back to the local server)"
            )
        if speculative is not None:
            _adopt(speculative)
            starting = speculative
        else:
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
    s.add_argument("--show-credential", action="store_true",
                   help="status: also print the UI's login (user:password); by default only the 0600 file "
                   "that holds it is named")
    return {"server": cmd_server}


def _status() -> dict[str, Any]:
    state = _read_state()
    alive = state is not None and _is_our_server(state)
    info: dict[str, Any] = {
        "home": str(server_home()),
        "database": str(server_home() / "prefect.db"),
        "running": bool(alive),
        "credential_file": str(credential_file()),
        "login_user": CREDENTIAL_USER,
    }
    if alive and state is not None:
        info.update(pid=state.pid, ui_url=state.ui_url, api_url=state.api_url, healthy=_healthy(state),
                    private=state.private)
    url, origin = configured_api_url()
    if url:
        cause = probe(url, _probe_timeout())
        info["configured_api_url"] = redact_url(url)
        info["configured_from"] = origin
        info["configured_reachable"] = cause is None
        if cause:
            info["configured_cause"] = cause
    return info


def _login_line() -> str:
    """How to open the UI: Prefect's login page asks for one "password" field that takes the
    whole auth string, ``user:password`` (its placeholder reads ``admin:pass``); the UI keeps it
    in the browser's local storage."""
    return (f"private: the UI's login page asks for `{CREDENTIAL_USER}:password`; paste the whole line of "
            f"{credential_file()} (mode 0600; `burrow server status --show-credential` prints it); any other "
            "request without it gets 401")


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
        print(_login_line())
        return EXIT_OK
    info = _status()
    if getattr(args, "show_credential", False):
        info["credential"] = local_credential(create=False)
    if args.json:
        print(json.dumps(info, sort_keys=True))
        return EXIT_OK
    if info["running"]:
        health = "answering" if info["healthy"] else "NOT answering"
        print(f"local Prefect server: running (pid {info['pid']}, {health}), UI at {info['ui_url']}")
        if not info["private"]:
            print("  started by an older Burrow WITHOUT a credential: the next flow command or "
                  "`burrow server start` restarts it private")
    else:
        print("local Prefect server: not running (the next flow command starts it)")
    print(_login_line())
    if info.get("credential"):
        print(f"login: {info['credential']}")
    print(f"home: {info['home']} (database {info['database']})")
    if "configured_api_url" in info:
        where = "reachable" if info["configured_reachable"] else f"UNREACHABLE: {info['configured_cause']}"
        print(f"flow commands use {info['configured_api_url']} (from {info['configured_from']}; {where})")
    else:
        print("flow commands use the local server (PREFECT_API_URL is not set)")
    return EXIT_OK


# ------------------------------------------------------------------------------ Prefect's schema


def schema_source(key: str, sql: str) -> str:
    """The ``_PREFECT_SCHEMA = ...`` assignment for this module, from ``migrated_schema()``.
    After upgrading Prefect: ``.venv/bin/python -c "from cli.server import *;
    print(schema_source(*migrated_schema()))"`` and paste it over the one below."""
    lines = "".join(f'        "{line}"\n' for line in _pack(sql))
    return f'_PREFECT_SCHEMA: tuple[str, tuple[str, ...]] = (\n    "{key}",\n    (\n{lines}    ),\n)\n'
#: ``(schema key, packed schema_snapshot)`` of a new database migrated by Prefect 3.8.8 (alembic
#: head a3b9c7d2e5f1); ``_seed_database`` uses it only when the installed Prefect has that key.
#: Regenerate after upgrading Prefect (see ``schema_source``); tests/test_orchestrator_fallback.py
#: checks that it is still what Prefect's migrations produce.
_PREFECT_SCHEMA: tuple[str, tuple[str, ...]] = (
    "3.8.8+b73b09dc3699:113:9f7bd0c8a589918f",
    (
        "eNrtHWtz3Lbxs/0rWE09d5qeO7aTJnU6+XCV6FiNLKV6pPF0OhgeDycz4h3PJE+Wpul/LwgS4AJYPGjLcRvTH2wfubt4cHex"
        "u9gFDs7i+UUcXcz/ehxHSU7XiywlN7SssmITTR8+6P5LNrt19OP87ODl/Gz6xbP96OT0Ijq5PD6eRQ8fHJyenF+czY9OLnQK"
        "ZHudRj+cHb2an72Ovo9fR1NAb//h/l8eHsD2V3nxrmk0W0ZtQ1/tR4fxi/nl8QV7HLE/7d/NHwZKy+kbejstk82yWC/yYjH9"
        "cn9/P5Igv/wSTR5PlN8o1jMT60sVrdotqrqcWrFnz9zNdviTPz9PFpNZsqg6AlPW8KPoy+gP0dNZ9HT/XttEEb9iiByo+1v5"
        "jmlJk5ouo0P2RS6OXsX93LOOrOpsTaeTR68fP1o/frSMHr385tGrbx6tnjx5MplFk03xbrKvktttl/dJbpOsqWBB5UWdXFXR"
        "385PT2QDk3/+awJA8mRB8xZEY9ftNeE8p7BottzXwHZvORghvA+XJ0d/v4yjafPD5OG02KS7sqSb9I7k2TqrR4YeGRolx/gW"
        "5WeTgxgPxt/FKlSS1tkNJVVe1G7u1xneJK9zv8HTVXJDl6SiSZm+Gdl5ZOdh+nmV5TVb9QcxqcJxfu0MwYO0dJ1U16TcbUhV"
        "szkgaZK+oSNnj5yNkuPcQa7pHa6u+Vt6u83KpG6sZtFqq+MVPoPsZWd+lDm9Sjq5opvR2Bh5eKB2zpOqJtyYyOo70tC9rybf"
        "FeU1ebuju1C+bznYo+1XHRwhCn34M3pxehYffXfSkJgqUPvRWfwiPotPDuLzCCDgq0rXTpjRv8qudp0CGGVwlEGM3B5bQvZQ"
        "IbxJcsaF3EByGu6AyfxGkQJP+PoluJj3xGTjPTbDKTO+2HqzTvasfDyy8H2x8P8T964ymi91K/7f/1Gt+JaB6rutXecz5kqv"
        "qz6cqBlT22SR5VmdUbfDIEKUgogE2xSbx91LunS5GJDXAxYdCE6IMk74U1l7FChl7QEITXMRH+hxzCTxYH5+MD+MDdlU2i/p"
        "ijYe/OizjGvNQHtvm5SNVaOwk01UJZuFgdvlCzDsQEnru0DwnhNVkKH44QiIHHa4miSmSZUmSxreQet0OfpoxRnaTdtivizS"
        "3ZpNw7icj8t5kIJgrSRBq7xHGwSYAllFErZe362LXRX99fT0OJ6DVp/ARgE12HOb2hFcH6xuBojs+wpqt7LbeiC6/CmMi70e"
        "ZdQTo54ICxwVVwXZlTkURcHDrcupv6RVWmbbGpjt7XbXsgmfJuttrog1Uw7bsqhp2gzGrRwePqjyHb6ZhikHLhneeGoTHqLl"
        "BxvYGpsECYQuDwNZ09FkoDDcX4OfVxz1DU3KesH6f/+B1G1R5JaFtG8129S0vElyUtG02DBvvds5nkXNVgJbZEUKz9c9J09O"
        "X7w4PjqJXb5yJwv+xbQF7IKxXZfBLzMy28GYgVkOHmSR797izSpxW/hmFuFR3D2e5CE3XsaVcFwJlXyNZtkQAvRce8eIMaZZ"
        "bz+6nmHtVMmVslK224RLWidZ7gvQSeueh/QEv9sDANUurwlTL9kqSWsIh2dS9dIToCxUBEJAd/ofisoAEIrGkMChJrfetDlQ"
        "In9o/roOqHRE4mgdOY/bSTV1jrrZO+qcUef8tnWO5Pd70Tmq9AToHC234lcTfH9PwMT0P5QuAAilbQkc6u1LY+iD1M3o2fz2"
        "Y4G4yw61khrzSypKfi4WpKbMnW8k0q0ZGh8/2VUBDr41Kbbt5ipphNNINjH8nufA72HkCROLw9dqrjhz42r2Raus5luIpKVA"
        "khokdnGo7gW9aYJ2WqNFyfSltmPvngrT4WpdIP8+f+/aIKkquIvWgevzZk2i0QFdeTRAAZ3FrN2jgwuLBuI4o8UzWjwD0oil"
        "HYGopr7lyWT/Y+gZLvbbIs/BcPmeapkVZVbfyUR9Sf3pZFAkZ6i2QtVGK4phsZpOoj9SvAZ3v4TKwpoeHrMRhtdoyoymjJ5j"
        "p9sqhjOyZv5L84A43RNbqGQWWewjLa1VuAbeLQcZgBwXxXFRDFoUW99RixJwL5qxalrsNrW5JmkrHr3d8j22xp4ttY0L3ja9"
        "rfmO9nKX26Esj+lmaT6sizrJuTDhuyR6D7lUaAl/XSoTmxektshwM5bMHSlqvqiDMo5uva/ZAD0EGHpWZinrNVv9s/TOA+6t"
        "SH34INnVRT+rXrOET4EtYrKk27y4WxtuiEz2sik1oyilf6gnWWSbVcmsn3KX1ruS9skKGjJY2HUKHasaQSsgfWRxJxWx1uCW"
        "NQSI4bUFs6jxPW+SMksWOUW4otHYcq4MjvLWCfMgy4C4Nuk+W/sfM5KNRLGHR7CJ/dMQPRsG9sCOhiSTSArDu2fyoCW8ZQIG"
        "RbnsEba+D4LRib5JAdsXQOjOQgf/Hm3fc5lKyKaCDFKmja+S3ktRymgifya1KE3Yrqotiw2+kuDGsWp5A7sbtZpNUxy3oiFP"
        "+2NjCFZYJYwRByA3z0YXc3Qx5ckL0mQLstP3OA/t+U9ywACWdJM1lrcVoHlDljRN7siWll3yT/Ti+HR+obZ0c8WpkCJNd9uk"
        "4W2RKGQCe06NYPIQVoNmoAVVVO7lxdXoBY9ecFjuHb2heXT+an583PCd4Tghro/NJRJb3RfxTxe+3Xa7tDDmHRDtYRb8djcG"
        "MMfVJaRI2GBMTxJXRTdLWtqjkyoThp6EJRHUrC1oWYHns6g1sxxuEkLsflLAbOVRaVWuSF1cU+4atf9BK1LzrPF7sVfImR9a"
        "2Gn0t0Z/C7WmeuYLsKEkMCEdNwoZa38iZ8Hs6mItD6MYkt6hMvimiaMh0UltW3OvLrOrK1rumUcYJNznqqwvCHPIOmxfxLRH"
        "KGlV5DfUgzCK3yh+ImpxNez4MSA//nOXJCzjy5yHsRv+3JVtdT547ch45OBEjXEDzOLdhkfHe8q+DYOR+Ufm9/G2ya8BZy/Z"
        "sQlReB3+VCw4BUpNogXLVlgqa1qst0WVNRtL7SJC0jdZviSrrMw2V4HyJzYeOgr2g0saymFQbft+IDZ9SmKhim+umqNYj2Jt"
        "C9A5JcEv2W4Cn0K49wCxxS69pm2MJECifULaUmuG1XishpTxPD+e1ys3I3h+A+7m7TEPew9/pWZgGE0UW9r5jzBhqe27qRnG"
        "2NDnHhuyLuQtPw9bvlucTyHXbca8MBuqRqabDYmyhDNlM5CN+Jd8WRY5tb82pdxI3B9X2nGlDZA7nX29HiJHCGDzdsWxM7iL"
        "+032NszzbOlzgjsUD9Q2ucuLZIm1mNLsxi7EaVEubW9XRc64plL2YkYRHEXQIYIBkrcncgHHzbXRgPqgO2TgGb0mPwo2C4jm"
        "C9CwLAhgdrXLTqsnm1D7tNn3TpbMy3EbMgLDA+ZW3oJIYERiFKrPSKiqtLCUA1v9FZWXA/R4n7Y9JgWNSUH3pdKDC0g85Rf9"
        "Lmpjnw8ol5AdaEJBm2SbiaMj+7BTW0luI4BUxfCmScHelNmS+ka2Teo3EJu1Ud5ti6xPefCUdSClG90Xho9s9RqsA7s8J1VN"
        "t33hBd2sisZh6WenmxXfppe1Pjes9nd49a2zWhi+LLb9NjiKqE+LUosiLk10HoXSq8iAOBAog/kVChTc7f9P1q/ADiJC6OwZ"
        "An/fXfqIhUWwGYxNCZ4LDPuAoSkdQikEH5kFeigq6Eb/bjRFuSnasgOebmRJ2sfLJ9UDsJJbUAJb7jbgZM1AIwKeUOtS3rKd"
        "YVpcYBGiDAf+1E50AVCKbAKEwHg+UlM5DZrWBWO4VDE/5ErHTADfqWKI2RVg82lFnri9gxglwbai16Z7b/PGbkQ57LNh5iCq"
        "Qr+LT8jZ/OTw9BW5vDw6nIaqhIPLM8ZTF6R5eH4xf/VDmOi70axyI1hvkNgIfvv4UhPWjU9QLCpPoBw969GzHg+d6MMHTCps"
        "d34u79jkZKnnTlD9qAnvRaGINz/45AlGhtdSVB9+RoWtdmrAsRGuQx8k+XC2cZ7QIA8IGHAK6Mc7c9h3H09/W9Cod0e9O/zq"
        "Liwi6Ly8y4vgukfnPS7wMlG1K7xCwyk2pPuIqdi76pg+Z28deB/c4dTVYefLTUEqmq/AZzx4GR98H1knN/rdt5FrKEC9HZ0c"
        "xj9F2W2rPomQBjaYNu7UPUAQzDAQxDaDqw5S6g3wgIpyk7yDAHbpNiFyIScizt24nQ1d/AZ5CT+LpJKJzw+C2wMdxxuwD6C7"
        "rRhQ6G4E96KofmWPqLoZ6OfTL5htPxu8C7mt/PQiq98dErB3v+U3Mc+S37oHCIJ6hydoUr22y96i7eY/Cyl4T6dnGI3SZ9+4"
        "YlO9qSg/ffiGRmz87Zj4mnBwenzcYJ6cMvUQe8enXsBmjFK9P8xHDMyySsY32/21ZnwMEr/XfDz1wY9uzHFPwZjbLquipbV7"
        "K+54E1eq2XqiTEl34qi/Y8otdghV+N5KjjdqjrG9xM3HkPJaPJODNErqkPBparvC45UadvPMjo1oc+ZkWDQ5e+Prh2S97sJg"
        "6R6ZPNhByJ0yZKbEFUFgisUNX/bpRe8Vwm56AtTUU2sR4MB2bDTt0+a6T0W6YHIB0082U+r1JbhNX4FmhDTpBC3io6Nz1kLQ"
        "m+cB6Jq5ASl4VK7zFgiMHnIFhPVbuG53ML+Fdo0FvOnB/S30ZsS30AlavoWObjU/BlhOlsnU6bkm00pa8IoxXzivgKPuBSY4"
        "q9qPpOmKDs+tLtBjreUB4YJSF6JVdYWAGkDZRdBDRh9cR8FhLYpPBRULNxfl3ScwVuIiAE/fUQjAwx9dBKCVK5ED5J2I2KCh"
        "BqOpeOXEN2zlHt9nLruOxFQpISdhusjpQTaFlvYydHC6UleG59PsMF6rd6as/ZMMAszYWDwLg0iOUHFFXoQXEVgZGrbduAg5"
        "jFUl6Mhe8c+MTkyeXOpAtZqHPRnvZzWZwouCLM+BgmruEGAya0IFzJ85jv55gHkls2/0c6UxhptFGpR7hm37HiTRh24FdSrO"
        "rpu90rT557aTM0l/Piigo5w0y0k2pm8HGBT5ac4FdAV/eIaQnXHy4oqoKrA5g23q0nscRVvKOJJ7FeNo7YlzAoH/snZK1fJt"
        "t5yanaOBueAonqGjtj42Irc9qfm21qgE5sP74xP6aV+Y7d4eQ+YKGoLjkCDDgPO8HDZMn4Ou2BCghjUI2Tz7AlbpKRSRU2EA"
        "7NBm0E4jTXhDIkMO8hgyNgV1FrmH6jtzQFEI7pM+vAP2nm/Ah7rtUhybuE5Qu9p4jbNEZpF+bohzAUASWhStb753c5ClypvZ"
        "utqX7ErI9fHwww3CmsBZU9AdwpCWTvdTSIh6gkPQUOA3UdCR4Wk1vooIECLLeFm7RjE7gJxFAjKkCTB/BlG7UmpLIUlHrmNa"
        "UXHM/20sEC+i6ChOQLwNIiV0gjFLPb0OxD8/gGg//07CAya/IiipAWjabAVOE1qZDchg7x3kdL5xsktffgjQZPli2OKnVm/Z"
        "BF+r8Xo/0nqFo7sJDXpYU7IA0t2GABtGvK2Rc1PmMA73QxBbFWU4vVlk1H+GGvtIjEUx80MiRdjOqeZ7eHdK9f0Wfc8jZDun"
        "AbFu6FiKYQRZmNrpD4IAYlaXG1IM6BPYe4OY9p03a3WPYziZjxCIqkASRlxF51usbAWbWukvB8wIYE1Iws6RELmrBtNw26du"
        "VEuSvUqqT+DX0oUDSaNjA0RDgicCutTymtVbp2C0wWplNl9ERWNfyBp6iP7xMj6LIxDA+zaanB+8jA8vj+PDSeAUiL1HdPyO"
        "Tcigr9WSl7ljeDP6DPBGJU43yKaXR+cyh8o5ODzRXGtdVk8MYBxJGOcbSTJINvA8dBvJAdoDI2wqAZS0OyjnmWLSlZiEzDPz"
        "CjiwR32AYkxNhfRvsDWR9is4X5k72yZsEfdbNn1Kqxrj7K/NwmKcCLo3BNlTHBKC1Pun7go6Y9g6qhLf0ikE7ZZqGxQKjZAh"
        "aFHDHt8dOjQGom1nenY4enRknzZoh9bc/urRHdtfEt9q0QCe8PKXwZheFNdeABiAay/Auj+vRk67pH8CE/xtH7i7DYsn+wH4"
        "oIW5aUwu0nAtsq7BP1eNdritS2Y5T/ui+1k0+f0fs+Vk37Uq6wuXZXWO5ieH2lrPAJ6G8TFoD44HY21+z7XRN6/h78q3Q/KU"
        "fTETGHoRjjvsuRGDkXEBR5cNykJjOylLte6gjIYIVboW3gmjCr5kWiQ5ky7bJ8X2Y5kT1yEBFTqLMJGE3Tk6OY/PLpqyj9OI"
        "oa8XTITk4iyW081uvR/9OD++jM+j6ST5YvE8/Xr5jP5p9XTCvu1/AXV06no="
    ),
)
