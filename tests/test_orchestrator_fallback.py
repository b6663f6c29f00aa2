"""Which Prefect API a flow command runs on, through the real ``burrow`` console script.

* Without PREFECT_API_URL, the first flow command starts Burrow's local Prefect server under
  $BURROW_HOME and says where its history is; later commands reuse it; ``burrow server
  status|stop`` manage it.
* With a PREFECT_API_URL that refuses connections or never answers, backup, restore, verify
  and failover detect it within 3 s (the issue's hard limit, tested with a margin), print one
  warning naming the URL (never its credentials) and the cause, and run on the local server,
  whose history keeps the run. prune stops with the cause named instead of hanging.
* The same when the local server does not run yet (the user always had a live orchestrator):
  on first use (a fresh BURROW_HOME, whose database is written from Burrow's snapshot of
  Prefect's schema, itself checked against Prefect's migrations here) and when it was stopped
  (then it is launched while the dead URL is still being probed).
* A server launched that way for an API that answers after all is killed again, unless
  another command has adopted it meanwhile.

One local server (under a temporary BURROW_HOME, on a free port) serves most of the module and
is stopped at its end; the first-use test has its own home and server.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import importlib.util
import json
import os
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import BURROW, REPO, run_cli
from zkutil import kazoo, unique_root

from burrow.testing.servers import free_port, silent_listener
from cli import server

DETECT_LIMIT_S = 3.0  # the issue: "detect it within 3 s"
MARGIN_S = 2.0  # interpreter start on a loaded 2-core machine


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """Environment for a burrow subprocess that has no Prefect API configured, and a fresh
    Burrow home; the local server it starts is stopped at the end of the module."""
    home = tmp_path_factory.mktemp("burrow-home")
    port = free_port()
    env = {
        "BURROW_HOME": str(home),
        "PREFECT_HOME": str(home / "client-prefect-home"),  # no profile with an API URL in it
        "BURROW_SERVER_PORT": str(port),
        "PREFECT_API_URL": "",
    }
    _HOMES.append(str(home))
    yield env, port
    stopped = run_cli("server", "stop", env=env, timeout=60)
    assert stopped.code == 0, stopped


@pytest.fixture(scope="module")
def archive(zk_a, tmp_path_factory):
    """A small unencrypted archive, made in-process on the session's Prefect server."""
    from flows.backup import backup

    root = unique_root()
    with kazoo(zk_a.url) as c:
        for i in range(5):
            c.create(f"{root}/cfg/k{i}", b"v", makepath=True)
    store = tmp_path_factory.mktemp("fallback-store")
    summary = backup(source=f"zk://{zk_a.url}{root}", store=str(store), name="fallback-src", encryption=False)
    return summary["url"], store, root


def _headers(port: int) -> dict[str, str]:
    """The headers of a request to the local server on ``port``: it is private, so they carry
    its credential (read from the 0600 file of the Burrow home whose server listens there)."""
    homes = [Path(os.environ["BURROW_HOME"])] + [Path(p) for p in _HOMES]
    for home in homes:
        with contextlib.suppress(OSError, ValueError, KeyError):
            if json.loads((home / "prefect" / "server.json").read_text())["port"] == port:
                cred = (home / "server-credential").read_text().strip()
                return {"Content-Type": "application/json",
                        "Authorization": "Basic " + base64.b64encode(cred.encode()).decode()}
    return {"Content-Type": "application/json"}


#: Burrow homes of this module's tests (their local servers' credentials are there).
_HOMES: list[str] = []


def _local_runs(port: int, prefix: str) -> list[dict]:
    """Flow runs named ``prefix...`` in the local server's history."""
    body = json.dumps({"flow_runs": {"name": {"like_": prefix}}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/flow_runs/filter", data=body,
                                 headers=_headers(port), method="POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as r:
        return json.loads(r.read())


class Timed:
    """A burrow subprocess whose stderr lines are stamped with when they arrived."""

    def __init__(self, args: list[str], env: dict[str, str], timeout: float = 240) -> None:
        full = os.environ.copy()
        full.update(env)
        self.started = time.monotonic()
        proc = subprocess.Popen([BURROW, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full,
                                cwd=str(REPO), text=True)
        self.lines: list[tuple[float, str]] = []
        out: list[str] = []
        t = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
        t.start()
        for line in proc.stderr:
            self.lines.append((time.monotonic() - self.started, line.rstrip("\n")))
        self.code = proc.wait(timeout)
        t.join(timeout)
        self.out = out[0] if out else ""
        self.err = "\n".join(line for _, line in self.lines)

    def warnings(self) -> list[tuple[float, str]]:
        return [(t, ln) for t, ln in self.lines if ln.startswith("burrow: warning: the Prefect API")]

    def __repr__(self) -> str:
        return f"Timed(code={self.code}, out={self.out[-1500:]!r}, err={self.err[-3000:]!r})"


def test_without_an_api_url_the_local_server_starts_once_and_keeps_the_history(local, archive):
    env, port = local
    url, _, _ = archive
    first = run_cli("verify", url, env=env, timeout=240)
    assert first.code == 0, first
    started = [ln for ln in first.err.splitlines() if "local Prefect server" in ln]
    assert len(started) == 1 and f"http://127.0.0.1:{port}" in started[0], first
    assert "Traceback" not in first.err and "| INFO" not in first.err, first

    status = run_cli("server", "status", "--json", env=env)
    assert status.code == 0, status
    info = json.loads(status.out)
    assert info["running"] and info["healthy"] and info["ui_url"] == f"http://127.0.0.1:{port}", info
    assert info["database"].startswith(env["BURROW_HOME"]), info
    runs = _local_runs(port, "verify-")
    assert len(runs) == 1 and all(r["state_type"] == "COMPLETED" for r in runs), runs


def test_a_refusing_api_url_falls_back_to_the_local_server(local, archive, zk_b):
    env, port = local
    url, store, root = archive
    dead = f"http://burrow-user:hunter2-secret@127.0.0.1:{free_port()}/api"
    r = Timed(["failover", "fallback-src", "--from", str(store), "--into", f"zk://{zk_b.url}{unique_root()}", "--dry-run",
               "--force"],  # the primary (zk_a) still answers: this is a drill
              {**env, "PREFECT_API_URL": dead})
    assert r.code == 0, r
    warnings = r.warnings()
    assert len(warnings) == 1, r
    at, line = warnings[0]
    assert at < DETECT_LIMIT_S + MARGIN_S, r
    assert "connection refused" in line and f"127.0.0.1:{dead.rsplit(':', 1)[1]}" in line, line
    assert "hunter2-secret" not in r.err + r.out and "burrow-user" not in r.err + r.out, r
    assert f"http://127.0.0.1:{port}" in line and "starting it now" not in line, line  # reused, not restarted
    assert f"failover from {url}" in r.out, r
    assert _local_runs(port, "failover-"), "the failover is not in the local server's history"


def test_a_never_answering_api_url_falls_back_within_3_s(local, zk_a, tmp_path):
    env, port = local
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root + "/x", b"1", makepath=True)
    hang = silent_listener()
    try:
        dead = f"http://127.0.0.1:{hang.getsockname()[1]}/api"
        r = Timed(["backup", f"zk://{zk_a.url}{root}", "--to", str(tmp_path), "--no-encryption"],
                  {**env, "PREFECT_API_URL": dead})
    finally:
        hang.close()
    assert r.code == 0, r
    warnings = r.warnings()
    assert len(warnings) == 1, r
    at, line = warnings[0]
    assert at < DETECT_LIMIT_S + MARGIN_S, r
    assert "no answer within" in line and dead in line and "starting it now" not in line, line
    assert r.out.strip().splitlines()[-1].startswith("file://"), r
    runs = _local_runs(port, "backup-")
    assert any(root.strip("/").replace("/", "-") in run["name"] for run in runs), runs


def test_prune_names_the_dead_orchestrator_and_stops(local, archive):
    env, _ = local
    _, store, _ = archive
    hang = silent_listener()
    try:
        r = run_cli("prune", str(store), "--dry-run",
                    env={**env, "PREFECT_API_URL": f"http://127.0.0.1:{hang.getsockname()[1]}/api"}, timeout=60)
    finally:
        hang.close()
    assert r.code == 1, r
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("burrow: error: the Prefect API at http://127.0.0.1:"), r
    assert "is unreachable: no answer within" in lines[0], r


def test_server_stop_and_status(local):
    env, port = local
    assert run_cli("server", "start", env=env, timeout=240).code == 0  # running already (or again)
    stop = run_cli("server", "stop", env=env, timeout=60)
    assert stop.code == 0 and "stopped the local Prefect server" in stop.out, stop
    status = run_cli("server", "status", "--json", env=env)
    assert json.loads(status.out)["running"] is False, status
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens there any more
    again = run_cli("server", "stop", env=env)
    assert again.code == 0 and "not running" in again.out, again
    assert not (Path(env["BURROW_HOME"]) / "prefect" / "server.json").exists()


def _fell_back_once(r, *, cause: str, dead: str, port: int, archive_url: str) -> None:
    """The failover succeeded on the local server it started, after exactly one warning naming
    the dead URL and the cause."""
    assert r.code == 0, r
    warnings = r.warnings()
    assert len(warnings) == 1, r
    line = warnings[0][1]
    assert cause in line and dead in line, line
    assert f"http://127.0.0.1:{port}" in line and "(starting it now)" in line, line
    assert f"failover from {archive_url}" in r.out, r


def test_a_never_answering_api_url_starts_the_stopped_local_server_and_keeps_the_history(local, archive, zk_b):
    """After test_server_stop_and_status: the local server is stopped, its database exists."""
    env, port = local
    url, store, _ = archive
    assert json.loads(run_cli("server", "status", "--json", env=env).out)["running"] is False
    hang = silent_listener()
    try:
        dead = f"http://127.0.0.1:{hang.getsockname()[1]}/api"
        r = Timed(["failover", "fallback-src", "--from", str(store), "--into", f"zk://{zk_b.url}{unique_root()}", "--dry-run",
                   "--force"], {**env, "PREFECT_API_URL": dead})
    finally:
        hang.close()
    _fell_back_once(r, cause="no answer within", dead=dead, port=port, archive_url=url)
    runs = _local_runs(port, "failover-")  # the history from before the stop is there, and this run
    assert len(runs) >= 2 and all(run["state_type"] == "COMPLETED" for run in runs), runs
    state = json.loads((Path(env["BURROW_HOME"]) / "prefect" / "server.json").read_text())
    assert state["speculative"] is False, state  # adopted: it stays up for the next command


def test_first_use_with_a_refusing_api_url_starts_the_local_server_and_keeps_the_history(archive, zk_b,
                                                                                         tmp_path):
    """No BURROW_HOME yet (the user only ever had a live orchestrator)."""
    url, store, _ = archive
    port = free_port()
    env = {"BURROW_HOME": str(tmp_path / "new-home"), "BURROW_SERVER_PORT": str(port),
           "PREFECT_HOME": str(tmp_path / "client-prefect-home")}
    _HOMES.append(env["BURROW_HOME"])
    dead = f"http://127.0.0.1:{free_port()}/api"
    try:
        r = Timed(["failover", "fallback-src", "--from", str(store), "--into", f"zk://{zk_b.url}{unique_root()}", "--dry-run",
                   "--force"], {**env, "PREFECT_API_URL": dead})
        _fell_back_once(r, cause="connection refused", dead=dead, port=port, archive_url=url)
        assert "Traceback" not in r.err, r
        runs = _local_runs(port, "failover-")
        assert len(runs) == 1 and runs[0]["state_type"] == "COMPLETED", runs
        # the server the fallback started is private: the failover ran with its credential, and a
        # request without it is refused
        plain = urllib.request.Request(f"http://127.0.0.1:{port}/api/block_documents/filter",
                                       data=b'{"include_secrets": true}',
                                       headers={"Content-Type": "application/json"}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(plain, timeout=10)
        assert refused.value.code == 401
        # its logs, artifact and events are in that history too
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for kind in ("logs", "artifacts"):
            body = json.dumps({kind: {"flow_run_id": {"any_": [runs[0]["id"]]}}}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/{kind}/filter", data=body,
                                         headers=_headers(port), method="POST")
            with opener.open(req, timeout=10) as resp:
                assert json.loads(resp.read()), f"the failover's {kind} are not in the local server's history"
        events: list = []
        for _ in range(50):  # the event persister writes in batches
            body = json.dumps({"filter": {"any_resource": {"id": [f"prefect.flow-run.{runs[0]['id']}"]}},
                               "limit": 50}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/events/filter", data=body,
                                         headers=_headers(port), method="POST")
            with opener.open(req, timeout=10) as resp:
                events = json.loads(resp.read())["events"]
            if events:
                break
            time.sleep(0.2)
        assert events, "the failover's events are not in the local server's history"
        log = (tmp_path / "new-home" / "prefect" / "server.log").read_text()
        assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    finally:
        stopped = run_cli("server", "stop", env=env, timeout=60)
    assert stopped.code == 0 and "stopped the local Prefect server" in stopped.out, stopped


def _schema(db: Path) -> dict:
    """What a SQLite schema means, without what Prefect's migrations leave to chance: the order
    of a rebuilt table's constraints (alembic's batch mode reflects them into sets)."""
    con = sqlite3.connect(db)
    try:
        out: dict = {"alembic": con.execute("SELECT version_num FROM alembic_version").fetchall()}
        for kind, name, sql in con.execute("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL "
                                           "AND name NOT LIKE 'sqlite%'").fetchall():
            if kind != "table":
                out[kind, name] = sql
                continue
            indexes = [(unique, origin, partial, tuple(con.execute(f'PRAGMA index_xinfo("{index}")').fetchall()))
                       for _, index, unique, origin, partial in con.execute(f'PRAGMA index_list("{name}")')]
            out[kind, name] = (
                sorted(line.strip().rstrip(",").strip() for line in sql.splitlines()),
                con.execute(f'PRAGMA table_xinfo("{name}")').fetchall(),  # the columns, in order
                sorted(fk[1:] for fk in con.execute(f'PRAGMA foreign_key_list("{name}")')),
                sorted(indexes),
            )
        return out
    finally:
        con.close()


def test_the_schema_snapshot_is_what_prefects_migrations_make(tmp_path):
    """A new local server's database is written from ``server._PREFECT_SCHEMA`` instead of by
    Prefect's migrations: it must be the schema they make, for the Prefect installed."""
    key, sql = server.migrated_schema()
    assert server._PREFECT_SCHEMA[0] == key, (
        "Prefect changed: regenerate _PREFECT_SCHEMA in cli/server.py with\n"
        "    .venv/bin/python -c 'from cli.server import *; print(schema_source(*migrated_schema()))'"
    )
    migrated = tmp_path / "migrated.db"
    with sqlite3.connect(migrated) as con:
        con.executescript(sql)
    con.close()
    package = Path(importlib.util.find_spec("prefect").origin).parent
    seeded = tmp_path / "seeded.db"
    assert server._seed_database(seeded, package)
    assert _schema(seeded) == _schema(migrated)
    assert not server._seed_database(seeded, package)  # never over an existing database
    assert sqlite3.connect(seeded).execute("PRAGMA journal_mode").fetchone() == ("wal",)


class _SlowHealth(http.server.BaseHTTPRequestHandler):
    """A live API whose /health answers after a second: after Burrow's speculation starts."""

    def do_GET(self) -> None:  # noqa: N802
        time.sleep(1.0)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "4")
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args: object) -> None:
        pass


def test_a_slow_but_live_api_url_withdraws_the_speculative_local_server(tmp_path, monkeypatch):
    slow = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowHealth)
    threading.Thread(target=slow.serve_forever, daemon=True).start()
    monkeypatch.setenv("BURROW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BURROW_SERVER_PORT", str(free_port()))
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{slow.server_address[1]}/api")
    launched: list[server.Starting] = []
    real_begin = server._begin

    def spy(speculative: bool) -> server.Starting | None:
        starting = real_begin(speculative)
        launched.append(starting)
        return starting

    monkeypatch.setattr(server, "_begin", spy)
    try:
        chosen = server.choose_orchestrator("failover")
    finally:
        slow.shutdown()
    assert not chosen.local and chosen.api_url == os.environ["PREFECT_API_URL"], chosen
    assert len(launched) == 1 and launched[0] is not None and launched[0].started, launched
    proc = launched[0].proc
    assert proc is not None and proc.poll() is not None, "the speculative local server still runs"
    assert server._read_state() is None and server.running_server() is None


def test_a_speculative_local_server_adopted_by_another_command_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("BURROW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BURROW_SERVER_PORT", str(free_port()))
    mine = server._begin(speculative=True)
    try:
        assert mine is not None and mine.started and server._read_state().speculative
        assert server._begin(speculative=True).started is False  # a second speculation reuses it
        theirs = server.begin_server()  # another command falls back: it needs this server
        assert not theirs.started and theirs.state.pid == mine.state.pid
        assert server._read_state().speculative is False
        server._withdraw(mine)  # the first command's API answered after all: too late
        assert mine.proc.poll() is None and server._read_state().pid == mine.state.pid
    finally:
        server.stop_server()
    assert mine.proc.poll() is not None
